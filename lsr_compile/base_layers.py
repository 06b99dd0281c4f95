"""The frozen layers LSR adapts: ``nn.Linear`` (weight ``d_out × d_in``, ``y = x Wᵀ + b``) and transformers'
``Conv1D`` (GPT-2's projections: weight stored ``d_in × d_out``, ``y = x W + b``; peft calls this layout
``fan_in_fan_out``). Everything past this module sees the weight as ``d_out × d_in``: a Conv1D's is its
transpose, a view (no copy), and a merge adds ``ΔWᵀ`` to it.
"""
from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor, nn


@functools.lru_cache(maxsize=1)
def conv1d_class() -> Optional[type]:
    """transformers' ``Conv1D``, or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: no Conv1D to adapt
        return None
    return Conv1D


def is_conv1d(module) -> bool:
    cls = conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_adaptable(module) -> bool:
    """An ``nn.Linear`` (quantized subclasses included) or a transformers ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dims(module) -> tuple[int, int]:
    """``(d_in, d_out)`` of an adaptable layer."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return module.in_features, module.out_features


def as_linear(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """The weight as ``d_out × d_in`` (a Conv1D's: its transpose, a view)."""
    return weight.t() if fan_in_fan_out else weight


def kinds() -> str:
    """What the error messages name as adaptable."""
    return "nn.Linear" + (" or transformers' Conv1D" if conv1d_class() is not None else "")


def compute_dtype(weight: Tensor, factor: Tensor):
    """The dtype a layer's calls run in, which tuning records and ``explain`` key a problem by: the input's, in a
    model the frozen weight's (peft keeps adapters in float32 over a half-precision base, and dispatch keys a call
    by its input); the factors' where the weight's dtype says nothing of the activations (bitsandbytes' packed
    uint8)."""
    return weight.dtype if weight.is_floating_point() else factor.dtype
