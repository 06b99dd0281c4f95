"""The custom ops and every PyTorch formulation against the reference (values and gradients)."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lsr_compile as lc
from lsr_compile import reference
from lsr_compile.ops import LSRInputError

from conftest import make_layer_inputs, rounding_bound

# fp32/fp64: |error| <= K * u * (the reference on |inputs|), entry by entry, u the unit roundoff: K covers the
# rounding steps of the longest chain, 3-4x over the worst measured over 300 random problems (4.1 and 5.1).
# bf16: that worst-case bound sums |terms| and grows past the factor gradients themselves (their terms cancel),
# so bf16 is held to what the plain-PyTorch reference achieves in bf16 on the same inputs: at most K times its
# largest error, per tensor (the flash-attention tests' rule), plus 4 units of the tensor's largest entry (on
# tiny problems the reference can come out nearly exact).
K = {torch.float64: 16, torch.float32: 16, torch.bfloat16: 2}
# how far the adapter's share of y, and each factor's gradient, must stand above the tolerance somewhere
VISIBLE = {torch.float64: 100, torch.float32: 100, torch.bfloat16: 10}

problems = st.fixed_dictionaries({
    "N": st.integers(1, 40), "s": st.integers(1, 4), "r1": st.integers(1, 3), "r2": st.integers(1, 3),
    "n1": st.integers(1, 9), "n2": st.integers(1, 9), "m1": st.integers(1, 9), "m2": st.integers(1, 9),
    "lead": st.sampled_from([(), (2,), (2, 3)]), "bias": st.booleans(),
    "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    "scale": st.floats(0.1, 4.0), "seed": st.integers(0, 2**31 - 1),
})


def _ref_value_and_grads(p, x, W, b, factors, g):
    xs = x.detach().double().requires_grad_(True)
    fs = [f.detach().double().requires_grad_(True) for f in factors]
    y = reference.lsr_linear(xs, W.double(), None if b is None else b.double(), *fs, p["scale"])
    y.backward(g.double())
    return y.detach(), xs.grad, [f.grad for f in fs]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_op_matches_reference_values_and_grads(p):
    dims = [p[k] for k in ("s", "r1", "r2", "n1", "n2", "m1", "m2")]
    dtype = p["dtype"]
    torch.manual_seed(p["seed"])
    x, W, b, factors = make_layer_inputs(p["N"], *dims, dtype=torch.float64, bias=p["bias"], lead=p["lead"])
    if dtype == torch.bfloat16:  # the adapter 10x the base: above bf16's blur of the whole result
        factors = [f * 10 ** 0.25 for f in factors]
    x, W, b = x.to(dtype), W.to(dtype), None if b is None else b.to(dtype)
    factors = [f.to(dtype).requires_grad_(True) for f in factors]
    x.requires_grad_(True)
    y = lc.lsr_linear(x, W, b, *factors, p["scale"])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, dx_ref, df_ref = _ref_value_and_grads(p, x, W, b, factors, g)
    wants = [y_ref, dx_ref, *df_ref]
    u = torch.finfo(dtype).eps / 2
    if dtype == torch.bfloat16:
        xp = x.detach().clone().requires_grad_(True)
        fp = [f.detach().clone().requires_grad_(True) for f in factors]
        y_pt = reference.lsr_linear(xp, W, b, *fp, p["scale"])
        y_pt.backward(g)
        # plus one rounding of the sum's terms (Σ|terms|, largest entry): where the terms cancel (a scalar factor
        # gradient), two bf16 computations of it differ by that much whatever the reference's own luck
        y_abs, dx_abs, df_abs = rounding_bound(x, W, b, factors, p["scale"], g)
        tols = [K[dtype] * (pt.double() - w).abs().max() + 4 * u * w.abs().max() + u * bound.max()
                for pt, w, bound in zip([y_pt, xp.grad, *(f.grad for f in fp)], wants, (y_abs, dx_abs, *df_abs))]
    else:
        y_abs, dx_abs, df_abs = rounding_bound(x, W, b, factors, p["scale"], g)
        tols = [K[dtype] * u * bound for bound in (y_abs, dx_abs, *df_abs)]
    tols = [t + 1e-300 for t in tols]
    # a result that lost the adapter (or a factor's gradient) must miss the tolerance by VISIBLE x somewhere;
    # the rare draw where the reference itself does not (a 1x1 layer whose factors came out near zero) is
    # discarded, judged on the references alone
    base = torch.nn.functional.linear(x.detach().double(), W.double(), None if b is None else b.double())
    assume(((y_ref - base).abs() / tols[0]).max() >= VISIBLE[dtype])
    assume(all((w.abs() / t).max() >= VISIBLE[dtype] for w, t in zip(df_ref, tols[2:])))
    for name, got, want, tol in zip(("y", "dx", "dA1", "dA2", "dB1", "dB2"),
                                    [y, x.grad, *(f.grad for f in factors)], wants, tols):
        worst = ((got.double() - want).abs() / tol).max().item()
        assert worst <= 1, f"{name}: error {worst:.2f}x the tolerance ({dtype})"


def test_gradcheck_float64():
    x, W, b, factors = make_layer_inputs(5, 2, 2, 3, 3, 4, 4, 2, dtype=torch.float64, lead=(2,))
    inputs = [x.requires_grad_(True)] + [f.requires_grad_(True) for f in factors]
    assert torch.autograd.gradcheck(lambda x, *f: lc.lsr_linear(x, W, b, *f, 0.9), inputs)


def test_opcheck_every_op():
    x, W, b, factors = make_layer_inputs(6, 2, 2, 3, 3, 4, 4, 2, dtype=torch.float64, lead=(2,))
    x.requires_grad_(True)
    for f in factors:
        f.requires_grad_(True)
    torch.library.opcheck(torch.ops.lsr.linear.default, (x, W, b, *factors, 0.9))
    torch.library.opcheck(torch.ops.lsr.linear.default, (x, W, None, *factors, 0.9))
    torch.library.opcheck(torch.ops.lsr.linear_forward.default, (x.detach(), W, b, *[f.detach() for f in factors], 0.9))
    g = torch.randn(2, 6, 8, dtype=torch.float64)
    fs = [f.detach() for f in factors]
    _, A, Bt, tT, w_eff = torch.ops.lsr.linear_forward(x.detach(), W, b, *fs, 0.9)
    empty = x.new_empty(0)
    for need_dx in (True, False):
        for saved in ((A, Bt, tT, w_eff), (A, Bt, empty, empty)):
            torch.library.opcheck(torch.ops.lsr.linear_backward.default, (g, x.detach(), W, *fs, *saved, 0.9, need_dx))


def test_trainable_base_weight_gets_exact_gradient():
    x, W, b, factors = make_layer_inputs(5, 2, 2, 3, 3, 4, 4, 2, dtype=torch.float64)
    W.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda W, b: lc.lsr_linear(x, W, b, *factors, 0.9), (W, b))


def _good():
    x, W, b, f = make_layer_inputs(4, 2, 2, 3, 3, 4, 4, 2)
    return dict(x=x, weight=W, bias=b, A1=f[0], A2=f[1], B1=f[2], B2=f[3])


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(A1=torch.randn(2, 2, 5)), r"A1/A2 factor d_in as 5\*4"),
    (lambda a: a.update(B2=torch.randn(2, 2, 2)), "inner ranks disagree"),
    (lambda a: a.update(A2=torch.randn(3, 2, 4)), "separation rank s"),
    (lambda a: a.update(A1=torch.randn(2, 3)), "A1 must be 3-D"),
    (lambda a: a.update(x=torch.randn(4, 11)), "last dimension must be d_in = 12"),
    (lambda a: a.update(bias=torch.randn(5)), r"bias has shape \(5,\)"),
    (lambda a: a.update(B1=a["B1"].double()), "dtype mismatch"),
    (lambda a: a.update(x=a["x"].to(torch.int64)), "x has dtype torch.int64"),
    (lambda a: a.update(A2=a["A2"].to("meta")), "device mismatch"),
])
def test_bad_input_names_the_problem(change, match):
    args = _good()
    change(args)
    with pytest.raises(LSRInputError, match=match):
        lc.lsr_linear(*args.values(), 0.5)
