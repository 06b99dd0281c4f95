"""Decoding and evaluation (no graph recorded): A and Bᵀ are built once per change of the factors' values, every
change is seen whichever way it is made, the result is the reference's, and nothing is kept alive after its layer
or its adapter."""
import copy
import functools
import gc
import types
import weakref

import pytest
import torch
from peft import get_peft_model

import lsr_compile as lc
from lsr_compile import formulations, inference_cache, reference, step
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


def test_a_layer_whose_base_changed_after_a_kept_call_gets_the_named_error(fresh_dispatch):
    """What a layer keeps is keyed by the input's dtype and size class, not by the base's shapes: a base weight
    or bias that no longer fits fails inside the kept runner, which then names the problem."""
    layer = _layer()
    x = torch.randn(2, 48)
    with torch.no_grad():
        layer(x)
        layer.weight = torch.nn.Parameter(torch.randn(40, 47), requires_grad=False)
        with pytest.raises(lc.LSRInputError, match="d_in"):
            layer(x)
        layer.weight = torch.nn.Parameter(torch.randn(40, 48), requires_grad=False)
        layer.bias = torch.nn.Parameter(torch.randn(41), requires_grad=False)
        with pytest.raises(lc.LSRInputError, match="bias"):
            layer(x)
        layer.bias = torch.nn.Parameter(torch.randn(40), requires_grad=False)
        _is_reference(layer(x), x, layer)  # a new base of the right shape: its values are read, none kept


def test_nothing_outlives_its_layer(fresh_dispatch):
    layer = _layer()
    refs = [weakref.ref(t) for t in (layer.A1, layer.A2, layer.B1, layer.B2)]
    with torch.no_grad():
        layer(torch.randn(2, 48))
        layer(torch.randn(40, 48))
    memo = weakref.ref(layer._inference_memo)
    assert memo().values is not None
    del layer
    gc.collect()
    assert all(r() is None for r in refs) and memo() is None


def test_inference_tensors_are_cached_and_every_change_seen(builds, fresh_dispatch):
    with torch.inference_mode():
        layer = _layer()
        x = torch.randn(3, 48)
        want = _exact(x, layer)
        ys = [layer(x) for _ in range(3)]
        assert builds[0] == 1
        layer.B2.mul_(-2.0)  # inference tensors have no version counter at all
        y = layer(x)
    for out in ys:
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
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


def test_writes_through_data_and_numpy_are_seen(fresh_dispatch):
    """``p.data.mul_()`` and a write through numpy change values behind every version counter: the values are
    what is compared, so both are seen with nothing to call."""
    layer = _layer()
    x = torch.randn(3, 48)
    with torch.no_grad():
        before = layer(x)
        layer.B2.data.mul_(-2.0)
        after = layer(x)
        _is_reference(after, x, layer)
        assert not torch.allclose(after, before)
        layer.A1.detach().numpy()[0, 0, 0] += 5.0
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
    assert layer._inference_memo.values is not None
    twin = copy.deepcopy(layer)
    assert twin._inference_memo.values is None and twin._inference_memo is not layer._inference_memo
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    with torch.no_grad():
        twin.A1.mul_(3.0)
        _is_reference(twin(x), x, twin)
        _is_reference(loaded(x), x, loaded)
        _is_reference(layer(x), x, layer)


# ---- every way factors change × every way a model is called, against torch.kron of the current values --------

