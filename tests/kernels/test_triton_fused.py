"""The Triton fused kernel, compiled on a GPU or in the interpreter (TRITON_INTERPRET=1, set by conftest when
there is no GPU): values, gradients, ragged sizes, bf16, and the compiled model through the lsr op with no
graph break."""
import pytest
import torch
import torch._dynamo

import lsr_compile as lc
from lsr_compile import formulations, reference
from lsr_compile import kernels
from lsr_compile.kernels import triton_fused, triton_parts
from lsr_compile.tuning.harness import TOL
from lsr_compile.config import FactorShapes
from lsr_compile.problem import ProblemKey

from conftest import make_layer_inputs
from models import adapter_share, strong_adapters
from models import tiny_bert, tokens

pytestmark = pytest.mark.skipif(not triton_fused.INTERPRETED and not torch.cuda.is_available(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLS = [(dt, TOL[str(dt)[6:]]) for dt in (torch.float64, torch.float32, torch.bfloat16)]  # the tuner's table
# (s, r1, r2, n1, n2, m1, m2): ragged everywhere (d_in 42, d_out 45, q 6), a block multiple, tall/q=1
DIMS = [(3, 2, 3, 6, 7, 5, 9), (2, 2, 4, 8, 8, 4, 8), (1, 1, 1, 3, 41, 2, 64)]


def _rel_close(got, want, tol):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)


def pruned(op, key, cfg, capability=None):
    """Why ``cfg`` must not run for ``key`` on this device (with ``capability``: on a ``sm_<capability>`` GPU),
    as the tuner prunes it (``kernels.prune``: spills, shared memory over the device's limit), or None. A test
    that runs a config of the space asks this first: an H200 raises OutOfResources for an fp32 TMA point."""
    kept, why = kernels.prune([("triton", "fused", cfg)], op, key, DEV if capability is None else None, capability)
    return None if kept else next(iter(why.values()))


def skip_if_pruned(op, key, cfg):
    why = pruned(op, key, cfg)
    if why is not None:
        pytest.skip(f"pruned on this GPU, as the tuner would: {why}")


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype,tol", TOLS)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_forward(dims, dtype, tol, bias):
    N = 37
    x, W, b, factors = make_layer_inputs(N, *dims, dtype=dtype, bias=bias, device=DEV)
    want = reference.lsr_linear(x.double(), W.double(), None if b is None else b.double(),
                                *[f.double() for f in factors], 0.7)
    key = ProblemKey.of("forward", dtype, N, FactorShapes(*dims))
    fn = triton_parts.build("forward", "fused", triton_fused.default_choice("forward", key, DEV)[1], key, DEV)
    y, A, Bt, tT, w_eff = fn(x, W, b, *factors, 0.7)
    _rel_close(y, want, tol)
    # what it hands the backward: A, Bt and tT = A xᵀ (written by the fused kernel), no folded weight
    A_ref = formulations.build_A(*[f.double() for f in factors[:2]])
    _rel_close(A, A_ref, tol)
    _rel_close(Bt, formulations.build_Bt(*[f.double() for f in factors[2:]]), tol)
    _rel_close(tT, A_ref @ x.double().T, tol)
    assert w_eff is None


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("dtype,tol", TOLS)
def test_fused_backward(dims, dtype, tol):
    N = 29
    x, W, b, factors = make_layer_inputs(N, *dims, dtype=dtype, device=DEV)
    g = torch.randn(N, dims[5] * dims[6], dtype=torch.float64).to(device=DEV, dtype=dtype)
    xs = x.double().requires_grad_(True)
    fs = [f.double().requires_grad_(True) for f in factors]
    reference.lsr_linear(xs, W.double(), b.double(), *fs, 1.3).backward(g.double())
    key = ProblemKey.of("backward", dtype, N, FactorShapes(*dims))
    fn = triton_parts.build("backward", "fused", triton_fused.default_choice("backward", key, DEV)[1], key, DEV)
    A, Bt = formulations.build_A(*factors[:2]), formulations.build_Bt(*factors[2:])
    for tT in (None, A @ x.T):  # as the fused forward hands it over, or recomputed
        got = fn(g, x, W, *factors, A, Bt, tT, None, 1.3, True)
        for out, want in zip(got, [xs.grad] + [f.grad for f in fs]):
            _rel_close(out, want, tol)


# (dims, N, dtype) of test_every_point_of_the_space_runs_and_is_right: fp32 on ragged sizes (exact, and what a
# GPU prunes most of: fp32 dots spill, the 64x256x64 four-stage point needs 252 KB of shared memory where sm_90
# has 227 KB), and bf16 on 16-byte-aligned rows, where every point, TMA included, runs on sm_90
EVERY_POINT = {"float32-ragged": (DIMS[0], 37, torch.float32), "bfloat16-aligned": ((2, 2, 4, 8, 8, 8, 16), 70,
                                                                                   torch.bfloat16)}


def every_point_configs(case, op, capability=None):
    """The problem and the configs test_every_point_of_the_space_runs_and_is_right runs for ``case``: the
    space, pruned for this device (or for a ``sm_<capability>`` GPU) as the tuner prunes it."""
    dims, N, dtype = EVERY_POINT[case]
    key = ProblemKey.of(op, dtype, N, FactorShapes(*dims))
    return key, [c for c in triton_fused.schedule_spaces.space(triton_fused.SPACE, op, "fused")
                 if pruned(op, key, c, capability) is None]


@pytest.mark.parametrize("case", sorted(EVERY_POINT))
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_every_point_of_the_space_runs_and_is_right(op, case):
    """Each tuned config that fits the device runs as given on a GPU; in the interpreter at a quarter of its
    tile (still distinct)."""
    (dims, N, dtype), (key, points) = EVERY_POINT[case], every_point_configs(case, op)
    launched = {tuple(sorted(triton_fused.launch_config(c).items())) for c in points}
    assert len(launched) > len(points) // 2  # the configs stay different where they run
    x, W, b, factors = make_layer_inputs(N, *dims, dtype=dtype, device=DEV)
    g = torch.randn(N, dims[5] * dims[6], dtype=torch.float64).to(DEV, dtype)
    want = None
    A, Bt = formulations.build_A(*factors[:2]), formulations.build_Bt(*factors[2:])
    for cfg in points:
        fn = triton_parts.build(op, "fused", cfg, key, DEV)
        got = fn(x, W, b, *factors, 0.7)[0] if op == "forward" else fn(g, x, W, *factors, A, Bt, None, None, 0.7,
                                                                       True)[0]
        want = got if want is None else want
        tol = 1e-4 if dtype == torch.float32 else TOL["bfloat16"]
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=str(cfg))
    ref = reference.lsr_linear(x.double(), W.double(), b.double(), *[f.double() for f in factors], 0.7) \
        if op == "forward" else g.double() @ (W.double() + 0.7 * reference.delta_weight(
            *[f.double() for f in factors], 1.0))
    _rel_close(want, ref, TOL[str(dtype)[6:]])


