"""Run-time kernel choice: forced backend > tuning-log record > sound default.

One dictionary lookup per call on the hot path; records and built kernels are
cached in memory and dropped whenever logs are (re)loaded or written.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from . import costmodel, kernels, logs
from .config import FactorShapes
from .problem import LSRShape, ProblemKey, dtype_name, token_bucket
from .device import GPU, H200, device_id, target_of

log = logging.getLogger(__name__)

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lsr_backend", default=None)
_extra_dirs: list[Path] = []
_records: dict[tuple[str, str], dict] = {}
_kernels: dict[tuple, tuple[Callable, "Choice"]] = {}
_logs_token: Optional[str] = None
_appends_seen = 0  # logs.appends() when the caches were last valid: a record written since drops them


@dataclass(frozen=True)
class Choice:
    """Which kernel runs for one problem, and why."""

    backend: str
    variant: str
    config: tuple  # sorted (name, value) pairs
    reason: str

    def __str__(self):
        cfg = ", ".join(f"{k}={v}" for k, v in self.config)
        return f"{self.backend}:{self.variant}" + (f"[{cfg}]" if cfg else "") + f"  ({self.reason})"


generation = 0  # bumped whenever cached choices are dropped: inference runners built before are stale


def invalidate() -> None:
    """Drop cached records and kernels: the next call re-reads the logs (after editing them by hand)."""
    global _logs_token, _appends_seen, generation
    _records.clear()
    _kernels.clear()
    _logs_token = None
    _appends_seen = logs.appends()
    generation += 1


def _drop_stale() -> None:
    """This process appended a tuning record since the caches were filled: choices may change."""
    if _appends_seen != logs.appends():
        invalidate()


def reset() -> None:
    """Back to the default log directories (forget every ``load_logs``) with empty caches."""
    _extra_dirs.clear()
    invalidate()


def cached_choices() -> list[tuple[str, "Choice"]]:
    """(op, choice) of every kernel built so far in this process, for inspection."""
    return [(k[0], choice) for k, (_, choice) in _kernels.items() if choice is not None]


@functools.lru_cache(maxsize=1)
def _code_token() -> str:
    """This package's code (its files' sizes and times): a cached graph traced by other code may hold
    choices or shapes this code would not make."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.rglob("*.py")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def state_token() -> str:
    """Everything a choice depends on besides the problem: the forced backend, the tuning logs in use
    (their paths, sizes and times) and this package's code. Compiled graphs that baked a choice in are
    cached under it."""
    global _logs_token
    _drop_stale()
    if _logs_token is None:
        h = hashlib.sha256(_code_token().encode())
        for d in log_dirs():
            for p in sorted(Path(d).rglob("*.jsonl")):
                st = p.stat()
                h.update(f"{p}:{st.st_size}:{st.st_mtime_ns};".encode())
        _logs_token = h.hexdigest()[:16]
    return f"{_forced.get()}:{_logs_token}"


def load_logs(log_dir) -> int:
    """Also use the records under ``log_dir`` (as written by ``tune(log_dir=...)``).

    Returns how many records (from all log directories in use) apply to this machine's devices."""
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a tuning log directory: pass the directory tune(log_dir=...) "
                                 f"wrote, which holds <target>/<device>/<op>.jsonl files")
    if not path.is_dir():
        raise FileNotFoundError(f"tuning log directory {path} does not exist")
    if path not in _extra_dirs:
        _extra_dirs.append(path)
    invalidate()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return sum(len(records(target_of(d), device_id(d))) for d in devices)


def log_dirs() -> list[Path]:
    return logs.default_log_dirs() + _extra_dirs


def records(target: str, dev_id: str) -> dict:
    """This device's records; on a CPU, a key with none is filled from the same CPU tuned with the nearest other
    thread count (a device id ends in ``-<threads>t``: a process with one thread would otherwise ignore every
    record tuned with two), its source saying so."""
    _drop_stale()
    k = (target, dev_id)
    if k not in _records:
        recs = logs.read(logs.files_for(log_dirs(), target, dev_id), dev_id, target)
        near = nearest_thread_count(target, dev_id)
        if near is not None:
            threads = dev_id.rsplit("-", 1)[1][:-1]
            note = f" (tuned with {near.rsplit('-', 1)[1][:-1]} threads; this process uses {threads}: the nearest)"
            for key, rec in logs.read(logs.files_for(log_dirs(), target, near), near, target).items():
                if key not in recs:
                    recs[key] = dataclasses.replace(rec, source=rec.source + note)
        _records[k] = recs
    return _records[k]


