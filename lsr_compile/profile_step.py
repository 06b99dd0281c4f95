"""One training step under ``torch.profiler``: which kernels run, how long each takes on the device, how long the
host takes to issue the step, and how long the device waits. The GPU check's first stage (it answers "host or
device?" for everything after it); on a CPU (the dry run) the same code reports the CPU's ops.

    profile_steps(modules, x, g, steps) -> {name: StepProfile}
    table(profiles)                     -> markdown: per step, then per kernel
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@dataclass
class StepProfile:
    name: str
    steps: int
    host_us: float  # wall time per step on the host, profiler on (it adds a little per call)
    device_us: float  # device time per step: the union of the kernels' busy intervals
    idle: float  # fraction of the step's span during which the device ran no kernel
    kernels: int  # kernels per step
    by_kernel: list = field(default_factory=list)  # (name, calls per step, device µs per step), largest first

    def row(self) -> dict:
        return asdict(self)


def _train_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(g)
    return run


def _busy_union(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        busy += e - max(s, end)
        end = e
    return busy


def profile_steps(modules: dict[str, nn.Module], x: torch.Tensor, g: torch.Tensor, steps: int = 5,
                  trace_dir: Optional[Path] = None, trace_of: Optional[str] = None) -> dict[str, StepProfile]:
    """Profile ``steps`` training steps of each module (after two warm-up steps). With ``trace_dir``, the
    Chrome trace of ``trace_of``'s steps is written there (gzip: small enough to come back from a GPU run)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for name, module in modules.items():
        step = _train_step(module, x, g)
        for _ in range(2):
            step()
        if cuda:
            torch.cuda.synchronize(x.device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            host = (time.perf_counter() - t0) / steps * 1e6
            if cuda:
                torch.cuda.synchronize(x.device)
            span = (time.perf_counter() - t0) * 1e6
        events = [e for e in prof.events() if (e.device_type.name == "CUDA") == cuda
                  and (not cuda or e.device_time_total > 0)]
        kernels = [e for e in events if cuda or (e.name.startswith("aten::") and not e.cpu_children)]
        by: dict[str, list[float]] = {}
        for e in kernels:
            by.setdefault(e.name, []).append((e.device_time_total if cuda else e.cpu_time_total))
        intervals = [(e.time_range.start, e.time_range.end) for e in kernels]
        device = _busy_union(intervals) / steps
        out[name] = StepProfile(
            name=name, steps=steps, host_us=round(host, 1), device_us=round(device, 1),
            idle=round(max(0.0, 1 - device * steps / span), 3) if cuda else 0.0, kernels=len(kernels) // steps,
            by_kernel=sorted(((k[:80], len(v) / steps, round(sum(v) / steps, 1)) for k, v in by.items()),
                             key=lambda r: -r[2]))
        if trace_dir is not None and name == trace_of:
            path = Path(trace_dir) / f"trace-{name.replace(' ', '_')}.json"
            prof.export_chrome_trace(str(path))
            import gzip
            import shutil

            with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
    return out


def table(profiles: dict[str, StepProfile], title: str) -> str:
    lines = [f"### {title}", "", "| step | kernels | host µs | device µs | device idle |", "|---|---|---|---|---|"]
    for p in profiles.values():
        lines.append(f"| {p.name} | {p.kernels} | {p.host_us:.1f} | {p.device_us:.1f} | {100 * p.idle:.0f} % |")
    for p in profiles.values():
        lines += ["", f"{p.name}: kernels per step (calls, device µs)", ""]
        lines += [f"- {n}: {c:g} x, {us:.1f} µs" for n, c, us in p.by_kernel[:14]]
    return "\n".join(lines)
