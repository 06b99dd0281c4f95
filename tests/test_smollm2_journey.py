"""A user's whole journey on a real pretrained LLM (SmolLM2-135M-Instruct, prepared offline), each step checked:
peft, ``transformers.Trainer`` with its defaults on real chat-formatted TREC questions, evaluation and decoding
against a float64 model whose adapted weights are built with ``torch.kron`` from the factors as they are, tuning,
``torch.compile``, ``explain``, save and reload, a LoRA export that plain peft reads in a process that never
imports lsr_compile, and ``merge_and_unload``. ``make test-slow`` prepares the model first."""
import copy
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import lsr_compile as lc
from lsr_compile import pretrained

from test_inference_cache import _adapted, _reference

pytestmark = pytest.mark.slow

INSTRUCTION = "What kind of answer does this question ask for? Answer with one word: {}.\n\n{}"
WORDS = ", ".join(pretrained.TREC_CLASSES.values())
CASES = {"all-linear": "all-linear", "q_proj,v_proj": ["q_proj", "v_proj"]}
SHAPES = {"all-linear": 4, "q_proj,v_proj": 2}  # distinct layer problems: 576², k/v 192x576, MLP up and down
STEPS, LR = 6, 3e-2  # few steps, a rate high enough that the greedy answer changes


@pytest.fixture(scope="module")
def smollm2():
    pretrained.prepare()
    model, tok = pretrained.load()
    rows = pretrained.trec("train")[:16]
    prompt = _prompt(tok, pretrained.trec("test")[0]["text"])
    with torch.no_grad():
        base_greedy = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                     do_sample=False)
    return model, tok, rows, prompt, base_greedy


def _messages(text):
    return [{"role": "user", "content": INSTRUCTION.format(WORDS, text)}]


def _prompt(tok, text) -> torch.Tensor:
    return tok.apply_chat_template(_messages(text), add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"]


def _example(tok, row) -> dict:
    """The chat, up to the end of the assistant's turn, labelled on the answer (word and end of turn) only."""
    prompt = _prompt(tok, row["text"])[0].tolist()
    full = tok.apply_chat_template(_messages(row["text"]) + [{"role": "assistant", "content": row["label"]}],
                                   return_dict=True)["input_ids"]
    assert full[:len(prompt)] == prompt
    answer = full[len(prompt):]
    answer = answer[:answer.index(tok.eos_token_id) + 1]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


class _Pad:
    """Right padding; padded positions are masked and not predicted."""

    def __init__(self, pad):
        self.pad = pad

    def __call__(self, rows):
        width = max(len(r["input_ids"]) for r in rows)
        fill = lambda r, k, v: r[k] + [v] * (width - len(r[k]))  # noqa: E731
        return {"input_ids": torch.tensor([fill(r, "input_ids", self.pad) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                for r in rows]),
                "labels": torch.tensor([fill(r, "labels", -100) for r in rows])}


def _loss_tol(want: float) -> float:
    return 2e-5 * abs(want)  # float32 against float64: 3e-7 of it here


def _check_loss(got, plain, pm, batch):
    """``got`` is the loss of the float64 model whose weights are W + scale·B·A from the factors as they are."""
    with torch.no_grad():
        want = float(_reference(plain, pm)(**batch).loss)
    assert got == pytest.approx(want, abs=_loss_tol(want)), (got, want)
    return want


def _check_greedy(pm, plain, prompt):
    """Greedy decoding with the KV cache: each new token's logits are the float64 model's on the generated
    sequence, teacher-forced (a near-tie cannot make the two diverge), and each token is its argmax unless the
    top two are within the tolerance. Returns the sequence."""
    with torch.no_grad():
        out = pm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                          do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True)
        seq, logits = out.sequences, torch.stack(out.logits, 1).double()
        want = _reference(plain, pm)(input_ids=seq).logits[:, prompt.shape[1] - 1:-1]
    tol = 1e-4 * float(want.abs().max())
    torch.testing.assert_close(logits, want, rtol=0, atol=tol)
    new = seq[0, prompt.shape[1]:]
    top2 = want[0].topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert torch.equal(want[0].argmax(-1)[clear], new[clear])
    return seq


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _close(got, want, rel=1e-4):
    torch.testing.assert_close(got, want, rtol=0, atol=rel * float(want.abs().max()))


