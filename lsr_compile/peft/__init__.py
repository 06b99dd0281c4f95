"""Stage 7: peft integration — LSR registered as a peft method, LoRA export, reference-code import.

    peft.get_peft_model(model, lsr_compile.LSRConfig(s=4, r=2, target_modules=["query", "value"]))
"""
from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from .._peft_type import LSR_PEFT_TYPE
from ..config import LSRConfig
from .hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from .interop import export_lora, load_reference_adapter
from .layer import Linear, LSRLayer
from .model import LSRModel, _print_trainable_parameters_with_lsr, lsr_summary

if LSR_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:  # peft refuses a second registration (module reloads)
    register_peft_method(name="lsr", config_cls=LSRConfig, model_cls=LSRModel, prefix="lsr_")
if not hasattr(PeftModel.print_trainable_parameters, "_lsr_original"):
    PeftModel.print_trainable_parameters = _print_trainable_parameters_with_lsr(PeftModel.print_trainable_parameters)

__all__ = ["LSRConfig", "LSRLayer", "LSRModel", "Linear", "export_lora", "hotswap_adapter", "load_reference_adapter",
           "lsr_summary", "prepare_model_for_compiled_hotswap"]
