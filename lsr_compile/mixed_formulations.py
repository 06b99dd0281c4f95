"""A mixed batch: many LSR adapters of one structure over one frozen layer, each row with its own adapter
(or none). The assignment, the bank layout and the PyTorch formulations (the ``torch`` backend's kernels for
``lsr::mixed_linear``; docs/design.md §6).

**Bank**: the K adapters' factors stacked on a leading axis, ``A1 (K, s, r1, n1)``, ``A2 (K, s, r2, n2)``,
``B1 (K, s, m1, r1)``, ``B2 (K, s, m2, r2)``, and ``scales (K,)`` (float32).

**Assignment: segments of contiguous rows**, ``seg_indptr (S+1,)`` (int64, rows ``seg_indptr[i]`` to
``seg_indptr[i+1]``) and ``seg_adapter (S,)`` (int64 bank slot, ``-1``: the base alone). A segment may be
empty, and adapters may repeat across segments in any order. Segments because a serving batch and peft's
per-sample ``adapter_names`` are both runs of rows (a request's or a sample's tokens): S is the number of
requests, tiny beside the token count, known on the host without reading the GPU, and a kernel can tile
inside a segment so one tile meets one adapter (as punica's SGMV and SGLang's ``seg_indptr`` do). A
per-row index converts with ``segments_from_index`` (run-length encoding) and back with ``row_index``.

Forward formulations take ``(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)``; backward
ones ``(dy, x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, need_dx)`` and return
``(dx | None, dA1, dA2, dB1, dB2)`` (zero for adapters no row used).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .formulations import factor_grads, project_grads


# ---- the assignment ---------------------------------------------------------------------------------------

def row_index(seg_indptr: Tensor, seg_adapter: Tensor, rows: int) -> Tensor:
    """The bank slot of every row (``-1``: none), ``(rows,)``; no host synchronisation."""
    return torch.repeat_interleave(seg_adapter, seg_indptr[1:] - seg_indptr[:-1], output_size=rows)


def segments_from_index(index: Tensor) -> tuple[Tensor, Tensor]:
    """``(seg_indptr, seg_adapter)`` of a per-row index: one segment per run of equal values."""
    if not isinstance(index, Tensor) or index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(f"a per-row index must be an integer tensor of bank slots (-1: none), got "
                         f"{index.dtype if isinstance(index, Tensor) else type(index).__name__}: a float index "
                         f"would be truncated to slots it does not name")
    index = index.reshape(-1).to(torch.int64)
    if index.numel() == 0:
        return torch.zeros(1, dtype=torch.int64, device=index.device), index
    vals, counts = torch.unique_consecutive(index, return_counts=True)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]), vals


def segments_of(lengths, adapters, device=None) -> tuple[Tensor, Tensor]:
    """Segments from Python lists: ``lengths[i]`` rows use bank slot ``adapters[i]`` (-1: none)."""
    if len(lengths) != len(adapters):
        raise ValueError(f"{len(lengths)} segment lengths but {len(adapters)} adapters")
    ptr = [0]
    for n in lengths:
        ptr.append(ptr[-1] + int(n))
    return (torch.tensor(ptr, dtype=torch.int64, device=device),
            torch.tensor(list(adapters), dtype=torch.int64, device=device))


# ---- isolation ------------------------------------------------------------------------------------------------
# A row's result depends on its own slot only. Formulations that gather per row read *some* slot for rows
# without an adapter (-1); what they read there is discarded with ``torch.where``, never multiplied by a 0/1
# mask (a NaN or inf in that slot times 0 is NaN), and their sums over rows go to a spare slot K that is
# dropped, so a base-only row's values never reach slot 0's gradients either.

def _own_rows(idx: Tensor, per_row: Tensor) -> Tensor:
    """``per_row`` where the row has an adapter, exact zeros elsewhere (whatever the gathered slot held)."""
    keep = (idx >= 0).view(-1, *([1] * (per_row.dim() - 1)))
    return torch.where(keep, per_row, per_row.new_zeros(()))


def _spare_slot(idx: Tensor, K: int) -> Tensor:
    """Rows' slots for a per-slot sum, rows without an adapter sent to slot K (dropped afterwards)."""
    return torch.where(idx >= 0, idx, K)


# ---- the bank, materialised ---------------------------------------------------------------------------------

