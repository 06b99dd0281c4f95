"""Decoding benchmark: LSR unmerged against peft LoRA r = 8 where serving is host-bound, side by side.

Two tables, each measured in one interleaved run (ratios, not absolute times, carry across runs):

- **one layer at one token**, ``no_grad``, eager: the frozen ``nn.Linear``, peft LoRA r = 8, LSR through peft
  (``LSRConfig()``'s defaults) and ``LSRLinear``, at the decode shapes of ``workloads.DECODE_LAYERS``;
- **whole-model greedy decoding** (``generate`` with a KV cache, unmerged adapters) of the tiny random-weight
  decoders of ``workloads.tiny_decoder`` (Llama, Qwen2, Mistral, Phi3, GPT-2), fp32 and bf16, batch 1 and 8:
  the base model, peft LoRA r = 8 and LSR, each on peft's default target modules for the architecture.

Adapters are drawn non-zero (never timed on zeros). One thread by default: decoding one sequence is host-bound
on every device. Times are the process's CPU time (``time.process_time``), which on one thread is the call's
whole cost and leaves out the time this busy 2-core machine gives other processes (with wall time the same
ratios moved by ±15 % between runs while other jobs ran; with CPU time by about ±1 %).

    python -m lsr_compile.cli bench-decode [--quick] [--threads 1]   # rows to results/bench-decode-<device>.jsonl

**The first minute** (``first_minute``, ``lsr-compile bench-decode --first-minute``): in fresh processes, LSR
and peft LoRA r = 8 alternately on the tiny Llama: the import (``lsr_compile``; LoRA's: ``peft``), the first
eager training step (its kernels chosen, built, cached), the second, and the first ``torch.compile``d training
step with Inductor's caches off (a cold compile: its graphs traced, decomposed and compiled).
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from . import bench, workloads
from .config import LSRConfig
from .device import device_id
from .nn import LSRLinear
from .problem import dtype_name

LORA_RANK = 8


def _interleaved(calls: dict[str, Callable[[], object]], rounds: int, reps: int,
                 clock: Callable[[], float] = time.process_time) -> dict[str, list[float]]:
    """µs per call of each candidate (``clock``: the process's CPU time), one entry per round; candidates
    alternate within every round."""
    for fn in calls.values():
        for _ in range(max(reps // 4, 2)):
            fn()
    out: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = clock()
            for _ in range(reps):
                fn()
            out[name].append((clock() - t0) / reps * 1e6)
    return out


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a's time over b's in the same round (robust to drift across rounds)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@torch.no_grad()
def nonzero(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every adapter factor of ``model`` (peft LoRA's B, LSR's B2) drawn non-zero, so the adapter's share of
    each output is real; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if any(k in name for k in ("lora_B", "lsr_B2")) or name.endswith(("B2",)):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def layer_providers(d_out: int, d_in: int, dtype=torch.float32) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    lora = get_peft_model(_Holder(copy.deepcopy(base)), LoraConfig(r=LORA_RANK, target_modules=["proj"]))
    lsr = get_peft_model(_Holder(copy.deepcopy(base)), LSRConfig(target_modules=["proj"]))
    layer = LSRLinear.from_linear(copy.deepcopy(base), LSRConfig())
    return {"frozen Linear": base, "peft LoRA r=8": nonzero(lora).base_model.model.proj,
            "LSR (peft)": nonzero(lsr).base_model.model.proj, "LSRLinear": nonzero(layer)}


def bench_layers(shapes=workloads.DECODE_LAYERS, tokens: int = 1, rounds: int = 15, reps: int = 400,
                 dtype=torch.float32) -> list[dict]:
    rows = []
    for d_out, d_in in shapes:
        mods = layer_providers(d_out, d_in, dtype)
        x = torch.randn(1, tokens, d_in, dtype=dtype)
        with torch.no_grad():
            times = _interleaved({k: (lambda m=m: m(x)) for k, m in mods.items()}, rounds, reps)
        for name, t in times.items():
            rows.append({"kind": "layer", "shape": f"{d_out}x{d_in}", "d_out": d_out, "d_in": d_in, "tokens": tokens,
                         "dtype": dtype_name(dtype), "provider": name, "p50_us": round(statistics.median(t), 2),
                         "vs_lora": round(_ratio(times, name, "peft LoRA r=8"), 4), "rounds": rounds})
    return rows


def decode_providers(family: str, dtype=torch.float32) -> dict[str, nn.Module]:
    from peft import LoraConfig, get_peft_model

    base = workloads.tiny_decoder(family, dtype=dtype)
    targets = workloads.DECODER_TARGETS.get(family)
    lora = nonzero(get_peft_model(copy.deepcopy(base), LoraConfig(r=LORA_RANK, target_modules=targets)))
    lsr = nonzero(get_peft_model(copy.deepcopy(base), LSRConfig(target_modules=targets)))
    return {"base model": base, "peft LoRA r=8": lora.eval(), "LSR (peft)": lsr.eval()}


def bench_decoders(families: Iterable[str] = workloads.DECODERS, dtypes=(torch.float32, torch.bfloat16),
                   batches=(1, 8), prompt: int = 8, new_tokens: int = 32, rounds: int = 7) -> list[dict]:
    rows = []
    for family in families:
        for dtype in dtypes:
            mods = decode_providers(family, dtype)
            for batch in batches:
                ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(batch))
                mask = torch.ones_like(ids)

                def gen(m):
                    return m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                with torch.no_grad():
                    outs = {k: gen(m) for k, m in mods.items()}
                    times = _interleaved({k: (lambda m=m: gen(m)) for k, m in mods.items()}, rounds, 1)
                for name, t in times.items():
                    rows.append({"kind": "model", "model": family, "dtype": dtype_name(dtype), "batch": batch,
                                 "prompt": prompt, "new_tokens": new_tokens, "provider": name,
                                 "p50_ms": round(statistics.median(t) / 1e3, 3),
                                 "vs_lora": round(_ratio(times, name, "peft LoRA r=8"), 4), "rounds": rounds,
                                 "generated": int(outs[name].shape[1] - prompt)})
    return rows


def run(out: Optional[Path], quick: bool = False, threads: int = 1) -> list[dict]:
    """Both tables' rows (with provenance); written to ``out`` unless it is None."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = bench_layers(rounds=9 if quick else 15)
        rows += bench_decoders(families=("llama", "gpt2") if quick else workloads.DECODERS,
                               rounds=3 if quick else 11)
        meta = bench.provenance("cpu")
    finally:
        torch.set_num_threads(old)
    rows = [r | meta for r in rows]
    if out is not None:
        bench.write_rows(out, rows)
    return rows


def default_out(folder: Path) -> Path:
    return folder / f"bench-decode-{device_id('cpu')}.jsonl"


def table(rows: list[dict]) -> str:
    """The layer table (µs per call and LSR / LoRA) and the whole-model table (LSR / LoRA per model, dtype and
    batch; the base model's time beside)."""
    lines = ["| layer (d_out x d_in), 1 token | frozen Linear µs | peft LoRA r=8 µs | LSR (peft) µs | LSRLinear µs "
             "| LSR (peft) / LoRA | LSRLinear / LoRA |", "|---|---|---|---|---|---|---|"]
    for shape in dict.fromkeys(r["shape"] for r in rows if r["kind"] == "layer"):
        p = {r["provider"]: r for r in rows if r["kind"] == "layer" and r["shape"] == shape}
        lines.append(f"| {shape} | {p['frozen Linear']['p50_us']:.1f} | {p['peft LoRA r=8']['p50_us']:.1f} | "
                     f"{p['LSR (peft)']['p50_us']:.1f} | {p['LSRLinear']['p50_us']:.1f} | "
                     f"**{p['LSR (peft)']['vs_lora']:.2f}** | {p['LSRLinear']['vs_lora']:.2f} |")
    lines += ["", "| model, greedy decode | dtype | batch | base ms | peft LoRA r=8 ms | LSR ms | LSR / LoRA |",
              "|---|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["model"], r["dtype"], r["batch"]) for r in rows if r["kind"] == "model")
    for model, dt, batch in keys:
        p = {r["provider"]: r for r in rows
             if r["kind"] == "model" and (r["model"], r["dtype"], r["batch"]) == (model, dt, batch)}
        lines.append(f"| {model} | {dt} | {batch} | {p['base model']['p50_ms']:.1f} | "
                     f"{p['peft LoRA r=8']['p50_ms']:.1f} | {p['LSR (peft)']['p50_ms']:.1f} | "
                     f"**{p['LSR (peft)']['vs_lora']:.2f}** |")
    return "\n".join(lines)


# ---- the first minute: fresh processes -------------------------------------------------------------------------

# what each side's user imports: LoRA's peft, LSR's lsr_compile (which imports peft)
_PROBE = ("import time; t = time.perf_counter(); import {module}; s = time.perf_counter() - t; "
          "from lsr_compile import bench_decode; bench_decode._probe({method!r}, {compiled}, s)")


def _probe(method: str, compiled: bool, import_s: float) -> None:
    """One fresh process's first minute, printed as JSON (``first_minute`` runs it with ``_PROBE``)."""
    out = {"import_s": import_s}
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    model = workloads.tiny_decoder("llama")
    pm = get_peft_model(model, LoraConfig(r=LORA_RANK) if method == "lora" else LSRConfig()).train()
    ids = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    run = torch.compile(pm) if compiled else pm
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = run(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in ("first_step_s", "second_step_s"):
        t = time.perf_counter()
        step()
        out[name] = time.perf_counter() - t
    print(json.dumps(out))


def first_minute(repeats: int = 3) -> list[dict]:
    """Rows: per repeat, LSR and LoRA alternately, eager and compiled, each in a fresh process."""
    rows = []
    for rep in range(repeats):
        for compiled in (False, True):
            for method in ("lsr", "lora"):
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(), TORCHINDUCTOR_FX_GRAPH_CACHE="0",
                           TORCHINDUCTOR_AUTOGRAD_CACHE="0")
                code = _PROBE.format(module="lsr_compile" if method == "lsr" else "peft", method=method,
                                     compiled=compiled)
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append({"kind": "first minute", "method": method, "compiled": compiled, "repeat": rep} | row)
    return rows


def first_minute_table(rows: list[dict]) -> str:
    """Medians over repeats: LSR, LoRA, and LSR - LoRA (eager step) or LSR / LoRA (cold compile)."""
    def med(method, compiled, key):
        return statistics.median(r[key] for r in rows if r["method"] == method and r["compiled"] == compiled)
    lines = ["| fresh process, tiny Llama, 1 thread | LSR s | peft LoRA r=8 s | LSR vs LoRA |", "|---|---|---|---|"]
    for label, compiled, key, diff in (("import", False, "import_s", True),
                                       ("first eager training step", False, "first_step_s", True),
                                       ("second eager training step", False, "second_step_s", True),
                                       ("first compiled training step (cold caches)", True, "first_step_s", False)):
        a, b = med("lsr", compiled, key), med("lora", compiled, key)
        cmp = f"{a - b:+.2f} s" if diff else f"{a / b:.2f}x"
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | **{cmp}** |")
    return "\n".join(lines)