def nearest_thread_count(target: str, dev_id: str) -> Optional[str]:
    """The device id of this CPU with the nearest other thread count that has tuning logs, or None."""
    m = re.fullmatch(r"(.+)-(\d+)t", dev_id)
    if target != "llvm" or m is None:
        return None
    stem, threads = m.group(1), int(m.group(2))
    found = set()
    for d in log_dirs():
        folder = Path(d) / target
        if folder.is_dir():
            for sub in folder.iterdir():
                mm = re.fullmatch(re.escape(stem) + r"-(\d+)t", sub.name)
                if mm and int(mm.group(1)) != threads and any(sub.glob("*.jsonl")):
                    found.add(int(mm.group(1)))
    if not found:
        return None
    return f"{stem}-{min(found, key=lambda n: (abs(n - threads), -n))}t"


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force one backend ("torch" | "tvm" | "triton") inside the block, with its default config."""
    if name is not None and name not in kernels.BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {kernels.BACKENDS}")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def choose(op: str, key: ProblemKey, device: torch.device, gpu: Optional[GPU] = None) -> Choice:
    """What runs for ``key`` on ``device`` (or on ``gpu``, a GPU described rather than present: what dispatch
    would run there) and why: a forced backend, else a tuning record, else a default: on a GPU the cost
    model's cheapest plan (``costmodel.cheapest``), elsewhere ``kernels.untuned_choice``."""
    if getattr(device, "type", None) == "meta":  # tensors without data (a model built before its weights load)
        return Choice("torch", kernels.torch_default_variant(op, key, device), (),
                      "meta tensors: no data to run a kernel on, the PyTorch formulation gives the shapes")
    forced = _forced.get()
    if forced is not None:
        try:
            variant, config = kernels.default_choice(forced, op, key, device)
        except ValueError as e:  # the forced backend has no kernel for this op at all
            variant, config = kernels.default_choice("torch", op, key, device)
            return Choice("torch", variant, (), f"use_backend({forced!r}) has no {op} kernel ({e})")
        return Choice(forced, variant, tuple(sorted(config.items())), f"forced by use_backend({forced!r})")
    target, dev_id = ("cuda", gpu.id) if gpu is not None else (target_of(device), device_id(device))
    rec = records(target, dev_id).get(key)
    if rec is not None:
        return Choice(rec.backend, rec.variant, tuple(sorted(rec.config.items())),
                      f"tuned: {rec.source}, {rec.time_ms:.3g} ms")
    backend, variant, config, why = costmodel.untuned(op, key, device, gpu.capability if gpu is not None else None)
    return Choice(backend, variant, tuple(sorted(config.items())),
                  f"default: no tuning record for {target}/{dev_id} {key.token_bucket}-token bucket; {why}")


def planned(shape: LSRShape, gpu: GPU) -> dict[str, tuple[Choice, Callable]]:
    """What dispatch would run for ``shape`` on ``gpu`` (described, not present): per op, the choice and its
    kernel, built for a GPU (for the cost model, launch counts and the GPU check's predictions)."""
    cuda = torch.device("cuda")
    out = {}
    for op in shape.ops:
        key = shape.key(op)
        choice = choose(op, key, cuda, gpu)
        out[op] = (choice, kernels.build(choice.backend, op, choice.variant, dict(choice.config), key, cuda))
    return out


def _build(op: str, key: ProblemKey, device: torch.device) -> tuple[Callable, Choice]:
    """The chosen kernel, or (with a warning) the PyTorch default when the choice cannot run here: its
    backend is missing or cannot run on this device, it is known not to fit the GPU, or it fails to build.
    A choice forced by ``use_backend`` raises instead."""
    choice = choose(op, key, device)
    try:
        if choice.backend != "torch":
            why = kernels.unavailable(choice.backend, device) or kernels.static_problem(
                choice.backend, op, choice.variant, dict(choice.config), key, device)
            if why is not None:
                raise RuntimeError(why)
        fn = kernels.build(choice.backend, op, choice.variant, dict(choice.config), key, device)
    except Exception as e:
        if _forced.get() is not None:
            raise
        return _fallback(op, key, device, choice, f"build failed ({type(e).__name__}: {str(e)[:200]})")
    if choice.backend != "torch" and _forced.get() is None:
        fn = _guarded(fn, op, key, device, choice)
    log.debug("lsr %s %s -> %s", op, key, choice)
    return fn, choice


