"""LSR as a peft method: get_peft_model, save/load, merge_and_unload, named adapters, LoRA export,
reference-code import."""
import copy
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import lsr_compile as lc
from lsr_compile.peft import LSRLayer

from models import each_sample_alone, strong_adapters, tiny_bert, tokens

CFG = dict(s=4, r=2, target_modules=["query", "value"], task_type="SEQ_CLS", init="reference", alpha=600.0)


def _peft_model(**kw):
    return get_peft_model(tiny_bert(), lc.LSRConfig(**(CFG | kw))).eval()


def _set_nontrivial(model):
    """Give every factor O(1) values so the adapter visibly changes outputs."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lsr_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_trainable_count_is_spec_formula_plus_head():
    pm = _peft_model()
    layers = [m for m in pm.modules() if isinstance(m, LSRLayer)]
    assert len(layers) == 4  # 2 BERT layers x (query, value)
    f = layers[0].lsr_shapes["default"]  # 48 = 8 x 6
    adapter = sum(m.lsr_shapes["default"].num_params for m in layers)
    assert adapter == 4 * 4 * (2 * 8 + 2 * 6 + 8 * 2 + 6 * 2) and f.num_params == 224
    head = sum(p.numel() for p in pm.base_model.model.classifier.parameters()) // 2  # original + trained copy
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == adapter + head


def test_save_then_load_in_fresh_model_gives_identical_outputs(tmp_path):
    pm = _peft_model()
    _set_nontrivial(pm)
    ids = tokens(3, 11)
    want = pm(input_ids=ids).logits
    assert not torch.allclose(want, tiny_bert()(input_ids=ids).logits, atol=1e-3)
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert isinstance(loaded.peft_config["default"], lc.LSRConfig)
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=0, rtol=0)


def test_saved_adapter_tells_a_process_without_lsr_compile_what_to_import(tmp_path):
    import subprocess
    import sys

    pm = _peft_model()
    pm.save_pretrained(tmp_path)
    pm.save_pretrained(tmp_path)  # saving again does not repeat the note
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Loading this LSR-Adapt adapter") == 1 and "import lsr_compile" in card
    assert "library_name: peft" in card  # peft's own model card is kept
    probe = ("import sys; from peft import PeftConfig\n"
             "try:\n    PeftConfig.from_pretrained(sys.argv[1])\nexcept KeyError as e:\n    print('KeyError', e)\n"
             "import lsr_compile\nprint(type(PeftConfig.from_pretrained(sys.argv[1])).__name__)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["KeyError", "'LSR'", "LSRConfig"], out.stderr[-2000:]


def test_merge_and_unload_equals_unmerged():
    pm = _peft_model()
    _set_nontrivial(pm)
    ids = tokens(2, 9)
    want = pm(input_ids=ids).logits
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, LSRLayer) for m in merged.modules())
    torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_named_adapters_switch_and_disable():
    pm = _peft_model()
    _set_nontrivial(pm)
    ids = tokens(2, 9)
    first = pm(input_ids=ids).logits
    pm.add_adapter("other", lc.LSRConfig(**(CFG | {"s": 2})))
    pm.set_adapter("other")
    other = pm(input_ids=ids).logits
    assert not torch.allclose(first, other, atol=1e-3)
    pm.set_adapter("default")
    torch.testing.assert_close(pm(input_ids=ids).logits, first, atol=0, rtol=0)
    with pm.disable_adapter():
        base = pm(input_ids=ids).logits
    ref = tiny_bert()
    ref.classifier.load_state_dict(pm.base_model.model.classifier.modules_to_save["default"].state_dict())
    torch.testing.assert_close(base, ref(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def test_regex_target_modules_and_non_linear_target():
    pm = get_peft_model(tiny_bert(), lc.LSRConfig(s=1, r=1, target_modules=r".*layer\.1\.attention\.self\.key"))
    assert len([m for m in pm.modules() if isinstance(m, LSRLayer)]) == 1
    with pytest.raises((TypeError, ValueError), match="Linear"):
        get_peft_model(tiny_bert(), lc.LSRConfig(s=1, r=1, target_modules=["LayerNorm"]))


def test_exported_lora_loads_in_plain_peft_and_matches(tmp_path):
    pm = _peft_model()
    _set_nontrivial(pm)
    ids = tokens(3, 10)
    want = pm(input_ids=ids).logits
    lc.export_lora(pm, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, peft.LoraConfig) and cfg.r == 4  # q = r1 * r2
    lora = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    torch.testing.assert_close(lora(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def _model_with_heads(kind):
    """(fresh base maker, LSR peft model with adapters "default" and "b", head module, input ids): each adapter's
    own copy of the head (BERT's SEQ_CLS classifier, or a Llama's lm_head in modules_to_save) moved off the
    base's head, as training it would."""
    from lsr_compile import workloads

    if kind == "seq-cls":
        make, cfg, head, ids = tiny_bert, lc.LSRConfig(**CFG), "classifier", tokens(3, 10)
    else:
        make = lambda: workloads.tiny_decoder("llama", hidden=64, layers=2, vocab=128)  # noqa: E731
        cfg, head, ids = lc.LSRConfig(s=2, r=(2, 2), modules_to_save=["lm_head"]), "lm_head", tokens(2, 7, 128)
    pm = get_peft_model(make(), cfg).eval()
    pm.add_adapter("b", copy.deepcopy(cfg))
    _set_nontrivial(pm)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return make, pm, head, ids


