"""Timing that survives noisy machines: warm-up, candidates interleaved round by round, medians.

Interleaving matters here: on the 2-core CI-class machines, back-to-back runs of
one candidate drift by 20-30% as clocks and caches settle, so candidates timed
in separate blocks are not comparable; in one round-robin they are.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(candidates: dict[str, Callable[[], object]], device: torch.device | str = "cpu", warmup: int = 2,
            rounds: int = 10, budget_s: Optional[float] = None, progress=None) -> dict[str, list[float]]:
    """Per-candidate call times in ms; at least 3 rounds even past ``budget_s``."""
    device = torch.device(device)
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in candidates}
    start = time.perf_counter()
    for r in range(rounds):
        for name, fn in candidates.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        if progress is not None:
            progress.update(1)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)
