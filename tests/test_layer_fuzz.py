"""Fuzz: generated layer configurations and inputs, valid or not, either match the reference or raise a named
error (never a bare failure from deep inside a kernel, never a wrong number)."""
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import lsr_compile as lc
from lsr_compile import reference

from models import strong_adapters

NAMED = (lc.FactorizationError, lc.LSRInputError, ValueError, TypeError)
good = st.integers(1, 4)
count = st.one_of(good, good, good, st.sampled_from([0, -1, True, 2.0, "2", None]))
pair = st.one_of(count, st.tuples(count, count), st.tuples(count, count), st.tuples(count, count, count))
configs = st.fixed_dictionaries({}, optional={
    "s": count, "r": pair, "n": st.one_of(st.none(), st.none(), pair), "m": st.one_of(st.none(), st.none(), pair),
    "alpha": st.one_of(st.none(), st.floats(0.1, 64), st.floats(allow_nan=True), st.just(True)),
    "init": st.sampled_from(["zeros", "reference", "reference", "he"]),
    "scaling": st.sampled_from(["rslora", "lora", "lora", "x"]),
})
dims = st.one_of(st.sampled_from([12, 16, 20, 24, 36, 48]), st.integers(1, 48))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(cfg=configs, d_in=dims, d_out=dims, lead=st.sampled_from([(), (3,), (2, 5)]),
       x_cols=st.sampled_from([0, 0, 0, -1, 2]),
       x_dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64]),
       bias=st.booleans())
@example(cfg={"alpha": 6.805646932770578e38}, d_in=12, d_out=12, lead=(), x_cols=0, x_dtype=torch.float32,
         bias=False)  # scale beyond float32: was a RuntimeError from inside addmm
@example(cfg={"alpha": 3.1884173682498063e38}, d_in=12, d_out=12, lead=(), x_cols=0, x_dtype=torch.float32,
         bias=False)  # the function overflows float32: no formulation can match another
def test_layers_match_the_reference_or_raise_a_named_error(time_limit, cfg, d_in, d_out, lead, x_cols, x_dtype,
                                                           bias):
    with time_limit(60):
        try:
            config = lc.LSRConfig(**cfg)
            layer = lc.LSRLinear(d_in, d_out, bias=bias, config=config)
        except NAMED as e:
            assert str(e)
            event("config refused")
            return
        with torch.no_grad():
            strong_adapters(layer)  # the adapter's share far above the comparison's tolerance, whatever alpha
            extreme = not all(torch.isfinite(p).all() for p in (layer.A1, layer.A2, layer.B1, layer.B2))
            if extreme:  # an alpha like 1e-237: no float32 factors make its update visible
                for p in (layer.A1, layer.A2, layer.B1, layer.B2):
                    p.normal_(0, 0.3)
        x = (torch.randn(*lead, 4, d_in + x_cols) * 3).to(x_dtype)
        try:
            y = layer(x)
        except NAMED as e:
            assert x_cols != 0 or x_dtype != torch.float32, f"valid input refused: {e}"
            assert str(e)
            event("input refused")
            return
        assert x_cols == 0, "an input of the wrong width was accepted"
        event("computed")
        exact = reference.lsr_linear(*(None if t is None else t.double() for t in (
            x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2)), layer.scale)
        if x_dtype == torch.float32 and exact.abs().max() > torch.finfo(torch.float32).max / 16:
            event("the function itself overflows float32")  # (a huge alpha): no order of operations is right
            return
        base = torch.nn.functional.linear(x.double(), layer.weight.double(),
                                          None if layer.bias is None else layer.bias.double())
        if extreme:
            event("alpha too extreme for a visible adapter: compared as a robustness case")
        else:
            assert (exact - base).abs().max() > 100 * 1e-4, "the adapter is below the comparison's tolerance"
        want = reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2,
                                    layer.scale)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(shapes=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)), min_size=4, max_size=4),
       w=st.tuples(st.integers(1, 12), st.integers(1, 12)), dtypes=st.lists(
           st.sampled_from([torch.float32, torch.float64, torch.int32]), min_size=6, max_size=6))
def test_the_op_names_whatever_does_not_fit(shapes, w, dtypes):
    """Factor tensors and weights of arbitrary shapes and dtypes: the op's result is the reference's, or an
    LSRInputError that names a tensor."""
    tensors = [torch.ones(sh, dtype=dt) for sh, dt in zip(shapes, dtypes[:4])]
    W = torch.ones(w, dtype=dtypes[4])
    x = torch.ones(3, w[1], dtype=dtypes[5])
    try:
        y = lc.lsr_linear(x, W, None, *tensors, 1.0)
    except lc.LSRInputError as e:
        assert any(name in str(e) for name in ("x", "weight", "A1", "A2", "B1", "B2", "dtype", "d_in", "d_out"))
        return
    torch.testing.assert_close(y, reference.lsr_linear(x, W, None, *tensors, 1.0))
