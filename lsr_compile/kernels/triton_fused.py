"""Triton: the fused LSR layer. One kernel serves the forward and the input gradient:

    out = a @ Mᵀ + bias + scale · (a @ Pᵀ) @ Qᵀ          (t = a @ Pᵀ optionally written out)

    forward : a = x,  M = W  (d_out, d_in),  P = A  (q, d_in),  Q = B  (d_out, q)   -> y,  t = x Aᵀ
    backward: a = dy, M = Wᵀ (d_in, d_out),  P = Bᵀ (q, d_out), Q = Aᵀ (d_in, q)    -> dx, u = dy B

x is read once: ``a @ Pᵀ`` is accumulated in the base GEMM's K-loop (as wide as the rank, ``rank_block``) and
``t Qᵀ`` added in the epilogue. The pointer kernel computes ``a @ Pᵀ`` again for every column tile of a row
block; the persistent TMA kernel only for the first tile of each of its programs' row blocks (``wave_shape``). Transposes are strides, never copies; P is K-contiguous in both directions (A and Bᵀ as
built by the factors kernel), so its loads pipeline. The factor gradients (``uᵀ x``, ``tᵀ dy``, then the
Kronecker projections, ``triton_parts``) are q-wide; no d_out x d_in matrix is formed (docs/design.md §2).

Without a GPU the kernel runs in Triton's interpreter: correct and slow, for
tests. The interpreter must be chosen before anything imports triton (torch and
transformers may), so it is the process's environment: ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import MISSING as dataclass_missing
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import schedule_spaces
from ..device import capability, space_name
from ..problem import DTYPES as DTYPES_TORCH, ProblemKey
from .cubin import resource_usage

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
recorder = None  # costmodel sets a callable(kernel, grid, args, meta): launches are recorded instead of run
_gpu_arguments = False  # launches take a GPU's arguments even in the interpreter (``gpu_arguments``)


@contextlib.contextmanager
def gpu_arguments():
    """Inside: launches get the arguments a GPU would (full tiles, no upcast), even in Triton's interpreter,
    for compiling and pricing them; they must not run there."""
    global _gpu_arguments
    old, _gpu_arguments = _gpu_arguments, True
    try:
        yield
    finally:
        _gpu_arguments = old


def interpreted() -> bool:
    """Launches run in Triton's interpreter (shrunk tiles, upcast half precision) rather than on a GPU."""
    return INTERPRETED and not _gpu_arguments


