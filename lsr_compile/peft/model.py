"""LSRModel: the peft tuner that puts LSR layers on a model (``get_peft_model(model, LSRConfig(...))``)."""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .. import base_layers
from .layer import Linear, LSRLayer


class LSRModel(BaseTuner):
    prefix: str = "lsr_"
    tuner_layer_cls = LSRLayer
    # LoRA's defaults fit: LSR adapts the same layers (BERT/RoBERTa: query, value; LLaMA: q_proj, v_proj; GPT-2's
    # Conv1D c_attn)
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        config = config.for_layer(current_key)  # rank_pattern, alpha_pattern
        if isinstance(target, LSRLayer):
            target.update_layer(adapter_name, config)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not base_layers.is_adaptable(base):
            raise TypeError(f"LSR adapts {base_layers.kinds()} layers; {current_key} is a {type(base).__name__}. "
                            f"Narrow target_modules.")
        new = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)
        self._replace_module(parent, target_name, new, target)

    def _add_modules_to_save_to_tie(self, peft_config, tied_weight_keys):
        """``ensure_weight_tying`` with a layer tied to the input embeddings in ``modules_to_save``: LoRA's handling,
        which has nothing of LoRA in it (the embeddings' trained copy, shared by the tied layers), so a tied model
        stays tied as under peft LoRA; peft's default for other tuners only warns and unties."""
        from peft.tuners.lora.model import LoraModel

        LoraModel._add_modules_to_save_to_tie(self, peft_config, tied_weight_keys)

    def add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs):
        """LoRA's merge of adapters into one; LSR has none (a weighted sum of Kronecker-sum adapters is not one of
        the same structure): refused with the ways that exist (peft called the base model's, which has none)."""
        raise NotImplementedError(
            f"add_weighted_adapter({adapters!r}, ..., {adapter_name!r}) combines LoRA adapters; LSR adapters cannot "
            f"be combined into one LSR adapter. Instead run several at once, each adding its update: "
            f"peft_model.base_model.set_adapter({list(adapters)!r}) (peft allows it without modules_to_save); or "
            f"export each as the LoRA it is exactly (lsr_compile.export_lora(peft_model, folder, adapter_name=...)), "
            f"load those with peft and combine them with LoRA's add_weighted_adapter")

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """peft's ``adapter_names=[...]`` (one name per sample, ``"__base__"`` for none) reaches every LSR
        layer and every ``modules_to_save`` copy, as for LoRA; in training mode too (the mixed op has
        autograd, so several adapters train in one batch), but not for adapters with dropout options, which
        the one-call op cannot apply (the layer refuses them by name). Beam search repeats each name per beam."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}")
        known = set()
        for layer in self.modules():
            if isinstance(layer, LSRLayer):
                known |= set(layer.lsr_A1.keys())
        unknown = {n for n in adapter_names if n != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        beams = kwargs.get("num_beams")
        if isinstance(beams, int) and beams > 1:
            adapter_names = [n for n in adapter_names for _ in range(beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, (LSRLayer, AuxiliaryTrainingWrapper)):
                handles.append(module.register_forward_pre_hook(
                    partial(_inject_adapter_names, adapter_names=list(adapter_names)), with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def lsr_summary(model) -> list[str]:
    """One line per LSR adapter of ``model``: its layers, inner rank (what LoRA calls r), Kronecker terms and
    trainable parameters against a LoRA of the same rank on the same layers. Printed by peft's
    ``print_trainable_parameters`` after its own line."""
    per: dict[str, list] = {}
    for module in model.modules():
        if isinstance(module, LSRLayer):
            for name, f in module.lsr_shapes.items():
                per.setdefault(name, []).append(f)
    lines = []
    for name, shapes in per.items():
        qs = sorted({f.q for f in shapes})
        ss = sorted({f.s for f in shapes})
        params = sum(f.num_params for f in shapes)
        lora = sum(f.q * (f.d_in + f.d_out) for f in shapes)
        rank = "/".join(map(str, qs))
        lines.append(f"LSR adapter {name!r}: {len(shapes)} layers, inner rank q = r1*r2 = {rank} (the rank of each "
                     f"update, LoRA's r), s = {'/'.join(map(str, ss))} Kronecker terms; {params:,d} parameters, "
                     f"{params / lora:.2f}x a LoRA of rank {rank} on the same layers ({lora:,d})")
    return lines


def _print_trainable_parameters_with_lsr(original):
    """peft's ``print_trainable_parameters``, then ``lsr_summary``'s lines when the model holds LSR adapters: a
    LoRA user reads an LSR config's rank where they read LoRA's."""
    def print_trainable_parameters(self) -> None:
        original(self)
        for line in lsr_summary(self):
            print(line)
    print_trainable_parameters.__doc__ = original.__doc__
    print_trainable_parameters._lsr_original = original
    return print_trainable_parameters