def _adapted(model):
    """(path, layer) of every LSR layer of ``model`` (peft's or ``LSRLinear``), paths as in the plain model."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, lc.LSRLinear) or (hasattr(m, "lsr_A1") and hasattr(m, "base_layer")):
            out.append((name.removeprefix("base_model.model."), m))
    assert out
    return out


def _factors_and_scale(layer):
    if isinstance(layer, lc.LSRLinear):
        return (layer.A1, layer.A2, layer.B1, layer.B2), layer.scale
    name = layer.active_adapters[0]
    return layer.factors(name), layer.lsr_scale[name]


def _kron_delta(A1, A2, B1, B2, scale):
    """scale·B·A with A = Σ A1[l] ⊗ A2[l], B = Σ B1[l] ⊗ B2[l] (torch.kron, float64)."""
    A = sum(torch.kron(A1[l].double(), A2[l].double()) for l in range(A1.shape[0]))
    B = sum(torch.kron(B1[l].double(), B2[l].double()) for l in range(B1.shape[0]))
    return scale * B @ A


def _reference(plain, model):
    """A float64 copy of the plain model with every adapted weight replaced by W + ΔW from the factors' values
    as they are now."""
    ref = copy.deepcopy(plain).double()
    for path, layer in _adapted(model):
        target = ref.get_submodule(path)
        delta = _kron_delta(*_factors_and_scale(layer)[0], _factors_and_scale(layer)[1])
        with torch.no_grad():
            target.weight += delta.T if type(target).__name__ == "Conv1D" else delta
    return ref


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _optimizer_step(make):
    def update(run, rng):
        opt = make(_trainable(run.model))
        loss = run.model(input_ids=run.ids, labels=run.ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return update


def _perturb(rng, p):
    return torch.randn(p.shape, generator=rng, dtype=p.dtype) * 0.1 * (float(p.detach().abs().mean()) + 1e-3)


@torch.no_grad()
def _aliased_buffer(run, rng):
    """``vector_to_parameters`` makes the factors views of one buffer (their own version counters untouched);
    the buffer is then written in place."""
    params = _trainable(run.model)
    vec = torch.nn.utils.parameters_to_vector(params)
    torch.nn.utils.vector_to_parameters(vec, params)
    vec.add_(torch.randn(vec.shape, generator=rng) * 0.1 * float(vec.abs().mean()))


def _data_in_place(run, rng):
    for p in _trainable(run.model):
        p.data.add_(_perturb(rng, p))


def _numpy_write(run, rng):
    for p in _trainable(run.model):
        p.detach().numpy()[...] += _perturb(rng, p).numpy()


@torch.no_grad()
def _load_state_dict(run, rng):
    sd = {k: v + _perturb(rng, v) if "lsr_" in k or k.endswith(("A1", "A2", "B1", "B2")) else v
          for k, v in run.model.state_dict().items()}
    run.model.load_state_dict(sd)


def _data_of_another_shape(run, rng):
    """Every factor's ``.data`` replaced by one with one more Kronecker term (another shape, new storage). Its
    gradient of the old shape goes too, as a user must drop it: PyTorch itself refuses a ``.grad`` whose shape
    differs from the tensor's (backward accumulating into it, ``torch.compile`` fakeifying the parameter)."""
    for _, layer in _adapted(run.model):
        for p in _factors_and_scale(layer)[0]:
            p.data = torch.cat([p.data, torch.randn((1, *p.shape[1:]), generator=rng) * p.data.std()])
            p.grad = None
    run.reshaped = True


@functools.lru_cache(maxsize=1)
def _dynamo_sees_data_reshape() -> bool:
    """Whether this torch's compiled graphs notice a parameter's ``.data`` replaced by one of another shape.
    torch 2.11 does not (its guards on a module's tensors are skipped while the module's ``__dict__`` is
    unchanged): the old graph runs and fails its size assertion; 2.13 recompiles. Plain torch, no LSR."""
    lin = torch.nn.Linear(4, 2, bias=False)
    compiled = torch.compile(lin)
    x = torch.randn(3, 4)
    with torch.no_grad():
        compiled(x)
        lin.weight.data = torch.randn(5, 4)
        try:
            return compiled(x).shape == (3, 5)
        except AssertionError:
            return False
        finally:
            torch._dynamo.reset()


def _new_adapter_in_place_of_the_old(run, rng):
    """A new adapter (new tensors, possibly at the addresses the old one's freed) made active; the old deleted."""
    pm = run.model
    old = pm.active_adapter
    new = f"a{run.adapters}"
    run.adapters += 1
    pm.add_adapter(new, lc.LSRConfig(s=2, r=2, target_modules=run.targets))
    pm.set_adapter(new)
    strong_adapters(pm, seed=int(torch.randint(0, 1000, (1,), generator=rng)))
    pm.delete_adapter(old)
    gc.collect()


