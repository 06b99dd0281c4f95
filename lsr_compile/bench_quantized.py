"""A quantized frozen base under an LSR adapter: memory (base + adapter + AdamW state) per base format, and step
time against the unquantized layer, forward and forward+backward, measured side by side in one run.

    python -m lsr_compile.cli bench-quantized [--quick]   # rows to results/bench-quantized-<target>-<device>.jsonl

Formats: fp32 and bf16 (dense), torchao int8 weight-only, torchao intx weight-only int4 (on a CPU build stored
one value per byte), bitsandbytes NF4 — each where its library is installed and runs on the device.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from . import bench
from .config import LSRConfig
from .device import device_id, target_of
from .nn import LSRLinear
from .quantized import base_format
from .tuning.timing import measure, median

log = logging.getLogger(__name__)
CONFIG = dict(s=4, r=(2, 4))


def _tensor_bytes(t) -> int:
    """Bytes a (possibly quantized) tensor holds: the inner tensors of a subclass, a 4-bit base's state."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    qs = getattr(t, "quant_state", None)
    extra = sum(v.numel() * v.element_size() for v in vars(qs).values() if isinstance(v, torch.Tensor)) if qs else 0
    return t.numel() * t.element_size() + extra


def _formats() -> dict[str, Callable[[torch.nn.Linear], torch.nn.Module]]:
    out = {"fp32": lambda lin: lin, "bf16": lambda lin: lin.to(torch.bfloat16)}
    if importlib.util.find_spec("torchao") is not None:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        def q(cfg):
            def apply(lin):
                m = torch.nn.Sequential(lin)
                quantize_(m, cfg)
                return m[0]
            return apply
        out["int8 (torchao)"] = q(Int8WeightOnlyConfig())
        out["int4 (torchao intx, group 32)"] = q(IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                       granularity=PerGroup(32)))
    if importlib.util.find_spec("bitsandbytes") is not None:
        def nf4(lin):
            import bitsandbytes as bnb

            q4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, quant_type="nf4",
                                   compute_dtype=torch.float32)
            q4.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
            q4.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
            return q4
        out["nf4 (bitsandbytes)"] = nf4
    return out


def run(out: Path, quick: bool = False, d_in: int = 4096, d_out: int = 11008, tokens: int = 256) -> list[dict]:
    if quick:
        d_in, d_out, tokens = 256, 512, 32
    torch.manual_seed(0)
    dense = torch.nn.Linear(d_in, d_out)
    layers, rows = {}, []
    for name, make in _formats().items():
        lin = torch.nn.Linear(d_in, d_out)
        lin.load_state_dict(dense.state_dict())
        try:
            base = make(lin)
            layers[name] = LSRLinear.from_linear(base, LSRConfig(**CONFIG, init="reference"))
        except Exception as e:  # noqa: BLE001  a library that does not run here is reported, not fatal
            log.warning("bench-quantized: %s left out: %s: %s", name, type(e).__name__, str(e)[:200])
    x32 = torch.randn(tokens, d_in)
    calls = {}
    for name, layer in layers.items():
        x = x32.to(layer.A1.dtype).requires_grad_(True)
        calls[(name, "forward")] = (lambda layer=layer, x=x: layer(x.detach()))
        calls[(name, "forward+backward")] = (lambda layer=layer, x=x: layer(x).sum().backward())
    times = measure({f"{n}|{m}": c for (n, m), c in calls.items()}, "cpu", warmup=1, rounds=3 if quick else 7,
                    budget_s=10 if quick else 90)
    meta = bench.provenance("cpu")
    for name, layer in layers.items():
        base_bytes = _tensor_bytes(layer.weight) + (_tensor_bytes(layer.bias) if layer.bias is not None else 0)
        adapter = sum(p.numel() * p.element_size() for p in (layer.A1, layer.A2, layer.B1, layer.B2))
        adam = 2 * sum(p.numel() * 4 for p in (layer.A1, layer.A2, layer.B1, layer.B2))  # fp32 moments
        for mode in ("forward", "forward+backward"):
            t = median(times[f"{name}|{mode}"])
            ref = median(times[f"fp32|{mode}"])
            rows.append(meta | {"format": name, "base_format": base_format(layer.weight), "mode": mode,
                                "d_in": d_in, "d_out": d_out, "tokens": tokens, "base_bytes": base_bytes,
                                "adapter_bytes": adapter, "optimizer_bytes": adam,
                                "p50_ms": round(t, 3), "ratio_to_fp32": round(t / ref, 3)})
    bench.write_rows(out, rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| base format | base | adapter | AdamW state | total | vs fp32 | forward / fp32 layer | "
             "fwd+bwd / fp32 layer |", "|---|---|---|---|---|---|---|---|"]
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    fp32 = next(r for r in rows if r["format"] == "fp32")
    total32 = fp32["base_bytes"] + fp32["adapter_bytes"] + fp32["optimizer_bytes"]
    for name in dict.fromkeys(r["format"] for r in rows):
        by = {r["mode"]: r for r in rows if r["format"] == name}
        r = by["forward"]
        total = r["base_bytes"] + r["adapter_bytes"] + r["optimizer_bytes"]
        lines.append(f"| {name} | {mb(r['base_bytes'])} | {mb(r['adapter_bytes'])} | {mb(r['optimizer_bytes'])} | "
                     f"{mb(total)} | {total / total32:.2f}x | {r['ratio_to_fp32']:.2f} | "
                     f"{by['forward+backward']['ratio_to_fp32']:.2f} |")
    return "\n".join(lines)


def default_out(folder: Optional[Path] = None) -> Path:
    return Path(folder or "results") / f"bench-quantized-{target_of('cpu')}-{device_id('cpu')}.jsonl"
