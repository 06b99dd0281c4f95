"""The Kronecker parts of a step on a CPU: ``expr/kron.py`` compiled once per dtype (every size symbolic).

What they buy is host time: building A and Bᵀ is one call of about 2 µs instead of about ten ATen calls, and
the projection onto the four factor gradients one instead of about twenty (a tiny layer's eager training
step costs what its calls cost). They are also faster than the ATen path for the factors at every size
tried (768², s = 4: 22 µs against 37; 4096², s = 16: 0.33 ms against 0.96 on the 2-core AMD EPYC CI
machine); the projection is not scheduled and costs more than the ATen one from 768² up (4096², s = 16: 3.4
ms against 0.3), which beside such a layer's GEMMs (hundreds of ms per step on a CPU) is noise.
The GEMMs and thin products stay oneDNN's.
"""
from __future__ import annotations

import functools
import os

import torch

from ..device import llvm_target
from ..step import AtenParts

DTYPES = ("float32", "float64")


@functools.lru_cache(maxsize=8)
def _compiled(name: str, dtype: str):
    import tvm
    from tvm import s_tir, te

    from ..expr.kron import KRON

    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func(KRON[name](dtype))}))
    if name == "factors":
        for block in ("A", "Bt"):  # the sum over l outside the contiguous last axis: a vectorisable inner loop
            blk = sch.get_sblock(block)
            *outer, inner, red = sch.get_loops(blk)
            sch.reorder(*outer, red, inner)
            sch.decompose_reduction(blk, red)
    return tvm.compile(sch.mod, target=llvm_target())["main"]


def available(dtype: torch.dtype) -> bool:
    import importlib.util

    return str(dtype).removeprefix("torch.") in DTYPES and importlib.util.find_spec("tvm") is not None


class TVMParts(AtenParts):
    """Factors and projection in TVM; the fold, the thin products and ``y += scale·tᵀBᵀ`` are oneDNN's,
    in place (the layer's op is opaque to Inductor whenever this runs)."""

    functional = False

    def factors(self, A1, A2, B1, B2):
        s, r1, n1 = A1.shape
        r2, n2 = A2.shape[1:]
        m1, m2 = B1.shape[1], B2.shape[1]
        A = A1.new_empty(r1, r2, n1, n2)
        Bt = A1.new_empty(r1, r2, m1, m2)
        _compiled("factors", str(A1.dtype).removeprefix("torch."))(A1, A2, B1, B2, A, Bt)
        return A.view(r1 * r2, n1 * n2), Bt.view(r1 * r2, m1 * m2)

    def addmm(self, c, a, b, beta=1.0, alpha=1.0):
        return c.addmm_(a, b, beta=beta, alpha=alpha)

    def project(self, dA, dBt, A1, A2, B1, B2, scale):
        grads = [torch.empty_like(t) for t in (A1, A2, B1, B2)]
        _compiled("project", str(A1.dtype).removeprefix("torch."))(dA, dBt, A1, A2, B1, B2, scale, *grads)
        return tuple(grads)


PARTS = TVMParts()