def _fallback(op: str, key: ProblemKey, device: torch.device, failed: Choice, why: str):
    warnings.warn(f"lsr_compile: {failed.backend}:{failed.variant} for {op} {key} cannot run here: {why}; "
                  f"using the PyTorch default instead", RuntimeWarning, stacklevel=4)
    variant, _ = kernels.default_choice("torch", op, key, device)
    choice = Choice("torch", variant, (), f"fallback: {failed.backend}:{failed.variant} {why}")
    return kernels.build("torch", op, variant, {}, key, device), choice


def _guarded(fn: Callable, op: str, key: ProblemKey, device: torch.device, choice: Choice) -> Callable:
    """A compiled kernel whose first failure at run time (a driver or runtime error the build could not
    see) replaces it, for this problem, by the PyTorch default, instead of failing every later call."""
    replaced = []  # the fallback, once it took over (callers that hold this function keep it)

    def run(*args):
        if replaced:
            return replaced[0](*args)
        try:
            return fn(*args)
        except Exception as e:
            torch_fn, fallback = _fallback(op, key, device, choice, f"failed at run time ({type(e).__name__}: "
                                                                     f"{str(e)[:200]})")
            replaced.append(torch_fn)
            for k, (f, c) in list(_kernels.items()):
                if c is choice:
                    _kernels[k] = (torch_fn, fallback)
            return torch_fn(*args)
    return run


def _kernel(op: str, x2d: torch.Tensor, A1, A2, B1, B2, segments: int = 1, base: str = "dense"):
    fast = (op, x2d.device, x2d.dtype, token_bucket(x2d.shape[0]), A1.shape, A2.shape, B1.shape[-2],
            B2.shape[-2], segments, base, _forced.get())
    _drop_stale()
    hit = _kernels.get(fast)
    if hit is None:
        key = ProblemKey.from_tensors(op, x2d, A1, A2, B1, B2, segments=segments, base=base)
        hit = _kernels[fast] = _build(op, key, x2d.device)
    return hit


def kernel(op: str, x2d: torch.Tensor, A1, A2, B1, B2, segments: int = 1, base: str = "dense") -> Callable:
    """The kernel for this call (hot path: one tuple, one dict lookup). A mixed batch's factors have a bank
    axis (``A1 (K, s, r1, n1)``) and ``segments`` segments; ``base`` is a quantized base's format."""
    return _kernel(op, x2d, A1, A2, B1, B2, segments, base)[0]


def step_kernels(x2d: torch.Tensor, weight, bias, A1, A2, B1, B2, check: Callable) -> Optional[tuple[Callable, Callable]]:
    """The forward and backward kernels of a training step, for a call whose arguments ``check`` validated
    once: the key holds every shape, dtype and device ``check`` looked at, so a hit needs no check again.
    Factors in another dtype than x (peft's float32 adapters over a half-precision base): the pair where the
    step chosen for x's dtype is PyTorch's materialise, which computes the adapter in the factors' dtype as
    peft's LoRA does (on a CPU, 0.75-0.9x the time of casting the factors down at 64 tokens of SmolLM2's layers:
    small half-precision GEMMs are slow there); None where the chosen kernels take the factors cast to x's."""
    fast = _signature("step", x2d, weight, bias, A1, A2, B1, B2)
    _drop_stale()
    hit = _kernels.get(fast)
    if hit is None:
        check(x2d, weight, bias, A1, A2, B1, B2)
        (fwd, cf), (bwd, cb) = _kernel("forward", x2d, A1, A2, B1, B2), _kernel("backward", x2d, A1, A2, B1, B2)
        wide_ok = all(c.backend == "torch" and c.variant == "materialise" for c in (cf, cb))
        hit = _kernels[fast] = ((fwd, bwd) if A1.dtype == x2d.dtype or wide_ok else None, None)
    return hit[0]


def _signature(tag: str, x2d: torch.Tensor, weight, bias, A1, A2, B1, B2) -> tuple:
    """Every shape, dtype and device ``ops.check_args`` looks at, the token bucket and the forced backend."""
    b = None if bias is None else (bias.shape, bias.dtype, bias.device)
    return (tag, x2d.device, x2d.dtype, token_bucket(x2d.shape[0]), x2d.shape[1], weight.shape, weight.dtype,
            weight.device, b, A1.shape, A1.dtype, A1.device, A2.shape, A2.dtype, A2.device, B1.shape, B1.dtype,
            B1.device, B2.shape, B2.dtype, B2.device, _forced.get())


