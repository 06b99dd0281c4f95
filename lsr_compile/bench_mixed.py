"""Mixed-batch benchmark: one layer, a batch of requests spread over K resident adapters, forward.

Side by side in one interleaved run (ratios, not absolute times, carry across runs): the mixed LSR op
(dispatch's choice) and each of its PyTorch formulations (``loop`` = looping over adapters); the same batch
through one adapter (the single-adapter op); peft LoRA's own mixed batch (``adapter_names``) with K
adapters of the same inner rank; the frozen layer alone. Requests pick adapters uniformly or skewed
(a few adapters take most requests). Also the memory one resident adapter takes, LSR factors against its
exact LoRA export.

    python -m lsr_compile.cli bench-mixed [--quick]     # rows to results/bench-mixed-<target>-<device>.jsonl
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from . import bench, mixed_formulations as mf
from .config import LSRConfig
from .device import device_id, target_of
from .dispatch import use_backend
from .kernels import unavailable
from .ops import lsr_linear, mixed_linear
from .tuning.timing import measure, median

log = logging.getLogger(__name__)
CONFIG = dict(s=8, r=(2, 4))  # q = 8: the same inner rank as LoRA r = 8


def request_slots(requests: int, K: int, dist: str, g: torch.Generator) -> list[int]:
    """Each request's adapter: uniform over the K slots, or skewed (slot ⌊K·u³⌋: a few slots take most)."""
    u = torch.rand(requests, generator=g)
    if dist == "skewed":
        u = u ** 3
    return [min(int(K * v), K - 1) for v in u.tolist()]