TMA_POINTS = [c for c in triton_fused.schedule_spaces.space(triton_fused.SPACE, "forward", "fused") if c.get("TMA")]


def _kernels_launched(fn, *args):
    seen = []
    old, triton_fused.recorder = triton_fused.recorder, lambda k, grid, a, meta: seen.append((k, grid, meta))
    try:
        fn(*args)
    finally:
        triton_fused.recorder = old
    return seen


TMA_CASE = ((2, 2, 4, 8, 8, 8, 16), 150)  # (dims, N) of test_tma_persistent_kernel_values_and_gradients


def tma_case_keys(dtype):
    dims, N = TMA_CASE
    return {op: ProblemKey.of(op, dtype, N, FactorShapes(*dims)) for op in ("forward", "backward")}


@pytest.mark.parametrize("cfg", TMA_POINTS, ids=lambda c: f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL["float32"]), (torch.bfloat16, TOL["bfloat16"])])
def test_tma_persistent_kernel_values_and_gradients(cfg, dtype, tol):
    """16-byte-aligned rows: the persistent TMA kernel runs (fewer programs than tiles, so each walks several
    waves; a ragged token count, so tiles hang over the edge and the last row wave has idle programs), forward
    with bias and t, and the input gradient through the layer's backward, against float64. On a GPU only where
    the point fits (fp32 TMA tiles need 301-397 KB of shared memory: pruned on sm_90)."""
    for op, key in tma_case_keys(dtype).items():
        skip_if_pruned(op, key, cfg)
    dims, N = TMA_CASE  # d_in 64, d_out 128, q 8
    x, W, b, factors = make_layer_inputs(N, *dims, dtype=dtype, device=DEV)
    A, Bt = formulations.build_A(*factors[:2]), formulations.build_Bt(*factors[2:])
    launched = _kernels_launched(triton_fused.fused_linear, x, W, b, A, Bt.t(), 0.7, cfg, True)
    assert [k for k, _, _ in launched] == [triton_fused._fused_lsr_tma_kernel]
    (_, grid, meta), = launched
    cfg_run = triton_fused.launch_config(cfg)
    tiles = -(-N // cfg_run["BLOCK_M"]) * -(-128 // cfg_run["BLOCK_N"])
    assert DEV.type == "cuda" or grid[0] < tiles
    y, t = triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, cfg, want_t=True)
    xd, Ad, Btd = x.double(), A.double(), Bt.double()
    want = reference.lsr_linear(xd, W.double(), b.double(), *[f.double() for f in factors], 0.7)
    base = xd @ W.double().T + b.double()
    assert (want - base).abs().max() > 10 * tol * want.abs().max()  # the adapter is visible at this tolerance
    _rel_close(y, want, tol)
    _rel_close(t, xd @ Ad.T, tol)
    g = torch.randn(N, 128, dtype=torch.float64).to(device=DEV, dtype=dtype)
    key = ProblemKey.of("backward", dtype, N, FactorShapes(*dims))
    dx = triton_parts.build("backward", "fused", cfg, key, DEV)(g, x, W, *factors, A, Bt, None, None, 0.7, True)[0]
    _rel_close(dx, g.double() @ (W.double() + 0.7 * Btd.T @ Ad), tol)


