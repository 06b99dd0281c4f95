"""LSRConfig and the choice of Kronecker factor shapes.

A layer's adapter is fixed by (s, r1, r2, n1, n2, m1, m2). The factor shapes are
chosen per layer from its (d_in, d_out) unless the user pins them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from peft.config import PeftConfig

from ._peft_type import LSR_PEFT_TYPE

# A split whose larger factor is more than this many times the smaller one is
# not "sensible": one Kronecker factor becomes a near-vector and the adapter
# degenerates towards a rank-deficient LoRA on one side.
MAX_FACTOR_RATIO = 64
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
# Sizes beyond any real layer are refused before any work (the widest layers in use, vocabulary heads, are
# ~256k; factor searches are then bounded by a few thousand steps): a typo of 10**12 must not run for minutes.
MAX_DIM = 1 << 22
MAX_RANK = 1 << 12  # s, r1, r2: a Kronecker term of rank 4096 is far beyond any adapter


class LSRConfigWarning(UserWarning):
    """A configuration that computes what it says but cannot use all it asks for."""


class FactorizationError(ValueError):
    """A dimension cannot be split into two Kronecker factors as asked."""


def _check_dim(d, what: str) -> None:
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise FactorizationError(f"{what} must be a positive integer, got {d!r}")
    if d > MAX_DIM:
        raise FactorizationError(f"{what} = {d} is beyond any real layer (at most {MAX_DIM:,}); check the size")


def factor_pair(d: int, what: str = "dimension") -> tuple[int, int]:
    """Most balanced split ``d = a * b`` with ``a >= b``; e.g. 768 -> (32, 24)."""
    _check_dim(d, what)
    b = math.isqrt(d)
    while d % b:
        b -= 1
    a = d // b
    if b < 2 or a > MAX_FACTOR_RATIO * b:
        hint = _nearby_factorable(d)
        raise FactorizationError(
            f"{what} = {d} has no sensible Kronecker split (best is {a} x {b}). "
            f"Pass the factor shapes by hand (n=(n1, n2) for d_in, m=(m1, m2) for d_out), "
            f"or leave this layer out of target_modules, or pad the layer to a nearby size "
            f"that factors well, e.g. {hint}."
        )
    return a, b


def _nearby_factorable(d: int) -> str:
    for delta in range(1, d):
        for c in (d + delta, d - delta):
            if c > 3:
                b = math.isqrt(c)
                while c % b:
                    b -= 1
                if b >= 2 and c // b <= 4 * b:
                    return f"{c} = {c // b} x {b}"
    return "a power of two"


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _as_pair(v, name, limit: int = MAX_DIM) -> Optional[tuple[int, int]]:
    if v is None:
        return None
    if _is_count(v):
        t = (v, v)
    else:
        try:
            t = tuple(v)
        except TypeError:
            t = ()
        if len(t) != 2 or not all(_is_count(i) for i in t):
            raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    if max(t) > limit:
        raise ValueError(f"{name} = {v!r} is beyond any real adapter (at most {limit:,}); check the value")
    return t


def lora_rank(v, name: str = "rank") -> tuple[int, int]:
    """LoRA's rank as LSR's (r1, r2), q = r1·r2: an int the most balanced split (8 -> (4, 2)), a pair as given."""
    if not _is_count(v):
        return _as_pair(v, name, MAX_RANK)
    if v > MAX_RANK * MAX_RANK:
        raise ValueError(f"{name} = {v} is beyond any real adapter (LoRA's rank, at most {MAX_RANK ** 2:,}); "
                         f"check the value")
    r2 = max(d for d in range(1, math.isqrt(v) + 1) if v % d == 0)
    if v // r2 > MAX_RANK:
        raise ValueError(f"{name} = {v} splits at best as r = ({v // r2}, {r2}), a Kronecker rank beyond any real "
                         f"adapter (at most {MAX_RANK}); choose a rank with a more even split")
    return v // r2, r2


def _names(v, name):
    """target_modules / exclude_modules: None, a regex string, or names (a set)."""
    if v is None or isinstance(v, str):
        return v
    try:
        names = set(v)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{name} must be a regex string or a list of module names, got {v!r}")
    return names


@dataclass(frozen=True)
class FactorShapes:
    """Resolved shapes of one layer's adapter (docs/design.md §1)."""

    s: int
    r1: int
    r2: int
    n1: int
    n2: int
    m1: int
    m2: int

    @property
    def q(self) -> int:
        return self.r1 * self.r2

    @property
    def d_in(self) -> int:
        return self.n1 * self.n2

    @property
    def d_out(self) -> int:
        return self.m1 * self.m2

    @property
    def num_params(self) -> int:
        return self.s * (self.r1 * self.n1 + self.r2 * self.n2 + self.m1 * self.r1 + self.m2 * self.r2)

    def factor_sizes(self) -> dict[str, tuple[int, int, int]]:
        return {
            "A1": (self.s, self.r1, self.n1),
            "A2": (self.s, self.r2, self.n2),
            "B1": (self.s, self.m1, self.r1),
            "B2": (self.s, self.m2, self.r2),
        }


