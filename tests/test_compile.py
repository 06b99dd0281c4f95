"""torch.compile of models with LSR layers: same outputs, no graph breaks, no recompile per shape."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import lsr_compile as lc

from models import adapter_share, strong_adapters
from models import tiny_bert, tokens


def _lsr_bert():
    model = tiny_bert()
    lc.apply_lsr(model, lc.LSRConfig(s=2, r=2), target_modules=("query", "value", "dense"))
    return strong_adapters(model)


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
    assert adapter_share(lambda: model(input_ids=tokens(2, 9)).logits, model) > 100 * 1e-5
    for batch, seq in [(2, 9), (3, 11), (5, 13), (4, 7), (6, 16)]:
        ids = tokens(batch, seq)
        out, ref = compiled(input_ids=ids).logits, model(input_ids=ids).logits
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        g_ref = torch.autograd.grad(ref.square().sum(), [p for p in model.parameters() if p.requires_grad])
        g_out = torch.autograd.grad(out.square().sum(), [p for p in model.parameters() if p.requires_grad])
        for a, b in zip(g_out, g_ref):
            # each factor's gradient against a tolerance of its own size (some are ~1e-7 here: an absolute
            # 1e-5 would pass a gradient lost to zero)
            scale = b.abs().max().item()
            assert scale > 1e-12
            torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-3)
    # the first shape compiles static, the second marks the dims dynamic; then no more compiles
    # (size 1 is specialised by dynamo itself for every model, so the shapes avoid it)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_graph_break_would_be_caught():
    """The break detector itself works: a layer calling .item() breaks the graph."""
    class Leaky(torch.nn.Module):
        def forward(self, x):
            return x * float(x.sum().item())

    assert torch._dynamo.explain(Leaky())(torch.randn(3)).graph_break_count >= 1


def _compiled_code(model, *args):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(model, fullgraph=True), *args)
    return out, "\n".join(code)


def test_inductor_fuses_a_pytorch_formulation_and_keeps_a_compiled_kernel_opaque():
    """A torch-formulation choice is decomposed for Inductor (no opaque op call left in its code, forward and
    backward); a Triton choice stays one call of the op. The dispatch state keys Inductor's caches, so the
    second compile of the same graph is not served the first one's code."""
    layer = strong_adapters(lc.LSRLinear(48, 40, config=lc.LSRConfig(s=2, r=2)))
    x = torch.randn(3, 7, 48, requires_grad=True)
    assert adapter_share(lambda: layer(x), layer) > 100 * 1e-5
    with lc.use_backend("torch"):
        y, code = _compiled_code(layer, x)
        y.sum().backward()
    assert "torch.ops.lsr.linear" not in code and "extern_kernels" in code
    want = lc.reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    torch.testing.assert_close(y, want)
    from lsr_compile.kernels import unavailable

    if unavailable("triton", x.device) is None:
        with lc.use_backend("triton"):
            y2, code = _compiled_code(layer, x)
        assert "torch.ops.lsr.linear_forward.default" in code  # a training graph: the forward that saves
        torch.testing.assert_close(y2, want, atol=1e-5, rtol=1e-5)


def test_fake_cuda_model_traces_as_one_graph():
    """The CUDA path traced on this CPU machine: fake CUDA tensors (needs a CUDA build of torch, as in the
    GPU-image environment), bf16, Dynamo fullgraph: one graph, every LSR layer one lsr.linear node."""
    import pytest
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not torch.backends.cuda.is_built():
        pytest.skip("fake CUDA tensors need a CUDA build of torch (the GPU-image environment has one)")
    model = _lsr_bert()
    cuda = torch.device("cuda")
    torch._dynamo.reset()
    with FakeTensorMode(allow_non_fake_inputs=True):
        for mod in model.modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                fake = torch.empty_strided(p.shape, p.stride(), dtype=torch.bfloat16, device=cuda)
                mod._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(mod.named_buffers(recurse=False)):
                mod._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=cuda)
        ids = torch.empty(2, 9, dtype=torch.long, device=cuda)
        explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    nodes = [n for g in explanation.graphs for n in g.graph.nodes if "lsr.linear" in str(n.target)]
    assert len(nodes) == 2 * 2 + 3 * 2 + 1


@pytest.mark.slow  # ~1.5 minutes on 2 cores
def test_the_training_graph_holds_nothing_cuda_graphs_refuse():
    """What torch.compile(mode="reduce-overhead") captures: the forward and backward graphs AOTAutograd makes of
    a model with LSR layers hold the step's ops, and none that Inductor's CUDA-graph check refuses (an op tagged
    cudagraph_unsafe, a data-dependent size). Checked here on the graphs themselves; the GPU check runs them."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.utils import get_first_incompatible_cudagraph_node

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = _lsr_bert().train()
    torch._dynamo.reset()
    with lc.use_backend("triton"):  # the ops stay opaque (no Inductor decomposition in this backend anyway)
        compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
        compiled(input_ids=tokens(2, 9)).logits.square().sum().backward()
    assert len(graphs) == 2
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("lsr.linear_forward" in o for o in ops) == 11 and sum("lsr.linear_backward" in o for o in ops) == 11
    for g in graphs:
        assert get_first_incompatible_cudagraph_node(g) is None
    for op in (torch.ops.lsr.linear_forward.default, torch.ops.lsr.linear_backward.default):
        assert torch._C.Tag.cudagraph_unsafe not in op.tags
