"""The plain-PyTorch ground truth of docs/design.md §1: materialise A and B with torch.kron, two thin matmuls.

Every kernel in the project is checked against ``lsr_linear``. It is written
for clarity, not speed: it is what the method's public reference code computes
for the same four factor tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def kron_sum(P: Tensor, Q: Tensor) -> Tensor:
    """``Σ_l kron(P[l], Q[l])`` for ``P (s, a, b)``, ``Q (s, c, d)`` -> ``(a*c, b*d)``."""
    return sum(torch.kron(P[l], Q[l]) for l in range(P.shape[0]))


def materialise(A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor) -> tuple[Tensor, Tensor]:
    """The full factors ``A (q, d_in)`` and ``B (d_out, q)``."""
    return kron_sum(A1, A2), kron_sum(B1, B2)


def delta_weight(A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor, scale: float) -> Tensor:
    """``ΔW = scale · B · A``, shape ``(d_out, d_in)``."""
    A, B = materialise(A1, A2, B1, B2)
    return scale * (B @ A)


def lsr_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A1: Tensor,
    A2: Tensor,
    B1: Tensor,
    B2: Tensor,
    scale: float,
) -> Tensor:
    """``y = x Wᵀ + bias + scale · (x Aᵀ) Bᵀ`` for ``x (..., d_in)`` -> ``(..., d_out)``."""
    A, B = materialise(A1, A2, B1, B2)
    return torch.nn.functional.linear(x, weight, bias) + scale * ((x @ A.T) @ B.T)
