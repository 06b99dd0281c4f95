"""Decoder LLMs the way their users work, on tiny random-weight models of each family built from transformers'
config classes: Llama, Qwen2, Mistral, Phi3 (fused qkv_proj), GPT-2 (Conv1D projections)."""
import contextlib
import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lsr_compile as lc
from lsr_compile import workloads
from lsr_compile.bank import AdapterBank
from lsr_compile.bench_decode import nonzero

FAMILIES = workloads.DECODERS
TARGETS = {"phi3": ["qkv_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}  # fused qkv; every Conv1D


def _model(family, seed=0):
    return workloads.tiny_decoder(family, hidden=64, layers=2, vocab=128, seed=seed)


def _ids(batch=2, length=7, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _lsr(family, **cfg):
    pm = get_peft_model(_model(family), lc.LSRConfig(s=2, r=(2, 2), target_modules=TARGETS.get(family), **cfg))
    return nonzero(pm, seed=3)


def _grow(pm, gain=30.0):
    """Adapters large enough that every output moves far above the comparisons' tolerances."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lsr_B2" in name:
                p.mul_(gain)
    return pm


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_moves_every_factor_and_the_loss(family):
    pm = _grow(_lsr(family)).train()
    ids = _ids()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(3):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(n.split(".")[-2].startswith("lsr_") for n in before)
    assert all(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if p.requires_grad)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_equals_without_and_differs_from_the_base(family):
    pm = _grow(_lsr(family)).eval()
    ids = _ids()
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = pm.generate(input_ids=ids, use_cache=True, **kw)
        uncached = pm.generate(input_ids=ids, use_cache=False, **kw)
        with pm.disable_adapter():
            base_logits = pm(input_ids=ids).logits
        logits = pm(input_ids=ids).logits
    assert torch.equal(cached, uncached)
    assert (logits - base_logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_merge_and_export_lora_read_back_by_plain_peft(family, tmp_path):
    pm = _grow(_lsr(family)).eval()
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "lsr")
    loaded = PeftModel.from_pretrained(_model(family), tmp_path / "lsr")
    lc.export_lora(pm, tmp_path / "lora")
    lora = PeftModel.from_pretrained(_model(family), tmp_path / "lora")
    assert type(lora.peft_config["default"]) is LoraConfig
    with torch.no_grad():
        got_loaded = loaded(input_ids=ids).logits
        got_lora = lora(input_ids=ids).logits
        merged = copy.deepcopy(pm).merge_and_unload()
        got_merged = merged(input_ids=ids).logits
        pm.merge_adapter()
        got_merged_in_place = pm(input_ids=ids).logits
        pm.unmerge_adapter()
        got_unmerged = pm(input_ids=ids).logits
    torch.testing.assert_close(got_loaded, want)
    for got in (got_lora, got_merged, got_merged_in_place, got_unmerged):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_gpt2_conv1d_is_adapted_by_every_route():
    """``target_modules`` naming Conv1D layers, peft's ``"all-linear"`` and ``apply_lsr`` all adapt GPT-2; the
    layer keeps the Conv1D's weight in its layout (d_in x d_out) and merges exactly."""
    model = _model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    assert tuple(conv.weight.shape) == (64, 192)
    for targets in (["c_attn", "c_proj", "c_fc"], "all-linear"):
        pm = get_peft_model(_model("gpt2"), lc.LSRConfig(s=2, r=2, target_modules=targets))
        adapted = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lsr_A1")}
        assert {f"transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")} == adapted
    wrapped = lc.apply_lsr(copy.deepcopy(model), lc.LSRConfig(s=2, r=2, target_modules="all-linear"))
    layer = wrapped.transformer.h[0].attn.c_attn
    assert isinstance(layer, lc.LSRLinear) and layer.fan_in_fan_out and layer.weight is not None
    assert (layer.in_features, layer.out_features) == (64, 192)
    assert not isinstance(wrapped.lm_head, lc.LSRLinear)  # "all-linear" leaves the output layer alone
    nonzero(wrapped, seed=5)
    x = torch.randn(3, 64)
    want = lc.reference.lsr_linear(x.double(), conv.weight.double().T, conv.bias.double(), *(
        t.double() for t in (layer.A1, layer.A2, layer.B1, layer.B2)), layer.scale)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
        w0 = layer.weight.clone()
        layer.merge()
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        assert torch.equal(layer.weight, w0)
        merged = layer.to_linear()
    assert type(merged) is type(conv)
    torch.testing.assert_close(merged(x).double(), want, rtol=1e-5, atol=1e-5)
    x_ = x.clone().requires_grad_()
    layer(x_).sum().backward()
    assert all(getattr(layer, n).grad is not None for n in ("A1", "A2", "B1", "B2"))
    assert {s.factors.d_in for s in lc.tuning.shapes_of(wrapped, (16,))} == {64, 256}


def test_gpt2_bank_serves_a_saved_conv1d_adapter_as_peft_does(tmp_path):
    pm = _grow(_lsr("gpt2")).eval()
    pm.save_pretrained(tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        bank = AdapterBank.from_pretrained(_model("gpt2"), {"a": tmp_path / "a"})
        got = bank(["a", "__base__"], input_ids=ids).logits
        base = _model("gpt2")(input_ids=ids).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], base[1], rtol=1e-4, atol=1e-4)


def test_layers_to_transform_and_patterns_select_and_shape_layers():
    cfg = lc.LSRConfig(s=2, r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                       rank_pattern={"v_proj": (2, 4), "q_proj": {"s": 3}}, alpha_pattern={"v_proj": 6.0})
    pm = get_peft_model(_model("llama"), cfg)
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if hasattr(m, "lsr_A1")}
    assert sorted(layers) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    v, q = layers["model.layers.1.self_attn.v_proj"], layers["model.layers.1.self_attn.q_proj"]
    assert (v.lsr_shapes["default"].r1, v.lsr_shapes["default"].r2, v.lsr_shapes["default"].s) == (2, 4, 2)
    assert (q.lsr_shapes["default"].q, q.lsr_shapes["default"].s) == (4, 3)
    assert v.lsr_scale["default"] == pytest.approx(6.0 / 8 ** 0.5) and q.lsr_scale["default"] == 1.0
    # the same selection through apply_lsr, and layers_pattern naming the layer list
    wrapped = lc.apply_lsr(_model("llama"), lc.LSRConfig(s=2, r=2, target_modules=["q_proj", "v_proj"],
                                                         layers_to_transform=0, layers_pattern="layers",
                                                         rank_pattern={"v_proj": 3}))
    got = {n: m.factor_shapes.q for n, m in lc.lsr_layers(wrapped).items()}
    assert got == {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 9}


