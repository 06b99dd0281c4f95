"""Many tenants, one batch: a row's output and gradients depend on its own bank slot only (a NaN or inf stored
in another slot, or in its scale, changes nothing else), in every kernel and direction, over a dense and a
quantized base; and every argument of the many-adapter entry points is used as documented or refused by name."""
import math

import pytest
import torch

import lsr_compile as lc
from lsr_compile import kernels, mixed_formulations as mf
from lsr_compile.config import FactorShapes
from lsr_compile.ops import LSRInputError
from lsr_compile.problem import ProblemKey

DIMS = (2, 2, 3, 4, 5, 3, 6)  # s, r1, r2, n1, n2, m1, m2: d_in 20, d_out 18
K = 3
LENGTHS = [4, 3, 5, 2, 3]
ADAPTERS = [-1, 1, 0, -1, 2]  # slot 0 is poisoned below; rows of slots 1, 2 and base-only rows must not see it
CPU = torch.device("cpu")


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    s, r1, r2, n1, n2, m1, m2 = DIMS
    N = sum(LENGTHS)
    x, W, b = r(N, n1 * n2), r(m1 * m2, n1 * n2) / (n1 * n2) ** 0.5, r(m1 * m2)
    factors = [r(K, *sz) * 0.6 for sz in [(s, r1, n1), (s, r2, n2), (s, m1, r1), (s, m2, r2)]]
    scales = torch.tensor([0.7, 1.3, 0.9], dtype=torch.float32)
    ptr, ad = mf.segments_of(LENGTHS, ADAPTERS)
    return x, W, b, factors, scales, ptr, ad


def _poisoned(factors, scales, how):
    """Slot 0 broken one way: NaN or inf in a factor, or an infinite scale."""
    factors = [f.clone() for f in factors]
    scales = scales.clone()
    if how == "nan factor":
        factors[0][0].fill_(math.nan)
    elif how == "inf factor":
        factors[3][0].fill_(math.inf)
    else:
        scales[0] = math.inf
    return factors, scales


def _other_rows():
    """Rows whose segment does not use slot 0."""
    idx = mf.row_index(*mf.segments_of(LENGTHS, ADAPTERS), sum(LENGTHS))
    return idx != 0


def _forward_kernels():
    key = ProblemKey.of("mixed_forward", torch.float64, sum(LENGTHS), FactorShapes(*DIMS), K, len(ADAPTERS))
    out = []
    for backend, variant, cfg in kernels.candidates("llvm", "mixed_forward", key):
        if not kernels.unavailable(backend, CPU):
            out.append((f"{backend}:{variant}", kernels.build(backend, "mixed_forward", variant, cfg, key, CPU)))
    if not kernels.unavailable("triton", CPU):  # the interpreter (conftest sets it without a GPU)
        key32 = ProblemKey.of("mixed_forward", torch.float32, sum(LENGTHS), FactorShapes(*DIMS), K, len(ADAPTERS))
        variant, cfg = kernels.default_choice("triton", "mixed_forward", key32, CPU)
        out.append(("triton:" + variant, kernels.build("triton", "mixed_forward", variant, cfg, key32, CPU)))
    return out


FORWARD_KERNELS = _forward_kernels()
POISONS = ["nan factor", "inf factor", "inf scale"]


@pytest.mark.parametrize("how", POISONS)
@pytest.mark.parametrize("name,fn", FORWARD_KERNELS, ids=[n for n, _ in FORWARD_KERNELS])
def test_forward_rows_do_not_see_another_slot(name, fn, how):
    assert {"torch:loop", "torch:gathered", "torch:factored"} <= {n for n, _ in FORWARD_KERNELS}
    x, W, b, factors, scales, ptr, ad = _inputs()
    if name.startswith("triton"):
        x, W, b, factors = x.float(), W.float(), b.float(), [f.float() for f in factors]
    clean = fn(x, W, b, *factors, scales, ptr, ad)
    bad_factors, bad_scales = _poisoned(factors, scales, how)
    bad = fn(x, W, b, *bad_factors, bad_scales, ptr, ad)
    rows = _other_rows()
    assert torch.isfinite(bad[rows]).all(), f"{name}: {how} in slot 0 reached other rows"
    torch.testing.assert_close(bad[rows], clean[rows], atol=0, rtol=0)
    assert not torch.isfinite(bad[~rows]).all()  # slot 0's own rows do get what it holds


