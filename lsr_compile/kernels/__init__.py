"""Stage 2: kernels. ``build`` turns a (backend, variant, config) choice into a callable.

All kernels of one op share a signature (see ``lsr_compile.formulations``), so
the tuner, dispatch and tests call the same code path with an explicit config.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Optional

import torch

from .. import formulations, mixed_formulations, schedule_spaces, step
from ..device import capability as capability_of, space_name
from ..problem import ADAPTER_OPS, MIXED_OPS, ProblemKey

BACKENDS = ("torch", "tvm", "triton")


_ATEN = {"forward": {v: step.bind(f, step.ATEN) for v, f in step.FORWARDS.items()},
         "backward": {v: step.bind(f, step.ATEN) for v, f in step.BACKWARDS.items()},
         "mixed_forward": mixed_formulations.FORWARDS, "mixed_backward": mixed_formulations.BACKWARDS,
         "adapter_forward": formulations.ADAPTER_FORWARDS, "adapter_backward": formulations.ADAPTER_BACKWARDS}


# what the torch backend runs as a call: the same formulations with in-place parts (the step owns every tensor
# they write into); the functional ones above are what Inductor decomposes the op into
_ATEN_EAGER = {"forward": {v: step.bind(f, step.ATEN_EAGER) for v, f in step.FORWARDS.items()},
               "backward": {v: step.bind(f, step.ATEN_EAGER) for v, f in step.BACKWARDS.items()}}


def torch_formulations(op: str) -> dict[str, Callable]:
    """The PyTorch formulations of ``op``: the ``torch`` backend's variants, the layer's with ATen's
    Kronecker parts (what Inductor's decomposition and every device run)."""
    if op not in _ATEN:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_ATEN)}")
    return _ATEN[op]


def forward_saves(backend: str, variant: str) -> tuple[bool, bool]:
    """What a forward kernel hands the backward besides A and Bt: (tT, the folded weight). The step's
    formulations (any parts): materialise keeps tT, fold the folded weight; the fused Triton GEMM writes tT;
    TVM's token-path kernels (its materialise and factored) neither."""
    if backend == "triton" and variant == "fused":
        return True, False
    if backend == "tvm" and variant != "fold":
        return False, False
    return variant == "materialise", variant == "fold"


def torch_default_variant(op: str, key: ProblemKey, device: torch.device = torch.device("cpu")) -> str:
    """Untuned choice among the PyTorch formulations, from a memory-traffic cost model.

    Folding reads and writes W once (2·d_out·d_in); the token path re-reads x and
    re-writes y (N·(d_in + 2·d_out)) forward, and writes then re-reads an (N, d_in)
    adapter term backward; the matmul work of both is a q/d fraction.
    """
    if op in ADAPTER_OPS:
        return "materialise"
    if op in MIXED_OPS:
        # on a CPU reading the assignment costs nothing and only the adapters in use are formed; on a GPU
        # the loop would wait for the device every call: per-row factor gathers there (no LoRA-sized tensor)
        if torch.device(device).type == "cpu":
            return "loop"
        return "factored" if op == "mixed_forward" else "gathered"
    d_in, d_out = key.n1 * key.n2, key.m1 * key.m2
    if op == "backward":
        return "fold" if key.token_bucket >= d_out else "materialise"
    return "fold" if key.token_bucket * (d_in + 2 * d_out) > 2 * d_out * d_in else "materialise"


HOST_BOUND_MACS = 32768  # multiply-adds a serial generic TVM kernel does in ~30 µs on the CI CPU


def host_bound(key: ProblemKey) -> bool:
    """The layer's arithmetic (base GEMM and adapter) is below what the host's calls cost on a CPU."""
    f = key.shapes
    return key.token_bucket * (f.d_in * f.d_out + f.q * (f.d_in + f.d_out)) <= HOST_BOUND_MACS


