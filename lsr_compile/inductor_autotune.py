"""Stage 5, beside the op registry: LSR's candidates for ``torch.compile(mode="max-autotune")``.

Inductor has a hook for custom ops (``torch._inductor.kernel.custom_op.register_custom_op_autotuning``): several
implementations of an op, each benchmarked inside the compiled graph, the winner inlined where it is a
decomposition (so Inductor fuses it with its neighbours) or called where it is the op itself; over a range of
one dimension (the token count) it may pick one winner per range and dispatch between them at run time.
When Inductor compiles in max-autotune mode (its config ``max_autotune``) and this torch has the hook, the
layer's ops become two ops of this module, and Inductor benchmarks for each:

    lsr::linear_autotuned(x (N, d_in), weight, A1, A2, B1, B2, bias?, scale, impl) -> y
        the forward: the PyTorch formulations (fold, materialise, factored) as decompositions, the compiled
        kernels that can run on the device as opaque calls (TVM's default on a CPU; Triton's on a GPU), and the
        op itself, which runs what dispatch picks at run time (the tuning logs' record, or the default): one
        winner per token range when the token count is dynamic (``SPLIT_POINTS``), else at the traced count
    lsr::linear_backward_autotuned(dy, x, weight, A1, A2, B1, B2, A, Bt, scale, need_dx, impl) -> packed
        the backward: its formulations (fold, materialise), the compiled kernels, the op itself; the five
        gradients flattened into one tensor (dx first, when asked for)

What the hook cannot express, and what is done instead:
  - it takes ops with one output only: the step's ``linear_forward`` (y and what the backward reuses) and
    ``linear_backward`` (five gradients) have several. Under max-autotune the forward is ``linear_autotuned``
    and A and Bᵀ beside it in ATen (small: q rows), tT and the folded weight not handed over (the backward's
    candidates compute them); the backward returns its gradients packed (one copy of them more per step,
    every candidate alike).
  - its ranges vary the size of one input, and the backward has two of the token count (dy and x): the
    backward is benchmarked at the traced token count only (the op itself, where it wins, still dispatches by
    the token count at run time).

Which torch has it: 2.12 and 2.13 (the same hook: any op, config generators, ranges); 2.10 and 2.11 have a hook
that takes only ops made with ``@torch.library.custom_op`` (LSR's are ``torch.library`` ops, 5 µs a call against
22 µs), 2.10's without ranges; 2.9 and older none. The check is by feature (``missing``), not by version.

Everywhere else (default mode, a torch without the hook, a backend forced by ``use_backend``) nothing changes:
the choice of dispatch is baked into the graph as before (``ops._prepare_inductor``). Nothing here imports
Inductor before a graph is compiled.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from . import dispatch, kernels, step
from .problem import ProblemKey

log = logging.getLogger(__name__)

SPLIT_POINTS = [16, 128, 1024]
"""Token counts where the forward's ranges split ([1, 16], [17, 128], [129, 1024], [1025, ∞)): dispatch's
power-of-two buckets, every third. Each range is benchmarked at its top, the last at ``UNBOUNDED_ROWS``."""
UNBOUNDED_ROWS = 4096

_lib = torch.library.Library("lsr", "FRAGMENT")
_lib.define("linear_autotuned(Tensor x, Tensor weight, Tensor A1, Tensor A2, Tensor B1, Tensor B2, Tensor? bias, "
            "float scale, str impl) -> Tensor")
_lib.define("linear_backward_autotuned(Tensor grad, Tensor x, Tensor weight, Tensor A1, Tensor A2, Tensor B1, "
            "Tensor B2, Tensor A, Tensor Bt, float scale, bool need_dx, str impl) -> Tensor")
# Tensors first and the optional bias after them: the hook hands candidates the tensors by position and
# every other argument by name, so an absent bias must not shift the factors.

OPS = ("linear_autotuned", "linear_backward_autotuned")


# ---- the ops ---------------------------------------------------------------------------------------------------

def _pack(grads, need_dx: bool) -> Tensor:
    dx, *factor_grads = grads
    return torch.cat([t.reshape(-1) for t in ([dx] if need_dx else []) + factor_grads])


def unpack(packed: Tensor, x: Tensor, A1, A2, B1, B2, need_dx: bool):
    """(dx or an empty tensor, dA1, dA2, dB1, dB2) as views of the packed gradients."""
    out, at = [], 0
    for t in ([x] if need_dx else []) + [A1, A2, B1, B2]:
        n = t.numel()
        out.append(packed[at:at + n].view(t.shape))
        at = at + n
    return tuple(out) if need_dx else (x.new_empty(0), *out)


@functools.lru_cache(maxsize=64)
def _named_kernel(op: str, spec: str, key: ProblemKey, device: torch.device) -> Callable:
    backend, variant, config = spec.split(":", 2)
    return kernels.build(backend, op, variant, json.loads(config), key, device)


def _kernel(op: str, spec: str, x, A1, A2, B1, B2) -> Callable:
    """The kernel a candidate names (``backend:variant:config``), or dispatch's choice for ``""``."""
    if not spec:
        return dispatch.kernel(op, x, A1, A2, B1, B2)
    return _named_kernel(op, spec, ProblemKey.from_tensors(op, x, A1, A2, B1, B2), x.device)


