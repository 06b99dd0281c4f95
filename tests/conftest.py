import os
import sys

import torch

# Without a GPU, Triton kernels run only in its interpreter, which must be chosen before anything imports
# triton (importing torch does not). On a GPU the tests run the compiled kernels.
assert "triton" not in sys.modules, "triton was imported before conftest could choose the interpreter"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tuning's default log directory (the user's) is a fresh one: tests neither read nor write the real one.
os.environ["XDG_DATA_HOME"] = __import__("tempfile").mkdtemp(prefix="lsr-test-data-")
os.environ.pop("LSR_TUNING_LOGS", None)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def time_limit():
    """``with time_limit(s):`` fails the test if the block runs longer than ``s`` seconds (a hang fails
    fast instead of stalling CI)."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def limit(seconds: int):
        def expired(signum, frame):
            raise TimeoutError(f"still running after {seconds} s")

        old = signal.signal(signal.SIGALRM, expired)
        signal.alarm(seconds)
        try:
            yield
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    return limit


@pytest.fixture
def fresh_dispatch():
    """Dispatch back to its default log directories and empty caches, before and after the test."""
    from lsr_compile import dispatch

    dispatch.reset()
    yield
    dispatch.reset()


def make_factors(s, r1, r2, n1, n2, m1, m2, dtype=torch.float32, requires_grad=False, scale=1.0):
    """Fresh random factor tensors in the docs/design.md §1 layout (never zeros)."""
    shapes = [(s, r1, n1), (s, r2, n2), (s, m1, r1), (s, m2, r2)]
    return [(scale * torch.randn(sh, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad) for sh in shapes]


def visible_sigma(s, r1, r2, n1, n2) -> float:
    """The factors' standard deviation at which B·A's entries (s·√(r1·r2)·σ⁴ each) are as large as those of a base
    weight drawn with std 1/√d_in: the adapter's share of every output and each factor's gradient are then of
    the result's own size, whatever the shape (fixed-size factors made it vanish below tolerances on some)."""
    return ((n1 * n2) ** -0.5 / ((r1 * r2) ** 0.5 * s)) ** 0.25


def make_layer_inputs(N, s, r1, r2, n1, n2, m1, m2, dtype=torch.float32, bias=True, lead=(), device="cpu"):
    d_in, d_out = n1 * n2, m1 * m2
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    x = cast(torch.randn(*lead, N, d_in, dtype=torch.float64))
    W = cast(torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5)
    b = cast(torch.randn(d_out, dtype=torch.float64)) if bias else None
    sigma = visible_sigma(s, r1, r2, n1, n2)
    return x, W, b, [cast(f) for f in make_factors(s, r1, r2, n1, n2, m1, m2, dtype, scale=sigma)]


def rounding_bound(x, W, b, factors, scale, g):
    """The reference evaluated on |inputs| (and |g| for the gradients): for this multilinear function it is
    Σ|terms| of every entry, the quantity a floating-point error bound scales with (error ≤ c·u·Σ|terms|).
    Returns (y, dx, [dA1, dA2, dB1, dB2]) bounds in float64."""
    from lsr_compile import reference

    xa = x.detach().double().abs().requires_grad_(True)
    fa = [f.detach().double().abs().requires_grad_(True) for f in factors]
    ya = reference.lsr_linear(xa, W.detach().double().abs(), None if b is None else b.detach().double().abs(),
                              *fa, abs(scale))
    ya.backward(g.detach().double().abs())
    return ya.detach(), xa.grad, [f.grad for f in fa]
