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


def make_layer_inputs(N, s, r1, r2, n1, n2, m1, m2, dtype=torch.float32, bias=True, lead=(), device="cpu"):
    d_in, d_out = n1 * n2, m1 * m2
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    x = cast(torch.randn(*lead, N, d_in, dtype=torch.float64))
    W = cast(torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5)
    b = cast(torch.randn(d_out, dtype=torch.float64)) if bias else None
    return x, W, b, [cast(f) for f in make_factors(s, r1, r2, n1, n2, m1, m2, dtype, scale=0.3)]