@pytest.mark.parametrize("bad, match", [
    (dict(layers_to_transform=[0], target_modules="q_proj"), "regex"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also"),
    (dict(lsr_dropout=1.0), "probability"),
    (dict(rank_dropout=-0.1), "probability"),
    (dict(rank_pattern={"q_proj": {"t": 2}}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 0}), "alpha_pattern"),
    (dict(layers_to_transform=["0"]), "layers_to_transform"),
])
def test_bad_options_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        lc.LSRConfig(**bad)


def _dropout_layer(**drop):
    torch.manual_seed(0)
    layer = lc.LSRLinear(32, 24, config=lc.LSRConfig(s=2, r=2, **drop))
    return nonzero(layer, seed=2)


def test_module_dropout_leaves_the_adapter_out_of_some_training_calls_only():
    layer = _dropout_layer(module_dropout=0.5).train()
    x = torch.randn(5, 32)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    outs = [layer(x).detach() for _ in range(40)]
    skipped = sum(torch.equal(y, base) for y in outs)
    assert 5 <= skipped <= 35
    layer.eval()
    with torch.no_grad():
        assert not torch.equal(layer(x), base)


def test_lsr_dropout_drops_the_adapters_input_only_in_training():
    layer = _dropout_layer(lsr_dropout=0.5)
    x = torch.randn(6, 32)
    with torch.no_grad():
        exact = layer.eval()(x)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.manual_seed(1)
    xd = torch.nn.functional.dropout(x, 0.5)
    want = base + layer.scale * (xd @ lc.formulations.build_A(layer.A1, layer.A2).T) @ \
        lc.formulations.build_B(layer.B1, layer.B2).T
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, exact)
    y.sum().backward()
    assert all(getattr(layer, n).grad is not None for n in ("A1", "A2", "B1", "B2"))


