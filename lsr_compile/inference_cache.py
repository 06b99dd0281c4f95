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

Also part of what a kept runner stands for: the input's dtype, width and token bucket, the base weight's and
bias's shapes, dtypes and devices (checked once, when the runner is built), and dispatch's state (a forced
backend, new tuning records). The base weight's values are read on every call, never kept.

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

    def holds(self, A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor) -> bool:
        """Whether what is kept was built from these values (the rule above)."""
        v = self.values
        return (v is not None and A1.dtype is v[0].dtype and A2.dtype is v[1].dtype and B1.dtype is v[2].dtype
                and B2.dtype is v[3].dtype and A1.is_cpu and A2.is_cpu and B1.is_cpu and B2.is_cpu
                and torch.equal(A1, v[0]) and torch.equal(A2, v[1]) and torch.equal(B1, v[2])
                and torch.equal(B2, v[3]))

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


def ready(x, weight, bias, A1, A2, B1, B2) -> bool:
    """The no-graph path applies: plain eager tensors, no graph to record (backward or forward mode), and no
    compiler, tracer, dispatch mode, functorch transform or autocast to see or change the call. Written out
    flat: decoding is host-bound, and in a model every call here runs with cold caches."""
    P = _PLAIN
    return (not torch.compiler.is_compiling()  # first: Dynamo folds it, and traces nothing after it
            and type(x) in P and type(weight) in P and type(A1) in P and type(A2) in P and type(B1) in P
            and type(B2) in P and (bias is None or type(bias) in P)
            and not (torch.is_grad_enabled() and (x.requires_grad or A1.requires_grad or A2.requires_grad
                                                  or B1.requires_grad or B2.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and forward_ad._current_level < 0 and not torch._C._get_tracing_state()
            and not torch._C._len_torch_dispatch_stack() and not torch._C._are_functorch_transforms_active()
            and not _any_autocast())


def layer_call(memo: Memo, x: Tensor, weight: Tensor, bias: Optional[Tensor], A1, A2, B1, B2,
               scale: float) -> Optional[Tensor]:
    """A layer's call when it records no graph (``generate``, evaluation), through what ``memo`` keeps; None
    when a graph is recorded or something must see the op (the caller then runs the op). The factors may be in
    another floating dtype than the base (peft's float32 adapters over a half-precision base)."""
    if not ready(x, weight, bias, A1, A2, B1, B2):
        return None
    x2 = x if x.dim() == 2 else ops._flat(x)
    if not x2.is_cpu:
        run = _runner(x2, weight, bias, A1, A2, B1, B2, lambda what, build: build())
    else:
        if not memo.holds(A1, A2, B1, B2):
            memo.keep(A1, A2, B1, B2)
        sig = (x2.dtype, x2.shape[1], token_bucket(x2.shape[0]), weight.shape, weight.dtype, weight.is_cpu,
               None if bias is None else (bias.shape, bias.dtype, bias.is_cpu), dispatch.forced(),
               dispatch.generation, logs.appends())
        run = memo.runners.get(sig)
        if run is None:
            run = memo.runners[sig] = _runner(x2, weight, bias, A1, A2, B1, B2, memo.derive)
    y = run(x2, weight, bias, A1, A2, B1, B2, scale)
    return y if x2 is x else y.reshape(*x.shape[:-1], weight.shape[0])


def _runner(x2, weight, bias, A1, A2, B1, B2, derive):
    check = ops.check_args if A1.dtype == weight.dtype else ops.check_layer_args
    return dispatch.inference_runner(x2, weight, bias, A1, A2, B1, B2, check, derive)
