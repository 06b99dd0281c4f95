"""TVM tensor expressions of the LSR adapter, forward and backward (docs/design.md, "Ways to compute it").

The base GEMM ``x Wᵀ`` (and ``dy W``) stays with the vendor BLAS: on these CPUs a
TVM GEMM measured 4x slower than oneDNN at 768² (2 threads). The expressions
below compute everything else and add it into the base GEMM's output in place,
so x and y each cross memory once more, not three times as in the eager
reference. The token count ``n`` is symbolic: one kernel serves every N.

Reductions over a contiguous axis are written in two stages (``*_part`` with a
spatial lane axis, then a short sum over lanes) so that schedules can vectorise
them: an rfactor done in the expression, which also keeps them TE-only.

Argument order of each PrimFunc is given by ``Expression.args``. A tensor named
``*_io`` is the base GEMM's output and the expression's last output is its
updated value: once scheduled, the two are bound to one buffer
(``kernels.tvm_kernels.lower``), so the compiled function takes that tensor once
and adds the adapter in place, with no pointer passed twice. Blocks named
``*_acc`` hold a per-row partial result that schedules compute at the consumer's
row loop. Half-precision operands (bf16, fp16) are read as stored and
accumulated in float32, as the vendor GEMM does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tvm import te

from ..config import FactorShapes

LANES = 16  # rfactor lanes: one AVX-512 float32 vector; 16 divides every d this project factors as n1*n2 >= 16


@dataclass(frozen=True)
class Expression:
    """A TE program: ``build(shapes, dtype)`` -> its placeholders/vars/outputs, in the order of ``args``."""

    args: tuple[str, ...]
    build: Callable[[FactorShapes, str], list]


def _lanes(d) -> int:
    """Rfactor lanes for a contiguous reduction of length d (none for a symbolic d)."""
    return LANES if isinstance(d, int) and d % LANES == 0 else 1


def acc_dtype(dtype: str) -> str:
    """The type sums are accumulated in: float32 for half-precision operands."""
    return "float32" if dtype in ("bfloat16", "float16") else dtype


def _up(v, acc: str):
    return v if v.dtype == acc else v.astype(acc)


def _factors(f: FactorShapes, dtype: str):
    """Placeholders for the four factor tensors in the layout of docs/design.md (A1 (s, r1, n1), ...)."""
    return [te.placeholder(shape, dtype, name=name) for name, shape in f.factor_sizes().items()]


def _dot_rows(name, X, M, n, rows, d, dtype):
    """``out[i, a] = Σ_k X[i, k] · M[a, k]`` (both contiguous in k), reduced in two vectorisable stages;
    the result is in the accumulation type."""
    acc = acc_dtype(dtype)
    L = _lanes(d)
    ko = te.reduce_axis((0, d // L), name=f"{name}_ko")
    part = te.compute((n, rows, L), lambda i, a, v: te.sum(_up(X[i, ko * L + v], acc) * _up(M[a, ko * L + v], acc),
                                                          axis=ko), name=f"{name}_part")
    lv = te.reduce_axis((0, L), name=f"{name}_lane")
    return te.compute((n, rows), lambda i, a: te.sum(part[i, a, lv], axis=lv), name=name)


def forward_materialise(f: FactorShapes, dtype: str):
    """``y_io += scale · (x Aᵀ) Bᵀ`` with A (q, d_in) and Bᵀ (q, d_out) materialised by the caller."""
    n = te.var("n", "int64")
    x = te.placeholder((n, f.d_in), dtype, name="x")
    A = te.placeholder((f.q, f.d_in), dtype, name="A")
    Bt = te.placeholder((f.q, f.d_out), dtype, name="Bt")
    y_io = te.placeholder((n, f.d_out), dtype, name="y_io")
    ac = acc_dtype(dtype)
    scale = te.var("scale", ac)
    t = _dot_rows("t", x, A, n, f.q, f.d_in, dtype)
    a = te.reduce_axis((0, f.q), name="a")
    acc = te.compute((n, f.d_out), lambda i, j: te.sum(t[i, a] * _up(Bt[a, j], ac), axis=a), name="y_acc")
    y = te.compute((n, f.d_out), lambda i, j: (_up(y_io[i, j], ac) + scale * acc[i, j]).astype(dtype), name="y")
    return [x, A, Bt, scale, y_io, y]


def forward_factored(f: FactorShapes, dtype: str):
    """``y_io += scale · adapter(x)`` contracting the Kronecker modes directly; A and B are never formed."""
    n = te.var("n", "int64")
    x = te.placeholder((n, f.d_in), dtype, name="x")
    A1, A2, B1, B2 = _factors(f, dtype)
    y_io = te.placeholder((n, f.d_out), dtype, name="y_io")
    ac = acc_dtype(dtype)
    scale = te.var("scale", ac)
    j = te.reduce_axis((0, f.n2), name="j")
    u = te.compute((f.s, n, f.n1, f.r2), lambda l, i, p, b: te.sum(
        _up(x[i, p * f.n2 + j], ac) * _up(A2[l, b, j], ac), axis=j), name="u")
    l1, p1 = te.reduce_axis((0, f.s), name="l1"), te.reduce_axis((0, f.n1), name="p1")
    t = te.compute((n, f.r1, f.r2), lambda i, a, b: te.sum(u[l1, i, p1, b] * _up(A1[l1, a, p1], ac),
                                                          axis=[l1, p1]), name="t")
    a2 = te.reduce_axis((0, f.r1), name="a2")
    w = te.compute((f.s, n, f.m1, f.r2), lambda l, i, c, b: te.sum(_up(B1[l, c, a2], ac) * t[i, a2, b], axis=a2),
                   name="w")
    l3, b3 = te.reduce_axis((0, f.s), name="l3"), te.reduce_axis((0, f.r2), name="b3")
    acc = te.compute((n, f.d_out), lambda i, o: te.sum(
        w[l3, i, o // f.m2, b3] * _up(B2[l3, o % f.m2, b3], ac), axis=[l3, b3]), name="y_acc")
    y = te.compute((n, f.d_out), lambda i, o: (_up(y_io[i, o], ac) + scale * acc[i, o]).astype(dtype), name="y")
    return [x, A1, A2, B1, B2, scale, y_io, y]


def _project_pair(g, X1, X2, names):
    """Gradients of ``X1 (s, p, u)`` and ``X2 (s, k, v)`` from ``g(p, u, k, v)`` (in the accumulation type),
    the gradient of their Kronecker sum at ``[(p, u), (k, v)]``: ``dX1[l,p,u] = Σ_{k,v} g · X2[l,k,v]`` and
    the mirror; results in the factors' type."""
    s, P, U = X1.shape
    K, V = X2.shape[1:]
    ac = acc_dtype(X1.dtype)
    sfx = "" if ac == X1.dtype else "_sum"
    k, v = te.reduce_axis((0, K), name=f"{names[0]}_k"), te.reduce_axis((0, V), name=f"{names[0]}_v")
    dX1 = te.compute((s, P, U), lambda l, p, u: te.sum(g(p, u, k, v) * _up(X2[l, k, v], ac), axis=[k, v]),
                     name=names[0] + sfx)
    p, u = te.reduce_axis((0, P), name=f"{names[1]}_p"), te.reduce_axis((0, U), name=f"{names[1]}_u")
    dX2 = te.compute((s, K, V), lambda l, k, v: te.sum(g(p, u, k, v) * _up(X1[l, p, u], ac), axis=[p, u]),
                     name=names[1] + sfx)
    if ac == X1.dtype:
        return dX1, dX2
    down = lambda t, name: te.compute(t.shape, lambda *i: t(*i).astype(X1.dtype), name=name)  # noqa: E731
    return down(dX1, names[0]), down(dX2, names[1])