def forced() -> Optional[str]:
    """The backend ``use_backend`` forces here, or None."""
    return _forced.get()


def inference_runner(x2d: torch.Tensor, weight, bias, A1, A2, B1, B2, check: Callable, derive: Callable) -> Callable:
    """``run(x, weight, bias, scale) -> y`` for calls that record no graph (decoding, evaluation) with inputs
    like these and these factors' values: ``kernels.inference`` over the forward chosen for the problem.
    ``derive(what, build)`` gives what is built from the factors' values (``inference_cache``: built once while
    they hold; ``build()`` every time where nothing is kept). ``check`` validates the inputs first; a caller
    whose later call raises checks again, so a bad input still gets its named error."""
    check(x2d, weight, bias, A1, A2, B1, B2)
    fwd, choice = _kernel("forward", x2d, A1, A2, B1, B2)
    return kernels.inference(choice.backend, choice.variant, fwd, x2d, A1, A2, B1, B2, derive)


def _hint(n, default: int) -> int:
    """A traced size's example value, read without installing a guard."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else default


def example_rows(x: torch.Tensor) -> int:
    """The rows of ``x`` (leading dims flattened), at their example values when traced."""
    n = 1
    for v in x.shape[:-1]:
        n *= _hint(v, 1)
    return n


def traced_key(op: str, x2d: torch.Tensor, A1, A2, B1, B2) -> ProblemKey:
    """The key of a graph being traced. Symbolic sizes (the token count; any size under opcheck) are read at
    their example values, without a guard, so dynamic shapes do not recompile per token bucket."""
    s, r1, n1 = (_hint(v, 1) for v in A1.shape)
    r2, n2 = (_hint(v, 1) for v in A2.shape[1:])
    m1, m2 = _hint(B1.shape[1], 1), _hint(B2.shape[1], 1)
    return ProblemKey.of(op, x2d.dtype, _hint(x2d.shape[0], 2048), FactorShapes(s, r1, r2, n1, n2, m1, m2))


def _traced_choice(op: str, x2d: torch.Tensor, A1, A2, B1, B2) -> tuple[ProblemKey, Choice]:
    """The choice for a graph being traced (``traced_key``)."""
    key = traced_key(op, x2d, A1, A2, B1, B2)
    # a graph traced for a GPU this process cannot see (fake CUDA tensors on a CPU machine): the H200's choices
    gpu = H200 if x2d.device.type == "cuda" and not torch.cuda.is_available() else None
    return key, choose(op, key, x2d.device, gpu)


def traced_formulation(op: str, x2d: torch.Tensor, A1, A2, B1, B2) -> Optional[Callable]:
    """While a graph is compiled: the PyTorch formulation chosen for this problem (in ATen, for Inductor), or
    None when the choice is a compiled kernel (Triton, TVM) that must stay an opaque call. Nothing is built
    for those here (the tensors are fake): a kernel's own checks run when the op runs."""
    if _forced.get() not in (None, "torch"):
        return None
    key, choice = _traced_choice(op, x2d, A1, A2, B1, B2)
    return kernels.torch_formulations(op)[choice.variant] if choice.backend == "torch" else None


def forward_saves(x2d: torch.Tensor, A1, A2, B1, B2) -> tuple[bool, bool]:
    """What the forward chosen for this problem hands the backward besides A and Bt: (tT, folded weight)."""
    choice = _traced_choice("forward", x2d, A1, A2, B1, B2)[1]
    return kernels.forward_saves(choice.backend, choice.variant)


def explain(shape: LSRShape, device=None) -> str:
    """Which kernel runs for ``shape`` on ``device`` (default: the CPU), forward and backward, and why.
    (``lsr_compile.explain`` also takes a layer.)"""
    device = torch.device(device or "cpu")
    f = shape.factors
    mixed = f", K={shape.adapters} S={shape.num_segments}" if shape.mixed else ""
    mixed += f", base {shape.base}" if shape.base != "dense" else ""
    lines = [f"{f.d_out}x{f.d_in} s={f.s} r=({f.r1},{f.r2}) inner rank q={f.q} n=({f.n1},{f.n2}) m=({f.m1},{f.m2}) "
             f"{dtype_name(shape.dtype)}, N={shape.tokens}{mixed}, on {target_of(device)}/{device_id(device)}:"]
    for op in shape.ops:
        lines.append(f"  {op:8s} {choose(op, shape.key(op), device)}")
    return "\n".join(lines)
