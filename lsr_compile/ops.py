"""Stage 5: the ``torch.ops.lsr`` custom ops, their fake implementations and autograd.

    lsr::linear(x, weight, bias?, A1, A2, B1, B2, scale) -> y            the whole layer (what models call)
    lsr::linear_forward(x, weight, bias?, A1, A2, B1, B2, scale) -> (y, A, Bt, tT, w_eff)
    lsr::linear_backward(dy, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx)
                                                                         -> (dx, dA1, dA2, dB1, dB2)
        a training step: the forward hands the backward what it built (step.py: A and Bt always, tT and
        the folded weight when it computed them), so nothing is built twice
    lsr::mixed_linear(x, weight, bias?, A1, A2, B1, B2, scales, seg_indptr, seg_adapter) -> y
    lsr::mixed_linear_backward(dy, x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, need_dx)
                                                                         -> (dx, dA1, dA2, dB1, dB2)
        a mixed batch: a bank of K adapters (factors stacked on a leading axis), each segment of rows with
        its own slot (lsr_compile.mixed_formulations)
    lsr::adapter(x, A1, A2, B1, B2, scale, base) -> scale·(x Aᵀ) Bᵀ      the adapter alone, beside a base in
    lsr::adapter_backward(dy, x, A1, A2, B1, B2, scale, base, need_dx)   format ``base`` (lsr_compile.quantized)
                                                                         that runs its own kernels

The whole layer is one op so that a kernel may fuse the adapter into the base GEMM or fold it into the
weight. Every op runs whatever ``dispatch`` picks for the shape and device. Registered with
``torch.library.Library`` define/impl (about 5 µs per call, against 22 µs for ``custom_op``), fake
implementations for ``torch.compile``. ``lsr::linear``'s autograd is a kernel of its own at the Autograd
key: one ``autograd.Function`` that runs ``linear_forward`` and saves its extra outputs
(``register_autograd`` can only save the op's inputs and its one output, and costs about 100 µs of host time
per step on the CI machine); without a gradient to record it goes straight to the inference kernel.

Under ``torch.compile`` Dynamo sees one ``lsr.linear`` node per layer (no graph break, nothing
device-specific traced); AOTAutograd turns it into ``linear_forward`` / ``linear_backward``. When Inductor
then compiles the graph and the choice is a PyTorch formulation, those are decomposed into it so Inductor
fuses its small kernels (on the H200 the opaque op cost ~135 µs of host time per call against the frozen
Linear's 14 µs); a Triton or TVM choice stays one opaque call. The choice is made while tracing, from the
example token count: a compiled graph keeps it until it is traced again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from . import dispatch, inductor_autotune, mixed_formulations, step

_lib = torch.library.Library("lsr", "DEF")
_lib.define(
    "linear(Tensor x, Tensor weight, Tensor? bias, Tensor A1, Tensor A2, Tensor B1, Tensor B2, float scale) -> Tensor"
)
_lib.define(
    "linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor A1, Tensor A2, Tensor B1, Tensor B2, float scale) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor A1, Tensor A2, Tensor B1, Tensor B2, Tensor A, "
    "Tensor Bt, Tensor tT, Tensor w_eff, float scale, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define("adapter(Tensor x, Tensor A1, Tensor A2, Tensor B1, Tensor B2, float scale, str base) -> Tensor")
_lib.define(
    "adapter_backward(Tensor grad, Tensor x, Tensor A1, Tensor A2, Tensor B1, Tensor B2, float scale, str base, "
    "bool need_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "mixed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A1, Tensor A2, Tensor B1, Tensor B2, Tensor scales, "
    "Tensor seg_indptr, Tensor seg_adapter) -> Tensor"
)
_lib.define(
    "mixed_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor A1, Tensor A2, Tensor B1, Tensor B2, "
    "Tensor scales, Tensor seg_indptr, Tensor seg_adapter, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


class LSRInputError(ValueError):
    """Tensors passed to an LSR op do not fit together."""


def check_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1, A2, B1, B2) -> None:
    """Shapes, dtypes and devices of a layer call. One cheap test on the hot path (a few µs);
    only when it fails does ``_diagnose`` find the culprit and name it."""
    try:
        s, r1, n1 = A1.shape
        s2, r2, n2 = A2.shape
        s3, m1, r1b = B1.shape
        s4, m2, r2b = B2.shape
        d_out, d_in = weight.shape
        dt, dev = x.dtype, x.device
        ok = (s == s2 == s3 == s4 and r1 == r1b and r2 == r2b and n1 * n2 == d_in and m1 * m2 == d_out
              and x.shape[-1] == d_in and x.is_floating_point()
              and dt == weight.dtype == A1.dtype == A2.dtype == B1.dtype == B2.dtype
              and dev == weight.device == A1.device == A2.device == B1.device == B2.device
              and (bias is None or (bias.dim() == 1 and bias.shape[0] == d_out and bias.dtype == dt
                                    and bias.device == dev)))
    except (AttributeError, ValueError, TypeError, IndexError):
        ok = False
    if not ok:
        _diagnose(x, weight, bias, A1, A2, B1, B2)
        raise LSRInputError("LSR op arguments do not fit together")  # _diagnose names the problem first


def _diagnose(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1, A2, B1, B2) -> None:
    """Every message names the tensor and the fix."""
    named = {"x": x, "weight": weight, "A1": A1, "A2": A2, "B1": B1, "B2": B2}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise LSRInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise LSRInputError(f"{name} has dtype {t.dtype}; LSR layers need floating-point tensors")
    for name in ("A1", "A2", "B1", "B2"):
        if named[name].dim() != 3:
            raise LSRInputError(f"{name} must be 3-D (s, rows, cols), got shape {tuple(named[name].shape)}")
    if weight.dim() != 2:
        raise LSRInputError(f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}")
    s, r1, n1 = A1.shape
    _, r2, n2 = A2.shape
    _, m1, r1b = B1.shape
    _, m2, r2b = B2.shape
    if not (A2.shape[0] == B1.shape[0] == B2.shape[0] == s):
        raise LSRInputError(f"A1, A2, B1, B2 must share the separation rank s (dim 0); got "
                            f"{A1.shape[0]}, {A2.shape[0]}, {B1.shape[0]}, {B2.shape[0]}")
    if r1b != r1 or r2b != r2:
        raise LSRInputError(f"inner ranks disagree: A1 {tuple(A1.shape)} / B1 {tuple(B1.shape)} must share r1, "
                            f"A2 {tuple(A2.shape)} / B2 {tuple(B2.shape)} must share r2 (layout: A1 (s, r1, n1), "
                            f"A2 (s, r2, n2), B1 (s, m1, r1), B2 (s, m2, r2))")
    d_out, d_in = weight.shape
    if n1 * n2 != d_in:
        raise LSRInputError(f"A1/A2 factor d_in as {n1}*{n2} = {n1 * n2}, but weight has d_in = {d_in}")
    if m1 * m2 != d_out:
        raise LSRInputError(f"B1/B2 factor d_out as {m1}*{m2} = {m1 * m2}, but weight has d_out = {d_out}")
    if x.dim() == 0:
        raise LSRInputError(f"x is 0-d (a single number); an LSR layer's input needs a last dimension of size "
                            f"d_in = {d_in}: pass a (..., {d_in}) tensor")
    if x.shape[-1] != d_in:
        raise LSRInputError(f"x has shape {tuple(x.shape)}; its last dimension must be d_in = {d_in}")
    if bias is not None and tuple(bias.shape) != (d_out,):
        raise LSRInputError(f"bias has shape {tuple(bias.shape)}, expected ({d_out},)")
    dtypes = {n: t.dtype for n, t in named.items()}
    if len(set(dtypes.values())) > 1:
        raise LSRInputError(f"dtype mismatch {dtypes}; cast the layer (layer.to(dtype)) or the input to one dtype")
    devices = {n: t.device for n, t in named.items()}
    if len(set(devices.values())) > 1:
        raise LSRInputError(f"device mismatch {devices}; move the layer and the input to one device")


def _flat(x: Tensor) -> Tensor:
    if x.dim() == 2:
        return x
    try:
        return x.reshape(-1, x.shape[-1])
    except IndexError:  # x.shape[-1] of a 0-d x (the training path flattens before any check)
        raise LSRInputError("x is 0-d (a single number); an LSR layer's input needs a last dimension of size "
                            "d_in: pass x.reshape(1, -1) or a (..., d_in) tensor") from None


def _unflat(y: Tensor, x: Tensor) -> Tensor:
    """The training step's result in x's leading dims, not as a view: an autograd.Function's output that is a
    view of a tensor it made cannot be changed in place (``F.relu(layer(x), inplace=True)`` on a 3-D x, which
    nn.Linear takes)."""
    shape = (*x.shape[:-1], y.shape[-1])
    try:
        return torch.ops.aten._unsafe_view.default(y, shape)  # the same memory, not marked as a view
    except RuntimeError:  # not viewable (a strided result): reshape copies, which is no view either
        return y.reshape(shape)


def _forward(x, weight, bias, A1, A2, B1, B2, scale):
    check_args(x, weight, bias, A1, A2, B1, B2)
    x2 = _flat(x)
    y, *saved = dispatch.kernel("forward", x2, A1, A2, B1, B2)(x2, weight, bias, A1, A2, B1, B2, scale)
    return (y if x2 is x else y.reshape(*x.shape[:-1], weight.shape[0])), saved


@torch.library.impl(_lib, "linear", "CompositeExplicitAutograd")
def _linear(x, weight, bias, A1, A2, B1, B2, scale):
    return _forward(x, weight, bias, A1, A2, B1, B2, scale)[0]


def _linear_forward(x, weight, bias, A1, A2, B1, B2, scale):
    """y and what the backward reuses (None where the kernel did not compute it)."""
    y, (A, Bt, tT, w_eff) = _forward(x, weight, bias, A1, A2, B1, B2, scale)
    return y, A, Bt, tT, w_eff


@torch.library.impl(_lib, "linear_forward", "CompositeExplicitAutograd")
def _linear_forward_op(x, weight, bias, A1, A2, B1, B2, scale):
    y, A, Bt, tT, w_eff = _linear_forward(x, weight, bias, A1, A2, B1, B2, scale)
    return (y if x.dim() == 2 else _unflat(y, x)), A, Bt, _tensor(tT, x), _tensor(w_eff, x)


def _tensor(t, like):
    """An op's fixed outputs: an empty tensor for one the kernel did not compute."""
    return like.new_empty(0) if t is None else t