UPDATES = {
    "AdamW fused (Trainer's default)": _optimizer_step(lambda p: torch.optim.AdamW(p, lr=0.05, fused=True)),
    "Adam fused": _optimizer_step(lambda p: torch.optim.Adam(p, lr=0.05, fused=True)),
    "SGD fused": _optimizer_step(lambda p: torch.optim.SGD(p, lr=0.5, fused=True)),
    "Adagrad fused": _optimizer_step(lambda p: torch.optim.Adagrad(p, lr=0.05, fused=True)),
    "Adam foreach": _optimizer_step(lambda p: torch.optim.Adam(p, lr=0.05, foreach=True)),
    "SGD for-loop": _optimizer_step(lambda p: torch.optim.SGD(p, lr=0.5, foreach=False)),
    "vector_to_parameters, buffer written": _aliased_buffer,
    ".data written in place": _data_in_place,
    "numpy view written": _numpy_write,
    "load_state_dict": _load_state_dict,
    ".data of another shape": _data_of_another_shape,
    "new adapter, old deleted": _new_adapter_in_place_of_the_old,
}


def _call_grad(run):
    return run.model(input_ids=run.ids).logits


def _call_no_grad(run):
    with torch.no_grad():
        return run.model(input_ids=run.ids).logits


def _call_inference_mode(run):
    with torch.inference_mode():
        return run.model(input_ids=run.ids).logits.clone()


def _call_compiled(run):
    if run.reshaped and not _dynamo_sees_data_reshape():  # what a user of that torch must do (docs/bad-input.md)
        torch._dynamo.reset()
        run.compiled = None
    run.reshaped = False
    if run.compiled is None:
        run.compiled = torch.compile(run.model)
    with torch.no_grad():
        return run.compiled(input_ids=run.ids).logits


