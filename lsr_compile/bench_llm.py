"""A real pretrained LLM's speed: SmolLM2-135M-Instruct (``pretrained.load()``; weights dequantized from 4 bits)
with LSR (``lsr_config_for_lora(8)``, the rank of LoRA r = 8), peft LoRA r = 8 and the frozen base, on the same
target modules, side by side in one interleaved run per cell.

Cells: targets (``all-linear``; ``q_proj, v_proj``) x dtype (float32; bfloat16 with peft's float32 adapters) x
batch (1, 8) x threads (1; all cores). Per cell: greedy decoding (KV cache, a 32-token prompt, 32 new tokens:
new tokens per second), prefill (one forward over a 128- and a 512-token prompt at batch 1: time to the first
token) and a training step (forward, backward, AdamW; ``batch`` x 64 tokens: tokens per second). Apart: the
peak resident memory of a fresh process that loads the model, wraps it and runs a training step at batch 8, and
the adapter's file size (``save_pretrained``). Adapters are drawn non-zero. Times are wall-clock medians (the
all-cores cells use both cores, so CPU time would count them twice); ratios are medians of per-round ratios.

    python -m lsr_compile.cli bench-llm [--quick]        # rows to results/bench-llm-<device>.jsonl
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
from typing import Callable, Optional

import torch

from . import bench
from .bench_decode import LORA_RANK, nonzero
from .bench_tuned import model_tasks
from .device import device_id
from .problem import dtype_name

TARGETS = {"all-linear": "all-linear", "q,v": ["q_proj", "v_proj"]}
PROVIDERS = ("base model", "peft LoRA r=8", "LSR")
PROMPT, NEW_TOKENS, PREFILLS, TRAIN_SEQ = 32, 32, (128, 512), 64


def providers(base, targets) -> dict:
    """The base model, peft LoRA r = 8 and LSR of the same rank on ``targets``, adapters non-zero."""
    from peft import LoraConfig, get_peft_model

    from .nn import lsr_config_for_lora

    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=LORA_RANK, target_modules=targets))
    lsr = get_peft_model(copy.deepcopy(base), lsr_config_for_lora(LORA_RANK, target_modules=targets))
    return {"base model": base, "peft LoRA r=8": nonzero(lora), "LSR": nonzero(lsr)}


def _tasks(model, batch: int, train: bool) -> dict[str, Callable[[], object]]:
    """``bench_tuned.model_tasks``: a ``batch`` x 32-token prompt, 128- and 512-token prefills at batch 1, a
    ``batch`` x 64 training step."""
    g = torch.Generator().manual_seed(batch)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (batch, PROMPT), generator=g)
    prefills = {f"prefill {n}": torch.randint(3, vocab, (1, n), generator=g) for n in PREFILLS}
    ids = torch.randint(3, vocab, (batch, TRAIN_SEQ), generator=g)
    return model_tasks(model, prompt, NEW_TOKENS, prefills, ids if train else None)


def _interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall seconds per call, candidates alternating within each round, after one warm-up call each."""
    for fn in calls.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t0)
    return out


def _per_task_tokens(task: str, batch: int) -> int:
    if task == "decode":
        return batch * NEW_TOKENS
    if task == "train step":
        return batch * TRAIN_SEQ
    return 1  # prefill: seconds to the first token


def cell_rows(models: dict, target: str, dtype, batch: int, threads: int, rounds: int) -> list[dict]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tasks = {name: _tasks(m, batch, name != "base model") for name, m in models.items()}
        rows = []
        for task in tasks["LSR"]:
            if task.startswith("prefill") and batch != 1:
                continue
            times = _interleaved({name: t[task] for name, t in tasks.items() if task in t}, rounds)
            n = _per_task_tokens(task, batch)
            for name, t in times.items():
                rows.append({"kind": "llm", "model": "SmolLM2-135M-Instruct (dequantized Q4_1)", "targets": target,
                             "dtype": dtype_name(dtype), "batch": batch, "threads": threads, "task": task,
                             "provider": name, "p50_s": round(statistics.median(t), 5),
                             "tokens_per_s": round(n / statistics.median(t), 2) if n > 1 else None,
                             "vs_lora": round(statistics.median(a / b for a, b in zip(t, times["peft LoRA r=8"])), 4),
                             "rounds": rounds})
        return rows
    finally:
        torch.set_num_threads(old)


# ---- memory and size: fresh processes, one per provider -------------------------------------------------------

_PROBE = ("import json, sys, torch; from lsr_compile import bench_llm, pretrained; "
          "bench_llm._memory_probe({provider!r}, {target!r}, {dtype!r})")


def _resident_mb() -> tuple[float, float]:
    """(now, peak since the last reset) of this process's resident set, from /proc (Linux). ``ru_maxrss`` will
    not do: Linux carries it over fork and exec, so a child reports its parent's peak."""
    status = Path("/proc/self/status").read_text()
    field = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines() if ln.startswith(("VmRSS", "VmHWM"))}
    return field["VmRSS"] / 1024, field["VmHWM"] / 1024


def _memory_probe(provider: str, target: str, dtype: str) -> None:
    import gc

    from . import pretrained

    torch.set_num_threads(1)
    base, _ = pretrained.load(dtype=getattr(torch, dtype))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the loaded model
    loaded, _ = _resident_mb()
    model = providers(base, TARGETS[target])[provider] if provider != "base model" else base
    if provider != "base model":
        _tasks(model, 8, True)["train step"]()
    else:
        with torch.no_grad():
            _tasks(model, 8, False)["prefill 512"]()
    _, peak = _resident_mb()
    print(json.dumps({"loaded_mb": loaded, "peak_mb": peak}))


