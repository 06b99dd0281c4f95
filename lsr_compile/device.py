"""Where a kernel runs: torch device -> compiler target -> schedule space, and the device fingerprint
that tuning records are keyed by (a record is only valid on the hardware it was measured on)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
import os
import platform
import re
from pathlib import Path

import torch

_ISA_FLAGS = ("avx512_bf16", "avx512f", "avx2", "fma", "neon", "asimd", "sve")


TARGET_DEVICES = {"llvm": "cpu", "cuda": "cuda"}  # compiler target -> the torch device type it runs on


def target_of(device: torch.device | str) -> str:
    """The compiler target for a torch device: CPUs tune for ``llvm``, NVIDIA GPUs for ``cuda``."""
    kind = torch.device(device).type
    for target, dev in TARGET_DEVICES.items():
        if dev == kind:
            return target
    raise ValueError(f"no lsr_compile target for device type {kind!r}; supported: cpu (llvm), cuda")


def space_name(backend: str, target: str) -> str:
    """The schedule space (``schedules/<name>.json``) of a compiled backend on a target."""
    if target not in TARGET_DEVICES:
        raise ValueError(f"unknown target {target!r}; choose one of {sorted(TARGET_DEVICES)}")
    if backend == "tvm":
        return target
    if backend == "triton" and target == "cuda":
        return "triton_cuda"
    raise ValueError(f"backend {backend!r} has no schedule space on {target}")


def tvm_target(device: torch.device | str) -> dict:
    """The TVM target dict for a torch device (TVM 0.27 takes dicts, docs/design.md §5)."""
    device = torch.device(device)
    if device.type == "cpu":
        return llvm_target()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"kind": "cuda", "arch": f"sm_{major}{minor}"}
    raise ValueError(f"TVM backend has no target for device {device}")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo is absent)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else []):
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.lru_cache(maxsize=None)
def _cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")  # Linux only; elsewhere the fingerprint is the platform's names alone
    for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else []):
        if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
            model = line.split(":", 1)[1].strip()
        elif line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in _ISA_FLAGS if f in flags]
    return {"kind": "cpu", "model": model, "isa": isa, "cores": torch.get_num_threads(), "arch": platform.machine()}


@functools.lru_cache(maxsize=None)
def _cuda_info(index: int) -> dict:
    p = torch.cuda.get_device_properties(index)
    return {"kind": "cuda", "model": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count}


def device_info(device: torch.device | str = "cpu") -> dict:
    d = torch.device(device)
    if d.type == "cuda":
        return _cuda_info(d.index if d.index is not None else torch.cuda.current_device())
    return _cpu_info() | {"cores": torch.get_num_threads()}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_id(device: torch.device | str = "cpu") -> str:
    """A readable id that changes whenever the timings could: model, ISA, thread count / compute capability."""
    info = device_info(device)
    if info["kind"] == "cuda":
        return f"{_slug(info['model'])}-sm{info['capability'].replace('.', '')}"
    isa = info["isa"][0] if info["isa"] else info["arch"]
    return f"{_slug(info['model'])}-{_slug(isa)}-{info['cores']}t"


def llvm_target(cores: int | None = None) -> dict:
    """The TVM llvm target for this CPU (0.27 wants dicts, docs/design.md §5)."""
    target = {"kind": "llvm", "num-cores": cores or torch.get_num_threads()}
    host_cpu = os.environ.get("LSR_LLVM_MCPU")
    if host_cpu is None:
        host_cpu = _host_cpu_name()
    if host_cpu:
        target["mcpu"] = host_cpu
        # LLVM names the CPU from its family and model, which a virtual machine may not match: a Zen 4 guest
        # whose hypervisor hides AVX-512 is still "znver4", and code for it dies with SIGILL. Switch off what
        # the CPU's own flags do not list (LLVM drops the features that depend on it too).
        flags = _cpu_flags()
        missing = [f for f in ("avx512f", "avx2", "fma", "avx") if flags and f not in flags]
        if missing and platform.machine() in ("x86_64", "AMD64"):
            target["mattr"] = tuple(f"-{f}" for f in missing)
    return target


@functools.lru_cache(maxsize=None)
def _host_cpu_name() -> str:
    """LLVM's name for the host CPU, so TVM emits the widest vector ISA it has (AVX-512 here)."""
    try:
        import tvm

        return str(tvm.get_global_func("target.llvm_get_system_cpu")())
    except Exception:  # older/newer TVM without the hook: generic code, still correct
        return ""


@dataclass(frozen=True)
class GPU:
    """A GPU as dispatch sees it: its fingerprint (``device_id``) and compute capability. ``gpu_of`` reads a
    real one; ``H200`` names the project's, so that what dispatch would run there can be built, counted and
    priced on a machine without it (tests, the cost model)."""

    id: str
    capability: int


H200 = GPU("nvidia-h200-sm90", 90)


def gpu_of(device: torch.device | str) -> GPU:
    return GPU(device_id(device), capability(device))


def capability(device: torch.device | str) -> int | None:
    """A CUDA device's compute capability as one number (90 for sm_90); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return major * 10 + minor