@torch.library.impl(_lib, "linear_autotuned", "CompositeExplicitAutograd")
def _linear_autotuned(x, weight, A1, A2, B1, B2, bias, scale, impl):
    return _kernel("forward", impl, x, A1, A2, B1, B2)(x, weight, bias, A1, A2, B1, B2, scale)[0]


@torch.library.impl(_lib, "linear_backward_autotuned", "CompositeExplicitAutograd")
def _linear_backward_autotuned(grad, x, weight, A1, A2, B1, B2, A, Bt, scale, need_dx, impl):
    none = x.new_empty(0)  # tT and the folded weight: not handed over, each kernel computes what it needs
    grads = _kernel("backward", impl, x, A1, A2, B1, B2)(grad, x, weight, A1, A2, B1, B2, A, Bt, none, none, scale,
                                                           need_dx)
    return _pack(grads, need_dx)


@torch.library.register_fake("lsr::linear_autotuned", lib=_lib)
def _linear_autotuned_fake(x, weight, A1, A2, B1, B2, bias, scale, impl):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("lsr::linear_backward_autotuned", lib=_lib)
def _linear_backward_autotuned_fake(grad, x, weight, A1, A2, B1, B2, A, Bt, scale, need_dx, impl):
    n = A1.numel() + A2.numel() + B1.numel() + B2.numel()
    return x.new_empty(n + x.numel() if need_dx else n)


def linear(x2d: Tensor, weight, bias, A1, A2, B1, B2, scale: float) -> Tensor:
    """The forward under max-autotune (``x2d``: rows flattened): one op Inductor autotunes."""
    return torch.ops.lsr.linear_autotuned(x2d, weight, A1, A2, B1, B2, bias, float(scale), "")


def backward(grad2d: Tensor, x2d: Tensor, weight, A1, A2, B1, B2, A, Bt, scale: float, need_dx: bool):
    """The backward under max-autotune: (dx or an empty tensor, dA1, dA2, dB1, dB2)."""
    packed = torch.ops.lsr.linear_backward_autotuned(grad2d, x2d, weight, A1, A2, B1, B2, A, Bt, float(scale),
                                                     bool(need_dx), "")
    return unpack(packed, x2d, A1, A2, B1, B2, need_dx)


# ---- the candidates --------------------------------------------------------------------------------------------

def _formulation(op: str, variant: str) -> Callable:
    """A PyTorch formulation as the hook calls a candidate: the op's tensors by position (the bias, where
    given, after the factors), the rest by name."""
    fn = kernels.torch_formulations(op)[variant]
    if op == "forward":
        def candidate(x, weight, A1, A2, B1, B2, bias=None, *, scale, impl=""):
            return fn(x, weight, bias, A1, A2, B1, B2, scale)[0]
    else:
        def candidate(grad, x, weight, A1, A2, B1, B2, A, Bt, *, scale, need_dx, impl=""):
            none = x.new_empty(0)
            return _pack(fn(grad, x, weight, A1, A2, B1, B2, A, Bt, none, none, scale, need_dx), need_dx)
    candidate.__name__ = candidate.__qualname__ = f"torch_{variant}"
    return candidate


_FORMULATIONS = {op: {v: _formulation(op, v) for v in sorted(kernels.torch_formulations(op))}
                 for op in ("forward", "backward")}


def compiled_forward(*tensors, impl: str, **kw):
    """A compiled kernel (named by ``impl``) as one opaque call in the candidate's graph."""
    return torch.ops.lsr.linear_autotuned(*tensors, **kw, impl=impl)


def compiled_backward(*tensors, impl: str, **kw):
    return torch.ops.lsr.linear_backward_autotuned(*tensors, **kw, impl=impl)


