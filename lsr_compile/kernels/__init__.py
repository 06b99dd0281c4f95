"""Stage 2: kernels. ``build`` turns a (backend, variant, config) choice into a callable.

All kernels of one op share a signature (see ``lsr_compile.formulations``), so
the tuner, dispatch and tests call the same code path with an explicit config.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import formulations
from ..problem import ProblemKey

BACKENDS = ("torch", "tvm", "triton")


def torch_default_variant(op: str, key: ProblemKey) -> str:
    """Untuned choice among the PyTorch formulations, from a memory-traffic cost model.

    Folding reads and writes W once (2·d_out·d_in); the token path re-reads x and
    re-writes y (N·(d_in + 2·d_out)); the matmul work of both is a q/d fraction.
    """
    if op == "backward":
        return "materialise"
    d_in, d_out = key.n1 * key.n2, key.m1 * key.m2
    return "fold" if key.tokens * (d_in + 2 * d_out) > 2 * d_out * d_in else "materialise"


def default_choice(backend: str, op: str, key: ProblemKey, device: torch.device) -> tuple[str, dict]:
    """The variant and config a backend runs when nothing was tuned for ``key``."""
    if backend == "torch":
        return torch_default_variant(op, key), {}
    if backend == "tvm":
        from . import tvm_kernels

        return tvm_kernels.default_choice(op, key, device)
    if backend == "triton":
        from . import triton_fused

        return triton_fused.default_choice(op, key, device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def build(backend: str, op: str, variant: str, config: dict, key: ProblemKey, device: torch.device) -> Callable:
    if backend == "torch":
        table = formulations.FORWARDS if op == "forward" else formulations.BACKWARDS
        if variant not in table:
            raise ValueError(f"torch backend has no {op} variant {variant!r}; known: {sorted(table)}")
        return table[variant]
    if backend == "tvm":
        from . import tvm_kernels

        return tvm_kernels.build(op, variant, config, key, device)
    if backend == "triton":
        from . import triton_fused

        return triton_fused.build(op, variant, config, key, device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
