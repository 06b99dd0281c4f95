"""The step's variants (lsr_compile/step.py) with every provider of the Kronecker parts — ATen, TVM (CPU),
Triton (its interpreter here) — against the float64 reference: values, all five gradients, each way the
forward can hand the backward what it built, odd sizes and every dtype a provider takes."""
import pytest
import torch

from lsr_compile import reference, step
from lsr_compile.kernels import triton_parts, tvm_parts
from lsr_compile.kernels.triton_fused import DTYPES as TRITON_DTYPES

from conftest import make_layer_inputs

PARTS = {"aten": step.ATEN, "aten-eager": step.ATEN_EAGER, "triton": triton_parts.TritonParts()}
if tvm_parts.available(torch.float32):  # the GPU image has no TVM
    PARTS["tvm"] = tvm_parts.PARTS
# (s, r1, r2, n1, n2, m1, m2): one term, ragged everywhere, q = 1, wider q than d (padding), tall
DIMS = [(1, 1, 1, 5, 3, 2, 7), (3, 2, 3, 6, 7, 5, 9), (2, 1, 1, 4, 4, 3, 3), (2, 4, 5, 3, 2, 4, 3),
        (4, 3, 2, 12, 8, 8, 12)]
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _dtypes(name, dims):
    """Every dtype a provider takes; Triton's half precision (slow in its interpreter) on the ragged sizes only."""
    if name == "tvm":
        return [torch.float64, torch.float32]
    if name == "triton":
        return [getattr(torch, d) for d in TRITON_DTYPES] if dims == DIMS[1] else [torch.float64, torch.float32]
    return [torch.float64, torch.float32, torch.bfloat16]


def _reference(x, W, b, factors, dy, scale):
    xs = x.detach().double().requires_grad_(True)
    fs = [f.detach().double().requires_grad_(True) for f in factors]
    y = reference.lsr_linear(xs, W.double(), b.double(), *fs, scale)
    y.backward(dy.double())
    return [y.detach(), xs.grad] + [f.grad for f in fs]


def _assert_close(name, got, want, dtype):
    err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]}"


def _adapter_visible(want, x, W, b, dtype):
    """The adapter's share of y and its factor gradients stand ten tolerances above the error measure (a
    step that dropped the adapter, or zeroed a gradient, would fail)."""
    base = torch.nn.functional.linear(x.double(), W.double(), b.double())
    assert (want[0] - base).abs().max() > 10 * TOL[dtype] * max(1.0, want[0].abs().max().item())
    for g in want[2:]:
        assert g.abs().max() > 10 * TOL[dtype] * max(1.0, g.abs().max().item())


# Triton's interpreter on the ragged sizes in four dtypes and on the tall ones: minutes each on 2 cores
SLOW = {("triton", 1), ("triton", 4)}


@pytest.mark.parametrize("parts, dims", [
    pytest.param(parts, dims, id=f"dims{i}-{parts}", marks=[pytest.mark.slow] if (parts, i) in SLOW else [])
    for i, dims in enumerate(DIMS) for parts in sorted(PARTS)])
def test_every_variant_pair_every_hand_over(parts, dims):
    """forward variant x backward variant x (W_eff kept or not), values and the five gradients."""
    for dtype in _dtypes(parts, dims):
        N = 37
        x, W, b, factors = make_layer_inputs(N, *dims, dtype=dtype)
        factors = [f * 3 for f in factors]  # an adapter the size of the base's output
        dy = torch.randn(N, dims[5] * dims[6], dtype=torch.float64).to(dtype)
        want = _reference(x, W, b, factors, dy, 0.7)
        _adapter_visible(want, x, W, b, dtype)
        for fname, fwd in step.FORWARDS.items():
            y, A, Bt, tT, w_eff = fwd(PARTS[parts], x, W, b, *factors, 0.7)
            _assert_close(f"{parts} {fname} y {dtype}", y, want[0], dtype)
            assert A.shape == (dims[1] * dims[2], dims[3] * dims[4]) and Bt.shape == (A.shape[0], W.shape[0])
            assert step.given(tT) == (fname == "materialise") and step.given(w_eff) == (fname == "fold")
            for bname, bwd in step.BACKWARDS.items():
                for keep in (True, False):
                    kept = w_eff if keep else None
                    out = bwd(PARTS[parts], dy, x, W, *factors, A, Bt, tT, kept, 0.7, True)
                    for i, (got, w) in enumerate(zip(out, want[1:])):
                        _assert_close(f"{parts} {fname}->{bname} keep={keep} output {i} {dtype}", got, w, dtype)


@pytest.mark.parametrize("parts", sorted(PARTS))
def test_backward_without_dx(parts):
    x, W, b, factors = make_layer_inputs(19, 3, 2, 3, 6, 7, 5, 9, dtype=torch.float64)
    dy = torch.randn(19, 45, dtype=torch.float64)
    want = _reference(x, W, b, factors, dy, 1.3)
    _, A, Bt, tT, w_eff = step.FORWARDS["fold"](PARTS[parts], x, W, b, *factors, 1.3)
    for bwd in step.BACKWARDS.values():
        dx, *grads = bwd(PARTS[parts], dy, x, W, *factors, A, Bt, tT, w_eff, 1.3, False)
        assert dx is None
        for got, w in zip(grads, want[2:]):
            _assert_close(f"{parts} no dx", got, w, torch.float64)


