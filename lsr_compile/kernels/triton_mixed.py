"""Triton: a mixed batch's adapters, added into the base GEMM's output (punica's SGMV, for LSR banks).

Each program takes one tile of rows inside one segment, so the whole tile meets one adapter, and one block
of output columns: ``t = x_tile A_kᵀ`` (accumulated over ``d_in``), then ``y_tile += scale_k · t Bᵀ_k``.
Tiles are laid out on the device from ``seg_indptr`` (no host synchronisation): a grid of
``S + N / BLOCK_M`` tiles bounds ``Σ ceil(len_i / BLOCK_M)``, and the spare ones return at once, as do tiles
of segments without adapter. Tiles never share rows or columns, so no atomics. A and Bᵀ are materialised
for the call, for min(K, S) slots (``segment_bank``): small beside the base GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import schedule_spaces
from ..device import space_name
from ..mixed_formulations import bank_A, bank_Bt, segment_bank
from ..problem import ProblemKey
from ..problem import DTYPES as DTYPES_TORCH
from .triton_fused import DTYPES, INTERPRETED, Resources, compile_kernel, launch_config, shared_limit

SPACE = space_name("triton", "cuda")
VARIANT = "gathered"


@triton.jit
def _mixed_lsr_kernel(
    x_ptr, a_ptr, bt_ptr, scales_ptr, y_ptr, tile_seg_ptr, tile_row_ptr, indptr_ptr, seg_adapter_ptr,
    D_IN, D_OUT, R,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_ad, stride_bk, stride_br, stride_bn, stride_ym, stride_yn,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.load(tile_seg_ptr + tile)
    if seg < 0:  # a spare tile of the bound
        return
    slot = tl.load(seg_adapter_ptr + seg)
    if slot < 0:  # rows without adapter: the base GEMM's output is already theirs
        return
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(indptr_ptr + seg + 1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
    bt = tl.load(bt_ptr + slot * stride_bk + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                 mask=(offs_r[:, None] < R) & (offs_n[None, :] < D_OUT), other=0.0)
    if UPCAST:
        bt = bt.to(ACC)
    st = (tacc * tl.load(scales_ptr + slot).to(ACC)).to(bt.dtype)
    out_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    mask = rows[:, None] & (offs_n[None, :] < D_OUT)
    acc = tl.load(out_ptrs, mask=mask, other=0.0).to(ACC)
    if IEEE:
        acc = tl.dot(st, bt, acc, input_precision="ieee", out_dtype=ACC)
    else:
        acc = tl.dot(st, bt, acc, out_dtype=ACC)
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def tiles(seg_indptr: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tile_seg, tile_row)`` for a grid of ``S + rows // block_m + 1`` tiles: each tile's segment (-1:
    spare) and first row. Device ops only."""
    S = seg_indptr.shape[0] - 1
    lens = seg_indptr[1:] - seg_indptr[:-1]
    per = (lens + block_m - 1) // block_m
    ends = per.cumsum(0)
    t = torch.arange(S + rows // block_m + 1, device=seg_indptr.device)
    seg = torch.searchsorted(ends, t, right=True)
    valid = seg < S
    segc = seg.clamp(max=max(S - 1, 0))
    row = seg_indptr[segc] + (t - (ends[segc] - per[segc])) * block_m
    return torch.where(valid, segc, -1), row


def mixed_adapter_add(y, x, A, Bt, scales, seg_indptr, seg_adapter, config: dict):
    """``y[rows of segment i] += scales[k] · (x A_kᵀ) Bᵀ_k`` for ``k = seg_adapter[i] >= 0``, in place."""
    if not (x.device.type == "cuda" or INTERPRETED):
        raise ValueError("Triton kernels need CUDA tensors; on a CPU they run only in Triton's interpreter: "
                         "start Python with TRITON_INTERPRET=1")
    if seg_adapter.shape[0] == 0 or x.shape[0] == 0:
        return y
    cfg = launch_config(config)
    tile_seg, tile_row = tiles(seg_indptr, x.shape[0], cfg["BLOCK_M"])
    args, kwargs = _launch_args(x, A, Bt, scales, y, tile_seg, tile_row, seg_indptr, seg_adapter, cfg)
    _mixed_lsr_kernel[(tile_seg.shape[0], triton.cdiv(Bt.shape[2], cfg["BLOCK_N"]))](*args, **kwargs)
    return y


def _launch_args(x, A, Bt, scales, y, tile_seg, tile_row, seg_indptr, seg_adapter, cfg):
    """The kernel's arguments: what a launch passes and what ``compile_report`` compiles."""
    args = (x, A, Bt, scales, y, tile_seg, tile_row, seg_indptr, seg_adapter, x.shape[1], Bt.shape[2], Bt.shape[1],
            x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), Bt.stride(0), Bt.stride(1),
            Bt.stride(2), y.stride(0), y.stride(1))
    kwargs = dict(IEEE=x.dtype in (torch.float32, torch.float64),
                  UPCAST=INTERPRETED and x.dtype in (torch.bfloat16, torch.float16),
                  ACC=tl.float64 if x.dtype == torch.float64 else tl.float32,
                  BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                  BLOCK_R=max(16, triton.next_power_of_2(Bt.shape[1])), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    return args, kwargs


def compile_report(key: ProblemKey, config: dict, capability: int = 90) -> Resources:
    """Compile the kernel for ``key`` (a mixed_forward key) and ``config`` for ``sm_<capability>`` without a
    GPU and read its registers, spills and shared memory."""
    f, dt = key.shapes, DTYPES_TORCH[key.dtype]
    e = lambda *s, dtype=dt: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    slots, S, N = min(key.adapters, key.segments), key.segments, key.token_bucket
    tiles_n = S + N // config["BLOCK_M"] + 1
    args, kwargs = _launch_args(e(N, f.d_in), e(slots, f.q, f.d_in), e(slots, f.q, f.d_out),
                                e(slots, dtype=torch.float64 if dt == torch.float64 else torch.float32),
                                e(N, f.d_out), e(tiles_n, dtype=torch.int64), e(tiles_n, dtype=torch.int64),
                                e(S + 1, dtype=torch.int64), e(S, dtype=torch.int64), config)
    return compile_kernel(_mixed_lsr_kernel, args, kwargs, capability)


def forward(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, config):
    y = F.linear(x, weight, bias)
    A1, A2, B1, B2, scales, seg_adapter = segment_bank(A1, A2, B1, B2, scales, seg_adapter)
    sc = scales.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return mixed_adapter_add(y, x, bank_A(A1, A2), bank_Bt(B1, B2), sc, seg_indptr, seg_adapter, config)


def default_choice(op: str, key: ProblemKey, device) -> tuple[str, dict]:
    """The dtype's default (fp32/fp64 dots run without tensor cores: small tiles); on a GPU the first point,
    default first, that neither spills nor overflows shared memory for this problem."""
    if op != "mixed_forward":
        raise ValueError(f"Triton has no {op} kernel (the PyTorch formulations serve it)")
    first = schedule_spaces.default(SPACE, op, VARIANT, key.dtype)
    if torch.device(device).type != "cuda":
        return VARIANT, first
    for cfg in [first] + schedule_spaces.space(SPACE, op, VARIANT):
        if static_problem(op, key, cfg, device) is None:
            return VARIANT, cfg
    return VARIANT, first


def candidates(op: str, key: ProblemKey) -> list[tuple[str, str, dict]]:
    if op != "mixed_forward" or key.dtype not in DTYPES:
        return []
    return [("triton", VARIANT, c) for c in schedule_spaces.space(SPACE, op, VARIANT)]


def static_problem(op: str, key: ProblemKey, config: dict, device) -> Optional[str]:
    """Why a config must be pruned before any timing on ``device`` (spills, shared memory), or None."""
    if torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    cap = major * 10 + minor
    return compile_report(key, config, cap).problem(shared_limit(cap))


def build(op: str, variant: str, config: dict, key: ProblemKey, device):
    if op != "mixed_forward" or variant != VARIANT:
        raise ValueError(f"no Triton {op} variant {variant!r}; known: mixed_forward/{VARIANT}")
    if key.dtype not in DTYPES:
        raise ValueError(f"Triton kernels support {DTYPES}, not {key.dtype}")
    return lambda x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter: forward(
        x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, config)
