"""LSRModel: the peft tuner that puts LSR layers on a model (``get_peft_model(model, LSRConfig(...))``)."""
from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .layer import Linear, LSRLayer


class LSRModel(BaseTuner):
    prefix: str = "lsr_"
    tuner_layer_cls = LSRLayer
    # LoRA's defaults fit: LSR adapts the same nn.Linear layers (BERT/RoBERTa: query, value; LLaMA: q_proj, v_proj)
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, LSRLayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LSR adapts nn.Linear layers only; {current_key} is a {type(base).__name__}. "
                            f"Narrow target_modules.")
        new = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)
