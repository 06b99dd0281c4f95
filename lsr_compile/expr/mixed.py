"""TVM tensor expression of a mixed batch (docs/design.md §6): every row adds its own adapter's update, read
from a materialised bank through the row's slot (``-1``: none). Token count and bank size are symbolic: one
kernel serves every batch and every bank."""
from __future__ import annotations

from tvm import te, tirx

from ..config import FactorShapes
from .adapter import Expression, _lanes, _up, acc_dtype


def mixed_forward_gathered(f: FactorShapes, dtype: str):
    """``y_io[i] += scales[k_i] · (x_i A_{k_i}ᵀ) B_{k_i}ᵀ`` for rows with a slot ``k_i = slot[i] >= 0``;
    ``A (K, q, d_in)``, ``Bt (K, q, d_out)``, ``scales (K,)`` in the accumulation type."""
    n, K = te.var("n", "int64"), te.var("K", "int64")
    ac = acc_dtype(dtype)
    x = te.placeholder((n, f.d_in), dtype, name="x")
    slot = te.placeholder((n,), "int64", name="slot")
    A = te.placeholder((K, f.q, f.d_in), dtype, name="A")
    Bt = te.placeholder((K, f.q, f.d_out), dtype, name="Bt")
    scales = te.placeholder((K,), ac, name="scales")
    y_io = te.placeholder((n, f.d_out), dtype, name="y_io")
    k_of = lambda i: tirx.max(slot[i], tirx.const(0, "int64"))  # noqa: E731  (a row without adapter reads slot 0)
    L = _lanes(f.d_in)
    ko = te.reduce_axis((0, f.d_in // L), name="t_ko")
    part = te.compute((n, f.q, L), lambda i, a, v: te.sum(
        _up(x[i, ko * L + v], ac) * _up(A[k_of(i), a, ko * L + v], ac), axis=ko), name="t_part")
    lv = te.reduce_axis((0, L), name="t_lane")
    t = te.compute((n, f.q), lambda i, a: te.sum(part[i, a, lv], axis=lv), name="t")
    a = te.reduce_axis((0, f.q), name="a")
    acc = te.compute((n, f.d_out), lambda i, j: te.sum(t[i, a] * _up(Bt[k_of(i), a, j], ac), axis=a), name="y_acc")
    y = te.compute((n, f.d_out), lambda i, j: tirx.if_then_else(
        slot[i] >= 0, _up(y_io[i, j], ac) + scales[k_of(i)] * acc[i, j], _up(y_io[i, j], ac)).astype(dtype),
        name="y")
    return [x, slot, A, Bt, scales, y_io, y]


EXPRESSIONS = {
    ("mixed_forward", "gathered"): Expression(("x", "slot", "A", "Bt", "scales", "y_io", "y"), mixed_forward_gathered),
}
