"""Side-by-side benchmark (docs/design.md §2, "the floor"): frozen base, reference eager / compiled, LoRA of the same inner rank,
LSRLinear (autotuned dispatch), forward and forward+backward, timed in one interleaved run per shape.

Writes long-form rows (JSON lines, with device, versions and git revision), prints a ratio table
and draws a PNG from the rows.
"""
from __future__ import annotations

import datetime
import json
import math
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import logs, reference
from .config import LSRConfig
from .nn import LSRLinear
from .problem import LSRShape, dtype_name
from .device import device_id, device_info
from .tuning.timing import measure, median

PROVIDERS = ("floor", "lsr", "lsr_compiled", "reference", "reference_compiled", "lora", "peft_lora", "peft_lokr")
GRAPHED = ("floor_graphs", "lsr_graphs")  # torch.compile(mode="reduce-overhead"): CUDA graphs, on a GPU


def _git_rev() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return None


class _LoRA(nn.Module):
    """Plain-PyTorch LoRA of rank q on the same frozen base: the peer users have today."""

    def __init__(self, base: nn.Linear, q: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.A = nn.Parameter(torch.randn(q, base.in_features, dtype=base.weight.dtype) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, q, dtype=base.weight.dtype) * 0.01)

    def forward(self, x):
        return self.base(x) + self.scale * ((x @ self.A.T) @ self.B.T)


