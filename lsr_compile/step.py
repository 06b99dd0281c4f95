"""The training step of an LSR layer, kernel by kernel: the one place that says what runs, in order.

A step is a forward variant and a backward variant (docs/design.md §2). Each is written once here, over the
**Kronecker parts** — the small kernels around the vendor GEMMs that only an LSR layer needs — which each
backend supplies (``Parts``: ATen below, TVM on a CPU in ``kernels/tvm_parts.py``, Triton on a GPU in
``kernels/triton_parts.py``). The vendor GEMMs (cuBLAS, oneDNN) stay ATen calls in every backend.

    forward  (x, W, b, A1, A2, B1, B2, scale) -> y, and what the backward reuses (A, Bt, tT, w_eff)
      fold         1  fold_factors   reads W and the factors      writes W_eff = W + scale·B·A, A, Bt
                   2  gemm           reads x, W_eff, b            writes y = x W_effᵀ + b
      materialise  1  factors        reads the factors            writes A (q, d_in), Bt (q, d_out)
                   2  gemm           reads x, W, b                writes y = x Wᵀ + b
                   3  thin           reads x, A                   writes tT = A xᵀ (q, N)
                   4  addmm          reads y, tT, Bt              writes y += scale·tTᵀ Bt
      factored     1  gemm + the factored adapter (never forms A or B for y); then factors, for the backward

    backward (dy, saved) -> dx, dA1, dA2, dB1, dB2
      fold         1  fold           reads W, A, Bt               writes W_eff     (skipped when the forward kept it)
                   2  gemm           reads dy, W_eff              writes dx = dy W_eff
                   3  thin           reads x, A                   writes tT        (skipped when the forward kept it)
                   4  dy_pass        reads dy, Bt, tT             writes uT = Bt dyᵀ, dBt = tT dy (partial sums)
                   5  thin           reads uT, x                  writes dA = uT x (q, d_in)
                   6  project        reads dA, dBt, the factors   writes dA1, dA2, dB1, dB2 (scale applied)
      materialise  1  thin           (tT, when not kept)   2  dy_pass   3  gemm dx = dy W + scale·uTᵀ A
                   4  thin dA = uT x   5  project

Nothing is built twice in a step: A and Bt come from the forward, and so does tT when the forward computed it;
W_eff is kept for the backward only when ``keep_folded_weight`` says so (it costs one more d_out × d_in tensor
per layer until the backward). Every Kronecker part reads its operands once; only the GEMMs and the thin
products touch N-sized tensors. The plan is what ``costmodel`` prices, by running these functions on tensors
without data.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import formulations


class Parts(Protocol):
    """The Kronecker parts of a step. ``functional``: no in-place writes (what Inductor's decomposition needs)."""

    functional: bool

    def factors(self, A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor) -> tuple[Tensor, Tensor]:
        """``A = Σ_l A1[l] ⊗ A2[l]`` (q, d_in) and ``Bᵀ`` (q, d_out)."""

    def fold(self, W: Tensor, A: Tensor, Bt: Tensor, scale: float) -> Tensor:
        """``W + scale·B·A`` in W's dtype, one pass over W."""

    def fold_factors(self, W: Tensor, A1, A2, B1, B2, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(W + scale·B·A, A, Bt)`` from the factors."""

    def addmm(self, c: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
        """``beta·c + alpha·a b``, into ``c`` where ``functional`` is False (ATen's out-of-place addmm onto a
        matrix copies it first: one more kernel and pass)."""

    def dy_pass(self, dy: Tensor, Bt: Tensor, tT: Tensor) -> tuple[Tensor, Tensor]:
        """One pass over dy: ``uT = Bt dyᵀ`` (q, N) and ``tT dy`` as partial sums (P, q, d_out)."""

    def project(self, dA: Tensor, dBt: Tensor, A1, A2, B1, B2, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four factor gradients from ``scale·dA`` (q, d_in) and ``scale·Σ_P dBt`` (q, d_out)."""


class AtenParts:
    """The parts as plain ATen calls: every device, autograd and torch.func, and the decomposition Inductor
    compiles."""

    functional = True

    def factors(self, A1, A2, B1, B2):
        return formulations.build_A(A1, A2), formulations.build_Bt(B1, B2)

    def fold(self, W, A, Bt, scale):
        return torch.addmm(W, Bt.t(), A, alpha=scale)

    def fold_factors(self, W, A1, A2, B1, B2, scale):
        A, Bt = self.factors(A1, A2, B1, B2)
        return self.fold(W, A, Bt, scale), A, Bt

    def addmm(self, c, a, b, beta=1.0, alpha=1.0):
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    def dy_pass(self, dy, Bt, tT):
        return torch.mm(Bt, dy.t()), torch.mm(tT, dy).unsqueeze(0)

    def project(self, dA, dBt, A1, A2, B1, B2, scale):
        dBt = dBt[0] if dBt.shape[0] == 1 else dBt.sum(0)
        return formulations.project_grads(dA.mul(scale), dBt.mul(scale), A1, A2, B1, B2)


class AtenEagerParts(AtenParts):
    """ATen's parts for the eager kernels (the ``torch`` backend's, run as calls, never decomposed): ``addmm``
    into its first operand, always a tensor the step itself just made. The copy it saves is a page-faulting
    pass over an N x d tensor in each thin step (64 x 576 float32: ~30 µs of a ~1.2 ms layer step)."""

    functional = False

    def addmm(self, c, a, b, beta=1.0, alpha=1.0):
        return c.addmm_(a, b, beta=beta, alpha=alpha)


ATEN = AtenParts()
ATEN_EAGER = AtenEagerParts()

# ---- what the forward hands the backward ---------------------------------------------------------------------

keep_folded_weight: Union[bool, str] = "auto"
"""Whether a fold forward keeps ``W_eff`` for the backward: one fold pass over W less per step, one d_out × d_in
tensor more per layer until the backward. ``"auto"``: on a GPU when the layer's input, which the backward keeps
anyway, is at least as large (N ≥ d_out: the layer's saved memory at most doubles), where the pass is 2.5 % of a
4096², N = 8192 step (predicted, H200); never on a CPU, where keeping measured no faster (768² and 2048²,
N = 2048 and 8192: 0.999-1.005x the step without, the 2-core CI machine) and the memory would buy nothing."""


def keeps_folded(tokens: int, d_out: int, device_type: str = "cuda") -> bool:
    keep = keep_folded_weight
    if keep == "auto":
        return device_type != "cpu" and tokens >= d_out
    _check_keep(keep, "step.keep_folded_weight is")
    return keep


def _check_keep(keep, what: str) -> None:
    """True, False or "auto"; anything else ("never", "off", "Auto", 1) would be read by its truth value, which
    is not what it says."""
    if not (isinstance(keep, bool) or (isinstance(keep, str) and keep == "auto")):
        raise ValueError(f"{what} {keep!r}; keep_folded_weight must be True (keep the folded weight for the "
                         f"backward), False (fold again in the backward) or 'auto' (keep on a GPU when N >= d_out)")


@contextlib.contextmanager
def folded_weight_kept(keep: Union[bool, str]):
    """``with folded_weight_kept(False): ...``: the setting inside a block (tests, benchmarks)."""
    global keep_folded_weight
    _check_keep(keep, "folded_weight_kept got")
    old, keep_folded_weight = keep_folded_weight, keep
    try:
        yield
    finally:
        keep_folded_weight = old


def given(t: Optional[Tensor]) -> bool:
    """A forward that did not compute tT or W_eff hands over None (the op, whose schema has fixed outputs,
    an empty tensor)."""
    return t is not None and t.numel() > 0


# ---- forward variants: (parts, x, W, b, A1, A2, B1, B2, scale) -> (y, A, Bt, tT, w_eff) ---------------------

def forward_fold(parts: Parts, x, weight, bias, A1, A2, B1, B2, scale):
    """``x (W + scale·B·A)ᵀ``: a fold of W and one GEMM; wins for large N."""
    w_eff, A, Bt = parts.fold_factors(weight, A1, A2, B1, B2, scale)
    return F.linear(x, w_eff, bias), A, Bt, None, w_eff


def forward_materialise(parts: Parts, x, weight, bias, A1, A2, B1, B2, scale):
    """The base GEMM plus two thin products (the reference's algorithm); wins for small N. Factors kept in
    another dtype than a half-precision base (peft's float32 adapters): the adapter in the factors' dtype, as
    peft's LoRA computes it (x cast, the product added into the base's result)."""
    A, Bt = parts.factors(A1, A2, B1, B2)
    tT = torch.mm(A, x.to(A.dtype).t())
    if A.dtype != x.dtype:
        return F.linear(x, weight, bias).add_(torch.mm(tT.t(), Bt), alpha=scale), A, Bt, tT, None
    return parts.addmm(F.linear(x, weight, bias), tT.t(), Bt, alpha=scale), A, Bt, tT, None


def forward_factored(parts: Parts, x, weight, bias, A1, A2, B1, B2, scale):
    """Base GEMM plus the adapter contracted over the Kronecker modes; wins only when q is large relative to n.
    A and Bt are built for the backward only."""
    y = torch.add(F.linear(x, weight, bias), formulations.adapter_factored(x, A1, A2, B1, B2), alpha=scale)
    A, Bt = parts.factors(A1, A2, B1, B2)
    return y, A, Bt, None, None


# ---- backward variants: (parts, dy, x, W, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx) ------------------
#      -> (dx | None, dA1, dA2, dB1, dB2)

def _factor_grads(parts: Parts, dy, x, A, Bt, tT, A1, A2, B1, B2, scale):
    x, dy = x.to(A.dtype), dy.to(A.dtype)  # no-ops but for factors wider than the base (materialise's)
    if not given(tT):
        tT = torch.mm(A, x.t())
    uT, dBt = parts.dy_pass(dy, Bt, tT)
    return uT, parts.project(torch.mm(uT, x), dBt, A1, A2, B1, B2, scale)


def backward_fold(parts: Parts, dy, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx):
    """``dx = dy (W + scale·B·A)``: one GEMM on the folded weight (kept from the forward, or folded again)."""
    dx = None
    if need_dx:
        dx = torch.mm(dy, w_eff if given(w_eff) else parts.fold(weight, A, Bt, scale))
    _, grads = _factor_grads(parts, dy, x, A, Bt, tT, A1, A2, B1, B2, scale)
    return (dx, *grads)


def backward_materialise(parts: Parts, dy, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx):
    """``dx = dy W + scale·(dy B) A``: the GEMM accumulates onto the thin product (beta), no pass over dx more.
    Factors wider than the base: the thin product in their dtype, added into the GEMM's result."""
    uT, grads = _factor_grads(parts, dy, x, A, Bt, tT, A1, A2, B1, B2, scale)
    if not need_dx:
        return (None, *grads)
    if A.dtype != dy.dtype:
        return (torch.mm(dy, weight).add_(torch.mm(uT.t(), A), alpha=scale), *grads)
    return (parts.addmm(torch.mm(uT.t(), A), dy, weight, beta=scale), *grads)


FORWARDS = {"fold": forward_fold, "materialise": forward_materialise, "factored": forward_factored}


# ---- inference (no graph to record): (x, W, b, A, Bt, scale) -> y, A and Bt built once per factor change -------
#      (inference_cache), so a decode step runs the frozen GEMM and two thin products: what a LoRA layer runs

def infer_materialise(A, Bt, x, weight, bias, scale):
    """``x Wᵀ + b``, then ``scale·(x Aᵀ) Bᵀ`` added in place (computed in A's dtype where it differs). A and Bt
    first: a runner binds them once (``functools.partial``) and is called with the rest."""
    y = F.linear(x, weight, bias)
    if A.dtype == x.dtype:
        return y.addmm_(torch.mm(x, A.t()), Bt, alpha=scale)
    return y.add_(torch.mm(torch.mm(x.to(A.dtype), A.t()), Bt), alpha=scale)


def infer_fold(A, Bt, x, weight, bias, scale):
    """``x (W + scale·B·A)ᵀ + b``: the fold and one GEMM (many rows)."""
    return F.linear(x, torch.addmm(weight, Bt.t(), A, alpha=scale), bias)


INFERENCE = {"materialise": infer_materialise, "fold": infer_fold}
BACKWARDS = {"fold": backward_fold, "materialise": backward_materialise}


def bind(fn, parts: Parts):
    """A variant with its parts: a kernel of the op's signature (``kernels.build`` hands these out)."""
    def kernel(*args):
        return fn(parts, *args)
    kernel.__name__ = f"{fn.__name__}[{type(parts).__name__}]"
    return kernel


def lsr_linear(x, weight, bias, A1, A2, B1, B2, scale):
    """The layer for any leading dims in plain ATen, differentiable by autograd and by torch.func transforms."""
    y = forward_materialise(ATEN, x.reshape(-1, x.shape[-1]), weight, bias, A1, A2, B1, B2, scale)[0]
    return y.reshape(*x.shape[:-1], weight.shape[0])