@torch.library.impl(_lib, "linear_backward", "CompositeExplicitAutograd")
def _linear_backward(grad, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx):
    x2, g2 = _flat(x), _flat(grad)
    dx, dA1, dA2, dB1, dB2 = dispatch.kernel("backward", x2, A1, A2, B1, B2)(
        g2, x2, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx)
    dx = (dx if x2 is x else dx.reshape(x.shape)) if need_dx else x.new_empty(0)
    return dx, dA1, dA2, dB1, dB2


@torch.library.register_fake("lsr::linear", lib=_lib)
def _linear_fake(x, weight, bias, A1, A2, B1, B2, scale):
    check_args(x, weight, bias, A1, A2, B1, B2)
    _prepare_inductor()
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("lsr::linear_forward", lib=_lib)
def _linear_forward_fake(x, weight, bias, A1, A2, B1, B2, scale):
    check_args(x, weight, bias, A1, A2, B1, B2)
    _prepare_inductor()
    x2 = _flat(x)
    keeps_t, keeps_w = dispatch.forward_saves(x2, A1, A2, B1, B2)  # the shapes are the chosen kernel's
    q, (d_out, d_in) = A1.shape[1] * A2.shape[1], weight.shape
    return (x.new_empty(*x.shape[:-1], d_out), x.new_empty(q, d_in), x.new_empty(q, d_out),
            x.new_empty(q, x2.shape[0]) if keeps_t else x.new_empty(0),
            x.new_empty(d_out, d_in) if keeps_w else x.new_empty(0))


