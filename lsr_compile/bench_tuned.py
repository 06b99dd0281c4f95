"""Tuning never slows what runs: a decoder LLM's greedy decoding, prefill and training step before and after
``lc.tune(model)``, side by side with peft LoRA r = 8 and the base model, in one interleaved run.

The README's order: wrap the model, ``lc.tune(model)``, then decode. "Untuned" is dispatch as the user had it
before tuning (its default log directories), "tuned" the same model with the records ``tune`` just wrote
loaded; the two states alternate within every round, on the same model and the same adapter values (a switch
rebuilds the layers' runners once, before the timed calls). Adapters are drawn non-zero. Times are the
process's CPU time on one thread by default (``bench_decode``'s reasons).

    python -m lsr_compile.cli bench-tuned [--quick] [--threads 1] [--budget 60]   # rows to results/
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from . import bench, dispatch, workloads
from .bench_decode import LORA_RANK, nonzero
from .config import LSRConfig
from .device import device_id
from .tuning import tune
from .tuning.search import MODEL_TOKENS

TASKS = ("decode", "prefill", "train step")
PROVIDERS = ("base model", "peft LoRA r=8", "LSR untuned", "LSR tuned")


def model_tasks(model, prompt: torch.Tensor, new_tokens: int, prefills: dict, train_ids=None) -> dict:
    """A no-argument call per task: greedy decoding of ``new_tokens`` after ``prompt`` (KV cache), one forward
    over each of ``prefills`` (name -> input ids: the time to the first token), and, given ``train_ids``, a
    training step (forward, backward, AdamW)."""
    @torch.no_grad()
    def decode():
        model.eval()
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def prefill(ids):
        @torch.no_grad()
        def run():
            model.eval()
            return model(input_ids=ids).logits[:, -1]
        return run

    out = {"decode": decode} | {name: prefill(ids) for name, ids in prefills.items()}
    if train_ids is not None:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step():
            model.train()
            loss = model(input_ids=train_ids, labels=train_ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        out["train step"] = step
    return out


def _tasks(model, train: bool, decode_tokens: int, prefill: int, batch: int, seq: int):
    """``model_tasks`` for the tiny model: an 8-token prompt, ``prefill`` tokens in 512-token prompts (its 512
    positions), a ``batch`` x ``seq`` training step (none for the base model)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 1000, (1, 8), generator=g)
    long = torch.randint(3, 1000, (prefill // 512, 512), generator=g)
    ids = torch.randint(3, 1000, (batch, seq), generator=g)
    return model_tasks(model, prompt, decode_tokens, {"prefill": long}, ids if train else None)


def run(out: Optional[Path], quick: bool = False, threads: int = 1, budget_s: Optional[float] = None,
        rounds: Optional[int] = None) -> list[dict]:
    """Rows (with provenance, the tuning records' choices and how long tuning took); written to ``out``
    unless it is None."""
    from peft import LoraConfig, get_peft_model

    hidden, layers = (256, 2) if quick else (512, 4)
    budget_s = budget_s if budget_s is not None else (20.0 if quick else 60.0)
    rounds = rounds or (3 if quick else 11)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = workloads.tiny_decoder("llama", hidden=hidden, layers=layers)
        lora = nonzero(get_peft_model(copy.deepcopy(base), LoraConfig(r=LORA_RANK, target_modules="all-linear")))
        lsr = nonzero(get_peft_model(copy.deepcopy(base), LSRConfig(target_modules="all-linear")))
        dispatch.reset()
        log_dir = Path(tempfile.mkdtemp(prefix="lsr-bench-tuned-"))
        t0 = time.perf_counter()
        records = tune(lsr, log_dir=log_dir, time_budget_s=budget_s, progress=False)
        tune_s = time.perf_counter() - t0
        states = {"LSR untuned": dispatch.reset, "LSR tuned": lambda: dispatch.load_logs(log_dir)}
        # the token counts tune(model) tunes by default (MODEL_TOKENS): a decode step, and 2048 rows for the prefill
        # (4 prompts of 512) and the training step (8 x 256); a record serves its own token bucket only
        sizes = dict(decode_tokens=8 if quick else 16, prefill=MODEL_TOKENS[1], batch=8, seq=MODEL_TOKENS[1] // 8)
        calls = {"base model": _tasks(base, False, **sizes), "peft LoRA r=8": _tasks(lora, True, **sizes)}
        lsr_calls = _tasks(lsr, True, **sizes)
        rows = []
        for task in TASKS:
            timed = {k: (_nothing, v[task]) for k, v in calls.items() if task in v}
            timed |= {name: (enter, lsr_calls[task]) for name, enter in states.items()}
            times = _interleaved_in_states(timed, rounds)
            for name, t in times.items():
                rows.append({"kind": "tuned", "task": task, "provider": name, "p50_ms": round(statistics.median(t), 3),
                             "vs_lora": round(statistics.median(a / b for a, b in zip(t, times["peft LoRA r=8"])), 4),
                             "rounds": rounds, "model": f"llama {layers}x{hidden}", "targets": "all-linear"})
            tuned = [r for r in rows if r["task"] == task and r["provider"] == "LSR tuned"][0]
            tuned["vs_untuned"] = round(statistics.median(a / b for a, b in zip(times["LSR tuned"],
                                                                                 times["LSR untuned"])), 4)
        dispatch.reset()
        meta = bench.provenance("cpu") | {"tune_s": round(tune_s, 1), "tune_budget_s": budget_s,
                                          "records": [f"{r['key']['op']} N={r['tokens']} {r['backend']}:"
                                                      f"{r['variant']}" for r in records]}
    finally:
        torch.set_num_threads(old)
    rows = [r | meta for r in rows]
    if out is not None:
        bench.write_rows(out, rows)
    return rows


def _nothing():
    pass


def _interleaved_in_states(calls: dict, rounds: int) -> dict[str, list[float]]:
    """ms of CPU time per call of each ``(enter, fn)``: every round, for each in turn, ``enter()`` (a dispatch
    state; switching drops the layers' runners), one untimed call (rebuilds them: every provider gets one), then
    one timed call."""
    out: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(rounds):
        for name, (enter, fn) in calls.items():
            enter()
            fn()
            t0 = time.process_time()
            fn()
            out[name].append((time.process_time() - t0) * 1e3)
    return out


def default_out(folder: Path) -> Path:
    return folder / f"bench-tuned-{device_id('cpu')}.jsonl"


def table(rows: list[dict]) -> str:
    """Per task: ms per call of each provider, LSR / LoRA untuned and tuned, and tuned / untuned."""
    lines = ["| task | base ms | peft LoRA r=8 ms | LSR untuned ms | LSR tuned ms | untuned / LoRA | tuned / LoRA "
             "| **tuned / untuned** |", "|---|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        p = {r["provider"]: r for r in rows if r["task"] == task}
        base = f"{p['base model']['p50_ms']:.2f}" if "base model" in p else "–"
        lines.append(f"| {task} | {base} | {p['peft LoRA r=8']['p50_ms']:.2f} | {p['LSR untuned']['p50_ms']:.2f} | "
                     f"{p['LSR tuned']['p50_ms']:.2f} | {p['LSR untuned']['vs_lora']:.2f} | "
                     f"{p['LSR tuned']['vs_lora']:.2f} | **{p['LSR tuned']['vs_untuned']:.2f}** |")
    return "\n".join(lines)
