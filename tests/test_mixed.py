"""A mixed batch (many adapters, one op): every backend's kernels against the float64 reference run row group by
row group, values and gradients; ragged, empty and adapter-less segments; conversions; bad input; compile."""
import pytest
import torch

import lsr_compile as lc
from lsr_compile import dispatch, kernels, mixed_formulations as mf, reference
from lsr_compile.config import FactorShapes
from lsr_compile.problem import ProblemKey
from lsr_compile.tuning.harness import TOL

DIMS = (3, 2, 3, 6, 7, 5, 9)  # s, r1, r2, n1, n2, m1, m2: d_in 42, d_out 45 (ragged everywhere)
K = 5
# ragged segments, an empty one, adapter-less ones, an adapter used twice, slots never used (1)
LENGTHS = [7, 0, 3, 11, 1, 5, 9]
ADAPTERS = [2, 4, -1, 0, 2, -1, 3]


def bank(dims=DIMS, k=K, dtype=torch.float64, requires_grad=False):
    s, r1, r2, n1, n2, m1, m2 = dims
    g = torch.Generator().manual_seed(7)
    shapes = [(k, s, r1, n1), (k, s, r2, n2), (k, s, m1, r1), (k, s, m2, r2)]
    f = [(0.4 * torch.randn(sh, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(requires_grad)
         for sh in shapes]
    return f, torch.linspace(0.5, 1.5, k)


def inputs(dtype=torch.float64, lengths=LENGTHS, adapters=ADAPTERS, dims=DIMS):
    s, r1, r2, n1, n2, m1, m2 = dims
    N = sum(lengths)
    x = torch.randn(N, n1 * n2, dtype=torch.float64).to(dtype)
    W = (torch.randn(m1 * m2, n1 * n2, dtype=torch.float64) / (n1 * n2) ** 0.5).to(dtype)
    b = torch.randn(m1 * m2, dtype=torch.float64).to(dtype)
    ptr, ad = mf.segments_of(lengths, adapters)
    return x, W, b, ptr, ad


def expected(x, W, b, factors, scales, ptr, ad, dy=None):
    """Each segment alone through the single-adapter reference, in float64 (gradients with ``dy``)."""
    x = x.double().detach().requires_grad_(dy is not None)
    fs = [f.double().detach().requires_grad_(dy is not None) for f in factors]
    out = []
    p = ptr.tolist()
    for i, k in enumerate(ad.tolist()):
        rows = x[p[i]:p[i + 1]]
        if k < 0:
            out.append(torch.nn.functional.linear(rows, W.double(), b.double()))
        else:
            out.append(reference.lsr_linear(rows, W.double(), b.double(), *[f[k] for f in fs], float(scales[k])))
    y = torch.cat(out)
    if dy is None:
        return y
    y.backward(dy.double())
    return y, [x.grad] + [f.grad for f in fs]


def test_conversions_round_trip():
    ptr, ad = mf.segments_of(LENGTHS, ADAPTERS)
    idx = mf.row_index(ptr, ad, sum(LENGTHS))
    assert idx.tolist() == sum(([k] * n for n, k in zip(LENGTHS, ADAPTERS)), [])
    p2, a2 = mf.segments_from_index(idx)
    assert (mf.row_index(p2, a2, idx.numel()) == idx).all()
    assert a2.tolist() == [2, -1, 0, 2, -1, 3] and p2.tolist() == [0, 7, 10, 21, 22, 27, 36]  # the empty one is gone


@pytest.mark.parametrize("variant", sorted(mf.FORWARDS))
def test_torch_forward_formulations(variant):
    x, W, b, ptr, ad = inputs()
    factors, scales = bank()
    got = mf.FORWARDS[variant](x, W, b, *factors, scales, ptr, ad)
    torch.testing.assert_close(got, expected(x, W, b, factors, scales, ptr, ad), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("variant", sorted(mf.BACKWARDS))
@pytest.mark.parametrize("need_dx", [True, False])
def test_torch_backward_formulations(variant, need_dx):
    x, W, b, ptr, ad = inputs()
    factors, scales = bank()
    dy = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64)
    _, want = expected(x, W, b, factors, scales, ptr, ad, dy)
    dx, *grads = mf.BACKWARDS[variant](dy, x, W, *factors, scales, ptr, ad, need_dx)
    assert (dx is None) != need_dx
    if need_dx:
        torch.testing.assert_close(dx, want[0], atol=1e-10, rtol=1e-10)
    for g, w in zip(grads, want[1:]):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
    assert all((g[1] == 0).all() for g in grads)  # slot 1 is never used


def _backends():
    out = []
    for backend in ("torch", "tvm", "triton"):
        why = kernels.unavailable(backend, torch.device("cpu"))
        out.append(pytest.param(backend, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", _backends())
def test_every_backend_through_the_op_values_and_gradients(backend, dtype, fresh_dispatch):
    """The forward runs on ``backend``; the mixed backward has PyTorch formulations only (TVM and Triton build
    none), so the gradients checked here are PyTorch's under every backend, and the test says so."""
    x, W, b, ptr, ad = inputs(dtype)
    factors, scales = bank(dtype=dtype, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(x.shape[0], W.shape[0], dtype=torch.float64)
    want, want_grads = expected(x, W, b, factors, scales, ptr, ad, dy)
    with lc.use_backend(backend):
        y = lc.mixed_linear(xg, W, b, *factors, scales, ptr, ad)
        y.backward(dy.to(dtype))
    tol = TOL[str(dtype)[6:]]
    torch.testing.assert_close(y.double(), want, atol=tol * 10, rtol=tol)
    for got, w in zip([xg.grad] + [f.grad for f in factors], want_grads):
        torch.testing.assert_close(got.double(), w, atol=tol * 10, rtol=tol)
    chosen = {op: {c.backend for o, c in dispatch.cached_choices() if o == op}
              for op in ("mixed_forward", "mixed_backward")}
    assert chosen == {"mixed_forward": {backend}, "mixed_backward": {"torch"}}


def test_every_variant_of_every_backend_builds_and_is_right():
    """What the tuner would race: each candidate for the mixed forward, built through the registry."""
    x, W, b, ptr, ad = inputs(torch.float32)
    factors, scales = bank(dtype=torch.float32)
    key = ProblemKey.of("mixed_forward", torch.float32, x.shape[0], FactorShapes(*DIMS), K, len(ADAPTERS))
    want = expected(x, W, b, factors, scales, ptr, ad)
    seen = set()
    for backend, variant, cfg in kernels.candidates("llvm", "mixed_forward", key, trials=2):
        if kernels.unavailable(backend, torch.device("cpu")):
            continue
        fn = kernels.build(backend, "mixed_forward", variant, cfg, key, torch.device("cpu"))
        torch.testing.assert_close(fn(x, W, b, *factors, scales, ptr, ad).double(), want, atol=1e-4, rtol=1e-4)
        seen.add((backend, variant))
    assert {("torch", "loop"), ("torch", "gathered"), ("torch", "factored")} <= seen


def test_rows_without_adapter_get_the_base_exactly():
    x, W, b, _, _ = inputs()
    factors, scales = bank()
    ptr, ad = mf.segments_of([x.shape[0]], [-1])
    for variant in mf.FORWARDS:
        torch.testing.assert_close(mf.FORWARDS[variant](x, W, b, *factors, scales, ptr, ad),
                                   torch.nn.functional.linear(x, W, b), atol=0, rtol=0)


def test_bad_assignment_is_refused_clearly():
    x, W, b, ptr, ad = inputs()
    factors, scales = bank()
    with pytest.raises(lc.LSRInputError, match=r"outside \[-1, 5\)"):
        lc.mixed_linear(x, W, b, *factors, scales, ptr, torch.tensor([2, 4, -1, 0, 9, -1, 3]))
    with pytest.raises(lc.LSRInputError, match="rise from 0 to the number of rows"):
        lc.mixed_linear(x, W, b, *factors, scales, ptr + 1, ad)
    with pytest.raises(lc.LSRInputError, match="S segments need S \\+ 1"):
        lc.mixed_linear(x, W, b, *factors, scales, ptr[:-1], ad)
    with pytest.raises(lc.LSRInputError, match="one per slot"):
        lc.mixed_linear(x, W, b, *factors, scales[:3], ptr, ad)
    with pytest.raises(lc.LSRInputError, match="4-D bank"):
        lc.mixed_linear(x, W, b, factors[0][0], *factors[1:], scales, ptr, ad)
    with pytest.raises(lc.LSRInputError, match="int64"):
        lc.mixed_linear(x, W, b, *factors, scales, ptr.int(), ad)


def test_compiles_without_graph_break():
    x, W, b, ptr, ad = inputs(torch.float32)
    factors, scales = bank(dtype=torch.float32)

    def f(x, ptr, ad):
        return lc.mixed_linear(x, W, b, *factors, scales, ptr, ad).relu()

    explanation = torch._dynamo.explain(f)(x, ptr, ad)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, ptr, ad), f(x, ptr, ad), atol=1e-5, rtol=1e-5)


def test_tuning_a_mixed_batch_records_keyed_by_bank_and_segments(tmp_path, fresh_dispatch):
    from lsr_compile.device import device_id

    shape = lc.LSRShape(96, 42, 45, s=3, r=(2, 3), n=(6, 7), m=(5, 9), adapters=6, segments=5)
    recs = lc.tune([shape], log_dir=tmp_path, trials=1, time_budget_s=60, progress=False)
    assert [r["key"]["op"] for r in recs] == ["mixed_forward", "mixed_backward"]
    for r in recs:
        assert (r["key"]["adapters"], r["key"]["segments"]) == (8, 8) and r["rejected"] == {}
        assert {"torch:loop", "torch:gathered"} <= set(r["candidates_ms"])
    if kernels.unavailable("tvm", torch.device("cpu")) is None:
        assert any(n.startswith("tvm:gathered") for n in recs[0]["candidates_ms"])
    lc.load_logs(tmp_path)
    text = lc.explain(shape)
    assert text.count("tuned:") == 2 and "K=6 S=5" in text and "mixed_backward" in text
    # the op finds the record: 5 segments and 6 slots fall in the tuned buckets
    x, W, b, ptr, ad = inputs(torch.float32, lengths=[20, 30, 0, 40, 6], adapters=[0, 5, 1, -1, 2])
    factors, scales = bank(dims=(3, 2, 3, 6, 7, 5, 9), k=6, dtype=torch.float32)
    lc.mixed_linear(x, W, b, *factors, scales, ptr, ad)
    used = [c for op, c in dispatch.cached_choices() if op == "mixed_forward"]
    assert used and used[0].reason.startswith("tuned:")


def test_benchmark_quick_run_writes_rows_and_table(tmp_path):
    from lsr_compile import bench_mixed

    out = tmp_path / "rows.jsonl"
    rows = bench_mixed.run(out, quick=True)
    assert {(r["K"], r["dist"]) for r in rows} == {(1, "uniform"), (1, "skewed"), (8, "uniform"), (8, "skewed")}
    providers = {r["provider"] for r in rows}
    assert {"floor", "lsr mixed", "lsr one adapter", "lsr loop", "lsr gathered", "lsr factored",
            "peft lora mixed"} <= providers
    assert all(r["p50_ms"] > 0 and r["versions"]["torch"] for r in rows)
    assert len(out.read_text().splitlines()) == len(rows)
    r = rows[0]
    assert r["lora_bytes_per_adapter"] / r["lsr_bytes_per_adapter"] == pytest.approx(2 * 768 * 8 / 2560)
    table = bench_mixed.table(rows)
    assert len(table.splitlines()) == 2 + 4 and "(4.8x)" in table


@pytest.mark.parametrize("backend", _backends())
def test_fewer_segments_than_slots(backend, fresh_dispatch):
    """S < K: compiled kernels form only the segments' adapters (segment_bank); the result is the same."""
    x, W, b, ptr, ad = inputs(torch.float64, lengths=[4, 6, 2], adapters=[3, -1, 3])
    factors, scales = bank()
    with lc.use_backend(backend):
        got = lc.mixed_linear(x, W, b, *factors, scales, ptr, ad)
    torch.testing.assert_close(got, expected(x, W, b, factors, scales, ptr, ad), atol=1e-9, rtol=1e-9)
    small = mf.segment_bank(*factors, scales, ad)
    assert small[0].shape[0] == 3 and small[5].tolist() == [0, -1, 2]
