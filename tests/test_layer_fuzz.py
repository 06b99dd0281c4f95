"""Fuzz: generated layer configurations and inputs, valid or not, either match the reference or raise a named
error (never a bare failure from deep inside a kernel, never a wrong number)."""
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import lsr_compile as lc
from lsr_compile import kernels, reference, step

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


# ---- the training step: empty batches, double backward, a tensor scale, every backend ------------------------

def _backward_kernels():
    """Every backward kernel this machine runs for a small layer: the PyTorch formulations, every point of TVM's
    llvm space (the generic kernel too: the problem is host-bound) and Triton's (its interpreter here)."""
    from lsr_compile.config import FactorShapes
    from lsr_compile.problem import ProblemKey

    key = ProblemKey.of("backward", torch.float32, 16, FactorShapes(2, 2, 2, 4, 4, 4, 3))
    cands = kernels.candidates("llvm", "backward", key)
    cands += [c for c in kernels.candidates("cuda", "backward", key) if c[0] == "triton"]
    return key, [c for c in cands if kernels.unavailable(c[0], "cpu") is None]


_KEY, _BACKWARD_KERNELS = _backward_kernels()


@pytest.mark.parametrize("backend,variant,config", _BACKWARD_KERNELS,
                         ids=[f"{b}:{v}:{sorted(c.items())}" for b, v, c in _BACKWARD_KERNELS])
def test_an_empty_batch_gives_every_backward_kernel_zero_factor_gradients(backend, variant, config):
    """0 rows and a real (empty) loss gradient: exact zeros, also right after a call that left large values in
    the kernel's workspace (TVM's generic backward returned them, NaN or 1e32 where they were such)."""
    fn = kernels.build(backend, "backward", variant, config, _KEY, torch.device("cpu"))
    f = _KEY.shapes
    factors = [torch.randn(sz) for sz in f.factor_sizes().values()]
    A, Bt = step.ATEN.factors(*factors)
    W = torch.randn(f.d_out, f.d_in)
    for n, magnitude in ((37, 1e15), (0, 1.0)):
        x, dy = torch.randn(n, f.d_in) * magnitude, torch.randn(n, f.d_out) * magnitude
        dx, *grads = fn(dy, x, W, *factors, A, Bt, A @ x.T, None, 0.7, True)
    assert dx.shape == (0, f.d_in)
    for name, g, p in zip("A1 A2 B1 B2".split(), grads, factors):
        assert g.shape == p.shape and torch.equal(g, torch.zeros_like(p)), f"{name}: {g.abs().max()}"


_STEP_BACKENDS = [None] + [b for b in kernels.BACKENDS if kernels.unavailable(b, "cpu") is None]
small = st.integers(1, 3)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(dims=st.tuples(small, small, small, st.integers(1, 5), st.integers(1, 5), st.integers(1, 5),
                      st.integers(1, 5)),
       rows=st.sampled_from([0, 0, 1, 3, 17, 40]), lead=st.sampled_from([(), (2,)]),
       backend=st.sampled_from(_STEP_BACKENDS), scale_kind=st.sampled_from(["float", "tensor", "learnable"]),
       double=st.booleans(), bias=st.booleans())
def test_training_steps_match_the_reference(time_limit, dims, rows, lead, backend, scale_kind, double, bias):
    """Generated layers and batches (empty ones too) through every backend: values, input and factor gradients,
    a learnable tensor scale's gradient and, for double backward, the second-order gradients of a gradient
    penalty, against the float64 reference (a named error where a backend cannot take the problem)."""
    from conftest import make_layer_inputs

    s, r1, r2, n1, n2, m1, m2 = dims
    if backend == "triton" and rows > 17:
        rows = 17  # its interpreter is slow; the sizes, not the row count, are what the kernels tile
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 3e-4 if dtype == torch.float32 else 1e-8
    x, W, b, factors = make_layer_inputs(rows, s, r1, r2, n1, n2, m1, m2, dtype=torch.float64, bias=bias, lead=lead)
    factors = [f * 1.5 for f in factors]  # the adapter about as large as the base (visible_sigma) and more
    scale = 0.7 if scale_kind == "float" else torch.tensor(0.7, dtype=torch.float64,
                                                           requires_grad=scale_kind == "learnable")
    leaves = [t.detach().requires_grad_(True) for t in [x] + factors]
    wrt = leaves + ([scale] if scale_kind == "learnable" else [])

    def run(fn, cast):
        xs, *fs = [cast(t) for t in leaves]
        sc = cast(scale) if isinstance(scale, torch.Tensor) else scale
        y = fn(xs, cast(W), None if b is None else cast(b), *fs, sc)
        if double:
            (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
            loss = gx.square().sum() + y.sum()
        else:
            loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() if y.numel() else y.sum()
        return y, torch.autograd.grad(loss, wrt, allow_unused=True)

    cast = lambda t: t.to(dtype)  # noqa: E731
    with time_limit(120):
        try:
            with lc.use_backend(backend):
                y, got = run(lc.lsr_linear, cast)
        except NAMED as e:
            assert backend not in (None, "torch"), f"the default or PyTorch refused a valid problem: {e}"
            event(f"{backend} refused: {str(e)[:40]}")
            return
    y_ref, want = run(reference.lsr_linear, lambda t: t)
    event(f"{backend or 'default'}, {'double' if double else 'single'}, {'empty' if rows == 0 else 'rows'}")
    if rows:
        base = torch.nn.functional.linear(x, W, b)
        assert (y_ref - base).abs().max() > 100 * tol * max(1.0, y_ref.abs().max().item())
    scale_of = lambda t: max(1.0, t.abs().max().item()) if t is not None and t.numel() else 1.0  # noqa: E731
    torch.testing.assert_close(y.double(), y_ref, atol=tol * scale_of(y_ref), rtol=tol)
    for name, t, g, w in zip(["x", "A1", "A2", "B1", "B2", "scale"], wrt, got, want):
        w = torch.zeros_like(t) if w is None else w  # unused (a double backward through zero rows)
        g = torch.zeros_like(t) if g is None else g
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=tol * scale_of(w), rtol=tol, msg=name)
