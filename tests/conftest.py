import os

# Triton kernels run on the CPU only in the interpreter, chosen before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_factors(s, r1, r2, n1, n2, m1, m2, dtype=torch.float32, requires_grad=False, scale=1.0):
    """Fresh random factor tensors in the SPEC §1 layout (never zeros)."""
    shapes = [(s, r1, n1), (s, r2, n2), (s, m1, r1), (s, m2, r2)]
    return [(scale * torch.randn(sh, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad) for sh in shapes]


def make_layer_inputs(N, s, r1, r2, n1, n2, m1, m2, dtype=torch.float32, bias=True, lead=()):
    d_in, d_out = n1 * n2, m1 * m2
    x = torch.randn(*lead, N, d_in, dtype=torch.float64).to(dtype)
    W = (torch.randn(d_out, d_in, dtype=torch.float64) / d_in ** 0.5).to(dtype)
    b = torch.randn(d_out, dtype=torch.float64).to(dtype) if bias else None
    return x, W, b, make_factors(s, r1, r2, n1, n2, m1, m2, dtype, scale=0.3)
