"""torch.compile of models with LSR layers: same outputs, no graph breaks, no recompile per shape."""
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lsr_compile as lc

from models import tiny_bert, tokens


def _lsr_bert():
    model = tiny_bert()
    lc.apply_lsr(model, lc.LSRConfig(s=2, r=2, init="reference"), target_modules=("query", "value", "dense"))
    return model


def test_no_graph_breaks():
    model = _lsr_bert()
    explanation = torch._dynamo.explain(model)(input_ids=tokens(2, 9))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # and the LSR op really is in the graph (an op silently traced through would not count as lsr)
    graph = explanation.graphs[0]
    assert sum("lsr.linear" in str(n.target) for n in graph.graph.nodes) == 2 * 2 + 3 * 2 + 1


def test_compiled_matches_eager_forward_and_backward_without_recompiles():
    torch._dynamo.reset()
    counters.clear()
    model = _lsr_bert().train()
    compiled = torch.compile(model, fullgraph=True)
    for batch, seq in [(2, 9), (3, 11), (5, 13), (4, 7), (6, 16)]:
        ids = tokens(batch, seq)
        out, ref = compiled(input_ids=ids).logits, model(input_ids=ids).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g_ref = torch.autograd.grad(ref.square().sum(), [p for p in model.parameters() if p.requires_grad])
        g_out = torch.autograd.grad(out.square().sum(), [p for p in model.parameters() if p.requires_grad])
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the first shape compiles static, the second marks the dims dynamic; then no more compiles
    # (size 1 is specialised by dynamo itself for every model, so the shapes avoid it)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_graph_break_would_be_caught():
    """The break detector itself works: a layer calling .item() breaks the graph."""
    class Leaky(torch.nn.Module):
        def forward(self, x):
            return x * float(x.sum().item())

    assert torch._dynamo.explain(Leaky())(torch.randn(3)).graph_break_count >= 1
