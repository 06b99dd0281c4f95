"""The PyTorch formulations of the layer (SPEC §2): the ``torch`` backend's kernels.

Each forward takes ``(x, weight, bias, A1, A2, B1, B2, scale)`` with ``x`` 2-D
``(N, d_in)``; each backward takes ``(dy, x, weight, A1, A2, B1, B2, scale,
need_dx)`` and returns ``(dx | None, dA1, dA2, dB1, dB2)``. No backward forms a
``d_out x d_in`` matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def build_A(A1: Tensor, A2: Tensor) -> Tensor:
    """``A = Σ_l A1[l] ⊗ A2[l]`` as ``(r1*r2, n1*n2)``; einsum, no Python loop over l."""
    s, r1, n1 = A1.shape
    r2, n2 = A2.shape[1:]
    return torch.einsum("lai,lbj->abij", A1, A2).reshape(r1 * r2, n1 * n2)


def build_B(B1: Tensor, B2: Tensor) -> Tensor:
    """``B = Σ_l B1[l] ⊗ B2[l]`` as ``(m1*m2, r1*r2)``."""
    s, m1, r1 = B1.shape
    m2, r2 = B2.shape[1:]
    return torch.einsum("lca,ldb->cdab", B1, B2).reshape(m1 * m2, r1 * r2)


def build_Bt(B1: Tensor, B2: Tensor) -> Tensor:
    """``Bᵀ`` as a contiguous ``(r1*r2, m1*m2)``: q-row operands make the thin products 1.5-2.5x faster
    on oneDNN/MKL here (768², N = 2048: ``(Bᵀ dyᵀ)ᵀ`` 0.45 ms against ``dy @ B`` 1.16 ms)."""
    s, m1, r1 = B1.shape
    m2, r2 = B2.shape[1:]
    return torch.einsum("lca,ldb->abcd", B1, B2).reshape(r1 * r2, m1 * m2)


def project_grads(dA_full: Tensor, dBt_full: Tensor, A1, A2, B1, B2):
    """Gradients of the four factors from those of ``A (q, d_in)`` and ``Bᵀ (q, d_out)`` (SPEC §2), e.g.
    ``dA1[l][a,i] = Σ_{b,j} dA[a·r2+b, i·n2+j] · A2[l][b,j]``."""
    r1, n1 = A1.shape[1:]
    r2, n2 = A2.shape[1:]
    m1, m2 = B1.shape[1], B2.shape[1]
    gA = dA_full.reshape(r1, r2, n1, n2)
    gB = dBt_full.reshape(r1, r2, m1, m2)
    return (
        torch.einsum("abij,lbj->lai", gA, A2),
        torch.einsum("abij,lai->lbj", gA, A1),
        torch.einsum("abcd,ldb->lca", gB, B2),
        torch.einsum("abcd,lca->ldb", gB, B1),
    )


# ---- forward variants -------------------------------------------------------------------------

def forward_materialise(x, weight, bias, A1, A2, B1, B2, scale):
    """Build A and B, then two thin matmuls added into the base GEMM's output (the reference's algorithm)."""
    A, Bt = build_A(A1, A2), build_Bt(B1, B2)
    y = F.linear(x, weight, bias)
    return y.addmm_(torch.mm(A, x.T).T, Bt, alpha=scale)


def forward_fold(x, weight, bias, A1, A2, B1, B2, scale):
    """``x (W + scale·B·A)ᵀ``: one GEMM plus a ``d_out·d_in·q`` fold; wins for large N."""
    A, B = build_A(A1, A2), build_B(B1, B2)
    return F.linear(x, torch.addmm(weight, B, A, alpha=scale), bias)


def adapter_factored(x, A1, A2, B1, B2):
    """``(x Aᵀ) Bᵀ`` without forming A or B: contractions over the Kronecker modes."""
    s, r1, n1 = A1.shape
    r2, n2 = A2.shape[1:]
    m1, m2 = B1.shape[1], B2.shape[1]
    xv = x.reshape(-1, n1, n2)
    t = torch.einsum("lNib,lai->Nab", torch.einsum("Nij,lbj->lNib", xv, A2), A1)
    z = torch.einsum("Nab,lca->lNcb", t, B1)
    return torch.einsum("lNcb,ldb->Ncd", z, B2).reshape(-1, m1 * m2)


def forward_factored(x, weight, bias, A1, A2, B1, B2, scale):
    """Base GEMM plus the factored Kronecker adapter; wins only when q is large relative to n."""
    return F.linear(x, weight, bias).add_(adapter_factored(x, A1, A2, B1, B2), alpha=scale)


# ---- backward ---------------------------------------------------------------------------------

def backward_materialise(dy, x, weight, A1, A2, B1, B2, scale, need_dx):
    """Token path: ``u = dy B``, ``t = x Aᵀ`` (kept as q-row ``uᵀ``, ``tᵀ``); ``dx = dy W + scale·u A``;
    ``dA = scale·uᵀ x``, ``dBᵀ = scale·tᵀ dy``; then the projection onto the factors."""
    A, Bt = build_A(A1, A2), build_Bt(B1, B2)
    suT = torch.mm(Bt, dy.T).mul_(scale)  # scale applied to the (q, N) operands, never to an (N, d) one
    # the adapter term first, then the GEMM accumulates onto it (beta): one pass over dx fewer than addmm_
    dx = torch.addmm(torch.mm(suT.T, A), dy, weight) if need_dx else None
    dA_full = torch.mm(suT, x)
    dBt_full = torch.mm(torch.mm(A, x.T).mul_(scale), dy)
    return (dx, *project_grads(dA_full, dBt_full, A1, A2, B1, B2))


FORWARDS = {"materialise": forward_materialise, "fold": forward_fold, "factored": forward_factored}
BACKWARDS = {"materialise": backward_materialise}
