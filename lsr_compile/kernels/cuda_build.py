"""The CUDA path without a GPU: lower every TVM expression for ``cuda`` and compile it to PTX with nvcc.

Timing needs a GPU; this proves the kernels a GPU machine would tune are
generated and compile for its architecture (sm_90 by default: H100/H200).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import schedules
from ..expr import EXPRESSIONS

log = logging.getLogger(__name__)


@dataclass
class CudaBuild:
    op: str
    variant: str
    label: str
    source_chars: int
    ptx_chars: int
    entries: list


def build_cuda_sources(shapes, ops=("forward", "backward"), arch: str = "sm_90", compiler: str = "nvcc"):
    """Generate CUDA C for each (shape, op, variant) at the schedule space's default and compile it to PTX."""
    import tvm
    from tvm.support import nvcc

    from .tvm_kernels import lower

    target = {"kind": "cuda", "arch": arch}
    out = []
    for shape in shapes:
        if str(shape.dtype).removeprefix("torch.") not in ("float32", "float64"):
            continue
        for op, variant in EXPRESSIONS:
            if op not in ops:
                continue
            cfg = schedules.default("cuda", op, variant)
            mod = lower(op, variant, cfg, shape.factors, str(shape.dtype).removeprefix("torch."), target)
            lib = tvm.compile(mod, target=target)
            src = lib.mod.imports[0].inspect_source()
            with tvm.target.Target(target):  # nvcc.py reads the compute version from the current target
                ptx = nvcc.compile_cuda(src, target_format="ptx", arch=arch, compiler=compiler)
            ptx = ptx if isinstance(ptx, str) else bytes(ptx).decode()
            entries = [l.split()[-1].rstrip("(") for l in ptx.splitlines() if ".entry" in l]
            if not entries:
                raise RuntimeError(f"nvcc produced no kernel entry for {op}/{variant} {shape.label()}")
            out.append(CudaBuild(op, variant, shape.label(), len(src), len(ptx), entries))
            log.info("cuda build %s/%s %s: %d kernels", op, variant, shape.label(), len(entries))
    return out
