"""tune(): build every candidate kernel, reject wrong ones, time the rest side by side, record the winner."""
from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .. import costmodel, kernels, logs, shipped
from ..device import TARGET_DEVICES, device_id, device_info
from ..problem import ADAPTER_OPS, ALL_OPS, LSRShape
from . import harness
from .timing import measure, median

log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 85.0  # per (shape, op) job, so forward + backward stay within 3 minutes per shape (docs/design.md §4)
# tune(model): the whole call, split over its jobs (distinct layer problems x token counts x ops), each job at least
# MIN_JOB_S: a 2-layer toy took 7 minutes at 85 s a job; an LLM's few distinct shapes at a decode and a prefill
# token count now fit 5 minutes (the estimate is printed before any work)
MODEL_BUDGET_S = 300.0
MIN_JOB_S = 10.0
MODEL_TOKENS = (1, 2048)  # tune(model)'s default token counts: a decode step and a prefill
# a layer can do no less than its frozen GEMM: a winner timed below this share of it was mistimed (a loaded
# machine: the other core's work stalls a 2-thread GEMM), so it is re-timed, and not recorded if it stays there
PLAUSIBLE = 0.8
CHECK_TOKENS = 259  # correctness is checked on this many rows (ragged on purpose); kernels are generic in N


class TuningError(ValueError):
    """Bad arguments to tune()."""


def shapes_of(model: nn.Module, tokens: Iterable[int], dtype=None) -> list[LSRShape]:
    """One LSRShape per distinct problem the LSR layers of ``model`` run, per token count: every module that can
    say what it runs is asked, ``tuning_shapes(tokens, dtype)`` (every problem: a peft layer's adapters, each of
    its own structure, and the mixed batch of those that share one; an AdapterBank's layer) or
    ``lsr_shape(tokens, dtype)`` (one: LSRLinear)."""
    seen, asked = {}, 0
    for module in model.modules():
        many, one = getattr(module, "tuning_shapes", None), getattr(module, "lsr_shape", None)
        if not callable(many) and not callable(one):
            continue
        asked += 1
        for n in tokens:
            for s in (many(n, dtype) if callable(many) else [one(n, dtype)]):
                seen[(n, s.factors, s.dtype, s.base, s.mixed and (s.adapters, s.num_segments))] = s
    if not seen:
        raise TuningError("the model's LSR layers run nothing tuning can choose (an AdapterBank over a quantized base "
                          "adds its updates with the untuned factored formulation)" if asked else
                          "the model has no LSRLinear layers (nor peft's LSR layers, nor an AdapterBank's); wrap "
                          "it with apply_lsr or get_peft_model first")
    return list(seen.values())


def _forward_kernel(shape: LSRShape, device, winner: Optional[dict]):
    """The forward a backward is tuned behind: this run's winner for the shape, else the untuned default."""
    key = shape.key("forward")
    if winner is not None:
        backend, variant, config = winner["backend"], winner["variant"], winner["config"]
    else:
        backend, variant, config, _ = kernels.untuned_choice("forward", key, torch.device(device))
    return kernels.build(backend, "forward", variant, config, key, torch.device(device))


# At most this many rows a forward is timed as decoding runs it (the token bucket of one to 16 rows)
DECODE_BUCKET = 16
# seconds a first import costs before any build (TVM: 4 s on the CI machine), and a build when none was timed yet
_IMPORT_S = {"tvm": 5.0, "triton": 2.0}
_build_s: dict[str, float] = {}  # the longest build of each backend in this process


def _out_of_time(backend: str, started: float, budget_s: float) -> Optional[str]:
    """Why a compiled candidate is not tried within this job's budget: past half of it (timing needs the
    rest), or what building it may take (its first import, else the longest build seen) does not fit."""
    spent = time.perf_counter() - started
    cost = _build_s.get(backend, 0.5) + (_IMPORT_S.get(backend, 0.0) if backend not in sys.modules else 0.0)
    if spent > budget_s / 2 or spent + cost > budget_s:
        return "time budget"
    return None


def _candidates(target: str, op: str, key, trials, device) -> list[tuple[str, str, dict]]:
    """``kernels.candidates``, and what runs untuned (``costmodel.untuned``) where the trials left it out: a
    record is measured against what runs without one."""
    cands = kernels.candidates(target, op, key, trials)
    untuned = costmodel.untuned(op, key, torch.device(device))[:3]
    if untuned not in cands:
        cands.append(untuned)
    return cands