@pytest.mark.parametrize("scale_kept", [False, True])
def test_rank_dropout_masks_inner_rank_components(scale_kept):
    layer = _dropout_layer(rank_dropout=0.5, rank_dropout_scale=scale_kept).train()
    x = torch.randn(4, 32)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    keep = (torch.rand(layer.factor_shapes.q) >= 0.5).float()
    if scale_kept:
        keep = keep / 0.5
    t = x @ lc.formulations.build_A(layer.A1, layer.A2).T
    want = torch.nn.functional.linear(x, layer.weight, layer.bias) + layer.scale * (t * keep) @ \
        lc.formulations.build_B(layer.B1, layer.B2).T
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_peft_dropouts_reach_the_peft_layer():
    pm = get_peft_model(_model("llama"), lc.LSRConfig(s=2, r=2, module_dropout=0.999, rank_dropout=0.2,
                                                      lsr_dropout=0.1))
    nonzero(pm, seed=1)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lsr_dropouts["default"].module == 0.999
    x = torch.randn(2, 64)
    base = layer.get_base_layer()(x)
    torch.testing.assert_close(layer.train()(x), base)  # almost always left out in training
    with torch.no_grad():
        assert not torch.allclose(layer.eval()(x), base)


DROPS = dict(module_dropout=0.5, lsr_dropout=0.3, rank_dropout=0.3)


def _two_adapter_peft_layer():
    """A peft LSR layer with two active adapters, both with every dropout: the first runs regularized_forward,
    the second the layer's loop over further adapters."""
    cfg = lc.LSRConfig(s=2, r=2, target_modules=["q_proj"], **DROPS)
    pm = get_peft_model(_model("llama"), cfg)
    pm.add_adapter("b", copy.deepcopy(cfg))
    nonzero(pm, seed=2)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_adapter(["default", "b"])
    return layer


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("where", ["LSRLinear", "peft-two-adapters"])
def test_dropouts_decide_the_same_when_checkpointing_recomputes(where, reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = (_dropout_layer(**DROPS) if where == "LSRLinear" else _two_adapter_peft_layer()).train()
    params = [p for p in layer.parameters() if p.requires_grad]
    d_in = layer.in_features
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, d_in, generator=g).requires_grad_(True)

    def grads(run, seed):
        torch.manual_seed(seed)
        for t in [x, *params]:
            t.grad = None
        y = run(x)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        return [None if t.grad is None else t.grad.clone() for t in [x, *params]]

    left_out = 0
    for seed in range(12):
        want = grads(layer, seed)
        got = grads(lambda t: checkpoint(layer, t, use_reentrant=reentrant), seed)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        left_out += want[1] is None or not want[1].any()  # the first adapter's A1: no gradient when left out
    assert 0 < left_out < 12  # module dropout took both decisions across the seeds


def test_trainer_with_gradient_checkpointing_runs_with_module_dropout(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = get_peft_model(_model("llama"), lc.LSRConfig(s=2, r=(2, 2), module_dropout=0.5))
    ids = _ids(batch=8, length=10)
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             gradient_checkpointing=True)
    result = Trainer(model=pm, args=args, train_dataset=data).train()  # a CheckpointError within a few steps before
    assert result.global_step == 6 and torch.isfinite(torch.tensor(result.training_loss))


def test_inner_rank_is_shown_where_a_lora_user_looks(capsys):
    from lsr_compile import config

    config._rank_warned.clear()
    with pytest.warns(lc.LSRConfigWarning, match="inner rank q = 64"):
        cfg = lc.LSRConfig(r=8, s=2)
    assert "inner_rank=64" in repr(cfg) and cfg.inner_rank == 64
    pm = get_peft_model(_model("llama"), lc.LSRConfig(s=2, r=(4, 2)))
    pm.print_trainable_parameters()
    out = capsys.readouterr().out
    assert "trainable params" in out and "inner rank q = r1*r2 = 8" in out and "LoRA" in out
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert "inner rank q=8" in lc.explain(layer, tokens=1)
    text = lc.explain(pm, tokens=1)
    assert "q_proj" in text and "inner rank q=8" in text


