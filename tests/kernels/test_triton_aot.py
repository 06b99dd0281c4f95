"""Every Triton config compiled ahead of time for the H200 (sm_90) on this CPU machine, with the Triton in this
environment (3.7 with the project's pins, 3.6 in the GPU-image environment): ptxas accepts it, nothing spills,
shared memory fits, bf16/fp16 use Hopper's wgmma. A GPU never sees a config that fails here."""
import pytest
import torch

from lsr_compile import kernels, schedule_spaces
from lsr_compile.kernels import triton_fused
from lsr_compile.problem import ProblemKey

pytest.importorskip("triton")

SM90 = 90
LIMIT = triton_fused.SHARED_LIMIT[SM90]
# (s, r1, r2, n1, n2, m1, m2): a 16-aligned 4096² layer (q = 8), and ragged sizes (no 16-byte alignment)
ALIGNED = (4, 2, 4, 64, 64, 64, 64)
RAGGED = (3, 2, 3, 6, 7, 5, 9)


def _report(op, dtype, dims, cfg, tokens=8192):
    return triton_fused.compile_report(op, ProblemKey(op, dtype, tokens, *dims), cfg, SM90)


POINTS = [(op, cfg) for op in ("forward", "backward") for cfg in schedule_spaces.space("triton_cuda", op, "fused")]


@pytest.mark.parametrize("op,cfg", POINTS, ids=[f"{op}-" + "x".join(str(c[k]) for k in triton_fused.KNOBS)
                                               + ("-tma" if c.get("TMA") else "") for op, c in POINTS])
def test_every_point_fits_sm90_in_bf16_and_uses_wgmma(op, cfg):
    r = _report(op, "bfloat16", ALIGNED, cfg)
    assert r.problem(LIMIT) is None, r
    assert r.tensor_cores == "wgmma" or cfg["BLOCK_M"] < 64, r  # wgmma needs 64-row tiles
    assert 0 < r.registers <= 255 and r.shared > 0
    assert r.tma == bool(cfg.get("TMA")), r  # TMA points move tiles by cp.async.bulk.tensor, the others never


def test_tma_points_are_candidates_only_where_rows_are_aligned():
    aligned = triton_fused.candidates("forward", ProblemKey("forward", "bfloat16", 8192, *ALIGNED))
    ragged = triton_fused.candidates("forward", ProblemKey("forward", "bfloat16", 8192, *RAGGED))
    fp64 = triton_fused.candidates("forward", ProblemKey("forward", "float64", 8192, *ALIGNED))
    assert sum(bool(c.get("TMA")) for _, _, c in aligned) == 3
    assert not any(c.get("TMA") for _, _, c in ragged + fp64) and len(ragged) == len(aligned) - 3


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dims", [ALIGNED, RAGGED], ids=["aligned", "ragged"])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_fp32_and_fp64_defaults_fit_aligned_and_ragged_problems(op, dims, dtype):
    cfg = schedule_spaces.default("triton_cuda", op, "fused", dtype)
    r = _report(op, dtype, dims, cfg, tokens=512)
    assert r.problem(LIMIT) is None, (cfg, r)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_half_default_on_a_gpu_is_the_first_point_that_fits(op, dtype):
    """Aligned: the declared default. Ragged (no wgmma, more registers): a smaller point that does not spill."""
    aligned = triton_fused.fitting_default(op, ProblemKey(op, dtype, 8192, *ALIGNED), SM90)
    assert aligned == schedule_spaces.default("triton_cuda", op, "fused", dtype)
    ragged = triton_fused.fitting_default(op, ProblemKey(op, dtype, 512, *RAGGED), SM90)
    assert _report(op, dtype, RAGGED, ragged, tokens=512).problem(LIMIT) is None


def test_problems_are_reported_not_hidden():
    """An fp32 128x256 tile spills and a 64x256x64 fp32 tile overflows shared memory: both are named."""
    spill = _report("forward", "float32", ALIGNED, dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8,
                                                         num_warps=8, num_stages=3))
    assert "spills" in spill.problem(10**9)
    big = _report("forward", "float32", ALIGNED, dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8,
                                                       num_warps=8, num_stages=4))
    assert big.shared > LIMIT and "shared memory" in big.problem(LIMIT)


def test_static_problem_is_silent_off_the_gpu():
    key = ProblemKey("forward", "float32", 512, *ALIGNED)
    cfg = schedule_spaces.default("triton_cuda", "forward", "fused")
    assert kernels.static_problem("triton", "forward", "fused", cfg, key, torch.device("cpu")) is None


MIXED = schedule_spaces.space("triton_cuda", "mixed_forward", "gathered")


