import warnings

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401 (not imported with torch.nn.utils)

import lsr_compile as lc
from lsr_compile import reference

from models import adapter_share, strong_adapters
from models import tiny_bert, tokens


def test_layer_parameters_shapes_and_count():
    cfg = lc.LSRConfig(s=16, r=2, n=(32, 24), m=(32, 24), alpha=16.0)
    layer = lc.LSRLinear.from_linear(torch.nn.Linear(768, 768), cfg)
    assert [tuple(p.shape) for p in (layer.A1, layer.A2, layer.B1, layer.B2)] == [
        (16, 2, 32), (16, 2, 24), (16, 32, 2), (16, 24, 2)]
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 3584
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.scale == pytest.approx(16.0 / 2)
    assert "s=16, r=(2, 2), n=(32, 24), m=(32, 24), q=4" in repr(layer)


def test_rectangular_auto_shapes_and_forward_matches_reference():
    lin = torch.nn.Linear(96, 40)
    layer = strong_adapters(lc.LSRLinear.from_linear(lin, lc.LSRConfig(s=3, r=(2, 3))))
    f = layer.factor_shapes
    assert (f.n1 * f.n2, f.m1 * f.m2) == (96, 40)
    x = torch.randn(2, 5, 96)
    assert adapter_share(lambda: layer(x), layer) > 100 * 1e-5  # assert_close's float32 tolerance
    want = reference.lsr_linear(x, lin.weight, lin.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    torch.testing.assert_close(layer(x), want)


def test_zeros_init_is_identity_at_step_zero_and_every_factor_trains():
    torch.manual_seed(1)
    lin = torch.nn.Linear(24, 20)
    layer = lc.LSRLinear.from_linear(lin, lc.LSRConfig(s=2, r=2))
    x = torch.randn(16, 24)
    torch.testing.assert_close(layer(x), lin(x), atol=0, rtol=0)
    before = {n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(16, 20)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(layer(x), target).backward()
        opt.step()
    for name in ("A1", "A2", "B1", "B2"):
        assert not torch.equal(before[name], getattr(layer, name)), f"{name} did not change in two steps"


def test_reference_init_is_nonzero_and_small():
    layer = lc.LSRLinear(24, 20, config=lc.LSRConfig(s=2, r=2, init="reference"))
    for p in (layer.A1, layer.A2, layer.B1, layer.B2):
        assert p.abs().max() > 0 and p.std() < 0.05


def test_merge_unmerge_exact():
    layer = strong_adapters(lc.LSRLinear(48, 36, config=lc.LSRConfig(s=2, r=2)))
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 48)
    assert adapter_share(lambda: layer(x), layer) > 100 * 1e-5
    y = layer(x)
    layer.merge()
    assert layer.merged and "merged" in repr(layer)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.to_linear()(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    torch.testing.assert_close(layer(x), y, atol=0, rtol=0)


def test_delta_weight_matches_reference():
    layer = strong_adapters(lc.LSRLinear(24, 30, config=lc.LSRConfig(s=3, r=(2, 1))))
    want = reference.delta_weight(layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    assert want.abs().max() > 100 * 1e-5
    torch.testing.assert_close(layer.delta_weight(), want)


def test_layer_dtype_mismatch_is_an_error_and_autocast_works():
    layer = strong_adapters(lc.LSRLinear(24, 20, config=lc.LSRConfig(s=2, r=2)))
    with pytest.raises(lc.LSRInputError, match="dtype mismatch"):
        layer(torch.randn(3, 24, dtype=torch.float64))
    x = torch.randn(3, 24)
    assert adapter_share(lambda: layer(x), layer) > 10 * 0.05  # far above the bf16 comparison below
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.05)


def test_apply_lsr_on_bert_wraps_freezes_and_counts():
    model = tiny_bert()
    lc.apply_lsr(model, lc.LSRConfig(s=2, r=2), target_modules=("query", "value"), trainable=("classifier",))
    layers = lc.lsr_layers(model)
    assert len(layers) == 4 and all(n.endswith(("query", "value")) for n in layers)
    trainable, _ = lc.count_parameters(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert trainable == sum(l.num_adapter_parameters() for l in layers.values()) + head
    ids = tokens(2, 9)
    model(input_ids=ids).logits.sum().backward()
    assert all(l.A1.grad is not None for l in layers.values())


def test_apply_lsr_default_targets_and_regex():
    model = tiny_bert()
    lc.apply_lsr(model, lc.LSRConfig(s=1, r=1))  # peft's BERT default: query, value
    assert sorted({n.rsplit(".", 1)[1] for n in lc.lsr_layers(model)}) == ["query", "value"]
    model = tiny_bert()
    lc.apply_lsr(model, lc.LSRConfig(s=1, r=1), target_modules=r".*layer\.0\.attention\.self\.(key|query)")
    assert len(lc.lsr_layers(model)) == 2


def test_apply_lsr_bad_targets():
    with pytest.raises(ValueError, match="no nn.Linear matched"):
        lc.apply_lsr(tiny_bert(), lc.LSRConfig(), target_modules=("nope",))
    with pytest.raises(TypeError, match="not an nn.Linear"):
        lc.apply_lsr(tiny_bert(), lc.LSRConfig(), target_modules=("attention",))
    m = tiny_bert()
    lc.apply_lsr(m, lc.LSRConfig(s=1, r=1))
    with pytest.raises(ValueError, match="called twice"):
        lc.apply_lsr(m, lc.LSRConfig(s=1, r=1))


def test_prime_layer_gets_clear_error():
    with pytest.raises(lc.FactorizationError, match="d_in = 769"):
        lc.LSRLinear.from_linear(torch.nn.Linear(769, 64), lc.LSRConfig())


class _Negated(torch.nn.Module):
    def forward(self, w):
        return -w


@pytest.mark.parametrize("modify", [
    lambda layer: torch.nn.utils.prune.l1_unstructured(layer, "weight", 0.3),
    lambda layer: torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Negated()),
    lambda layer: torch.nn.utils.parametrize.register_parametrization(layer, "bias", _Negated()),
    lambda layer: torch.nn.utils.weight_norm(layer),
    lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
], ids=["prune", "parametrize", "parametrized bias", "weight_norm", "parametrizations.weight_norm"])
def test_a_pruned_parametrized_or_weight_normed_layer_runs_its_effective_weight(modify):
    """torch.nn.utils' prune, parametrize and weight_norm take "weight" out of the layer's own parameters, where the
    forward read it: a bare ``KeyError: 'weight'``. Now the layer runs the weight they compute (the reference on it,
    gradients to weight_norm's trainable g and v included); merging into it, which would be lost, is refused."""
    torch.manual_seed(0)
    layer = strong_adapters(lc.LSRLinear(24, 20, config=lc.LSRConfig(s=2, r=2)))
    with torch.no_grad():
        layer.bias.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        modify(layer)
    x = torch.randn(5, 24, requires_grad=True)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]  # the factors; weight_norm's g and v
    want = reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    want_grads = torch.autograd.grad(want.square().sum(), params)
    y = layer(x)
    torch.testing.assert_close(y, want)
    for got, expected in zip(torch.autograd.grad(y.square().sum(), params), want_grads):
        torch.testing.assert_close(got, expected)
    with torch.no_grad():
        torch.testing.assert_close(layer.to_linear()(x), layer(x))
    if "weight" not in layer._parameters:
        with pytest.raises(ValueError, match=r"LSRLinear.merge: the base weight .* is computed .*prune.remove"):
            layer.merge()


def test_apply_lsr_names_layers_to_transform_when_it_keeps_no_layer():
    """target_modules matched, layers_to_transform / layers_pattern kept nothing: the error blamed target_modules."""
    with pytest.raises(ValueError, match=r"matched 4 layers, but layers_to_transform=\[5\], layers_pattern=None kept "
                                         r"none of them: their layer indices are \[0, 1\]"):
        lc.apply_lsr(tiny_bert(), lc.LSRConfig(target_modules=["query", "value"], layers_to_transform=[5]))
    with pytest.raises(ValueError, match=r"layers_pattern='layers' finds no layer index in their names: set "
                                         r"layers_pattern to the name of the layer list, e.g. 'layer'"):
        lc.apply_lsr(tiny_bert(), lc.LSRConfig(target_modules=["query"], layers_to_transform=0,
                                               layers_pattern="layers"))
    model = lc.apply_lsr(tiny_bert(), lc.LSRConfig(s=1, r=1, target_modules=["query"], layers_to_transform=1,
                                                   layers_pattern="layer"))
    assert list(lc.lsr_layers(model)) == ["bert.encoder.layer.1.attention.self.query"]