def untuned_choice(op: str, key: ProblemKey, device: torch.device) -> tuple[str, str, dict, str]:
    """(backend, variant, config, why) for a problem no tuning record covers, where the GPU cost model
    (``dispatch``) does not decide: on a CPU, for a problem whose cost is the host's calls, TVM's generic
    kernels (the whole layer in one call per direction, compiled once per dtype); else the PyTorch
    formulation the memory-traffic rule picks (``torch_default_variant``)."""
    variant = torch_default_variant(op, key, device)
    kind = torch.device(device).type
    if (op in ("forward", "backward") and kind == "cpu" and unavailable("tvm", device) is None
            and key.dtype in schedule_spaces.dtypes("llvm") and host_bound(key)):
        return ("tvm", "materialise", schedule_spaces.generic("llvm", op, "materialise"),
                "host-bound: TVM's generic kernel, the whole layer in one call per direction")
    return "torch", variant, {}, f"the PyTorch formulation {variant} by the memory-traffic rule"


def default_choice(backend: str, op: str, key: ProblemKey, device: torch.device) -> tuple[str, dict]:
    """The variant and config a backend runs when nothing was tuned for ``key``."""
    if backend == "torch":
        return torch_default_variant(op, key, device), {}
    if op in ADAPTER_OPS and backend in BACKENDS:
        raise ValueError(f"{backend} has no {op} kernel (the PyTorch formulations serve it)")
    if backend == "tvm":
        from . import tvm_kernels

        return tvm_kernels.default_choice(op, key, device)
    if backend == "triton":
        if op in MIXED_OPS:
            from . import triton_mixed

            return triton_mixed.default_choice(op, key, device)
        from . import triton_parts

        variant = torch_default_variant(op, key, device)
        return variant, triton_parts.default_config(op, variant, key, device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def candidates(target: str, op: str, key: ProblemKey, trials: int | None = None) -> list[tuple[str, str, dict]]:
    """(backend, variant, config) triples to try for ``key`` on ``target``: every PyTorch formulation, then
    up to ``trials`` points of each compiled backend's schedule spaces (defaults first)."""
    out = [("torch", v, {}) for v in sorted(torch_formulations(op))]
    compiled = []
    name = space_name("tvm", target)
    if key.dtype in schedule_spaces.dtypes(name):
        # the generic kernel (serial, unscheduled) only where the problem is host-bound: elsewhere it is slower
        # by orders of magnitude (768², N = 2048: 1.6 s a call) and would eat the tuning budget
        per_variant = [[("tvm", v, c) for c in schedule_spaces.space(name, op, v)
                        if c != schedule_spaces.generic(name, op, v) or host_bound(key)]
                       for v in schedule_spaces.variants(name, op)]
        compiled += _round_robin(per_variant)
    if target == "cuda" and op not in ADAPTER_OPS:
        if op in MIXED_OPS:
            from . import triton_mixed

            triton = [triton_mixed.candidates(op, key)]
        else:
            from . import triton_fused, triton_parts

            parts = triton_parts.candidates(op, key)
            triton = [[c for c in parts if c[1] == v] for v in triton_parts.VARIANTS]
            triton.append(triton_fused.candidates(op, key))
        compiled = _round_robin(triton + [compiled])
    return out + (compiled if trials is None else compiled[:trials])


def _round_robin(lists):
    """Interleave lists so a trial budget samples every variant's defaults before anyone's second point."""
    out, i = [], 0
    while any(i < len(l) for l in lists):
        out += [l[i] for l in lists if i < len(l)]
        i += 1
    return out


def unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` in this process (a missing package, no GPU), or None.
    Such candidates are skipped, never counted as failures."""
    device = torch.device(device)
    if backend == "tvm" and importlib.util.find_spec("tvm") is None:
        return "TVM is not installed"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on a CPU only in its interpreter (TRITON_INTERPRET=1)"
    return None


def static_problem(backend: str, op: str, variant: str, config: dict, key: ProblemKey,
                   device: Optional[torch.device], capability: Optional[int] = None) -> Optional[str]:
    """Why a candidate must not run on ``device`` (or, with ``capability``, on a ``sm_<capability>`` GPU
    without one here), known without running it (it spills, its shared memory does not fit): the tuner
    prunes it before any timing. None when nothing is known against it (and off a GPU)."""
    if capability is None:
        capability = None if device is None else capability_of(device)
        if capability is None:
            return None
    if backend == "triton":
        from .triton_fused import shared_limit

        limit = shared_limit(capability)
        if op in MIXED_OPS:
            from . import triton_mixed

            return triton_mixed.compile_report(key, config, capability).problem(limit)
        if variant != "fused":
            from . import triton_parts

            for name, res in triton_parts.compile_reports(op, variant, key, config, capability).items():
                why = res.problem(limit)
                if why is not None:
                    return f"{name} {why}"
            return None
        from . import triton_fused

        return triton_fused.compile_report(op, key, config, capability).problem(limit)
    if backend == "tvm":
        from . import tvm_cuda

        return tvm_cuda.static_problem(op, variant, config, key.shapes, key.dtype, f"sm_{capability}")
    return None


def prune(candidates: list[tuple[str, str, dict]], op: str, key: ProblemKey, device: Optional[torch.device],
          capability: Optional[int] = None) -> tuple[list[tuple[str, str, dict]], dict[str, str]]:
    """``(backend, variant, config)`` candidates split as the tuner splits them before any timing: those that
    can run on ``device`` (or on a ``sm_<capability>`` GPU), and, by name, why each other one cannot
    (``static_problem``, which the tuner asks of each candidate in turn). The GPU check and the tests run
    their lists of configs through here."""
    kept, pruned = [], {}
    for backend, variant, config in candidates:
        why = static_problem(backend, op, variant, config, key, device, capability)
        if why is None:
            kept.append((backend, variant, config))
        else:
            pruned[candidate_name(backend, variant, config)] = why
    return kept, pruned


def candidate_name(backend: str, variant: str, config: dict) -> str:
    """A candidate's name in tuning records and reports."""
    cfg = ",".join(f"{k}={v}" for k, v in sorted(config.items()))
    return f"{backend}:{variant}" + (f"[{cfg}]" if cfg else "")


# The thin products of a few rows in half precision on a CPU take oneDNN's slow path: bf16, 256², 8 tokens,
# rank 4 (Xeon, AVX-512 BF16, 1 thread): x Aᵀ 20 µs and the addmm 24 µs against 2-3 µs in float32 (the frozen
# GEMM itself 29 µs). Inference there computes the adapter in float32, as peft LoRA's float32 adapters do.
_CPU_HALF = (torch.bfloat16, torch.float16)


def inference(backend: str, variant: str, forward: Callable, x2d: torch.Tensor, A1, A2, B1, B2,
              derive: Callable) -> Callable:
    """``run(x, weight, bias, scale) -> y`` for calls that record no graph, for these factors' values, over the
    forward kernel ``forward`` of (backend, variant): a PyTorch formulation with an inference form
    (``step.INFERENCE``) runs that form over A and Bᵀ; any other kernel runs whole, its extra outputs dropped.
    ``derive(what, build)`` gives what is built from the factors' values (kept while they hold, or built per
    call): A and Bᵀ, or the factors cast to the input's dtype (peft's float32 adapters over a half-precision
    base). What runs here is what the tuner times at decode-sized token counts, and what dispatch runs there."""
    dtype, device = x2d.dtype, x2d.device
    infer = step.INFERENCE.get(variant) if backend == "torch" else None
    if infer is None:
        factors = derive(("cast", dtype), lambda: tuple(f.to(dtype) for f in (A1, A2, B1, B2))) \
            if A1.dtype != dtype else (A1, A2, B1, B2)

        def run(x, weight, bias, scale):
            return forward(x, weight, bias, *factors, scale)[0]
        return run
    what = torch.float32 if variant == "materialise" and device.type == "cpu" and dtype in _CPU_HALF else dtype
    A, Bt = derive(what, lambda: tuple(t.to(what) for t in step.ATEN.factors(A1, A2, B1, B2)))
    return functools.partial(infer, A, Bt)


def build(backend: str, op: str, variant: str, config: dict, key: ProblemKey, device: torch.device) -> Callable:
    if backend == "torch":
        table = _ATEN_EAGER.get(op) or torch_formulations(op)
        if variant not in table:
            raise ValueError(f"torch backend has no {op} variant {variant!r}; known: {sorted(table)}")
        return table[variant]
    if backend == "tvm":
        from . import tvm_kernels

        return tvm_kernels.build(op, variant, config, key, device)
    if backend == "triton":
        if op in MIXED_OPS:
            from . import triton_mixed

            return triton_mixed.build(op, variant, config, key, device)
        from . import triton_parts

        return triton_parts.build(op, variant, config, key, device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
