"""tune(target="cuda") on a machine without a GPU builds the TVM-CUDA kernels a GPU machine will time, and
records nothing."""
import shutil

import pytest
import torch

import lsr_compile as lc
from lsr_compile.kernels import tvm_cuda
from lsr_compile.tuning import tune


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine tune(target='cuda') times for real")
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_tune_cuda_without_gpu_builds_artifacts_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv(tvm_cuda.ENV_VAR, str(tmp_path / "artifacts"))
    with pytest.warns(RuntimeWarning, match="no GPU here.* TVM-CUDA kernels built for sm_90"):
        recs = tune([lc.LSRShape(64, 48, 48, s=1, r=2)], target="cuda", log_dir=tmp_path / "logs",
                    ops=("forward",))
    assert recs == [] and not list((tmp_path / "logs").rglob("*.jsonl"))
    from lsr_compile import schedule_spaces

    assert len(tvm_cuda.index("sm_90")) == sum(len(schedule_spaces.space("cuda", "forward", v))
                                               for v in schedule_spaces.variants("cuda", "forward"))
