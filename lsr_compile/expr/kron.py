"""The Kronecker parts of a step (``step.py``) as TVM tensor expressions, every size symbolic.

One compiled function per dtype serves every layer shape: these are small kernels (``s·q·(d_in + d_out)``
multiply-adds) whose cost on a CPU is mostly the call, so they trade the specialisation that the token-path
expressions (``adapter.py``) get for compiling once per process (about 0.1 s each).

    factors(A1, A2, B1, B2) -> A (r1, r2, n1, n2), Bt (r1, r2, m1, m2)      viewed as (q, d_in), (q, d_out)
    project(dA, dBt, A1, A2, B1, B2, scale) -> dA1, dA2, dB1, dB2
        dA (q, d_in); dBt (P, q, d_out), partial sums over P; e.g. dA1[l,a,e] = scale·Σ_{b,f} dA[a·r2+b, e·n2+f]·A2[l,b,f]

The outputs of ``factors`` are 4-D so that no index is a symbolic division (which made the kernel 3-4x
slower at 768² and 4096²); the caller views them as matrices.
"""
from __future__ import annotations

from tvm import te

from .adapter import acc_dtype

_NAMES = ("s", "r1", "r2", "n1", "n2", "m1", "m2")


def _symbolic_factors(dtype: str):
    s, r1, r2, n1, n2, m1, m2 = (te.var(n, "int64") for n in _NAMES)
    A1 = te.placeholder((s, r1, n1), dtype, name="A1")
    A2 = te.placeholder((s, r2, n2), dtype, name="A2")
    B1 = te.placeholder((s, m1, r1), dtype, name="B1")
    B2 = te.placeholder((s, m2, r2), dtype, name="B2")
    return (s, r1, r2, n1, n2, m1, m2), (A1, A2, B1, B2)


def factors(dtype: str) -> list:
    """``A[a,b,e,f] = Σ_l A1[l,a,e]·A2[l,b,f]``, ``Bt[a,b,c,d] = Σ_l B1[l,c,a]·B2[l,d,b]``."""
    (s, r1, r2, n1, n2, m1, m2), (A1, A2, B1, B2) = _symbolic_factors(dtype)
    la, lb = te.reduce_axis((0, s), name="la"), te.reduce_axis((0, s), name="lb")
    A = te.compute((r1, r2, n1, n2), lambda a, b, e, f: te.sum(A1[la, a, e] * A2[la, b, f], axis=la), name="A")
    Bt = te.compute((r1, r2, m1, m2), lambda a, b, c, d: te.sum(B1[lb, c, a] * B2[lb, d, b], axis=lb), name="Bt")
    return [A1, A2, B1, B2, A, Bt]


def project(dtype: str) -> list:
    """The four factor gradients from ``scale·dA`` and ``scale·Σ_P dBt`` (accumulated in ``acc_dtype``)."""
    (s, r1, r2, n1, n2, m1, m2), (A1, A2, B1, B2) = _symbolic_factors(dtype)
    P = te.var("P", "int64")
    dA = te.placeholder((r1 * r2, n1 * n2), dtype, name="dA")
    dBt = te.placeholder((P, r1 * r2, m1 * m2), dtype, name="dBt")
    ac = acc_dtype(dtype)
    scale = te.var("scale", ac)
    up = lambda v: v if v.dtype == ac else v.astype(ac)  # noqa: E731
    p = te.reduce_axis((0, P), name="p")
    G = te.compute((r1 * r2, m1 * m2), lambda k, o: te.sum(up(dBt[p, k, o]), axis=p), name="dBt_sum")
    b, f = te.reduce_axis((0, r2), name="b"), te.reduce_axis((0, n2), name="f")
    dA1 = te.compute((s, r1, n1), lambda l, a_, e_: te.sum(scale * up(dA[a_ * r2 + b, e_ * n2 + f]) * up(A2[l, b, f]),
                                                          axis=[b, f]), name="dA1")
    a, e = te.reduce_axis((0, r1), name="a"), te.reduce_axis((0, n1), name="e")
    dA2 = te.compute((s, r2, n2), lambda l, b_, f_: te.sum(scale * up(dA[a * r2 + b_, e * n2 + f_]) * up(A1[l, a, e]),
                                                          axis=[a, e]), name="dA2")
    d, b2 = te.reduce_axis((0, m2), name="d"), te.reduce_axis((0, r2), name="b2")
    dB1 = te.compute((s, m1, r1), lambda l, c_, a_: te.sum(scale * G[a_ * r2 + b2, c_ * m2 + d] * up(B2[l, d, b2]),
                                                          axis=[d, b2]), name="dB1")
    c, a2 = te.reduce_axis((0, m1), name="c"), te.reduce_axis((0, r1), name="a2")
    dB2 = te.compute((s, m2, r2), lambda l, d_, b_: te.sum(scale * G[a2 * r2 + b_, c * m2 + d_] * up(B1[l, c, a2]),
                                                          axis=[c, a2]), name="dB2")
    outs = [dA1, dA2, dB1, dB2]
    if ac != dtype:
        outs = [te.compute(t.shape, lambda *i, t=t: t(*i).astype(dtype), name=t.op.name + "_out") for t in outs]
    return [dA, dBt, A1, A2, B1, B2, scale, *outs]


KRON = {"factors": factors, "project": project}
