"""TVM kernels: expression (expr/) + schedule config (schedules/) -> compiled function -> layer kernel.

The vendor GEMM does ``x Wᵀ`` / ``dy W``; the TVM function adds the adapter into
its output in place (zero-copy: torch tensors go straight in through DLPack, and
on a GPU the kernels run on their tensors' device, on PyTorch's current stream
there). On a GPU the function is an artifact built ahead of time when one
exists (``tvm_cuda``: TVM's runtime alone loads it), else it is compiled here.
"""
from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .. import schedule_spaces
from ..config import FactorShapes
from ..problem import ProblemKey
from ..device import space_name, target_of, tvm_target

# TVM's worker threads spin after each kernel by default and then starve PyTorch's OpenMP threads, which
# run the base GEMM right before: at 768², N=2048 on 2 cores the GEMM's median went from 1.3 ms to 18 ms.
# Not spinning costs the TVM kernel nothing measurable there.
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

def default_choice(op: str, key: ProblemKey, device: torch.device) -> tuple[str, dict]:
    space = space_name("tvm", target_of(device))
    variants = schedule_spaces.variants(space, op)
    if not variants:
        raise ValueError(f"TVM has no {op} kernel (its schedule space {space} has none)")
    variant = "materialise" if "materialise" in variants else variants[0]
    return variant, schedule_spaces.default(space, op, variant)


@functools.lru_cache(maxsize=256)
def _compiled(op, variant, config_items, f, dtype, target_items):
    import tvm

    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # nvrtc needs cuda-bindings; nvcc is on CUDA hosts
    target = dict(target_items)
    from .tvm_lower import lower

    with tvm.target.Target(target):
        lib = tvm.compile(lower(op, variant, dict(config_items), f, dtype, target), target=target)
    if target["kind"] == "cuda" and not all(m.is_runnable() for m in lib.mod.imports):
        raise RuntimeError("TVM built a source-only CUDA module (no CUDA runtime library here): build the "
                           "kernels ahead of time with `lsr-compile build-tvm-cuda` instead")
    return lib["main"]


@functools.lru_cache(maxsize=None)
def _generic_shapes() -> FactorShapes:
    return symbolic_shapes()  # one object, so each compiled generic function is cached once per dtype


def compile_count() -> int:
    """How many TVM functions this process has compiled (not counting the ones served from memory)."""
    return _compiled.cache_info().misses


def compile_for(op, variant, config, f, dtype, target):
    return _compiled(op, variant, tuple(sorted(config.items())), f, dtype, tuple(sorted(target.items())))


def symbolic_shapes() -> FactorShapes:
    """Factor shapes as TVM variables, bound from the factors' shapes at each call (the generic kernels)."""
    from tvm import te

    return FactorShapes(*(te.var(n, "int64") for n in ("s", "r1", "r2", "n1", "n2", "m1", "m2")))


def _function(op, variant, config, f, dtype, device):
    """The compiled TVM function for ``device``: on a GPU a prebuilt artifact when there is one (TVM's
    runtime alone runs it), else compiled here; calls run on their tensors' device and that device's current
    PyTorch stream (``on_tensors_stream``)."""
    target = tvm_target(device)
    if target["kind"] != "cuda":
        if config.get("shapes") == "any":
            f = _generic_shapes()
        return compile_for(op, variant, config, f, dtype, target)
    import tvm_ffi

    from . import tvm_cuda

    rec = tvm_cuda.find(op, variant, config, f, dtype, target["arch"])
    fn = tvm_cuda.load(rec) if rec is not None else compile_for(op, variant, config, f, dtype, target)
    return on_tensors_stream(fn, tvm_ffi.use_torch_stream)


def on_tensors_stream(fn, use_torch_stream):
    """``fn`` called under its tensors' device guard, then on PyTorch's current stream there
    (``use_torch_stream`` takes the *current* device's): a layer on cuda:1 while cuda:0 is current would
    otherwise run on cuda:0's stream, unordered against cuda:1's writes."""
    from .triton_fused import device_of

    def on_torch_stream(*args):
        device = device_of(args)
        with torch.cuda.device(device) if device is not None and device.type == "cuda" else nullcontext():
            with use_torch_stream():
                return fn(*args)
    return on_torch_stream