def resolve_shapes(d_in: int, d_out: int, s: int, r, n=None, m=None) -> FactorShapes:
    """Factor shapes for a (d_out x d_in) layer; ``n``/``m`` pin them, ``None`` = automatic."""
    if not _is_count(s) or s > MAX_RANK:
        raise ValueError(f"separation rank s must be a positive int of at most {MAX_RANK}, got {s!r}")
    r1, r2 = _as_pair(r, "r", MAX_RANK)
    _check_dim(d_in, "d_in")
    _check_dim(d_out, "d_out")
    n1, n2 = _as_pair(n, "n") or factor_pair(d_in, "d_in")
    m1, m2 = _as_pair(m, "m") or factor_pair(d_out, "d_out")
    if n1 * n2 != d_in:
        raise FactorizationError(f"n = ({n1}, {n2}) does not factor d_in = {d_in}: {n1}*{n2} = {n1 * n2}")
    if m1 * m2 != d_out:
        raise FactorizationError(f"m = ({m1}, {m2}) does not factor d_out = {d_out}: {m1}*{m2} = {m1 * m2}")
    _warn_unusable(s, r1, r2, n1, n2, m1, m2)
    return FactorShapes(s, r1, r2, n1, n2, m1, m2)


_unusable_warned: set = set()
_rank_warned: set = set()


def _warn_square_rank(r, where: str, stacklevel: int) -> None:
    """An int r >= 4 is almost surely LoRA's rank, but LSR reads it as r1 = r2 = r (q = r²). Warned once per value
    and place, with the spelling of a LoRA-r-sized update."""
    if not (_is_count(r) and 4 <= r <= MAX_RANK) or (where, r) in _rank_warned:
        return
    _rank_warned.add((where, r))
    import warnings

    warnings.warn(f"{where} = {r} in LSRConfig sets both Kronecker ranks r1 = r2 = {r}: inner rank q = {r * r}, the "
                  f"rank LoRA calls r. For a LoRA-{r}-sized update give (r1, r2) with r1*r2 = {r}, e.g. "
                  f"{lora_rank(r)}, or use lsr_compile.lsr_config_for_lora, which reads ints as LoRA's ranks",
                  LSRConfigWarning, stacklevel=stacklevel + 1)


def useful_terms(r1, r2, n1, n2, m1, m2) -> int:
    """The most Kronecker terms that can add anything: A's sum spans at most min(r1·n1, r2·n2) of them (the rank of
    A rearranged as Σ_l vec(A1[l]) vec(A2[l])ᵀ), B's at most min(m1·r1, m2·r2); the two sums share s, so the
    larger bound is the one that binds."""
    return max(min(r1 * n1, r2 * n2), min(m1 * r1, m2 * r2))


def _warn_unusable(s, r1, r2, n1, n2, m1, m2) -> None:
    """An inner rank no factor can carry (r1 > min(n1, m1): A1[l] is r1 x n1, B1[l] m1 x r1) or more terms
    than either Kronecker sum can hold computes correctly but trains parameters that add nothing. Warned once per
    shape, with the nearest choice that does not."""
    r1_ok, r2_ok = min(r1, n1, m1), min(r2, n2, m2)
    s_ok = min(s, useful_terms(r1_ok, r2_ok, n1, n2, m1, m2))
    key = (s, r1, r2, n1, n2, m1, m2)
    if (r1_ok, r2_ok, s_ok) != (r1, r2, s) and key not in _unusable_warned:
        _unusable_warned.add(key)
        import warnings

        warnings.warn(f"LSR adapter s={s}, r=({r1}, {r2}) on factors n=({n1}, {n2}), m=({m1}, {m2}) asks for more than "
                      f"it can use: the inner ranks are at most min(n, m) per factor and the terms at most the "
                      f"factors' sizes; s={s_ok}, r=({r1_ok}, {r2_ok}) trains the same update with fewer "
                      f"parameters", LSRConfigWarning, stacklevel=3)


