"""What ptxas made of a kernel: registers, spills and shared memory read off a cubin without a GPU."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def cuobjdump() -> str:
    """The CUDA toolkit's cuobjdump, or the one inside the triton wheel."""
    exe = shutil.which("cuobjdump")
    if exe is None:
        try:
            import triton

            tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            exe = str(tool) if tool.exists() else None
        except ImportError:
            exe = None
    if exe is None:
        raise RuntimeError("cuobjdump not found (it ships with the CUDA toolkit and inside the triton wheel)")
    return exe


def resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per kernel: ``registers`` and ``spilled`` (local-memory and stack bytes per thread), ``shared`` bytes."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([cuobjdump(), "--dump-resource-usage", fh.name], capture_output=True, text=True,
                              check=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function ([\w$]+):", line)
        if m:
            name = m.group(1)
            continue
        fields = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line))
        if name is not None and "REG" in fields:
            out[name] = {"registers": int(fields["REG"]),
                         "spilled": int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0)),
                         "shared": int(fields.get("SHARED", 0))}
            name = None
    if not out:
        raise RuntimeError(f"could not read cuobjdump's resource usage: {text[:300]!r}")
    return out
