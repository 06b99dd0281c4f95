"""The no-graph path (decoding, evaluation) and what a layer keeps between such calls.

Decoding calls each layer once per token with the same factors. Building ``A (q, d_in)`` and ``Bᵀ (q, d_out)``
from A1, A2, B1, B2 on every call costs about what the rest of the call does (256², one token, the 2-core CI
machine: 23 µs against 26 µs), so a layer keeps them, with the kernel chosen for its input, in a ``Memo``.

**When a kept value may be used: only when the factors' values equal, element for element, the copy the memo
took when it built it** (same dtypes and shapes, on the CPU). Nothing else is trusted: PyTorch does not promise
to bump a version counter when a tensor's values change (fused optimizer steps, ``torch.distributed``
collectives, parameters aliasing a reused buffer and writes through ``.data`` change values without it), and
identity or storage addresses say nothing about values. The comparison is four ``torch.equal`` calls on tensors
of a few hundred elements (2.2 µs a call on the CI machine, against 47 µs for a peft LoRA r = 8 layer), and it
sees every way of writing the factors, ``.data`` included. On other devices comparing would wait for the device
on every call, so nothing is kept there: A and Bᵀ are built per call.

A kept runner also stands for the input's dtype and token bucket and dispatch's state (a forced backend, new
tuning records); the shapes, dtypes and devices of the input, the base weight and the bias are checked when it
is built, and a later call whose tensors no longer fit fails inside it and gets the same named error. The base
weight's values are read on every call, never kept.

A memo lives as long as its layer, holds one set of factor values at a time (switching adapters rebuilds), is
not pickled or copied, and is emptied by ``delete_adapter`` and by ``clear()``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import dispatch, logs, ops
from .problem import token_bucket

_PLAIN = (Tensor, torch.nn.Parameter)
_memos: "weakref.WeakSet[Memo]" = weakref.WeakSet()
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: torch.is_autocast_enabled("cpu")
                        or torch.is_autocast_enabled("cuda"))


class Memo:
    """What one layer built from its factors (``values``: private copies of them; ``derived``: A, Bᵀ or casts
    built from those values; ``runners``: per input signature, a kernel over ``derived``)."""

    __slots__ = ("values", "derived", "runners", "__weakref__")

    def __init__(self):
        self.forget()
        _memos.add(self)

    def forget(self) -> None:
        self.values, self.derived, self.runners = None, {}, {}

    def keep(self, A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor) -> None:
        """Start over from these values (copies: nothing of the layer's own tensors is held)."""
        with torch.no_grad():
            self.values = tuple(t.detach().clone() for t in (A1, A2, B1, B2))
        self.derived, self.runners = {}, {}

    def derive(self, what, build):
        """``build()``'s value for the values held, built once."""
        hit = self.derived.get(what)
        if hit is None:
            hit = self.derived[what] = build()
        return hit

    def __deepcopy__(self, memo):
        return Memo()

    def __reduce__(self):
        return Memo, ()


def clear() -> None:
    """Empty every layer's memo (frees A, Bᵀ and the copies; never needed for correct results)."""
    for m in list(_memos):
        m.forget()


def layer_call(memo: Memo, x: Tensor, weight: Tensor, bias: Optional[Tensor], A1, A2, B1, B2,
               scale: float) -> Optional[Tensor]:
    """A layer's call when it records no graph (``generate``, evaluation), through what ``memo`` keeps; None
    when a graph is recorded (backward or forward mode) or something must see the op (a compiler, tracer,
    dispatch mode, functorch transform or autocast): the caller then runs the op. The factors may be in another
    floating dtype than the base (peft's float32 adapters over a half-precision base). Written out flat:
    decoding is host-bound, and in a model every call here runs with cold caches (each frame and lookup shows:
    in 48 layers called in turn with other work between them, this call's Python took 27 µs a layer)."""
    P = _PLAIN
    if (torch.compiler.is_compiling()  # first: Dynamo folds it, and traces nothing after it
            or type(x) not in P or type(weight) not in P or type(A1) not in P or type(A2) not in P
            or type(B1) not in P or type(B2) not in P or (bias is not None and type(bias) not in P)
            or (torch.is_grad_enabled() and (x.requires_grad or A1.requires_grad or A2.requires_grad
                                             or B1.requires_grad or B2.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))
            or forward_ad._current_level >= 0 or torch._C._get_tracing_state()
            or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()
            or _any_autocast() or not x.dim()):
        return None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not x2.is_cpu:
        run = _runner(x2, weight, bias, A1, A2, B1, B2, lambda what, build: build())
    else:
        v = memo.values  # the rule: kept values are used only while the factors equal the copy taken
        if not (v is not None and A1.dtype is v[0].dtype and A2.dtype is v[1].dtype and B1.dtype is v[2].dtype
                and B2.dtype is v[3].dtype and A1.is_cpu and A2.is_cpu and B1.is_cpu and B2.is_cpu
                and torch.equal(A1, v[0]) and torch.equal(A2, v[1]) and torch.equal(B1, v[2])
                and torch.equal(B2, v[3])):
            memo.keep(A1, A2, B1, B2)
        # what the kernel choice depends on besides the factors (their shapes and dtypes are held); the base's and
        # the input's shapes, dtypes and devices were checked when the runner was built, and a call whose
        # tensors no longer fit raises inside it and is checked again below, which names the problem
        n = x2.shape[0]
        key = (x2.dtype, 16 if n <= 16 else token_bucket(n), dispatch._forced.get(), dispatch.generation,
               logs._appends)
        run = memo.runners.get(key)
        if run is None:
            run = memo.runners[key] = _runner(x2, weight, bias, A1, A2, B1, B2, memo.derive)
    try:
        y = run(x2, weight, bias, scale)
    except RuntimeError:
        _check(x2, weight, bias, A1, A2, B1, B2)
        raise
    return y if x2 is x else y.reshape(*x.shape[:-1], y.shape[-1])


def _check(x2, weight, bias, A1, A2, B1, B2):
    (ops.check_args if A1.dtype == weight.dtype else ops.check_layer_args)(x2, weight, bias, A1, A2, B1, B2)


def _runner(x2, weight, bias, A1, A2, B1, B2, derive):
    return dispatch.inference_runner(x2, weight, bias, A1, A2, B1, B2, _check, derive)
