"""Stage 7: peft integration — LSR registered as a peft method, LoRA export, reference-code import.

    peft.get_peft_model(model, lsr_compile.LSRConfig(s=4, r=2, target_modules=["query", "value"]))
"""
from peft.utils import register_peft_method

from ..config import LSRConfig
from .interop import export_lora, load_reference_adapter
from .layer import Linear, LSRLayer
from .model import LSRModel

try:
    register_peft_method(name="lsr", config_cls=LSRConfig, model_cls=LSRModel, prefix="lsr_")
except KeyError:  # already registered (module re-imported)
    pass

__all__ = ["LSRConfig", "LSRLayer", "LSRModel", "Linear", "export_lora", "load_reference_adapter"]