@torch.library.register_fake("lsr::linear_backward", lib=_lib)
def _linear_backward_fake(grad, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx):
    _prepare_inductor()
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(A1), torch.empty_like(A2), torch.empty_like(B1), torch.empty_like(B2)


def _linear_decomposed(x, weight, bias, A1, A2, B1, B2, scale):
    if inductor_autotune.active(x):
        y = inductor_autotune.linear(_flat(x), weight, bias, A1, A2, B1, B2, scale)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    out = _linear_forward_decomposed(x, weight, bias, A1, A2, B1, B2, scale)
    return out if out is NotImplemented else out[0]


def _linear_forward_decomposed(x, weight, bias, A1, A2, B1, B2, scale):
    x2 = _flat(x)
    if inductor_autotune.active(x):  # max-autotune: y from the autotuned op, A and Bt beside it, nothing else
        y = inductor_autotune.linear(x2, weight, bias, A1, A2, B1, B2, scale)
        A, Bt = step.ATEN.factors(A1, A2, B1, B2)
        return y.reshape(*x.shape[:-1], weight.shape[0]), A, Bt, x.new_empty(0), x.new_empty(0)
    fn = dispatch.traced_formulation("forward", x2, A1, A2, B1, B2)
    if fn is None:
        return NotImplemented
    y, A, Bt, tT, w_eff = fn(x2, weight, bias, A1, A2, B1, B2, scale)
    return y.reshape(*x.shape[:-1], weight.shape[0]), A, Bt, _tensor(tT, x), _tensor(w_eff, x)


