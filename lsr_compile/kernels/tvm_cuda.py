"""TVM on GPUs without TVM's compiler there: build here, run there.

    build_artifacts(shapes, arch="sm_90")       # any machine with nvcc, no GPU needed
    function(op, variant, config, f, dtype)     # the GPU machine: TVM's runtime alone loads the artifact

Every candidate of the CUDA schedule space is lowered, compiled for the architecture with nvcc (to a cubin)
and exported with TVM's ``export_library``: a small shared library holding the host code and the cubin,
which ``tvm.runtime.load_module`` loads with the runtime libraries only (``libtvm_runtime*.so`` and
apache-tvm-ffi, about 20 MB, where the compiler library alone is 259 MB). Artifacts are keyed like tuning
records (op, variant, config, factor shapes, dtype, architecture, TVM version); the token count is
symbolic in every kernel, so one artifact serves every token bucket. Each build appends its metadata
(registers, spills and shared memory of every kernel, read off the cubin) to ``index.jsonl``.

Where: ``$LSR_TVM_ARTIFACTS``, else the project's ``build/tvm-cuda/`` (build outputs, not committed: they
are rebuilt by one command and are specific to the TVM version). A GPU session carries that folder
with its working tree; an installed package would point ``$LSR_TVM_ARTIFACTS`` at wherever they were built.

Without a GPU, TVM's CUDA runtime library cannot load (it links the driver, ``libcuda.so.1``), and
``tvm.compile`` then silently produces a source-only module that cannot be exported for a GPU. The build
therefore runs in its own process which, when no driver is installed, first loads a stand-in driver
compiled from ``_DRIVER_STUB`` (every call answers "no device"); the build checks that the result is a
real CUDA module and fails loudly otherwise.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable, Optional

from .. import shipped
from ..config import FactorShapes

ENV_VAR = "LSR_TVM_ARTIFACTS"
SCHEMA = 1

_DRIVER_STUB = r"""
/* Stand-in for the CUDA driver on a machine without a GPU: lets TVM's CUDA runtime library load so that
   CUDA modules can be created and exported. Every call answers CUDA_ERROR_NO_DEVICE (100). */
