"""Tuning logs: JSON lines, one record per tuned (device, op, shape bucket, dtype).

Layout: ``<log_dir>/<target>/<device_id>/<op>.jsonl``. A record holds everything
needed to rebuild its winner (backend, variant, config) without re-tuning, plus
the device and library versions it was measured with. Appends take an exclusive
``flock`` and write one line in one ``write``, so concurrent tuners lose nothing.
A line that is corrupt, or from another device or library version, is skipped
with a warning, never applied.
"""
from __future__ import annotations

import fcntl
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .problem import OPS, ProblemKey

SCHEMA = 1
PROJECT_LOG_DIR = Path(__file__).resolve().parent.parent / "tuning_logs"
ENV_VAR = "LSR_TUNING_LOGS"


class TuningLogWarning(UserWarning):
    """A tuning-log line was skipped (corrupt, foreign device, other library version)."""


def library_versions() -> dict:
    import torch

    out = {"torch": torch.__version__.split("+")[0]}
    for mod in ("tvm", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


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
    raw: dict


def log_path(log_dir: Path, target: str, device_id: str, op: str) -> Path:
    return Path(log_dir) / target / device_id / f"{op}.jsonl"


def append(path: Path, record: dict) -> None:
    """Append one record atomically (exclusive lock, single write); never rewrites existing lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
        os.fsync(fd)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _parse(line: str, where: str, device_id: str, versions: dict) -> Optional[Record]:
    try:
        d = json.loads(line)
        if d.get("schema") != SCHEMA:
            raise ValueError(f"schema {d.get('schema')!r}, expected {SCHEMA}")
        key = ProblemKey(**d["key"])
        if key.op not in OPS:
            raise ValueError(f"unknown op {key.op!r}")
        rec = Record(key, d["backend"], d["variant"], dict(d["config"]), float(d["time_ms"]), where, d)
        if rec.backend not in ("torch", "tvm", "triton"):
            raise ValueError(f"unknown backend {rec.backend!r}")
    except Exception as e:  # any malformed line: skip, keep working
        warnings.warn(f"tuning log {where}: corrupt record skipped ({type(e).__name__}: {e})", TuningLogWarning,
                      stacklevel=3)
        return None
    if d.get("device", {}).get("id") != device_id:
        warnings.warn(f"tuning log {where}: record for device {d.get('device', {}).get('id')!r}, this is "
                      f"{device_id!r}; skipped", TuningLogWarning, stacklevel=3)
        return None
    if not _version_ok(rec.backend, d.get("versions", {}), versions):
        warnings.warn(f"tuning log {where}: recorded with {d.get('versions')}, running {versions}; skipped "
                      f"(re-tune with lsr-compile tune)", TuningLogWarning, stacklevel=3)
        return None
    return rec


def read(paths: Iterable[Path], device_id: str) -> dict[ProblemKey, Record]:
    """Valid records for this device; for a key tuned more than once, the last one read wins."""
    versions = library_versions()
    out: dict[ProblemKey, Record] = {}
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as e:
            warnings.warn(f"tuning log {path} unreadable ({e}); skipped", TuningLogWarning, stacklevel=2)
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                rec = _parse(line, f"{path}:{i}", device_id, versions)
                if rec is not None:
                    out[rec.key] = rec
    return out


def files_for(log_dirs: Iterable[Path], target: str, device_id: str) -> list[Path]:
    files = []
    for d in log_dirs:
        files += sorted((Path(d) / target / device_id).glob("*.jsonl"))
    return files


def default_log_dirs() -> list[Path]:
    dirs = [PROJECT_LOG_DIR]
    dirs += [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return dirs