def _linear_backward_decomposed(grad, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx):
    x2, g2 = _flat(x), _flat(grad)
    if inductor_autotune.active(x):
        dx, dA1, dA2, dB1, dB2 = inductor_autotune.backward(g2, x2, weight, A1, A2, B1, B2, A, Bt, scale, need_dx)
        return (dx.reshape(x.shape) if need_dx else dx), dA1, dA2, dB1, dB2
    fn = dispatch.traced_formulation("backward", x2, A1, A2, B1, B2)
    if fn is None:
        return NotImplemented
    dx, dA1, dA2, dB1, dB2 = fn(g2, x2, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx)
    return (dx.reshape(x.shape) if need_dx else x.new_empty(0)), dA1, dA2, dB1, dB2


_decompositions_registered = False
_CACHE_SALT = "lsr_compile.dispatch"


def _prepare_inductor() -> None:
    """Runs whenever an op is traced. Gives Inductor the decompositions (the first time: importing Inductor
    at ``import lsr_compile`` would cost every user a second), and keys Inductor's caches by the dispatch
    state, since a cached graph holds the formulation chosen when it was traced."""
    global _decompositions_registered
    from torch._inductor import config, decomposition, lowering

    if not _decompositions_registered:
        for op, decomposed in ((torch.ops.lsr.linear.default, _linear_decomposed),
                               (torch.ops.lsr.linear_forward.default, _linear_forward_decomposed),
                               (torch.ops.lsr.linear_backward.default, _linear_backward_decomposed)):
            decomposition.register_decomposition(op)(decomposed)
            # where the decomposition declines (a Triton or TVM choice), Inductor calls the op itself
            lowering.make_fallback(op, layout_constraint=None, warn=False, override_decomp=True)
        # Inductor snapshots its table (with its random-op extras) once per process, maybe before this trace
        snapshot = getattr(decomposition, "fast_random_decomps", None)
        if hasattr(snapshot, "cache_clear"):
            snapshot.cache_clear()
        inductor_autotune.prepare()  # max-autotune's candidates, where this torch's Inductor has the hook
        _decompositions_registered = True
    # part of the AOTAutograd and FX-graph cache keys (documented for custom ops in torch._inductor.config)
    marked = config.unsafe_marked_cacheable_functions
    token = dispatch.state_token() + ("" if inductor_autotune.enabled() else ":max-autotune-candidates-off")
    if marked.get(_CACHE_SALT) != token:
        config.unsafe_marked_cacheable_functions = {**marked, _CACHE_SALT: token}


class _LinearStep(torch.autograd.Function):
    """One training step of the layer: the forward's extra outputs are the backward's inputs. ``kernels``: the
    step's (forward, backward) pair from ``dispatch.step_kernels`` for plain eager tensors (``_plain``), called
    without the dispatcher; None: through ``torch.ops.lsr``."""

    @staticmethod
    def forward(ctx, x, weight, bias, A1, A2, B1, B2, scale, kernels):
        direct = kernels is not None
        if direct:  # the step's two kernels, found by the caller (``dispatch.step_kernels``)
            x2 = _flat(x)
            fwd, ctx.bwd = kernels
            y, A, Bt, tT, w_eff = fwd(x2, weight, bias, A1, A2, B1, B2, scale)
            if x2 is not x:
                y = _unflat(y, x)
        else:
            y, A, Bt, tT, w_eff = torch.ops.lsr.linear_forward(x, weight, bias, A1, A2, B1, B2, scale)
        if tT is not None or w_eff is not None:
            tT, w_eff = _handed_over(x, weight, tT, w_eff, direct)
        ctx.save_for_backward(x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff)
        ctx.scale, ctx.has_bias, ctx.direct = scale, bias is not None, direct
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # backward(create_graph=True): a gradient penalty differentiates this again
            return _differentiable_backward(grad, x, weight, A1, A2, B1, B2, ctx.scale, ctx.has_bias, need)
        if ctx.direct:
            x2, g2 = _flat(x), _flat(grad)
            dx, dA1, dA2, dB1, dB2 = ctx.bwd(g2, x2, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, ctx.scale, need[0])
            if need[0] and x2 is not x:
                dx = dx.reshape(x.shape)
        else:
            dx, dA1, dA2, dB1, dB2 = torch.ops.lsr.linear_backward(grad, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff,
                                                                   ctx.scale, need[0])
        # The base is frozen in LSRLinear; a caller that trains it still gets exact gradients.
        dW = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if need[1] else None
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and need[2] else None
        return (dx if need[0] else None), dW, db, dA1, dA2, dB1, dB2, None, None