LOADING_NOTE_HEADING = "## Loading this LSR-Adapt adapter"
LOADING_NOTE = f"""{LOADING_NOTE_HEADING}

This adapter's `peft_type` is `LSR`, which peft learns from the `lsr_compile` package: import it before
loading, or peft stops with `KeyError: 'LSR'`.

```python
import lsr_compile  # registers PeftType.LSR with peft
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/to/this/folder")
```

A stack that knows only LoRA can take the same adapter exactly as a rank-q LoRA: `lsr_compile.export_lora`.
"""


_STRUCTURE_KEYS = ("s", "r", "n", "m")


def _structure(key, v) -> dict:
    """A rank_pattern entry as the config fields it sets: an int or a pair is r; a dict names s, r, n, m."""
    where = f"rank_pattern[{key!r}]"
    if isinstance(v, dict):
        unknown = set(v) - set(_STRUCTURE_KEYS)
        if unknown or not v:
            raise ValueError(f"{where} must set some of {_STRUCTURE_KEYS}, got keys {sorted(v)}")
        out = dict(v)
    else:
        out = {"r": v}
    if "s" in out and (not _is_count(out["s"]) or out["s"] > MAX_RANK):
        raise ValueError(f"{where}: s must be a positive int of at most {MAX_RANK}, got {out['s']!r}")
    if "r" in out:
        out["r"] = _as_pair(out["r"], f"{where} r", MAX_RANK)
    for k in ("n", "m"):
        if out.get(k) is not None:
            out[k] = _as_pair(out[k], f"{where} {k}")
    return out