def _project(f: FactorShapes, dA, dB, A1, A2, B1, B2):
    """Factor gradients from full-factor ones: e.g. ``dA1[l,a,i] = Σ_{b,j} dA[a·r2+b, i·n2+j] · A2[l,b,j]``.
    dB is stored transposed, dBt (q, d_out): ``dBt[a·r2+b, c·m2+d] = dB_full[c·m2+d, a·r2+b]``."""
    dA1, dA2 = _project_pair(lambda a, i, b, j: dA[a * f.r2 + b, i * f.n2 + j], A1, A2, ("dA1", "dA2"))
    dB1, dB2 = _project_pair(lambda c, a, d, b: dB[a * f.r2 + b, c * f.m2 + d], B1, B2, ("dB1", "dB2"))
    return dA1, dA2, dB1, dB2


def backward_materialise(f: FactorShapes, dtype: str):
    """Adapter part of the backward, token path: u = dy B; t = x Aᵀ; dx_adapter = scale·u A (the vendor GEMM
    then accumulates ``dy W`` onto it); dA = scale·uᵀ x; dBᵀ = scale·tᵀ dy; then the projections."""
    n = te.var("n", "int64")
    dy = te.placeholder((n, f.d_out), dtype, name="dy")
    x = te.placeholder((n, f.d_in), dtype, name="x")
    A = te.placeholder((f.q, f.d_in), dtype, name="A")
    Bt = te.placeholder((f.q, f.d_out), dtype, name="Bt")
    A1, A2, B1, B2 = _factors(f, dtype)
    ac = acc_dtype(dtype)
    scale = te.var("scale", ac)
    u = _dot_rows("u", dy, Bt, n, f.q, f.d_out, dtype)
    t = _dot_rows("t", x, A, n, f.q, f.d_in, dtype)
    su = te.compute((n, f.q), lambda i, a: scale * u[i, a], name="su")
    st = te.compute((n, f.q), lambda i, a: scale * t[i, a], name="st")
    a = te.reduce_axis((0, f.q), name="a")
    dxa_acc = te.compute((n, f.d_in), lambda i, k: te.sum(su[i, a] * _up(A[a, k], ac), axis=a),
                         name="dx_adapter" if ac == dtype else "dx_adapter_sum")
    dxa = dxa_acc if ac == dtype else te.compute((n, f.d_in), lambda i, k: dxa_acc[i, k].astype(dtype),
                                                 name="dx_adapter")
    i1 = te.reduce_axis((0, n), name="i1")
    dA = te.compute((f.q, f.d_in), lambda a, k: te.sum(su[i1, a] * _up(x[i1, k], ac), axis=i1), name="dA")
    i2 = te.reduce_axis((0, n), name="i2")
    dBt = te.compute((f.q, f.d_out), lambda a, j: te.sum(st[i2, a] * _up(dy[i2, j], ac), axis=i2), name="dBt")
    return [dy, x, A, Bt, A1, A2, B1, B2, scale, dxa, *_project(f, dA, dBt, A1, A2, B1, B2)]


