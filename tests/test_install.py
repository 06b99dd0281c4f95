"""lsr_compile installs like a library: a wheel carries its schedule spaces and shipped tuning logs, and an
installed copy tunes (writing to the user's directory, never into the package) and runs a layer from any
directory."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import os, sys, warnings
from pathlib import Path
import torch
import lsr_compile as lc
from lsr_compile import shipped

pkg = Path(lc.__file__).parent
assert str(pkg).startswith(sys.argv[1]), pkg                    # the installed copy, not the checkout
assert shipped.checkout() is None
assert shipped.data_dir("schedules") == pkg / "_data" / "schedules"
shape = lc.LSRShape(64, 32, 24, s=2, r=(2, 2))
recs = lc.tune([shape], trials=1, time_budget_s=30, ops=("forward",), progress=False)
written = list(Path(os.environ["XDG_DATA_HOME"]).rglob("forward.jsonl"))
assert len(written) == 1 and not list(pkg.rglob("*.write-test*")), written
assert "tuned:" in lc.explain(shape), lc.explain(shape)
torch.manual_seed(0)  # alpha 30000: the adapter's share is >= 5e-3 for 200 of 200 seeds (at 3000, 10 % fell under 1e-3)
layer = lc.LSRLinear(32, 24, config=lc.LSRConfig(s=2, r=2, init="reference", alpha=30000.0))
x = torch.randn(64, 32)
want = lc.reference.lsr_linear(x, layer.weight, layer.bias, layer.A1, layer.A2, layer.B1, layer.B2, layer.scale)
assert (want - torch.nn.functional.linear(x, layer.weight, layer.bias)).abs().max() > 100 * 1e-5  # adapter seen
torch.testing.assert_close(layer(x), want)
shipped_logs = list((pkg / "_data" / "tuning_logs").rglob("*.jsonl"))
print("ok", recs[0]["backend"], recs[0]["variant"], len(shipped_logs))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns("__pycache__", "_data", "*.egg-info")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lsr_compile", "schedules", "tuning_logs"):  # what a clean clone has (no stale build/)
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(src)], check=True, timeout=300, cwd=out)
    return next(out.glob("lsr_compile-*.whl"))


def test_wheel_carries_the_data_folders(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    spaces = sorted(p.name for p in (ROOT / "schedules").glob("*.json"))
    assert sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("lsr_compile/_data/schedules/")) == spaces
    logs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tuning_logs").rglob("*.jsonl"))
    assert logs and sorted(n.removeprefix("lsr_compile/_data/") for n in names if n.endswith(".jsonl")) == logs
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "lsr_compile").rglob("*.py"))
    assert sorted(n for n in names if n.endswith(".py")) == modules


def test_installed_wheel_tunes_and_runs_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), XDG_DATA_HOME=str(tmp_path / "user-data"))
    env.pop("LSR_TUNING_LOGS", None)
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(site)], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")
