"""What a GPU does that Triton's interpreter hides, checked on this CPU: launches on the tensors' own device
(fake CUDA tensors on cuda:1 while cuda:0 is current), half precision without the interpreter's upcast (a GPU's
argument dtypes, ``triton_fused.gpu_arguments``), offsets past 2³¹ elements, operands at any strides, how the
pass over dy's partial sums and the mixed batch's ``x A_kᵀ`` scale with the problem (the cost model sees both),
and the host's work per call. On a GPU the same tests run compiled."""
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lsr_compile import costmodel, formulations, mixed_formulations as mf, step
from lsr_compile.config import FactorShapes
from lsr_compile.kernels import triton_fused, triton_mixed, triton_parts
from lsr_compile.tuning.harness import TOL

from conftest import make_layer_inputs

pytestmark = pytest.mark.skipif(not triton_fused.INTERPRETED and not torch.cuda.is_available(),
                                reason="Triton needs a GPU or TRITON_INTERPRET=1")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MIXED_CFG = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)


def _rel_err(got, want) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# ---- 1. every launch on its tensors' device ---------------------------------------------------------------

@pytest.fixture
def on_cuda_1(monkeypatch):
    """Fake CUDA tensors on cuda:1 while device 0 is current, and nothing run: ``torch.cuda.device`` is a
    stand-in guard that keeps the "current device", Triton's launcher records it at each launch,
    ``get_device_properties`` answers an H200's SMs and L2. Yields (a tensor maker, the launches seen)."""
    current = [0]

    class Guard:
        def __init__(self, device):
            self.index = device if isinstance(device, int) else torch.device(device).index

        def __enter__(self):
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    from triton.runtime import interpreter, jit

    seen = []
    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: types.SimpleNamespace(multi_processor_count=132, L2_cache_size=60 * 2**20))
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        monkeypatch.setattr(cls, "run", lambda self, *a, **k: seen.append(
            (getattr(self, "__name__", None) or self.fn.__name__, current[0])))
    triton_fused._cuda_machine.cache_clear()
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield (lambda *s, dtype=torch.bfloat16: torch.empty(*s, device="cuda:1", dtype=dtype)), seen, current
    triton_fused._cuda_machine.cache_clear()


def test_every_triton_launch_runs_under_its_tensors_device(on_cuda_1):
    """The fused GEMM (pointers and TMA), the four Kronecker parts and the mixed batch's kernel, called with
    tensors on cuda:1 while cuda:0 is current: each launch happens with cuda:1 current (Triton launches on the
    current device and its current stream), and cuda:0 is current again afterwards."""
    e, seen, current = on_cuda_1
    x, W, b, A, Bt = e(64, 64), e(128, 64), e(128), e(8, 64), e(8, 128)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, cfg, True)
    triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, dict(cfg, TMA=1), True)
    factors = [e(2, 2, 8), e(2, 4, 8), e(2, 16, 2), e(2, 8, 4)]
    parts = triton_parts.TritonParts()
    parts.factors(*factors)
    parts.fold(W, A, Bt, 0.7)
    uT, partial = parts.dy_pass(e(64, 128), Bt, e(8, 64))
    parts.project(e(8, 64), partial, *factors, 0.7)
    triton_mixed.mixed_adapter_add(e(64, 128), x, e(4, 8, 64), e(4, 8, 128), e(4, dtype=torch.float32),
                                   e(5, dtype=torch.int64), e(4, dtype=torch.int64), MIXED_CFG)
    assert [name for name, _ in seen] == ["_fused_lsr_kernel", "_fused_lsr_tma_kernel", "_factors_kernel",
                                          "_fold_kernel", "_dy_pass_kernel", "_project_kernel", "_mixed_lsr_kernel"]
    assert {dev for _, dev in seen} == {1}
    assert current[0] == 0


def test_tvm_cuda_calls_run_on_their_tensors_device_and_stream(on_cuda_1):
    """A TVM-CUDA function is called under its tensors' device guard, and takes PyTorch's current stream
    (``tvm_ffi.use_torch_stream``, which reads the *current* device's) inside it."""
    from contextlib import contextmanager

    from lsr_compile.kernels import tvm_kernels

    e, _, current = on_cuda_1
    streams, calls = [], []

    @contextmanager
    def use_torch_stream():
        streams.append(current[0])
        yield

    fn = tvm_kernels.on_tensors_stream(lambda *args: calls.append(current[0]), use_torch_stream)
    fn(e(4, 8), e(8, 8))
    assert streams == [1] and calls == [1] and current[0] == 0


