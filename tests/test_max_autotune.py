"""torch.compile(mode="max-autotune"): Inductor benchmarks LSR's candidates (lsr_compile.inductor_autotune), and
picks one of them, with the outputs and gradients of the float64 reference, over ranges of the token count; in
default mode, under a forced backend and on a torch without the hook, nothing changes."""
import warnings

import pytest
import torch
import torch._dynamo

import lsr_compile as lc
from lsr_compile import inductor_autotune as ia
from lsr_compile.kernels import unavailable

from models import strong_adapters

FORMULATIONS = {"torch_fold", "torch_materialise", "torch_factored"}
needs_hook = pytest.mark.skipif(ia.missing() is not None, reason=f"this torch: {ia.missing()}")


@pytest.fixture(autouse=True)
def _fresh_compiles():
    """Every compile lowers its graph (a cached graph would skip the autotuning this file checks)."""
    torch._dynamo.reset()
    ia.clear_picks()
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield
    torch._dynamo.reset()


def _layer():
    return strong_adapters(lc.LSRLinear(64, 48, config=lc.LSRConfig(s=2, r=2)))


def _run_and_get_code(fn):
    """Inductor's run_and_get_code without its reset of Dynamo (which would compile every call static)."""
    from unittest import mock

    from torch._inductor.graph import GraphLowering

    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        return fn(), codes


def _ours(label: str) -> bool:
    return label in FORMULATIONS or label == "dispatch" or label.startswith(("tvm:", "triton:"))


def _check_against_float64(layer, x, y, params):
    """y and the gradients of y² (already in .grad) against the float64 reference."""
    xd = x.detach().double().requires_grad_()
    pd = [p.detach().double().requires_grad_() for p in params]
    ref = lc.reference.lsr_linear(xd, layer.weight.double(), layer.bias.double(), *pd, layer.scale)
    ref.square().sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    for got, want in [(x.grad, xd.grad)] + [(p.grad, q.grad) for p, q in zip(params, pd)]:
        scale = want.abs().max().item()
        assert scale > 1e-6
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * scale)


@needs_hook
def test_max_autotune_picks_one_of_lsrs_candidates_over_token_ranges_forward_and_backward():
    """Training steps at four token counts, one in each range (the first compiles static, the rest dynamic):
    every autotuning is of LSR's candidates and picks one of them, outputs and gradients equal the float64
    reference, and the ranges dispatch at run time (each range its own branch here, as if every range had
    another winner: on a loaded machine which one wins is noise)."""
    layer = _layer()
    params = [layer.A1, layer.A2, layer.B1, layer.B2]
    compiled = torch.compile(layer, mode="max-autotune", fullgraph=True)
    codes = []
    with torch._inductor.config.patch({"test_configs.force_no_impl_grouping": True}):
        for n in (5, 37, 200, 1500):
            x = torch.randn(n, 64, requires_grad=True)

            def step():
                y = compiled(x)
                y.square().sum().backward()
                return y

            y, code = _run_and_get_code(step)
            codes += code
            _check_against_float64(layer, x, y, params)
            for p in params:
                p.grad = None
    picks = ia.picks()
    names = {k.split(" ")[0] for k in picks}
    assert {"lsr_linear", "lsr_linear_backward"} <= names, picks
    ranges = {"lsr_linear_by_tokens_range_1_16", "lsr_linear_by_tokens_range_17_128",
              "lsr_linear_by_tokens_range_129_1024", "lsr_linear_by_tokens_range_1025_inf"}
    assert ranges <= names, list(picks)
    for name, (winner, times) in picks.items():
        assert _ours(winner), (name, winner)
        assert all(_ours(c) for c in times), (name, times)
        # every PyTorch formulation of the op competed, and the op itself (dispatch's choice)
        want = FORMULATIONS - ({"torch_factored"} if "backward" in name else set())
        assert want | {"dispatch"} <= set(times), (name, times)
        if unavailable("tvm", "cpu") is None:
            assert any(c.startswith("tvm:") for c in times), (name, times)
    text = "\n".join(codes)
    # the step's ops were replaced by the autotuned ones: no linear_forward / linear_backward call is left
    assert "torch.ops.lsr.linear_forward" not in text and "torch.ops.lsr.linear_backward.default" not in text


