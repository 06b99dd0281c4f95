"""Triton: the Kronecker parts of a step (``step.py``) on a GPU, around cuBLAS's GEMMs.

    _factors_kernel   A (q, d_in) and Bᵀ (q, d_out) from the four factors                  one launch
    _fold_kernel      W_eff = W + scale·B·A, one pass over W; from the factors (then also
                      writing A and Bᵀ) or from A and Bᵀ                                    one launch
    _dy_pass_kernel   uT = Bᵀ dyᵀ (q, N) and tT dy (q, d_out) in partial sums, one pass
                      over dy                                                               one launch
    _project_kernel   dA1, dA2, dB1, dB2 from scale·dA and scale·Σ partials                 one launch

A training step of the fold variant is then fold, GEMM | fold, GEMM, thin, dy_pass, thin, project: eight
kernels, seven when the forward keeps W_eff (``step.keep_folded_weight``). Every launch goes through
``triton_fused.launch``, where ``costmodel`` records a step instead of running it. The inner rank q is padded to 16 (what
``tl.dot`` takes); sums are fp32 (fp64 for fp64). Without a GPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, tests), where tiles are shrunk as in ``triton_fused.launch_config``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import schedule_spaces
from ..device import capability, space_name
from ..problem import DTYPES as DTYPES_TORCH, ProblemKey
from ..step import AtenParts, given
from . import triton_fused
from .triton_fused import DTYPES, Resources, compile_kernel, gpu_arguments, shared_limit
from .triton_fused import interpreted as _interpreted
from .triton_fused import launch as _launch

SPACE = space_name("triton", "cuda")
VARIANTS = ("fold", "materialise")




# ---- kernels ---------------------------------------------------------------------------------------------

@triton.jit
def _kron_tile(x1_ptr, x2_ptr, S, R2, D2, s1l, s1a, s1e, s2l, s2b, s2f, offs_k, offs_d, Q, D,
               ACC: tl.constexpr):
    """``Σ_l X1[l, k // R2, d // D2] · X2[l, k % R2, d % D2]`` for rows ``offs_k`` (< Q) and columns ``offs_d``
    (< D) of a Kronecker sum, in ACC."""
    a = offs_k // R2
    b = offs_k % R2
    e = offs_d // D2
    f = offs_d % D2
    mask = (offs_k[:, None] < Q) & (offs_d[None, :] < D)
    acc = tl.full((offs_k.shape[0], offs_d.shape[0]), 0, dtype=ACC)
    for l in range(0, S):
        v1 = tl.load(x1_ptr + l * s1l + a[:, None] * s1a + e[None, :] * s1e, mask=mask, other=0.0)
        v2 = tl.load(x2_ptr + l * s2l + b[:, None] * s2b + f[None, :] * s2f, mask=mask, other=0.0)
        acc += v1.to(ACC) * v2.to(ACC)
    return acc


@triton.jit
def _factors_kernel(a1_ptr, a2_ptr, b1_ptr, b2_ptr, a_ptr, bt_ptr,
                    S, R1, R2, N1, N2, M1, M2,
                    ACC: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    Q = R1 * R2
    d_in = N1 * N2
    tiles_a = (d_in + BLOCK_D - 1) // BLOCK_D  # not tl.cdiv: a @jit helper, interpreted under TRITON_INTERPRET
    offs_k = tl.arange(0, BLOCK_Q)
    if pid < tiles_a:  # A[k, i] = Σ_l A1[l, a, e] · A2[l, b, f]
        offs_d = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        v = _kron_tile(a1_ptr, a2_ptr, S, R2, N2, R1 * N1, N1, 1, R2 * N2, N2, 1, offs_k, offs_d, Q, d_in, ACC)
        tl.store(a_ptr + offs_k[:, None] * d_in + offs_d[None, :], v.to(a_ptr.dtype.element_ty),
                 mask=(offs_k[:, None] < Q) & (offs_d[None, :] < d_in))
    else:  # Bt[k, o] = Σ_l B1[l, c, a] · B2[l, d, b]
        d_out = M1 * M2
        offs_d = (pid - tiles_a) * BLOCK_D + tl.arange(0, BLOCK_D)
        v = _kron_tile(b1_ptr, b2_ptr, S, R2, M2, M1 * R1, 1, R1, M2 * R2, 1, R2, offs_k, offs_d, Q, d_out, ACC)
        tl.store(bt_ptr + offs_k[:, None] * d_out + offs_d[None, :], v.to(bt_ptr.dtype.element_ty),
                 mask=(offs_k[:, None] < Q) & (offs_d[None, :] < d_out))


@triton.jit
def _fold_kernel(w_ptr, out_ptr, a_ptr, bt_ptr, a1_ptr, a2_ptr, b1_ptr, b2_ptr, scale,
                 S, R1, R2, N1, N2, M1, M2,
                 stride_wo, stride_wi, stride_aq, stride_ai, stride_bq, stride_bo,
                 FROM_FACTORS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_Q: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """One (BLOCK_O, BLOCK_I) tile of ``W + scale·Bᵀᵀ A`` into a contiguous ``out``; W, A and Bᵀ at any strides
    (W's offsets in 64 bits: a 256k x 8192 weight passes 2³¹ elements); from the factors, the first tile row /
    column also writes its columns of A / Bᵀ."""
    pid_o = tl.program_id(0)
    pid_i = tl.program_id(1)
    Q = R1 * R2
    d_in = N1 * N2
    d_out = M1 * M2
    offs_k = tl.arange(0, BLOCK_Q)
    offs_o = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i.to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_a = (offs_k[:, None] < Q) & (offs_i[None, :] < d_in)
    mask_b = (offs_k[:, None] < Q) & (offs_o[None, :] < d_out)
    a_ptrs = a_ptr + offs_k[:, None] * stride_aq + offs_i[None, :] * stride_ai
    bt_ptrs = bt_ptr + offs_k[:, None] * stride_bq + offs_o[None, :] * stride_bo
    if FROM_FACTORS:
        a = _kron_tile(a1_ptr, a2_ptr, S, R2, N2, R1 * N1, N1, 1, R2 * N2, N2, 1, offs_k, offs_i, Q, d_in, ACC)
        bt = _kron_tile(b1_ptr, b2_ptr, S, R2, M2, M1 * R1, 1, R1, M2 * R2, 1, R2, offs_k, offs_o, Q, d_out, ACC)
        if pid_o == 0:
            tl.store(a_ptrs, a.to(a_ptr.dtype.element_ty), mask=mask_a)
        if pid_i == 0:
            tl.store(bt_ptrs, bt.to(bt_ptr.dtype.element_ty), mask=mask_b)
    else:
        a = tl.load(a_ptrs, mask=mask_a, other=0.0).to(ACC)
        bt = tl.load(bt_ptrs, mask=mask_b, other=0.0).to(ACC)
    delta = tl.dot(tl.trans(bt), a, input_precision=PRECISION, out_dtype=ACC)
    mask = (offs_o[:, None] < d_out) & (offs_i[None, :] < d_in)
    w = tl.load(w_ptr + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi, mask=mask, other=0.0)
    tl.store(out_ptr + offs_o[:, None] * d_in + offs_i[None, :],
             (w.to(ACC) + scale * delta).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dy_pass_kernel(dy_ptr, bt_ptr, tt_ptr, ut_ptr, part_ptr,
                    N, D, Q, ROWS,
                    stride_dyn, stride_dyd, stride_ttq, stride_ttn, stride_utq, stride_utn,
                    ACC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program p: ROWS consecutive row blocks of dy; for each, u = dy B over all columns (complete, in
    registers) and tT dy added into its own partial sum ``part[p]`` (fp32, no atomics). Row offsets are 64-bit
    (dy passes 2³¹ elements at 524,288 tokens of 4096)."""
    pid = tl.program_id(0)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d0 = tl.arange(0, BLOCK_D)
    part = part_ptr + pid.to(tl.int64) * Q * D
    for j in range(0, ROWS):
        offs_n = (pid * ROWS + j).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n < N
        t = tl.load(tt_ptr + offs_q[None, :] * stride_ttq + offs_n[:, None] * stride_ttn,
                    mask=rows[:, None] & (offs_q[None, :] < Q), other=0.0)
        if UPCAST:
            t = t.to(ACC)
        u = tl.full((BLOCK_N, BLOCK_Q), 0, dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_d0
            cols = offs_d < D
            dy = tl.load(dy_ptr + offs_n[:, None] * stride_dyn + offs_d[None, :] * stride_dyd,
                         mask=rows[:, None] & cols[None, :], other=0.0)
            bt = tl.load(bt_ptr + offs_q[:, None] * D + offs_d[None, :], mask=(offs_q[:, None] < Q) & cols[None, :],
                         other=0.0)
            if UPCAST:
                dy, bt = dy.to(ACC), bt.to(ACC)
            u = tl.dot(dy, tl.trans(bt), u, input_precision=PRECISION, out_dtype=ACC)
            contrib = tl.dot(tl.trans(t), dy, input_precision=PRECISION, out_dtype=ACC)
            pmask = (offs_q[:, None] < Q) & cols[None, :]
            pptr = part + offs_q[:, None] * D + offs_d[None, :]
            if j > 0:
                contrib += tl.load(pptr, mask=pmask, other=0.0)
            tl.store(pptr, contrib, mask=pmask)
        tl.store(ut_ptr + offs_q[None, :] * stride_utq + offs_n[:, None] * stride_utn, u.to(ut_ptr.dtype.element_ty),
                 mask=rows[:, None] & (offs_q[None, :] < Q))


@triton.jit
def _project_tile(x_ptr, y_ptr, P, y_pstride, out_ptr, S, KO, KT, J, xs_o, xs_t, ys_o, ys_t, s_j, y_base,
                  o_sl, o_sj, o_base, scale, ACC: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr, UNROLL_P: tl.constexpr):
    """``out[l, j] = scale · Σ_{o,t} X[l, o·xs_o + t·xs_t] · Σ_p Y_p[y_base + o·ys_o + t·ys_t + j·s_j]``: one
    slice of a factor gradient. The contracted pair (o, t) is two loops, the short one outside and the long one
    in tiles, so no index is divided by a runtime size (that cost local memory on sm_90). The P partial sums
    are read UNROLL_P at a time, as independent loads issued together (``tl.static_range``): a program waits
    for memory ``KO·⌈KT/BLOCK_K⌉·⌈P/UNROLL_P⌉`` times, not ``KO·⌈KT/BLOCK_K⌉·P`` (and P is at most a GPU's SM
    count, whatever N: ``dy_pass_programs``)."""
    offs_l = tl.arange(0, BLOCK_S)
    offs_j = tl.arange(0, BLOCK_J)
    row = KO * KT
    acc = tl.full((BLOCK_S, BLOCK_J), 0, dtype=ACC)
    for o in range(0, KO):
        for t0 in range(0, KT, BLOCK_K):
            tt = t0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_l[:, None] * row + o * xs_o + tt[None, :] * xs_t,
                        mask=(offs_l[:, None] < S) & (tt[None, :] < KT), other=0.0).to(ACC)
            ymask = (tt[:, None] < KT) & (offs_j[None, :] < J)
            yoff = y_base + o * ys_o + tt[:, None] * ys_t + offs_j[None, :] * s_j
            y = tl.full((BLOCK_K, BLOCK_J), 0, dtype=ACC)
            for p0 in range(0, P, UNROLL_P):
                for u in tl.static_range(UNROLL_P):
                    # the partial's index as a tile (Triton 3.9's interpreter refuses a scalar mask term)
                    live = ymask & ((p0 + u) + offs_j[None, :] * 0 < P)
                    y += tl.load(y_ptr + (p0 + u) * y_pstride + yoff, mask=live, other=0.0).to(ACC)
            acc = tl.dot(x, y, acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(out_ptr + o_base + offs_l[:, None] * o_sl + offs_j[None, :] * o_sj,
             (scale * acc).to(out_ptr.dtype.element_ty), mask=(offs_l[:, None] < S) & (offs_j[None, :] < J))


@triton.jit
def _project_kernel(da_ptr, dbt_ptr, P, a1_ptr, a2_ptr, b1_ptr, b2_ptr, da1_ptr, da2_ptr, db1_ptr, db2_ptr, scale,
                    S, R1, R2, N1, N2, M1, M2,
                    ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_J: tl.constexpr, UNROLL_P: tl.constexpr):
    """Program e < n1: dA1[:, :, e]; then dA2[:, :, f], dB1[:, c, :], dB2[:, d, :] (docs/design.md §2)."""
    pid = tl.program_id(0)
    d_in = N1 * N2
    d_out = M1 * M2
    if pid < N1 + N2:  # one call site per side: the branches only pick the slice's pointers and strides
        if pid < N1:  # dA1[l,a,e] = Σ_{b,f} A2[l,b,f] · dA[a·r2+b, e·n2+f]
            e = pid
            x_ptr, out_ptr, KO, KT, J, xs_o, xs_t = a2_ptr, da1_ptr, R2, N2, R1, N2, 1
            ys_o, ys_t, s_j, y_base, o_sl, o_sj, o_base = d_in, 1, R2 * d_in, e * N2, R1 * N1, N1, e
        else:  # dA2[l,b,f] = Σ_{a,e} A1[l,a,e] · dA[a·r2+b, e·n2+f]
            f = pid - N1
            x_ptr, out_ptr, KO, KT, J, xs_o, xs_t = a1_ptr, da2_ptr, R1, N1, R2, N1, 1
            ys_o, ys_t, s_j, y_base, o_sl, o_sj, o_base = R2 * d_in, N2, d_in, f, R2 * N2, N2, f
        _project_tile(x_ptr, da_ptr, 1, 0, out_ptr, S, KO, KT, J, xs_o, xs_t, ys_o, ys_t, s_j, y_base, o_sl, o_sj,
                      o_base, scale, ACC, PRECISION, BLOCK_S, BLOCK_K, BLOCK_J, 1)
    else:
        if pid < N1 + N2 + M1:  # dB1[l,c,a] = Σ_{d,b} B2[l,d,b] · dBt[a·r2+b, c·m2+d]
            c = pid - N1 - N2
            x_ptr, out_ptr, KO, KT, J, xs_o, xs_t = b2_ptr, db1_ptr, R2, M2, R1, 1, R2
            ys_o, ys_t, s_j, y_base, o_sl, o_sj, o_base = d_out, 1, R2 * d_out, c * M2, M1 * R1, 1, c * R1
        else:  # dB2[l,d,b] = Σ_{c,a} B1[l,c,a] · dBt[a·r2+b, c·m2+d]
            d = pid - N1 - N2 - M1
            x_ptr, out_ptr, KO, KT, J, xs_o, xs_t = b1_ptr, db2_ptr, R1, M1, R2, 1, R1
            ys_o, ys_t, s_j, y_base, o_sl, o_sj, o_base = R2 * d_out, M2, d_out, d, M2 * R2, 1, d * R2
        _project_tile(x_ptr, dbt_ptr, P, R1 * R2 * d_out, out_ptr, S, KO, KT, J, xs_o, xs_t, ys_o, ys_t, s_j,
                      y_base, o_sl, o_sj, o_base, scale, ACC, PRECISION, BLOCK_S, BLOCK_K, BLOCK_J, UNROLL_P)


# ---- launchers -------------------------------------------------------------------------------------------

def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype: torch.dtype) -> str:
    """fp32 sums of fp32 operands without tf32; bf16/fp16 operands on tensor cores."""
    return "ieee" if dtype in (torch.float32, torch.float64) or _interpreted() else "tf32"


def _shrink(block: int) -> int:
    """The interpreter runs tiles as numpy arrays: a quarter of the config's (at least 16)."""
    return max(16, block // 4) if _interpreted() else block


def _dims(A1, A2, B1, B2):
    s, r1, n1 = A1.shape
    r2, n2 = A2.shape[1:]
    return s, r1, r2, n1, n2, B1.shape[1], B2.shape[1]


DEFAULT = {"fold_block_o": 64, "fold_block_i": 128, "fold_warps": 4,
           "dy_block_n": 64, "dy_block_d": 128, "dy_rows": 1, "dy_warps": 4, "dy_stages": 2}
# The projection's K step: 16 never spilled on sm_90 in any dtype or size tried; 32 did for some (ptxas held
# bf16 4096² at 40 registers with 8 B of stack, fp64 at 64 with 32 B), 64 for fp32 (255 registers). Its work,
# s·q·(d_in + d_out), is too small for the tile to matter; what costs is waiting for memory, once per
# PROJECT_UNROLL_P partial sums read together.
PROJECT_BLOCK_K = 16
PROJECT_UNROLL_P = 32


def dy_pass_programs(n: int, config: dict, device) -> tuple[int, int]:
    """(programs, row blocks per program) of the pass over dy for ``n`` rows: at least ``dy_rows`` row blocks a
    program, and never more programs than fill the GPU once (``machine_programs``: its SMs). Each program
    writes one fp32 partial sum of ``tᵀ dy`` (q x d_out) that the projection adds up, so the partials' bytes
    and the projection's work per program stop growing with N there (at N = 8192, 64-row blocks: 128
    programs; at N = 131072, 132 on an H200, 16 row blocks each)."""
    blocks = triton.cdiv(n, _shrink(config["dy_block_n"]))
    programs = min(triton.cdiv(blocks, config["dy_rows"]), triton_fused.machine_programs(torch.device(device)))
    rows = triton.cdiv(blocks, max(programs, 1))
    return triton.cdiv(blocks, rows) if blocks else 0, rows


class TritonParts(AtenParts):
    """The parts as the kernels above, with one config (``schedules/triton_cuda.json``: the fold and
    materialise variants); ``y += scale·tᵀBᵀ`` is cuBLAS's addmm in place."""

    functional = False

    def __init__(self, config: Optional[dict] = None):
        self.config = {**DEFAULT, **(config or {})}

    def factors(self, A1, A2, B1, B2):
        A1, A2, B1, B2 = (t.contiguous() for t in (A1, A2, B1, B2))
        s, r1, r2, n1, n2, m1, m2 = _dims(A1, A2, B1, B2)
        A = A1.new_empty(r1 * r2, n1 * n2)
        Bt = A1.new_empty(r1 * r2, m1 * m2)
        block = _shrink(128)
        grid = (triton.cdiv(n1 * n2, block) + triton.cdiv(m1 * m2, block),)
        _launch(_factors_kernel, grid, (A1, A2, B1, B2, A, Bt, s, r1, r2, n1, n2, m1, m2),
                dict(ACC=_acc(A1.dtype), BLOCK_Q=_pad(r1 * r2), BLOCK_D=block, num_warps=4))
        return A, Bt

    def _fold(self, W, A, Bt, scale, factors=None):
        """From ``factors`` when given (then A and Bt are written), else from A and Bt; W, A and Bt at any
        strides (a column-major Bᵀ is ``B.t()`` of a contiguous B), the result contiguous."""
        if factors is not None:
            A1, A2, B1, B2 = (t.contiguous() for t in factors)
            s, r1, r2, n1, n2, m1, m2 = _dims(A1, A2, B1, B2)
        else:  # the sizes as one-term "Kronecker" dims: only q, d_in, d_out matter
            A1 = A2 = B1 = B2 = A
            (q, d_in), d_out = A.shape, Bt.shape[1]
            s, r1, r2, n1, n2, m1, m2 = 0, q, 1, d_in, 1, d_out, 1
        out = torch.empty(W.shape, device=W.device, dtype=W.dtype)
        c = self.config
        bo, bi = _shrink(c["fold_block_o"]), _shrink(c["fold_block_i"])
        grid = (triton.cdiv(m1 * m2, bo), triton.cdiv(n1 * n2, bi))
        _launch(_fold_kernel, grid, (W, out, A, Bt, A1, A2, B1, B2, float(scale), s, r1, r2, n1, n2, m1, m2,
                                     W.stride(0), W.stride(1), A.stride(0), A.stride(1), Bt.stride(0), Bt.stride(1)),
                dict(FROM_FACTORS=factors is not None, ACC=_acc(W.dtype), PRECISION=_precision(W.dtype),
                     BLOCK_Q=_pad(r1 * r2), BLOCK_O=bo, BLOCK_I=bi, num_warps=c["fold_warps"]))
        return out

    def fold(self, W, A, Bt, scale):
        if W.dtype == torch.float64:  # a float argument reaches a kernel as fp32: keep fp64's scale exact
            return self._fold(W, A, Bt * scale, 1.0)
        return self._fold(W, A, Bt, scale)

    def fold_factors(self, W, A1, A2, B1, B2, scale):
        if W.dtype == torch.float64:
            A, Bt = self.factors(A1, A2, B1, B2)
            return self.fold(W, A, Bt, scale), A, Bt
        s, r1, r2, n1, n2, m1, m2 = _dims(A1, A2, B1, B2)
        A = A1.new_empty(r1 * r2, n1 * n2)
        Bt = A1.new_empty(r1 * r2, m1 * m2)
        return self._fold(W, A, Bt, scale, (A1, A2, B1, B2)), A, Bt

    def dy_pass(self, dy, Bt, tT):
        Bt = Bt.contiguous()
        n, d = dy.shape
        q = Bt.shape[0]
        c = self.config
        bn, bd = _shrink(c["dy_block_n"]), _shrink(c["dy_block_d"])
        programs, rows = dy_pass_programs(n, c, dy.device)
        uT = dy.new_empty(q, n)
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        part = torch.empty(programs, q, d, device=dy.device, dtype=acc)
        _launch(_dy_pass_kernel, (programs,),
                (dy, Bt, tT, uT, part, n, d, q, rows, dy.stride(0), dy.stride(1), tT.stride(0), tT.stride(1),
                 uT.stride(0), uT.stride(1)),
                dict(ACC=_acc(dy.dtype), UPCAST=_interpreted() and dy.dtype in (torch.bfloat16, torch.float16),
                     PRECISION=_precision(dy.dtype), BLOCK_Q=_pad(q), BLOCK_N=bn, BLOCK_D=bd,
                     num_warps=c["dy_warps"], num_stages=c["dy_stages"]))
        return uT, part

    def project(self, dA, dBt, A1, A2, B1, B2, scale):
        dA, dBt, A1, A2, B1, B2 = (t.contiguous() for t in (dA, dBt, A1, A2, B1, B2))
        s, r1, r2, n1, n2, m1, m2 = _dims(A1, A2, B1, B2)
        grads = [torch.empty_like(t) for t in (A1, A2, B1, B2)]
        if A1.dtype == torch.float64:  # a float argument reaches a kernel as fp32
            dA, dBt, scale = dA * scale, dBt * scale, 1.0
        _launch(_project_kernel, (n1 + n2 + m1 + m2,),
                (dA, dBt, dBt.shape[0], A1, A2, B1, B2, *grads, float(scale), s, r1, r2, n1, n2, m1, m2),
                dict(ACC=_acc(A1.dtype), PRECISION="ieee", BLOCK_S=_pad(s), BLOCK_K=PROJECT_BLOCK_K,
                     BLOCK_J=_pad(max(r1, r2)), UNROLL_P=PROJECT_UNROLL_P, num_warps=4))
        return tuple(grads)

    def addmm(self, c, a, b, beta=1.0, alpha=1.0):
        return c.addmm_(a, b, beta=beta, alpha=alpha)


# ---- the variants, their configs and their resources ------------------------------------------------------

# the fused GEMM (triton_fused) as a step variant: the base GEMM and the adapter's token path in one kernel

def fused_forward(x, weight, bias, A1, A2, B1, B2, scale, config):
    """y and tT = A xᵀ from the fused kernel (x read once); A and Bt from the factors kernel."""
    A, Bt = TritonParts().factors(A1, A2, B1, B2)
    y, t = triton_fused.fused_linear(x, weight, bias, A, Bt.t(), scale, config, want_t=True)
    return y, A, Bt, t.t(), None


def fused_backward(dy, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx, config):
    """dx and uT = Bᵀ dyᵀ from the fused kernel (its K-loop reads Bᵀ K-contiguous); then the factor
    gradients: tT dy (cuBLAS), uT x, and the projection kernel."""
    from ..step import given
    if need_dx:
        dx, u = triton_fused.fused_linear(dy, weight.t(), None, Bt, A.t(), scale, config, want_t=True)
        uT = u.t()
    else:
        dx, uT = None, torch.mm(Bt, dy.t())
    if not given(tT):
        tT = torch.mm(A, x.t())
    grads = TritonParts().project(torch.mm(uT, x), torch.mm(tT, dy).unsqueeze(0), A1, A2, B1, B2, scale)
    return (dx, *grads)



def build(op: str, variant: str, config: dict, key: ProblemKey, device):
    """A step variant (``step.FORWARDS`` / ``BACKWARDS``) with these kernels for its parts, or the fused GEMM."""
    from .. import step

    if key.dtype not in DTYPES:
        raise ValueError(f"Triton kernels support {DTYPES}, not {key.dtype}")
    if variant == "fused":
        fn = fused_forward if op == "forward" else fused_backward
        return lambda *args: fn(*args, config)
    table = step.FORWARDS if op == "forward" else step.BACKWARDS
    if variant not in VARIANTS or variant not in table:
        raise ValueError(f"no Triton {op} variant {variant!r}; known: {sorted(set(VARIANTS) & set(table)) + ['fused']}")
    return step.bind(table[variant], TritonParts(config))


def candidates(op: str, key: ProblemKey) -> list[tuple[str, str, dict]]:
    if key.dtype not in DTYPES:
        return []
    return [("triton", v, c) for v in schedule_spaces.variants(SPACE, op) if v in VARIANTS
            for c in schedule_spaces.space(SPACE, op, v)]


def default_config(op: str, variant: str, key: Optional[ProblemKey], device="cpu") -> dict:
    """The dtype's default; on a GPU the first point, default first, whose kernels fit this very problem."""
    first = schedule_spaces.default(SPACE, op, variant, key.dtype if key is not None else None)
    if key is None or torch.device(device).type != "cuda":
        return first
    return fitting_config(op, variant, key, capability(device))


def fitting_config(op: str, variant: str, key: ProblemKey, capability: int) -> dict:
    """The first point, the dtype's default first, whose kernels compile for ``sm_<capability>`` without
    spilling or overflowing shared memory for ``key`` (unaligned sizes need smaller tiles)."""
    first = schedule_spaces.default(SPACE, op, variant, key.dtype)
    for cfg in [first] + schedule_spaces.space(SPACE, op, variant):
        reports = compile_reports(op, variant, key, cfg, capability)
        if all(r.problem(shared_limit(capability)) is None for r in reports.values()):
            return cfg
    return first


def example_args(op: str, key: ProblemKey, device="meta", keep_folded: bool = False) -> tuple:
    """Arguments of the ``op`` kernels for ``key`` (meta: no memory). A backward gets what a fold forward
    saves (A, Bt; W_eff only with ``keep_folded``), so it launches every kernel it can."""
    f, dt = key.shapes, DTYPES_TORCH[key.dtype]
    e = lambda *s: torch.empty(*s, device=device, dtype=dt)  # noqa: E731
    n = key.token_bucket
    factors = [e(*sz) for sz in f.factor_sizes().values()]
    if op == "forward":
        return (e(n, f.d_in), e(f.d_out, f.d_in), e(f.d_out), *factors, 0.7)
    w_eff = e(f.d_out, f.d_in) if keep_folded else None
    return (e(n, f.d_out), e(n, f.d_in), e(f.d_out, f.d_in), *factors, e(f.q, f.d_in), e(f.q, f.d_out), None,
            w_eff, 0.7, True)


def launches(fn, *args) -> list[tuple]:
    """(kernel, grid, args, meta) of every Triton launch ``fn(*args)`` makes, none of them run."""
    from . import triton_fused

    seen = []
    old, triton_fused.recorder = triton_fused.recorder, lambda *launch: seen.append(launch)
    try:
        fn(*args)
    finally:
        triton_fused.recorder = old
    return seen


def compile_reports(op: str, variant: str, key: ProblemKey, config: dict, capability: int = 90) -> dict[str, Resources]:
    """Every kernel the variant launches for ``key``, compiled for ``sm_<capability>`` (no GPU needed)."""
    return dict(_reports(op, variant, key, tuple(sorted(config.items())), capability))


@functools.lru_cache(maxsize=256)
def _reports(op, variant, key, config_items, capability):
    fn = build(op, variant, dict(config_items), key, "meta")
    out = []
    with gpu_arguments():
        found = launches(fn, *example_args(op, key))
    for kernel, grid, args, meta in found:
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        out.append((name, compile_kernel(kernel, args, dict(meta), capability)))
    return tuple(out)