# ---- 2. half precision: the scale stays fp32 --------------------------------------------------------------

def _large_alpha_problem(dtype):
    """fp16 operands, scale 30000/√8 (a large alpha): scale·(x Aᵀ) is far past fp16's 65504, the output is not."""
    x = torch.randn(64, 64, dtype=torch.float64)
    W = torch.randn(64, 64, dtype=torch.float64) / 8
    A, Bt = torch.randn(8, 64, dtype=torch.float64), torch.randn(8, 64, dtype=torch.float64) * 0.02
    scale = 30000 / 8 ** 0.5
    want = x @ W.T + scale * (x @ A.T) @ Bt
    assert (scale * (x @ A.T)).abs().max() > 65504 > 2 * want.abs().max()
    return [t.to(DEV, dtype) for t in (x, W, A, Bt)], scale, want


@pytest.mark.parametrize("tma", [0, 1])
def test_fp16_with_a_large_alpha_stays_finite(tma):
    """Under a GPU's argument dtypes (no upcast: the interpreter's hid it), the fused kernel's epilogue
    rounded scale·t to fp16 before its dot: every output inf. ATen applies the scale in fp32, and so does the
    kernel now."""
    (x, W, A, Bt), scale, want = _large_alpha_problem(torch.float16)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, TMA=tma)
    with triton_fused.gpu_arguments():
        y = triton_fused.fused_linear(x, W, None, A, Bt.t(), scale, cfg)
    assert torch.isfinite(y).all()
    assert _rel_err(y, want) < TOL["float16"]


def test_fp16_with_a_large_alpha_stays_finite_in_a_mixed_batch():
    (x, W, A, Bt), scale, want = _large_alpha_problem(torch.float16)
    ptr, ad = mf.segments_of([20, 24, 20], [0, -1, 1], device=DEV)
    base = (x.double() @ W.double().T)
    y = base.to(torch.float16)
    scales = torch.tensor([scale, scale / 2], device=DEV)
    with triton_fused.gpu_arguments():
        triton_mixed.mixed_adapter_add(y, x, torch.stack([A, A]), torch.stack([Bt, Bt]), scales, ptr, ad, MIXED_CFG)
    want = base.clone()
    adapter = (x.double() @ A.double().T) @ Bt.double()
    want[:20] += scale * adapter[:20]
    want[44:] += scale / 2 * adapter[44:]
    assert torch.isfinite(y).all()
    assert _rel_err(y, want) < TOL["float16"]


# ---- 3. offsets past 2³¹ elements -------------------------------------------------------------------------

def _rows_past_2_31(rows=3, cols=64, dtype=torch.float16):
    """A (rows, cols) view with a row stride of 2³⁰ elements, 2³¹ elements into one allocation: row 2 starts
    at element 2³¹ of the view, where int32 offsets wrap to -2³¹, still inside the allocation (a wrap reads the
    wrong numbers instead of faulting). 8 GiB of address space; only the rows' pages are touched."""
    try:
        buf = torch.empty(2**32 + cols, dtype=dtype, device=DEV)
    except (RuntimeError, MemoryError) as e:  # no room for the address space (a strict overcommit policy)
        pytest.skip(f"cannot reserve 8 GiB of address space here: {e}")
    view = buf[2**31:].as_strided((rows, cols), (2**30, 1))
    view.copy_(torch.randn(rows, cols, dtype=torch.float64).to(dtype))
    return view


def test_fused_kernel_offsets_are_64_bit():
    """x with rows past 2³¹ elements (as 524,288 tokens of 4096 are): its third row read where it is."""
    x = _rows_past_2_31()
    W, A = torch.randn(48, 64, device=DEV).half(), torch.randn(8, 64, device=DEV).half()
    Bt = torch.randn(8, 48, device=DEV).half()
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    y = triton_fused.fused_linear(x, W, None, A, Bt.t(), 0.5, cfg)
    xd = x.double()
    assert _rel_err(y, xd @ W.double().T + 0.5 * (xd @ A.double().T) @ Bt.double()) < TOL["float16"]


