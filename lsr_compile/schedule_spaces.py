"""Read the schedule spaces in ``schedules/`` (data, one JSON file per target)."""
from __future__ import annotations

import functools
import itertools
import json

from . import shipped



@functools.lru_cache(maxsize=None)
def load(name: str) -> dict:
    folder = shipped.data_dir("schedules")
    path = folder / f"{name}.json"
    if not path.exists():
        raise ValueError(f"no schedule space {path}; known: {sorted(p.stem for p in folder.glob('*.json'))}")
    return json.loads(path.read_text())


def dtypes(name: str) -> list[str]:
    """The dtypes the backend of this space has kernels for."""
    return list(load(name)["dtypes"])


def variants(name: str, op: str) -> list[str]:
    return sorted(load(name).get(op, {}))


def default(name: str, op: str, variant: str, dtype: str | None = None) -> dict:
    """The point that runs untuned; a space may name one per dtype (``default_by_dtype``)."""
    entry = load(name)[op][variant]
    return dict(entry.get("default_by_dtype", {}).get(dtype, entry["default"]))


def generic(name: str, op: str, variant: str) -> dict | None:
    """The point compiled once for every shape (TVM: ``{"shapes": "any"}``), where the space has one."""
    g = load(name)[op][variant].get("generic")
    return dict(g) if g is not None else None


def space(name: str, op: str, variant: str) -> list[dict]:
    """Every point of the space (a grid of knobs, or a list of points), the default first, the generic point
    (if any) last."""
    entry = load(name)[op][variant]
    knobs = entry["space"]
    if isinstance(knobs, list):
        points = [dict(p) for p in knobs]
    else:
        points = [dict(zip(knobs, vals)) for vals in itertools.product(*knobs.values())]
    d = entry["default"]
    g = entry.get("generic")
    return [d] + [p for p in points if p != d] + ([dict(g)] if g is not None else [])


def points(name: str, op: str, variant: str) -> list[dict]:
    """Every config a record may hold: the space and the per-dtype defaults."""
    entry = load(name)[op][variant]
    return space(name, op, variant) + [dict(p) for p in entry.get("default_by_dtype", {}).values()]