def test_lsr_config_for_lora_matches_rank_and_budget():
    model = _model("llama")
    cfg = lc.lsr_config_for_lora(8, budget=0.3, model=model)
    assert cfg.inner_rank == 8
    pm = get_peft_model(copy.deepcopy(model), cfg)
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=8))
    n_lsr = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0.15 < n_lsr / n_lora <= 0.3
    bigger = dict(cfg.__dict__, s=cfg.s + 1)
    assert sum(f.num_params for f in [lc.LSRConfig(s=bigger["s"], r=cfg.r).shapes_for(64, 64)]) * 4 > 0.3 * n_lora
    assert lc.lsr_config_for_lora(6).r == (3, 2)
    with pytest.raises(ValueError, match="fits"):
        lc.lsr_config_for_lora(8, budget=0.001, shape=(64, 64))


def test_lsr_config_for_lora_counts_layers_whose_s_rank_pattern_sets_against_the_budget():
    """A rank_pattern that sets s kept it, but s elsewhere was chosen as if it did not: budget=0.5 gave up to 1.8x
    LoRA's parameters."""
    model = _model("llama")

    def ratio(cfg):
        lsr, lora = (get_peft_model(copy.deepcopy(model), c) for c in (cfg, LoraConfig(r=8)))
        return (sum(p.numel() for p in lsr.parameters() if p.requires_grad)
                / sum(p.numel() for p in lora.parameters() if p.requires_grad))

    cfg = lc.lsr_config_for_lora(8, budget=0.5, model=model, rank_pattern={"q_proj": {"s": 3}})
    assert cfg.for_layer("model.layers.0.self_attn.q_proj").s == 3
    assert ratio(cfg) <= 0.5 < ratio(dataclasses.replace(cfg, s=cfg.s + 1))
    with pytest.raises(ValueError, match=r"layers whose s rank_pattern sets already take 0.750x LoRA's parameters, "
                                         r"above budget=0.5: lower their s"):
        lc.lsr_config_for_lora(8, budget=0.5, model=model, rank_pattern={"q_proj": {"s": 16}})
    with pytest.raises(ValueError, match=r"rank 128 is above what model.layers.0.self_attn.q_proj \(64 -> 64\)"):
        lc.lsr_config_for_lora(128, model=model)
    with pytest.raises(ValueError, match=r"layers_to_transform=\[7\].*kept none of them: their layer indices are "
                                         r"\[0, 1\]"):
        lc.lsr_config_for_lora(8, budget=0.3, model=model, layers_to_transform=[7])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tune_and_explain_key_a_half_precision_model_by_the_dtype_it_runs(family):
    """peft keeps the adapters in float32 over a bf16 base; the layers run bf16 rows, so the problems
    ``tune(model)`` tunes and ``explain`` shows are bf16 ones (float32 ones would never be looked up)."""
    from lsr_compile.tuning.search import shapes_of

    base = workloads.tiny_decoder(family, hidden=64, layers=2, vocab=128, dtype=torch.bfloat16)
    pm = get_peft_model(base, lc.LSRConfig(s=2, r=(2, 2), target_modules=TARGETS.get(family)))
    layers = [m for m in pm.modules() if hasattr(m, "lsr_A1")]
    assert layers and all(p.dtype == torch.float32 for m in layers for p in m.lsr_A1.values())
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype)) for m in layers]
    with torch.no_grad():
        pm(input_ids=_ids())
    for h in hooks:
        h.remove()
    assert seen == {torch.bfloat16}
    shapes = shapes_of(pm, [1, 64])
    assert shapes and {s.dtype for s in shapes} == seen
    assert {m.lsr_shape(1).dtype for m in layers} == seen
    assert "bfloat16" in lc.explain(pm, tokens=1) and "float32" not in lc.explain(pm, tokens=1)