def launch(kernel, grid, args: tuple, meta: dict) -> None:
    """Every Triton launch of the package goes through here (``costmodel`` records a step by it). A CUDA
    launch runs under its tensors' device guard: Triton launches on the *current* device and that device's
    current stream, so a layer on cuda:1 while cuda:0 is current (a model spread over GPUs) would otherwise
    fail ("Pointer argument cannot be accessed") or, with peer access, run unordered against cuda:1's stream."""
    if recorder is not None:
        recorder(kernel, grid, args, meta)
        return
    device = device_of(args)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def device_of(args) -> Optional[torch.device]:
    """The device of the first tensor among ``args`` (a TMA descriptor's tensor is its base)."""
    for a in args:
        a = getattr(a, "base", a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


SPACE = space_name("triton", "cuda")
DTYPES = tuple(schedule_spaces.dtypes(SPACE))
KNOBS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# TMA: 1 = the persistent kernel with TMA descriptors (Hopper and later; 16-byte-aligned rows), 0 or absent = pointers


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b: exact fp32/fp64 products where asked (no tf32), tensor cores otherwise; out_dtype is given
    explicitly (Triton 3.6 defaults it to float32 whatever the accumulator)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    return tl.dot(a, b, acc, out_dtype=ACC)


@triton.jit
def _add(a, b):
    """Combine functions for ``tl.reduce`` / ``tl.associative_scan``: ``tl.sum`` and ``tl.max`` are @jit helpers,
    which ahead-of-time compilation under TRITON_INTERPRET=1 cannot call (see ``tl.full`` below)."""
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add_adapter(acc, tacc, qm, scale, IEEE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """acc + scale · tacc @ qm, once per output tile. The K-loop's ``x Aᵀ`` is only as wide as the rank
    (``rank_block``: 8 for q ≤ 8, and that dot runs every K step), but this dot's K must be ≥ 16: an 8-wide
    ``tacc`` gets 8 zero columns here, against ``qm``'s rows beyond the rank, loaded as zeros.

    The scale never meets the operand dtype: the dot takes ``t`` as the backward gets it (rounded once to the
    operand dtype, unscaled) and accumulates into ``acc / scale``, and the sum is scaled back in the
    accumulator's dtype, ``scale·(acc/scale + t qm)``, as ATen applies alpha in fp32. Rounding ``scale·t`` to
    fp16 overflowed to inf with a large alpha (30000/√8: every output of a test tile) where the result was
    finite (``acc / scale`` and back costs two fp32 roundings of acc, 1e-7 relative)."""
    st = tacc.to(qm.dtype)
    if BLOCK_R < 16:
        st = tl.reshape(tl.permute(tl.join(st, tl.full((BLOCK_M, BLOCK_R), 0, st.dtype)), (0, 2, 1)),
                        (BLOCK_M, 2 * BLOCK_R))
    if scale != 0.0:
        acc = _dot(st, qm, acc * (1.0 / scale), IEEE, ACC) * scale
    return acc


@triton.jit
def _fused_lsr_kernel(
    # pointers (bias_ptr / t_ptr are None when HAS_BIAS / WRITE_T are off: no pointer is passed twice)
    a_ptr, m_ptr, bias_ptr, p_ptr, q_ptr, out_ptr, t_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_am, stride_ak, stride_mn, stride_mk, stride_pr, stride_pk, stride_qn, stride_qr,
    stride_om, stride_on, stride_tm, stride_tr, stride_b,
    scale,
    # meta
    HAS_BIAS: tl.constexpr, WRITE_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_in_group = GROUP_M * num_pid_n
    group_id = pid // num_in_group
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_size)
    pid_n = (pid % num_in_group) // group_size

    # 64-bit offsets: a row index times a row stride passes 2³¹ at N·d = 2³¹ (524,288 tokens at d = 4096), and
    # int32 arithmetic wraps there; so do W's (a 256k x 8192 weight) and a column-major operand's
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    # tl.full, not tl.zeros: zeros is a @jit helper, which under TRITON_INTERPRET=1 is an interpreted function
    # that leaves triton.language patched when ahead-of-time compilation calls it (compile_report)
    acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=ACC)
    tacc = tl.full((BLOCK_M, BLOCK_R), 0, dtype=ACC)
    # out_dtype is given explicitly: Triton 3.6 defaults it to float32 whatever the accumulator
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(m_ptr + kk[:, None] * stride_mk + offs_n[None, :] * stride_mn,
                    mask=(kk[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        p = tl.load(p_ptr + kk[:, None] * stride_pk + offs_r[None, :] * stride_pr,
                    mask=(kk[:, None] < K) & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            a, w, p = a.to(ACC), w.to(ACC), p.to(ACC)
        acc = _dot(a, w, acc, IEEE, ACC)
        tacc = _dot(a, p, tacc, IEEE, ACC)
    offs_rq = tl.arange(0, 2 * BLOCK_R if BLOCK_R < 16 else BLOCK_R)
    qm = tl.load(q_ptr + offs_rq[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                 mask=(offs_rq[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    if UPCAST:
        qm = qm.to(ACC)
    # the adapter term accumulates into acc (no second BLOCK_M x BLOCK_N tile: that one spilled)
    acc = _add_adapter(acc, tacc, qm, scale, IEEE, ACC, BLOCK_M, BLOCK_R)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * stride_b, mask=offs_n < N, other=0.0)
        acc += b[None, :].to(ACC)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_T:
        if pid_n == 0:
            tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                     tacc.to(t_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def _tma_k_loop(a_desc, m_desc, p_desc, om, on, K, acc, tacc, with_t, M_KMAJOR: tl.constexpr, UPCAST: tl.constexpr,
                IEEE: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """One output tile's K-loop by TMA, accumulating ``x Aᵀ`` into tacc too when ``with_t``: two loops, so the
    one without it has no branch to pipeline around."""
    if with_t:
        for k0 in range(0, K, BLOCK_K):
            a, w = _tma_tiles(a_desc, m_desc, om, on, k0, M_KMAJOR, UPCAST, ACC)
            p = p_desc.load([0, k0]).T
            if UPCAST:
                p = p.to(ACC)
            acc = _dot(a, w, acc, IEEE, ACC)
            tacc = _dot(a, p, tacc, IEEE, ACC)
    else:
        for k0 in range(0, K, BLOCK_K):
            a, w = _tma_tiles(a_desc, m_desc, om, on, k0, M_KMAJOR, UPCAST, ACC)
            acc = _dot(a, w, acc, IEEE, ACC)
    return acc, tacc


@triton.jit
def _tma_tiles(a_desc, m_desc, om, on, k0, M_KMAJOR: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """The K step's tiles of a and of the weight, as a (K, N) operand."""
    a = a_desc.load([om, k0])
    if M_KMAJOR:  # the forward's W (d_out, d_in): a K-major tile, transposed in shared memory
        w = m_desc.load([on, k0]).T
    else:  # the backward's Wᵀ: W's own (d_out, d_in) rows are (K, N) tiles
        w = m_desc.load([k0, on])
    if UPCAST:
        a, w = a.to(ACC), w.to(ACC)
    return a, w


@triton.jit
def _fused_lsr_tma_kernel(
    # TMA descriptors (Hopper's tensor memory accelerator: a tile per instruction, bounds zero-filled in
    # hardware, no address arithmetic or masks in the K-loop); bias and t stay pointers (t may be < 16 B wide)
    a_desc, m_desc, bias_ptr, p_desc, q_desc, out_desc, t_ptr,
    M, N, K, R,
    stride_tm, stride_tr, stride_b,
    scale,
    wave_m, wave_n,
    HAS_BIAS: tl.constexpr, WRITE_T: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ACC: tl.constexpr, M_KMAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The fused layer as a persistent kernel of ``wave_m · wave_n`` programs (at most one per SM). A wave
    covers a rectangle of ``wave_m`` row blocks by ``wave_n`` column blocks (``wave_shape``: small enough to
    stay in L2); the next wave moves right by ``wave_n`` columns over the same rows, so a program keeps its
    row block and computes ``x Aᵀ`` for it once, in its first tile, instead of once per column tile."""
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: a @jit helper (see tl.full above)
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    pid_n0 = tl.program_id(0) % wave_n
    offs_r = tl.arange(0, BLOCK_R)
    for row_wave in range(0, (num_pid_m + wave_m - 1) // wave_m):
        pid_m = row_wave * wave_m + tl.program_id(0) // wave_n
        om = pid_m * BLOCK_M
        tacc = tl.full((BLOCK_M, BLOCK_R), 0, dtype=ACC)
        for col_wave in range(0, (num_pid_n + wave_n - 1) // wave_n):
            pid_n = col_wave * wave_n + pid_n0
            on = pid_n * BLOCK_N
            if (pid_m < num_pid_m) & (pid_n < num_pid_n):
                acc = tl.full((BLOCK_M, BLOCK_N), 0, dtype=ACC)
                # x Aᵀ only in this row block's first tile; the later ones reuse tacc
                acc, tacc = _tma_k_loop(a_desc, m_desc, p_desc, om, on, K, acc, tacc, col_wave == 0, M_KMAJOR,
                                        UPCAST, IEEE, ACC, BLOCK_K)
                if WRITE_T:
                    if (col_wave == 0) & (pid_n0 == 0):
                        offs_m = om.to(tl.int64) + tl.arange(0, BLOCK_M)  # t (N, q): past 2³¹ at 2²⁸ tokens
                        tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                                 tacc.to(t_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
                qm = q_desc.load([0, on])
                if UPCAST:
                    qm = qm.to(ACC)
                acc = _add_adapter(acc, tacc, qm, scale, IEEE, ACC, BLOCK_M, BLOCK_R)
                if HAS_BIAS:
                    offs_n = on + tl.arange(0, BLOCK_N)
                    b = tl.load(bias_ptr + offs_n * stride_b, mask=offs_n < N, other=0.0)
                    acc += b[None, :].to(ACC)
                out_desc.store([om, on], acc.to(out_desc.dtype))


def _check(a, Mt, P, Q):
    tensors = {"a": a, "M": Mt, "P": P, "Q": Q}
    dev = {t.device for t in tensors.values()}
    if len(dev) > 1:
        raise ValueError(f"fused_linear: tensors on different devices {dev}")
    if next(iter(dev)).type != "cuda" and not INTERPRETED:
        raise ValueError("Triton kernels need CUDA tensors; on a CPU they run only in Triton's interpreter: "
                         "start Python with TRITON_INTERPRET=1")
    if str(a.dtype).removeprefix("torch.") not in DTYPES:
        raise ValueError(f"fused_linear supports {DTYPES}, got {a.dtype}")
    (_, k_), (n_, k2), (r_, k3), (n2, r2) = a.shape, Mt.shape, P.shape, Q.shape
    if not (k_ == k2 == k3 and n_ == n2 and r_ == r2):
        raise ValueError(f"fused_linear: shapes do not chain: a {tuple(a.shape)}, M {tuple(Mt.shape)}, "
                         f"P {tuple(P.shape)}, Q {tuple(Q.shape)}")


def launch_config(config: dict) -> dict:
    """The config a launch uses. The interpreter runs a tile as numpy arrays, so there each block is a
    quarter of the config's (at least 16, what ``tl.dot`` takes): tile shapes, their ratios and grouping keep
    varying with the config, so tests on a CPU exercise every tuned point at a size the interpreter runs fast."""
    if not interpreted():
        return config
    return {k: max(16, v // 4) if k.startswith("BLOCK_") else v for k, v in config.items()}


def fused_linear(a, Mt, bias, P, Q, scale: float, config: dict, want_t: bool = False):
    """``a Mᵀ + bias + scale·(a Pᵀ) Qᵀ`` (and ``a Pᵀ``) for 2-D ``a (m, k)``, ``Mt (n, k)``, ``P (r, k)``,
    ``Q (n, r)``, any strides; fp32 accumulation (fp64 for fp64). A config with ``TMA: 1`` runs the
    persistent TMA kernel where the operands allow it (``tma_ready``), else the same tiles with pointers.

    What depends only on shapes, strides, dtypes, the device and the config (the checks, the kernel's
    constexprs, grid, strides, the persistent launch's wave and its descriptors' layout) is worked out once
    per signature (``_plan``); a call allocates its outputs and builds its arguments."""
    if a.dtype == torch.float64:  # a float argument reaches the kernel as fp32: keep fp64's scale exact
        Q, scale = Q * scale, 1.0
    tma = bool(config.get("TMA")) and _bases_aligned(a, Mt, P, Q)
    key = (a.shape, a.stride(), Mt.shape, Mt.stride(), P.shape, P.stride(), Q.shape, Q.stride(), a.dtype,
           a.device, Mt.device, P.device, Q.device,
           None if bias is None else (bias.stride(0), bias.device), want_t, tma, tuple(config.items()),
           _gpu_arguments)
    plan = _plans.get(key)
    if plan is None:
        _check(a, Mt, P, Q)
        if len(_plans) > 4096:
            _plans.clear()
        plan = _plans[key] = _plan(a, Mt, bias, P, Q, launch_config(config), want_t, tma)
    args = plan.args(a, Mt, bias, P, Q, scale)
    launch(plan.kernel, plan.grid, args, plan.meta)
    out, t = args[5], args[6]
    if plan.tma:
        out = out.base
    return (out, t) if want_t else out


_plans: dict = {}  # fused_linear's launch plans by signature


def rank_block(r: int) -> int:
    """Columns of the K-loop's ``x Aᵀ`` tile: the rank rounded up to a power of two, at least 8 (the
    narrowest tensor-core tile, m16n8 / wgmma n8); every K step pays this width again."""
    return max(8, triton.next_power_of_2(r))


def _meta(a, r: int, cfg: dict, want_t: bool) -> dict:
    """The constexprs and launch options both kernels take."""
    return dict(
        HAS_BIAS=None, WRITE_T=want_t, IEEE=a.dtype in (torch.float32, torch.float64),
        UPCAST=interpreted() and a.dtype in (torch.bfloat16, torch.float16),
        ACC=tl.float64 if a.dtype == torch.float64 else tl.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=rank_block(r), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


@dataclass(frozen=True)
class _Plan:
    """One signature's launch: kernel, grid, constexprs, and how a call's arguments are laid out."""

    kernel: object
    grid: tuple
    meta: dict
    tma: bool
    m: int
    n: int
    k: int
    r: int
    strides: tuple  # the pointer kernel's strides (a, M, P, Q, out, t, bias); the TMA kernel's (t, bias)
    descs: tuple = ()  # the TMA kernel's (shape, strides, block) of a, M (or Mᵀ), P, Qᵀ, out
    wave: tuple = ()  # the TMA kernel's (wave_m, wave_n)

    def args(self, a, Mt, bias, P, Q, scale) -> tuple:
        out = torch.empty((self.m, self.n), device=a.device, dtype=a.dtype)
        t = torch.empty((self.m, self.r), device=a.device, dtype=a.dtype) if self.meta["WRITE_T"] else None
        if self.tma:
            (sa, sm, sp, sq, so) = self.descs
            return ((_descriptor(a, *sa), _descriptor(Mt if self.meta["M_KMAJOR"] else Mt.t(), *sm), bias,
                     _descriptor(P, *sp), _descriptor(Q.t(), *sq), _descriptor(out, *so), t,
                     self.m, self.n, self.k, self.r) + self.strides + (float(scale),) + self.wave)
        return (a, Mt, bias, P, Q, out, t, self.m, self.n, self.k, self.r) + self.strides + (float(scale),)


def _plan(a, Mt, bias, P, Q, cfg: dict, want_t: bool, tma: bool) -> _Plan:
    """The launch for these operands' signature (``tma``: the persistent TMA kernel, where ``tma_ready``)."""
    m, k = a.shape
    n, r = Mt.shape[0], P.shape[0]
    st = (r, 1) if want_t else (0, 0)  # t is allocated contiguous
    sb = (bias.stride(0),) if bias is not None else (0,)
    meta = _meta(a, r, cfg, want_t) | dict(HAS_BIAS=bias is not None)
    if tma and tma_ready(a, Mt, P, Q):
        bm, bn, bk, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], rank_block(r)
        kmajor = Mt.stride(-1) == 1
        mt = Mt if kmajor else Mt.t()
        layouts = ((a, [bm, bk]), (mt, [bn, bk] if kmajor else [bk, bn]), (P, [br, bk]), (Q.t(), [max(16, br), bn]))
        for t_, block in layouts:  # validated once here; a call builds its descriptors without the checks
            TensorDescriptor.from_tensor(t_, block)
        descs = tuple((tuple(t_.shape), tuple(t_.stride()), block) for t_, block in layouts) + (
            ((m, n), (n, 1), [bm, bn]),)
        wave = _wave(m, n, k, bm, bn, br, a.element_size(), a.device)
        return _Plan(_fused_lsr_tma_kernel, (wave[0] * wave[1],), meta | dict(M_KMAJOR=kmajor), True, m, n, k, r,
                     st + sb, descs, wave)
    strides = (a.stride(0), a.stride(1), Mt.stride(0), Mt.stride(1), P.stride(0), P.stride(1), Q.stride(0),
               Q.stride(1), n, 1) + st + sb
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    return _Plan(_fused_lsr_kernel, grid, meta | dict(GROUP_M=cfg["GROUP_M"]), False, m, n, k, r, strides)


_DESCRIPTOR_FIELDS = {f.name: f.default for f in dataclass_fields(TensorDescriptor)
                      if f.default is not dataclass_missing}


def _descriptor(t, shape, strides, block) -> TensorDescriptor:
    """``TensorDescriptor.from_tensor(t, block)`` without its checks, which ``_plan`` ran once for this layout
    (the base's alignment is checked per call, ``_bases_aligned``)."""
    d = object.__new__(TensorDescriptor)
    d.__dict__.update(_DESCRIPTOR_FIELDS, base=t, shape=list(shape), strides=list(strides), block_shape=block)
    return d


def _launch_args(a, Mt, bias, P, Q, scale, cfg, want_t):
    """The pointer kernel's arguments for one call: what ``compile_report`` compiles."""
    plan = _plan(a, Mt, bias, P, Q, cfg, want_t, tma=False)
    return plan.args(a, Mt, bias, P, Q, scale), plan.meta, plan.grid


# ---- the persistent TMA kernel's host side ---------------------------------------------------------------

H200_SMS = 132  # the programs of a persistent launch compiled or priced without a GPU (the H200's SMs)
H200_L2 = 50 * 2**20  # and the L2 its waves are sized for (bytes)


def _rows_aligned(t) -> bool:
    """A TMA descriptor needs a 16-byte-aligned base, unit last stride and 16-byte-aligned row strides."""
    return (t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
            and (_data_ptr(t) % 16 == 0))


def _bases_aligned(*ts) -> bool:
    """The per-call part of ``tma_ready``: every base 16-byte aligned (a view may start anywhere)."""
    return all(_data_ptr(t) % 16 == 0 for t in ts)


def _data_ptr(t) -> int:
    """The tensor's address; 0 for a fake tensor, which has none (as Triton's own descriptor check treats it)."""
    if type(t).__name__ in ("FakeTensor", "FunctionalTensor"):
        return 0
    return t.data_ptr()


def tma_ready(a, Mt, P, Q) -> bool:
    """The operands as TMA descriptors take them: rows of a, P (K-contiguous), Qᵀ and W (either orientation of
    ``Mt``) 16-byte aligned, and the output's rows too; ragged sizes run the pointer kernel, and so do empty
    operands (a descriptor needs every dimension positive)."""
    mt = Mt if Mt.stride(-1) == 1 else Mt.t()
    n = Mt.shape[0]
    return (a.numel() > 0 and mt.numel() > 0 and P.numel() > 0
            and all(_rows_aligned(t) for t in (a, mt, P, Q.t())) and (n * a.element_size()) % 16 == 0
            and a.dtype != torch.float64)


def tma_problem_fits(key: ProblemKey) -> bool:
    """``tma_ready`` for the operands the step passes for ``key`` (contiguous, so sizes decide)."""
    f, item = key.shapes, DTYPES_TORCH[key.dtype].itemsize
    return key.dtype != "float64" and all((d * item) % 16 == 0 for d in (f.d_in, f.d_out))


def _machine(device: torch.device) -> tuple[int, int]:
    """(programs, L2 bytes) of a persistent launch: one program per SM on a GPU; without one the H200's,
    except in the interpreter, where three programs make each walk several tiles."""
    if device.type == "cuda":
        return _cuda_machine(device)
    return (3 if interpreted() and device.type == "cpu" else H200_SMS), H200_L2


@functools.lru_cache(maxsize=None)
def _cuda_machine(device: torch.device) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.L2_cache_size


def machine_programs(device: torch.device) -> int:
    """Programs that fill ``device`` once (its SMs; the H200's without a GPU, three in the interpreter)."""
    return _machine(device)[0]


def _wave(m, n, k, bm, bn, br, item, device) -> tuple[int, int]:
    programs, l2 = _machine(device)
    return wave_shape(triton.cdiv(m, bm), triton.cdiv(n, bn), programs, bm * k * item, bn * k * item, l2, br / bn)


@functools.lru_cache(maxsize=4096)
def wave_shape(m_blocks: int, n_blocks: int, programs: int, row_bytes: int, col_bytes: int, l2_bytes: int,
               t_share: float) -> tuple[int, int]:
    """The persistent launch's wave: ``(wave_m, wave_n)`` row by column blocks worked on at once, one program
    each. Counted in tile-times, a launch takes ``⌈m_blocks / wave_m⌉`` row waves of ``⌈n_blocks / wave_n⌉``
    tiles, the first of which is longer by ``t_share`` (its ``x Aᵀ``): narrow waves compute ``x Aᵀ`` fewer
    times, but a wave's operands (``row_bytes`` of ``a`` per row block, ``col_bytes`` of ``M`` per column
    block, over the whole K) must fit half the L2, so that the next column wave finds its rows there. The
    fastest fitting wave, the smaller footprint among equals; if none fits, the smallest footprint."""
    best = None
    for wn in range(1, min(n_blocks, programs) + 1):
        wm = min(m_blocks, programs // wn)
        foot = wm * row_bytes + wn * col_bytes
        tile_times = -(-m_blocks // wm) * (-(-n_blocks // wn) + t_share)
        rank = (0, tile_times, foot) if 2 * foot <= l2_bytes else (1, foot, tile_times)
        if best is None or rank < best[0]:
            best = rank, (wm, wn)
    return best[1]


def _tma_launch_args(a, Mt, bias, P, Q, scale, cfg, want_t):
    """The persistent TMA kernel's arguments for one call (operands ``tma_ready``)."""
    plan = _plan(a, Mt, bias, P, Q, cfg, want_t, tma=True)
    assert plan.tma, "operands not TMA-ready"
    return plan.args(a, Mt, bias, P, Q, scale), plan.meta, plan.grid


def _operands(op, key: ProblemKey, device="meta"):
    """Tensors laid out exactly as ``forward``/``backward`` pass them (meta: no memory), for compiling."""
    f, dt = key.shapes, DTYPES_TORCH[key.dtype]
    e = lambda *s: torch.empty(*s, device=device, dtype=dt)  # noqa: E731
    x, W, A, Bt = e(key.token_bucket, f.d_in), e(f.d_out, f.d_in), e(f.q, f.d_in), e(f.q, f.d_out)
    if op == "forward":
        return (x, W, e(f.d_out), A, Bt.T), True
    return (e(key.token_bucket, f.d_out), W.T, None, Bt, A.T), True


def default_choice(op: str, key: ProblemKey, device) -> tuple[str, dict]:
    """The untuned config: the dtype's default (large bf16 tiles do not fit fp32/fp64 operands); on a GPU,
    the first point, default first, that fits this very problem (unaligned sizes lose the tensor-core path
    and need smaller tiles)."""
    dtype = key.dtype if key is not None else None
    if key is None or torch.device(device).type != "cuda":
        return "fused", schedule_spaces.default(SPACE, op, "fused", dtype)
    return "fused", fitting_default(op, key, capability(device))


def fitting_default(op: str, key: ProblemKey, capability: int) -> dict:
    first = schedule_spaces.default(SPACE, op, "fused", key.dtype)
    for cfg in [first] + schedule_spaces.space(SPACE, op, "fused"):
        if compile_report(op, key, cfg, capability).problem(shared_limit(capability)) is None:
            return cfg
    return first


def candidates(op: str, key: ProblemKey) -> list[tuple[str, str, dict]]:
    """The space's points; TMA points only where the problem's rows are 16-byte aligned (elsewhere they would
    run as their pointer twins, already in the space)."""
    if key.dtype not in DTYPES:
        return []
    return [("triton", "fused", c) for c in schedule_spaces.space(SPACE, op, "fused")
            if not c.get("TMA") or tma_problem_fits(key)]


# ---- ahead-of-time compilation: resources of a config without a GPU ------------------------------

@dataclass(frozen=True)
class Resources:
    """What ptxas made of one config for one GPU architecture."""

    capability: int
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    spilled: int  # bytes of local memory per thread (spills / stack), 0 when everything is in registers
    tensor_cores: str  # "wgmma" (Hopper), "mma", or "" (FMA units only)
    tma: bool = False  # tiles move by TMA (cp.async.bulk.tensor) rather than per-thread loads

    def problem(self, shared_limit: int) -> Optional[str]:
        """Why this config must not run (spills, too much shared memory), or None."""
        if self.shared > shared_limit:
            return f"needs {self.shared} B of shared memory, the limit is {shared_limit}"
        if self.spilled:
            return f"spills ({self.registers} registers, {self.spilled} B of local memory per thread)"
        return None


# opt-in shared memory per block by compute capability (CUDA programming guide); a real GPU is asked instead
SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                100: 232448, 120: 101376}


def shared_limit(capability: int) -> int:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if major * 10 + minor == capability:
            return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    return SHARED_LIMIT.get(capability, 49152)


@functools.lru_cache(maxsize=512)
def _compile_report(op: str, key: ProblemKey, config_items: tuple, capability: int) -> Resources:
    config = dict(config_items)
    (a, Mt, bias, P, Q), want_t = _operands(op, key)
    if config.get("TMA") and tma_ready(a, Mt, P, Q):
        args, kwargs, _ = _tma_launch_args(a, Mt, bias, P, Q, 1.0, config, want_t)
        return compile_kernel(_fused_lsr_tma_kernel, args, kwargs, capability)
    args, kwargs, _ = _launch_args(a, Mt, bias, P, Q, 1.0, config, want_t)
    return compile_kernel(_fused_lsr_kernel, args, kwargs, capability)


def compile_kernel(kernel, args: tuple, kwargs: dict, capability: int) -> Resources:
    """Compile a ``@triton.jit`` kernel for these launch arguments for ``sm_<capability>`` with Triton's own
    ptxas (no GPU needed; tensors may be on the meta device) and read what it uses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    if INTERPRETED and "UPCAST" in kwargs:  # the interpreter's launch never compiles: a GPU's arguments
        kwargs["UPCAST"] = False
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = _compilable(kernel)
    # the options a launch adds (JITFunction.run), so that Triton's disk cache serves the launch this compile
    kwargs["debug"] = fn.debug or triton.knobs.runtime.debug
    kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    # the same binder a launch uses, so the signature (dtypes, alignment, constant strides) is the real one
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    (usage,) = resource_usage(compiled.asm["cubin"]).values()
    ptx = compiled.asm["ptx"]
    cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else ""
    return Resources(capability, int(compiled.metadata.shared), usage["registers"], usage["spilled"], cores,
                     "cp.async.bulk.tensor" in ptx)


@functools.lru_cache(maxsize=32)
def _compilable(kernel):
    """The kernel as a JITFunction even under the interpreter (where ``triton.jit`` returns an interpreted
    one), and so the ``@triton.jit`` helpers it calls, made once per process."""
    if not INTERPRETED:
        return kernel
    import types

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    fn = kernel.fn
    names = fn.__code__.co_names
    helpers = {n: _compilable(v) for n, v in fn.__globals__.items() if n in names and isinstance(v, InterpretedFunction)}
    if helpers:
        fn = types.FunctionType(fn.__code__, {**fn.__globals__, **helpers}, fn.__name__, fn.__defaults__,
                                fn.__closure__)
        fn.__qualname__, fn.__module__, fn.__wrapped__ = kernel.fn.__qualname__, kernel.fn.__module__, kernel.fn
    return JITFunction(fn)


def compile_report(op: str, key: ProblemKey, config: dict, capability: int = 90) -> Resources:
    """Compile the fused kernel for ``key`` and ``config`` for ``sm_<capability>`` with Triton's own ptxas
    (no GPU needed) and read what it uses. Cached per process; Triton's disk cache makes the JIT reuse it."""
    cfg = {k: int(config[k]) for k in KNOBS} | {"TMA": int(config.get("TMA", 0))}
    return _compile_report(op, key, tuple(sorted(cfg.items())), capability)