@pytest.mark.parametrize("parts", ["aten", "aten-eager"])
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_materialise_computes_the_adapter_in_the_factors_dtype_over_a_half_base(parts, half):
    """float32 factors over a half-precision base (peft's float32 adapters): x and dy go up to float32 for the
    adapter, as peft's LoRA computes it, so the factors' gradients carry float32's error, not half's; y and dx
    come out in the base's dtype. With the factors cast down first they would be off by ~1e-2."""
    dims = DIMS[1]
    x, W, b, factors = make_layer_inputs(37, *dims, dtype=torch.float64)
    x, W, b = x.to(half), W.to(half), b.to(half)  # the values the half base sees, exactly
    factors = [(f * 3).float() for f in factors]
    dy = torch.randn(37, dims[5] * dims[6], dtype=torch.float64).to(half)
    want = _reference(x.double(), W.double(), b.double(), factors, dy.double(), 0.7)
    y, A, Bt, tT, w_eff = step.forward_materialise(PARTS[parts], x, W, b, *factors, 0.7)
    assert y.dtype == half and A.dtype == Bt.dtype == tT.dtype == torch.float32
    _assert_close(f"{parts} y", y, want[0], half)
    for keep_tT in (tT, None):  # the forward's tT, or rebuilt (under checkpointing's saved-tensor hooks)
        dx, *grads = step.backward_materialise(PARTS[parts], dy, x, W, *factors, A, Bt, keep_tT, None, 0.7, True)
        assert dx.dtype == half and all(g.dtype == torch.float32 for g in grads)
        _assert_close(f"{parts} dx", dx, want[1], half)
        for i, (got, w) in enumerate(zip(grads, want[2:])):
            _assert_close(f"{parts} factor gradient {i}", got, w, torch.float32)


@pytest.mark.parametrize("dims", DIMS[:3])
def test_parts_against_aten(dims):
    """Each part of TVM and Triton against ATen's on the same inputs: factors, fold (from A and Bt, and from
    the factors), the pass over dy (partial sums add up) and the projection."""
    x, W, b, factors = make_layer_inputs(45, *dims, dtype=torch.float64)
    dy = torch.randn(45, W.shape[0], dtype=torch.float64)
    A, Bt = step.ATEN.factors(*factors)
    tT = torch.mm(A, x.t())
    uT, dBt = step.ATEN.dy_pass(dy, Bt, tT)
    dA = torch.mm(uT, x)
    for name in sorted(set(PARTS) - {"aten"}):
        p = PARTS[name]
        for got, want in zip(p.factors(*factors), (A, Bt)):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(p.fold(W, A, Bt, 0.7), step.ATEN.fold(W, A, Bt, 0.7))
        for got, want in zip(p.fold_factors(W, *factors, 0.7), (step.ATEN.fold(W, A, Bt, 0.7), A, Bt)):
            torch.testing.assert_close(got, want)
        u2, parts2 = p.dy_pass(dy, Bt, tT)
        torch.testing.assert_close(u2, uT)
        torch.testing.assert_close(parts2.sum(0), dBt[0])
        for got, want in zip(p.project(dA, parts2, *factors, 0.7), step.ATEN.project(dA, dBt, *factors, 0.7)):
            torch.testing.assert_close(got, want)


def test_dy_pass_partial_sums_over_several_programs():
    """Triton's pass over dy with more rows than one program takes (several partial sums, and programs
    taking two row blocks each) adds up to ATen's."""
    x, W, b, factors = make_layer_inputs(203, 2, 2, 3, 4, 5, 6, 7, dtype=torch.float64)
    dy = torch.randn(203, W.shape[0], dtype=torch.float64)
    A, Bt = step.ATEN.factors(*factors)
    tT = torch.mm(A, x.t())
    uT, dBt = step.ATEN.dy_pass(dy, Bt, tT)
    for rows in (1, 2):
        p = triton_parts.TritonParts({"dy_block_n": 64, "dy_rows": rows})
        u2, parts2 = p.dy_pass(dy, Bt, tT)
        assert parts2.shape[0] > 1
        torch.testing.assert_close(u2, uT)
        torch.testing.assert_close(parts2.sum(0), dBt[0])


def test_keeps_folded_setting():
    assert step.keep_folded_weight == "auto"
    assert step.keeps_folded(4096, 4096) and not step.keeps_folded(512, 4096)
    assert not step.keeps_folded(8192, 4096, "cpu")  # measured no faster there
    with step.folded_weight_kept(False):
        assert not step.keeps_folded(8192, 4096)
    with step.folded_weight_kept(True):
        assert step.keeps_folded(16, 4096)
    with pytest.raises(ValueError, match="keep_folded_weight"):
        with step.folded_weight_kept("sometimes"):
            pass
