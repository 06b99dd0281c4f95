"""Triton: a mixed batch's adapters, added into the base GEMM's output (punica's SGMV, for LSR banks).

Each program takes one tile of rows inside one segment, so the whole tile meets one adapter: ``t = x_tile
A_kᵀ`` (accumulated over ``d_in``) once, then ``y_tile += scale_k · t Bᵀ_k`` for each block of output columns
in its share. A program finds its tile from ``seg_indptr`` on the device (segment i has ``ceil(len_i /
BLOCK_M)`` tiles, in order; no host synchronisation, no tile table built by ATen calls): a grid of ``S + N /
BLOCK_M + 1`` tiles bounds ``Σ ceil(len_i / BLOCK_M)``, and the spare ones return at once, as do tiles of
segments without adapter. The columns are split over as few programs as fill the GPU (``column_groups``): one
per tile at serving sizes, so x is read once and ``x A_kᵀ`` computed once per tile (split over every column
block, as before, ``x`` was read ``d_out / BLOCK_N`` times, as costly as the base GEMM at 4096²). Tiles never
share rows or columns, so no atomics. A and Bᵀ are materialised for the call, for min(K, S) slots: small
beside the base GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import schedule_spaces
from ..device import capability, space_name
from ..mixed_formulations import bank_A, bank_Bt
from ..problem import ProblemKey
from ..problem import DTYPES as DTYPES_TORCH
from .triton_fused import (DTYPES, INTERPRETED, Resources, _add, _max, compile_kernel, interpreted, launch,
                           launch_config, machine_programs, shared_limit)

SPACE = space_name("triton", "cuda")
VARIANT = "gathered"
SEGMENT_BLOCK = 256  # segments a program reads at once when it looks for its tile


@triton.jit
def _tile_of(tile, indptr_ptr, stride_ip, S, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """(segment, first row) of row tile ``tile`` when segment i has ``ceil(len_i / BLOCK_M)`` tiles, in order;
    segment -1 past the last tile. Reads seg_indptr BLOCK_S segments at a time."""
    zero = tile.to(tl.int64) * 0
    seg = zero - 1
    row0 = zero
    base = zero
    for s0 in range(0, S, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        valid = offs < S
        lo = tl.load(indptr_ptr + offs * stride_ip, mask=valid, other=0)
        hi = tl.load(indptr_ptr + (offs + 1) * stride_ip, mask=valid, other=0)
        per = tl.where(valid, tl.maximum(hi - lo + BLOCK_M - 1, 0) // BLOCK_M, 0)
        ends = tl.associative_scan(per, 0, _add) + base  # the tile after each segment's last
        hit = (ends > tile) & (ends - per <= tile)
        seg = tl.maximum(seg, tl.reduce(tl.where(hit, offs.to(tl.int64), -1), 0, _max))
        row0 += tl.reduce(tl.where(hit, lo + (tile - (ends - per)) * BLOCK_M, 0), 0, _add)
        base += tl.reduce(per, 0, _add)
    return seg, row0


@triton.jit
def _mixed_lsr_kernel(
    x_ptr, a_ptr, bt_ptr, scales_ptr, y_ptr, indptr_ptr, seg_adapter_ptr,
    S, D_IN, D_OUT, R, COLS,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_ad, stride_bk, stride_br, stride_bn, stride_ym, stride_yn,
    stride_sc, stride_ip, stride_sa,
    BY_SEGMENT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Program (tile, g): the tile's ``t = x A_kᵀ`` once, then column blocks ``g·COLS`` to ``(g+1)·COLS - 1``.
    ``BY_SEGMENT``: the bank holds one slot per segment (slot = segment), else ``seg_adapter`` names it. Row
    offsets are 64-bit (seg_indptr's int64: x and y pass 2³¹ elements at 524,288 tokens of 4096)."""
    tile = tl.program_id(0)
    group = tl.program_id(1)
    seg, row0 = _tile_of(tile, indptr_ptr, stride_ip, S, BLOCK_M, BLOCK_S)
    if seg < 0:  # a spare tile of the bound
        return
    slot = tl.load(seg_adapter_ptr + seg * stride_sa)
    if slot < 0:  # rows without adapter: the base GEMM's output is already theirs
        return
    if BY_SEGMENT:
        slot = seg
    row_end = tl.load(indptr_ptr + (seg + 1) * stride_ip)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = offs_m < row_end
    a_base = a_ptr + slot * stride_ak
    tacc = tl.full((BLOCK_M, BLOCK_R), 0, dtype=ACC)
    for k0 in range(0, D_IN, BLOCK_K):
        kk = k0 + offs_k
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=rows[:, None] & (kk[None, :] < D_IN), other=0.0)
        at = tl.load(a_base + kk[:, None] * stride_ad + offs_r[None, :] * stride_ar,
                     mask=(kk[:, None] < D_IN) & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            xt, at = xt.to(ACC), at.to(ACC)
        if IEEE:
            tacc = tl.dot(xt, at, tacc, input_precision="ieee", out_dtype=ACC)
        else:
            tacc = tl.dot(xt, at, tacc, out_dtype=ACC)
    # as the fused kernel's epilogue: t unscaled in the operand dtype, the scale applied in ACC (scale·t in fp16
    # overflowed with a large alpha)
    scale = tl.load(scales_ptr + slot * stride_sc).to(ACC)
    if UPCAST:
        st = tacc
    else:
        st = tacc.to(bt_ptr.dtype.element_ty)
    if scale != 0.0:
        inv = 1.0 / scale
        for j in range(0, COLS):
            offs_n = (group * COLS + j) * BLOCK_N + tl.arange(0, BLOCK_N)
            bt = tl.load(bt_ptr + slot * stride_bk + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                         mask=(offs_r[:, None] < R) & (offs_n[None, :] < D_OUT), other=0.0)
            if UPCAST:
                bt = bt.to(ACC)
            out_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
            mask = rows[:, None] & (offs_n[None, :] < D_OUT)
            acc = tl.load(out_ptrs, mask=mask, other=0.0).to(ACC) * inv
            if IEEE:
                acc = tl.dot(st, bt, acc, input_precision="ieee", out_dtype=ACC)
            else:
                acc = tl.dot(st, bt, acc, out_dtype=ACC)
            tl.store(out_ptrs, (acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def tile_count(segments: int, rows: int, block_m: int) -> int:
    """The grid's row tiles: ``S + rows // block_m + 1`` bounds ``Σ ceil(len_i / block_m)``."""
    return segments + rows // block_m + 1


def column_groups(tiles: int, n_blocks: int, programs: int) -> int:
    """How many programs share a row tile's column blocks: one where the tiles alone fill the GPU (``programs``:
    its SMs), so ``x A_kᵀ`` is computed once per tile; more, up to one per column block, for a few tiles
    (decoding), where ``x`` is small and idle SMs cost more than computing ``x A_kᵀ`` again."""
    return max(1, min(n_blocks, -(-programs // max(tiles, 1))))


def mixed_adapter_add(y, x, A, Bt, scales, seg_indptr, seg_adapter, config: dict, by_segment: bool = False):
    """``y[rows of segment i] += scales[k] · (x A_kᵀ) Bᵀ_k`` for ``k = seg_adapter[i] >= 0`` (``by_segment``:
    ``k = i``, the bank holding one slot per segment), in place."""
    if not (x.device.type == "cuda" or INTERPRETED):
        raise ValueError("Triton kernels need CUDA tensors; on a CPU they run only in Triton's interpreter: "
                         "start Python with TRITON_INTERPRET=1")
    if seg_adapter.shape[0] == 0 or x.shape[0] == 0:
        return y
    key = (x.shape, x.stride(), A.shape, A.stride(), Bt.shape, Bt.stride(), y.stride(), scales.stride(),
           seg_indptr.stride(), seg_adapter.shape, seg_adapter.stride(), x.dtype, x.device, by_segment,
           tuple(config.items()), interpreted())
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) > 4096:
            _plans.clear()
        plan = _plans[key] = _plan(x, A, Bt, y, scales, seg_indptr, seg_adapter, launch_config(config), by_segment)
    launch(_mixed_lsr_kernel, plan.grid, (x, A, Bt, scales, y, seg_indptr, seg_adapter) + plan.scalars, plan.meta)
    return y


_plans: dict = {}


@dataclass(frozen=True)
class _Plan:
    grid: tuple
    scalars: tuple  # sizes and strides, after the tensors
    meta: dict


def _plan(x, A, Bt, y, scales, seg_indptr, seg_adapter, cfg, by_segment: bool) -> _Plan:
    """The launch for one signature (shapes, strides, dtype, device, config): what ``compile_report`` compiles."""
    S, (N, d_in), (_, r, d_out) = seg_adapter.shape[0], x.shape, Bt.shape
    tiles = tile_count(S, N, cfg["BLOCK_M"])
    n_blocks = triton.cdiv(d_out, cfg["BLOCK_N"])
    groups = column_groups(tiles, n_blocks, machine_programs(x.device))
    cols = triton.cdiv(n_blocks, groups)
    scalars = (S, d_in, d_out, r, cols, x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2),
               Bt.stride(0), Bt.stride(1), Bt.stride(2), y.stride(0), y.stride(1), scales.stride(0),
               seg_indptr.stride(0), seg_adapter.stride(0))
    meta = dict(BY_SEGMENT=by_segment, IEEE=x.dtype in (torch.float32, torch.float64),
                UPCAST=interpreted() and x.dtype in (torch.bfloat16, torch.float16),
                ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                BLOCK_R=max(16, triton.next_power_of_2(r)),
                BLOCK_S=min(SEGMENT_BLOCK, triton.next_power_of_2(max(S, 1))), num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    return _Plan((tiles, triton.cdiv(n_blocks, cols)), scalars, meta)


def compile_report(key: ProblemKey, config: dict, capability: int = 90) -> Resources:
    """Compile the kernel for ``key`` (a mixed_forward key) and ``config`` for ``sm_<capability>`` without a
    GPU and read its registers, spills and shared memory."""
    f, dt = key.shapes, DTYPES_TORCH[key.dtype]
    e = lambda *s, dtype=dt: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    slots, S, N = min(key.adapters, key.segments), key.segments, key.token_bucket
    x, A, Bt, y = e(N, f.d_in), e(slots, f.q, f.d_in), e(slots, f.q, f.d_out), e(N, f.d_out)
    scales = e(slots, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    ptr, seg = e(S + 1, dtype=torch.int64), e(S, dtype=torch.int64)
    plan = _plan(x, A, Bt, y, scales, ptr, seg, config, key.segments < key.adapters)
    return compile_kernel(_mixed_lsr_kernel, (x, A, Bt, scales, y, ptr, seg) + plan.scalars, plan.meta, capability)


def forward(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, config):
    """The base GEMM, then the adapters added in place. Fewer segments than slots: the bank is gathered to
    one slot per segment (the kernel then reads slot i for segment i), so A and Bᵀ are formed S times, not K."""
    y = F.linear(x, weight, bias)
    by_segment = seg_adapter.shape[0] < A1.shape[0]
    if by_segment:
        slot = seg_adapter.clamp(min=0)
        A1, A2, B1, B2, scales = A1[slot], A2[slot], B1[slot], B2[slot], scales[slot]
    sc = scales.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return mixed_adapter_add(y, x, bank_A(A1, A2), bank_Bt(B1, B2), sc, seg_indptr, seg_adapter, config, by_segment)


def default_choice(op: str, key: ProblemKey, device) -> tuple[str, dict]:
    """The dtype's default (fp32/fp64 dots run without tensor cores: small tiles); on a GPU the first point,
    default first, that neither spills nor overflows shared memory for this problem."""
    if op != "mixed_forward":
        raise ValueError(f"Triton has no {op} kernel (the PyTorch formulations serve it)")
    first = schedule_spaces.default(SPACE, op, VARIANT, key.dtype)
    cap = capability(device)
    if cap is None:
        return VARIANT, first
    for cfg in [first] + schedule_spaces.space(SPACE, op, VARIANT):
        if compile_report(key, cfg, cap).problem(shared_limit(cap)) is None:
            return VARIANT, cfg
    return VARIANT, first


def candidates(op: str, key: ProblemKey) -> list[tuple[str, str, dict]]:
    if op != "mixed_forward" or key.dtype not in DTYPES:
        return []
    return [("triton", VARIANT, c) for c in schedule_spaces.space(SPACE, op, VARIANT)]




def build(op: str, variant: str, config: dict, key: ProblemKey, device):
    if op != "mixed_forward" or variant != VARIANT:
        raise ValueError(f"no Triton {op} variant {variant!r}; known: mixed_forward/{VARIANT}")
    if key.dtype not in DTYPES:
        raise ValueError(f"Triton kernels support {DTYPES}, not {key.dtype}")
    return lambda x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter: forward(
        x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, config)
