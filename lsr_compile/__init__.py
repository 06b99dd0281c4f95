"""lsr_compile: autotuned kernels for LSR-Adapt layers (ΔW = scale · B · A, each factor a sum of Kronecker products).

The pipeline, one module per stage, in import order (each imports only from the lines above it):

    config.py, problem.py, reference.py, formulations.py, step.py, device.py, shipped.py
                        the function, its key, the layer's math in ATen, the training step kernel by kernel,
                        where it runs and where data lives
    expr/               TVM tensor expressions of the layer (forward variants, backward, the Kronecker parts)
    schedule_spaces.py  the knobs tuning searches (schedules/*.json, data)
    kernels/            lower + build a config: TVM (llvm, cuda), Triton, PyTorch formulations; each backend's parts
    costmodel.py        what a step costs on a device (the GPU default)
    logs.py             the tuning-record format (JSON lines)
    tuning/             timing, the correctness harness, the search: tune()
    dispatch.py         run-time choice per (device, op, shape): forced > tuned > default
    ops.py              torch.ops.lsr.* custom ops (fake impls, autograd) -> torch.compile without graph breaks
    inference_cache.py  a layer's calls without a graph (decoding, evaluation): what it keeps, and when it may
                        use it (only while the factors' values equal the copy it took)
    nn.py               LSRLinear, apply_lsr, explain
    fit_diagnostic.py   before training: how much of each layer's first-step gradient a structure can follow
    peft/               peft integration (get_peft_model, save/load, LoRA export)
"""
from . import _peft_type  # noqa: F401  (PeftType.LSR must exist before any peft lookup)
from . import reference
from .config import FactorizationError, FactorShapes, LSRConfig, LSRConfigWarning, factor_pair
from .dispatch import load_logs, use_backend
from .fit_diagnostic import gradient_fit
from .inference_cache import clear as clear_factor_cache
from .nn import LSRLinear, LSRMergedError, apply_lsr, count_parameters, explain, lsr_config_for_lora, lsr_layers
from .ops import LSRInputError, lsr_linear, mixed_linear
from .problem import LSRShape
from .tuning import tune
from .peft import LSRModel, export_lora, hotswap_adapter, load_reference_adapter, prepare_model_for_compiled_hotswap

__version__ = "0.1.0"

__all__ = [
    "LSRConfig", "LSRLinear", "LSRShape", "FactorShapes", "FactorizationError", "LSRInputError", "apply_lsr",
    "count_parameters", "explain", "factor_pair", "load_logs", "lsr_layers", "lsr_linear", "reference",
    "use_backend", "tune", "mixed_linear", "LSRModel", "export_lora", "load_reference_adapter", "LSRConfigWarning",
    "LSRMergedError", "clear_factor_cache", "lsr_config_for_lora", "hotswap_adapter",
    "prepare_model_for_compiled_hotswap", "gradient_fit",
]
