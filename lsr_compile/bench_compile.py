"""Which ``torch.compile`` mode (`lsr-compile bench-compile`): a layer and the demo model, eager, default
``torch.compile`` (dispatch's tuned choice baked into the graph) and ``torch.compile(mode="max-autotune")`` (Inductor
benchmarks LSR's candidates in the graph, ``inductor_autotune``), side by side in one run; forward and
forward+backward, and the compile time of each.

The layer and the model's shapes are tuned first (``tune``, a short budget, into a log directory of this run) so
that "tuned dispatch" is what default mode compiles. Compiles are cold: Inductor's FX-graph, AOTAutograd and
autotuning caches are off while this runs, and the CLI gives Inductor a fresh cache directory (within the process
a C++ kernel built once and autotuning timings are still reused: the training graph's compile reuses what the
inference graph's measured for the same op and sizes, a later provider the kernels an earlier one built).
"""
from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from . import dispatch, inductor_autotune
from .bench import provenance, write_rows
from .config import LSRConfig
from .demo import bert_encoder, minilm_encoder, model_variants
from .device import device_id
from .nn import LSRLinear, lsr_layers
from .problem import LSRShape
from .tuning import tune
from .tuning.timing import measure, median

PROVIDERS = ("eager", "compile", "max-autotune", "max-autotune, LSR fixed")
"""``max-autotune, LSR fixed``: max-autotune with LSR's candidates off (``inductor_autotune.disabled``): Inductor
autotunes its own kernels, LSR's layers keep dispatch's choice; what LSR's candidates add, apart."""


@contextlib.contextmanager
def cold_compiles():
    """Inductor's caches off (each compile measured from scratch) and room for every compiled variant."""
    with torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=256):
        yield


def _compiled(module: nn.Module) -> dict[str, nn.Module]:
    return {"eager": module,
            "compile": torch.compile(copy.deepcopy(module), fullgraph=True),
            "max-autotune": torch.compile(copy.deepcopy(module), mode="max-autotune", fullgraph=True),
            # max-autotune's options less CUDA graphs (none on a CPU): another compiler for Dynamo, so this
            # provider is compiled apart, not served the graph compiled for "max-autotune"
            "max-autotune, LSR fixed": torch.compile(copy.deepcopy(module), fullgraph=True, options={
                "max_autotune": True, "coordinate_descent_tuning": True})}


def _calls(mods: dict[str, nn.Module], make: Callable[[nn.Module], Callable[[], object]]
           ) -> dict[str, Callable[[], object]]:
    calls = {k: make(m) for k, m in mods.items()}
    fixed = calls["max-autotune, LSR fixed"]

    def run_fixed():
        with inductor_autotune.disabled():
            fixed()
    return calls | {"max-autotune, LSR fixed": run_fixed}


def warm_up_inductor() -> None:
    """Compile a trivial function in each mode, so that what any first compile pays once per process (imports,
    Inductor's C++ prelude) is not counted to the first provider."""
    x = torch.randn(64, 64)
    torch.compile(lambda t: (t @ t).relu() + 1)(x)
    torch.compile(lambda t: (t @ t).sigmoid() + 1, mode="max-autotune")(x)


def _timed_first(calls: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Seconds of each call's first run (its compile, for a compiled provider) less one steady run."""
    out = {}
    for name, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn()
        out[name] = max(first - (time.perf_counter() - t0), 0.0)
    return out


def _rows(case: str, mode: str, calls: dict[str, Callable[[], object]], rounds: int, budget_s: float,
          extra: dict) -> list[dict]:
    compile_s = _timed_first(calls)
    times = measure(calls, "cpu", warmup=1, rounds=rounds, budget_s=budget_s)
    t = {k: median(v) for k, v in times.items()}
    return [{"case": case, "mode": mode, "provider": k, "p50_ms": round(t[k], 3), "rounds": len(times[k]),
             "vs_eager": round(t[k] / t["eager"], 4), "vs_compile": round(t[k] / t["compile"], 4),
             "compile_s": round(compile_s[k], 2), **extra} for k in calls]


def bench_layer(shape: LSRShape, rounds: int = 7, budget_s: float = 30.0) -> list[dict]:
    f = shape.factors
    torch.manual_seed(0)
    layer = LSRLinear(f.d_in, f.d_out, config=LSRConfig(s=f.s, r=(f.r1, f.r2), init="reference"))
    mods = _compiled(layer)
    x = torch.randn(shape.tokens, f.d_in)
    g = torch.randn(shape.tokens, f.d_out)
    xg = x.clone().requires_grad_()
    rows = []

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)
        return run

    def step(m):
        params = [p for p in m.parameters() if p.requires_grad]

        def run():
            for p in params:
                p.grad = None
            m(xg).backward(g)
        return run

    extra = {"tokens": shape.tokens, "d_in": f.d_in, "d_out": f.d_out, "s": f.s, "r1": f.r1, "r2": f.r2}
    case = f"layer {shape.label()}"
    rows += _rows(case, "forward", _calls(mods, forward), rounds, budget_s, extra)
    rows += _rows(case, "forward+backward", _calls(mods, step), rounds, budget_s, extra)
    return rows