PLAIN_PEFT = textwrap.dedent("""
    import sys
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, ids, out = sys.argv[1:]
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert type(model.peft_config["default"]) is LoraConfig
    with torch.no_grad():
        torch.save(model(input_ids=torch.load(ids)).logits, out)
    assert "lsr_compile" not in sys.modules, sorted(m for m in sys.modules if "lsr" in m)
""")


@pytest.mark.parametrize("case", CASES)
def test_the_whole_journey_on_smollm2(case, smollm2, tmp_path, fresh_dispatch):
    plain, tok, rows, prompt, base_greedy = smollm2

    # peft: the layers asked for, the factors alone trainable
    pm = get_peft_model(copy.deepcopy(plain), lc.lsr_config_for_lora(8, target_modules=CASES[case]))
    adapted = [path for path, _ in _adapted(pm)]
    kinds = {p.rsplit(".", 1)[-1] for p in adapted}
    want_kinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} \
        if case == "all-linear" else {"q_proj", "v_proj"}
    assert kinds == want_kinds and len(adapted) == 30 * len(want_kinds)
    assert all(".lsr_" in n for n, p in pm.named_parameters() if p.requires_grad)

    # Trainer with its defaults on real chat-formatted questions; evaluate before and after against float64
    train = [_example(tok, r) for r in rows[:12]]
    held = [_example(tok, r) for r in rows[12:]]
    collate = _Pad(tok.pad_token_id)
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=2, max_steps=STEPS,
                             learning_rate=LR, use_cpu=True, report_to=[], disable_tqdm=True)
    assert "fused" in args.optim.value  # the fused AdamW bumps no version counter
    trainer = Trainer(model=pm, args=args, train_dataset=train, eval_dataset=held, data_collator=collate)
    batch = collate(held)  # evaluation's one batch (per_device_eval_batch_size 8)
    before = trainer.evaluate()["eval_loss"]
    want_before = _check_loss(before, plain, pm, batch)

    # decoding before training is the base's (the update starts at zero)
    seq = _check_greedy(pm.eval(), plain, prompt)
    assert torch.equal(seq, base_greedy)

    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    _check_loss(after, plain, pm, batch)
    assert abs(after - before) > 100 * _loss_tol(want_before), (before, after)

    seq = _check_greedy(pm.eval(), plain, prompt)
    assert not torch.equal(seq, base_greedy), tok.decode(seq[0])

    eager = _logits(pm, prompt)
    assert (eager - _logits(plain, prompt)).abs().max() > 100 * 1e-4 * eager.abs().max()  # every check below can fail

    # tune into a folder of its own, read it, compile: the compiled forward is the eager one
    records = lc.tune(pm, time_budget_s=10, log_dir=tmp_path / "logs", progress=False)
    assert records and lc.load_logs(tmp_path / "logs") >= len(records)
    _close(_logits(torch.compile(pm), prompt), eager)

    # explain: each distinct layer problem, the layers that run it (all of them counted), the tuned records used
    text = lc.explain(pm)
    heads = [line for line in text.splitlines() if line.startswith("base_model.") and line.endswith(":")]
    assert len(heads) == SHAPES[case]
    named = 0
    for h in heads:
        more = re.search(r" and (\d+) more:$", h)
        shown = re.sub(r" and \d+ more:$|:$", "", h).split(", ")
        assert all(n.removeprefix("base_model.model.") in adapted for n in shown)
        named += len(shown) + (int(more.group(1)) if more else 0)
    assert named == len(adapted)
    assert str(tmp_path / "logs") in text, text

    # save and reload onto a fresh base
    pm.save_pretrained(tmp_path / "lsr")
    loaded = PeftModel.from_pretrained(pretrained.load()[0], tmp_path / "lsr")
    _close(_logits(loaded, prompt), eager, rel=1e-6)
    del loaded

    # export to a plain LoRA, read by plain peft in a process that never imports lsr_compile
    lc.export_lora(pm, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.save(prompt, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", PLAIN_PEFT, str(pretrained.model_dir()), str(tmp_path / "lora"),
                           str(tmp_path / "ids.pt"), str(tmp_path / "lora_logits.pt")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    _close(torch.load(tmp_path / "lora_logits.pt"), eager)

    # merge: the same logits as the unmerged model
    merged = pm.merge_and_unload()
    assert not any(hasattr(m, "lsr_A1") for m in merged.modules())
    _close(_logits(merged, prompt), eager)