def _tied_head(kind, tie):
    """SmolLM2's shape scaled down (tied embeddings, GQA k/v), all-linear plus the tied lm_head in
    modules_to_save, as LSR or as peft LoRA."""
    common = dict(target_modules="all-linear", modules_to_save=["lm_head"], ensure_weight_tying=tie)
    cfg = lc.lsr_config_for_lora(8, **common) if kind == "lsr" else LoraConfig(r=8, **common)
    with pytest.warns(UserWarning, match="ensure_weight_tying") if not tie else contextlib.nullcontext():
        pm = get_peft_model(workloads.tiny_smollm2(), cfg)
    return nonzero(pm, seed=3)


def _head_and_embedding(pm):
    inner = pm.base_model.model
    return inner.get_output_embeddings(), inner.get_input_embeddings()


@pytest.mark.parametrize("tie", [False, True])
def test_a_tied_lm_head_in_modules_to_save_trains_as_under_peft_lora(tie):
    """With ``ensure_weight_tying`` the head's trained copy is the input embeddings' (one tensor, both move),
    as LoRA's; without it the head's copy alone trains and the embeddings stay frozen, as LoRA's."""
    for kind in ("lsr", "lora"):
        pm = _tied_head(kind, tie).train()
        head, emb = _head_and_embedding(pm)
        shared = head.modules_to_save["default"].weight is getattr(emb, "modules_to_save", {"default": emb})[
            "default"].weight
        assert shared is tie, kind
        emb_before = pm.get_input_embeddings()(torch.arange(8)).detach().clone()
        extra = sorted(n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n and "lsr_" not in n)
        assert extra == [f"base_model.model.{'model.embed_tokens' if tie else 'lm_head'}.modules_to_save.default."
                         f"weight"], kind
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
        ids = _ids()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        moved = not torch.equal(pm.get_input_embeddings()(torch.arange(8)), emb_before)
        assert moved is tie, kind