def rank_case_key(q, dtype):
    """The problem test_rank_narrower_than_a_dot_is_padded_only_in_the_epilogue launches (100 x 64 -> 160)."""
    return ProblemKey.of("forward", dtype, 100, FactorShapes(1, 1, q, 8, 8, 10, 16))


@pytest.mark.parametrize("q", [3, 8, 16])
@pytest.mark.parametrize("tma", [0, 1])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL["float32"]), (torch.bfloat16, TOL["bfloat16"])])
def test_rank_narrower_than_a_dot_is_padded_only_in_the_epilogue(q, tma, dtype, tol):
    """``x Aᵀ`` is ``rank_block(q)`` wide in the K-loop (8 for q ≤ 8) and zero-padded to 16 only for the
    epilogue's dot; ranks below the block (q = 3) are masked or zero-filled. Both kernels, several column
    tiles per row block (the persistent one reuses its ``x Aᵀ`` across them); bf16 too, which is what runs
    on sm_90 (fp32's 128x128 tiles are pruned there: the pointer one spills, the TMA one overflows shared
    memory)."""
    cfg = dict(TMA_POINTS[1], TMA=tma)  # 128x128x64: 32x32x16 tiles in the interpreter
    skip_if_pruned("forward", rank_case_key(q, dtype), cfg)
    N, d_in, d_out = 100, 64, 160
    x, W, b = (torch.randn(*s, dtype=torch.float64).to(DEV, dtype) for s in ((N, d_in), (d_out, d_in), (d_out,)))
    A = torch.randn(q, d_in, dtype=torch.float64).to(DEV, dtype)
    Bt = torch.randn(q, d_out, dtype=torch.float64).to(DEV, dtype)
    launched = _kernels_launched(triton_fused.fused_linear, x, W, b, A, Bt.t(), 0.7, cfg, True)
    (kernel, _, meta), = launched
    assert meta["BLOCK_R"] == triton_fused.rank_block(q) == max(8, q)
    assert kernel is (triton_fused._fused_lsr_tma_kernel if tma else triton_fused._fused_lsr_kernel)
    y, t = triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, cfg, want_t=True)
    xd = x.double()
    _rel_close(y, xd @ W.double().T + b.double() + 0.7 * (xd @ A.double().T) @ Bt.double(), tol)
    _rel_close(t, xd @ A.double().T, tol)


