"""LSRShape (a problem the user tunes for) and ProblemKey (what the tuning log and dispatch match on)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import FactorShapes, resolve_shapes

OPS = ("forward", "backward")
MIXED_OPS = ("mixed_forward", "mixed_backward")  # many adapters in one batch (mixed_formulations)
ADAPTER_OPS = ("adapter_forward", "adapter_backward")  # the adapter alone, beside a quantized base
ALL_OPS = OPS + MIXED_OPS + ADAPTER_OPS


def token_bucket(n: int) -> int:
    """Round N up to a power of two (min 16): variants' costs cross over with N, slowly."""
    return 16 if n <= 16 else 1 << (n - 1).bit_length()


def count_bucket(n: int) -> int:
    """Round a count (bank slots, segments) up to a power of two."""
    b = 1
    while b < n:
        b *= 2
    return b


MAX_TOKENS = 1 << 27  # rows of one call: sizes beyond any batch are refused before any work

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ProblemKey:
    """Everything a kernel choice depends on, except the device (which the log file carries)."""

    op: str
    dtype: str
    token_bucket: int  # the token count rounded up by token_bucket()
    s: int
    r1: int
    r2: int
    n1: int
    n2: int
    m1: int
    m2: int
    adapters: int = 1  # mixed ops: bank slots K, bucketed by count_bucket
    segments: int = 1  # mixed ops: segments S of the batch, bucketed
    base: str = "dense"  # the frozen base's format (lsr_compile.quantized): adapter ops run beside it

    @property
    def shapes(self) -> FactorShapes:
        return FactorShapes(self.s, self.r1, self.r2, self.n1, self.n2, self.m1, self.m2)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @staticmethod
    def of(op: str, dtype, tokens: int, f: FactorShapes, adapters: int = 1, segments: int = 1,
           base: str = "dense") -> "ProblemKey":
        """The key of ``tokens`` rows through a layer with factor shapes ``f`` (``dtype``: torch or name); for
        a mixed batch, ``adapters`` bank slots and ``segments`` segments; ``base``: the base's format."""
        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        return ProblemKey(op, name, token_bucket(tokens), f.s, f.r1, f.r2, f.n1, f.n2, f.m1, f.m2,
                          count_bucket(adapters), count_bucket(segments), base)

    @staticmethod
    def from_tensors(op: str, x2d, A1, A2, B1, B2, tokens: Optional[int] = None, segments: int = 1,
                     base: str = "dense") -> "ProblemKey":
        """The key of a call; ``tokens`` overrides the row count (a traced graph's symbolic one). Factors
        with a leading bank axis (``A1 (K, s, r1, n1)``) make a mixed-batch key."""
        K = A1.shape[0] if A1.dim() == 4 else 1
        s, r1, n1 = A1.shape[-3:]
        n = x2d.shape[0] if tokens is None else tokens
        return ProblemKey.of(op, x2d.dtype, n, FactorShapes(s, r1, A2.shape[-2], n1, A2.shape[-1], B1.shape[-2],
                                                            B2.shape[-2]), K, segments, base)


@dataclass(frozen=True)
class LSRShape:
    """One layer problem to tune: tokens x (d_out x d_in) with its adapter shapes (docs/design.md §1)."""

    tokens: int
    d_in: int
    d_out: int
    s: int = 4
    r: object = 2
    n: Optional[tuple] = None
    m: Optional[tuple] = None
    dtype: torch.dtype = torch.float32
    adapters: int = 1  # a mixed batch: bank slots
    segments: Optional[int] = None  # a mixed batch: segments (default: one per adapter, or per token if fewer)
    base: str = "dense"  # a quantized frozen base's format (lsr_compile.quantized.FORMATS)
    factors: FactorShapes = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or not 1 <= self.tokens <= MAX_TOKENS:
            raise ValueError(f"tokens must be a positive int of at most {MAX_TOKENS:,} (beyond any batch), got "
                             f"{self.tokens!r}")
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype {self.dtype!r} is not one LSR layers are tuned for; known: "
                                 f"{', '.join(DTYPES)} (or the torch dtypes)")
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        for name in ("adapters",) + (("segments",) if self.segments is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        from .quantized import DENSE, FORMATS

        if self.base not in FORMATS:
            raise ValueError(f"base={self.base!r} is not a base format (a key no layer would look up); known: "
                             f"{', '.join(FORMATS)}")
        if self.base != DENSE and self.mixed:
            raise ValueError(f"a mixed batch over a {self.base} base runs no mixed-batch op to tune: peft's "
                             f"adapter_names runs lsr::adapter once per adapter (tune LSRShape(tokens per adapter, "
                             f"..., base={self.base!r})) and an AdapterBank its factored rows, untuned")
        object.__setattr__(self, "factors", resolve_shapes(self.d_in, self.d_out, self.s, self.r, self.n, self.m))

    @staticmethod
    def of_factors(tokens: int, f: FactorShapes, dtype=torch.float32, base: str = "dense") -> "LSRShape":
        return LSRShape(tokens, f.d_in, f.d_out, f.s, (f.r1, f.r2), (f.n1, f.n2), (f.m1, f.m2), dtype, base=base)

    @property
    def mixed(self) -> bool:
        """A bank of adapters, or segments given: a mixed batch (one slot with base-only segments is one)."""
        return self.adapters > 1 or self.segments is not None

    @property
    def ops(self) -> tuple[str, ...]:
        """What this problem runs: the mixed-batch ops for a bank, the adapter ops beside a quantized base,
        else the layer ops."""
        if self.mixed:
            return MIXED_OPS
        return ADAPTER_OPS if self.base != "dense" else OPS

    def key(self, op: str) -> ProblemKey:
        if op in ADAPTER_OPS:
            return ProblemKey.of(op, self.dtype, self.tokens, self.factors, base=self.base)
        if op in MIXED_OPS:
            return ProblemKey.of(op, self.dtype, self.tokens, self.factors, self.adapters, self.num_segments)
        return ProblemKey.of(op, self.dtype, self.tokens, self.factors)

    @property
    def num_segments(self) -> int:
        return self.segments if self.segments is not None else min(self.tokens, self.adapters)

    def label(self) -> str:
        f = self.factors
        mixed = f" K={self.adapters} S={self.num_segments}" if self.mixed else ""
        return (f"N={self.tokens} {f.d_out}x{f.d_in} s={f.s} r=({f.r1},{f.r2}) "
                f"n=({f.n1},{f.n2}) m=({f.m1},{f.m2}) {dtype_name(self.dtype)}{mixed}")