def test_a_tied_lm_head_stays_tied_through_save_load_export_and_merge(tmp_path):
    pm = _tied_head("lsr", True).eval()
    ids = _ids()
    with torch.no_grad():
        pm.get_input_embeddings().modules_to_save["default"].weight.add_(0.05)  # a trained copy, not the base's
        want = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "lsr")
    lc.export_lora(pm, tmp_path / "lora")
    for folder in ("lsr", "lora"):
        back = PeftModel.from_pretrained(workloads.tiny_smollm2(), tmp_path / folder)
        head, emb = _head_and_embedding(back)
        assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight, folder
        with torch.no_grad():
            torch.testing.assert_close(back(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    merged = pm.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_gqa_key_value_projections_get_their_own_factor_shapes_and_train():
    """k/v a third as wide as the hidden size (SmolLM2: 576 -> 192): the automatic split of each side."""
    pm = get_peft_model(workloads.tiny_smollm2(), lc.LSRConfig(target_modules=["q_proj", "k_proj", "v_proj"]))
    shapes = {n.split(".")[-1]: m.lsr_shapes["default"] for n, m in pm.named_modules() if hasattr(m, "lsr_shapes")}
    assert (shapes["k_proj"].n1, shapes["k_proj"].n2, shapes["k_proj"].m1, shapes["k_proj"].m2) == (12, 8, 8, 4)
    assert shapes["v_proj"] == shapes["k_proj"] and shapes["q_proj"].d_out == 96
    pm.train()
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        ids = _ids()
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("beams", [1, 2])
def test_bank_generate_decodes_each_row_with_its_adapter(beams, tmp_path):
    """``bank.generate(names, ...)``: each row of a left-padded batch decodes (prefill and KV-cached steps) as it
    does alone through peft with its adapter active, beams included; the bank's model called directly refuses
    (it ran the base model alone without a word)."""
    folders = {}
    for k, name in enumerate(("a", "b")):
        pm = _grow(nonzero(get_peft_model(_model("llama"), lc.LSRConfig(s=2, r=(2, 2))), seed=10 + k)).eval()
        pm.save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    bank = AdapterBank.from_pretrained(_model("llama"), folders)
    rows = [_ids(1, n, seed=n)[0] for n in (7, 4, 6)]
    names = ["a", "__base__", "b"]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as generate expects for decoders
        ids[i, 7 - len(r):], mask[i, 7 - len(r):] = r, 1
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=beams)
    with torch.no_grad():
        got = bank.generate(names, input_ids=ids, attention_mask=mask, **kw)
        for i, (name, r) in enumerate(zip(names, rows)):
            alone = (PeftModel.from_pretrained(_model("llama"), folders[name]) if name != "__base__"
                     else _model("llama")).eval()
            want = alone.generate(input_ids=r[None], attention_mask=torch.ones_like(r[None]), **kw)
            assert torch.equal(got[i, 7:], want[0, len(r):]), (name, got[i], want[0])
        base_row = _model("llama").generate(input_ids=rows[0][None], **kw)
        assert not torch.equal(got[0, 7:], base_row[0, 7:])  # adapter a changes the continuation
        with pytest.raises(RuntimeError, match=r"served by an AdapterBank: call bank\(names"):
            bank.model.generate(input_ids=ids, attention_mask=mask, **kw)


def _moe(kind):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128)
    cfg = (tf.MixtralConfig(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, **common)
           if kind == "mixtral" else
           tf.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                             **common))
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_all_linear_on_a_mixture_of_experts_says_what_it_leaves(kind):
    """Fused expert tensors (E x d_out x d_in) and routers are no linear layer: peft LoRA's "all-linear" adapts
    them through target_parameters; LSR adapts the attention and says, with their share, what it leaves."""
    with pytest.warns(lc.LSRConfigWarning, match=r"mlp\.experts\.gate_up_proj 4 x \d+ x 64.*mlp\.experts\.down_proj"
                                                 r".*\d+% of the weights.*target_parameters"):
        pm = get_peft_model(_moe(kind), lc.LSRConfig(target_modules="all-linear"))
    adapted = {n.split(".lsr_")[0].rsplit(".", 1)[-1] for n, _ in pm.named_parameters() if ".lsr_" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ids = _ids()
    pm(input_ids=ids, labels=ids).loss.backward()  # trains what it adapts
    assert all(p.grad is not None for n, p in pm.named_parameters() if "lsr_B2" in n)
    with warnings_as_errors():  # the dense families are all linear layers: nothing to say
        get_peft_model(_model("llama"), lc.LSRConfig(target_modules="all-linear"))


@pytest.mark.parametrize("option, says", [("target_parameters", r"not parameter tensors.*all-linear.*LoRA"),
                                           ("trainable_token_indices", r"modules_to_save")])
def test_loras_parameter_and_token_targets_are_refused_by_name(option, says):
    """LoRA's options for what is no layer (expert tensors, token rows) name themselves and what to do instead."""
    with pytest.raises(TypeError, match=rf"LSRConfig does not take {option}: .*{says}"):
        lc.LSRConfig(**{option: ["mlp.experts.down_proj"]}, target_modules="all-linear")
    with pytest.raises(TypeError, match=option):
        lc.lsr_config_for_lora(8, **{option: [0, 1]})


@contextlib.contextmanager
def warnings_as_errors():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", lc.LSRConfigWarning)
        yield


def test_mamba_layers_whose_weights_the_mixer_reads_are_refused_by_name():
    """Mamba's mixer reads dt_proj's weight itself (out_proj's in its fused kernel): an adapter there never changes
    the output or trains. Refused by name, as peft refuses out_proj and conv1d for LoRA; the others work."""
    import transformers as tf

    def mamba():
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(tf.MambaConfig(vocab_size=128, hidden_size=64, state_size=8,
                                                                   num_hidden_layers=2))
    for targets in ("all-linear", ["dt_proj"], ["out_proj"]):
        with pytest.raises(ValueError, match=r"cannot carry an adapter: the mixer reads the weights of dt_proj, "
                                             r"out_proj, conv1d itself.*target_modules=\['in_proj', 'x_proj'\]"):
            get_peft_model(mamba(), lc.LSRConfig(target_modules=targets))
    pm = _grow(nonzero(get_peft_model(mamba(), lc.LSRConfig(s=2, r=(2, 2), target_modules=["in_proj", "x_proj"]))))
    ids = _ids()
    with torch.no_grad():
        moved = (pm(input_ids=ids).logits - mamba()(input_ids=ids).logits).abs().max()
    assert moved > 1e-2