def _handed_over(x, weight, tT, w_eff, direct):
    """What the backward gets besides A and Bt: ``tT`` as the forward computed it, the folded weight where
    ``step.keep_folded_weight`` keeps it, neither under saved-tensor hooks. Those hooks are how activation
    checkpointing (and offloading) manage saved tensors, and a checkpoint's recompute must save exactly what the
    forward saved, although it may run under another dispatch state (a ``use_backend`` or
    ``folded_weight_kept`` block around the forward only) whose kernel hands over other tensors: A and Bt alone
    are what every kernel saves, and the backward computes the rest itself."""
    none = None if direct else x.new_empty(0)
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return none, none
    # a traced token count is read at its example value (no guard: no recompile per token count)
    if step.given(w_eff) and not step.keeps_folded(dispatch.example_rows(x), weight.shape[0], x.device.type):
        w_eff = none
    return tT, w_eff


def _differentiable_backward(grad, x, weight, A1, A2, B1, B2, scale, has_bias, need):
    """The step's gradients as a graph of their own (``create_graph=True``: double backward, a gradient penalty):
    the layer again in plain ATen (``step.lsr_linear``, differentiable to any order) and autograd's gradients of
    it, whose graph reaches the inputs and ``grad``. The kernels' hand-over (A and Bt, built without a graph)
    would make second-order gradients wrong."""
    wrt = [(i, t) for i, t in ((0, x), (1, weight), (3, A1), (4, A2), (5, B1), (6, B2)) if need[i]]
    out = [None] * 9
    if wrt:
        y = step.lsr_linear(x, weight, None, A1, A2, B1, B2, scale)
        grads = torch.autograd.grad(y, [t for _, t in wrt], grad, create_graph=True, allow_unused=True)
        for (i, t), g in zip(wrt, grads):
            out[i] = torch.zeros_like(t) if g is None else g
    if has_bias and need[2]:
        out[2] = grad.reshape(-1, grad.shape[-1]).sum(0)
    return tuple(out)


def _records_grad(x, weight, bias, A1, A2, B1, B2) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or A1.requires_grad or A2.requires_grad or B1.requires_grad
                                        or B2.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


@torch.library.impl(_lib, "linear", "Autograd")
def _linear_autograd(x, weight, bias, A1, A2, B1, B2, scale):
    if _records_grad(x, weight, bias, A1, A2, B1, B2):
        return _LinearStep.apply(x, weight, bias, A1, A2, B1, B2, scale, None)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.lsr.linear.default(x, weight, bias, A1, A2, B1, B2, scale)


_PLAIN = (Tensor, torch.nn.Parameter)


def _plain(*tensors) -> bool:
    """Eager calls on plain tensors, with no dispatch mode, subclass, functorch transform or tracer to see the
    op: these skip the dispatcher and run the op's implementation directly (the dispatcher's round trips were
    a third of a tiny layer's host time). Everything else goes through ``torch.ops.lsr.linear`` (which
    ``torch.jit.trace`` records as one call)."""
    return (not torch.compiler.is_compiling()  # first: Dynamo folds it, and traces nothing after it
            and not torch._C._len_torch_dispatch_stack() and not torch._C._are_functorch_transforms_active()
            and not torch._C._get_tracing_state() and all(type(t) in _PLAIN for t in tensors))


# autograd.Function.apply's Python wrapper binds default arguments and unwraps functorch's dead wrappers: plain
# eager calls have neither, and its C++ base saves ~6 µs of a ~150 µs tiny step on the CI machine
_step_apply = super(torch.autograd.Function, _LinearStep).apply


def layer_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor,
                 scale: float) -> Tensor:
    """``lsr_linear`` as a layer calls it (``nn.lsr_forward``): ``scale`` a number, autocast and torch.func
    transforms already handled by the caller, so nothing is checked per call beyond the signature cache.
    Under forward-mode AD (dual tensors) the plain-PyTorch formulation, which carries tangents. Factors in
    another dtype than the base (peft's float32 adapters over a bfloat16 model): a training step whose chosen
    kernels compute the adapter in the factors' dtype gets them as they are; everything else gets them cast
    to the base's dtype (gradients reach them through the cast)."""
    if forward_ad._current_level >= 0:
        return step.lsr_linear(x, weight, bias, A1, A2, B1, B2, scale)
    plain = _plain(x, weight, A1, A2, B1, B2) and (bias is None or type(bias) in _PLAIN)
    step_ = plain and _records_grad(x, weight, bias, A1, A2, B1, B2)
    if A1.dtype != weight.dtype:
        if step_:
            kernels = dispatch.step_kernels(_flat(x), weight, bias, A1, A2, B1, B2, check_layer_args)
            if kernels is not None:
                return _step_apply(x, weight, bias, A1, A2, B1, B2, float(scale), kernels)
        A1, A2, B1, B2 = (t.to(weight.dtype) for t in (A1, A2, B1, B2))
    if step_:
        kernels = dispatch.step_kernels(_flat(x), weight, bias, A1, A2, B1, B2, check_args)
        return _step_apply(x, weight, bias, A1, A2, B1, B2, float(scale), kernels)
    if plain:
        return _forward(x, weight, bias, A1, A2, B1, B2, float(scale))[0]
    return torch.ops.lsr.linear(x, weight, bias, A1, A2, B1, B2, float(scale))


