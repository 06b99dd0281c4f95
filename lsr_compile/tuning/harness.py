"""The correctness harness the tuner and the GPU check share: fresh random inputs, the float64 reference
(values and gradients), and the error measure every candidate kernel is judged by."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..problem import ADAPTER_OPS, MIXED_OPS, LSRShape

# float64: rounding only; float32: IEEE arithmetic over d_in-long sums; half precision: 8/11-bit mantissas
TOL = {"float64": 1e-9, "float32": 2e-4, "bfloat16": 3e-2, "float16": 3e-3}


def inputs(shape: LSRShape, tokens: int, device, dtype) -> dict:
    """Fresh data on every call (never zeros): the tensors in ``dtype`` on ``device``, and their float64
    originals on the CPU (``ref``) for the reference. A mixed-batch shape (``shape.mixed``) gets a bank of
    that many adapters, one scale per slot, and ``num_segments`` ragged segments (some empty, some without
    adapter, slots repeated) over the tokens."""
    f = shape.factors
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(tokens, f.d_in)
    W = r(f.d_out, f.d_in) / math.sqrt(f.d_in)
    b = r(f.d_out)
    bank = (shape.adapters,) if shape.mixed else ()
    factors = [r(*bank, *sz) * 0.3 for sz in f.factor_sizes().values()]
    dy = r(tokens, f.d_out)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    d = dict(x=cast(x), W=cast(W), b=cast(b), factors=[cast(t) for t in factors], dy=cast(dy),
             ref=(x, W, b, factors, dy))
    if bank:
        S = min(shape.num_segments, tokens)
        cuts = sorted(torch.randint(0, tokens + 1, (S - 1,), generator=g).tolist())
        ptr = torch.tensor([0] + cuts + [tokens], dtype=torch.int64)
        ad = torch.randint(-1, shape.adapters, (S,), generator=g)
        ad[torch.randint(0, S, (1,), generator=g)] = torch.randint(0, shape.adapters, (1,), generator=g)  # one in use
        scales = 0.5 + torch.rand(shape.adapters, generator=g, dtype=torch.float64)
        d |= dict(scales=scales.float().to(device), seg_indptr=ptr.to(device), seg_adapter=ad.to(device),
                  mixed_ref=(scales, ptr, ad))
    return d


def save_forward(d: dict, forward, scale: float, keep_folded: bool = True) -> dict:
    """Run a forward kernel on ``d`` and keep what it hands the backward (A, Bt, tT, W_eff; W_eff dropped
    unless ``keep_folded``), as the op does in a training step. Returns ``d``."""
    _, A, Bt, tT, w_eff = forward(d["x"], d["W"], d["b"], *d["factors"], scale)
    d["saved"] = (A, Bt, tT, w_eff if keep_folded else None)
    return d


def call(op: str, fn, d: dict, scale: float):
    """``fn`` (a kernel of ``op``) on the inputs ``d``, as a no-argument callable. A layer backward gets
    ``d["saved"]`` (``save_forward``), by default what the ATen fold forward saves without W_eff: A and Bt,
    so it computes everything else itself."""
    mixed = (d["scales"], d["seg_indptr"], d["seg_adapter"]) if op in MIXED_OPS else (scale,)
    if op in ADAPTER_OPS:  # the adapter alone: no base weight
        if op == "adapter_forward":
            return lambda: fn(d["x"], *d["factors"], scale)
        return lambda: fn(d["dy"], d["x"], *d["factors"], scale, True)
    if op.endswith("forward"):
        return lambda: fn(d["x"], d["W"], d["b"], *d["factors"], *mixed)
    if op == "backward":
        if "saved" not in d:
            from ..step import ATEN, bind, forward_fold

            save_forward(d, bind(forward_fold, ATEN), scale, keep_folded=False)
        return lambda: fn(d["dy"], d["x"], d["W"], *d["factors"], *d["saved"], scale, True)
    return lambda: fn(d["dy"], d["x"], d["W"], *d["factors"], *mixed, True)


def _reference(op, x, W, b, factors, scale, mixed):
    if op in ADAPTER_OPS:
        return reference.lsr_linear(x, torch.zeros_like(W), None, *factors, scale)
    if op not in MIXED_OPS:
        return reference.lsr_linear(x, W, b, *factors, scale)
    scales, ptr, ad = mixed
    p, out = ptr.tolist(), []
    for i, k in enumerate(ad.tolist()):
        rows = x[p[i]:p[i + 1]]
        out.append(torch.nn.functional.linear(rows, W, b) if k < 0 else
                   reference.lsr_linear(rows, W, b, *[f[k] for f in factors], float(scales[k].float())))
    return torch.cat(out)


def expected(op: str, d: dict, scale: float) -> list[torch.Tensor]:
    """The reference's outputs in float64: y, or dx and the four factor gradients (a mixed batch: each
    segment through the single-adapter reference with its slot's factors and scale)."""
    x, W, b, factors, dy = d["ref"]
    mixed = d.get("mixed_ref")
    if op.endswith("forward"):
        return [_reference(op, x, W, b, factors, scale, mixed)]
    x = x.clone().requires_grad_(True)
    fs = [t.clone().requires_grad_(True) for t in factors]
    _reference(op, x, W, b, fs, scale, mixed).backward(dy)
    # a bank slot no segment uses gets no gradient from autograd and exact zeros from a kernel
    return [x.grad] + [torch.zeros_like(t) if t.grad is None else t.grad for t in fs]


def errors(op: str, out, want) -> list[float]:
    """Per output: max |got - ref| / max(1, max |ref|) (NaN when the output holds NaN). A layer forward's
    extra outputs (what it saves for the backward) are not compared here."""
    if op == "forward":
        out = out[0]
    got = [out] if op.endswith("forward") else list(out)
    return [(g.double().cpu() - w).abs().max().item() / max(1.0, w.abs().max().item()) for g, w in zip(got, want)]


def problem(op: str, out, want, dtype: str, tol: Optional[float] = None) -> Optional[str]:
    """Why ``out`` is not the reference's result (an output off by more than the dtype's tolerance), or None."""
    tol = TOL[dtype] if tol is None else tol
    for i, err in enumerate(errors(op, out, want)):
        if not math.isfinite(err) or err > tol:
            return f"output {i} off by {err:.3g} (relative to max |ref|; tolerance {tol})"
    return None
