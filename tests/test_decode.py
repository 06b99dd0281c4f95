"""Decoding and evaluation (no graph recorded): A and Bᵀ are built once per change of the factors, every change
is seen, the result is the reference's, and nothing is kept alive after its layer."""
import copy
import gc
import types
import weakref

import pytest
import torch
from peft import get_peft_model

import lsr_compile as lc
from lsr_compile import factor_cache, formulations, reference, step
from lsr_compile.bench_decode import _Holder

from models import strong_adapters


def _exact(x, layer):
    return reference.lsr_linear(x.double(), layer.weight.double(), layer.bias.double(), layer.A1.double(),
                                layer.A2.double(), layer.B1.double(), layer.B2.double(), layer.scale)


def _is_reference(y, x, layer):
    """float32 against float64, the tolerance scaled by the output's size (changes below grow the factors)."""
    want = _exact(x, layer)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * max([1.0] + want.abs().flatten().tolist()))


@pytest.fixture
def builds(monkeypatch):
    """How many times A and Bᵀ were built from the factors."""
    count = [0]
    real = step.AtenParts.factors

    def counting(self, A1, A2, B1, B2):
        count[0] += 1
        return real(self, A1, A2, B1, B2)
    monkeypatch.setattr(step.AtenParts, "factors", counting)
    return count


def _layer(d_in=48, d_out=40, seed=0, **cfg):
    torch.manual_seed(seed)
    return strong_adapters(lc.LSRLinear(d_in, d_out, config=lc.LSRConfig(s=2, r=(2, 3), **cfg)), seed=seed)


@pytest.mark.parametrize("tokens", [1, 5, 0])
def test_no_grad_output_is_the_reference_and_factors_are_built_once(tokens, builds, fresh_dispatch):
    layer = _layer()
    x = torch.randn(2, tokens, 48)
    with torch.no_grad():
        ys = [layer(x) for _ in range(5)]
    assert builds[0] == 1
    for y in ys:
        _is_reference(y, x, layer)


def test_every_change_of_the_factors_is_seen(builds, fresh_dispatch):
    layer = _layer()
    x = torch.randn(3, 48)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.no_grad():
        layer(x)
    changes = [
        lambda: (opt.zero_grad(), layer(x).square().sum().backward(), opt.step()),  # an optimizer step, in place
        lambda: torch.no_grad()(layer.B2.mul_)(-2.0),  # in place, no graph
        lambda: layer.B1.detach().mul_(3.0),  # in place through a detached alias (it shares the version counter)
        lambda: setattr(layer.A1, "data", torch.randn_like(layer.A1)),  # a new storage under the same Parameter
        lambda: layer.load_state_dict({k: v * 1.5 for k, v in layer.state_dict().items()}),
        lambda: setattr(layer, "A2", torch.nn.Parameter(torch.randn_like(layer.A2))),  # a new Parameter
        lambda: layer.reset_adapter(),
    ]
    for change in changes:
        before = layer(x).detach()
        change()
        with torch.no_grad():
            y = layer(x)
        assert not torch.allclose(y, before)
        _is_reference(y, x, layer)


def test_a_view_of_the_same_storage_assigned_to_data_is_seen(fresh_dispatch):
    layer = _layer()
    x = torch.randn(3, 48)
    with torch.no_grad():
        layer(x)
        half = layer.A1.data.clone()
        storage = torch.cat([half, half * 3.0])  # a prefix view of it has the same address, another shape later
        layer.A1.data = storage[: half.shape[0]]
        y1 = layer(x)
        layer.A1.data = storage[half.shape[0]:]
        y2 = layer(x)
    _is_reference(y2, x, layer)
    assert not torch.allclose(y1, y2)