def test_what_the_gpu_runs_of_these_tests_fits_sm90():
    """Every config the tests above run on an H200, after their pruning, compiled here for sm_90: it fits (no
    OutOfResources there), and the pruning has teeth: fp32's TMA points are pruned, bf16's all run."""
    limit = triton_fused.SHARED_LIMIT[90]
    runs = []
    for op in ("forward", "backward"):
        space = triton_fused.schedule_spaces.space(triton_fused.SPACE, op, "fused")
        key, points = every_point_configs("float32-ragged", op, capability=90)
        assert 2 <= len(points) < len(space)
        runs += [(op, key, c) for c in points]
        key, points = every_point_configs("bfloat16-aligned", op, capability=90)
        assert points == space
        runs += [(op, key, c) for c in points]
    for dtype in (torch.float32, torch.bfloat16):
        for cfg in TMA_POINTS:
            keys = tma_case_keys(dtype)
            if all(pruned(op, key, cfg, 90) is None for op, key in keys.items()):
                runs += [(op, key, cfg) for op, key in keys.items()]
            else:
                assert dtype == torch.float32, (cfg, dtype)
        for q in (3, 8, 16):
            for tma in (0, 1):
                cfg, key = dict(TMA_POINTS[1], TMA=tma), rank_case_key(q, dtype)
                if pruned("forward", key, cfg, 90) is None:
                    runs.append(("forward", key, cfg))
                else:  # fp32 128x128 tiles spill (pointers) or overflow shared memory (TMA) on sm_90
                    assert dtype == torch.float32, (q, cfg)
    assert sum(k.dtype == "bfloat16" and bool(c.get("TMA")) for _, k, c in runs) >= 2 * len(TMA_POINTS)
    for op, key, cfg in runs:
        r = triton_fused.compile_report(op, key, cfg, 90)
        assert r.problem(limit) is None, (op, key, cfg, r)