@pytest.mark.parametrize("how", POISONS)
@pytest.mark.parametrize("variant", sorted(mf.BACKWARDS))
def test_backward_rows_and_slots_do_not_see_another_slot(variant, how):
    """dx of every other row, and the gradients of every other slot, exactly as with a clean slot 0 (the rows
    without an adapter add nothing to slot 0's gradients either)."""
    x, W, b, factors, scales, ptr, ad = _inputs()
    dy = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64)
    clean = mf.BACKWARDS[variant](dy, x, W, *factors, scales, ptr, ad, True)
    bad_factors, bad_scales = _poisoned(factors, scales, how)
    bad = mf.BACKWARDS[variant](dy, x, W, *bad_factors, bad_scales, ptr, ad, True)
    rows = _other_rows()
    torch.testing.assert_close(bad[0][rows], clean[0][rows], atol=0, rtol=0)
    for g_bad, g_clean in zip(bad[1:], clean[1:]):
        torch.testing.assert_close(g_bad[1:], g_clean[1:], atol=0, rtol=0)


@pytest.mark.parametrize("variant", sorted(mf.BACKWARDS))
def test_a_base_only_row_never_reaches_a_slots_gradient(variant):
    """A NaN in the input of rows without an adapter leaves every slot's gradient as it was."""
    x, W, b, factors, scales, ptr, ad = _inputs()
    dy = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64)
    clean = mf.BACKWARDS[variant](dy, x, W, *factors, scales, ptr, ad, False)
    base_rows = mf.row_index(ptr, ad, x.shape[0]) < 0
    x_bad, dy_bad = x.clone(), dy.clone()
    x_bad[base_rows], dy_bad[base_rows] = math.nan, math.inf
    bad = mf.BACKWARDS[variant](dy_bad, x_bad, W, *factors, scales, ptr, ad, False)
    for g_bad, g_clean in zip(bad[1:], clean[1:]):
        torch.testing.assert_close(g_bad, g_clean, atol=0, rtol=0)


def test_through_the_op_with_autograd_on_every_backend(fresh_dispatch):
    x, W, b, factors, scales, ptr, ad = _inputs(torch.float32)
    bad_factors, bad_scales = _poisoned(factors, scales, "nan factor")
    rows = _other_rows()
    for backend in ("torch", "tvm", "triton"):
        if kernels.unavailable(backend, CPU):
            continue
        outs = []
        for fs, sc in ((factors, scales), (bad_factors, bad_scales)):
            xg = x.clone().requires_grad_(True)
            fs = [f.clone().requires_grad_(True) for f in fs]
            with lc.use_backend(backend):
                y = lc.mixed_linear(xg, W, b, *fs, sc, ptr, ad)
                y.backward(torch.ones_like(y))
            outs.append((y.detach(), xg.grad, [f.grad for f in fs]))
        (y0, dx0, g0), (y1, dx1, g1) = outs
        torch.testing.assert_close(y1[rows], y0[rows], atol=0, rtol=0, msg=backend)
        torch.testing.assert_close(dx1[rows], dx0[rows], atol=0, rtol=0, msg=backend)
        for a, c in zip(g1, g0):
            torch.testing.assert_close(a[1:], c[1:], atol=0, rtol=0, msg=backend)


def test_a_bank_over_a_quantized_base_isolates_its_slots():
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from lsr_compile.bank import BankedLinear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64))
    quantize_(model, Int8WeightOnlyConfig())
    layer = BankedLinear(model[0], lc.LSRConfig(s=3, r=(2, 2)).shapes_for(96, 64), capacity=3)
    with torch.no_grad():
        for p in ("A1", "A2", "B1", "B2"):
            getattr(layer, p).normal_(0, 0.3)
        layer.scales.copy_(torch.tensor([0.5, 2.0, 1.5]))
    x = torch.randn(4, 5, 96)
    layer.slots = torch.tensor([2, -1, 0, 1])
    clean = layer(x)
    with torch.no_grad():
        layer.A1[0].fill_(math.nan)
        layer.scales[0] = math.inf
    bad = layer(x)
    keep = torch.tensor([True, True, False, True])
    torch.testing.assert_close(bad[keep], clean[keep], atol=0, rtol=0)
    assert not torch.isfinite(bad[2]).all()