#define NO_DEVICE 100
int cuDeviceGetName(void) { return NO_DEVICE; }
int cuFuncSetAttribute(void) { return NO_DEVICE; }
int cuLaunchKernel(void) { return NO_DEVICE; }
int cuLaunchKernelEx(void) { return NO_DEVICE; }
int cuModuleGetFunction(void) { return NO_DEVICE; }
int cuModuleGetGlobal_v2(void) { return NO_DEVICE; }
int cuModuleLoadData(void) { return NO_DEVICE; }
int cuModuleUnload(void) { return NO_DEVICE; }
int cuTensorMapEncodeTiled(void) { return NO_DEVICE; }
int cuGetErrorName(int e, const char **s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuGetErrorString(int e, const char **s) { *s = "no CUDA driver here (build-time stand-in)"; return 0; }
"""


def artifact_dir(out_dir=None) -> Path:
    """``out_dir``, else ``$LSR_TVM_ARTIFACTS``, else ``build/tvm-cuda`` of a source checkout (what a GPU
    session carries), else the user's cache (``$XDG_CACHE_HOME/lsr_compile/tvm-cuda``)."""
    if out_dir:
        return Path(out_dir)
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
        shipped.missing_setting(ENV_VAR, path, "no prebuilt TVM-CUDA kernels are found there "
                                               "(lsr-compile build-tvm-cuda creates it)")
        return path
    checkout = shipped.checkout()
    if checkout is not None:
        return checkout / "build" / "tvm-cuda"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lsr_compile" / "tvm-cuda"


def artifact_name(op: str, variant: str, config: dict, f: FactorShapes, dtype: str, arch: str) -> str:
    cfg = "-".join(f"{k}{v}" for k, v in sorted(config.items()))
    return (f"{op}-{variant}-{dtype}-s{f.s}-r{f.r1}x{f.r2}-n{f.n1}x{f.n2}-m{f.m1}x{f.m2}-{cfg}-{arch}"
            .replace(".", "_"))


def tvm_version() -> Optional[str]:
    """TVM's version without importing it (importing loads the 259 MB compiler library)."""
    from importlib import metadata

    try:
        return metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return None


def _major_minor(v: Optional[str]) -> Optional[str]:
    return ".".join(v.split(".")[:2]) if v else None


def index(arch: str, out_dir=None) -> dict[str, dict]:
    """The usable artifacts for ``arch``: built by this TVM major.minor, file present. Last build wins."""
    folder = artifact_dir(out_dir) / arch
    path = folder / "index.jsonl"
    out = {}
    if not path.exists():
        return out
    mine = _major_minor(tvm_version())
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = (rec["schema"] == SCHEMA and _major_minor(rec["versions"]["tvm"]) == mine
                  and (folder / rec["file"]).exists())
        except Exception:  # a line that is not an artifact record is no artifact
            ok = False
        if ok:
            out[rec["name"]] = rec
    return out


def find(op: str, variant: str, config: dict, f: FactorShapes, dtype: str, arch: str, out_dir=None) -> Optional[dict]:
    return index(arch, out_dir).get(artifact_name(op, variant, config, f, dtype, arch))


def static_problem(op: str, variant: str, config: dict, f: FactorShapes, dtype: str, arch: str) -> Optional[str]:
    """Why a TVM candidate cannot run on this GPU, known before running it: no compiler here and no
    artifact, or its kernels spill."""
    rec = find(op, variant, config, f, dtype, arch)
    if rec is None:
        if compiler_available():
            return None
        return (f"no prebuilt TVM-CUDA artifact for it (this machine has TVM's runtime only): build them "
                f"where TVM and nvcc are with `lsr-compile build-tvm-cuda --arch {arch}` and bring {artifact_dir()}")
    spills = {k: u["spilled"] for k, u in rec["kernels"].items() if u["spilled"]}
    return f"spills ({spills} B of local memory per thread)" if spills else None


def compiler_available() -> bool:
    """Whether this machine's TVM can compile (not the runtime-only package a GPU machine may have)."""
    import tvm.base

    return not tvm.base._RUNTIME_ONLY


# ---- run there -------------------------------------------------------------------------------------

def _cuda_runtime() -> None:
    """TVM's CUDA runtime library registers the loader of exported CUDA modules; the full package loads it
    with its CUDA backend, the runtime-only one does not: load it here."""
    from tvm.base import _LOADED_LIBS

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    lib = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
    _LOADED_LIBS["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def load(rec: dict, out_dir=None):
    """The artifact's ``main`` function, loaded by TVM's runtime alone."""
    import tvm.runtime

    _cuda_runtime()
    path = artifact_dir(out_dir) / rec["arch"] / rec["file"]
    return tvm.runtime.load_module(str(path))["main"]


# ---- the runtime for a GPU machine without TVM ------------------------------------------------------

# what TVM's runtime never loads: the compiler library (259 MB) and the sources and headers that build it
_COMPILER_ONLY = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/", "tvm/src/", "tvm/include/")


def runtime_wheels(out_dir, python_version: str = "3.12", tvm: Optional[str] = None,
                   tvm_ffi: Optional[str] = None) -> list[Path]:
    """Wheels of TVM's runtime for a GPU machine whose Python is ``python_version``: apache-tvm without its
    compiler library (TVM 0.27 then runs runtime-only), and apache-tvm-ffi, at this machine's versions.
    About 20 MB together; a GPU check installs them from ``.whl/`` when its machine has no TVM."""
    from importlib import metadata

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tvm = tvm or metadata.version("apache-tvm")
    tvm_ffi = tvm_ffi or metadata.version("apache-tvm-ffi")
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28)] + ["--platform=manylinux2014_x86_64"]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        f"--python-version={python_version}", "--implementation=cp", *platforms, "-d", tmp,
                        f"apache-tvm=={tvm}", f"apache-tvm-ffi=={tvm_ffi}"], check=True)
        out = []
        for whl in sorted(Path(tmp).glob("*.whl")):
            dest = out_dir / whl.name
            if whl.name.startswith("apache_tvm-"):
                strip_wheel(whl, dest, _COMPILER_ONLY)
            else:
                shutil.copy(whl, dest)
            out.append(dest)
    return out