def memory_rows(targets, dtypes) -> list[dict]:
    """Peak resident memory of a fresh process (Linux): the model loaded, then wrapped and one training step at
    batch 8 x 64 (the base model: a 512-token prefill), the peak counted from the loaded model on."""
    rows = []
    for target in targets:
        for dtype in dtypes:
            for provider in PROVIDERS:
                code = _PROBE.format(provider=provider, target=target, dtype=dtype_name(dtype))
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1"))
                probe = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append({"kind": "memory", "targets": target, "dtype": dtype_name(dtype), "provider": provider,
                             "loaded_mb": round(probe["loaded_mb"], 1), "peak_mb": round(probe["peak_mb"], 1)})
    return rows


def size_rows(base) -> list[dict]:
    """Bytes of ``adapter_model.safetensors`` as ``save_pretrained`` writes it, LSR and LoRA, per target set."""
    rows = []
    for target, modules in TARGETS.items():
        models = providers(base, modules)
        for name in PROVIDERS[1:]:
            with tempfile.TemporaryDirectory() as d:
                models[name].save_pretrained(d)
                size = (Path(d) / "adapter_model.safetensors").stat().st_size
            trainable = sum(p.numel() for p in models[name].parameters() if p.requires_grad)
            rows.append({"kind": "size", "targets": target, "provider": name, "adapter_bytes": size,
                         "trainable": trainable})
    return rows


def run(out: Optional[Path], quick: bool = False, rounds: Optional[int] = None) -> list[dict]:
    """Every cell's rows, then memory and sizes (with provenance); written to ``out`` unless it is None."""
    from . import pretrained

    rounds = rounds or (2 if quick else 5)
    targets = ["q,v"] if quick else list(TARGETS)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    batches = (1,) if quick else (1, 8)
    threads = (1,) if quick else (1, os.cpu_count() or 1)
    rows = []
    for dtype in dtypes:
        base, _ = pretrained.load(dtype=dtype)
        for target in targets:
            models = providers(base, TARGETS[target])
            for batch in batches:
                for n in threads:
                    rows += cell_rows(models, target, dtype, batch, n, rounds)
            del models
        if dtype == torch.float32:
            rows += size_rows(base)
    if not quick:
        rows += memory_rows(targets, dtypes)
    meta = bench.provenance("cpu")
    rows = [meta | r for r in rows]  # a cell's own thread count stays
    if out is not None:
        bench.write_rows(out, rows)
    return rows


def default_out(folder: Path) -> Path:
    return folder / f"bench-llm-{device_id('cpu')}.jsonl"


def table(rows: list[dict]) -> str:
    """The speed table (LSR / LoRA per cell and task, with LSR's and LoRA's throughput), then memory and size."""
    speed = [r for r in rows if r["kind"] == "llm"]
    tasks = list(dict.fromkeys(r["task"] for r in speed))
    lines = ["| targets | dtype | batch | threads | " + " | ".join(f"{t}: LSR / LoRA" for t in tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    cells = dict.fromkeys((r["targets"], r["dtype"], r["batch"], r["threads"]) for r in speed)
    for cell in cells:
        p = {(r["task"], r["provider"]): r for r in speed if (r["targets"], r["dtype"], r["batch"], r["threads"]) == cell}
        vals = []
        for t in tasks:
            r = p.get((t, "LSR"))
            vals.append("–" if r is None else f"**{r['vs_lora']:.2f}**")
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} | {cell[3]} | " + " | ".join(vals) + " |")
    lines += ["", "| targets | dtype | batch | threads | task | base | peft LoRA r=8 | LSR |", "|---|---|---|---|---|---|---|---|"]
    for r in speed:
        if r["provider"] != "LSR":
            continue
        p = {x["provider"]: x for x in speed if (x["targets"], x["dtype"], x["batch"], x["threads"], x["task"]) ==
             (r["targets"], r["dtype"], r["batch"], r["threads"], r["task"])}
        unit = (lambda x: f"{x['tokens_per_s']:.1f} tok/s") if r["tokens_per_s"] else (lambda x: f"{x['p50_s'] * 1e3:.0f} ms")
        base = unit(p["base model"]) if "base model" in p else "–"
        lines.append(f"| {r['targets']} | {r['dtype']} | {r['batch']} | {r['threads']} | {r['task']} | {base} | "
                     f"{unit(p['peft LoRA r=8'])} | {unit(r)} |")
    mem = [r for r in rows if r["kind"] == "memory"]
    if mem:
        lines += ["", "| targets | dtype | peak RSS: base (prefill 512) | peft LoRA r=8 (train step) | LSR (train step) |",
                  "|---|---|---|---|---|"]
        for key in dict.fromkeys((r["targets"], r["dtype"]) for r in mem):
            p = {r["provider"]: r["peak_mb"] for r in mem if (r["targets"], r["dtype"]) == key}
            lines.append(f"| {key[0]} | {key[1]} | {p['base model']:.0f} MB | {p['peft LoRA r=8']:.0f} MB | "
                         f"{p['LSR']:.0f} MB |")
    size = [r for r in rows if r["kind"] == "size"]
    if size:
        lines += ["", "| targets | adapter file, peft LoRA r=8 | LSR | LSR / LoRA | trainable, LoRA | LSR |",
                  "|---|---|---|---|---|---|"]
        for target in dict.fromkeys(r["targets"] for r in size):
            p = {r["provider"]: r for r in size if r["targets"] == target}
            a, b = p["peft LoRA r=8"], p["LSR"]
            lines.append(f"| {target} | {a['adapter_bytes'] / 1e6:.2f} MB | {b['adapter_bytes'] / 1e6:.2f} MB | "
                         f"{b['adapter_bytes'] / a['adapter_bytes']:.2f} | {a['trainable']:,d} | {b['trainable']:,d} |")
    return "\n".join(lines)