def _head_share(pm, ids, head):
    """How far the adapter's own head moves the logits: against the same model with the base's head."""
    plain = copy.deepcopy(pm)
    wrapper = plain.base_model.model.get_submodule(head)
    for copied in wrapper.modules_to_save.values():
        copied.load_state_dict(wrapper.original_module.state_dict())
    return (plain(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max().item()


@pytest.mark.parametrize("which", ["active", "other", "merged"])
@pytest.mark.parametrize("kind", ["seq-cls", "lm-head"])
def test_exported_lora_carries_the_adapters_own_head(tmp_path, kind, which):
    make, pm, head, ids = _model_with_heads(kind)
    name = "b" if which == "other" else "default"
    pm.set_adapter(name)
    with torch.no_grad():
        want, share = pm(input_ids=ids).logits, _head_share(pm, ids, head)
    pm.set_adapter("default")
    if which == "merged":
        pm.merge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(pm(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    before = list(pm.peft_config[name].modules_to_save)
    lc.export_lora(pm, tmp_path, adapter_name=name if which == "other" else None)
    assert pm.peft_config[name].modules_to_save == before  # the LSR config is not extended by the export
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, peft.LoraConfig) and head in cfg.modules_to_save
    lora = PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        got = lora(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert share > 1e-2  # a LoRA without the head would be off by 1000x the tolerance


def test_export_lora_refuses_what_the_lora_cannot_carry(tmp_path):
    _, pm, _, _ = _model_with_heads("lm-head")
    pm.peft_config["default"].modules_to_save = None  # the wrapper still saves the head; the LoRA would lack it
    with pytest.raises(RuntimeError, match="lm_head"):
        lc.export_lora(pm, tmp_path / "x")
    assert not (tmp_path / "x").exists()


class _ReferenceLSRLinear(torch.nn.Module):
    """The method's reference layer as published: lora_A1 (s, r, n1) ... and scale alpha / r."""

    def __init__(self, base, s, r, n, m, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.lora_A1 = torch.nn.Parameter(torch.randn(s, r, n[0]) * 0.3)
        self.lora_A2 = torch.nn.Parameter(torch.randn(s, r, n[1]) * 0.3)
        self.lora_B1 = torch.nn.Parameter(torch.randn(s, m[0], r) * 0.3)
        self.lora_B2 = torch.nn.Parameter(torch.randn(s, m[1], r) * 0.3)

    def forward(self, x):
        A = sum(torch.kron(self.lora_A1[i], self.lora_A2[i]) for i in range(self.lora_A1.shape[0]))
        B = sum(torch.kron(self.lora_B1[i], self.lora_B2[i]) for i in range(self.lora_B1.shape[0]))
        return self.base(x) + (x @ A.T @ B.T) * self.scale


def test_reference_code_adapter_imports_exactly():
    ref = tiny_bert()
    for layer in ref.bert.encoder.layer:
        att = layer.attention.self
        for name in ("query", "value"):
            setattr(att, name, _ReferenceLSRLinear(getattr(att, name), 4, 2, (8, 6), (8, 6), 16.0))
    ids = tokens(2, 9)
    want = ref(input_ids=ids).logits
    sd = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    # into a peft model ...
    pm = get_peft_model(tiny_bert(), lc.LSRConfig(s=4, r=2, n=(8, 6), m=(8, 6), alpha=16.0,
                                                 target_modules=["query", "value"])).eval()
    assert lc.load_reference_adapter(pm, sd) == 4
    torch.testing.assert_close(pm(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    # ... and into plain LSRLinear layers
    model = lc.apply_lsr(tiny_bert(), lc.LSRConfig(s=4, r=2, n=(8, 6), m=(8, 6), alpha=16.0),
                         target_modules=("query", "value"))
    lc.load_reference_adapter(model, sd)
    torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_reference_import_errors_name_the_layer():
    model = lc.apply_lsr(tiny_bert(), lc.LSRConfig(s=2, r=2), target_modules=("query",))
    sd = {f"bert.encoder.layer.{i}.attention.self.query.lora_{p}": torch.zeros(3, 2, 8)
          for i in range(2) for p in ("A1", "A2", "B1", "B2")}
    with pytest.raises(ValueError, match=r"query.A1: reference tensor has shape \(3, 2, 8\)"):
        lc.load_reference_adapter(model, sd)
    with pytest.raises(ValueError, match="no lora_A1"):
        lc.load_reference_adapter(model, {"x.weight": torch.zeros(1)})


def test_export_lora_refuses_a_folder_that_holds_files_and_replaces_it_whole_when_asked(tmp_path):
    pm = _peft_model()
    _set_nontrivial(pm)
    ids = tokens(2, 7)
    want = pm(input_ids=ids).logits
    saved = tmp_path / "adapter"
    pm.save_pretrained(saved)
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lc.export_lora(pm, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # the saved LSR adapter is intact
    lc.export_lora(pm, saved, overwrite=True)
    assert isinstance(peft.PeftConfig.from_pretrained(saved), peft.LoraConfig)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging folder left behind
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_bert(), saved).eval()(input_ids=ids).logits, want,
                               atol=1e-5, rtol=1e-5)


def test_export_lora_that_fails_leaves_nothing_half_written(tmp_path, monkeypatch):
    pm = _peft_model()
    out = tmp_path / "lora"

    def broken(self, path, **kw):
        (Path(path) / "adapter_config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        lc.export_lora(pm, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("order", ["save-load-export", "merge-unmerge-save-load", "export-save-load",
                                   "save-merge-load"])
def test_round_trips_keep_the_adapter_in_any_order(tmp_path, order):
    pm = _peft_model()
    _set_nontrivial(pm)
    ids = tokens(2, 8)
    want = pm(input_ids=ids).logits
    current = pm
    for i, step in enumerate(order.split("-")):
        folder = tmp_path / f"{i}-{step}"
        if step == "save":
            current.save_pretrained(folder)
            saved = folder
        elif step == "load":
            current = PeftModel.from_pretrained(tiny_bert(), saved).eval()
        elif step == "export":
            lc.export_lora(current, folder)
            lora = PeftModel.from_pretrained(tiny_bert(), folder).eval()
            torch.testing.assert_close(lora(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        else:
            getattr(current, step + "_adapter" if step == "merge" else "unmerge_adapter")()
        torch.testing.assert_close(current(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def _three_adapters():
    pm = _peft_model()
    for name in ("b", "c"):
        pm.add_adapter(name, lc.LSRConfig(**CFG))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lsr_" in n or "classifier" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def test_mixed_batch_adapter_names_match_each_row_alone():
    pm = _three_adapters()
    ids = tokens(6, 10)
    names = ["default", "b", "__base__", "c", "b", "default"]
    got = pm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, each_sample_alone(pm, ids, names), atol=1e-5, rtol=1e-5)
    pm.set_adapter("default")
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the adapters really differ


def test_mixed_batch_trains_each_adapter_from_its_own_rows():
    pm = _three_adapters().train()
    for p in pm.parameters():
        p.requires_grad_(False)
    factors = {n: p for n, p in pm.named_parameters() if "lsr_" in n}
    for p in factors.values():
        p.requires_grad_(True)
    ids = tokens(4, 8)
    pm(input_ids=ids, adapter_names=["b", "b", "__base__", "c"]).logits.square().sum().backward()
    for n, p in factors.items():
        used = n.endswith(".b") or n.endswith(".c")
        assert (p.grad is not None and p.grad.abs().sum() > 0) == used, n


def test_mixed_batch_in_training_refuses_adapters_with_dropout_by_name():
    pm = _three_adapters()
    pm.add_adapter("d", lc.LSRConfig(**(CFG | dict(lsr_dropout=0.1, module_dropout=0.3))))
    pm.train()
    ids = tokens(3, 6)
    with pytest.raises(ValueError, match=r"adapter 'd' sets lsr_dropout=0.1, module_dropout=0.3.*set_adapter"):
        pm(input_ids=ids, adapter_names=["default", "d", "__base__"])
    got = pm(input_ids=ids, adapter_names=["default", "b", "__base__"]).logits  # no dropout set: trains mixed
    got.square().sum().backward()
    pm.eval()
    with torch.no_grad():
        names = ["default", "d", "__base__"]
        torch.testing.assert_close(pm(input_ids=ids, adapter_names=names).logits, each_sample_alone(pm, ids, names),
                                   atol=1e-5, rtol=1e-5)


def test_mixed_batch_refuses_unknown_adapters():
    pm = _three_adapters()
    with pytest.raises(ValueError, match="non-existing adapter"):
        pm(input_ids=tokens(2, 5), adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match="2 samples"):
        pm(input_ids=tokens(2, 5), adapter_names=["default", "b", "c"])


def test_adapter_bank_from_saved_adapters_matches_peft_and_adds_and_evicts(tmp_path):
    from lsr_compile.bank import AdapterBank

    pm = _three_adapters()
    folders = {}
    for name in ("default", "b", "c"):
        pm.save_pretrained(tmp_path / "all", selected_adapters=[name])
        folders[name] = tmp_path / "all" / ("" if name == "default" else name)
    ids = tokens(5, 9)
    names = ["c", "__base__", "default", "b", "c"]
    with torch.no_grad():  # each sample alone through the peft model's encoder
        enc = []
        for i, n in enumerate(names):
            if n == "__base__":
                with pm.disable_adapter():
                    enc.append(pm.base_model.model.bert(input_ids=ids[i:i + 1]).last_hidden_state)
            else:
                pm.set_adapter(n)
                enc.append(pm.base_model.model.bert(input_ids=ids[i:i + 1]).last_hidden_state)
    want = torch.cat(enc)
    bank = AdapterBank.from_pretrained(tiny_bert().bert.eval(), {n: folders[n] for n in ("default", "b")},
                                       capacity=2, prefix="base_model.model.bert.")
    slot_b = bank.slots["b"]
    bank.load("c", folders["c"])  # full: grows to 4 slots, the others stay where they were
    assert bank.capacity == 4 and bank.slots["b"] == slot_b
    with torch.no_grad():
        got = bank(names, input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    bank.evict("default")
    with pytest.raises(ValueError, match="not in the bank"):
        bank(["default"], input_ids=ids[:1])
    with torch.no_grad():  # the others are untouched by the eviction
        torch.testing.assert_close(bank(names[:2] + ["b"] * 3, input_ids=ids).last_hidden_state[3:4], want[3:4],
                                   atol=1e-5, rtol=1e-5)
    layer = next(iter(bank.layers.values()))
    assert bank.bytes_per_adapter() == 4 * layer.factor_shapes.num_params * 4  # 4 layers x fp32 factors
    assert bank.lora_bytes_per_adapter() > bank.bytes_per_adapter()


@pytest.mark.parametrize("other", [dict(s=3, r=(1, 2)), dict(s=1, r=(2, 3)), dict(s=2, r=2)])
def test_add_weighted_adapter_is_exactly_the_weighted_sum_of_the_updates(other, tmp_path):
    """LoRA's add_weighted_adapter(cat) for LSR: the new adapter's update is Σ w_i ΔW_i on every layer (terms side
    by side, one inner rank stacked), through the model's outputs, save/load and export_lora (peft forwarded the
    call to the base model before: an AttributeError)."""
    from peft import PeftModel

    plain = dict(task_type=None)  # no classifier copy per adapter (those have no weighted sum)
    pm = _peft_model(**plain)
    pm.add_adapter("other", lc.LSRConfig(**(CFG | other | plain)))
    strong_adapters(pm)
    ids = tokens(2, 9)
    weights = [0.7, -1.3]
    def hidden(model):  # the encoder's output: the adapters' share there is O(1) (the tiny head's logits are 0.02)
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    with pm.disable_adapter():
        base = hidden(pm)
    pm.add_weighted_adapter(["default", "other"], weights, "mix")
    assert pm.active_adapter == "default" and "mix" in pm.peft_config  # added, not activated
    for key, layer in pm.base_model.model.named_modules():
        if hasattr(layer, "lsr_A1") and "mix" in layer.lsr_A1:
            got = layer.get_delta_weight("mix")
            exp = sum(w * layer.get_delta_weight(a) for a, w in zip(("default", "other"), weights))
            torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
            assert exp.abs().max() > 1e-2
    pm.set_adapter("mix")
    mixed = hidden(pm)
    assert (mixed - base).abs().max() > 100 * 1e-4  # far above the tolerance compared with below
    pm.save_pretrained(tmp_path / "saved", selected_adapters=["mix"])
    again = PeftModel.from_pretrained(tiny_bert(), tmp_path / "saved" / "mix")
    lc.export_lora(pm, tmp_path / "lora", adapter_name="mix")
    as_lora = PeftModel.from_pretrained(tiny_bert(), tmp_path / "lora")
    torch.testing.assert_close(hidden(again), mixed, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hidden(as_lora), mixed, rtol=1e-4, atol=1e-4)


def test_add_weighted_adapter_refuses_what_no_lsr_adapter_holds():
    pm = _peft_model()
    pm.add_adapter("other", lc.LSRConfig(**(CFG | dict(r=(1, 3)))))
    pm.add_adapter("third", lc.LSRConfig(**(CFG | dict(r=(2, 2)))))
    with pytest.raises(ValueError, match="modules_to_save.*classifier"):  # both trained a classifier copy
        pm.add_weighted_adapter(["default", "third"], [0.5, 0.5], "mix")
    plain = dict(task_type=None)
    pm = _peft_model(**plain)
    pm.add_adapter("other", lc.LSRConfig(**(CFG | dict(r=(1, 3)) | plain)))
    pm.add_adapter("third", lc.LSRConfig(**(CFG | dict(r=(2, 2)) | plain)))
    with pytest.raises(ValueError, match=r"differ in both inner ranks.*export each \(lc.export_lora\)"):
        pm.add_weighted_adapter(["other", "third"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="combine the LoRAs"):
        pm.add_weighted_adapter(["default", "third"], [0.5, 0.5], "mix", combination_type="svd")
    with pytest.raises(ValueError, match="unknown adapter"):
        pm.add_weighted_adapter(["default", "nope"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="one finite number per adapter"):
        pm.add_weighted_adapter(["default", "third"], [0.5], "mix")
    with pytest.raises(ValueError, match="exists"):
        pm.add_weighted_adapter(["default", "third"], [0.5, 0.5], "other")
    assert "mix" not in pm.peft_config


def test_explain_after_set_adapter_to_an_adapter_on_fewer_layers():
    """An active adapter on one of the four layers: explain raised a bare StopIteration on the other three."""
    pm = _peft_model()
    pm.add_adapter("one", lc.LSRConfig(**(CFG | {"target_modules": r".*layer\.0\.attention\.self\.query"})))
    pm.set_adapter("one")
    text = lc.explain(pm, tokens=1)
    assert "layer.0.attention.self.query:\n48x48 s=4" in text
    assert ("layer.0.attention.self.value, base_model.model.bert.encoder.layer.1.attention.self.query, "
            "base_model.model.bert.encoder.layer.1.attention.self.value: the base layer alone, no LSR kernel (the "
            "active adapter one is not on these layers)") in text
    alone = pm.base_model.model.bert.encoder.layer[1].attention.self.query
    assert lc.explain(alone, tokens=1).endswith("the base layer alone, no LSR kernel (the active adapter one is not "
                                                "on these layers)")


class _Negated(torch.nn.Module):
    def forward(self, w):
        return -w


@pytest.mark.parametrize("modify", [
    lambda base: torch.nn.utils.prune.l1_unstructured(base, "weight", 0.3),
    lambda base: torch.nn.utils.parametrize.register_parametrization(base, "weight", _Negated()),
    lambda base: torch.nn.utils.parametrize.register_parametrization(base, "bias", _Negated()),
    lambda base: torch.nn.utils.weight_norm(base),
    lambda base: torch.nn.utils.parametrizations.weight_norm(base),
], ids=["prune", "parametrize", "parametrized bias", "weight_norm", "parametrizations.weight_norm"])
def test_a_peft_layer_over_a_pruned_parametrized_or_weight_normed_base_runs_its_effective_weight(modify):
    """The layer reads the base's weight and bias from its parameters: a parametrized bias was dropped without a
    word, and old-style weight_norm's weight (computed in the base's forward, which the layer does not call) stayed
    the one of the first call, and a second backward failed. Merging into such a weight is refused."""
    import warnings

    import torch.nn.utils.prune  # noqa: F401 (not imported with torch.nn.utils)

    pm = strong_adapters(_peft_model())
    layer = pm.base_model.model.bert.encoder.layer[0].attention.self.query
    base = layer.get_base_layer()
    with torch.no_grad():
        base.bias.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        modify(base)
    x = torch.randn(3, 48)
    for step in range(2):
        y = layer(x)
        want = lc.reference.lsr_linear(x, base.weight.detach(), base.bias.detach(), *layer.factors("default"),
                                       layer.lsr_scale["default"])
        torch.testing.assert_close(y, want)
        y.square().sum().backward()
        with torch.no_grad():  # a step on what trains: the next call must see it
            for p in base.parameters():
                if p.requires_grad:
                    p.mul_(1.5)
    if "weight" not in base._parameters:
        with pytest.raises(ValueError, match=r"merging an LSR adapter: the base weight .* is computed .*prune.remove"):
            pm.merge_and_unload()
