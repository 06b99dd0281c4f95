"""The custom ops and every PyTorch formulation against the reference (values and gradients)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lsr_compile as lc
from lsr_compile import reference
from lsr_compile.ops import LSRInputError

from conftest import make_layer_inputs

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-4, rtol=2e-4),
       torch.bfloat16: dict(atol=0.15, rtol=0.05)}

problems = st.fixed_dictionaries({
    "N": st.integers(1, 40), "s": st.integers(1, 4), "r1": st.integers(1, 3), "r2": st.integers(1, 3),
    "n1": st.integers(1, 9), "n2": st.integers(1, 9), "m1": st.integers(1, 9), "m2": st.integers(1, 9),
    "lead": st.sampled_from([(), (2,), (2, 3)]), "bias": st.booleans(),
    "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    "scale": st.floats(0.1, 4.0),
})


def _ref_value_and_grads(p, x, W, b, factors, g):
    xs = x.detach().double().requires_grad_(True)
    fs = [f.detach().double().requires_grad_(True) for f in factors]
    y = reference.lsr_linear(xs, W.double(), None if b is None else b.double(), *fs, p["scale"])
    y.backward(g.double())
    return y, xs.grad, [f.grad for f in fs]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems)
def test_op_matches_reference_values_and_grads(p):
    dims = [p[k] for k in ("s", "r1", "r2", "n1", "n2", "m1", "m2")]
    x, W, b, factors = make_layer_inputs(p["N"], *dims, dtype=p["dtype"], bias=p["bias"], lead=p["lead"])
    x.requires_grad_(True)
    for f in factors:
        f.requires_grad_(True)
    y = lc.lsr_linear(x, W, b, *factors, p["scale"])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, dx_ref, df_ref = _ref_value_and_grads(p, x, W, b, factors, g)
    tol = TOL[p["dtype"]]
    # bf16 errors grow with the contraction length: compare relative to the magnitude
    mag = lambda t: 1.0 if p["dtype"] != torch.bfloat16 else max(1.0, t.abs().max().item())  # noqa: E731
    torch.testing.assert_close(y.double(), y_ref, atol=tol["atol"] * mag(y_ref), rtol=tol["rtol"])
    torch.testing.assert_close(x.grad.double(), dx_ref, atol=tol["atol"] * mag(dx_ref), rtol=tol["rtol"])
    for f, want in zip(factors, df_ref):
        torch.testing.assert_close(f.grad.double(), want, atol=tol["atol"] * mag(want), rtol=tol["rtol"])


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