def _alpha(where: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{where} must be a finite number > 0, got {v!r}")
    return float(v)


@dataclass(repr=False)
class LSRConfig(PeftConfig):
    """Configuration of LSR-Adapt adapters; also a peft config (``get_peft_model(model, cfg)``).

    ``ΔW = scale · B · A`` with ``A = Σ_l A1[l] ⊗ A2[l]``, ``B = Σ_l B1[l] ⊗ B2[l]``. The update's rank, what
    LoRA calls ``r``, is the inner rank ``q = r1·r2`` (``inner_rank``); ``lsr_config_for_lora(rank, budget)``
    gives the config that stands in for a LoRA rank.

    Learning rate: start at about 3x the rate you would use for LoRA (LoRA 3e-3 -> LSR 1e-2), or keep LoRA's
    rate and set ``alpha`` so that the scale is about 3 (``alpha = 3·sqrt(q)`` with ``scaling="rslora"``): at
    scale 1 an LSR update moves more slowly per step. Rows behind it: docs/llms.md, "Learning rates".
    """

    s: int = field(default=4, metadata={"help": "Separation rank: number of Kronecker terms in each factor."})
    r: Union[int, tuple] = field(
        default=2, metadata={"help": "Kronecker inner ranks: int (r1 = r2) or (r1, r2); inner rank q = r1*r2."}
    )
    n: Optional[tuple] = field(
        default=None, metadata={"help": "(n1, n2) with n1*n2 = d_in; None chooses the most balanced split per layer."}
    )
    m: Optional[tuple] = field(
        default=None, metadata={"help": "(m1, m2) with m1*m2 = d_out; None chooses the most balanced split per layer."}
    )
    alpha: Optional[float] = field(
        default=None, metadata={"help": "Scaling numerator; see `scaling`. None: scale 1 (alpha = sqrt(q) with "
                                        "'rslora', q with 'lora'), LoRA's default scale."})
    init: str = field(
        default="zeros",
        metadata={"help": "'zeros': B2 = 0 so the update is zero at step 0 (all factors still train), the "
                          "others scaled so a first SGD step moves the output about as much as LoRA's does; "
                          "'reference': every factor ~ N(0, 0.01²) as in the method's reference code."},
    )
    scaling: str = field(
        default="rslora", metadata={"help": "'rslora': scale = alpha/sqrt(q) (reference code); 'lora': alpha/q."}
    )
    target_modules: Optional[Union[list, str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex (full match) of the nn.Linear layers to adapt; "
                          "None uses the default for known architectures."},
    )
    exclude_modules: Optional[Union[list, str]] = field(
        default=None, metadata={"help": "Module names or a regex of layers never to adapt."}
    )
    modules_to_save: Optional[list] = field(
        default=None, metadata={"help": "Other modules trained and saved with the adapter (e.g. a classifier head)."}
    )
    ensure_weight_tying: bool = field(
        default=False, metadata={"help": "As LoRA's option of that name: a layer tied to the input embeddings in "
                                         "modules_to_save (a tied lm_head) trains one copy that the embeddings "
                                         "share, so the model stays tied; False: the layer's copy alone trains and "
                                         "the tie is broken (peft's default, with its warning)."})
    lsr_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the adapter's input in training (LoRA's lora_dropout): the base "
                                       "sees x, the adapter dropout(x)."})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "Dropout over the inner rank in training, as LoKr's and LoHa's: each of the "
                                       "q components of x Aᵀ is dropped with this probability (one mask per call)."})
    rank_dropout_scale: bool = field(
        default=False, metadata={"help": "Scale the kept rank components by 1 / (1 - rank_dropout), as LoKr's."})
    module_dropout: float = field(
        default=0.0, metadata={"help": "Probability that a layer's whole adapter is left out of a call in training, "
                                       "as LoKr's and LoHa's."})
    layers_to_transform: Optional[Union[list, int]] = field(
        default=None, metadata={"help": "Layer indexes to adapt (an int: that layer only); the index is the number "
                                        "after `layers_pattern` in a module's name (peft's rule). Needs "
                                        "target_modules as names, not a regex."})
    layers_pattern: Optional[Union[list, str]] = field(
        default=None, metadata={"help": "The name of the layer list whose index layers_to_transform reads (e.g. "
                                        "'layers', 'h'); None: the first numbered part of the module's name."})
    rank_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-layer structure, {name or regex: r}: r as an int or (r1, r2), or "
                                                "a dict of s, r, n, m; matched as peft's rank_pattern is."})
    alpha_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-layer alpha, {name or regex: alpha}; matched as peft's "
                                                "alpha_pattern is."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = LSR_PEFT_TYPE
        if self.init not in ("zeros", "reference"):
            raise ValueError(f"init must be 'zeros' or 'reference', got {self.init!r}")
        if self.scaling not in ("rslora", "lora"):
            raise ValueError(f"scaling must be 'rslora' or 'lora', got {self.scaling!r}")
        _warn_square_rank(self.r, "r", 3)
        self.r = _as_pair(self.r, "r", MAX_RANK)
        self.n = _as_pair(self.n, "n")
        self.m = _as_pair(self.m, "m")
        if not _is_count(self.s) or self.s > MAX_RANK:
            raise ValueError(f"s must be a positive int of at most {MAX_RANK}, got {self.s!r}")
        if self.alpha is not None:
            self.alpha = _alpha("alpha (or None for scale 1)", self.alpha)
        self.target_modules = _names(self.target_modules, "target_modules")
        self.exclude_modules = _names(self.exclude_modules, "exclude_modules")
        for name in ("lsr_dropout", "rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {v!r}")
            setattr(self, name, float(v))
        self._check_layer_selection()
        self.rank_pattern = dict(self.rank_pattern or {})
        for k, v in self.rank_pattern.items():  # an int r there is read as r is, and warned as r is
            _warn_square_rank(v.get("r") if isinstance(v, dict) else v, f"rank_pattern[{k!r}]", 3)
        self.rank_pattern = {k: _structure(k, v) for k, v in self.rank_pattern.items()}
        self.alpha_pattern = {k: _alpha(f"alpha_pattern[{k!r}]", v) for k, v in dict(self.alpha_pattern or {}).items()}

    def _check_layer_selection(self) -> None:
        """layers_to_transform and layers_pattern as peft's tuners check them."""
        idx, pattern = self.layers_to_transform, self.layers_pattern
        if idx is not None:
            items = [idx] if isinstance(idx, int) and not isinstance(idx, bool) else idx
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
                raise ValueError(f"layers_to_transform must be a layer index or a list of them (ints >= 0), "
                                 f"got {idx!r}")
            if not isinstance(idx, int):
                self.layers_to_transform = list(items)
        if pattern is not None and not (isinstance(pattern, str) or (
                isinstance(pattern, (list, tuple)) and all(isinstance(p, str) for p in pattern))):
            raise ValueError(f"layers_pattern must be a name or a list of names, got {pattern!r}")
        if isinstance(self.target_modules, str) and (idx is not None or pattern is not None):
            raise ValueError("layers_to_transform and layers_pattern cannot be used when target_modules is a regex "
                             "(a str): name the modules, or put the layer indexes into the regex")
        if pattern and idx is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    @property
    def inner_rank(self) -> int:
        """q = r1·r2: the rank of every layer's update ΔW, what LoRA calls its r (``rank_pattern`` may change it
        per layer)."""
        r1, r2 = self.r
        return r1 * r2

    def __repr__(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.repr]
        at = next(i for i, f in enumerate(fields) if f.startswith("r="))
        fields.insert(at + 1, f"inner_rank={self.inner_rank}")  # what LoRA calls r
        return f"{type(self).__name__}({', '.join(fields)})"

    def selects(self, name: str) -> bool:
        """Whether ``layers_to_transform`` / ``layers_pattern`` keep the module ``name`` (peft's rule: the first
        number after the pattern, or after any name part when no pattern is given)."""
        idx = self.layers_to_transform
        if idx is None:
            return True
        layer = self.layer_index(name)
        if layer is None:
            return False
        return layer == idx if isinstance(idx, int) else layer in idx

    def layer_index(self, name: str) -> Optional[int]:
        """The layer index ``layers_to_transform`` reads in the module ``name``; None if it has none."""
        patterns = self.layers_pattern
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        if patterns:
            match = next((m for m in (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in patterns) if m),
                         None)
        else:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        return None if match is None else int(match.group("idx"))

    def pattern_for(self, name: str) -> dict:
        """The ``rank_pattern`` entry (the fields it sets) that applies to the module ``name``; {} if none."""
        from peft.utils.other import get_pattern_key

        if not self.rank_pattern:
            return {}
        return self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), name), {})

    def for_layer(self, name: str) -> "LSRConfig":
        """This config with ``rank_pattern`` / ``alpha_pattern`` applied for the module ``name``."""
        from peft.utils.other import get_pattern_key

        changes = dict(self.pattern_for(name))
        if self.alpha_pattern:
            key = get_pattern_key(self.alpha_pattern.keys(), name)
            if key in self.alpha_pattern:
                changes["alpha"] = self.alpha_pattern[key]
        if not changes:
            return self
        return dataclasses.replace(self, rank_pattern={}, alpha_pattern={}, **changes)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """peft's save, plus a note in the folder's model card: peft learns the "LSR" type only when
        lsr_compile is imported, and ``PeftModel.from_pretrained`` without it fails with ``KeyError: 'LSR'``."""
        super().save_pretrained(save_directory, **kwargs)
        card = Path(save_directory) / "README.md"
        text = card.read_text() if card.exists() else ""
        if LOADING_NOTE_HEADING not in text:
            card.write_text(text.rstrip("\n") + ("\n\n" if text else "") + LOADING_NOTE)

    def shapes_for(self, d_in: int, d_out: int) -> FactorShapes:
        return resolve_shapes(d_in, d_out, self.s, self.r, self.n, self.m)

    def scale_for(self, q: int) -> float:
        if self.alpha is None:
            return 1.0
        scale = self.alpha / math.sqrt(q) if self.scaling == "rslora" else self.alpha / q
        if scale > FLOAT32_MAX:  # a kernel would fail converting it, or overflow every output
            raise ValueError(f"alpha={self.alpha:g} gives scale {scale:g} for q={q}, beyond float32's range "
                             f"({FLOAT32_MAX:g})")
        return scale


# LoraConfig options with no LSR meaning: named, with what to do instead, not dataclass's bare "unexpected keyword"
_LORA_ONLY = {
    "target_parameters": "LSR adapts layers (nn.Linear, transformers' Conv1D), not parameter tensors such as a "
                         "mixture of experts' fused expert weights; target_modules='all-linear' adapts every linear "
                         "layer and names the expert tensors and routers it leaves (adapt those with peft LoRA's "
                         "target_parameters)",
    "trainable_token_indices": "LSR adds no token-embedding adapter; train the embeddings in modules_to_save instead",
}
_dataclass_init = LSRConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, **kwargs):
    for name, instead in _LORA_ONLY.items():
        if name in kwargs:
            raise TypeError(f"LSRConfig does not take {name}: {instead} (docs/support.md)")
    _dataclass_init(self, *args, **kwargs)


LSRConfig.__init__ = _init