def _generic(op: str, config: dict, key: ProblemKey, device):
    """The generic kernels: the whole layer in one TVM call per direction (``expr.GENERIC``), compiled once
    per dtype (and bias or none) for every shape."""
    fns = {has_bias: _function(op, "materialise", {**config, "bias": has_bias}, None, key.dtype, device)
           for has_bias in ((True, False) if op == "forward" else (True,))}
    if op == "forward":
        def forward(x, weight, bias, A1, A2, B1, B2, scale):
            x = x.contiguous()
            q, (d_out, d_in) = A1.shape[1] * A2.shape[1], weight.shape
            A, Bt, y = x.new_empty(q, d_in), x.new_empty(q, d_out), x.new_empty(x.shape[0], d_out)
            args = (x, weight) + (() if bias is None else (bias,))
            fns[bias is not None](*args, A1, A2, B1, B2, scale, A, Bt, y)
            return y, A, Bt, None, None
        return forward
    fn = fns[True]

    def backward(dy, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx):
        dx = torch.empty_like(x)
        grads = [torch.empty_like(t) for t in (A1, A2, B1, B2)]
        fn(dy.contiguous(), x.contiguous(), weight, A, Bt, A1, A2, B1, B2, scale, dx, *grads)
        return (dx if need_dx else None, *grads)
    return backward


def build(op: str, variant: str, config: dict, key: ProblemKey, device: torch.device):
    """A layer kernel (signature of ``step``: forwards return what the backward reuses) running the compiled
    TVM function; A and Bᵀ come from the Kronecker parts of the device (``kernels.parts_for``)."""
    from ..step import ATEN, BACKWARDS, FORWARDS, bind
    from .tvm_parts import PARTS

    parts = PARTS if torch.device(device).type == "cpu" else ATEN
    if variant == "fold" and op in ("forward", "backward"):  # the step's fold with TVM's Kronecker parts
        return bind((FORWARDS if op == "forward" else BACKWARDS)["fold"], parts)
    if config.get("shapes") == "any":
        return _generic(op, config, key, device)
    f = key.shapes
    fn = _function(op, variant, config, f, key.dtype, device)
    if op == "forward" and variant == "materialise":
        def forward(x, weight, bias, A1, A2, B1, B2, scale):
            x = x.contiguous()
            A, Bt = parts.factors(A1, A2, B1, B2)
            y = F.linear(x, weight, bias)
            fn(x, A, Bt, scale, y)
            return y, A, Bt, None, None
        return forward
    if op == "forward" and variant == "factored":
        def forward(x, weight, bias, A1, A2, B1, B2, scale):
            x = x.contiguous()
            y = F.linear(x, weight, bias)
            A1, A2, B1, B2 = (t.contiguous() for t in (A1, A2, B1, B2))
            fn(x, A1, A2, B1, B2, scale, y)
            return (y, *parts.factors(A1, A2, B1, B2), None, None)
        return forward
    if op == "backward" and variant == "materialise":
        def backward(dy, x, weight, A1, A2, B1, B2, A, Bt, tT, w_eff, scale, need_dx):
            dy, x = dy.contiguous(), x.contiguous()
            dx = torch.empty_like(x)
            grads = [torch.empty_like(t) for t in (A1, A2, B1, B2)]
            A1, A2, B1, B2 = (t.contiguous() for t in (A1, A2, B1, B2))
            fn(dy, x, A.contiguous(), Bt.contiguous(), A1, A2, B1, B2, scale, dx, *grads)
            # the vendor GEMM accumulates dy W onto the adapter term (beta = 1): no extra pass over dx
            return (torch.addmm(dx, dy, weight, out=dx) if need_dx else None, *grads)
        return backward
    if op == "mixed_forward" and variant == "gathered":
        from ..mixed_formulations import bank_A, bank_Bt, row_index, segment_bank

        acc = torch.float64 if key.dtype == "float64" else torch.float32

        def mixed_forward(x, weight, bias, A1, A2, B1, B2, scales, seg_indptr, seg_adapter):
            x = x.contiguous()
            y = F.linear(x, weight, bias)
            A1, A2, B1, B2, scales, seg_adapter = segment_bank(A1, A2, B1, B2, scales, seg_adapter)
            fn(x, row_index(seg_indptr, seg_adapter, x.shape[0]), bank_A(A1, A2), bank_Bt(B1, B2),
               scales.to(acc).contiguous(), y)
            return y
        return mixed_forward
    raise ValueError(f"no TVM kernel for {op}/{variant}")
