"""A user's first minute, each in a fresh process: `import lsr_compile` prints nothing, and a first training step
on a problem no compiled kernel serves neither imports TVM nor waits for it. (How long each takes against LoRA is
a benchmark: `lsr-compile bench-decode --first-minute`.)"""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_import_prints_nothing():
    """peft imports torchao and bitsandbytes when they are installed (the test environment has both); their
    warnings about kernels for other hardware must not reach a user of a dense base."""
    res = _run("import lsr_compile")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == "", res.stderr[-2000:]


def test_noisy_loggers_speak_again_after_the_import():
    """The quiet is for peft's first import only: the same loggers warn afterwards."""
    res = _run("import logging, lsr_compile; logging.getLogger('torchao').warning('after the import')")
    assert "after the import" in res.stderr


def test_a_first_training_step_does_not_import_tvm():
    """Reading the tuning logs once needed TVM's version: importing TVM (2-8 s) made the first step of an untuned
    layer take seconds more than LoRA's."""
    res = _run(
        "import sys, torch, lsr_compile as lc\n"
        "layer = lc.LSRLinear(256, 256, config=lc.LSRConfig())\n"
        "x = torch.randn(4, 32, 256, requires_grad=True)\n"
        "layer(x).sum().backward()\n"
        "with torch.no_grad():\n"
        "    layer(x[:, :1])\n"
        "print(lc.explain(layer, tokens=128).splitlines()[1])\n"
        "print('tvm' in sys.modules)\n")
    assert res.returncode == 0, res.stderr
    choice, tvm_loaded = res.stdout.strip().splitlines()[-2:]
    assert "torch:" in choice and tvm_loaded == "False", res.stdout
