"""Tuning logs: JSON lines, one record per tuned (device, op, shape bucket, dtype).

Layout: ``<log_dir>/<target>/<device_id>/<op>.jsonl``. A record holds everything
needed to rebuild its winner (backend, variant, config) without re-tuning, plus
the device and library versions it was measured with. Appends take an exclusive
``flock`` and write one line in one ``write``, so concurrent tuners lose nothing.
A line that is corrupt, or from another device or library version, is skipped
with a warning, never applied.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import fcntl
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from . import shipped
from .problem import ALL_OPS, ProblemKey

SCHEMA = 2
_appends = 0


class TuningLogWarning(UserWarning):
    """A tuning-log line was skipped (corrupt, foreign device, other library version)."""


# module -> the distributions that install it: their metadata gives the version without importing the module
# (importing TVM takes 2-8 s, which a first training step on an untuned problem would otherwise pay)
_DISTRIBUTIONS = {"tvm": ("apache-tvm",), "triton": ("triton", "pytorch-triton")}


@functools.lru_cache(maxsize=1)
def _compiler_versions() -> tuple:
    from importlib import metadata

    out = []
    for mod, dists in _DISTRIBUTIONS.items():
        version = None
        for dist in dists:
            try:
                version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        if version is None and importlib.util.find_spec(mod) is not None:  # built from source: ask the module
            try:
                version = __import__(mod).__version__
            except Exception:
                version = None
        out.append((mod, version))
    return tuple(out)


def library_versions() -> dict:
    import torch

    return {"torch": torch.__version__.split("+")[0]} | dict(_compiler_versions())


def _version_ok(backend: str, recorded: dict, current: dict) -> bool:
    """A record stays valid while the library that built its kernel is at the same major.minor."""
    mm = lambda v: ".".join(str(v).split(".")[:2]) if v else None  # noqa: E731
    return all(mm(recorded.get(lib)) == mm(current.get(lib)) for lib in {backend, "torch"})


@dataclass(frozen=True)
class Record:
    key: ProblemKey
    backend: str
    variant: str
    config: dict
    time_ms: float
    source: str  # "file:line", for explain()


def log_path(log_dir: Path, target: str, device_id: str, op: str) -> Path:
    return Path(log_dir) / target / device_id / f"{op}.jsonl"


def appends() -> int:
    """How many records this process has appended (readers that cache records compare it)."""
    return _appends


def append(path: Path, record: dict) -> None:
    """Append one record atomically (exclusive lock, single write); never rewrites existing lines. A file whose
    last line is unterminated (a hand edit, a write cut short) gets the newline first, so the record starts a
    line of its own instead of being glued to that one (and both skipped as one corrupt line)."""
    global _appends
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        fd, readable = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644), True
    except PermissionError:  # a file we may append to but not read: an empty line costs nothing (skipped)
        fd, readable = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size  # under the lock: no other append can land between this and the write
        if size and (not readable or os.pread(fd, 1, size - 1) != b"\n"):
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    _appends += 1


BACKENDS = {"llvm": ("torch", "tvm"), "cuda": ("torch", "tvm", "triton")}
_MAX_DIM = 1 << 24  # bigger than any layer dimension or token bucket a record could honestly hold


def _count(v, what: str, limit: int = _MAX_DIM) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
        raise ValueError(f"{what} must be an int in [1, {limit}], got {v!r}")
    return v


_RENAMED_VARIANTS = {"adapter": "materialise", "kron": "factored"}  # TVM's names in schema 1


def upgrade(d):
    """A schema-1 record in schema 2 (the key's ``tokens`` became ``token_bucket``; TVM's variants took the
    names of the PyTorch formulations that compute the same algorithm); anything else unchanged."""
    if not isinstance(d, dict) or d.get("schema") != 1 or not isinstance(d.get("key"), dict):
        return d
    d = dict(d, schema=2, key={("token_bucket" if k == "tokens" else k): v for k, v in d["key"].items()})
    if d.get("backend") == "tvm" and d.get("variant") in _RENAMED_VARIANTS:
        d["variant"] = _RENAMED_VARIANTS[d["variant"]]
    return d


def _validate(d, target: str) -> Record:
    """Every field of a record, or ValueError naming the first one that is wrong. A config must be a point
    of the current schedule space (so every knob is bounded before a kernel is built from it)."""
    from . import schedule_spaces
    from .device import space_name
    from .kernels import torch_formulations
    from .quantized import FORMATS
    from .problem import DTYPES

    d = upgrade(d)
    if not isinstance(d, dict):
        raise ValueError(f"a record is a JSON object, got {type(d).__name__}")
    if d.get("schema") != SCHEMA:
        raise ValueError(f"schema {d.get('schema')!r}, expected {SCHEMA}")
    k = d.get("key")
    fields, optional = set(ProblemKey.__dataclass_fields__), {"adapters", "segments", "base"}
    if not isinstance(k, dict) or not fields - optional <= set(k) <= fields:
        raise ValueError(f"key must hold {sorted(fields - optional)} (and, where they apply, "
                         f"{sorted(optional)}), got {k!r}")
    if k.get("base", "dense") not in FORMATS:
        raise ValueError(f"unknown base format {k['base']!r}; known: {FORMATS}")
    if k["op"] not in ALL_OPS:
        raise ValueError(f"unknown op {k['op']!r}; known: {ALL_OPS}")
    if k["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {k['dtype']!r}; known: {sorted(DTYPES)}")
    tokens = _count(k["token_bucket"], "key.token_bucket")
    if tokens < 16 or tokens & (tokens - 1):
        raise ValueError(f"key.token_bucket must be a power of two >= 16, got {tokens}")
    for f in ("s", "r1", "r2", "n1", "n2", "m1", "m2"):
        _count(k[f], f"key.{f}")
    for f in {"adapters", "segments"} & set(k):
        v = _count(k[f], f"key.{f}")
        if v & (v - 1):
            raise ValueError(f"key.{f} is a bucket (a power of two), got {v}")
    key = ProblemKey(**k)
    backend, variant, config = d.get("backend"), d.get("variant"), d.get("config")
    if backend not in BACKENDS[target]:
        raise ValueError(f"backend {backend!r} is not one a {target} log can hold ({BACKENDS[target]})")
    if not isinstance(config, dict):
        raise ValueError(f"config must be an object, got {config!r}")
    if backend == "torch":
        known = sorted(torch_formulations(key.op))
        if variant not in known or config:
            raise ValueError(f"torch {key.op} variant must be one of {known} with an empty config, got "
                             f"{variant!r} {config!r}")
    else:
        space = space_name(backend, target)
        known = schedule_spaces.variants(space, key.op)
        if variant not in known:
            raise ValueError(f"{backend} {key.op} variant must be one of {known}, got {variant!r}")
        if config not in schedule_spaces.points(space, key.op, variant):
            raise ValueError(f"config {config!r} is not a point of the {space} schedule space for "
                             f"{key.op}/{variant} (re-tune)")
    t = d.get("time_ms")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"time_ms must be a finite number > 0, got {t!r}")
    if not isinstance(d.get("device"), dict) or not isinstance(d["device"].get("id"), str):
        raise ValueError("device.id must be a string")
    if not isinstance(d.get("versions", {}), dict):
        raise ValueError(f"versions must be an object, got {d.get('versions')!r}")
    return Record(key, backend, variant, dict(config), float(t), "")


def read(paths: Iterable[Path], device_id: str, target: str) -> dict[ProblemKey, Record]:
    """Valid records of ``target`` for this device; for a key tuned more than once, the last one read wins.
    Nothing in a log can make this raise: an unreadable file, bytes that are not UTF-8, a line that is not a
    valid record are skipped with a warning naming the file and line; records of another device or library
    version are skipped with one warning per file."""
    versions = library_versions()
    out: dict[ProblemKey, Record] = {}
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            warnings.warn(f"tuning log {path} unreadable ({e}); skipped", TuningLogWarning, stacklevel=2)
            continue
        foreign: dict[str, list[int]] = {}
        for i, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                d = json.loads(raw.decode("utf-8"))
                rec = _validate(d, target)
            except Exception as e:  # any malformed line: skip, keep working
                warnings.warn(f"tuning log {path}:{i}: corrupt record skipped ({type(e).__name__}: "
                              f"{str(e)[:300]})", TuningLogWarning, stacklevel=2)
                continue
            if d["device"]["id"] != device_id:
                foreign.setdefault(f"device {d['device']['id']!r} (this is {device_id!r})", []).append(i)
            elif not _version_ok(rec.backend, d.get("versions", {}), versions):
                foreign.setdefault(f"versions {d.get('versions')} (running {versions}; re-tune with "
                                   f"lsr-compile tune)", []).append(i)
            else:
                out[rec.key] = dataclasses.replace(rec, source=f"{path}:{i}")
        for why, lines in foreign.items():
            warnings.warn(f"tuning log {path}: {len(lines)} record(s) of {why} skipped (lines {lines[:5]}"
                          f"{' ...' if len(lines) > 5 else ''})", TuningLogWarning, stacklevel=2)
    return out


def files_for(log_dirs: Iterable[Path], target: str, device_id: str) -> list[Path]:
    files = []
    for d in log_dirs:
        files += sorted((Path(d) / target / device_id).glob("*.jsonl"))
    return files


def default_log_dirs() -> list[Path]:
    """The shipped logs, the user's (where tune() writes by default) and ``$LSR_TUNING_LOGS``'s."""
    dirs = [shipped.data_dir("tuning_logs"), shipped.user_log_dir()] + shipped.env_log_dirs()
    return list(dict.fromkeys(dirs))
