"""The CUDA path on a machine without a GPU: TVM generates CUDA C and nvcc compiles it to PTX."""
import shutil

import pytest
import torch

import lsr_compile as lc
from lsr_compile.kernels.cuda_build import build_cuda_sources
from lsr_compile.tuning import tune

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")


def test_every_expression_compiles_for_sm90():
    builds = build_cuda_sources([lc.LSRShape(512, 96, 80, s=2, r=(2, 3))])
    assert {(b.op, b.variant) for b in builds} == {("forward", "adapter"), ("forward", "kron"),
                                                   ("backward", "adapter")}
    for b in builds:
        assert b.entries and b.ptx_chars > 1000


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine tune(target='cuda') times for real")
def test_tune_cuda_without_gpu_builds_and_records_nothing(tmp_path):
    with pytest.warns(RuntimeWarning, match="no GPU here"):
        recs = tune([lc.LSRShape(64, 48, 48, s=1, r=2)], target="cuda", log_dir=tmp_path)
    assert recs == [] and not list(tmp_path.rglob("*.jsonl"))
