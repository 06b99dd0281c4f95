"""Where the data that ships with lsr_compile lives, and where tuning writes by default.

In a source checkout (or an editable install) the schedule spaces and the shipped tuning logs are the
repository's top-level ``schedules/`` and ``tuning_logs/``; a built package (wheel, ``pip install .``)
carries copies as ``lsr_compile/_data/`` (see setup.py). Tuning never writes into the package: by default
it writes to the user's data directory.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
ENV_VAR = "LSR_TUNING_LOGS"  # extra log directories (os.pathsep-separated); the first is where tune() writes


def data_dir(name: str) -> Path:
    """``schedules`` or ``tuning_logs`` as shipped: the package's copy when installed, else the checkout's."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lsr_compile's {name}/ is missing: neither {_PACKAGE / '_data' / name} (an installed "
                            f"package) nor {_PACKAGE.parent / name} (a source checkout) exists; reinstall lsr_compile")


def checkout():
    """The source checkout this package runs from (editable install, PYTHONPATH), or None when installed."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "schedules").is_dir() else None


_warned: set = set()


def missing_setting(variable: str, path: Path, consequence: str) -> None:
    """Warn once per process that an environment variable names a folder that does not exist."""
    if (variable, str(path)) not in _warned and not path.exists():
        _warned.add((variable, str(path)))
        warnings.warn(f"${variable} names {path}, which does not exist: {consequence}", RuntimeWarning, stacklevel=3)


def env_log_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    for i, d in enumerate(dirs):
        missing_setting(ENV_VAR, d, "no tuning records are read from it" +
                        (" (tune() creates it when it writes there)" if i == 0 else ""))
    return dirs


def user_log_dir() -> Path:
    """Where tune() writes when not told: ``$LSR_TUNING_LOGS`` (its first entry), else
    ``$XDG_DATA_HOME/lsr_compile/tuning_logs`` (``~/.local/share/...``)."""
    env = env_log_dirs()
    if env:
        return env[0]
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "lsr_compile" / "tuning_logs"
