"""LSRModel: the peft tuner that puts LSR layers on a model (``get_peft_model(model, LSRConfig(...))``)."""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

from .. import base_layers
from .layer import Linear, LSRLayer


# Mamba's mixer reads these layers' weights itself (dt_proj in every path, out_proj in its fused kernel; conv1d is
# no linear layer): an adapter there never reaches the output and gets no gradient. peft refuses out_proj and
# conv1d for LoRA; LSR refuses the three.
MAMBA_MODEL_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
MAMBA_READ_DIRECTLY = ("dt_proj", "out_proj", "conv1d")


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

    def _check_target_module_compatiblity(self, peft_config, model, target_name: str) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type in MAMBA_MODEL_TYPES and target_name in MAMBA_READ_DIRECTLY:
            raise ValueError(f"{target_name} of this {model_type} model cannot carry an adapter: the mixer reads the "
                             f"weights of {', '.join(MAMBA_READ_DIRECTLY)} itself, so an adapter there would never "
                             f"change the output or train (peft refuses out_proj and conv1d for LoRA too); target "
                             f"the others, e.g. target_modules=['in_proj', 'x_proj']")

    def inject_adapter(self, model, adapter_name: str, *args, **kwargs) -> None:
        targets = self.peft_config[adapter_name].target_modules  # peft replaces "all-linear" by the names it finds
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if isinstance(targets, str) and targets.lower() == "all-linear":
            _say_what_all_linear_leaves(model)

    def add_weighted_adapter(self, adapters, weights, adapter_name: str, combination_type: str = "cat",
                             **kwargs) -> None:
        """A new adapter ``adapter_name`` whose update is exactly ``Σ_i weights[i]·ΔW_i`` of ``adapters`` on every
        layer (LoRA's ``combination_type="cat"``): a weighted sum of Kronecker-sum adapters is one, their terms
        side by side and one of their inner ranks stacked (``formulations.concat_terms``; a layer's adapters must
        share n, m and r1 or r2). The adapter is added, not activated (``set_adapter(adapter_name)``). LoRA's
        other combination types change the update (``linear`` mixes the factors, ``svd`` truncates): for those,
        export each adapter with ``lc.export_lora`` and combine the LoRAs."""
        import dataclasses
        import math

        import torch

        from ..config import LSRConfig
        from ..formulations import concat_terms

        adapters, weights = list(adapters), list(weights)
        if combination_type != "cat":
            raise ValueError(f"combination_type={combination_type!r}: LSR combines adapters exactly, as LoRA's 'cat' "
                             f"does; for LoRA's approximations export each adapter (lc.export_lora) and combine the "
                             f"LoRAs with peft's add_weighted_adapter")
        unknown = [a for a in adapters if a not in self.peft_config]
        if not adapters or unknown:
            raise ValueError(f"add_weighted_adapter: unknown adapter(s) {unknown or adapters!r}; this model holds "
                             f"{sorted(self.peft_config)}")
        if len(weights) != len(adapters) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                    and math.isfinite(w) for w in weights):
            raise ValueError(f"add_weighted_adapter: one finite number per adapter, got weights={weights!r} for "
                             f"{adapters!r}")
        if adapter_name in self.peft_config:
            raise ValueError(f"add_weighted_adapter: an adapter named {adapter_name!r} exists; pick a new name")
        configs = [self.peft_config[a] for a in adapters]
        if not all(isinstance(c, LSRConfig) for c in configs):
            raise ValueError(f"add_weighted_adapter combines LSR adapters; {adapters!r} are "
                             f"{[type(c).__name__ for c in configs]}")
        wrapped = [m for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper)
                   and sum(a in getattr(m, "modules_to_save", {}) for a in adapters) > 1]
        if wrapped:  # as LoRA: a module several of them trained a copy of (a classifier head) has no weighted sum
            raise ValueError(f"add_weighted_adapter: {len(wrapped)} modules_to_save module(s) (e.g. a classifier "
                             f"head) hold a trained copy of more than one of {adapters!r}, and copies cannot be "
                             f"added; combine adapters that do not both train the same module")
        combined = {}
        for key, layer in self.model.named_modules():
            if not isinstance(layer, LSRLayer):
                continue
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lsr_A1]
            if not present:
                continue
            shapes = [layer.lsr_shapes[a] for a, _ in present]
            if len({(f.n1, f.n2, f.m1, f.m2) for f in shapes}) > 1 or (len({f.r1 for f in shapes}) > 1
                                                                         and len({f.r2 for f in shapes}) > 1):
                found = ", ".join(f"{a}: r=({f.r1},{f.r2}) n=({f.n1},{f.n2}) m=({f.m1},{f.m2})"
                                  for (a, _), f in zip(present, shapes))
                raise ValueError(f"add_weighted_adapter: on {key} the adapters' factors differ in both inner ranks or "
                                 f"in n, m ({found}), so no single LSR adapter holds their sum: export each "
                                 f"(lc.export_lora) and combine the LoRAs with peft's "
                                 f"add_weighted_adapter(combination_type='cat')")
            with torch.no_grad():
                combined[key] = concat_terms([layer.factors(a) for a, _ in present],
                                             [w * layer.lsr_scale[a] for a, w in present])
        if not combined:
            raise ValueError(f"add_weighted_adapter: no layer holds {adapters!r}")
        pattern = {key: {"s": A1.shape[0], "r": (A1.shape[1], A2.shape[1]), "n": (A1.shape[2], A2.shape[2]),
                         "m": (B1.shape[1], B2.shape[1])} for key, (A1, A2, B1, B2) in combined.items()}
        first = next(iter(pattern.values()))
        config = dataclasses.replace(configs[0], target_modules=sorted(combined), rank_pattern=pattern,
                                     alpha_pattern={}, alpha=None, layers_to_transform=None, layers_pattern=None,
                                     s=first["s"], r=first["r"], n=None, m=None)
        self.peft_config[adapter_name] = config
        for key, factors in combined.items():
            layer = self.model.get_submodule(key)
            layer.update_layer(adapter_name, config.for_layer(key))  # scale 1 (alpha None): the weights are in B1
            with torch.no_grad():
                for mine, value in zip(layer.factors(adapter_name), factors):
                    mine.copy_(value)

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