def test_dy_pass_and_fold_offsets_are_64_bit():
    """The pass over dy (dy rows past 2³¹ elements) and the fold (W's rows there, read in place)."""
    dy = _rows_past_2_31()
    Bt, tT = torch.randn(8, 64, device=DEV).half(), torch.randn(8, 3, device=DEV).half()
    uT, part = triton_parts.TritonParts().dy_pass(dy, Bt, tT)
    assert _rel_err(uT, Bt.double() @ dy.double().T) < TOL["float16"]
    assert _rel_err(part.sum(0), tT.double() @ dy.double()) < TOL["float16"]
    W, A, Bt = _rows_past_2_31(), torch.randn(8, 64, device=DEV).half(), torch.randn(8, 3, device=DEV).half()
    got = triton_parts.TritonParts().fold(W, A, Bt, 0.7)
    assert _rel_err(got, W.double() + 0.7 * Bt.double().T @ A.double()) < TOL["float16"]


def test_mixed_kernel_offsets_are_64_bit():
    x = _rows_past_2_31()
    A, Bt = torch.randn(2, 8, 64, device=DEV).half(), torch.randn(2, 8, 32, device=DEV).half()
    ptr, ad = mf.segments_of([1, 2], [1, 0], device=DEV)
    y = torch.zeros(3, 32, device=DEV, dtype=torch.float16)
    triton_mixed.mixed_adapter_add(y, x, A, Bt, torch.tensor([0.5, 2.0], device=DEV), ptr, ad, MIXED_CFG)
    xd = x.double()
    want = torch.cat([2.0 * (xd[:1] @ A[1].double().T) @ Bt[1].double(),
                      0.5 * (xd[1:] @ A[0].double().T) @ Bt[0].double()])
    assert _rel_err(y, want) < TOL["float16"]


# ---- 5. the pass over dy's partial sums -------------------------------------------------------------------

def _backward_parts_calls(N):
    f = FactorShapes(4, 2, 4, 64, 64, 64, 64)
    e = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    factors = [e(*s) for s in f.factor_sizes().values()]
    parts = triton_parts.TritonParts()

    def run():
        _, partial = parts.dy_pass(e(N, 4096), e(8, 4096), e(8, N))
        parts.project(e(8, 4096), partial, *factors, 0.7)
    return {c.name: c for c in costmodel.trace(run) if c.source == "triton"}


def test_partial_sums_and_the_projection_stop_growing_with_tokens():
    """At most one partial sum per SM (132 on an H200) whatever N, each program taking several row blocks; the
    projection reads them 32 at a time, so its longest program waits for memory the same 64 times at 8192 and
    at 131072 tokens (it was 16 tiles x one load per partial: 2,048 at 8192), and the cost model prices those
    waits (``Call.waits``): ~15 µs predicted for the projection at 4096², N = 8192."""
    with triton_fused.gpu_arguments():  # a GPU's 64-row blocks, the H200's 132 SMs
        assert triton_parts.dy_pass_programs(8192, triton_parts.DEFAULT, "meta") == (128, 1)
        assert triton_parts.dy_pass_programs(131072, triton_parts.DEFAULT, "meta") == (128, 16)
    small, large = _backward_parts_calls(8192), _backward_parts_calls(131072)
    assert small["_project_kernel"].waits == large["_project_kernel"].waits == 64
    assert small["_project_kernel"].bytes == large["_project_kernel"].bytes
    project_us = costmodel.price([small["_project_kernel"]], costmodel.H200).gpu_us
    assert 64 * costmodel.H200.round_trip_us <= project_us - costmodel.H200.kernel_us < 20
    assert large["_dy_pass_kernel"].waits > 0 == small["_dy_pass_kernel"].waits  # read-modify-writes of its partial


def test_projection_adds_more_partial_sums_than_it_reads_at_once():
    """P = 40 partial sums (more than the 32 read together, with a masked remainder) against ATen's."""
    x, W, b, factors = make_layer_inputs(45, 3, 2, 3, 6, 7, 5, 9, dtype=torch.float64, device=DEV)
    A, Bt = step.ATEN.factors(*factors)
    dA = torch.randn(A.shape, dtype=torch.float64, device=DEV)
    partial = torch.randn(40, *Bt.shape, dtype=torch.float64, device=DEV)
    got = triton_parts.TritonParts().project(dA, partial, *factors, 0.7)
    for g, w in zip(got, step.ATEN.project(dA, partial, *factors, 0.7)):
        torch.testing.assert_close(g, w)