def _decode_call(backend: str, variant: str, forward, d: dict):
    """``forward`` run as a layer runs it without a graph for the factors of ``d`` (``kernels.inference``: A
    and Bᵀ built once, as ``inference_cache`` keeps them, then one call at a time), in the forward op's
    signature."""
    derived: dict = {}

    def derive(what, build):
        if what not in derived:
            derived[what] = build()
        return derived[what]
    run = kernels.inference(backend, variant, forward, d["x"], *d["factors"], derive)
    return lambda x, weight, bias, A1, A2, B1, B2, scale: (run(x, weight, bias, scale),)


def _job(shape: LSRShape, op: str, target: str, device, trials, budget_s, bar,
         forward_winner: Optional[dict] = None) -> Optional[dict]:
    from ..step import keeps_folded

    key = shape.key(op)
    dtype = key.dtype
    scale = 0.7
    cands = _candidates(target, op, key, trials, device)
    started = time.perf_counter()
    decode = op == "forward" and key.token_bucket <= DECODE_BUCKET
    check = harness.inputs(shape, min(shape.tokens, CHECK_TOKENS), device, shape.dtype)
    want = harness.expected(op, check, scale)
    bench = harness.inputs(shape, shape.tokens, device, shape.dtype)
    if op == "backward":  # timed with what the forward it runs behind hands it, as in a training step
        forward = _forward_kernel(shape, device, forward_winner)
        for d in (check, bench):
            harness.save_forward(d, forward, scale, keeps_folded(d["x"].shape[0], shape.factors.d_out,
                                                                 torch.device(device).type))
    built, rejected, skipped = {}, {}, {}
    default = kernels.candidate_name(*costmodel.untuned(op, key, torch.device(device))[:3])
    for backend, variant, config in cands:
        name = kernels.candidate_name(backend, variant, config)
        if bar is not None:
            bar.update(1)
        why_not = kernels.unavailable(backend, device)
        if why_not is None and backend != "torch" and name != default:
            why_not = _out_of_time(backend, started, budget_s)
        if why_not is not None:
            skipped[name] = why_not
            continue
        try:
            why_not = kernels.static_problem(backend, op, variant, config, key, torch.device(device))
        except Exception as e:  # a config that does not even compile is a failure, like one that computes wrong
            rejected[name] = f"failed to compile: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        if why_not is not None:
            skipped[name] = f"pruned: {why_not}"
            continue
        try:
            t0 = time.perf_counter()
            fn = kernels.build(backend, op, variant, config, key, torch.device(device))
            if backend != "torch":
                _build_s[backend] = max(_build_s.get(backend, 0.0), time.perf_counter() - t0)
            run = _decode_call(backend, variant, fn, check) if decode else fn
            problem = harness.problem(op, harness.call(op, run, check, scale)(), want, dtype)
        except Exception as e:  # a candidate that does not build or run is reported, never recorded
            problem = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if problem:
            rejected[name] = problem
            log.warning("tune: rejected %s for %s: %s", name, key, problem)
        else:
            built[name] = (backend, variant, config, _decode_call(backend, variant, fn, bench) if decode else fn)
    if not built:
        warnings.warn(f"tune: no correct candidate for {op} {shape.label()}: {rejected | skipped}", RuntimeWarning,
                      stacklevel=3)
        return None
    # the frozen layer alone is timed in the same rounds, so records carry their ratio to the floor
    if op.endswith("forward"):
        floor_fn = lambda: torch.nn.functional.linear(bench["x"], bench["W"], bench["b"])  # noqa: E731
    else:
        floor_fn = lambda: bench["dy"] @ bench["W"]  # noqa: E731
    calls = {n: harness.call(op, c[3], bench, scale) for n, c in built.items()} | {"floor": floor_fn}
    left = max(budget_s - (time.perf_counter() - started), 0.0)
    times = measure(calls, device, rounds=30, budget_s=left)
    med = {n: median(t) for n, t in times.items()}
    winner = _winner(op, built, med, default)
    if op not in ADAPTER_OPS and med[winner] < PLAUSIBLE * med["floor"]:
        # re-timed alone with the floor, longer; still implausible: refused, not recorded
        again = measure({winner: calls[winner], "floor": floor_fn}, device, rounds=30, budget_s=left)
        med[winner], med["floor"] = median(again[winner]), median(again["floor"])
        if med[winner] < PLAUSIBLE * med["floor"]:
            warnings.warn(f"tune: {op} {shape.label()}: the fastest candidate {winner} timed {med[winner]:.4g} ms, "
                          f"{med[winner] / med['floor']:.2f}x the frozen layer alone ({med['floor']:.4g} ms), twice; "
                          f"no layer is faster than its frozen GEMM, so the timings are wrong (a loaded machine?) "
                          f"and nothing was recorded: tune again on a quiet machine", RuntimeWarning, stacklevel=3)
            return None
    backend, variant, config, _ = built[winner]
    return {
        "schema": logs.SCHEMA,
        "target": target,
        "device": device_info(device) | {"id": device_id(device)},
        "versions": logs.library_versions(),
        "key": key.as_dict(),
        "tokens": shape.tokens,
        "backend": backend,
        "variant": variant,
        "config": config,
        "time_ms": round(med[winner], 4),
        "floor_ms": round(med["floor"], 4),
        "candidates_ms": {n: round(med[n], 4) for n in sorted(built, key=lambda n: med[n])},
        "rejected": rejected,
        "skipped": skipped,
        "rounds": len(times["floor"]),
        "tune_s": round(time.perf_counter() - started, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


TIE = 1.03  # candidates this close to the fastest are a tie on a noisy machine (the CI CPU's medians move ~3 %)


def _winner(op: str, built: dict, med: dict, default: str) -> str:
    """The fastest candidate, unless what runs untuned (``default``) is within ``TIE`` of it: a record never
    makes a problem slower than no record. For a layer forward, of those within ``TIE`` the one that hands the
    backward the most (the folded weight, then tT): a training step pays for the backward's rebuilding."""
    best = min(built, key=lambda n: med[n])
    if default in built and med[default] <= TIE * med[best]:
        return default
    if op != "forward":
        return best
    near = [n for n in built if med[n] <= TIE * med[best]]
    def hands_over(n):
        keeps_t, keeps_w = kernels.forward_saves(*built[n][:2])
        return (not keeps_w, not keeps_t, med[n])
    return min(near, key=hands_over)


def summary(rec: dict) -> str:
    """One line per tuning record, as the CLI and the GPU check print them."""
    k = rec["key"]
    return (f"{k['op']:8s} N={rec['tokens']:5d} {k['m1'] * k['m2']}x{k['n1'] * k['n2']}: {rec['backend']}:"
            f"{rec['variant']} {rec['config']} {rec['time_ms']:.3f} ms = {rec['time_ms'] / rec['floor_ms']:.3f}x floor")


def _progress(jobs, target: str, trials, show: bool):
    """One bar for the whole call, over every candidate of every job (its postfix names the job); where
    stderr is no terminal (a log, a notebook's captured output) it redraws every 30 s, not 10 times a second."""
    from tqdm.auto import tqdm

    total = sum(len(_candidates(target, op, s.key(op), trials, TARGET_DEVICES[target])) for s, op in jobs)
    tty = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(total=total, desc="tune", unit="candidate", disable=not show, mininterval=0.5 if tty else 30.0)


def _token_counts(tokens) -> tuple[int, ...]:
    try:
        out = tuple(tokens)
    except TypeError:
        out = ()
    if not out or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in out):
        raise TuningError(f"tokens must be positive token counts, e.g. (2048,), got {tokens!r}")
    return out


def _check_writable(log_dir: Path) -> None:
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        probe = log_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise TuningError(f"tuning log directory {log_dir} is not writable ({e}); pass log_dir= a directory "
                          f"you can write, or set $LSR_TUNING_LOGS") from None


def tune(shapes: Union[Iterable[LSRShape], LSRShape, nn.Module], target: str = "llvm",
         log_dir: Union[str, Path, None] = None, trials: Optional[int] = None,
         time_budget_s: Optional[float] = None, ops: Optional[Iterable[str]] = None,
         tokens: Optional[Iterable[int]] = None,
         progress: bool = True) -> list[dict]:
    """Tune each shape and op on ``target`` ("llvm" = this CPU, "cuda" = this GPU) and append the winners
    to ``log_dir``. Returns the records written.

    ``log_dir``: default the user's (``$LSR_TUNING_LOGS``, else ``~/.local/share/lsr_compile/tuning_logs``),
    which dispatch reads; records written elsewhere apply once passed to ``lsr_compile.load_logs``.

    ``shapes``: LSRShapes, or a model with LSR layers (LSRLinear or peft's) or an AdapterBank: then each distinct
    layer problem at each of ``tokens`` (default ``(1, 2048)``: a decode step and a prefill; 1 to 16 rows share
    one record; ``shapes_of``).
    ``trials``: at most this many compiled-kernel configs per (shape, op) besides the PyTorch formulations.
    ``ops``: default forward and backward; for a mixed-batch shape (``shape.mixed``) ``mixed_forward`` and
    ``mixed_backward``; for a shape over a quantized base (``base != "dense"``) ``adapter_forward`` and
    ``adapter_backward`` (timed against the dense layer as the floor).
    ``time_budget_s``: for the whole call (default: 85 s per shape and op, under 3 minutes per shape; for a
    model 5 minutes in all, at least 10 s per job). How long it may take is printed (and logged) first.
    On a machine without a GPU, ``target="cuda"`` builds the CUDA kernels (nvcc) but records nothing.
    """
    if target not in TARGET_DEVICES:
        raise TuningError(f"unknown target {target!r}; choose one of {sorted(TARGET_DEVICES)}")
    if not isinstance(shapes, nn.Module) and isinstance(getattr(shapes, "model", None), nn.Module):
        shapes = shapes.model  # an AdapterBank: the model it serves
    from_model = isinstance(shapes, nn.Module)
    tokens = _token_counts(tokens if tokens is not None else MODEL_TOKENS if from_model else (2048,))
    if from_model:
        shapes = shapes_of(shapes, tokens)
    elif isinstance(shapes, LSRShape):
        shapes = [shapes]
    try:
        shapes = list(shapes)
    except TypeError:
        raise TuningError(f"shapes must be LSRShape objects or a model with LSR layers, got {shapes!r}") from None
    if not shapes or not all(isinstance(s, LSRShape) for s in shapes):
        raise TuningError("shapes must be LSRShape objects (or a model with LSR layers)")
    ops = tuple(ops) if ops is not None else None
    if ops is not None and (not ops or any(op not in ALL_OPS for op in ops)):
        raise TuningError(f"ops must be among {ALL_OPS}, got {ops}")
    if trials is not None and (isinstance(trials, bool) or not isinstance(trials, int) or trials < 0):
        raise TuningError(f"trials must be None or an int >= 0, got {trials!r}")
    if time_budget_s is not None and (isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float))
                                      or not math.isfinite(time_budget_s) or time_budget_s <= 0):
        raise TuningError(f"time_budget_s must be None or a finite number of seconds > 0, got {time_budget_s!r}")
    if target == "cuda" and not torch.cuda.is_available():
        from ..kernels import tvm_cuda

        built = tvm_cuda.build_artifacts(shapes, ops)
        warnings.warn(f"tune(target='cuda'): no GPU here, so nothing was timed or recorded; {len(built)} TVM-CUDA "
                      f"kernels built for sm_90 into {tvm_cuda.artifact_dir()} for a GPU machine to time",
                      RuntimeWarning, stacklevel=2)
        return []
    log_dir = Path(log_dir) if log_dir is not None else shipped.user_log_dir()
    _check_writable(log_dir)  # before the work, not after it
    device = TARGET_DEVICES[target]
    jobs = [(s, op) for s in shapes for op in (ops or s.ops)]
    if time_budget_s:
        total = float(time_budget_s)
    elif from_model:
        total = len(jobs) * min(DEFAULT_BUDGET_S, max(MIN_JOB_S, MODEL_BUDGET_S / len(jobs)))
    else:
        total = len(jobs) * DEFAULT_BUDGET_S
    estimate = (f"tune: {len(jobs)} jobs ({len(shapes)} layer problems x {len(jobs) // max(len(shapes), 1)} ops) on "
                f"{target}: at most {total / 60:.1f} min")
    log.info("%s", estimate)
    deadline = time.perf_counter() + total  # one budget for the call: a job that overran leaves less to the rest
    if progress:
        print(estimate)
    bar = _progress(jobs, target, trials, progress)
    written, forward_winners = [], {}
    try:
        for i, (shape, op) in enumerate(jobs):
            bar.set_postfix_str(f"{op} {shape.label()}", refresh=False)
            budget = max(deadline - time.perf_counter(), 0.0) / (len(jobs) - i)
            rec = _job(shape, op, target, device, trials, budget, bar, forward_winners.get(shape))
            if rec is None:
                continue
            if op == "forward":
                forward_winners[shape] = rec
            logs.append(logs.log_path(log_dir, target, rec["device"]["id"], op), rec)
            written.append(rec)
            log.info("tune: %s", summary(rec))
    finally:
        bar.close()
    return written