def strip_wheel(src: Path, dest: Path, drop: tuple[str, ...]) -> None:
    """Copy a wheel without the members under ``drop`` (path prefixes), its RECORD rewritten to match."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        kept = [i for i in zin.infolist() if not i.filename.startswith(drop)]
        for info in kept:
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if not line.split(",")[0].startswith(drop)) + "\n").encode()
            zout.writestr(info, data)


# ---- build here --------------------------------------------------------------------------------------

def build_artifacts(shapes: Iterable, ops: Optional[Iterable[str]] = None, arch: str = "sm_90",
                    out_dir=None, configs: str = "space", timeout_s: float = 1800) -> list[dict]:
    """Lower and compile every TVM candidate for ``shapes`` (each point of the CUDA schedule space, or only
    the defaults with ``configs="default"``) for ``arch`` with nvcc, export each for TVM's runtime, and
    record it in ``<dir>/<arch>/index.jsonl``. ``ops``: default a shape's own (forward and backward, or the
    mixed-batch ops for a mixed shape). Artifacts already built by this TVM are kept. Runs in
    a fresh process (see the module's docstring); returns the index records of this build's artifacts."""
    from .. import schedule_spaces
    from ..problem import MIXED_OPS, OPS

    spec = {"arch": arch, "out_dir": str(artifact_dir(out_dir)), "configs": configs,
            "problems": [{"dtype": str(s.dtype).removeprefix("torch."), **vars(s.factors),
                          "ops": list(ops or (MIXED_OPS if s.mixed else OPS))} for s in shapes
                         if str(s.dtype).removeprefix("torch.") in schedule_spaces.dtypes("cuda")]}
    if configs not in ("space", "default"):
        raise ValueError(f"configs must be 'space' or 'default', got {configs!r}")
    proc = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(spec), capture_output=True,
                          text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"TVM-CUDA build failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _load_driver(folder: Path) -> str:
    """The real CUDA driver when this machine has one, else the stand-in (built once into ``folder``)."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return "libcuda.so.1"
    except OSError:
        return _load_stand_in(folder)


def _load_stand_in(folder: Path) -> str:
    stub_dir = folder / ".driver-stub"
    stub = stub_dir / "libcuda.so.1"
    if not stub.exists():
        stub_dir.mkdir(parents=True, exist_ok=True)
        src = stub_dir / "stub.c"
        src.write_text(_DRIVER_STUB)
        subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(stub), str(src)],
                       check=True, capture_output=True)
    ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
    return str(stub)


def _build(spec: dict) -> None:
    """The build process: one JSON record per artifact on stdout."""
    from .. import schedule_spaces

    arch = spec["arch"]
    folder = Path(spec["out_dir"]) / arch
    folder.mkdir(parents=True, exist_ok=True)
    driver = _load_driver(folder)
    import tvm
    import tvm_ffi
    from tvm.backend import cuda as _cuda_backend  # noqa: F401  (registers the CUDA module creator)
    from tvm.base import _LOADED_LIBS
    from tvm.support import nvcc

    from .cubin import resource_usage
    from .tvm_lower import lower

    if "tvm_runtime_cuda" not in _LOADED_LIBS:
        raise RuntimeError("TVM's CUDA runtime library did not load (it needs libcudart.so.13 and a driver or "
                           f"the stand-in, here {driver}): TVM would build source-only modules")
    cubins: list[bytes] = []

    def compile_cuda(code):  # TVM calls this for each module's CUDA source; cubin for the exact architecture
        cubins.append(bytes(nvcc.compile_cuda(code, target_format="cubin", arch=arch, compiler="nvcc")))
        return cubins[-1]

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    target = {"kind": "cuda", "arch": arch}
    have = index(arch, spec["out_dir"])
    versions = {"tvm": tvm.__version__, "tvm_ffi": getattr(tvm_ffi, "__version__", None)}
    for p in spec["problems"]:
        dtype, ops = p.pop("dtype"), p.pop("ops")
        f = FactorShapes(**p)
        for op in ops:
            for variant in schedule_spaces.variants("cuda", op):
                points = ([schedule_spaces.default("cuda", op, variant)] if spec["configs"] == "default"
                          else schedule_spaces.space("cuda", op, variant))
                for config in points:
                    name = artifact_name(op, variant, config, f, dtype, arch)
                    if name in have:
                        continue
                    cubins.clear()
                    with tvm.target.Target(target):
                        lib = tvm.compile(lower(op, variant, config, f, dtype, target), target=target)
                    kinds = [(m.kind, m.is_runnable()) for m in lib.mod.imports]
                    if kinds != [("cuda", True)] or len(cubins) != 1:
                        raise RuntimeError(f"{name}: TVM built {kinds} (kind, runnable) with {len(cubins)} "
                                           f"cubins, not one runnable CUDA module: it cannot run on a GPU")
                    lib.export_library(str(folder / f"{name}.so"))
                    rec = {"schema": SCHEMA, "name": name, "file": f"{name}.so", "arch": arch, "op": op,
                           "variant": variant, "config": config, "dtype": dtype, "shapes": vars(f),
                           "versions": versions, "kernels": resource_usage(cubins[0]),
                           "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                    with open(folder / "index.jsonl", "a") as fh:
                        fh.write(json.dumps(rec, sort_keys=True) + "\n")
                    have[name] = rec  # shapes that differ only in their token count share artifacts
                    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    _build(json.loads(sys.stdin.read()))
