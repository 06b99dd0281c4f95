"""Accuracy per parameter on a real decoder: SmolLM2-135M-Instruct on TREC questions, LoRA r = 1, 2, 4, 8 against
LSR at the same parameter counts, several seeds, each method at its own learning rate.

The setting is ``finetune_smollm2.py``'s (chat-formatted questions, the loss on the answer, ``transformers.Trainer``
with its defaults) made cheaper so that several seeds of every method fit a CPU session: every projection of the
top 4 of the 30 layers, 100 steps of 8, 500 held-out questions (a fixed draw) scored per run. LoRA's alpha equals
its rank (scale 1, as the example's). LSR's structure at each budget is the one ``lc.gradient_fit`` recommends
on the first training batches (``--fit`` prints its table), chosen before any accuracy was measured.

Rates: LSR at the recommended structures picks its own from ``RATE_GRID`` by accuracy on 300 validation
questions carved from the train split (seed 0; the held-out questions never choose): the first of them at 3e-2
lost 12 points to its 1e-2 neighbour's family, so no one rate fits every s. LoRA (every rank) runs at 1e-2 and
``lsr_config_for_lora(8)`` at 3e-2, the rates chosen on validation for LoRA r=8 and that config in
``finetune_smollm2.py`` (8 layers, 200 steps); ``--select`` picks every method's own instead. Rows are appended
to ``results/finetune/frontier-smollm2-trec.jsonl`` as runs finish; a rerun skips what is there.

    python examples/frontier_smollm2.py               # the seeds of every method (resumable)
    python examples/frontier_smollm2.py --report      # table + plot from the rows so far
    python examples/frontier_smollm2.py --fit         # the diagnostic's table on this model and task
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import lsr_compile as lc  # noqa: E402
from lsr_compile import pretrained  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from finetune_smollm2 import PROJECTIONS, Collator, Task, accuracy, data  # noqa: E402

OUT = Path("results/finetune/frontier-smollm2-trec.jsonl")
LAYERS, STEPS, TRAIN, VALIDATION, HELD_OUT = 4, 100, 1600, 300, 500
FAMILY_RATE = {"LoRA": 1e-2, "LSR": 3e-2}
RATE_GRID = (1e-2, 3e-2)
# LSR structures per budget (x LoRA-8's parameters), as gradient_fit recommended them (--fit reprints the table)
LSR_AT = {0.125: (9, (1, 2)), 0.25: (19, (1, 2))}
SETUP = dict(layers=LAYERS, steps=STEPS, train=TRAIN, validation=VALIDATION, held_out=HELD_OUT, task="trec")


def methods(base) -> dict:
    from peft import LoraConfig

    n = base.config.num_hidden_layers
    layers = list(range(n - LAYERS, n))
    lora = {r: LoraConfig(r=r, lora_alpha=r, target_modules=PROJECTIONS, layers_to_transform=layers)
            for r in (1, 2, 4, 8)}
    out = {f"LSR s={s} r={r} ({budget:g}x)": lc.LSRConfig(s=s, r=r, target_modules=PROJECTIONS,
                                                          layers_to_transform=layers)
           for budget, (s, r) in LSR_AT.items()}
    out |= {f"LoRA r={r}": lora[r] for r in (1, 2, 8)}
    out["LSR s=4 r=(4, 2) lsr_config_for_lora(8)"] = lc.lsr_config_for_lora(8, target_modules=PROJECTIONS,
                                                                           layers_to_transform=layers)
    out["LoRA r=4"] = lora[4]  # in the order a short session should finish them
    return out


def selects_own_rate(name: str) -> bool:
    return name.startswith("LSR") and name.endswith("x)")  # the recommended structures, "(0.125x)"


def read_rows() -> list[dict]:
    if not OUT.exists():
        return []
    return [r for r in map(json.loads, OUT.read_text().splitlines()) if r.get("setup") == SETUP]


def run(base, tok, task, name, config, lr, seed, split) -> dict:
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    args = argparse.Namespace(seed=seed, validation=split == "validation", train=TRAIN,
                              eval=VALIDATION if split == "validation" else HELD_OUT)
    train_rows, scored = data(task, args)
    t = time.perf_counter()
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    targs = TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "lsr-frontier"), max_steps=STEPS,
                              learning_rate=lr, seed=seed, save_strategy="no", report_to=[], disable_tqdm=True,
                              logging_steps=STEPS)
    trainer = Trainer(model=model, args=targs, train_dataset=[task.example(r) for r in train_rows],
                      data_collator=Collator(tok.pad_token_id))
    loss = trainer.train().training_loss
    acc = accuracy(model, task, scored)
    return {"setup": SETUP, "method": name, "lr": lr, "seed": seed, "split": split, "accuracy": acc,
            "params": params, "bytes": 4 * params, "train_loss": loss, "wall_s": round(time.perf_counter() - t, 1)}


def chosen_rate(rows, name, select: bool):
    if not (select or selects_own_rate(name)):
        return FAMILY_RATE[name.split()[0]]
    val = {r["lr"]: r["accuracy"] for r in rows if r["method"] == name and r["split"] == "validation"}
    return max(sorted(val), key=lambda lr: val[lr]) if len(val) == len(RATE_GRID) else None


def fit_table(base, tok, task) -> str:
    n = base.config.num_hidden_layers
    top = tuple(str(i) for i in range(n - LAYERS, n))
    train_rows, _ = data(task, argparse.Namespace(seed=0, validation=True, train=TRAIN, eval=VALIDATION))
    collate = Collator(tok.pad_token_id)
    batches = [collate([task.example(r) for r in train_rows[i:i + 8]]) for i in range(0, 32, 8)]
    pattern = rf"model\.layers\.({'|'.join(top)})\..*\.({'|'.join(PROJECTIONS)})"
    t = time.perf_counter()
    fit = lc.gradient_fit(base, batches, target_modules=pattern)
    return f"{fit.table()}\n\n({time.perf_counter() - t:.0f} s, 4 batches of 8 training questions)"


def report(rows) -> str:
    """Per method: its rate, held-out accuracy mean ± std over seeds and the paired difference with LoRA of the
    nearest size at or above it (same seeds: the same questions and order)."""
    tested = [r for r in rows if r["split"] == "test" and r["lr"] == chosen_rate(rows, r["method"], False)]
    by = {}
    for r in tested:
        by.setdefault(r["method"], {})[r["seed"]] = r
    lines = ["| method | trainable params (x LoRA-8) | lr | seeds | held-out acc. mean ± std | Δ vs LoRA of >= size, "
             "points (per seed) | time / run |", "|---|---|---|---|---|---|---|"]
    loras = {m: v for m, v in by.items() if m.startswith("LoRA")}
    lora8 = next(iter(loras.get("LoRA r=8", {}).values()), None)
    for m, seeds in sorted(by.items(), key=lambda kv: next(iter(kv[1].values()))["params"]):
        one = next(iter(seeds.values()))
        accs = [100 * r["accuracy"] for r in seeds.values()]
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        delta = "-"
        if not m.startswith("LoRA"):
            above = [(next(iter(v.values()))["params"], k) for k, v in loras.items()
                     if next(iter(v.values()))["params"] >= one["params"] * 0.95]
            if above:
                ref = loras[min(above)[1]]
                diffs = [100 * (seeds[s]["accuracy"] - ref[s]["accuracy"]) for s in sorted(seeds) if s in ref]
                if diffs:
                    delta = (f"{statistics.mean(diffs):+.2f} vs {min(above)[1]} ("
                             + ", ".join(f"{d:+.1f}" for d in diffs) + ")")
        rel = f" ({one['params'] / lora8['params']:.3f}x)" if lora8 else ""
        lines.append(f"| {m} | {one['params']:,}{rel} | {one['lr']:g} | {len(accs)} | {statistics.mean(accs):.2f} ± "
                     f"{sd:.2f} | {delta} | {statistics.mean(r['wall_s'] for r in seeds.values()):.0f} s |")
    for m in dict.fromkeys(r["method"] for r in rows if r["split"] == "validation"):
        val = {r["lr"]: r["accuracy"] for r in rows if r["method"] == m and r["split"] == "validation"}
        lines.append(f"\n{m}: validation accuracy " + ", ".join(f"{100 * a:.1f}% at {lr:g}" for lr, a in sorted(val.items())))
    wall = sum(r["wall_s"] for r in rows)
    lines.append(f"\n{len(rows)} runs, {wall / 60:.0f} min of CPU wall time in all (2 cores).")
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tested = [r for r in rows if r["split"] == "test" and r["lr"] == chosen_rate(rows, r["method"], False)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for family, marker in (("LoRA", "o"), ("LSR", "s")):
        pts = {}
        for r in tested:
            if r["method"].startswith(family):
                pts.setdefault(r["method"], []).append(r)
        xs = sorted(pts, key=lambda m: pts[m][0]["params"])
        means = [statistics.mean(100 * r["accuracy"] for r in pts[m]) for m in xs]
        sds = [statistics.stdev([100 * r["accuracy"] for r in pts[m]]) if len(pts[m]) > 1 else 0 for m in xs]
        ax.errorbar([pts[m][0]["params"] for m in xs], means, yerr=sds, marker=marker, capsize=3, label=family)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (float32: 4 bytes each at rest)")
    ax.set_ylabel("held-out accuracy, % (mean ± std over seeds)")
    ax.set_title("SmolLM2-135M, TREC questions: accuracy per parameter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="", help="only the methods whose names start with this")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--select", action="store_true", help="each method's rate from RATE_GRID on validation first")
    args = ap.parse_args(argv)
    if args.report:
        rows = read_rows()
        text = report(rows)
        OUT.with_suffix(".md").write_text(text + "\n")
        plot(rows, OUT.with_suffix(".png"))
        print(text)
        return
    pretrained.prepare()
    base, tok = pretrained.load()
    task = Task("trec", tok)
    if args.fit:
        print(fit_table(base, tok, task))
        return
    todo = {k: v for k, v in methods(base).items() if k.startswith(args.methods)}
    OUT.parent.mkdir(parents=True, exist_ok=True)

    def record(row):
        with OUT.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{row['method']:<40} lr {row['lr']:<6g} seed {row['seed']} {row['split']:<10} "
              f"{row['accuracy']:.1%} ({row['wall_s']:.0f} s)", flush=True)

    for name, config in todo.items():  # selection first, so that a partial run ranks every method
        if not (args.select or selects_own_rate(name)):
            continue
        done = {r["lr"] for r in read_rows() if r["method"] == name and r["split"] == "validation"}
        for lr in RATE_GRID:
            if lr not in done:
                record(run(base, tok, task, name, config, lr, 0, "validation"))
    for seed in range(args.seeds):
        for name, config in todo.items():
            rows = read_rows()
            lr = chosen_rate(rows, name, args.select)
            if any(r["method"] == name and r["seed"] == seed and r["split"] == "test" and r["lr"] == lr for r in rows):
                continue
            record(run(base, tok, task, name, config, lr, seed, "test"))


if __name__ == "__main__":
    main()
