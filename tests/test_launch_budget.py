"""The launch and ATen-call budget of a training step on CUDA, counted without a GPU: the plan dispatch picks
for the project's H200 (tuning record or cost model), run on tensors without data, every ATen call counted by
a dispatch mode and every Triton launch by a hook on Triton's own launcher (nothing is run)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lsr_compile import costmodel, dispatch, step, workloads
from lsr_compile.device import H200

KERNELS, ATEN_CALLS = 8, 30  # per training step of one layer (docs/design.md §4)


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append(costmodel.aten_calls(func, args, kwargs or {}, out))
        return out


@pytest.fixture
def triton_launches(monkeypatch):
    """Every launch that reaches Triton's launcher (compiled or interpreted), recorded instead of run."""
    from triton.runtime import interpreter, jit

    seen = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        monkeypatch.setattr(cls, "run", lambda self, *a, **k: seen.append(getattr(self, "__name__", None)
                                                                          or self.fn.__name__))
    return seen


def _step(shape, launches):
    """Forward, hand-over (W_eff kept as the layer would), backward, on meta tensors; (ATen calls, kernels)."""
    plan = dispatch.planned(shape, H200)
    (fchoice, fwd), (bchoice, bwd) = plan["forward"], plan["backward"]
    f = shape.factors
    e = lambda *s: torch.empty(*s, device="meta", dtype=shape.dtype)  # noqa: E731
    x, W, b, dy = e(shape.tokens, f.d_in), e(f.d_out, f.d_in), e(f.d_out), e(shape.tokens, f.d_out)
    factors = [e(*s) for s in f.factor_sizes().values()]
    with _Count() as count:
        _, A, Bt, tT, w_eff = fwd(x, W, b, *factors, 0.7)
        keep = step.keeps_folded(shape.tokens, f.d_out)
        bwd(dy, x, W, *factors, A, Bt, tT, w_eff if keep else None, 0.7, True)
    calls = [c for group in count.calls for c in group]
    aten_kernels = sum(c.kind == "kernel" for c in calls)
    return (fchoice, bchoice), len(count.calls), aten_kernels + len(launches)


@pytest.mark.parametrize("shape", workloads.gpu_shapes(), ids=lambda s: s.label())
def test_a_training_step_fits_the_budget(shape, triton_launches, fresh_dispatch):
    choices, aten_calls, kernels = _step(shape, triton_launches)
    assert kernels <= KERNELS, (choices, kernels, triton_launches)
    assert aten_calls <= ATEN_CALLS, (choices, aten_calls)


def test_the_target_step(triton_launches, fresh_dispatch):
    """4096², N = 8192, bf16 on the H200: the fold variant with Triton's parts, W_eff kept (N >= d_out): seven
    kernels, fold, GEMM | GEMM, thin, dy pass, thin, projection. Without W_eff, still within the budget (the
    backward folds again, or the cost model prefers the token path)."""
    shape = workloads.gpu_shapes()[0]
    (fchoice, bchoice), aten_calls, kernels = _step(shape, triton_launches)
    assert (fchoice.backend, fchoice.variant, bchoice.backend, bchoice.variant) == ("triton", "fold", "triton", "fold")
    assert triton_launches == ["_fold_kernel", "_dy_pass_kernel", "_project_kernel"]
    assert kernels == 7 and aten_calls <= 20
    triton_launches.clear()
    dispatch.invalidate()
    with step.folded_weight_kept(False):
        _, _, kernels = _step(shape, triton_launches)
    assert kernels <= KERNELS and triton_launches[0] == "_fold_kernel"


def test_the_count_would_see_a_regression(triton_launches, fresh_dispatch, monkeypatch):
    """A step that built A and Bt again in the backward (as the old one did) is over the budget."""
    from lsr_compile.kernels import triton_parts

    real = triton_parts.TritonParts.project

    def rebuilding(self, dA, dBt, A1, A2, B1, B2, scale):
        self.factors(A1, A2, B1, B2)
        self.factors(A1, A2, B1, B2)
        return real(self, dA, dBt, A1, A2, B1, B2, scale)

    monkeypatch.setattr(triton_parts.TritonParts, "project", rebuilding)
    with step.folded_weight_kept(False):
        _, _, kernels = _step(workloads.gpu_shapes()[0], triton_launches)
    assert kernels > KERNELS