def _call_generate(run):
    """Greedy decoding with the KV cache: the logits of each new token, and the sequence they came from (the
    reference is run on that sequence, teacher-forced, so a near-tie cannot make the two diverge)."""
    out = run.model.generate(input_ids=run.ids, attention_mask=torch.ones_like(run.ids), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return torch.stack(out.logits, 1), out.sequences


CALLS = {"grad": _call_grad, "no_grad": _call_no_grad, "inference_mode": _call_inference_mode,
         "compiled": _call_compiled, "generate with cache": _call_generate}


class _Run(types.SimpleNamespace):
    pass


def _check(run, mode, what):
    got = CALLS[mode](run)
    ref = _reference(run.plain, run.model)
    with torch.no_grad():
        if mode == "generate with cache":
            logits, seq = got
            prompt = run.ids.shape[1]
            want = ref(input_ids=seq).logits[:, prompt - 1:-1]
        else:
            logits, want = got, ref(input_ids=run.ids).logits
        tol = 1e-4 * float(want.abs().max())
        torch.testing.assert_close(logits.detach().double(), want, rtol=0, atol=tol,
                                   msg=lambda m: f"{mode} after {what}: {m}")
        # what a stale adapter would have given is far outside the tolerance (the check can fail)
        if run.last is not None and mode != "generate with cache":
            assert (want - run.last).abs().max() > 100 * tol, f"{what} did not change the outputs enough to test"
        run.last = None if mode == "generate with cache" else want


def _schedule(rng, full: bool):
    """(update, call) pairs: every update path and every call mode at least once (``full``: every pair), in a
    random order; the compiled mode before the shape change (a recompile costs half a minute here)."""
    ups, calls = list(UPDATES), list(CALLS)
    if full:
        pairs = [(u, c) for u in ups for c in calls]
    else:
        pairs = [(u, calls[i % len(calls)]) for i, u in enumerate(ups)]
    order = torch.randperm(len(pairs), generator=rng).tolist()
    pairs = [pairs[i] for i in order]
    if not full:  # one compile in the quick profile: before the factors change shape
        pairs.sort(key=lambda p: (p[0] == ".data of another shape") or (p[1] == "compiled" and 0.5))
    return pairs


def _differential(family, seed, full):
    from peft import get_peft_model
    from lsr_compile import workloads

    torch._dynamo.reset()
    plain = workloads.tiny_decoder(family, hidden=64, vocab=128, seed=seed)
    targets = ["q_proj", "v_proj", "down_proj"] if family != "gpt2" else ["c_attn", "c_proj"]
    pm = get_peft_model(copy.deepcopy(plain), lc.LSRConfig(s=2, r=2, target_modules=targets))
    strong_adapters(pm, seed=seed)
    rng = torch.Generator().manual_seed(seed)
    run = _Run(model=pm, plain=plain, ids=torch.randint(3, 128, (2, 6), generator=rng), compiled=None, last=None,
               adapters=0, targets=targets, reshaped=False)
    _check(run, "no_grad", "nothing")
    for what, mode in _schedule(rng, full):
        UPDATES[what](run, rng)
        _check(run, mode, what)


def test_every_update_path_under_every_call_mode_quick(fresh_dispatch):
    _differential("llama", seed=0, full=False)


@pytest.mark.slow
@pytest.mark.parametrize("family,seed", [("llama", 1), ("gpt2", 2)])
def test_every_update_path_under_every_call_mode_full(family, seed, fresh_dispatch):
    _differential(family, seed, full=True)


# ---- the paths users take around the update: Trainer, checkpointing, collectives, tracers, forward AD ---------

def _tiny_llm(seed=0, targets=("q_proj", "v_proj")):
    from peft import get_peft_model
    from lsr_compile import workloads

    plain = workloads.tiny_decoder("llama", hidden=64, vocab=128, seed=seed)
    pm = get_peft_model(copy.deepcopy(plain), lc.LSRConfig(s=2, r=2, target_modules=list(targets)))
    return plain, strong_adapters(pm, seed=seed)


def test_trainer_defaults_then_evaluate_and_generate_see_the_trained_adapter(tmp_path, fresh_dispatch):
    """``transformers.Trainer`` with its defaults (the fused AdamW, which bumps no version counter), evaluated and
    decoded after training: the loss and the logits are the trained adapter's, not the one before training."""
    from transformers import Trainer, TrainingArguments

    plain, pm = _tiny_llm()
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 128, (16, 8), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                             num_train_epochs=1, learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=pm, args=args, train_dataset=data, eval_dataset=data)
    assert "fused" in args.optim.value
    before = trainer.evaluate()["eval_loss"]  # warms what evaluation keeps
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    ref = _reference(plain, pm)
    with torch.no_grad():
        want = sum(float(ref(input_ids=torch.stack([d["input_ids"] for d in data[i:i + 4]]),
                             labels=torch.stack([d["labels"] for d in data[i:i + 4]])).loss)
                   for i in range(0, 16, 4)) / 4
    assert abs(after - before) > 1e-2
    assert after == pytest.approx(want, rel=1e-5)
    run = _Run(model=pm.eval(), plain=plain, ids=data[0]["input_ids"][None], compiled=None, last=None)
    _check(run, "generate with cache", "Trainer.train()")


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_training_with_fused_adamw_is_the_uncheckpointed_training(reentrant, fresh_dispatch):
    """Reentrant checkpointing runs the forward without a graph first: its loss, and the gradients of the
    recompute, belong to the factors as they are at each step."""
    _, pm = _tiny_llm()
    twin = copy.deepcopy(pm)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    pm.train()
    twin.train()
    opts = [torch.optim.AdamW(_trainable(m), lr=5e-2, fused=True) for m in (pm, twin)]
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(4):
        pair = []
        for m, opt in zip((pm, twin), opts):
            loss = m(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            pair.append((float(loss), [p.grad.clone() for p in _trainable(m)]))
            opt.step()
        (l1, g1), (l2, g2) = pair
        assert l1 == pytest.approx(l2, rel=1e-5)
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        losses.append(l1)
    assert len(set(losses)) == 4  # the loss moves with the factors


def _collective_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = strong_adapters(_layer(), seed=10 + rank)  # one base, another adapter on each rank
        x = torch.randn(3, 48, generator=torch.Generator().manual_seed(9))
        factors = (layer.A1, layer.A2, layer.B1, layer.B2)
        outs = {}
        with torch.no_grad():
            for name, collective in (("broadcast", lambda p: dist.broadcast(p, src=0)),
                                     ("all_reduce", lambda p: dist.all_reduce(p))):
                outs[f"before {name}"] = layer(x)  # what the layer keeps is warm
                for p in factors:
                    collective(p)
                outs[name] = layer(x)
                outs[f"{name} factors"] = [p.clone() for p in factors]
        torch.save(outs, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_collectives_writing_factors_in_place_are_seen(tmp_path):
    """``torch.distributed`` collectives write parameters without bumping their version counters: after a
    broadcast every rank serves rank 0's adapter, after an all_reduce the sum."""
    import torch.multiprocessing as mp

    mp.spawn(_collective_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    outs = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(9))
    base = _layer()
    for name in ("broadcast", "all_reduce"):
        for out in outs:
            A1, A2, B1, B2 = out[f"{name} factors"]
            want = reference.lsr_linear(x.double(), base.weight.double(), base.bias.double(), A1.double(),
                                        A2.double(), B1.double(), B2.double(), base.scale)
            torch.testing.assert_close(out[name].double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(outs[0][name], outs[1][name])
    assert not torch.allclose(outs[1]["before broadcast"], outs[1]["broadcast"])


def test_jit_trace_after_a_warm_up_call_reads_the_factors_when_it_runs(fresh_dispatch):
    layer = _layer()
    x = torch.randn(3, 48)
    with torch.no_grad():
        layer(x)  # warm
        traced = torch.jit.trace(layer, x, check_trace=False)
        _is_reference(traced(x), x, layer)
        layer.B2.mul_(-2.0)
        layer.A1.add_(0.1)
        _is_reference(traced(x), x, layer)
        x2 = torch.randn(5, 48)
        _is_reference(traced(x2), x2, layer)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("frozen", [True, False])
def test_forward_mode_ad_carries_the_tangent(grad, frozen, fresh_dispatch):
    import torch.autograd.forward_ad as fwAD

    layer = _layer()
    layer.requires_grad_(not frozen)
    x, t = torch.randn(3, 48), torch.randn(3, 48)
    with torch.no_grad():
        layer(x)  # warm
    w = layer.weight.double() + _kron_delta(layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    with torch.set_grad_enabled(grad), fwAD.dual_level():
        y = layer(fwAD.make_dual(x, t))
        primal, tangent = fwAD.unpack_dual(y)
    assert tangent is not None
    torch.testing.assert_close(tangent.double(), t.double() @ w.T, rtol=1e-5, atol=1e-4)
    _is_reference(primal, x, layer)


def test_deleted_adapters_are_freed(fresh_dispatch):
    """Adapters that decoded and were deleted leave nothing behind: neither their factors nor copies of them."""
    _, pm = _tiny_llm()
    ids = torch.randint(3, 128, (1, 5))
    refs, layers = [], [m for _, m in _adapted(pm)]
    for i in range(6):
        name = f"n{i}"
        pm.add_adapter(name, lc.LSRConfig(s=2, r=2, target_modules=["q_proj", "v_proj"]))
        pm.set_adapter(name)
        strong_adapters(pm, seed=i)
        pm.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        refs += [weakref.ref(t) for layer in layers for t in layer.factors(name)]
        pm.delete_adapter(name) if i < 5 else None
        if i < 5:
            pm.set_adapter("default")
    gc.collect()
    alive = [r for r in refs if r() is not None]
    assert len(alive) == 4 * len(layers)  # the last adapter's own factors only
    held = [layer._inference_memo.values for layer in layers]
    assert all(v is None or all(a.shape == b.shape and torch.equal(a, b)
                                for a, b in zip(v, layer.factors("n5"))) for v, layer in zip(held, layers))