def test_dy_pass_programs_take_several_row_blocks():
    """More row blocks than programs (three in the interpreter, the SMs on a GPU): each program walks
    several, and the partial sums still add up."""
    x, W, b, factors = make_layer_inputs(3000, 2, 2, 3, 4, 5, 6, 7, dtype=torch.float64, device=DEV)
    dy = torch.randn(3000, W.shape[0], dtype=torch.float64, device=DEV)
    A, Bt = step.ATEN.factors(*factors)
    tT = A @ x.T
    programs, rows = triton_parts.dy_pass_programs(3000, triton_parts.DEFAULT, DEV)
    assert rows > 1
    uT, part = triton_parts.TritonParts().dy_pass(dy, Bt, tT)
    assert part.shape[0] == programs
    torch.testing.assert_close(uT, Bt @ dy.T)
    torch.testing.assert_close(part.sum(0), tT @ dy)


# ---- 6. the mixed batch: x A_kᵀ once per row tile ---------------------------------------------------------

def test_mixed_columns_are_shared_only_where_tiles_do_not_fill_the_gpu():
    assert triton_mixed.column_groups(193, 32, 132) == 1  # N = 8192, 64 segments: x A_kᵀ once per tile
    assert triton_mixed.column_groups(66, 32, 132) == 2  # decoding, 64 one-token requests
    assert triton_mixed.column_groups(2, 32, 132) == 32  # one short request: every column block its program


def test_the_cost_model_sees_the_mixed_kernel_compute_x_a_once_per_tile():
    """4096², K = 512 adapters, 64 segments, N = 8192, bf16: the launch goes through ``triton_fused.launch``
    (so a trace records it instead of running it), one program per row tile (a grid of 64 + 8192/64 + 1
    tiles by one column group), and its FLOPs count ``x A_kᵀ`` once (16 wide: the padded rank) where the old
    grid computed it for each of 32 column blocks."""
    e = lambda *s, dtype=torch.bfloat16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    N, d, S = 8192, 4096, 64
    factors = [e(512, 4, 2, 64), e(512, 4, 4, 64), e(512, 4, 64, 2), e(512, 4, 64, 4)]
    calls = costmodel.trace(triton_mixed.forward, e(N, d), e(d, d), e(d), *factors, e(512, dtype=torch.float32),
                            e(S + 1, dtype=torch.int64), e(S, dtype=torch.int64), MIXED_CFG)
    (mixed,) = [c for c in calls if c.source == "triton"]
    assert mixed.name == "_mixed_lsr_kernel"
    assert mixed.flops == 2.0 * N * d * 16 * 1 + 2.0 * N * d * 16
    assert mixed.bytes >= 3 * N * d * 2  # x read once, y read and written
    assert not any(c.name in ("searchsorted", "cumsum") for c in calls)  # the tiles are found on the device


def test_mixed_kernel_walks_every_column_block_of_its_tile():
    """d_out = 160 with 32-wide column blocks in the interpreter (5 per tile, all in one program there):
    segments with and without adapters, an empty one and a repeated slot, against the loop formulation."""
    x, W, b, _ = make_layer_inputs(70, 1, 2, 4, 8, 8, 10, 16, dtype=torch.float32, device=DEV)
    K = 3
    factors = [torch.randn(K, *s, dtype=torch.float64).to(DEV, torch.float32) / 4
               for s in ((2, 2, 8), (2, 4, 8), (2, 10, 2), (2, 16, 4))]
    scales = torch.tensor([0.5, 1.5, -2.0], device=DEV)
    ptr, ad = mf.segments_of([9, 0, 20, 17, 24], [2, 0, -1, 0, 1], device=DEV)
    got = triton_mixed.forward(x, W, b, *factors, scales, ptr, ad, dict(MIXED_CFG, BLOCK_M=32))
    want = mf.FORWARDS["loop"](x.double(), W.double(), b.double(), *[f.double() for f in factors],
                               scales.double(), ptr, ad)
    assert _rel_err(got, want) < TOL["float32"]


# ---- 7. the host's work per call ---------------------------------------------------------------------------

def test_the_tma_launch_is_planned_once_per_signature(on_cuda_1, monkeypatch):
    """What depends only on shapes is worked out once: repeated TMA calls ask the device's properties once
    (they were asked, and the wave searched, on every call), and build their descriptors from the plan."""
    e, seen, _ = on_cuda_1
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: asked.append(d) or types.SimpleNamespace(
        multi_processor_count=132, L2_cache_size=60 * 2**20))
    triton_fused._plans.clear()
    triton_fused.wave_shape.cache_clear()
    x, W, b, A, Bt = e(4096, 1024), e(1024, 1024), e(1024), e(8, 1024), e(8, 1024)
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, TMA=1)
    for _ in range(5):
        triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, cfg, True)
    assert [name for name, _ in seen] == ["_fused_lsr_tma_kernel"] * 5
    assert len(asked) == 1 and triton_fused.wave_shape.cache_info().misses == 1


