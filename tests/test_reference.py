"""The ground truth matches the method's public reference code for the same tensors."""
import torch

from lsr_compile import reference
from lsr_compile.formulations import build_A, build_B


def reference_code_forward(x, W, b, lora_A1, lora_A2, lora_B1, lora_B2, alpha, r):
    """A transcription of the method's reference forward: loop of torch.kron, scale alpha / r."""
    A = torch.zeros(lora_A1.shape[1] * lora_A2.shape[1], lora_A1.shape[2] * lora_A2.shape[2], dtype=x.dtype)
    B = torch.zeros(lora_B1.shape[1] * lora_B2.shape[1], lora_B1.shape[2] * lora_B2.shape[2], dtype=x.dtype)
    for i in range(lora_A1.shape[0]):
        A = A + torch.kron(lora_A1[i], lora_A2[i])
        B = B + torch.kron(lora_B1[i], lora_B2[i])
    return x @ W.T + b + (x @ A.T @ B.T) * (alpha / r)


def test_matches_reference_code_layout_and_scale():
    s, r, n1, n2, m1, m2 = 3, 2, 4, 6, 5, 3
    A1, A2 = torch.randn(s, r, n1, dtype=torch.float64), torch.randn(s, r, n2, dtype=torch.float64)
    B1, B2 = torch.randn(s, m1, r, dtype=torch.float64), torch.randn(s, m2, r, dtype=torch.float64)
    x, W, b = torch.randn(7, n1 * n2, dtype=torch.float64), torch.randn(m1 * m2, n1 * n2,
                                                                        dtype=torch.float64), torch.randn(m1 * m2,
                                                                                                          dtype=torch.float64)
    alpha = 16.0
    want = reference_code_forward(x, W, b, A1, A2, B1, B2, alpha, r)
    got = reference.lsr_linear(x, W, b, A1, A2, B1, B2, alpha / r)
    torch.testing.assert_close(got, want)


def test_kron_convention_pairs_feature_index():
    # feature i*n2 + j of x pairs with A1[:, :, i] and A2[:, :, j] (docs/design.md §1)
    A1, A2 = torch.randn(1, 2, 3, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    A = reference.kron_sum(A1, A2)
    a, b, i, j = 1, 0, 2, 3
    assert A[a * 2 + b, i * 4 + j] == A1[0, a, i] * A2[0, b, j]


def test_formulation_builders_equal_kron():
    A1, A2 = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 4, 7, dtype=torch.float64)
    B1, B2 = torch.randn(3, 6, 2, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(build_A(A1, A2), reference.kron_sum(A1, A2))
    torch.testing.assert_close(build_B(B1, B2), reference.kron_sum(B1, B2))
