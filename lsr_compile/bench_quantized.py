"""A quantized frozen base under an LSR adapter: memory (base + adapter + AdamW state) per base format, and step
time against the unquantized layer, forward and forward+backward, measured side by side in one run.

    python -m lsr_compile.cli bench-quantized [--quick] [--device cuda]   # rows to results/bench-quantized-*.jsonl

Formats: the dense base at the activations' dtype (fp32 on a CPU, with bf16 beside it; bf16 on a GPU), torchao
int8 weight-only, torchao int4 weight-only (tinygemm's packing on CUDA; intx, one value per byte, on a CPU
build), bitsandbytes NF4 — each where its library is installed and runs on the device.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import bench, reference
from .config import LSRConfig
from .device import device_id, target_of
from .nn import LSRLinear
from .problem import dtype_name
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


def adapter_error(layer: LSRLinear, x: torch.Tensor) -> float:
    """``max |layer(x) − base(x) − x·ΔWᵀ| / max |x·ΔWᵀ|`` with ΔW from the float64 reference: the adapter beside
    this base (whatever kernel ran it) is right. The base term is the base's own output, so its quantization
    error cancels."""
    with torch.no_grad():
        base = layer._base_forward(x) if layer._base_forward is not None else F.linear(x, layer.weight, layer.bias)
        dW = reference.delta_weight(*(p.double() for p in (layer.A1, layer.A2, layer.B1, layer.B2)), layer.scale)
        want = x.double() @ dW.T
        got = layer(x).double() - base.double()
        return float((got - want).abs().max() / want.abs().max())


DENSE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _formats(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[torch.nn.Linear], torch.nn.Module]]:
    """The dense base at the activations' dtype first (what every ratio is against), then each format whose
    library is installed; one that does not run on this device is left out at build time, with the reason."""
    out = {DENSE_NAMES[dtype]: lambda lin: lin}
    if device.type == "cpu" and dtype == torch.float32:
        out["bf16"] = lambda lin: lin.to(torch.bfloat16)
    if importlib.util.find_spec("torchao") is not None:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        def q(cfg):
            def apply(lin):
                m = torch.nn.Sequential(lin)
                quantize_(m, cfg)
                return m[0]
            return apply
        out["int8 (torchao)"] = q(Int8WeightOnlyConfig())
        if device.type == "cuda":  # tinygemm's packed int4 (bf16, sm_80+): the CUDA int4 weight-only path
            out["int4 (torchao tinygemm, group 128)"] = q(Int4WeightOnlyConfig(
                group_size=128, int4_packing_format="tile_packed_to_4d"))
        out["int4 (torchao intx, group 32)"] = q(IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                       granularity=PerGroup(32)))
    if importlib.util.find_spec("bitsandbytes") is not None:
        def nf4(lin):
            import bitsandbytes as bnb

            q4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, quant_type="nf4",
                                   compute_dtype=dtype, device="cpu")
            q4.weight = bnb.nn.Params4bit(lin.weight.data.cpu().clone(), requires_grad=False, quant_type="nf4")
            q4.bias = torch.nn.Parameter(lin.bias.data.cpu().clone(), requires_grad=False)
            return q4.to(device)  # bitsandbytes quantizes on the move to the device
        out["nf4 (bitsandbytes)"] = nf4
    return out


def run(out: Optional[Path], quick: bool = False, d_in: int = 4096, d_out: int = 11008, tokens: int = 256,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        budget_s: Optional[float] = None, left_out: Optional[list[str]] = None) -> list[dict]:
    """Rows per (format, forward | forward+backward): bytes of base, adapter and AdamW state, the median time and
    its ratio to the dense layer at ``dtype`` (the first format), all timed interleaved in one run, written to
    ``out`` (None: returned only). What does not run on this device is logged and, with the reason, appended
    to ``left_out``."""
    left_out = [] if left_out is None else left_out

    def leave_out(what: str, e: Exception) -> None:
        left_out.append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
        log.warning("bench-quantized: %s left out", left_out[-1])

    device = torch.device(device)
    if quick:
        d_in, d_out, tokens = 256, 512, 32
    torch.manual_seed(0)
    dense = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
    layers, errors, rows = {}, {}, []
    gen = torch.Generator().manual_seed(1)
    for name, make in _formats(device, dtype).items():
        lin = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
        lin.load_state_dict(dense.state_dict())
        try:
            base = make(lin)
            layers[name] = LSRLinear.from_linear(base, LSRConfig(**CONFIG, init="reference"))
            with torch.no_grad():  # an update as large as the base's output, so a wrong adapter cannot hide
                for p in (layers[name].A1, layers[name].A2, layers[name].B1, layers[name].B2):
                    p.copy_(torch.randn(p.shape, generator=gen).mul_(0.2))
            errors[name] = adapter_error(layers[name], torch.randn(8, d_in, device=device, dtype=layers[name].A1.dtype))
        except Exception as e:  # noqa: BLE001  a library that does not run here is reported, not fatal
            layers.pop(name, None)
            leave_out(name, e)
    x0 = torch.randn(tokens, d_in, device=device)
    calls = {}
    for name, layer in layers.items():
        x = x0.to(layer.A1.dtype).requires_grad_(True)
        calls[f"{name}|forward"] = (lambda layer=layer, x=x: layer(x.detach()))
        calls[f"{name}|forward+backward"] = (lambda layer=layer, x=x: layer(x).sum().backward())
    for key, fn in list(calls.items()):  # a format whose backward does not run here keeps its forward row
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            calls.pop(key)
            leave_out(key.replace("|", " "), e)
    times = measure(calls, device, warmup=1, rounds=3 if quick else 7,
                    budget_s=budget_s if budget_s is not None else (10 if quick else 90))
    meta = bench.provenance(device)
    ref_name = next(iter(layers))
    for name, layer in layers.items():
        base_bytes = _tensor_bytes(layer.weight) + (_tensor_bytes(layer.bias) if layer.bias is not None else 0)
        adapter = sum(p.numel() * p.element_size() for p in (layer.A1, layer.A2, layer.B1, layer.B2))
        adam = 2 * sum(p.numel() * 4 for p in (layer.A1, layer.A2, layer.B1, layer.B2))  # computed: 2 fp32 moments
        for mode in ("forward", "forward+backward"):
            if f"{name}|{mode}" not in times or f"{ref_name}|{mode}" not in times:
                continue
            t = median(times[f"{name}|{mode}"])
            ref = median(times[f"{ref_name}|{mode}"])
            rows.append(meta | {"format": name, "base_format": base_format(layer.weight), "mode": mode,
                                "d_in": d_in, "d_out": d_out, "tokens": tokens,
                                "activations": dtype_name(layer.A1.dtype), "dense": ref_name,
                                "base_bytes": base_bytes, "adapter_bytes": adapter, "optimizer_bytes": adam,
                                "p50_ms": round(t, 3), "ratio_to_dense": round(t / ref, 3),
                                "adapter_rel_err": errors[name]})
    if out is not None:
        bench.write_rows(out, rows)
    return rows


def table(rows: list[dict]) -> str:
    """One table per (tokens, dense base): memory per format and time against the dense layer."""
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    parts = []
    group_of = lambda r: (r["tokens"], r.get("dense", "fp32"))  # noqa: E731
    for group in dict.fromkeys(map(group_of, rows)):
        rs = [r for r in rows if group_of(r) == group]
        ref = group[1]
        d = rs[0]
        head = [f"{d['d_in']} -> {d['d_out']}, {group[0]} tokens, against the {ref} base:", "",
                f"| base format | base | adapter | AdamW state (computed) | total | vs {ref} | forward / {ref} layer | "
                f"fwd+bwd / {ref} layer |", "|---|---|---|---|---|---|---|---|"]
        dense = next(r for r in rs if r["format"] == ref)
        total_ref = dense["base_bytes"] + dense["adapter_bytes"] + dense["optimizer_bytes"]
        lines = []
        for name in dict.fromkeys(r["format"] for r in rs):
            by = {r["mode"]: r for r in rs if r["format"] == name}
            r = next(iter(by.values()))
            total = r["base_bytes"] + r["adapter_bytes"] + r["optimizer_bytes"]
            ratio = lambda m: f"{by[m].get('ratio_to_dense', by[m].get('ratio_to_fp32')):.2f}" if m in by else "-"  # noqa: E731
            lines.append(f"| {name} | {mb(r['base_bytes'])} | {mb(r['adapter_bytes'])} | "
                         f"{mb(r['optimizer_bytes'])} | {mb(total)} | {total / total_ref:.2f}x | {ratio('forward')} | "
                         f"{ratio('forward+backward')} |")
        parts.append("\n".join(head + lines))
    return "\n\n".join(parts)


def default_out(folder: Optional[Path] = None, device: torch.device | str = "cpu") -> Path:
    return Path(folder or "results") / f"bench-quantized-{target_of(device)}-{device_id(device)}.jsonl"
