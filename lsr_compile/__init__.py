"""lsr_compile: autotuned kernels for LSR-Adapt layers (ΔW = scale · B · A, each factor a sum of Kronecker products).

The pipeline, one module per stage:

    expr/         TVM tensor expressions of the layer (forward variants, backward)
    schedules/    (top level) the knobs tuning searches, per target, as data
    kernels/      schedule + build a config: TVM (llvm, cuda), Triton, PyTorch formulations
    tuning/       device fingerprints, timing, the search: tune()
    logs.py       tuning records (JSON lines under tuning_logs/)
    dispatch.py   run-time choice per (device, op, shape): forced > tuned > default
    ops.py        torch.ops.lsr.* custom ops (fake impls, autograd) -> torch.compile without graph breaks
    nn.py         LSRLinear, apply_lsr
    peft/         peft integration (get_peft_model, save/load, LoRA export)
"""
from . import _peft_type  # noqa: F401  (PeftType.LSR must exist before any peft lookup)
from . import reference
from .config import FactorizationError, FactorShapes, LSRConfig, factor_pair
from .dispatch import explain, load_logs, use_backend
from .nn import LSRLinear, apply_lsr, count_parameters, lsr_layers
from .ops import LSRInputError, lsr_linear
from .problem import LSRShape
from .tuning import tune
from .peft import LSRModel, export_lora, load_reference_adapter

__version__ = "0.1.0"

__all__ = [
    "LSRConfig", "LSRLinear", "LSRShape", "FactorShapes", "FactorizationError", "LSRInputError", "apply_lsr",
    "count_parameters", "explain", "factor_pair", "load_logs", "lsr_layers", "lsr_linear", "reference",
    "use_backend", "tune", "LSRModel", "export_lora", "load_reference_adapter",
]
