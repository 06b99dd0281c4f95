"""TVM on GPUs, the part a CPU machine can check: every config of the CUDA schedule space is compiled for
sm_90 with nvcc and exported for TVM's runtime; the runtime alone (no compiler library) loads an artifact,
resolves its function and checks its arguments; nothing falls back silently to a source-only module."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lsr_compile as lc
from lsr_compile import schedule_spaces
from lsr_compile.kernels import tvm_cuda, tvm_kernels, tvm_lower

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cc") is None,
                                reason="needs nvcc and a C compiler")
SHAPE = lc.LSRShape(512, 96, 80, s=2, r=(2, 3))
POINTS = sum(len(schedule_spaces.space("cuda", op, v)) for op in ("forward", "backward")
             for v in schedule_spaces.variants("cuda", op))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tvm-cuda")
    recs = tvm_cuda.build_artifacts([SHAPE, lc.LSRShape(512, 96, 80, s=2, r=(2, 3), dtype=torch.bfloat16)],
                                    out_dir=out)
    return out, recs


def test_every_config_of_the_space_is_built_for_sm90_in_fp32_and_bf16(built):
    out, recs = built
    assert len(recs) == 2 * POINTS
    assert {(r["dtype"], r["op"], r["variant"]) for r in recs} == {
        (d, op, v) for d in ("float32", "bfloat16") for op in ("forward", "backward")
        for v in schedule_spaces.variants("cuda", op)}
    for r in recs:
        assert (out / "sm_90" / r["file"]).stat().st_size > 4000
        assert r["kernels"] and all(k["registers"] > 0 and k["spilled"] == 0 for k in r["kernels"].values()), r
        assert r["config"] in schedule_spaces.space("cuda", r["op"], r["variant"])
    index = [json.loads(line) for line in (out / "sm_90" / "index.jsonl").read_text().splitlines()]
    assert [i["name"] for i in index] == [r["name"] for r in recs]


def test_a_second_build_keeps_what_is_there(built):
    out, _ = built
    assert tvm_cuda.build_artifacts([SHAPE], out_dir=out) == []


def test_the_runtime_alone_loads_an_artifact_and_checks_its_arguments(built):
    """In a process with TVM's runtime only (TVM_USE_RUNTIME_LIB=1, as with the runtime wheels on a GPU
    machine): the module loads, ``main`` resolves, and a CPU tensor is refused by the CUDA function."""
    out, recs = built
    rec = next(r for r in recs if r["op"] == "forward" and r["variant"] == "materialise" and r["dtype"] == "float32")
    code = f"""
import ctypes, json, torch
ctypes.CDLL({str(out / "sm_90" / ".driver-stub" / "libcuda.so.1")!r}, mode=ctypes.RTLD_GLOBAL)
import tvm.base
assert tvm.base._RUNTIME_ONLY and "tvm_compiler" not in tvm.base._LOADED_LIBS
from lsr_compile.kernels import tvm_cuda
fn = tvm_cuda.load(json.loads({json.dumps(json.dumps(rec))}), {str(out)!r})
x = torch.randn(4, 96)
try:
    fn(x, torch.randn(6, 96), torch.randn(6, 80), 1.0, torch.randn(4, 80))
except Exception as e:
    print("refused:", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"TVM_USE_RUNTIME_LIB": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused:" in proc.stdout and "expected cuda" in proc.stdout
    assert "main(x: Tensor([n, 96], float32), A: Tensor([6, 96], float32), Bt: Tensor([6, 80], float32), " \
           "scale: float32, y_io: Tensor([n, 80], float32))" in proc.stdout


@pytest.mark.parametrize("op,variant", [("forward", "materialise"), ("forward", "factored")])
def test_the_in_place_output_is_one_pointer(op, variant):
    """The base GEMM's output is read and written through one parameter: no kernel gets it twice (two
    __restrict__ pointers to one tensor would be undefined behaviour)."""
    import tvm

    target = {"kind": "cuda", "arch": "sm_90"}
    mod = tvm_lower.lower(op, variant, schedule_spaces.default("cuda", op, variant), SHAPE.factors, "float32", target)
    assert [str(p) for p in mod["main"].params][-1] == "y_io"
    with tvm.target.Target(target):
        src = tvm.compile(mod, target=target).mod.imports[0].inspect_source()
    kernels = [line for line in src.splitlines() if "__global__" in line and "{" in line]
    assert kernels and not any("y_ptr" in k and "y_io_ptr" in k for k in kernels)
    assert not any(" y_ptr" in k for k in kernels)


def test_without_a_compiler_or_an_artifact_the_candidate_is_skipped_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(tvm_cuda.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(tvm_cuda, "compiler_available", lambda: False)
    why = tvm_cuda.static_problem("forward", "materialise", {"threads": 128, "unroll": 0}, SHAPE.factors, "bfloat16",
                                  "sm_90")
    assert "no prebuilt TVM-CUDA artifact" in why and "build-tvm-cuda" in why


def test_compiling_for_cuda_where_tvm_cannot_make_a_cuda_module_fails_loudly():
    """In this process TVM's CUDA runtime library is not loaded (no driver): tvm.compile would return a
    source-only module; the kernel build says so instead of returning something that cannot run."""
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        pytest.skip("TVM's CUDA runtime is loaded in this process (a GPU machine)")
    with pytest.raises(RuntimeError, match="source-only"):
        tvm_kernels.compile_for("forward", "materialise", {"threads": 128, "unroll": 0}, SHAPE.factors, "float32",
                                {"kind": "cuda", "arch": "sm_90"})
