"""The project's one list of shapes: what the main job tunes, what the benchmark and the GPU check measure."""
from __future__ import annotations

import torch

from .problem import LSRShape

# SPEC §4's CPU rows are stated at 768², N = 2048, r1 = 2, r2 = 4, s = 4 (STACK-NOTES).
CPU_LAYER = dict(s=4, r=(2, 4))


def demo_shapes() -> list[LSRShape]:
    """The main job's tuning set: the demo model's layers (MiniLM-sized, 384 wide) and SPEC's 768² layer."""
    return [LSRShape(n, d_in, d_out, **CPU_LAYER) for n in (512, 2048)
            for d_in, d_out in ((384, 384), (768, 768))]


def bench_shapes(quick: bool = False) -> list[LSRShape]:
    """CPU benchmark: 768², 1024x4096, 4096² over N (the larger ones only without --quick)."""
    if quick:
        return [LSRShape(n, 768, 768, **CPU_LAYER) for n in (128, 2048)]
    return ([LSRShape(n, 768, 768, **CPU_LAYER) for n in (128, 512, 2048, 8192)]
            + [LSRShape(n, 1024, 4096, **CPU_LAYER) for n in (128, 2048)]
            + [LSRShape(n, 4096, 4096, **CPU_LAYER) for n in (128, 2048)])


def gpu_shapes() -> list[LSRShape]:
    """The GPU check (issue 4): 768², 4096², 4096x11008 at N = 512 and 8192, bf16."""
    return [LSRShape(n, d_in, d_out, s=4, r=(2, 4), dtype=torch.bfloat16)
            for d_in, d_out in ((768, 768), (4096, 4096), (4096, 11008)) for n in (512, 8192)]