class _Holder(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft(base: nn.Linear, config) -> nn.Module:
    """A peft adapter on a copy of the same frozen layer (LoRA, or LoKr: the Kronecker peer)."""
    import copy

    from peft import get_peft_model

    return get_peft_model(_Holder(copy.deepcopy(base)), config)


class _Reference(nn.Module):
    def __init__(self, layer: LSRLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        l = self.layer
        return reference.lsr_linear(x, l.weight, l.bias, l.A1, l.A2, l.B1, l.B2, l.scale)


def providers(shape: LSRShape, device="cpu", graphs: Optional[bool] = None) -> dict[str, nn.Module]:
    """The side-by-side's modules on one frozen layer; ``graphs`` (default: on a GPU) adds the frozen layer and
    the LSR layer compiled with ``mode="reduce-overhead"`` (CUDA graphs)."""
    from peft import LoKrConfig, LoraConfig

    f = shape.factors
    base = nn.Linear(f.d_in, f.d_out, device=device, dtype=shape.dtype).requires_grad_(False)
    cfg = LSRConfig(s=f.s, r=(f.r1, f.r2), n=(f.n1, f.n2), m=(f.m1, f.m2), init="reference")
    lsr = LSRLinear.from_linear(base, cfg)
    ref = _Reference(lsr)
    return {
        "floor": base,
        "lsr": lsr,
        "lsr_compiled": torch.compile(lsr, dynamic=False, fullgraph=True),
        "reference": ref,
        "reference_compiled": torch.compile(ref, dynamic=False, fullgraph=True),
        "lora": _LoRA(base, f.q, lsr.scale).to(device),
        "peft_lora": _peft(base, LoraConfig(r=f.q, lora_alpha=f.q, target_modules=["lin"], init_lora_weights=False)),
        "peft_lokr": _peft(base, LoKrConfig(r=f.q, alpha=f.q, target_modules=["lin"], init_weights=False)),
    } | ({"floor_graphs": torch.compile(base, mode="reduce-overhead", dynamic=False),
          "lsr_graphs": torch.compile(lsr, mode="reduce-overhead", dynamic=False)}
         if (graphs if graphs is not None else torch.device(device).type == "cuda") else {})


def _step(module: nn.Module, x: torch.Tensor, g: torch.Tensor, mode: str, graphed: bool = False
          ) -> Callable[[], object]:
    """One call as training or serving makes it. A training step starts with no gradients, as after an
    optimizer's ``zero_grad()`` (set to None, its default): nothing is added into an old ``.grad``. A module
    under CUDA graphs marks each call a new step (its outputs are overwritten by the next replay)."""
    mark = torch.compiler.cudagraph_mark_step_begin if graphed else (lambda: None)
    if mode == "forward":
        def run():
            mark()
            with torch.no_grad():
                return module(x)
        return run

    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        mark()
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(g)
    return run


def bench_shape(shape: LSRShape, modes=("forward", "forward+backward"), device="cpu", rounds=15,
                budget_s=60.0, graphs: Optional[bool] = None) -> list[dict]:
    # new module instances share Dynamo's per-code recompile limit: without a reset, later shapes' "compiled"
    # providers would silently run eager
    torch._dynamo.reset()
    mods = providers(shape, device, graphs)
    f = shape.factors
    x = torch.randn(shape.tokens, f.d_in, device=device, dtype=shape.dtype)
    g = torch.randn(shape.tokens, f.d_out, device=device, dtype=shape.dtype)
    rows = []
    for mode in modes:
        xin = x.detach().clone().requires_grad_(mode != "forward")
        calls = {name: _step(m, xin, g, mode, graphed=name in GRAPHED) for name, m in mods.items()}
        times = measure(calls, device, warmup=3, rounds=rounds, budget_s=budget_s)
        floor = median(times["floor"])
        for name, t in times.items():
            ts = sorted(t)
            rows.append({
                "shape": shape.label(), "tokens": shape.tokens, "d_in": f.d_in, "d_out": f.d_out, "s": f.s,
                "r1": f.r1, "r2": f.r2, "dtype": dtype_name(shape.dtype), "mode": mode, "provider": name,
                "p50_ms": round(median(t), 4), "p20_ms": round(ts[len(ts) // 5], 4),
                "p80_ms": round(ts[min(len(ts) - 1, (4 * len(ts)) // 5)], 4),
                "ratio_to_floor": round(median(t) / floor, 4), "rounds": len(t),
            })
    return rows


def provenance(device="cpu") -> dict:
    """What every benchmark row carries, so rows from different runs and machines are never confused."""
    return {"device": device_id(device), "device_info": device_info(device), "versions": logs.library_versions(),
            "git": _git_rev(), "threads": torch.get_num_threads(),
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_rows(path: Path, rows: Iterable[dict], append: bool = False) -> None:
    """The one benchmark-row writer (this module's tables and the GPU check): JSON lines, sorted keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w") as fh:
        for r in rows:
            fh.write(json.dumps(r, sort_keys=True, default=str) + "\n")


def run(shapes: Iterable[LSRShape], out: Path, device="cpu", rounds=15, budget_s=60.0, progress=True) -> list[dict]:
    from tqdm.auto import tqdm

    meta = provenance(device)
    rows = []
    for shape in tqdm(list(shapes), desc="bench", disable=not progress):
        rows += [r | meta for r in bench_shape(shape, device=device, rounds=rounds, budget_s=budget_s)]
    write_rows(out, rows)
    return rows


def table(rows: list[dict], predicted: Optional[dict] = None) -> str:
    """Ratios per (shape, mode): each provider's median over the frozen Linear's, and LoRA/LSR, ref/LSR; under
    CUDA graphs (where measured) LSR over the frozen layer, both graphed. ``predicted``: (shape label, mode) ->
    the cost model's LSR/floor, printed beside the measured one."""
    keys = sorted({(r["d_out"], r["d_in"], r["tokens"], r["mode"]) for r in rows})
    graphs = any(r["provider"] in GRAPHED for r in rows)
    head = ("| shape (d_out x d_in, N) | mode | floor ms | LSR/floor | " + ("predicted | " if predicted else "")
            + "LSR compiled/floor | " + ("LSR graphs/floor graphs | " if graphs else "")
            + "ref eager/LSR | ref compiled/LSR compiled | LoRA/LSR | peft LoRA/LSR | peft LoKr/LSR |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for d_out, d_in, n, mode in keys:
        sub = [r for r in rows if (r["d_out"], r["d_in"], r["tokens"], r["mode"]) == (d_out, d_in, n, mode)]
        p = {r["provider"]: r["p50_ms"] for r in sub}
        pred = (predicted or {}).get((sub[0]["shape"], mode))
        cells = [f"{d_out}x{d_in}, {n}", mode, f"{p['floor']:.3f}", f"{p['lsr'] / p['floor']:.3f}"]
        cells += [f"{pred:.3f}" if pred else "-"] if predicted else []
        cells += [f"{p['lsr_compiled'] / p['floor']:.3f}"]
        if graphs:
            cells += [f"{p['lsr_graphs'] / p['floor_graphs']:.3f}" if "lsr_graphs" in p else "-"]
        cells += [f"{p['reference'] / p['lsr']:.3f}", f"{p['reference_compiled'] / p['lsr_compiled']:.3f}",
                  f"{p['lora'] / p['lsr']:.3f}", f"{p['peft_lora'] / p['lsr']:.3f}", f"{p['peft_lokr'] / p['lsr']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sub = [r for r in rows if r["mode"] == mode]
        labels = sorted({(r["d_out"], r["d_in"], r["tokens"]) for r in sub})
        width = 0.8 / len(PROVIDERS)
        for i, prov in enumerate(PROVIDERS):
            vals = [next((r["ratio_to_floor"] for r in sub if r["provider"] == prov and
                          (r["d_out"], r["d_in"], r["tokens"]) == lab), math.nan) for lab in labels]
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=prov)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 for j in range(len(labels))], [f"{a}x{b}\nN={n}" for a, b, n in labels], fontsize=7)
        ax.set_ylabel("time / frozen Linear")
        ax.set_title(f"{mode} ({rows[0]['device']})")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def dispatch_overhead(calls: int = 2000, device="cpu") -> dict[str, float]:
    """Host µs per eager call at a tiny layer (8 tokens, 16x16), where the host's work is all there is: the
    frozen Linear, plain LoRA, the PyTorch formulation called directly, the lsr op, the LSRLinear module.
    On a GPU, one synchronisation after all calls: what is measured is how fast calls can be issued."""
    import time

    from .kernels import torch_formulations
    from .ops import lsr_linear

    layer = LSRLinear(16, 16, config=LSRConfig(s=1, r=2, init="reference")).requires_grad_(False).to(device)
    lora = _LoRA(layer_base(layer), layer.factor_shapes.q, layer.scale).to(device)
    x = torch.randn(8, 16, device=device)
    args = (x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    fns = {"frozen Linear": lambda: torch.nn.functional.linear(x, layer.weight, layer.bias),
           "plain LoRA module": lambda: lora(x),
           "formulation (direct)": lambda: torch_formulations("forward")["materialise"](*args),
           "torch.ops.lsr.linear": lambda: lsr_linear(*args),
           "LSRLinear module": lambda: layer(x)}
    out = {}
    dev = torch.device(device)
    with torch.no_grad():
        for name, fn in fns.items():
            for _ in range(100):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            out[name] = (time.perf_counter() - t0) / calls * 1e6
    return out


def launch_host_us(calls: int = 2000, rounds: int = 7, device="cpu") -> dict[str, float]:
    """Host µs per call of the Triton paths around their launch, the launch itself stubbed out (Triton's
    ``run`` does nothing): what this package does on the host per call (checks, arguments, descriptors, the
    persistent launch's wave, the mixed batch's bank). A GPU's arguments (full tiles, the H200's SMs and L2),
    CPU tensors: the fused GEMM (bf16, 256 x 1024 -> 1024, q = 8) with pointers and with TMA descriptors, and
    a mixed batch's adapters (8 segments over a bank of 16, 64 x 128 -> 128) added by ``triton_mixed.forward``
    (its base GEMM, which it also runs, reported apart). Medians over ``rounds``. On a CPU the tensors' ATen
    calls compute (on one thread); on a GPU (``device``) they only queue work, which is never waited for."""
    import statistics
    import time

    import torch.nn.functional as F
    from triton.runtime import interpreter, jit

    from . import mixed_formulations as mf
    from .kernels import triton_fused, triton_mixed

    def per_call(fn) -> float:
        for _ in range(200):
            fn()
        meds = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            meds.append((time.perf_counter() - t0) / calls * 1e6)
        return statistics.median(meds)

    dt = torch.bfloat16
    r = lambda *s, dtype=dt: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    x, W, b = r(256, 1024), r(1024, 1024), r(1024)
    A, Bt = r(8, 1024), r(8, 1024)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    K, S, d = 16, 8, 128
    xm, Wm, bm = r(64, d), r(d, d), r(d)
    factors = (r(K, 2, 2, 16), r(K, 2, 4, 8), r(K, 2, 16, 2), r(K, 2, 8, 4))
    scales = r(K, dtype=torch.float32)
    ptr, ad = mf.segments_of([64 // S] * S, list(range(S)), device=device)
    mcfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)
    old = {cls: cls.run for cls in (jit.JITFunction, interpreter.InterpretedFunction)}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the CPU's ATen calls compute: one thread, so a busy machine's other jobs
        for cls in old:           # do not make their thread pool the measurement
            cls.run = lambda self, *a, **k: None
        with torch.no_grad(), triton_fused.gpu_arguments():
            out = {"fused, pointers": per_call(lambda: triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, cfg, True)),
                   "fused, TMA": per_call(lambda: triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7,
                                                                            dict(cfg, TMA=1), True)),
                   "mixed forward": per_call(lambda: triton_mixed.forward(xm, Wm, bm, *factors, scales, ptr, ad,
                                                                          mcfg)),
                   "its base GEMM (F.linear)": per_call(lambda: F.linear(xm, Wm, bm))}
    finally:
        torch.set_num_threads(threads)
        for cls, run in old.items():
            cls.run = run
    return out


def host_step_us(rounds: int = 9, steps: int = 500, device="cpu") -> dict[str, float]:
    """Host µs per eager training step (forward + backward, gradients for the input and every trainable
    parameter) at a tiny layer (8 tokens, 16x16), where the host's work is all there is: the frozen Linear,
    plain LoRA of the same inner rank, the LSRLinear module. Rounds interleave the three; each value is the
    median over rounds, and ``"lsr / lora"`` the median of the per-round ratios (this machine is noisy)."""
    import statistics
    import time

    layer = LSRLinear(16, 16, config=LSRConfig(s=1, r=2, init="reference")).to(device)
    lora = _LoRA(layer_base(layer), layer.factor_shapes.q, layer.scale).to(device)
    frozen = nn.Linear(16, 16).requires_grad_(False).to(device)
    x = torch.randn(8, 16, device=device, requires_grad=True)
    g = torch.randn(8, 16, device=device)
    steps_by = {"frozen Linear": frozen, "plain LoRA module": lora, "LSRLinear module": layer}
    calls = {name: _step(m, x, g, "forward+backward") for name, m in steps_by.items()}
    dev = torch.device(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(max(steps // 10, 1)):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times[name].append((time.perf_counter() - t0) / steps * 1e6)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["lsr / lora"] = statistics.median(a / b for a, b in zip(times["LSRLinear module"], times["plain LoRA module"]))
    return out


def layer_base(layer: LSRLinear) -> nn.Linear:
    """The frozen base of an LSRLinear as an nn.Linear sharing its weight and bias."""
    lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    lin.weight, lin.bias = layer.weight, layer.bias
    return lin