def _say_what_all_linear_leaves(model) -> None:
    """``"all-linear"`` adapts every linear layer; a mixture of experts also computes with weights that are no
    layer of their own (fused expert tensors, E x d_out x d_in; routers that call F.linear on their weight), which
    peft LoRA adapts through parameter targets and LSR does not: said, with their share, not left silent."""
    import warnings

    from torch import nn

    from ..config import LSRConfigWarning

    adapted, left = 0, {}
    for name, module in model.named_modules():
        if isinstance(module, LSRLayer):
            adapted += module.get_base_layer().weight.numel()
            continue
        if (isinstance(module, (nn.Embedding, nn.LayerNorm, nn.ParameterDict)) or base_layers.is_adaptable(module)
                or any(part.startswith("lsr_") for part in name.split("."))):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 3 or (p.dim() == 2 and pname == "weight"
                                and type(module).__module__.startswith("transformers")):
                pattern = ".".join("*" if part.isdigit() else part for part in f"{name}.{pname}".split("."))
                count, shape = left.get(pattern, (0, tuple(p.shape)))
                left[pattern] = (count + p.numel(), shape)
    if left:
        share = sum(c for c, _ in left.values()) / max(adapted + sum(c for c, _ in left.values()), 1)
        listed = "; ".join(f"{k} {' x '.join(map(str, shape))}" for k, (_, shape) in left.items())
        warnings.warn(f"target_modules='all-linear' adapted every linear layer, but these weights are no layer of "
                      f"their own and carry no LSR adapter: {listed} ({share:.0%} of the weights of the layers "
                      f"adapted and these); peft LoRA adapts them through target_parameters, which LSR does not "
                      f"support yet (docs/support.md)", LSRConfigWarning, stacklevel=4)


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