def test_a_mixed_batch_issues_no_aten_call_for_its_tiles():
    """The mixed forward's host work: the base GEMM and the bank (gathered per segment, A and Bᵀ formed),
    no ATen calls to lay out tiles (there were 20: the kernel finds its tile from seg_indptr)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    e = lambda *s, dtype=torch.bfloat16: torch.empty(*s, device="meta", dtype=dtype)  # noqa: E731
    args = (e(64, 128), e(128, 128), e(128), e(16, 2, 2, 16), e(16, 2, 4, 8), e(16, 2, 16, 2), e(16, 2, 8, 4),
            e(16, dtype=torch.float32), e(9, dtype=torch.int64), e(8, dtype=torch.int64), MIXED_CFG)
    with triton_fused.gpu_arguments(), Count() as count:
        costmodel.trace(triton_mixed.forward, *args)
    assert len(count.names) <= 24 and not {"searchsorted", "cumsum", "arange"} & set(count.names), count.names


# ---- 8. operands at any strides ---------------------------------------------------------------------------

def test_fold_reads_a_column_major_bt_and_a_transposed_w():
    """``_fold`` assumed A and Bᵀ contiguous: a column-major Bᵀ (``B.t()`` of a contiguous B) gave a maximum
    error of 9.6. Now strides for W, A and Bᵀ, W read in place (no copy), the folded weight contiguous."""
    x, W, b, factors = make_layer_inputs(8, 3, 2, 3, 6, 7, 5, 9, dtype=torch.float32, device=DEV)
    A, Bt = step.ATEN.factors(*factors)
    Bt_cm = Bt.t().contiguous().t()
    W_t = W.t().contiguous().t()
    A_cm = A.t().contiguous().t()
    assert not Bt_cm.is_contiguous() and not W_t.is_contiguous()
    got = triton_parts.TritonParts().fold(W_t, A_cm, Bt_cm, 0.7)
    torch.testing.assert_close(got, step.ATEN.fold(W, A, Bt, 0.7))
    assert got.is_contiguous()


@pytest.mark.parametrize("tma", [0, 1])
def test_fused_kernel_reads_a_strided_bias(tma):
    x, W = torch.randn(40, 64, device=DEV), torch.randn(48, 64, device=DEV)
    A, Bt = torch.randn(8, 64, device=DEV), torch.randn(8, 48, device=DEV)
    b = torch.randn(48, 2, device=DEV)[:, 1]  # stride 2
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, TMA=tma)
    y = triton_fused.fused_linear(x, W, b, A, Bt.t(), 0.7, cfg)
    torch.testing.assert_close(y, x @ W.T + b + 0.7 * (x @ A.T) @ Bt, atol=1e-4, rtol=1e-4)


def test_mixed_kernel_reads_strided_scales_and_segments():
    x, A, Bt = torch.randn(30, 64, device=DEV), torch.randn(2, 8, 64, device=DEV), torch.randn(2, 8, 32, device=DEV)
    ptr, ad = mf.segments_of([10, 12, 8], [1, -1, 0], device=DEV)
    ptr_s = torch.stack([ptr, ptr], 1)[:, 0]  # stride 2
    ad_s = torch.stack([ad, ad], 1)[:, 0]
    scales = torch.tensor([[0.5, 9.0], [2.0, 9.0]], device=DEV)[:, 0]
    assert ptr_s.stride(0) == ad_s.stride(0) == scales.stride(0) == 2
    y = torch.zeros(30, 32, device=DEV)
    triton_mixed.mixed_adapter_add(y, x, A, Bt, scales, ptr_s, ad_s, dict(MIXED_CFG, BLOCK_M=16))
    want = torch.zeros(30, 32, dtype=torch.float64, device=DEV)
    xd = x.double()
    want[:10] = 2.0 * (xd[:10] @ A[1].double().T) @ Bt[1].double()
    want[22:] = 0.5 * (xd[22:] @ A[0].double().T) @ Bt[0].double()
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-4)


def test_launch_host_us_measures_every_path():
    """``bench.launch_host_us``, the figures in docs/gpu.md (a short run: it only has to work)."""
    from lsr_compile import bench

    us = bench.launch_host_us(calls=20, rounds=1, device=DEV)
    assert set(us) == {"fused, pointers", "fused, TMA", "mixed forward", "its base GEMM (F.linear)"}
    assert all(v > 0 for v in us.values())