def _bank_kron(X1: Tensor, X2: Tensor) -> Tensor:
    """``P[k, (p, u), (c, v)] = Σ_l X1[k, l, p, u] · X2[k, l, c, v]`` as ``(K, p, u, c, v)``."""
    K, s, p, u = X1.shape
    c, v = X2.shape[2:]
    return torch.bmm(X1.reshape(K, s, p * u).transpose(1, 2), X2.reshape(K, s, c * v)).view(K, p, u, c, v)


def bank_A(A1: Tensor, A2: Tensor) -> Tensor:
    """Every slot's ``A = Σ_l A1[l] ⊗ A2[l]``, ``(K, r1·r2, n1·n2)``."""
    P = _bank_kron(A1, A2)
    K, r1, n1, r2, n2 = P.shape
    return P.permute(0, 1, 3, 2, 4).reshape(K, r1 * r2, n1 * n2)


def bank_Bt(B1: Tensor, B2: Tensor) -> Tensor:
    """Every slot's ``Bᵀ``, ``(K, r1·r2, m1·m2)``."""
    P = _bank_kron(B1, B2)
    K, m1, r1, m2, r2 = P.shape
    return P.permute(0, 2, 4, 1, 3).reshape(K, r1 * r2, m1 * m2)


def segment_bank(A1, A2, B1, B2, scales, seg_adapter):
    """When there are fewer segments than slots: a bank of one slot per segment (its adapter's factors) and
    the segments renumbered to it, so a kernel that materialises its bank forms S adapters, not K. Device
    ops only (no host synchronisation); unchanged when S >= K."""
    S, K = seg_adapter.shape[0], A1.shape[0]
    if S >= K:
        return A1, A2, B1, B2, scales, seg_adapter
    slot = seg_adapter.clamp(min=0)
    own = torch.where(seg_adapter >= 0, torch.arange(S, device=seg_adapter.device), seg_adapter)
    return A1[slot], A2[slot], B1[slot], B2[slot], scales[slot], own


def _groups(seg_indptr: Tensor, seg_adapter: Tensor) -> dict[int, Tensor]:
    """Bank slot -> the rows that use it (host side: reads the assignment once)."""
    ptr, ads = seg_indptr.tolist(), seg_adapter.tolist()
    rows: dict[int, list[Tensor]] = {}
    for i, k in enumerate(ads):
        if k >= 0 and ptr[i + 1] > ptr[i]:
            rows.setdefault(k, []).append(torch.arange(ptr[i], ptr[i + 1], device=seg_indptr.device))
    return {k: torch.cat(r) if len(r) > 1 else r[0] for k, r in rows.items()}


def _contiguous(groups_rows: Tensor):
    """A slice when the rows are one contiguous run (no gather/scatter copy), else the index tensor."""
    first, last = int(groups_rows[0]), int(groups_rows[-1])
    return slice(first, last + 1) if last - first + 1 == groups_rows.numel() else groups_rows


# ---- forward -----------------------------------------------------------------------------------------------

