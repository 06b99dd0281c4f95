"""What a step costs on a device, from its plan: every call it makes, found by running it on tensors without
data (``trace``), priced with the device's two measured ceilings and its host's cost per call (``price``).

    trace(fn, *args)   -> [Call]     each ATen op (a kernel, a view or an allocation: what a TorchDispatchMode
                                     sees) and each Triton launch (``triton_fused.launch``), in order, with the
                                     bytes it reads and writes and the FLOPs it does
    price(calls, m)    -> Price      GPU time = Σ max(FLOPs / peak, bytes / bandwidth, waits · round trip)
                                     + a fixed time per kernel (waits: the memory round trips one program
                                     makes in turn, what no pipeline hides: latency, not bytes);
                                     host time = Σ the host's cost of each call + the step's fixed entries;
                                     a step costs the larger of the two (the host issues ahead of the GPU)

``H200`` is calibrated on the GPU check's rows from the project's H200 (``tests/test_costmodel.py`` checks
the frozen layer, plain LoRA and the LSR step of that run against them); ``dispatch`` uses ``cheapest`` as
the default for problems no tuning record covers on a GPU, and the GPU check prints its predictions beside
what it measures. It knows nothing of caches, of cuBLAS's choice of algorithm or of overlap between kernels:
a step's ratio to the frozen layer, not its microseconds, is what it is for.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that launch nothing: metadata only, or memory from the caching allocator
VIEWS = frozenset({"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "select",
                   "slice", "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "narrow",
                   "reshape", "lift_fresh", "_reshape_alias", "numpy_T", "view_as"})
ALLOCS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})
GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm"})


@dataclass(frozen=True)
class Call:
    """One call a step makes: ``kind`` "kernel" (runs on the device), "view" or "alloc" (host only)."""

    name: str
    kind: str
    flops: float = 0.0
    bytes: float = 0.0
    source: str = "aten"  # "aten" or "triton"
    waits: float = 0.0  # memory round trips one program waits for in turn (loads no pipeline hides), longest


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def aten_calls(func, args, kwargs, out) -> list[Call]:
    """The calls one ATen op makes. A GEMM: 2·m·n·k FLOPs; out-of-place ``addmm`` with a matrix to add first
    copies it into the output (a kernel of its own), then reads it again (β = 1); a bias vector goes into the
    epilogue, and ``addmm_`` adds into the matrix itself."""
    packet = func.overloadpacket.__name__
    name, in_place = packet.rstrip("_"), packet.endswith("_") and not packet.startswith("_")
    if name in VIEWS:
        return [Call(name, "view")]
    if name in ALLOCS:
        return [Call(name, "alloc")]
    ins, outs = _tensors(list(args) + list(kwargs.values())), _tensors(out)
    moved = sum(_nbytes(t) for t in ins + outs)
    if name in GEMMS:
        a, b = (args[0], args[1]) if name in ("mm", "bmm") else (args[1], args[2])
        flops = 2.0 * a.numel() * b.shape[-1]
        if (name == "addmm" and not in_place and args[0].dim() == 2
                and kwargs.get("beta", args[3] if len(args) > 3 else 1) != 0):
            return [Call("copy", "kernel", 0.0, 2.0 * _nbytes(args[0])), Call(name, "kernel", flops, moved)]
        return [Call(name, "kernel", flops, moved)]
    return [Call(name, "kernel", float(sum(t.numel() for t in outs)), moved)]


# FLOPs of the package's Triton kernels, from their launch arguments and constexprs (the memory they move is
# their tensors). The fused kernels are priced as they run: ``x Aᵀ`` at its padded width (BLOCK_R) once per
# column tile (pointers) or once per column of a wave (persistent), and the epilogue's dot at least 16 deep.
def _adapter_flops(m, n, k, meta, times: int) -> float:
    return 2.0 * m * k * meta["BLOCK_R"] * times + 2.0 * m * n * max(16, meta["BLOCK_R"])


def _fused_flops(a, meta) -> float:
    m, n, k = a[7], a[8], a[9]
    return 2.0 * m * n * k + _adapter_flops(m, n, k, meta, -(-n // meta["BLOCK_N"]))


def _fused_tma_flops(a, meta) -> float:
    m, n, k, wave_n = a[7], a[8], a[9], a[-1]
    return 2.0 * m * n * k + _adapter_flops(m, n, k, meta, wave_n)


def _mixed_groups(a, meta) -> int:
    """Programs sharing one row tile's column blocks (``triton_mixed.column_groups``): each computes the
    tile's ``x A_kᵀ`` and reads its rows of x."""
    d_out, cols = a[9], a[11]
    return -(-(-(-d_out // meta["BLOCK_N"])) // cols)


def _mixed_flops(a, meta) -> float:
    n, d_in, d_out = a[0].shape[0], a[8], a[9]
    return 2.0 * n * d_in * meta["BLOCK_R"] * _mixed_groups(a, meta) + 2.0 * n * d_out * meta["BLOCK_R"]


TRITON_FLOPS: dict[str, Callable[[tuple, dict], float]] = {
    "_fold_kernel": lambda a, _: 2.0 * a[0].numel() * a[3].shape[0],  # W (d_out, d_in), A (q, d_in)
    "_dy_pass_kernel": lambda a, _: 4.0 * a[0].numel() * a[1].shape[0],  # dy (N, d_out), Bt (q, d_out)
    "_factors_kernel": lambda a, _: 2.0 * a[6] * (a[4].numel() + a[5].numel()),  # s · (A + Bt)
    "_project_kernel": lambda a, _: 4.0 * a[12] * (a[0].numel() + a[1].numel() // a[1].shape[0]),  # s · (dA + dBt)
    "_fused_lsr_kernel": _fused_flops,
    "_fused_lsr_tma_kernel": _fused_tma_flops,
    "_mixed_lsr_kernel": _mixed_flops,
}

# Bytes beyond each tensor once: the projection's dB programs read the partial sums twice (dB1's slices, then
# dB2's), the mixed kernel reads y and writes it back and reads x once per column group.
TRITON_EXTRA_BYTES: dict[str, Callable[[tuple, dict], float]] = {
    "_project_kernel": lambda a, _: _nbytes(a[1]),
    "_mixed_lsr_kernel": lambda a, meta: _nbytes(a[4]) + (_mixed_groups(a, meta) - 1) * _nbytes(a[0]),
}


def _project_waits(a, meta) -> float:
    """The projection's longest program: ``KO·⌈KT/BLOCK_K⌉`` tiles, each waiting ⌈P/UNROLL_P⌉ times for loads of the
    partial sums (dB programs; dA programs read one, P = 1)."""
    P, r1, r2, n1, n2, m1, m2 = a[2], a[13], a[14], a[15], a[16], a[17], a[18]
    bk, bp = meta["BLOCK_K"], meta["UNROLL_P"]
    tiles = lambda ko, kt: ko * -(-kt // bk)  # noqa: E731
    return max(max(tiles(r2, n2), tiles(r1, n1)), max(tiles(r2, m2), tiles(r1, m1)) * -(-P // bp))


# Memory round trips a program of these kernels waits for one after another, beside its pipelined streaming
# (``Machine.round_trip_us`` each): the projection's reads of the partial sums, the pass over dy's
# read-modify-writes of its partial sum when a program takes several row blocks.
TRITON_WAITS: dict[str, Callable[[tuple, dict], float]] = {
    "_project_kernel": _project_waits,
    "_dy_pass_kernel": lambda a, meta: (a[8] - 1) * -(-a[6] // meta["BLOCK_D"]),
}


def triton_call(kernel, grid, args, meta) -> Call:
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    ts = [getattr(t, "base", t) for t in args]  # a TMA descriptor's tensor is its base
    ts = [t for t in ts if isinstance(t, torch.Tensor)]
    flops = TRITON_FLOPS.get(name, lambda a, _: 0.0)(args, meta)
    moved = sum(_nbytes(t) for t in ts) + TRITON_EXTRA_BYTES.get(name, lambda a, _: 0.0)(args, meta)
    waits = TRITON_WAITS.get(name, lambda a, _: 0.0)(args, meta)
    return Call(name, "kernel", flops, float(moved), "triton", float(waits))


class _Recorder(TorchDispatchMode):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.calls.extend(aten_calls(func, args, kwargs, out))
        return out


@contextlib.contextmanager
def recording(calls: list):
    """Inside: every ATen op and every Triton launch of the package is appended to ``calls``; the launches
    are not run (their tensors may hold no data) and take a GPU's arguments (full tiles)."""
    from .kernels import triton_fused

    old = triton_fused.recorder
    triton_fused.recorder = lambda kernel, grid, args, meta: calls.append(triton_call(kernel, grid, args, meta))
    try:
        with _Recorder(calls), triton_fused.gpu_arguments():
            yield calls
    finally:
        triton_fused.recorder = old


def trace(fn: Callable, *args) -> list[Call]:
    """The calls ``fn(*args)`` makes, in order (run it on meta tensors: nothing is computed)."""
    calls: list[Call] = []
    with recording(calls):
        fn(*args)
    return calls


# ---- a device --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Machine:
    """A device and the host that drives it, for ``price``."""

    name: str
    tflops: float  # dense GEMM rate in the step's dtype, TFLOP/s
    tb_s: float  # device memory bandwidth, TB/s
    kernel_us: float  # device time per kernel besides its roofline (launch latency, ramp, tail)
    round_trip_us: float = 0.0  # one memory round trip a program waits for (``Call.waits``)
    host_us: dict = field(default_factory=dict)  # host µs per call: "aten" kernel, "view", "alloc", "triton"
    entry_us: dict = field(default_factory=dict)  # host µs of a step's fixed parts: "module", "op", "node", ...


# The project's H200 (docs/design.md §5: bf16 GEMM 737-776 TFLOP/s, copy 4.1-4.2 TB/s; 5 µs per kernel besides,
# from the 4096² rows). Its host, fitted to the GPU check at 9d2c79e (results/gpu/gpu_check.jsonl;
# tests/test_costmodel.py): the host row (8 tokens, 16x16: F.linear 22.5 µs, plain LoRA's module 107.8, the old
# formulation 236.8, its op 279.3) gives 14.4 µs per ATen call that launches a kernel, 8.1 per view or
# allocation, 6-9 per module call (7.5) and 42.5 per custom-op call; the 768² forward+backward rows
# (host-bound) give 30.8 per autograd node and 58 per backward(). What remains of the old LSR step, 855 µs, is
# its op's autograd machinery
# (register_autograd, argument checks, two dispatches per direction): 4.2x the 203 µs measured for it on a
# CI CPU, whose host runs a call about 4x faster (F.linear 5.6 µs against 22.5). This step's own machinery
# (one autograd.Function's apply, saved tensors and Python, a lookup per step) is about 30 µs on the CI CPU,
# so 120 here (not calibrated: it never ran there). A Triton launch from Python: ~16 µs on a fast host (triton PR #7987), so 30 µs (not calibrated).
# A program waiting on memory: ~0.15 µs per round trip, an L2 hit on Hopper (~260 cycles at 1.75 GHz; published
# microbenchmarks, not measured here; what the projection reads was just written, so mostly L2). Not calibrated.
H200 = Machine(
    name="nvidia-h200-sm90", tflops=776.0, tb_s=4.2, kernel_us=5.0, round_trip_us=0.15,
    host_us={"aten": 14.4, "view": 8.1, "alloc": 8.1, "triton": 30.0},
    entry_us={"module": 7.5, "op": 42.5, "node": 30.8, "backward": 58.0, "old_op_autograd": 855.0,
              "glue": 60.0, "function": 200.0},
)


@dataclass(frozen=True)
class Price:
    gpu_us: float
    host_us: float
    kernels: int
    calls: int

    @property
    def us(self) -> float:
        """The step: the host issues calls ahead of the device, so the slower of the two sets the pace."""
        return max(self.gpu_us, self.host_us)


def price(calls: Iterable[Call], machine: Machine, entries: dict | None = None) -> Price:
    """Device and host time of ``calls`` on ``machine``; ``entries`` counts the step's fixed parts (module
    calls, custom-op calls, autograd nodes, backward() calls), priced by ``machine.entry_us``."""
    calls = list(calls)
    gpu = host = 0.0
    kernels = 0
    for c in calls:
        if c.kind == "kernel":
            kernels += 1
            gpu += max(c.flops / (machine.tflops * 1e6), c.bytes / (machine.tb_s * 1e6),
                       c.waits * machine.round_trip_us) + machine.kernel_us
            host += machine.host_us["triton" if c.source == "triton" else "aten"]
        else:
            host += machine.host_us[c.kind]
    host += sum(n * machine.entry_us[k] for k, n in (entries or {}).items())
    return Price(gpu, host, kernels, len(calls))


# ---- the steps the benchmark compares, as calls --------------------------------------------------------------

def _meta(*shape, dtype):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _autograd_step(forward: Callable, leaves: list, grads_exist: bool, backward: bool) -> tuple[list, dict]:
    """A step of a module built from ATen ops (autograd records it): its calls and its entries (autograd
    nodes run, one backward() call)."""
    calls: list[Call] = []
    with recording(calls):
        y = forward()
    entries = {"node": 0, "backward": 0}
    if backward:
        seen, todo = set(), [y.grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
        for leaf in leaves:
            leaf.grad = torch.zeros_like(leaf) if grads_exist else None
        with recording(calls):
            y.backward(torch.empty_like(y))
        entries = {"node": len(seen), "backward": 1}
    return calls, entries


def floor_step(d_in: int, d_out: int, tokens: int, dtype, backward: bool) -> tuple[list, dict]:
    """The frozen nn.Linear: forward, and the input gradient."""
    x = _meta(tokens, d_in, dtype=dtype).requires_grad_(backward)
    W, b = _meta(d_out, d_in, dtype=dtype), _meta(d_out, dtype=dtype)
    calls, entries = _autograd_step(lambda: torch.nn.functional.linear(x, W, b), [x], False, backward)
    return calls, {**entries, "module": 1}


def lora_step(d_in: int, d_out: int, q: int, tokens: int, dtype, backward: bool,
              grads_exist: bool = False) -> tuple[list, dict]:
    """Plain LoRA of rank q on the frozen layer (the benchmark's peer): ``base(x) + scale·(x Aᵀ) Bᵀ``."""
    x = _meta(tokens, d_in, dtype=dtype).requires_grad_(backward)
    W, b = _meta(d_out, d_in, dtype=dtype), _meta(d_out, dtype=dtype)
    A, B = _meta(q, d_in, dtype=dtype).requires_grad_(), _meta(d_out, q, dtype=dtype).requires_grad_()
    calls, entries = _autograd_step(
        lambda: torch.nn.functional.linear(x, W, b) + 0.5 * ((x @ A.T) @ B.T), [x, A, B], grads_exist, backward)
    return calls, {**entries, "module": 2}


def lsr_step(forward: Callable, backward: Callable | None, f, tokens: int, dtype, keep_folded: bool,
             grads_exist: bool = False) -> tuple[list, dict]:
    """A training step of the LSR layer with these forward and backward kernels (``kernels.build``), as the
    layer runs it: the forward's hand-over to the backward, W_eff dropped unless ``keep_folded``; one module
    call and one autograd Function (its node); with ``grads_exist`` the four factor gradients are added into
    existing ``.grad``s (one kernel each)."""
    x, W, b = _meta(tokens, f.d_in, dtype=dtype), _meta(f.d_out, f.d_in, dtype=dtype), _meta(f.d_out, dtype=dtype)
    factors = [_meta(*s, dtype=dtype) for s in f.factor_sizes().values()]
    calls: list[Call] = []
    with recording(calls):
        _, A, Bt, tT, w_eff = forward(x, W, b, *factors, 0.7)
    entries = {"module": 1, "glue": 1}
    if backward is not None:
        with recording(calls):
            backward(torch.empty_like(_meta(tokens, f.d_out, dtype=dtype)), x, W, *factors, A, Bt, tT,
                     w_eff if keep_folded else None, 0.7, True)
        if grads_exist:
            calls += [Call("add", "kernel", t.numel(), 3.0 * _nbytes(t)) for t in factors]
        entries |= {"function": 1, "node": 1 + 4 + 1, "backward": 1}  # the Function's node; the factors' and x's
    return calls, entries


# ---- what dispatch runs untuned on a GPU -----------------------------------------------------------------

def kernel_calls(op: str, fn: Callable, key, forward: Callable | None = None, keep_folded: bool = False) -> list:
    """The calls of kernel ``fn`` for ``key`` on meta tensors; a backward gets what ``forward`` hands over."""
    from .kernels.triton_parts import example_args

    args = example_args(op, key)
    if op == "backward" and forward is not None:
        fkey = dataclasses.replace(key, op="forward")
        with recording([]):  # the forward's launches are not run (meta tensors) and not this op's
            _, A, Bt, tT, w_eff = forward(*example_args("forward", fkey))
        args = args[:7] + (A, Bt, tT, w_eff if keep_folded else None) + args[11:]
    return trace(fn, *args)


def options(op: str, key, capability: int) -> list[tuple[str, str, dict]]:
    """What a GPU could run for ``key`` untuned: the step's formulations with Triton's parts (every point of
    their space whose kernels fit the problem on ``sm_<capability>``) and with ATen's."""
    from . import schedule_spaces
    from .kernels import torch_formulations, triton_parts
    from .kernels.triton_fused import shared_limit

    out = [("torch", v, {}) for v in sorted(torch_formulations(op)) if v in triton_parts.VARIANTS]
    if key.dtype in triton_parts.DTYPES:
        for v in triton_parts.VARIANTS:
            for cfg in schedule_spaces.space(triton_parts.SPACE, op, v):
                reports = triton_parts.compile_reports(op, v, key, cfg, capability).values()
                if all(r.problem(shared_limit(capability)) is None for r in reports):
                    out.append(("triton", v, cfg))
    return out


def untuned(op: str, key, device, capability=None) -> tuple[str, str, dict, str]:
    """(backend, variant, config, why) that runs for a problem no tuning record covers: on a GPU (``device``
    cuda, or ``capability`` of one described) where Triton runs, the plan this model prices lowest; elsewhere
    ``kernels.untuned_choice``. Dispatch runs it; the tuner keeps it unless a candidate beats it."""
    from . import kernels
    from .device import capability as capability_of
    from .problem import OPS

    if capability is None:
        capability = capability_of(device)
    if capability is not None and op in OPS and kernels.unavailable("triton", "cuda") is None:
        return cheapest(op, key, capability)
    return kernels.untuned_choice(op, key, device)


def cheapest(op: str, key, capability: int, machine: Machine = H200) -> tuple[str, str, dict, str]:
    """(backend, variant, config, why): of ``options``, the one this model prices lowest (a backward behind
    the forward it would choose). What dispatch runs on a GPU for a problem no tuning record covers. Priced
    outside any dispatch mode the caller is in (a fake-tensor trace must not see these meta tensors)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return _cheapest(op, key, capability, machine)


def _cheapest(op: str, key, capability: int, machine: Machine) -> tuple[str, str, dict, str]:
    from .kernels import build
    from .step import keeps_folded

    forward = None
    if op == "backward":
        fkey = dataclasses.replace(key, op="forward")
        b, v, c, _ = _cheapest("forward", fkey, capability, machine)
        forward = build(b, "forward", v, c, fkey, "cuda")
    keep = keeps_folded(key.token_bucket, key.m1 * key.m2)
    priced = []
    for backend, variant, config in options(op, key, capability):
        fn = build(backend, op, variant, config, key, "cuda")
        cost = price(kernel_calls(op, fn, key, forward, keep), machine)
        priced.append((cost.us, backend, variant, config))
    us, backend, variant, config = min(priced, key=lambda p: p[0])
    others = ", ".join(f"{b}:{v} {u:.0f}" for u, b, v, _ in sorted(priced, key=lambda p: p[0])[1:])
    return backend, variant, config, f"cost model ({machine.name}): {us:.0f} µs predicted; {others}"


def predicted_rows(plans: dict, shapes, machine: Machine = H200) -> list[dict]:
    """Per shape and mode: the cost model's LSR step (with ``plans[shape.label()]``: {op: (choice, kernel)}),
    frozen layer and plain LoRA of the same inner rank, in µs; the device time alone (what CUDA graphs, which
    take the host out, can reach at most); kernels per step."""
    from .step import keeps_folded

    rows = []
    for shape in shapes:
        f = shape.factors
        plan = plans[shape.label()]
        keep = keeps_folded(shape.tokens, f.d_out)
        for mode, backward in (("forward", False), ("forward+backward", True)):
            lsr = price(*_with_machine(lsr_step(plan["forward"][1], plan["backward"][1] if backward else None, f,
                                                shape.tokens, shape.dtype, keep), machine))
            floor = price(*_with_machine(floor_step(f.d_in, f.d_out, shape.tokens, shape.dtype, backward), machine))
            lora = price(*_with_machine(lora_step(f.d_in, f.d_out, f.q, shape.tokens, shape.dtype, backward),
                                        machine))
            choice = plan["forward"][0] if not backward else plan["backward"][0]
            rows.append({"shape": shape.label(), "d_in": f.d_in, "d_out": f.d_out, "tokens": shape.tokens,
                         "mode": mode, "plan": f"{plan['forward'][0].backend}:{plan['forward'][0].variant}"
                         + (f" / {choice.backend}:{choice.variant}" if backward else ""),
                         "lsr_us": round(lsr.us, 1), "floor_us": round(floor.us, 1), "lora_us": round(lora.us, 1),
                         "lsr_over_floor": round(lsr.us / floor.us, 3), "lora_over_lsr": round(lora.us / lsr.us, 3),
                         "device_ratio": round(lsr.gpu_us / floor.gpu_us, 3), "kernels": lsr.kernels,
                         "machine": machine.name})
    return rows


def _with_machine(step: tuple, machine: Machine) -> tuple:
    calls, entries = step
    return calls, machine, entries


def predicted_table(rows: list[dict]) -> str:
    head = ("| shape (d_out x d_in, N) | mode | plan | kernels | LSR/floor | device time alone: LSR/floor "
            "| LoRA/LSR |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['d_out']}x{r['d_in']}, {r['tokens']} | {r['mode']} | {r['plan']} | {r['kernels']} | "
                     f"{r['lsr_over_floor']:.3f} | {r['device_ratio']:.3f} | {r['lora_over_lsr']:.3f} |")
    return "\n".join(lines)