def compiled_candidates(op: str, key: ProblemKey, device: torch.device) -> list[str]:
    """``backend:variant:config`` of each compiled kernel offered for ``key`` on ``device``: each backend's
    default where it can run there (TVM on a CPU; Triton on a GPU: on a CPU it runs only in its interpreter,
    and TVM's CUDA kernels are built ahead of time). A tuned compiled kernel is what the op itself runs."""
    backends = ("tvm",) if device.type == "cpu" else ("triton",) if device.type == "cuda" else ()
    out = []
    for backend in backends:
        if kernels.unavailable(backend, device) is not None:
            continue
        try:
            variant, config = kernels.default_choice(backend, op, key, device)
        except ValueError:  # the backend has no kernel for this op, dtype or problem
            continue
        if kernels.static_problem(backend, op, variant, config, key, device) is None:
            out.append(f"{backend}:{variant}:{json.dumps(config, sort_keys=True)}")
    return out


def _configs(op: str, tensors: dict) -> list:
    """The hook's config generator: LSR's candidates for the problem these (fake) tensors make."""
    from torch._inductor.kernel.custom_op import CustomOpConfig

    x, A1, A2, B1, B2 = (tensors[n] for n in ("x", "A1", "A2", "B1", "B2"))
    configs = [CustomOpConfig(fn) for fn in _FORMULATIONS[op].values()]
    try:
        key = dispatch.traced_key(op, x, A1, A2, B1, B2)
        compiled = compiled_candidates(op, key, x.device)
    except Exception as e:  # noqa: BLE001 - a backend that cannot say is not offered
        log.debug("lsr: no compiled candidates for %s: %s", op, e)
        compiled = []
    fn = compiled_forward if op == "forward" else compiled_backward
    return configs + [CustomOpConfig(fn, impl=spec) for spec in compiled]


# ---- registration ----------------------------------------------------------------------------------------------

_state: dict = {"registered": False, "missing": None, "warned": False}
_depth = [0]
_picks: dict[str, tuple[str, dict]] = {}


def missing() -> Optional[str]:
    """Why this torch's Inductor cannot autotune LSR's ops (None: it can). Imports Inductor."""
    if _state["missing"] is None and not _state["registered"]:
        _state["missing"] = _why_missing() or ""
    return _state["missing"] or None


def _why_missing() -> Optional[str]:
    version = torch.__version__.split("+")[0]
    try:
        from torch._inductor import lowering
        from torch._inductor.kernel import custom_op
    except ImportError:
        return f"torch {version} has no custom-op autotuning in Inductor (torch._inductor.kernel.custom_op)"
    if not hasattr(custom_op, "register_custom_op_autotuning"):
        return f"torch {version} has no register_custom_op_autotuning"
    if not hasattr(lowering, "user_lowerings"):
        return (f"torch {version}'s register_custom_op_autotuning takes only ops made with @torch.library.custom_op "
                f"(LSR's are torch.library ops, 5 µs a call against 22 µs)")
    import inspect

    params = inspect.signature(custom_op.register_custom_op_autotuning).parameters
    lacking = [p for p in ("config_generator", "dispatch_on", "split_points") if p not in params]
    if lacking:
        return f"torch {version}'s register_custom_op_autotuning has no {', '.join(lacking)}"
    return None


def prepare() -> None:
    """Register LSR's ops with the hook (once; from ``ops._prepare_inductor``, when a graph is first traced)."""
    if _state["registered"] or missing() is not None:
        return
    from torch._inductor import lowering
    from torch._inductor.kernel.custom_op import register_custom_op_autotuning
    from torch._inductor.select_algorithm import add_feedback_saver

    for name, op, tuned in (("lsr_linear", "forward", torch.ops.lsr.linear_autotuned.default),
                            ("lsr_linear_backward", "backward", torch.ops.lsr.linear_backward_autotuned.default)):
        lowering.make_fallback(tuned, layout_constraint=None, warn=False)  # a pinned kernel, or the op itself
        generator = functools.partial(_configs, op)
        try:
            register_custom_op_autotuning(tuned, config_generator=generator, name=name)
            whole = lowering.user_lowerings.pop(tuned)
            ranged = None
            if op == "forward":  # ranges over the token count: x's rows (the backward has two such inputs)
                register_custom_op_autotuning(tuned, config_generator=generator, name=f"{name}_by_tokens",
                                              dispatch_on={"tensor_name": "x", "dim": 0,
                                                           "range_upper_bound": UNBOUNDED_ROWS},
                                              split_points=list(SPLIT_POINTS))
                ranged = lowering.user_lowerings.pop(tuned)
        except (TypeError, ValueError) as e:  # a hook whose interface changed: as if it were missing
            _state["missing"] = f"torch {torch.__version__}'s register_custom_op_autotuning refused LSR's op ({e})"
            lowering.user_lowerings.pop(tuned, None)
            return
        lowering.user_lowerings[tuned] = _gated(whole, ranged)
    add_feedback_saver(_record)
    _state["registered"] = True