def forward_generic(f: FactorShapes, dtype: str, bias: bool = True):
    """A host-bound layer's forward in one kernel: A and Bᵀ from the factors (written out: the backward
    reuses them), then ``y = x Wᵀ + b + scale · (x Aᵀ) Bᵀ``, the base GEMM included (a host-bound problem's
    cost is its calls, not its arithmetic). Built with symbolic shapes (one kernel for every layer), where its
    indices cost divisions and nothing is scheduled: only tiny problems run it."""
    n = te.var("n", "int64")
    x = te.placeholder((n, f.d_in), dtype, name="x")
    W = te.placeholder((f.d_out, f.d_in), dtype, name="W")
    b = te.placeholder((f.d_out,), dtype, name="b") if bias else None
    A1, A2, B1, B2 = _factors(f, dtype)
    ac = acc_dtype(dtype)
    scale = te.var("scale", ac)
    la, lb = te.reduce_axis((0, f.s), name="la"), te.reduce_axis((0, f.s), name="lb")
    A = te.compute((f.q, f.d_in), lambda k, i: te.sum(
        _up(A1[la, k // f.r2, i // f.n2], ac) * _up(A2[la, k % f.r2, i % f.n2], ac), axis=la).astype(dtype), name="A")
    Bt = te.compute((f.q, f.d_out), lambda k, o: te.sum(
        _up(B1[lb, o // f.m2, k // f.r2], ac) * _up(B2[lb, o % f.m2, k % f.r2], ac), axis=lb).astype(dtype), name="Bt")
    kk, kb = te.reduce_axis((0, f.d_in), name="kk"), te.reduce_axis((0, f.d_in), name="kb")
    t = te.compute((n, f.q), lambda i, a: te.sum(_up(x[i, kk], ac) * _up(A[a, kk], ac), axis=kk), name="t")
    base = te.compute((n, f.d_out), lambda i, j: te.sum(_up(x[i, kb], ac) * _up(W[j, kb], ac), axis=kb), name="base")
    a = te.reduce_axis((0, f.q), name="a")
    acc = te.compute((n, f.d_out), lambda i, j: te.sum(t[i, a] * _up(Bt[a, j], ac), axis=a), name="y_acc")
    y = te.compute((n, f.d_out), lambda i, j: (base[i, j] + (_up(b[j], ac) if bias else 0.0)
                                               + scale * acc[i, j]).astype(dtype), name="y")
    return [x, W] + ([b] if bias else []) + [A1, A2, B1, B2, scale, A, Bt, y]


def backward_generic(f: FactorShapes, dtype: str):
    """A host-bound layer's backward in one kernel: ``backward_materialise`` plus the base's share of dx,
    ``dy W``. Built with symbolic shapes."""
    dy, x, A, Bt, A1, A2, B1, B2, scale, dxa, *grads = backward_materialise(f, dtype)
    W = te.placeholder((f.d_out, f.d_in), dtype, name="W")
    ac = acc_dtype(dtype)
    o = te.reduce_axis((0, f.d_out), name="o")
    dxb = te.compute(x.shape, lambda i, k: te.sum(_up(dy[i, o], ac) * _up(W[o, k], ac), axis=o), name="dx_base")
    dx = te.compute(x.shape, lambda i, k: (dxb[i, k] + _up(dxa[i, k], ac)).astype(dtype), name="dx")
    return [dy, x, W, A, Bt, A1, A2, B1, B2, scale, dx, *grads]


EXPRESSIONS = {  # (op, variant) -> expression; the variants are named as the PyTorch formulations that
    # compute the same algorithm (lsr_compile.formulations)
    ("forward", "materialise"): Expression(("x", "A", "Bt", "scale", "y_io", "y"), forward_materialise),
    ("forward", "factored"): Expression(("x", "A1", "A2", "B1", "B2", "scale", "y_io", "y"), forward_factored),
    ("backward", "materialise"): Expression(
        ("dy", "x", "A", "Bt", "A1", "A2", "B1", "B2", "scale", "dx_adapter", "dA1", "dA2", "dB1", "dB2"),
        backward_materialise),
}

GENERIC = {  # what a generic config ({"shapes": "any"}) compiles, once per dtype: the whole layer, one call
    ("forward", True): Expression(("x", "W", "b", "A1", "A2", "B1", "B2", "scale", "A", "Bt", "y"), forward_generic),
    ("forward", False): Expression(("x", "W", "A1", "A2", "B1", "B2", "scale", "A", "Bt", "y"),
                                   lambda f, dtype: forward_generic(f, dtype, bias=False)),
    ("backward", True): Expression(("dy", "x", "W", "A", "Bt", "A1", "A2", "B1", "B2", "scale", "dx", "dA1", "dA2",
                                    "dB1", "dB2"), backward_generic),
}