# ---- every argument used as documented, or refused by name ---------------------------------------------------

def test_scales_that_require_grad_are_refused_not_silently_left_without_a_gradient():
    x, W, b, factors, scales, ptr, ad = _inputs(torch.float32)
    with pytest.raises(LSRInputError, match="scales requires grad"):
        lc.mixed_linear(x, W, b, *factors, scales.requires_grad_(True), ptr, ad)
    with torch.no_grad():  # nothing to train: accepted
        lc.mixed_linear(x, W, b, *factors, scales, ptr, ad)


def test_a_float_per_row_index_is_refused_not_truncated():
    with pytest.raises(ValueError, match="integer tensor"):
        mf.segments_from_index(torch.tensor([0.7, 1.2, 1.9]))
    with pytest.raises(ValueError, match="integer tensor"):
        mf.segments_from_index(torch.tensor([True, False]))
    assert mf.segments_from_index(torch.tensor([1, 1, -1], dtype=torch.int32))[1].tolist() == [1, -1]


def test_unknown_base_format_and_a_mixed_batch_over_a_quantized_base_are_refused():
    with pytest.raises(ValueError, match="not a base format.*int8_weight_only"):
        lc.LSRShape(64, 48, 48, s=2, r=2, base="int3_magic")
    with pytest.raises(ValueError, match="mixed batch over a int8_weight_only base"):
        lc.LSRShape(64, 48, 48, s=2, r=2, adapters=4, base="int8_weight_only")
    assert lc.LSRShape(64, 48, 48, s=2, r=2, base="int8_weight_only").ops == ("adapter_forward", "adapter_backward")


def test_one_slot_with_several_segments_is_a_mixed_batch_and_tunes(tmp_path):
    shape = lc.LSRShape(32, 16, 16, s=1, r=2, adapters=1, segments=3)
    assert shape.ops == ("mixed_forward", "mixed_backward")
    assert shape.key("mixed_forward").segments == 4  # bucketed
    records = lc.tune([shape], trials=1, time_budget_s=10, log_dir=tmp_path, ops=("mixed_backward",))
    assert [r["key"]["op"] for r in records] == ["mixed_backward"] and records[0]["backend"]
    assert records[0]["rejected"] == {}, records[0]["rejected"]


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(x=torch.randn(5, 13)), "last dimension must be d_in = 20"),
    (lambda a: a.update(A1=torch.randn(2, 2)), "A1 must be a 3-D factor tensor"),
    (lambda a: a.update(B2=torch.randn(2, 6, 5)), "inner ranks disagree"),
    (lambda a: a.update(A2=a["A2"].double()), "dtype mismatch"),
    (lambda a: a.update(base="int3"), "not a base format"),
])
def test_the_public_adapter_op_checks_its_arguments(change, match):
    s, r1, r2, n1, n2, m1, m2 = DIMS
    args = dict(x=torch.randn(5, n1 * n2), A1=torch.randn(s, r1, n1), A2=torch.randn(s, r2, n2),
                B1=torch.randn(s, m1, r1), B2=torch.randn(s, m2, r2), scale=1.0, base="dense")
    assert torch.ops.lsr.adapter(*args.values()).shape == (5, m1 * m2)
    change(args)
    with pytest.raises(LSRInputError, match=match):
        torch.ops.lsr.adapter(*args.values())


# ---- the last many-adapter gaps: an empty bank, torch.func, what a bank serves and what tune(model) sees -----

@pytest.mark.parametrize("backend", [None] + [b for b in kernels.BACKENDS if kernels.unavailable(b, CPU) is None])
def test_an_empty_bank_serves_base_only_segments(backend):
    """K = 0 slots and every segment -1 (it raised IndexError inside the op): the base alone, and factor
    gradients of the bank's (empty) shape."""
    x, W, b, factors, _, ptr, _ = _inputs(torch.float32)
    empty = [f[:0].clone().requires_grad_(True) for f in factors]
    x.requires_grad_(True)
    ad = torch.full((len(LENGTHS),), -1, dtype=torch.int64)
    with lc.use_backend(backend):
        y = lc.mixed_linear(x, W, b, *empty, torch.zeros(0), ptr, ad)
    want = torch.nn.functional.linear(x, W, b)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x] + empty, g)
    torch.testing.assert_close(got[0], g @ W)
    assert [t.shape for t in got[1:]] == [t.shape for t in empty] and all(t.numel() == 0 for t in got[1:])
    with pytest.raises(LSRInputError, match=r"slots \[0, 0, 0, 0, 0\] outside \[-1, 0\)"):
        lc.mixed_linear(x, W, b, *empty, torch.zeros(0), ptr, ad.clone().fill_(0))