def _gated(whole: Callable, ranged: Optional[Callable]) -> Callable:
    """The hook's lowering only in max-autotune mode, for the op itself (not a candidate's pinned kernel), and
    never inside itself; the ranges where the token count is dynamic."""
    def lower(*args, **kwargs):
        from torch._inductor import config

        impl = kwargs.get("impl", args[-1] if isinstance(args[-1], str) else "")
        if not config.max_autotune or impl or _depth[0]:
            return None  # Inductor's own lowering: one call of the op
        fn = whole
        if ranged is not None and not _static(args[0].get_size()[0]):
            fn = ranged
        args = tuple(_strided(a) for a in args)
        _depth[0] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth[0] -= 1
    return lower


def _strided(arg):
    """An input with a layout: the hook reads its strides, and a view Inductor has not computed has none (A and
    Bᵀ recomputed in the backward graph); those are copied (q rows)."""
    from torch._inductor import ir

    if not isinstance(arg, ir.TensorBox):
        return arg
    try:
        arg.get_stride()
        return arg
    except NotImplementedError:
        return ir.ExternKernel.copy_input(arg)


def _static(size) -> bool:
    try:
        int(size)
        return True
    except TypeError:
        return False


_enabled = [True]


def enabled() -> bool:
    return _enabled[0]


@contextlib.contextmanager
def disabled():
    """``with disabled(): compiled(x)``: graphs compiled inside the block in max-autotune mode keep dispatch's
    choice for LSR's layers (Inductor still autotunes its own kernels): the compile time of LSR's candidates
    saved, or their effect measured."""
    old, _enabled[0] = _enabled[0], False
    try:
        yield
    finally:
        _enabled[0] = old


def active(x: Tensor) -> bool:
    """Whether the op being decomposed for Inductor is to be autotuned among LSR's candidates: Inductor compiles
    in max-autotune mode, no backend is forced, not ``disabled``, and the hook is there (where it is not, says
    so once)."""
    from torch._inductor import config

    if (not config.max_autotune or not _enabled[0] or dispatch.forced() is not None
            or x.device.type not in ("cpu", "cuda")):
        return False
    prepare()
    if _state["registered"]:
        return True
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"lsr_compile: torch.compile(mode='max-autotune') cannot benchmark LSR's kernels here: "
                      f"{missing()}. LSR layers keep dispatch's choice (the tuning logs' record or the default), as "
                      f"in default mode; torch >= 2.12 has the hook LSR uses", RuntimeWarning, stacklevel=2)
    return False


# ---- what Inductor picked --------------------------------------------------------------------------------------

def _label(choice) -> str:
    decomposition = getattr(choice, "decomposition", None)
    if decomposition is None:
        return "dispatch"  # the op itself: what dispatch runs at run time
    impl = (getattr(choice, "decomposition_kwargs", None) or {}).get("impl")
    return impl or decomposition.__name__


def _record(timings, name, input_nodes, choices, profiled, *rest) -> None:
    """Inductor's feedback after each autotuning: LSR's ops' timings, by candidate."""
    if not name.startswith("lsr_linear"):
        return
    times = {_label(c): float(t) for c, t in timings.items()}
    if not times:
        return
    first = 1 if name.startswith("lsr_linear_backward") else 0  # the backward's inputs start with dy
    try:
        (rows, _), (d_out, d_in) = (n.get_size() for n in input_nodes[first:first + 2])  # x, weight
        where = f" {d_out}x{d_in} N={rows}"
    except Exception:  # noqa: BLE001 - the name alone
        where = ""
    _picks[name + where] = (min(times, key=times.get), times)


def picks() -> dict[str, tuple[str, dict]]:
    """What Inductor picked in this process, per autotuned op, layer shape and token range: ``{"lsr_linear
    768x768 N=2048": (winner, {candidate: ms})}`` (``lsr_linear_by_tokens_range_17_128 ... N=s0`` for a range
    of a dynamic token count; ``lsr_linear_backward``: the backward); a candidate is ``torch_<variant>`` (a
    PyTorch formulation, inlined), ``backend:variant:config`` (a compiled kernel, one call) or ``dispatch`` (the
    op itself: dispatch's choice at run time). Inductor picks the fastest."""
    return dict(_picks)


def clear_picks() -> None:
    _picks.clear()


def describe() -> str:
    """One line for ``explain``: what max-autotune does with LSR's ops in this process. Imports Inductor."""
    why = missing()
    if why is not None:
        return (f"under torch.compile(mode='max-autotune'): the same choice ({why}; torch >= 2.12 has the hook "
                f"LSR's candidates need)")
    return ("under torch.compile(mode='max-autotune'): Inductor benchmarks the PyTorch formulations, the compiled "
            "kernels that run here and dispatch's choice in the compiled graph (lsr_compile.inductor_autotune)")
