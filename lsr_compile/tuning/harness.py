"""The correctness harness the tuner and the GPU check share: fresh random inputs, the float64 reference
(values and gradients), and the error measure every candidate kernel is judged by."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..problem import LSRShape

# float64: rounding only; float32: IEEE arithmetic over d_in-long sums; half precision: 8/11-bit mantissas
TOL = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 3e-2, "float16": 3e-3}


def inputs(shape: LSRShape, tokens: int, device, dtype) -> dict:
    """Fresh data on every call (never zeros): the tensors in ``dtype`` on ``device``, and their float64
    originals on the CPU (``ref``) for the reference."""
    f = shape.factors
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(tokens, f.d_in)
    W = r(f.d_out, f.d_in) / math.sqrt(f.d_in)
    b = r(f.d_out)
    factors = [r(*sz) * 0.3 for sz in f.factor_sizes().values()]
    dy = r(tokens, f.d_out)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(x=cast(x), W=cast(W), b=cast(b), factors=[cast(t) for t in factors], dy=cast(dy),
                ref=(x, W, b, factors, dy))


def call(op: str, fn, d: dict, scale: float):
    """``fn`` (a forward or backward kernel) on the inputs ``d``, as a no-argument callable."""
    if op == "forward":
        return lambda: fn(d["x"], d["W"], d["b"], *d["factors"], scale)
    return lambda: fn(d["dy"], d["x"], d["W"], *d["factors"], scale, True)


def expected(op: str, d: dict, scale: float) -> list[torch.Tensor]:
    """The reference's outputs in float64: y, or dx and the four factor gradients."""
    x, W, b, factors, dy = d["ref"]
    if op == "forward":
        return [reference.lsr_linear(x, W, b, *factors, scale)]
    x = x.clone().requires_grad_(True)
    fs = [t.clone().requires_grad_(True) for t in factors]
    reference.lsr_linear(x, W, b, *fs, scale).backward(dy)
    return [x.grad] + [t.grad for t in fs]


def errors(op: str, out, want) -> list[float]:
    """Per output: max |got - ref| / max(1, max |ref|) (NaN when the output holds NaN)."""
    got = [out] if op == "forward" else list(out)
    return [(g.double().cpu() - w).abs().max().item() / max(1.0, w.abs().max().item()) for g, w in zip(got, want)]


def problem(op: str, out, want, dtype: str, tol: Optional[float] = None) -> Optional[str]:
    """Why ``out`` is not the reference's result (an output off by more than the dtype's tolerance), or None."""
    tol = TOL[dtype] if tol is None else tol
    for i, err in enumerate(errors(op, out, want)):
        if not math.isfinite(err) or err > tol:
            return f"output {i} off by {err:.3g} (relative to max |ref|; tolerance {tol})"
    return None