@pytest.mark.parametrize("cfg", MIXED, ids=["x".join(str(v) for v in c.values()) for c in MIXED])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_mixed_batch_point_fits_sm90(cfg, dtype):
    """The mixed-batch kernel (4096², K = 512, 64 segments, N = 8192): ptxas accepts it, nothing spills, shared
    memory fits, bf16 runs on tensor cores."""
    from lsr_compile.config import FactorShapes
    from lsr_compile.kernels import triton_mixed

    key = ProblemKey.of("mixed_forward", dtype, 8192, FactorShapes(*ALIGNED), adapters=512, segments=64)
    r = triton_mixed.compile_report(key, cfg, SM90)
    assert r.problem(LIMIT) is None, r
    assert r.tensor_cores in ("wgmma", "mma"), r
    assert 0 < r.registers <= 255


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("dims", [ALIGNED, RAGGED], ids=["aligned", "ragged"])
def test_mixed_batch_fp32_fp64_defaults_fit(dims, dtype):
    from lsr_compile.config import FactorShapes
    from lsr_compile.kernels import triton_mixed

    key = ProblemKey.of("mixed_forward", dtype, 512, FactorShapes(*dims), adapters=8, segments=16)
    cfg = schedule_spaces.default("triton_cuda", "mixed_forward", "gathered", dtype)
    r = triton_mixed.compile_report(key, cfg, SM90)
    assert r.problem(LIMIT) is None, r


# ---- the Kronecker parts around cuBLAS (kernels/triton_parts.py) ---------------------------------------------

def _parts_points():
    from lsr_compile.kernels import triton_parts

    return [(op, v, cfg) for op in ("forward", "backward") for v in triton_parts.VARIANTS
            for cfg in schedule_spaces.space("triton_cuda", op, v)]


PARTS_POINTS = _parts_points()


@pytest.mark.parametrize("op,variant,cfg", PARTS_POINTS,
                         ids=[f"{op}-{v}-" + "x".join(str(x) for x in c.values()) for op, v, c in PARTS_POINTS])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_parts_point_fits_sm90(op, variant, cfg, dtype):
    """Every kernel a step variant launches (factors, fold, the pass over dy, the projection), for the 4096²
    layer at N = 8192, compiled for sm_90: no spills, shared memory fits; the fold and the pass over dy, the
    two that touch W, x or dy, use tensor cores."""
    from lsr_compile.kernels import triton_parts

    reports = triton_parts.compile_reports(op, variant, ProblemKey(op, dtype, 8192, *ALIGNED), cfg, SM90)
    assert reports, "the variant launches no Triton kernel"
    for name, r in reports.items():
        assert r.problem(LIMIT) is None, (name, r)
        assert 0 < r.registers <= 255, (name, r)
        if name in ("_fold_kernel", "_dy_pass_kernel"):
            assert r.tensor_cores in ("wgmma", "mma"), (name, r)


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("dims", [ALIGNED, RAGGED], ids=["aligned", "ragged"])
@pytest.mark.parametrize("variant", ["fold", "materialise"])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_parts_defaults_fit_every_dtype(op, variant, dims, dtype):
    """The untuned config a GPU picks fits: the dtype's default where it does (fp32, fp64; bf16 aligned), else
    the first point that does (bf16 ragged: no vector loads, more registers)."""
    from lsr_compile.kernels import triton_parts

    key = ProblemKey(op, dtype, 512, *dims)
    cfg = triton_parts.fitting_config(op, variant, key, SM90)
    if dtype != "bfloat16" or dims == ALIGNED:
        assert cfg == schedule_spaces.default("triton_cuda", op, variant, dtype)
    for name, r in triton_parts.compile_reports(op, variant, key, cfg, SM90).items():
        assert r.problem(LIMIT) is None, (name, cfg, r)


def test_a_fold_step_launches_the_kernels_the_plan_says():
    """The fold variant's Triton launches, in order: the forward folds (from the factors) and the backward folds
    again, passes over dy once and projects once."""
    from lsr_compile.kernels import triton_parts

    key = ProblemKey("forward", "bfloat16", 8192, *ALIGNED)
    fwd = triton_parts.build("forward", "fold", {}, key, "meta")
    bwd = triton_parts.build("backward", "fold", {}, key.__class__(**{**key.as_dict(), "op": "backward"}), "meta")
    names = lambda fn, args: [getattr(k, "__name__", None) or k.fn.__name__  # noqa: E731
                              for k, *_ in triton_parts.launches(fn, *args)]
    assert names(fwd, triton_parts.example_args("forward", key)) == ["_fold_kernel"]
    bkey = key.__class__(**{**key.as_dict(), "op": "backward"})
    assert names(bwd, triton_parts.example_args("backward", bkey)) == ["_fold_kernel", "_dy_pass_kernel",
                                                                      "_project_kernel"]
    assert names(bwd, triton_parts.example_args("backward", bkey, keep_folded=True)) == ["_dy_pass_kernel",
                                                                                        "_project_kernel"]