def check_layer_args(x, weight, bias, A1, A2, B1, B2):
    """``check_args`` for a layer whose factors are kept in another floating dtype than its base."""
    cast = [f.to(weight.dtype) if isinstance(f, Tensor) and f.is_floating_point() else f for f in (A1, A2, B1, B2)]
    check_args(x, weight, bias, *cast)


def lsr_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor,
               scale) -> Tensor:
    """``y = x Wᵀ + bias + scale·(x Aᵀ) Bᵀ`` through the tuned kernels, with the reference's signature and
    meaning: ``scale`` a number or a one-element tensor (one that requires grad gets its gradient); under
    autocast every operand in the autocast dtype, as ``nn.Linear`` and ``LSRLinear`` compute; under torch.func
    transforms (grad, vmap, jvp) the plain-PyTorch formulation, which they can differentiate."""
    if isinstance(scale, Tensor):
        B2, scale = _scale_into_B2(B2, scale)
    if torch._C._are_functorch_transforms_active():
        return step.lsr_linear(x, weight, bias, A1, A2, B1, B2, scale)
    dt = autocast_dtype(x)
    if dt is not None:
        with torch.autocast(x.device.type, enabled=False):
            x, weight, bias, A1, A2, B1, B2 = (t.to(dt) if isinstance(t, Tensor) and t.is_floating_point() else t
                                               for t in (x, weight, bias, A1, A2, B1, B2))
            return layer_linear(x, weight, bias, A1, A2, B1, B2, scale)
    return layer_linear(x, weight, bias, A1, A2, B1, B2, scale)


def _scale_into_B2(B2: Tensor, scale: Tensor):
    """A tensor ``scale``: its value, or, where it is differentiated (it requires grad, or a torch.func transform
    is on), folded into B2 (``Σ B1 ⊗ (scale·B2)`` is ``scale·B``) so that every kernel gives it its gradient
    through B2's, and B2 its own."""
    if scale.numel() != 1:
        raise LSRInputError(f"scale must be one number (a float or a one-element tensor), got a tensor of shape "
                            f"{tuple(scale.shape)}")
    if (scale.requires_grad and torch.is_grad_enabled()) or torch._C._are_functorch_transforms_active():
        return B2 * scale.reshape(()), 1.0
    return B2, float(scale)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes ``x``'s device's ops in, or None: autocast off there, or a device autocast
    does not know (meta tensors, which ``nn.Linear`` takes)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    device = x.device.type
    try:
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    except RuntimeError:  # "unknown device type for autocast"
        return None


# ---- a mixed batch -------------------------------------------------------------------------------------------