def forward_loop(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
    """Base GEMM, then per adapter in use: its rows, its A and Bᵀ, two thin products added in place. What a
    user would write; only the adapters in use are materialised."""
    y = F.linear(x, weight, bias)
    sc = scales.tolist()
    for k, rows in _groups(seg_indptr, seg_adapter).items():
        A = bank_A(A1[k:k + 1], A2[k:k + 1])[0]
        Bt = bank_Bt(B1[k:k + 1], B2[k:k + 1])[0]
        r = _contiguous(rows)
        if isinstance(r, slice):
            y[r].addmm_(torch.mm(x[r], A.T), Bt, alpha=sc[k])
        else:
            y.index_add_(0, r, torch.mm(torch.mm(x[r], A.T), Bt), alpha=sc[k])
    return y


def forward_gathered(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
    """Punica's BGMV in PyTorch: the whole bank materialised, each row's A and Bᵀ gathered, batched
    matrix-vector products. No host synchronisation; memory N·q·(d_in + d_out)."""
    idx = row_index(seg_indptr, seg_adapter, x.shape[0])
    slot = idx.clamp(min=0)
    A, Bt = bank_A(A1, A2), bank_Bt(B1, B2)
    t = torch.bmm(A[slot], x.unsqueeze(2))  # (N, q, 1)
    w = scales.to(x.dtype)[slot].view(-1, 1, 1)
    return F.linear(x, weight, bias) + _own_rows(idx, torch.bmm((t * w).transpose(1, 2), Bt[slot]).squeeze(1))


def adapter_factored_rows(x, A1g, A2g, B1g, B2g):
    """``(x_i A_iᵀ) B_iᵀ`` per row from per-row factors (N, s, ...), contracting the Kronecker modes: neither A
    nor B is formed, and a row reads s·(r1·n1 + r2·n2 + m1·r1 + m2·r2) factor numbers instead of q·(d_in + d_out)."""
    N, s, r1, n1 = A1g.shape
    n2 = A2g.shape[3]
    xv = x.reshape(N, n1, n2)
    t = torch.einsum("Nlaj,Nlbj->Nab", torch.einsum("Nlai,Nij->Nlaj", A1g, xv), A2g)
    w = torch.einsum("Nlca,Nab->Nlcb", B1g, t)
    return torch.einsum("Nlcb,Nldb->Ncd", w, B2g).reshape(N, -1)


def adapter_rows(x, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
    """Every row's adapter update alone (zero for rows with none), by ``adapter_factored_rows``: what runs
    beside a quantized base, whose GEMM its own library computes. No host synchronisation."""
    idx = row_index(seg_indptr, seg_adapter, x.shape[0])
    slot = idx.clamp(min=0)
    w = scales.to(x.dtype)[slot].unsqueeze(1)
    return _own_rows(idx, adapter_factored_rows(x, A1[slot], A2[slot], B1[slot], B2[slot]) * w)


def forward_factored(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
    """Each row gathers its adapter's factors and contracts the Kronecker modes (what an LSR-native kernel
    expands on chip): no host synchronisation, nothing LoRA-sized formed."""
    return F.linear(x, weight, bias) + adapter_rows(x, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)


# ---- backward ----------------------------------------------------------------------------------------------

def backward_loop(dy, x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, need_dx):
    """Per adapter in use: the single-adapter backward on its rows (q-row operands, then the projection)."""
    dx = torch.mm(dy, weight) if need_dx else None
    grads = [torch.zeros_like(t) for t in (A1, A2, B1, B2)]
    sc = scales.tolist()
    for k, rows in _groups(seg_indptr, seg_adapter).items():
        r = _contiguous(rows)
        xk, dyk = x[r], dy[r]
        f = (A1[k], A2[k], B1[k], B2[k])
        A, Bt = bank_A(A1[k:k + 1], A2[k:k + 1])[0], bank_Bt(B1[k:k + 1], B2[k:k + 1])[0]
        suT = torch.mm(Bt, dyk.T).mul(sc[k])
        if need_dx:
            if isinstance(r, slice):
                dx[r].addmm_(suT.T, A)
            else:
                dx.index_add_(0, r, torch.mm(suT.T, A))
        for g, gk in zip(grads, factor_grads(suT, dyk, xk, A, *f, sc[k])):
            g[k] = gk
    return (dx, *grads)


def backward_gathered(dy, x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, need_dx):
    """Row-gathered like ``forward_gathered``: per-row products, per-slot sums with ``index_add``, then every
    slot's projection at once (``vmap``). No host synchronisation."""
    idx = row_index(seg_indptr, seg_adapter, x.shape[0])
    slot = idx.clamp(min=0)
    A, Bt = bank_A(A1, A2), bank_Bt(B1, B2)
    w = scales.to(x.dtype)[slot].unsqueeze(1)
    su = torch.bmm(Bt[slot], dy.unsqueeze(2)).squeeze(2) * w  # (N, q): scale·(dy B) per row
    t = torch.bmm(A[slot], x.unsqueeze(2)).squeeze(2) * w  # (N, q): scale·(x Aᵀ) per row
    dx = torch.addmm(_own_rows(idx, torch.bmm(su.unsqueeze(1), A[slot]).squeeze(1)), dy, weight) if need_dx else None
    K = A1.shape[0]
    dA = torch.zeros(K + 1, *A.shape[1:], dtype=x.dtype, device=x.device)
    dBt = torch.zeros(K + 1, *Bt.shape[1:], dtype=x.dtype, device=x.device)
    spare = _spare_slot(idx, K)
    dA.index_add_(0, spare, su.unsqueeze(2) * x.unsqueeze(1))
    dBt.index_add_(0, spare, t.unsqueeze(2) * dy.unsqueeze(1))
    return (dx, *torch.func.vmap(project_grads)(dA[:K], dBt[:K], A1, A2, B1, B2))


FORWARDS = {"loop": forward_loop, "gathered": forward_gathered, "factored": forward_factored}
BACKWARDS = {"loop": backward_loop, "gathered": backward_gathered}


def mixed_linear(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
    """The mixed-batch layer for 2-D ``x``, differentiable by autograd (the plain-PyTorch path)."""
    return forward_loop(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)
