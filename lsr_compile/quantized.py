"""A quantized frozen base (torchao weight-only, bitsandbytes 4-bit): what format a base weight is in.

The base runs through its own library's kernels (``F.linear`` on the quantized tensor: no full-precision copy
per call) and the adapter through ``lsr::adapter``; the format is part of the tuning key. Merging ΔW into a
quantized weight would requantize it with an error no adapter can undo, so merging refuses (docs/design.md §7).
"""
from __future__ import annotations

import torch

DENSE = "dense"
# tensor class name -> format name in tuning keys
_FORMATS = {
    "Int8Tensor": "int8_weight_only",  # torchao Int8WeightOnlyConfig
    "AffineQuantizedTensor": "affine_quantized",  # torchao's older layouts
    "IntxUnpackedToInt8Tensor": "intx_weight_only",  # torchao IntxWeightOnlyConfig (int1..int8; stored in int8)
    "IntxOpaqueTensor": "intx_weight_only",
    "Int4Tensor": "int4_weight_only",  # torchao Int4WeightOnlyConfig (CUDA builds), by packing format:
    "Int4TilePackedTo4dTensor": "int4_weight_only",  # tinygemm (_weight_int4pack_mm, bf16 on sm_80+)
    "Int4PreshuffledTensor": "int4_weight_only",
    "Int4PlainInt32Tensor": "int4_weight_only",
    "Int4OpaqueTensor": "int4_weight_only",
    "Float8Tensor": "float8_weight_only",
    "Float8OpaqueTensor": "float8_weight_only",
    "Params4bit": "bnb_4bit",  # bitsandbytes Linear4bit
    "Int8Params": "bnb_8bit",
}
# any other torchao tensor subclass: quantized all the same (its own kernels, no merge), one tuning bucket
OTHER = "torchao_other"
FORMATS = (DENSE,) + tuple(sorted(set(_FORMATS.values()) | {OTHER}))


def base_format(weight) -> str:
    """``"dense"`` for a plain tensor, else the quantized format (a tensor subclass we know)."""
    return format_of_class(type(weight))


def format_of_class(cls: type) -> str:
    if cls in (torch.Tensor, torch.nn.Parameter):
        return DENSE
    names = [klass.__name__ for klass in cls.__mro__]
    for name in names:
        if name in _FORMATS:
            return _FORMATS[name]
    if "TorchAOBaseTensor" in names:  # a torchao layout not listed above must never pass for a dense weight
        return OTHER
    return DENSE  # FakeTensor, FunctionalTensor and other wrappers of a plain tensor


def factor_dtype(linear) -> torch.dtype:
    """The dtype an adapter's factors take beside this base layer: the weight's, or for a packed 4-bit base
    its compute dtype (float32 when unset)."""
    if base_format(linear.weight).startswith("bnb_"):
        return getattr(linear, "compute_dtype", None) or torch.float32
    return linear.weight.dtype


def is_quantized(weight) -> bool:
    return base_format(weight) != DENSE


def refuse_merge(weight, where: str) -> None:
    """Merging into a quantized base is refused with the reason and the ways out."""
    fmt = base_format(weight)
    if fmt != DENSE:
        raise ValueError(f"{where}: the base weight is {fmt}-quantized; merging ΔW would requantize it and add "
                         f"a rounding error of the size of the quantization step to every weight. Keep the adapter "
                         f"unmerged (it runs beside the quantized base), or export it (lsr_compile.export_lora), "
                         f"or merge into a full-precision copy of the base")