def check_mixed_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1, A2, B1, B2, scales, seg_indptr,
                     seg_adapter) -> None:
    """The bank (factors with a leading slot axis, one scale per slot) and the segments. The values of the
    assignment are checked when it is on the CPU (on a GPU that would wait for the device every call)."""
    for name, t in (("A1", A1), ("A2", A2), ("B1", B1), ("B2", B2)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise LSRInputError(f"{name} must be a 4-D bank (K, s, rows, cols), got "
                                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    K = A1.shape[0]
    if not (A2.shape[0] == B1.shape[0] == B2.shape[0] == K):
        raise LSRInputError(f"A1, A2, B1, B2 must hold the same number of slots K (dim 0); got "
                            f"{A1.shape[0]}, {A2.shape[0]}, {B1.shape[0]}, {B2.shape[0]}")
    # one slot's factors (an empty bank, K = 0, serves base-only segments: its factor shapes still count)
    check_args(x, weight, bias, *(t[0] if K else t.new_empty(t.shape[1:]) for t in (A1, A2, B1, B2)))
    if not isinstance(scales, Tensor) or tuple(scales.shape) != (K,) or not scales.is_floating_point():
        raise LSRInputError(f"scales must be a float tensor of shape ({K},) (one per slot), got "
                            f"{tuple(scales.shape) if isinstance(scales, Tensor) else type(scales).__name__}")
    for name, t in (("seg_indptr", seg_indptr), ("seg_adapter", seg_adapter)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            raise LSRInputError(f"{name} must be a 1-D int64 tensor, got "
                                f"{(t.dtype, tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__}")
    if seg_indptr.shape[0] != seg_adapter.shape[0] + 1:
        raise LSRInputError(f"seg_indptr has {seg_indptr.shape[0]} entries, seg_adapter {seg_adapter.shape[0]}: "
                            f"S segments need S + 1 offsets")
    devices = {"x": x.device, "scales": scales.device, "seg_indptr": seg_indptr.device,
               "seg_adapter": seg_adapter.device}
    if len(set(devices.values())) > 1:
        raise LSRInputError(f"device mismatch {devices}; the bank, the scales and the segments go with x")
    if seg_indptr.device.type == "cpu" and not isinstance(seg_indptr, torch._subclasses.FakeTensor):
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        ptr = seg_indptr.tolist()
        if ptr[0] != 0 or ptr[-1] != rows or any(b < a for a, b in zip(ptr, ptr[1:])):
            raise LSRInputError(f"seg_indptr must rise from 0 to the number of rows ({rows}), got {ptr[:8]}"
                                f"{' ...' if len(ptr) > 8 else ''}")
        bad = [k for k in seg_adapter.tolist() if not -1 <= k < K]
        if bad:
            raise LSRInputError(f"seg_adapter holds slots {bad[:5]} outside [-1, {K}) (K = {K} slots; -1 = none)")


@torch.library.impl(_lib, "mixed_linear", "CompositeExplicitAutograd")
def _mixed_linear(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
    check_mixed_args(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)
    x2 = _flat(x)
    if A1.shape[0] == 0:  # an empty bank: every segment is base-only (-1)
        return F.linear(x, weight, bias)
    fn = dispatch.kernel("mixed_forward", x2, A1, A2, B1, B2, segments=seg_adapter.shape[0])
    y = fn(x2, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)
    return y.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.impl(_lib, "mixed_linear_backward", "CompositeExplicitAutograd")
def _mixed_linear_backward(grad, x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, need_dx):
    x2, g2 = _flat(x), _flat(grad)
    if A1.shape[0] == 0:  # an empty bank: the base alone, no factor to differentiate
        dx = torch.mm(g2, weight) if need_dx else None
        dA1, dA2, dB1, dB2 = (torch.zeros_like(t) for t in (A1, A2, B1, B2))
    else:
        fn = dispatch.kernel("mixed_backward", x2, A1, A2, B1, B2, segments=seg_adapter.shape[0])
        dx, dA1, dA2, dB1, dB2 = fn(g2, x2, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, need_dx)
    dx = dx.reshape(x.shape) if need_dx else x.new_empty(0)
    return dx, dA1, dA2, dB1, dB2


@torch.library.register_fake("lsr::mixed_linear", lib=_lib)
def _mixed_linear_fake(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
    check_mixed_args(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("lsr::mixed_linear_backward", lib=_lib)
def _mixed_linear_backward_fake(grad, x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter, need_dx):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(A1), torch.empty_like(A2), torch.empty_like(B1), torch.empty_like(B2)


def _mixed_setup_context(ctx, inputs, output):
    x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter = inputs
    if scales.requires_grad:
        raise LSRInputError("scales requires grad, but a bank's scales are constants (alpha over the rank, per "
                            "slot) and get no gradient: pass scales.detach(), and train the factors")
    ctx.save_for_backward(x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)
    ctx.has_bias = bias is not None


def _mixed_backward(ctx, grad):
    x, weight, A1, A2, B1, B2, scales, seg_indptr, seg_adapter = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA1, dA2, dB1, dB2 = torch.ops.lsr.mixed_linear_backward(grad, x, weight, A1, A2, B1, B2, scales,
                                                                 seg_indptr, seg_adapter, need[0])
    dW = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if need[1] else None
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and need[2] else None
    return (dx if need[0] else None), dW, db, dA1, dA2, dB1, dB2, None, None, None


torch.library.register_autograd("lsr::mixed_linear", _mixed_backward, setup_context=_mixed_setup_context, lib=_lib)


def mixed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor,
                 scales: Tensor, seg_indptr: Tensor, seg_adapter: Tensor) -> Tensor:
    """Rows ``seg_indptr[i]:seg_indptr[i+1]`` of ``x`` (leading dims flattened) through the base plus bank slot
    ``seg_adapter[i]`` (``-1``: the base alone), through the tuned kernels; under torch.func transforms (grad,
    vmap, jvp) through the plain-PyTorch ``factored`` formulation, which they can differentiate."""
    if torch._C._are_functorch_transforms_active():
        check_mixed_args(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)
        y = mixed_formulations.forward_factored(_flat(x), weight, bias, A1, A2, B1, B2, scales, seg_indptr,
                                                seg_adapter)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return torch.ops.lsr.mixed_linear(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter)


# ---- the adapter alone, beside a quantized base ----------------------------------------------------------------

def check_adapter_args(x: Tensor, A1, A2, B1, B2, base: str) -> None:
    """``lsr::adapter`` is public: its inputs are checked against the adapter's own shapes (a packed quantized
    weight does not show the layer's), and ``base`` must name a format tuning logs can key (an unknown name
    would be a key no layer ever looks up)."""
    from .quantized import FORMATS

    if base not in FORMATS:
        raise LSRInputError(f"base={base!r} is not a base format; known: {', '.join(FORMATS)}")
    for name, t in (("A1", A1), ("A2", A2), ("B1", B1), ("B2", B2)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise LSRInputError(f"{name} must be a 3-D factor tensor (s, rows, cols), got "
                                f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not isinstance(x, Tensor) or x.dim() == 0:
        raise LSRInputError(f"x must be a tensor with a last dimension d_in, got "
                            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    d_out, d_in = B1.shape[1] * B2.shape[1], A1.shape[2] * A2.shape[2]
    check_args(x, x.new_empty(()).expand(d_out, d_in), None, A1, A2, B1, B2)


@torch.library.impl(_lib, "adapter", "CompositeExplicitAutograd")
def _adapter(x, A1, A2, B1, B2, scale, base):
    check_adapter_args(x, A1, A2, B1, B2, base)
    x2 = _flat(x)
    out = dispatch.kernel("adapter_forward", x2, A1, A2, B1, B2, base=base)(x2, A1, A2, B1, B2, scale)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@torch.library.impl(_lib, "adapter_backward", "CompositeExplicitAutograd")
def _adapter_backward(grad, x, A1, A2, B1, B2, scale, base, need_dx):
    x2, g2 = _flat(x), _flat(grad)
    dx, dA1, dA2, dB1, dB2 = dispatch.kernel("adapter_backward", x2, A1, A2, B1, B2, base=base)(
        g2, x2, A1, A2, B1, B2, scale, need_dx)
    return (dx.reshape(x.shape) if need_dx else x.new_empty(0)), dA1, dA2, dB1, dB2


@torch.library.register_fake("lsr::adapter", lib=_lib)
def _adapter_fake(x, A1, A2, B1, B2, scale, base):
    check_adapter_args(x, A1, A2, B1, B2, base)
    return x.new_empty(*x.shape[:-1], B1.shape[1] * B2.shape[1])


@torch.library.register_fake("lsr::adapter_backward", lib=_lib)
def _adapter_backward_fake(grad, x, A1, A2, B1, B2, scale, base, need_dx):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    return dx, torch.empty_like(A1), torch.empty_like(A2), torch.empty_like(B1), torch.empty_like(B2)


def _adapter_setup_context(ctx, inputs, output):
    x, A1, A2, B1, B2, scale, base = inputs
    ctx.save_for_backward(x, A1, A2, B1, B2)
    ctx.scale, ctx.base = scale, base


def _adapter_grad(ctx, grad):
    x, A1, A2, B1, B2 = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA1, dA2, dB1, dB2 = torch.ops.lsr.adapter_backward(grad, x, A1, A2, B1, B2, ctx.scale, ctx.base, need[0])
    return (dx if need[0] else None), dA1, dA2, dB1, dB2, None, None


torch.library.register_autograd("lsr::adapter", _adapter_grad, setup_context=_adapter_setup_context, lib=_lib)


def quantized_base_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1: Tensor, A2: Tensor, B1: Tensor,
                          B2: Tensor, scale: float, base: str, base_forward=None) -> Tensor:
    """The layer over a quantized base: the base through its own module's forward (``base_forward``, e.g.
    bitsandbytes' ``Linear4bit``) or ``F.linear`` on the quantized tensor (torchao) — its library's kernels and
    autograd, no full-precision copy — plus ``lsr::adapter``."""
    update = adapter_update(x, A1, A2, B1, B2, scale, base)
    base_out = base_forward(x) if base_forward is not None else torch.nn.functional.linear(x, weight, bias)
    return base_out + update.to(base_out.dtype)


def adapter_update(x: Tensor, A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor, scale: float, base: str) -> Tensor:
    """``scale·(x Aᵀ) Bᵀ`` through ``lsr::adapter``, in the factors' dtype (the autocast dtype under autocast);
    checked against the adapter's own shapes (a packed quantized weight does not show the layer's)."""
    xa = x if not x.is_floating_point() else x.to(A1.dtype)
    return torch.ops.lsr.adapter(xa, A1, A2, B1, B2, float(scale), base)