def _peft_lora_layer(base: torch.nn.Linear, K: int, r: int):
    """peft's LoRA Linear holding K adapters ``a0 .. a{K-1}`` of rank r, each with random (nonzero) B."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    cfg = LoraConfig(r=r, lora_alpha=r)
    layer = Linear(base, "a0", cfg, r=r, lora_alpha=r)
    for k in range(1, K):
        layer.update_layer(f"a{k}", r=r, lora_alpha=r, config=cfg)
    with torch.no_grad():
        for k in range(K):
            layer.lora_B[f"a{k}"].weight.normal_(0, 0.02)
    return layer.eval()


def bench_case(d: int, K: int, dist: str, requests: int, per_request: int, device="cpu", dtype=torch.float32,
               rounds: int = 15, budget_s: float = 30.0, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cfg = LSRConfig(**CONFIG)
    f = cfg.shapes_for(d, d)
    kw = dict(device=device, dtype=dtype)
    base = torch.nn.Linear(d, d, **kw).requires_grad_(False)
    bank = [(0.1 * torch.randn(K, *sz, generator=g)).to(**kw) for sz in f.factor_sizes().values()]
    scales = torch.ones(K, device=device)
    slots = request_slots(requests, K, dist, g)
    ptr, seg = mf.segments_of([per_request] * requests, slots, device=device)
    x = torch.randn(requests * per_request, d, generator=g).to(**kw)
    one = [t[0] for t in bank]
    calls = {
        "floor": lambda: F.linear(x, base.weight, base.bias),
        "lsr mixed": lambda: mixed_linear(x, base.weight, base.bias, *bank, scales, ptr, seg),
        "lsr one adapter": lambda: lsr_linear(x, base.weight, base.bias, *one, 1.0),
    }
    for variant, fn in mf.FORWARDS.items():
        calls[f"lsr {variant}"] = (lambda fn=fn: fn(x, base.weight, base.bias, *bank, scales, ptr, seg))
    for backend in ("tvm", "triton"):
        if unavailable(backend, torch.device(device)) is None and not (backend == "triton" and device == "cpu"):
            def forced(backend=backend):
                with use_backend(backend):
                    return mixed_linear(x, base.weight, base.bias, *bank, scales, ptr, seg)
            try:  # a backend that cannot build this problem here (no artifact, no compiler) is left out
                forced()
            except Exception as e:  # noqa: BLE001
                log.warning("bench-mixed: %s left out: %s: %s", backend, type(e).__name__, str(e)[:200])
                continue
            calls[f"lsr {backend}"] = forced
    lora = _peft_lora_layer(torch.nn.Linear(d, d, **kw).requires_grad_(False), K, f.q)
    names = [f"a{k}" for k in slots]
    x3 = x.view(requests, per_request, d)
    calls["peft lora mixed"] = lambda: lora(x3, adapter_names=names)
    with torch.no_grad():
        times = measure(calls, device, warmup=2, rounds=rounds, budget_s=budget_s)
    med = {n: median(t) for n, t in times.items()}
    elem = torch.empty(0, **kw).element_size()
    common = {"d": d, "K": K, "dist": dist, "requests": requests, "tokens": requests * per_request,
              "active": len(set(slots)), "s": f.s, "r1": f.r1, "r2": f.r2, "dtype": str(dtype)[6:],
              "lsr_bytes_per_adapter": f.num_params * elem, "lora_bytes_per_adapter": f.q * 2 * d * elem,
              "target": target_of(device)}
    return [common | {"provider": n, "p50_ms": round(med[n], 4), "rounds": len(times[n]),
                      "ratio_to_floor": round(med[n] / med["floor"], 4),
                      "ratio_to_one_adapter": round(med[n] / med["lsr one adapter"], 4)} for n in calls]


def cases(quick: bool) -> list[tuple[int, str, int, int]]:
    """(K, dist, requests, tokens per request) on a 768² layer."""
    if quick:
        return [(K, dist, 8, 16) for K in (1, 8) for dist in ("uniform", "skewed")]
    return [(K, dist, 64, 32) for K in (1, 8, 64, 512) for dist in ("uniform", "skewed")]


def run(out: Path, quick: bool = False, device="cpu", d: int = 768) -> list[dict]:
    meta = bench.provenance(device)
    rows = []
    for K, dist, requests, per in cases(quick):
        rows += [r | meta for r in bench_case(d, K, dist, requests, per, device=device,
                                              rounds=5 if quick else 15, budget_s=5 if quick else 30)]
    _check(rows)
    bench.write_rows(out, rows)
    return rows


def table(rows: list[dict]) -> str:
    """Per (K, distribution): the mixed op's time over the same batch with one adapter, and how much slower
    looping over adapters and peft LoRA's mixed batch are than the mixed op."""
    lines = ["| K resident | requests → adapters | active | LSR mixed / one adapter | loop / LSR mixed | "
             "peft LoRA mixed / LSR mixed | LSR mixed / floor | bytes per adapter: LSR / LoRA export |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["K"], r["dist"]) for r in rows}, key=lambda k: (k[0], k[1] != "uniform"))
    for K, dist in keys:
        by = {r["provider"]: r for r in rows if (r["K"], r["dist"]) == (K, dist)}
        m = by["lsr mixed"]
        lines.append(f"| {K} | {dist} | {m['active']} | {m['ratio_to_one_adapter']:.2f} | "
                     f"{by['lsr loop']['p50_ms'] / m['p50_ms']:.2f} | "
                     f"{by['peft lora mixed']['p50_ms'] / m['p50_ms']:.2f} | {m['ratio_to_floor']:.2f} | "
                     f"{m['lsr_bytes_per_adapter']:,} / {m['lora_bytes_per_adapter']:,} "
                     f"({m['lora_bytes_per_adapter'] / m['lsr_bytes_per_adapter']:.1f}x) |")
    return "\n".join(lines)


def default_out(device="cpu", folder: Optional[Path] = None) -> Path:
    return Path(folder or "results") / f"bench-mixed-{target_of(device)}-{device_id(device)}.jsonl"


def _check(rows) -> None:
    bad = [r for r in rows if not math.isfinite(r["p50_ms"]) or r["p50_ms"] <= 0]
    if bad:
        raise RuntimeError(f"bench-mixed: unusable timings {bad[:2]}")