def test_wave_shape_trades_rank_work_against_l2():
    """The persistent launch's wave on an H200 (132 SMs, 50 MiB L2), bf16, 128x128 tiles."""
    H200 = dict(programs=triton_fused.H200_SMS, l2_bytes=triton_fused.H200_L2)
    block = lambda k: 128 * k * 2  # noqa: E731  bytes of a 128-row (or column) block over the whole K
    # 4096², N = 8192: 64 x 32 tiles. 16 x 8 fits half the L2 (24 MiB) and computes x Aᵀ 8 times per row
    # block instead of 32: 16.25 tile-times against the grouped order's 16 waves x (1 + 1/16)
    assert triton_fused.wave_shape(64, 32, row_bytes=block(4096), col_bytes=block(4096), t_share=8 / 128,
                                   **H200) == (16, 8)
    # 768², N = 8192: 64 x 6 tiles, every row block fits: two column waves of 64 rows (128 programs)
    assert triton_fused.wave_shape(64, 6, row_bytes=block(768), col_bytes=block(768), t_share=8 / 128,
                                   **H200) == (64, 2)
    # no x Aᵀ to save (t_share 0) and everything fits: as few tile-times as possible
    wm, wn = triton_fused.wave_shape(64, 32, row_bytes=block(64), col_bytes=block(64), t_share=0.0, **H200)
    assert wm * wn <= 132 and -(-64 // wm) * -(-32 // wn) == 16
    # a K so deep that no wave fits: the smallest footprint (near square), never more programs than SMs
    wm, wn = triton_fused.wave_shape(64, 64, row_bytes=block(65536), col_bytes=block(65536), t_share=8 / 128,
                                     **H200)
    assert wm * wn <= 132 and wm + wn == min(min(64, 132 // n) + n for n in range(1, 65))
    # never wider than the problem
    assert triton_fused.wave_shape(3, 2, row_bytes=1, col_bytes=1, t_share=0.1, **H200) == (3, 2)


def test_tma_point_on_unaligned_rows_runs_the_pointer_kernel():
    dims, N = DIMS[0], 37  # d_in 42: rows of 168 B in fp32 are not 16-byte aligned
    x, W, b, factors = make_layer_inputs(N, *dims, dtype=torch.float32, device=DEV)
    A, Bt = formulations.build_A(*factors[:2]), formulations.build_Bt(*factors[2:])
    launched = _kernels_launched(triton_fused.fused_linear, x, W, b, A, Bt.t(), 0.7, TMA_POINTS[0], False)
    assert [k for k, _, _ in launched] == [triton_fused._fused_lsr_kernel]
    y = triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, TMA_POINTS[0])
    _rel_close(y, reference.lsr_linear(x.double(), W.double(), b.double(), *[f.double() for f in factors], 0.7),
               TOL["float32"])


def test_strided_views_are_read_in_place():
    r = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEV)  # noqa: E731
    a = r(40, 64)[:, ::2]  # non-contiguous rows
    Mt, P, Q = r(20, 32), r(3, 32), r(20, 3)
    cfg = triton_fused.schedule_spaces.default("triton_cuda", "forward", "fused", "float64")
    out, t = triton_fused.fused_linear(a, Mt.T.contiguous().T, None, P, Q, 0.5, cfg, want_t=True)
    torch.testing.assert_close(out, a @ Mt.T + 0.5 * (a @ P.T) @ Q.T)
    torch.testing.assert_close(t, a @ P.T)


def test_bad_inputs():
    r = lambda *s: torch.randn(*s, device=DEV)  # noqa: E731
    a = r(4, 8)
    with pytest.raises(ValueError, match="do not chain"):
        triton_fused.fused_linear(a, r(5, 9), None, r(2, 8), r(5, 2), 1.0, {})
    with pytest.raises(ValueError, match="supports"):
        triton_fused.fused_linear(a.int(), r(5, 8).int(), None, r(2, 8).int(), r(5, 2).int(), 1.0, {})
    if DEV.type == "cuda":
        with pytest.raises(ValueError, match="different devices"):
            triton_fused.fused_linear(a, r(5, 8).cpu(), None, r(2, 8), r(5, 2), 1.0, {})


def test_layer_through_lsr_op_with_triton_backend_values_and_grads():
    layer = strong_adapters(lc.LSRLinear(42, 45, config=lc.LSRConfig(s=3, r=(2, 3))).double().to(DEV))
    x = torch.randn(2, 9, 42, dtype=torch.float64, device=DEV, requires_grad=True)
    assert adapter_share(lambda: layer(x), layer) > 1e-3
    with lc.use_backend("triton"):
        y = layer(x)
        y.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in (layer.A1, layer.A2, layer.B1, layer.B2)]
    x.grad = None
    for p in (layer.A1, layer.A2, layer.B1, layer.B2):
        p.grad = None
    want_y = reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
    want_y.square().sum().backward()
    torch.testing.assert_close(y, want_y)
    for g, w in zip(got, [x.grad] + [p.grad for p in (layer.A1, layer.A2, layer.B1, layer.B2)]):
        assert w.abs().max() > 1e-3  # every gradient far above fp64's tolerance
        torch.testing.assert_close(g, w)


def test_compiled_model_with_triton_backend_has_no_graph_break():
    model = tiny_bert(layers=1)
    lc.apply_lsr(model, lc.LSRConfig(s=2, r=2), target_modules=("query", "value"))
    model, ids = strong_adapters(model, gain=10).to(DEV), tokens(2, 8).to(DEV)
    assert adapter_share(lambda: model(input_ids=ids).logits, model) > 100 * 1e-5
    with lc.use_backend("triton"):
        explanation = torch._dynamo.explain(model)(input_ids=ids)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(input_ids=ids).logits
    torch.testing.assert_close(out, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_tma_point_on_no_tokens_runs_the_pointer_kernel():
    """An empty batch has no TMA descriptor (every dimension must be positive): the pointer kernel's empty
    launch, an empty output and t."""
    x, W = torch.randn(0, 64, device=DEV), torch.randn(64, 64, device=DEV)
    A, Bt = torch.randn(8, 64, device=DEV), torch.randn(8, 64, device=DEV)
    launched = _kernels_launched(triton_fused.fused_linear, x, W, None, A, Bt.t(), 0.7, TMA_POINTS[0], False)
    assert [k for k, _, _ in launched] == [triton_fused._fused_lsr_kernel]
    y, t = triton_fused.fused_linear(x, W, None, A, Bt.t(), 0.7, TMA_POINTS[0], want_t=True)
    assert y.shape == (0, 64) and t.shape == (0, 8)
