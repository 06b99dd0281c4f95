"""Every TVM expression, scheduled for llvm at several points of its space, against the reference."""
import pytest
import torch

from lsr_compile import formulations, reference, schedule_spaces
from lsr_compile.kernels import tvm_kernels
from lsr_compile.tuning.harness import TOL
from lsr_compile.config import FactorShapes
from lsr_compile.problem import ProblemKey, token_bucket

from conftest import make_layer_inputs

CPU = torch.device("cpu")
# (s, r1, r2, n1, n2, m1, m2): square with 16-lane rfactor, rectangular/odd (no lanes), tall
DIMS = [(2, 2, 4, 8, 6, 8, 6), (3, 2, 3, 6, 7, 5, 9), (1, 1, 2, 4, 8, 16, 12)]


def _points(op, variant):
    """The default, a middle point, the last static point and the generic kernel (where the variant has one)."""
    space = schedule_spaces.space("llvm", op, variant)
    generic = schedule_spaces.generic("llvm", op, variant)
    static = [p for p in space if p != generic]
    return [static[0], static[len(static) // 2], static[-1]] + ([generic] if generic else [])


def _ref_backward(x, W, b, factors, g, scale):
    xs = x.detach().double().requires_grad_(True)
    fs = [f.detach().double().requires_grad_(True) for f in factors]
    reference.lsr_linear(xs, W.double(), b.double(), *fs, scale).backward(g.double())
    return [xs.grad] + [f.grad for f in fs]


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("variant", schedule_spaces.variants("llvm", "forward"))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL["float64"]), (torch.float32, TOL["float32"])])
def test_forward_expressions(dims, variant, dtype, tol):
    for N in (1, 37):
        x, W, b, factors = make_layer_inputs(N, *dims, dtype=dtype)
        key = ProblemKey.of("forward", dtype, N, FactorShapes(*dims))
        want = reference.lsr_linear(x.double(), W.double(), b.double(), *[f.double() for f in factors], 0.7)
        for cfg in _points("forward", variant):
            for bias in (b, None):
                got, A, Bt, _, _ = tvm_kernels.build("forward", variant, cfg, key, CPU)(x, W, bias, *factors, 0.7)
                expect = want if bias is not None else want - b.double()
                torch.testing.assert_close(got.double(), expect, atol=tol, rtol=tol, msg=f"{variant} {cfg}")
                # what the forward hands the backward: A and Bt of the factors
                torch.testing.assert_close(A.double(), formulations.build_A(*factors[:2]).double(), atol=tol, rtol=tol)
                torch.testing.assert_close(Bt.double(), formulations.build_Bt(*factors[2:]).double(), atol=tol,
                                           rtol=tol)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("need_dx", [True, False])
def test_backward_expression(dims, need_dx):
    N = 45
    x, W, b, factors = make_layer_inputs(N, *dims, dtype=torch.float64)
    g = torch.randn(N, dims[5] * dims[6], dtype=torch.float64)
    want = _ref_backward(x, W, b, factors, g, 1.3)
    key = ProblemKey("backward", "float64", token_bucket(N), *dims)
    A, Bt = formulations.build_A(*factors[:2]), formulations.build_Bt(*factors[2:])
    for variant in schedule_spaces.variants("llvm", "backward"):
        for cfg in _points("backward", variant):
            fn = tvm_kernels.build("backward", variant, cfg, key, CPU)
            dx, *df = fn(g, x, W, *factors, A, Bt, None, None, 1.3, need_dx)
            if need_dx:
                torch.testing.assert_close(dx, want[0])
            else:
                assert dx is None
            for got, w in zip(df, want[1:]):
                torch.testing.assert_close(got, w)


def test_one_kernel_serves_every_token_count():
    dims = (2, 2, 2, 4, 5, 3, 7)  # a shape no other test compiles
    before = tvm_kernels.compile_count()
    for N in (3, 64, 200):  # different buckets, one compiled function (symbolic n)
        key = ProblemKey.of("forward", torch.float32, N, FactorShapes(*dims))
        fn = tvm_kernels.build("forward", "materialise", schedule_spaces.default("llvm", "forward", "materialise"),
                               key, CPU)
        x, W, b, factors = make_layer_inputs(N, *dims)
        torch.testing.assert_close(fn(x, W, b, *factors, 0.5)[0], reference.lsr_linear(x, W, b, *factors, 0.5),
                                   atol=1e-4, rtol=1e-4)
        assert tvm_kernels.compile_count() == before + 1  # compiled for the first count, reused after


def test_unsupported_dtype_is_refused_clearly():
    key = ProblemKey("forward", "bfloat16", 64, *DIMS[0])
    with pytest.raises(ValueError, match="TVM llvm kernels support"):
        tvm_kernels.build("forward", "materialise", {"vec": 16, "rows": 16, "unroll": 0}, key, CPU)