def test_functional_op_and_a_forced_backend_between_calls(fresh_dispatch):
    layer = _layer()
    x = torch.randn(4, 48)
    args = (layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    with torch.no_grad():
        y = lc.lsr_linear(x, *args)
        with lc.use_backend("torch"):
            y_torch = lc.lsr_linear(x, *args)
        y_again = lc.lsr_linear(x, *args)
    for out in (y, y_torch, y_again):
        _is_reference(out, x, layer)


def test_bad_input_after_a_cached_call_still_gets_its_named_error(fresh_dispatch):
    layer = _layer()
    args = (layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    with torch.no_grad():
        lc.lsr_linear(torch.randn(2, 48), *args)
        with pytest.raises(lc.LSRInputError, match="dtype mismatch"):
            lc.lsr_linear(torch.randn(2, 48, dtype=torch.float64), *args)
        with pytest.raises(lc.LSRInputError, match="last dimension"):
            lc.lsr_linear(torch.randn(2, 47), *args)
        with pytest.raises(lc.LSRInputError, match="bias"):
            lc.lsr_linear(torch.randn(2, 48), layer.weight, torch.zeros(1), *args[2:])


def test_nothing_outlives_its_layer(fresh_dispatch):
    factor_cache.clear()
    layer = _layer()
    ref = weakref.ref(layer.A1)
    with torch.no_grad():
        layer(torch.randn(2, 48))
        layer(torch.randn(40, 48))
    assert factor_cache.size() == 1
    del layer
    gc.collect()
    assert ref() is None and factor_cache.size() == 0


def test_inference_tensors_run_uncached(fresh_dispatch):
    with torch.inference_mode():
        layer = _layer()
        x = torch.randn(3, 48)
        y = layer(x)
    _is_reference(y, x, layer)


def test_training_after_decoding_gets_the_reference_gradients(fresh_dispatch):
    layer = _layer()
    x = torch.randn(3, 48)
    with torch.no_grad():
        layer(x)
    x_ = x.clone().requires_grad_()
    layer(x_).sum().backward()
    ref = copy.deepcopy(layer)
    for p in ref.parameters():
        p.grad = None
    xr = x.clone().requires_grad_()
    reference.lsr_linear(xr, ref.weight, ref.bias, ref.A1, ref.A2, ref.B1, ref.B2, ref.scale).sum().backward()
    for a, b in [(x_.grad, xr.grad)] + [(getattr(layer, n).grad, getattr(ref, n).grad) for n in ("A1", "A2", "B1", "B2")]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_peft_float32_factors_over_a_half_base(dtype, builds, fresh_dispatch):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).to(dtype)
    pm = get_peft_model(_Holder(base), lc.LSRConfig(s=2, r=2, target_modules=["proj"]))
    layer = pm.base_model.model.proj
    A1, A2, B1, B2 = layer.factors("default")
    assert A1.dtype == torch.float32  # peft's autocast_adapter_dtype
    with torch.no_grad():
        B2.normal_()
        x = torch.randn(3, 64).to(dtype)
        ys = [pm(x) for _ in range(3)]
    assert builds[0] == 1
    want = reference.lsr_linear(x.double(), base.weight.double(), base.bias.double(), A1.double(), A2.double(),
                                B1.double(), B2.double(), layer.lsr_scale["default"])
    for y in ys:
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    delta = (want - torch.nn.functional.linear(x.double(), base.weight.double(), base.bias.double())).abs()
    assert delta.max() > 0.5  # the adapter's share is far above the tolerance


def test_peft_layer_paths_other_than_one_active_adapter(fresh_dispatch):
    torch.manual_seed(0)
    pm = get_peft_model(_Holder(torch.nn.Linear(32, 32)), lc.LSRConfig(s=2, r=2, target_modules=["proj"]))
    pm.add_adapter("other", lc.LSRConfig(s=1, r=2, target_modules=["proj"]))
    strong_adapters(pm)
    x = torch.randn(2, 32)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        y_default = pm(x)
        with pm.disable_adapter():
            y_base = pm(x)
        pm.base_model.set_adapter(["default", "other"])
        y_both = pm(x)
    base = layer.get_base_layer()
    torch.testing.assert_close(y_base, base(x))
    d = {n: (layer.lsr_scale[n] * (x @ formulations.build_A(*layer.factors(n)[:2]).T)
             @ formulations.build_B(*layer.factors(n)[2:]).T) for n in ("default", "other")}
    torch.testing.assert_close(y_default, base(x) + d["default"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_both, base(x) + d["default"] + d["other"], rtol=1e-5, atol=1e-5)


def test_decode_benchmark_table(tmp_path):
    from lsr_compile import bench_decode

    rows = bench_decode.bench_layers(shapes=((24, 16),), rounds=2, reps=2)
    rows += bench_decode.bench_decoders(families=("llama",), dtypes=(torch.float32,), batches=(2,), prompt=3,
                                        new_tokens=2, rounds=1)
    text = bench_decode.table(rows)
    assert "24x16" in text and "| llama | float32 | 2 |" in text
    assert {r["generated"] for r in rows if r["kind"] == "model"} == {2}


def test_changes_through_data_bypass_version_counters_and_clearing_the_cache_sees_them(fresh_dispatch):
    """``p.data.mul_()`` mutates the storage behind a tensor with a version counter of its own, as it bypasses
    autograd's checks: documented, and ``lc.clear_factor_cache()`` is the way to make it seen."""
    layer = _layer()
    x = torch.randn(3, 48)
    with torch.no_grad():
        before = layer(x)
        layer.B2.data.mul_(-2.0)
        assert torch.equal(layer(x), before)
        lc.clear_factor_cache()
        _is_reference(layer(x), x, layer)


def test_a_layer_remembers_its_runner_and_forgets_it_when_anything_changes(monkeypatch, fresh_dispatch):
    """Decode-sized calls of one layer reuse one runner (a Conv1D's weight, a new view every call, included);
    a forced backend, new tuning records, the factors or the input's dtype make a new one."""
    from lsr_compile import dispatch
    from transformers.pytorch_utils import Conv1D

    built = []
    real = dispatch.inference_runner
    monkeypatch.setattr(dispatch, "inference_runner", lambda *a: built.append(1) or real(*a))
    torch.manual_seed(0)
    for base in (torch.nn.Linear(48, 40), Conv1D(40, 48)):
        layer = strong_adapters(lc.LSRLinear.from_linear(base, lc.LSRConfig(s=2, r=2)))
        x = torch.randn(1, 1, 48)
        built.clear()
        with torch.no_grad():
            for _ in range(5):
                _is_reference(layer(x).reshape(1, 40), x.reshape(1, 48), _as_linear(layer))
            assert len(built) == 1
            with lc.use_backend("torch"):
                layer(x)
            assert len(built) == 2
            dispatch.invalidate()
            layer(x)
            assert len(built) == 3
            layer.B1.mul_(2.0)
            _is_reference(layer(x).reshape(1, 40), x.reshape(1, 48), _as_linear(layer))
            assert len(built) == 4
            layer.double()(x.double())
            assert len(built) == 5


def _as_linear(layer):
    """A view of ``layer`` with its weight as d_out x d_in, for the reference."""
    return types.SimpleNamespace(weight=layer.weight.t() if layer.fan_in_fan_out else layer.weight,
                                 bias=layer.bias, scale=layer.scale, A1=layer.A1, A2=layer.A2, B1=layer.B1,
                                 B2=layer.B2)


def test_a_decoded_layer_copies_and_pickles_without_what_it_remembers(tmp_path, fresh_dispatch):
    layer = _layer()
    x = torch.randn(2, 48)
    with torch.no_grad():
        layer(x)
    assert layer._decode_memos
    twin = copy.deepcopy(layer)
    assert twin._decode_memos == {}
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    with torch.no_grad():
        twin.A1.mul_(3.0)
        _is_reference(twin(x), x, twin)
        _is_reference(loaded(x), x, loaded)
        _is_reference(layer(x), x, layer)
