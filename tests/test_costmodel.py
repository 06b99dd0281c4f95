"""The GPU cost model (lsr_compile/costmodel.py): calibrated on the H200 rows the project committed, and what it
predicts for today's step; and the step's launch and ATen-call budget on CUDA, counted without a GPU."""
import json
from pathlib import Path

import pytest
import torch

from lsr_compile import costmodel as cm
from lsr_compile.config import FactorShapes

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"768x768": FactorShapes(4, 2, 4, 32, 24, 32, 24), "4096x4096": FactorShapes(4, 2, 4, 64, 64, 64, 64)}
N = 8192


def _measured() -> dict:
    """p50 µs of the H200 rows at 9d2c79e, by (shape, mode, provider)."""
    out = {}
    for line in (ROOT / "results/gpu/gpu_check.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "bench":
            out[(f"{r['d_out']}x{r['d_in']}", r["mode"], r["provider"])] = r["p50_ms"] * 1000
    return out


def _old_lsr_step(shape: str, backward: bool):
    """The LSR step the H200 ran at 9d2c79e: its formulations' calls (traced from that code into
    tests/data/lsr_step_9d2c79e.json), its op's machinery, and the four factor gradients the benchmark of
    that run added into existing .grad tensors."""
    old = json.loads((ROOT / "tests/data/lsr_step_9d2c79e.json").read_text())[shape]
    calls = [cm.Call(**c) for c in old["forward"]]
    if not backward:
        return calls, {"module": 1, "op": 1}
    f = SHAPES[shape]
    calls += [cm.Call(**c) for c in old["backward"]]
    calls += [cm.Call("add", "kernel", n, 6.0 * n) for n in (s[0] * s[1] * s[2] for s in f.factor_sizes().values())]
    return calls, {"module": 1, "op": 2, "old_op_autograd": 1, "node": 6, "backward": 1}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_calibrated_on_the_committed_h200_rows(shape, mode):
    """Frozen layer, plain LoRA and the LSR step of that run, each within 10 % of what the H200 measured
    (768²: host-bound; 4096²: GPU-bound, except the old LSR step's backward)."""
    measured = _measured()
    f, bw = SHAPES[shape], mode != "forward"
    steps = {"floor": cm.floor_step(f.d_in, f.d_out, N, torch.bfloat16, bw),
             "lora": cm.lora_step(f.d_in, f.d_out, f.q, N, torch.bfloat16, bw, grads_exist=True),
             "lsr": _old_lsr_step(shape, bw)}
    for provider, (calls, entries) in steps.items():
        predicted = cm.price(calls, cm.H200, entries).us
        want = measured[(shape, mode, provider)]
        assert abs(predicted / want - 1) <= 0.10, (provider, round(predicted, 1), want)


def test_the_old_step_counts_what_the_analysis_counted():
    """30 kernels (26 of the formulations, four gradient additions) at 4096², as the H200 profile analysis
    counted."""
    calls, _ = _old_lsr_step("4096x4096", True)
    assert sum(c.kind == "kernel" for c in calls) == 30


def test_gemm_and_copy_are_priced_by_their_ceilings():
    gemm = cm.Call("mm", "kernel", flops=2 * 8192.0 ** 3, bytes=3 * 8192 ** 2 * 2)
    copy = cm.Call("copy", "kernel", flops=0, bytes=2 ** 30)
    assert cm.price([gemm], cm.H200).gpu_us == pytest.approx(2 * 8192 ** 3 / 776e6 + cm.H200.kernel_us)
    assert cm.price([copy], cm.H200).gpu_us == pytest.approx(2 ** 30 / 4.2e6 + cm.H200.kernel_us)
    assert cm.price([cm.Call("view", "view")], cm.H200).gpu_us == 0


def test_addmm_onto_a_matrix_is_two_kernels():
    """ATen's addmm with a 2-D matrix to add copies it into the output first (two passes over it); a bias
    vector costs nothing extra."""
    W, B, A = (torch.empty(s, device="meta") for s in ((64, 32), (64, 8), (8, 32)))
    calls = cm.trace(torch.addmm, W, B, A)
    assert [c.name for c in calls if c.kind == "kernel"] == ["copy", "addmm"]
    x, b = torch.empty(16, 32, device="meta"), torch.empty(64, device="meta")
    calls = cm.trace(torch.nn.functional.linear, x, W, b)
    assert [c.name for c in calls if c.kind == "kernel"] == ["addmm"]


def _predicted(shape, backward: bool):
    """(LSR, frozen layer, plain LoRA) µs predicted for the step dispatch would run on the H200."""
    from lsr_compile import dispatch, step
    from lsr_compile.device import H200

    plan = dispatch.planned(shape, H200)
    f = shape.factors
    keep = step.keeps_folded(shape.tokens, f.d_out)
    lsr = cm.lsr_step(plan["forward"][1], plan["backward"][1] if backward else None, f, shape.tokens, shape.dtype,
                      keep)
    floor = cm.floor_step(f.d_in, f.d_out, shape.tokens, shape.dtype, backward)
    lora = cm.lora_step(f.d_in, f.d_out, f.q, shape.tokens, shape.dtype, backward)
    return [cm.price(c, cm.H200, e).us for c, e in (lsr, floor, lora)]


def test_todays_step_at_the_target_shape(fresh_dispatch):
    """bf16 4096², N = 8192 on the H200, as predicted: forward within 6 % of the frozen layer, forward+backward
    within 14 % (the target is 12 %: three passes over N x 4096 operands and a fold cost 1.09x at their
    bandwidth, and seven kernels' fixed costs the rest), faster than plain LoRA by more than 15 %, and less than
    0.6x the step the H200 measured at 9d2c79e (1.94 ms)."""
    from lsr_compile import workloads

    shape = workloads.gpu_shapes()[0]
    lsr, floor, lora = _predicted(shape, backward=False)
    assert lsr / floor <= 1.06
    lsr, floor, lora = _predicted(shape, backward=True)
    assert lsr / floor <= 1.14 and lora / lsr >= 1.15
    old_calls, old_entries = _old_lsr_step("4096x4096", True)
    assert lsr <= 0.6 * cm.price(old_calls, cm.H200, old_entries).us


@pytest.mark.parametrize("tma,times", [(0, 32), (1, 8)])
def test_fused_kernel_is_priced_as_it_runs(tma, times):
    """The fused kernel recorded with a GPU's tiles even in the interpreter, and its tensor-core work as
    executed: x Aᵀ at the rank's block width (8 for q = 8) once per column tile (pointers: 4096 / 128 = 32) or
    once per column of the persistent kernel's wave (16 x 8 on an H200), the epilogue's dot 16 deep."""
    from lsr_compile.kernels import triton_fused

    m, d, q = 8192, 4096, 8
    e = lambda *s: torch.empty(*s, device="meta", dtype=torch.bfloat16)  # noqa: E731
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, TMA=tma)
    calls = cm.trace(triton_fused.fused_linear, e(m, d), e(d, d), e(d), e(q, d), e(q, d).T, 1.0, cfg, True)
    (fused,) = [c for c in calls if c.source == "triton"]
    assert fused.name == ("_fused_lsr_tma_kernel" if tma else "_fused_lsr_kernel")
    assert fused.flops == 2.0 * m * d * d + 2.0 * m * d * 8 * times + 2.0 * m * d * 16