@needs_hook
@pytest.mark.parametrize("decomposition", [True, False])
def test_a_decomposition_and_the_op_itself_are_each_correct_when_picked(decomposition):
    """Inductor's test switch makes a decomposition win (a formulation inlined, or a compiled kernel's one call),
    or the op itself (one call of lsr::linear_autotuned, dispatch's kernel at run time); each equals the
    reference."""
    from torch._inductor.utils import run_and_get_code

    layer = _layer()
    x = torch.randn(3, 11, 64)
    with torch.no_grad(), torch._inductor.config.patch(
            {"test_configs.force_custom_op_decomposition": decomposition}):
        y, code = run_and_get_code(torch.compile(layer, mode="max-autotune", fullgraph=True), x)
    code = "\n".join(code)
    # the op itself is called with no kernel named (a compiled candidate, which may win too, names its kernel)
    assert ("impl='')" in code) is not decomposition
    assert "torch.ops.lsr.linear.default(" not in code
    want = lc.reference.lsr_linear(x.double(), *(t.double() for t in (layer.weight, layer.bias, layer.A1,
                                                                          layer.A2, layer.B1, layer.B2)), layer.scale)
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert [k for k in ia.picks() if k.startswith("lsr_linear ")], ia.picks()


def test_default_mode_a_forced_backend_and_disabled_keep_dispatchs_choice():
    """Only max-autotune benchmarks LSR's candidates: default mode, and max-autotune under use_backend or
    inductor_autotune.disabled(), compile the choice dispatch makes when tracing, as before."""
    from torch._inductor.utils import run_and_get_code

    layer = _layer()
    x = torch.randn(40, 64)
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
        torch._dynamo.reset()
        with lc.use_backend("torch"):
            _, forced = run_and_get_code(torch.compile(layer, mode="max-autotune", fullgraph=True), x)
        with ia.disabled():
            _, off = run_and_get_code(torch.compile(layer, mode="max-autotune", fullgraph=True), x)
    for c in code + forced + off:
        assert "linear_autotuned" not in c
    assert ia.picks() == {}


def test_a_torch_without_the_hook_is_unaffected(monkeypatch):
    """Where Inductor has no register_custom_op_autotuning (torch before 2.10), or one that takes only
    @torch.library.custom_op ops (2.10, 2.11): max-autotune compiles dispatch's choice as default mode does,
    warns once, and explain says so."""
    from torch._inductor import lowering
    from torch._inductor.kernel import custom_op
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(ia, "_state", {"registered": False, "missing": None, "warned": False})
    monkeypatch.delattr(custom_op, "register_custom_op_autotuning")
    layer = _layer()
    x = torch.randn(40, 64, requires_grad=True)
    compiled = torch.compile(layer, mode="max-autotune", fullgraph=True)
    with pytest.warns(RuntimeWarning, match="has no register_custom_op_autotuning"):
        y, code = run_and_get_code(lambda: compiled(x))
    assert all("linear_autotuned" not in c for c in code)
    params = [layer.A1, layer.A2, layer.B1, layer.B2]
    y.square().sum().backward()
    _check_against_float64(layer, x, y, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        torch._dynamo.reset()
        torch.compile(layer, mode="max-autotune", fullgraph=True)(x.detach())
    assert ia.picks() == {}
    assert "has no register_custom_op_autotuning" in lc.explain(layer).splitlines()[-1]
    # torch 2.10 and 2.11: the hook exists but takes only ops made with @torch.library.custom_op
    monkeypatch.undo()
    monkeypatch.setattr(ia, "_state", {"registered": False, "missing": None, "warned": False})
    monkeypatch.delattr(lowering, "user_lowerings", raising=False)
    assert "@torch.library.custom_op" in ia.missing()
