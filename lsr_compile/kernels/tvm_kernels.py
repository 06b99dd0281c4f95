"""TVM kernels: expression (expr/) + schedule config (schedules/) -> compiled function -> layer kernel.

The vendor GEMM does ``x Wᵀ`` / ``dy W``; the TVM function adds the adapter into
its output in place (zero-copy: torch tensors go straight in through DLPack).
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .. import schedules
from ..config import FactorShapes
from ..expr import EXPRESSIONS
from ..formulations import build_A, build_Bt
from ..problem import ProblemKey
from ..tuning.device import llvm_target

# TVM's worker threads spin after each kernel by default and then starve PyTorch's OpenMP threads, which
# run the base GEMM right before: at 768², N=2048 on 2 cores the GEMM's median went from 1.3 ms to 18 ms.
# Not spinning costs the TVM kernel nothing measurable there.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

DTYPES = ("float32", "float64")  # TVM's llvm bf16 path is not one this project checks


def target_dict(device: torch.device) -> dict:
    if device.type == "cpu":
        return llvm_target()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"kind": "cuda", "arch": f"sm_{major}{minor}"}
    raise ValueError(f"TVM backend has no target for device {device}")


def space_name(target: dict) -> str:
    return "llvm" if target["kind"] == "llvm" else "cuda"


def default_choice(op: str, key: ProblemKey, device: torch.device) -> tuple[str, dict]:
    name = "llvm" if device.type == "cpu" else "cuda"
    return "adapter", schedules.default(name, op, "adapter")


def lower(op: str, variant: str, config: dict, f: FactorShapes, dtype: str, target: dict):
    """Schedule the expression for ``target``; returns the IRModule to compile."""
    from tvm import te

    from .tvm_schedule import schedule_cuda, schedule_llvm

    if dtype not in DTYPES:
        raise ValueError(f"TVM kernels support {DTYPES}, not {dtype}")
    if (op, variant) not in EXPRESSIONS:
        raise ValueError(f"no TVM expression for {op}/{variant}; known: {sorted(EXPRESSIONS)}")
    # the *_io input is also passed as the output (in-place add): the function must not assume noalias
    func = te.create_prim_func(EXPRESSIONS[op, variant].build(f, dtype)).with_attr("tirx.noalias", False)
    if target["kind"] == "llvm":
        return schedule_llvm(func, config).mod
    return schedule_cuda(func, config)


@functools.lru_cache(maxsize=256)
def _compiled(op, variant, config_items, f, dtype, target_items):
    import tvm

    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    target = dict(target_items)
    return tvm.compile(lower(op, variant, dict(config_items), f, dtype, target), target=target)["main"]


def compile_for(op, variant, config, f, dtype, target):
    return _compiled(op, variant, tuple(sorted(config.items())), f, dtype, tuple(sorted(target.items())))


def build(op: str, variant: str, config: dict, key: ProblemKey, device: torch.device):
    """A layer kernel (signature of ``lsr_compile.formulations``) running the compiled TVM function."""
    f = key.shapes
    fn = compile_for(op, variant, config, f, key.dtype, target_dict(device))
    if op == "forward" and variant == "adapter":
        def forward(x, weight, bias, A1, A2, B1, B2, scale):
            x = x.contiguous()
            y = F.linear(x, weight, bias)
            fn(x, build_A(A1, A2), build_Bt(B1, B2), scale, y, y)
            return y
        return forward
    if op == "forward" and variant == "kron":
        def forward(x, weight, bias, A1, A2, B1, B2, scale):
            x = x.contiguous()
            y = F.linear(x, weight, bias)
            fn(x, A1.contiguous(), A2.contiguous(), B1.contiguous(), B2.contiguous(), scale, y, y)
            return y
        return forward
    if op == "backward" and variant == "adapter":
        def backward(dy, x, weight, A1, A2, B1, B2, scale, need_dx):
            dy, x = dy.contiguous(), x.contiguous()
            dx = torch.empty_like(x)
            grads = [torch.empty_like(t) for t in (A1, A2, B1, B2)]
            A1, A2, B1, B2 = (t.contiguous() for t in (A1, A2, B1, B2))
            fn(dy, x, build_A(A1, A2), build_Bt(B1, B2), A1, A2, B1, B2, scale, dx, *grads)
            # the vendor GEMM accumulates dy W onto the adapter term (beta = 1): no extra pass over dx
            return (torch.addmm(dx, dy, weight, out=dx) if need_dx else None, *grads)
        return backward
    raise ValueError(f"no TVM kernel for {op}/{variant}")