def bench_model(batch: int, seq: int, rounds: int = 5, budget_s: float = 60.0,
                config: Optional[LSRConfig] = None) -> list[dict]:
    """The demo's model (MiniLM-sized, LSR on query/key/value/attention output), as the demo builds it."""
    torch.manual_seed(0)
    base, name = minilm_encoder()
    lsr = model_variants(base, config or LSRConfig(s=4, r=(2, 4), init="reference"))["LSR autotuned ops (eager)"]
    mods = _compiled(lsr)
    ids = torch.randint(1000, 20000, (batch, seq))

    def forward(m):
        def run():
            with torch.no_grad():
                m(input_ids=ids)
        return run

    def step(m):
        params = [p for p in m.parameters() if p.requires_grad]

        def run():
            for p in params:
                p.grad = None
            m(input_ids=ids).last_hidden_state.square().mean().backward()
        return run

    extra = {"tokens": batch * seq, "model": name}
    case = f"model {name.split(' (')[0]}, {batch}x{seq} tokens"
    return (_rows(case, "forward", _calls(mods, forward), rounds, budget_s, extra)
            + _rows(case, "forward+backward", _calls(mods, step), rounds, budget_s, extra))


def model_shapes(batch: int, seq: int, config: Optional[LSRConfig] = None) -> list[LSRShape]:
    base, _ = minilm_encoder()
    lsr = model_variants(base, config or LSRConfig(s=4, r=(2, 4), init="reference"))["LSR autotuned ops (eager)"]
    return sorted({m.lsr_shape(batch * seq) for m in lsr_layers(lsr).values()}, key=str)


def run(out: Optional[Path], layer: LSRShape = LSRShape(2048, 768, 768, s=4, r=(2, 4)), batch: int = 8,
        seq: int = 64, tune_budget_s: float = 60.0, rounds: int = 7, progress: bool = True) -> list[dict]:
    """Tune the problems (``tune_budget_s``; 0: dispatch as it is), then the layer and the model side by side."""
    say = print if progress else (lambda *a, **k: None)
    meta = provenance("cpu") | {"load_before": round(os.getloadavg()[0], 2),
                                "hook": inductor_autotune.missing() or "yes"}
    if tune_budget_s > 0:
        logs = Path(tempfile.mkdtemp(prefix="lsr-bench-compile-logs-"))
        shapes = [layer] + model_shapes(batch, seq)
        say(f"tuning {len(shapes)} shapes for llvm/{device_id('cpu')} ({tune_budget_s:.0f} s) into {logs}")
        tune(shapes, target="llvm", log_dir=logs, time_budget_s=tune_budget_s, trials=4)
        dispatch.load_logs(logs)
    rows = []
    with cold_compiles():
        warm_up_inductor()
        say(f"layer {layer.label()} ...")
        rows += bench_layer(layer, rounds=rounds)
        say(f"model, {batch}x{seq} tokens ...")
        rows += bench_model(batch, seq, rounds=max(3, rounds - 2))
    meta["load_after"] = round(os.getloadavg()[0], 2)
    rows = [r | meta for r in rows]
    if out is not None:
        write_rows(out, rows)
    return rows


def default_out(folder: Path) -> Path:
    return folder / f"bench-compile-llvm-{device_id('cpu')}.jsonl"


def table(rows: list[dict]) -> str:
    """Per case and mode: each provider's median over eager's and over default compile's, and compile time."""
    lines = ["| case | mode | provider | ms (p50) | vs eager | vs default compile | compile s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['mode']} | {r['provider']} | {r['p50_ms']:.2f} | {r['vs_eager']:.3f} | "
                     f"{r['vs_compile']:.3f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)