def test_torch_func_grad_over_mixed_linear():
    """torch.func transforms over ``lc.mixed_linear`` (PyTorch's generic Function message before): the bank's
    gradients are autograd's through the op."""
    from torch.func import grad

    x, W, b, factors, scales, ptr, ad = _inputs()

    def loss(bank, xb):
        return lc.mixed_linear(xb, W, b, *bank, scales, ptr, ad).square().sum()

    got = grad(loss)([f.clone() for f in factors], x)
    leaves = [f.clone().requires_grad_(True) for f in factors]
    want = torch.autograd.grad(loss(leaves, x), leaves)
    for a, w in zip(got, want):
        assert w.abs().max() > 1e-3
        torch.testing.assert_close(a, w)


def test_a_bank_target_that_is_not_a_linear_layer_is_refused_and_the_model_untouched():
    """``target_modules`` naming e.g. ``attention`` (a module holding linear layers) was skipped without a word."""
    from lsr_compile.bank import AdapterBank, BankedLinear

    from models import tiny_bert

    model = tiny_bert().bert
    with pytest.raises(TypeError, match=r"attention is a BertAttention, not an nn.Linear.*query"):
        AdapterBank(model, lc.LSRConfig(s=2, r=2, target_modules=["query", "attention"]))
    assert not any(isinstance(m, BankedLinear) for m in model.modules())
    AdapterBank(model, lc.LSRConfig(s=2, r=2, target_modules=["query"]))
    with pytest.raises(TypeError, match="already served by a bank"):
        AdapterBank(model, lc.LSRConfig(s=2, r=2, target_modules=["query"]))


def test_tune_on_a_model_a_bank_serves_tunes_its_mixed_batch(monkeypatch):
    """``tune(bank.model)`` said "the model has no LSRLinear layers; wrap it with apply_lsr first"."""
    from lsr_compile.bank import AdapterBank
    from lsr_compile.tuning import search

    from models import tiny_bert

    jobs = []
    monkeypatch.setattr(search, "_job", lambda shape, op, *a, **k: jobs.append((shape, op)))
    bank = AdapterBank(tiny_bert().bert, lc.LSRConfig(s=2, r=2, target_modules=["query", "value"]), capacity=4)
    for what in (bank.model, bank):
        jobs.clear()
        lc.tune(what, tokens=(64,), log_dir=None)
        assert {op for _, op in jobs} == {"mixed_forward", "mixed_backward"}
        assert {(s.adapters, s.num_segments, s.factors.s) for s, _ in jobs} == {(4, 4, 2)}


def test_shapes_of_a_peft_model_holds_every_adapter_and_the_mixed_batch():
    """Two adapters of different structure (s = 2 and s = 3, r = (2, 4)): both are tuned, and the mixed batch of
    the two that share a structure (only the first adapter's shape was returned)."""
    from peft import get_peft_model

    from lsr_compile.tuning.search import shapes_of
    from models import tiny_bert

    cfg = dict(target_modules=["query"], task_type="SEQ_CLS")
    pm = get_peft_model(tiny_bert(), lc.LSRConfig(s=2, r=2, **cfg), adapter_name="a")
    pm.add_adapter("b", lc.LSRConfig(s=3, r=(2, 4), **cfg))
    got = {(s.factors.s, s.factors.r1, s.factors.r2, s.mixed and s.adapters) for s in shapes_of(pm, (64,))}
    assert got == {(2, 2, 2, False), (3, 2, 4, False)}
    pm.add_adapter("c", lc.LSRConfig(s=2, r=2, **cfg))
    got = {(s.factors.s, s.factors.r1, s.factors.r2, s.mixed and s.adapters) for s in shapes_of(pm, (64,))}
    assert got == {(2, 2, 2, False), (3, 2, 4, False), (2, 2, 2, 2)}
