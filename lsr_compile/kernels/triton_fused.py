"""Triton: the fused LSR layer. One kernel serves the forward and the input gradient:

    out = a @ Mᵀ + bias + scale · (a @ Pᵀ) @ Qᵀ          (t = a @ Pᵀ optionally written out)

    forward : a = x,  M = W  (d_out, d_in),  P = A  (q, d_in),  Q = B  (d_out, q)   -> y,  t = x Aᵀ
    backward: a = dy, M = Wᵀ (d_in, d_out),  P = Bᵀ (q, d_out), Q = Aᵀ (d_in, q)    -> dx, u = dy B

x is read once: ``a @ Pᵀ`` is accumulated in the base GEMM's K-loop and ``t Qᵀ`` added in
the epilogue. Transposes are strides, never copies. The factor gradients
(``dA = scale·uᵀ x``, ``dB = scale·dyᵀ t``, then the Kronecker projections) are
q-wide GEMMs (``formulations.factor_grads``); no d_out x d_in matrix is formed (SPEC §2).

Without a GPU the kernel runs in Triton's interpreter: correct and slow, for
tests. The interpreter must be chosen before anything imports triton (torch and
transformers may), so it is the process's environment: ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import schedules
from ..formulations import build_A, build_B, factor_grads
from ..problem import ProblemKey

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = ("float32", "float16", "bfloat16", "float64")
# In the interpreter every config computes the same thing slowly; one small tile keeps tests fast.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


@triton.jit
def _fused_lsr_kernel(
    # pointers
    a_ptr, m_ptr, bias_ptr, p_ptr, q_ptr, out_ptr, t_ptr,
    # sizes
    M, N, K, R,
    # strides
    stride_am, stride_ak, stride_mn, stride_mk, stride_pr, stride_pk, stride_qn, stride_qr,
    stride_om, stride_on, stride_tm, stride_tr,
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

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    tacc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
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
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
            tacc = tl.dot(a, p, tacc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
            tacc = tl.dot(a, p, tacc)
    qm = tl.load(q_ptr + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qn,
                 mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    if UPCAST:
        qm = qm.to(ACC)
    if IEEE:
        acc += scale * tl.dot(tacc.to(qm.dtype), qm, input_precision="ieee")
    else:
        acc += scale * tl.dot(tacc.to(qm.dtype), qm)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += b[None, :].to(ACC)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_T:
        if pid_n == 0:
            tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                     tacc.to(t_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


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


def fused_linear(a, Mt, bias, P, Q, scale: float, config: dict, want_t: bool = False):
    """``a Mᵀ + bias + scale·(a Pᵀ) Qᵀ`` (and ``a Pᵀ``) for 2-D ``a (m, k)``, ``Mt (n, k)``, ``P (r, k)``,
    ``Q (n, r)``, any strides; fp32 accumulation."""
    _check(a, Mt, P, Q)
    out, t = _launch(a, Mt, bias, P, Q, scale, config, want_t, lambda kernel: kernel)
    return (out, t) if want_t else out


def forward(x, weight, bias, A1, A2, B1, B2, scale, config):
    return fused_linear(x, weight, bias, build_A(A1, A2), build_B(B1, B2), scale, config)


def backward(dy, x, weight, A1, A2, B1, B2, scale, need_dx, config):
    """dx (and u = dy B) from the fused kernel; the factor gradients from q-wide GEMMs."""
    A, B = build_A(A1, A2), build_B(B1, B2)
    if need_dx:
        dx, u = fused_linear(dy, weight.T, None, B.T, A.T, scale, config, want_t=True)
    else:
        dx, u = None, dy @ B
    return (dx, *factor_grads(u.T.mul(scale), dy, x, A, A1, A2, B1, B2, scale))


def default_choice(op: str, key: ProblemKey, device) -> tuple[str, dict]:
    return "fused", schedules.default("triton_cuda", op, "fused")


def candidates(op: str, key: ProblemKey) -> list[tuple[str, str, dict]]:
    if key.dtype not in DTYPES:
        return []
    return [("triton", "fused", c) for c in schedules.space("triton_cuda", op, "fused")]


def build(op: str, variant: str, config: dict, key: ProblemKey, device):
    if variant != "fused":
        raise ValueError(f"no Triton {op} variant {variant!r}; known: ['fused']")
    if key.dtype not in DTYPES:
        raise ValueError(f"Triton kernels support {DTYPES}, not {key.dtype}")
    if op == "forward":
        return lambda x, weight, bias, A1, A2, B1, B2, scale: forward(x, weight, bias, A1, A2, B1, B2, scale,
                                                                      config)
    return lambda dy, x, weight, A1, A2, B1, B2, scale, need_dx: backward(dy, x, weight, A1, A2, B1, B2, scale,
                                                                          need_dx, config)


# ---- Inductor-visible registration (GPU) -------------------------------------------------------
# ``triton_op`` + ``wrap_triton`` let torch.compile see into the kernel and schedule around it; in the
# interpreter they hand back the raw kernel and fail on FakeTensors (STACK-NOTES), so CPU runs use the
# ``lsr::linear`` op (explicit fake implementation) instead.

def _launch(a, Mt, bias, P, Q, scale, config, want_t, launcher):
    m, k = a.shape
    n, r = Mt.shape[0], P.shape[0]
    out = torch.empty((m, n), device=a.device, dtype=a.dtype)
    t = torch.empty((m, r), device=a.device, dtype=a.dtype) if want_t else out
    cfg = INTERPRETER_CONFIG if INTERPRETED else config
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    launcher(_fused_lsr_kernel)[grid](
        a, Mt, bias if bias is not None else out, P, Q, out, t, m, n, k, r,
        a.stride(0), a.stride(1), Mt.stride(0), Mt.stride(1), P.stride(0), P.stride(1), Q.stride(0), Q.stride(1),
        out.stride(0), out.stride(1), t.stride(0), t.stride(1), float(scale),
        HAS_BIAS=bias is not None, WRITE_T=want_t, IEEE=a.dtype in (torch.float32, torch.float64),
        UPCAST=INTERPRETED and a.dtype in (torch.bfloat16, torch.float16),
        ACC=tl.float64 if a.dtype == torch.float64 else tl.float32,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=max(16, triton.next_power_of_2(r)), GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out, t


_registered = False


def register_inductor_ops() -> bool:
    """Define ``lsr::triton_fused_linear`` (a ``triton_op``) with autograd; only where a GPU runs Triton."""
    global _registered
    if _registered or INTERPRETED or not torch.cuda.is_available():
        return _registered
    from torch.library import triton_op, wrap_triton

    @triton_op("lsr::triton_fused_linear", mutates_args=())
    def triton_fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                            B: torch.Tensor, scale: float, fwd_config: list[int],
                            bwd_config: list[int]) -> torch.Tensor:
        return _launch(x, weight, bias, A, B, scale, _cfg(fwd_config), False, wrap_triton)[0]

    @triton_op("lsr::triton_fused_dx", mutates_args=())
    def triton_fused_dx(dy: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                        bwd_config: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(dy, weight.T, None, B.T, A.T, scale, _cfg(bwd_config), True, wrap_triton)

    def setup(ctx, inputs, output):
        x, weight, bias, A, B, scale, _, bwd_config = inputs
        ctx.save_for_backward(x, weight, A, B)
        ctx.scale, ctx.bwd_config = scale, bwd_config

    def backward(ctx, dy):
        x, weight, A, B = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx, u = torch.ops.lsr.triton_fused_dx(dy2, weight, A, B, ctx.scale, ctx.bwd_config)
        dA = torch.mm(u.T, x2).mul_(ctx.scale)
        dB = torch.mm(torch.mm(A, x2.T), dy2).mul_(ctx.scale).T
        return dx.reshape(x.shape), None, None, dA, dB, None, None, None

    triton_fused_linear.register_autograd(backward, setup_context=setup)
    _registered = True
    return True


_KNOBS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def config_list(config: dict) -> list[int]:
    return [int(config[k]) for k in _KNOBS]


def _cfg(values) -> dict:
    return dict(zip(_KNOBS, (int(v) for v in values)))


def inductor_forward(x, weight, bias, A1, A2, B1, B2, scale, fwd_config: dict, bwd_config: dict):
    """The layer through ``lsr::triton_fused_linear``: A and B built by differentiable GEMMs, so autograd
    turns dA/dB into the four factor gradients."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.lsr.triton_fused_linear(x2, weight, bias, build_A(A1, A2), build_B(B1, B2), float(scale),
                                          config_list(fwd_config), config_list(bwd_config))
    return y.reshape(*x.shape[:-1], weight.shape[0])
