"""Timing that survives noisy machines: warm-up, candidates interleaved round by round, medians.

Interleaving matters here: on the 2-core CI-class machines, back-to-back runs of
one candidate drift by 20-30% as clocks and caches settle, so candidates timed
in separate blocks are not comparable; in one round-robin they are.

On a GPU, work is asynchronous: each sample is a pair of CUDA events around
``reps`` back-to-back calls (``reps`` chosen in the warm-up so a sample spans at
least ``min_sample_ms``), so the host issues calls ahead of the GPU as in a model
and a call costs max(its GPU time, its host time). With one call per sample (as
first tried on the H200) the GPU idled while the host issued each call, adding
the host's whole per-call cost to every GPU time: 4096², N = 8192, the fold
formulation read 1.27x the floor in the tuner and 1.96x through the layer.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_reps(fn: Callable[[], object], min_sample_ms: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_ms`` (at most 1000)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    return int(min(1000, max(1, round(min_sample_ms / one))))


def _cpu_reps(fn: Callable[[], object], min_sample_ms: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_ms`` (at most 1000): a decode-sized call
    takes microseconds, below what one timer read resolves on a busy machine."""
    t0 = time.perf_counter()
    fn()
    one = max((time.perf_counter() - t0) * 1e3, 1e-4)
    return int(min(1000, max(1, round(min_sample_ms / one))))


CPU_MIN_SAMPLE_MS = 1.0


def measure(candidates: dict[str, Callable[[], object]], device: torch.device | str = "cpu", warmup: int = 2,
            rounds: int = 10, budget_s: Optional[float] = None, progress=None,
            min_sample_ms: float = 10.0) -> dict[str, list[float]]:
    """Per-candidate call times in ms, one list entry per round; at least 3 rounds even past ``budget_s``.
    A sample is several back-to-back calls when one is short: at least ``min_sample_ms`` on a GPU,
    ``CPU_MIN_SAMPLE_MS`` on a CPU."""
    device = torch.device(device)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    reps = {k: _cuda_reps(fn, min_sample_ms) if device.type == "cuda" else _cpu_reps(fn, CPU_MIN_SAMPLE_MS)
            for k, fn in candidates.items()}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in candidates.items():
            times[name].append(_sample(fn, device, reps[name]))
        if progress is not None:
            progress.update(1)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def _sample(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def median(xs: list[float]) -> float:
    return statistics.median(xs)
