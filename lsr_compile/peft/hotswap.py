"""Swapping an LSR adapter's weights under a compiled model without recompiling (peft's ``hotswap_adapter`` for
LoRA, which refuses other methods): the serving pattern of many adapters on one compiled graph.

A compiled graph reads the factor tensors as inputs, so new values written into them in place need no new graph;
a new shape or a new scale (a Python float the graph holds as a constant) would. So, before compiling,
``prepare_model_for_compiled_hotswap`` pads every layer's factors to the largest structure to be served (terms
and inner ranks of zeros: a zero term, or a zero block of an inner rank, adds nothing to ``B A``) and folds the
scale into B1 (the layer's scale becomes 1); ``hotswap_adapter`` then writes an adapter's factors, scale folded
in, into the leading block of each tensor and zeros the rest.

    model = PeftModel.from_pretrained(base, "adapters/a")
    prepare_model_for_compiled_hotswap(model, target_s=8, target_r=(4, 2))
    model = torch.compile(model)
    hotswap_adapter(model, "adapters/b")            # no recompilation; outputs are adapter b's
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .layer import LSRLayer


def _peft_model(model):
    return getattr(model, "_orig_mod", model)


def _layers(model, adapter_name: str) -> dict:
    layers = {key: m for key, m in _peft_model(model).base_model.model.named_modules()
              if isinstance(m, LSRLayer) and adapter_name in m.lsr_A1}
    if not layers:
        raise ValueError(f"no LSR layer of the model holds adapter {adapter_name!r}")
    return layers


def prepare_model_for_compiled_hotswap(model, target_s: Optional[int] = None, target_r=None,
                                       adapter_name: str = "default") -> None:
    """Before ``torch.compile``: every layer's factors of ``adapter_name`` padded to ``target_s`` terms and inner
    ranks ``target_r = (r1, r2)`` (the largest any adapter to be swapped in has; None keeps the layer's), and its
    scale folded into B1. Outputs are unchanged. The adapter's config is updated to match, so it saves and
    reloads as it now is."""
    import dataclasses

    pm = _peft_model(model)
    if pm is not model:
        raise ValueError("call prepare_model_for_compiled_hotswap before torch.compile: padding a compiled model's "
                         "factors changes their shapes, which recompiles")
    if isinstance(target_r, int):
        target_r = (target_r, target_r)
    for key, layer in _layers(model, adapter_name).items():
        f = layer.lsr_shapes[adapter_name]
        s = target_s or f.s
        r1, r2 = target_r or (f.r1, f.r2)
        if s < f.s or r1 < f.r1 or r2 < f.r2:
            raise ValueError(f"{key}: adapter {adapter_name!r} has s={f.s}, r=({f.r1}, {f.r2}), above target_s={s}, "
                             f"target_r=({r1}, {r2}): targets must be at least every adapter's")
        scale = layer.lsr_scale[adapter_name]
        with torch.no_grad():
            for name, t in zip(("lsr_A1", "lsr_A2", "lsr_B1", "lsr_B2"), layer.factors(adapter_name)):
                shape = {"lsr_A1": (s, r1, t.shape[2]), "lsr_A2": (s, r2, t.shape[2]),
                         "lsr_B1": (s, t.shape[1], r1), "lsr_B2": (s, t.shape[1], r2)}[name]
                padded = t.new_zeros(shape)
                padded[tuple(slice(0, n) for n in t.shape)] = t * scale if name == "lsr_B1" else t
                getattr(layer, name)[adapter_name] = torch.nn.Parameter(padded, requires_grad=t.requires_grad)
        layer.lsr_shapes[adapter_name] = dataclasses.replace(f, s=s, r1=r1, r2=r2)
        layer.lsr_scale[adapter_name] = 1.0
        layer._inference_memo.forget()
    config = pm.peft_config[adapter_name]
    pattern = {}
    for k, v in (config.rank_pattern or {}).items():  # an entry is r (an int or a pair) or a dict of fields
        v = dict(v) if isinstance(v, dict) else {"r": v}
        pattern[k] = v | ({"s": target_s} if target_s else {}) | ({"r": tuple(target_r)} if target_r else {})
    pm.peft_config[adapter_name] = dataclasses.replace(
        config, s=target_s or config.s, r=tuple(target_r) if target_r else config.r, alpha=None, alpha_pattern={},
        rank_pattern=pattern)


def hotswap_adapter(model, folder, adapter_name: str = "default") -> None:
    """Replace the values of adapter ``adapter_name`` by those of the LSR adapter saved in ``folder``, in place:
    a model compiled after ``prepare_model_for_compiled_hotswap`` runs the new adapter without recompiling.
    The new adapter must adapt the same layers (a layer it lacks gets zeros: the base alone there) with factors
    of the same n, m that fit the prepared structure; everything is checked before anything is written."""
    from ..bank import _read_config, _read_state

    config, state = _read_config(folder), _read_state(folder)
    layers = _layers(model, adapter_name)
    new = {}
    for key, t in state.items():
        module, dot, part = key.rpartition(".lsr_")
        path = module.removeprefix("base_model.model.")
        if not dot or path not in layers or part not in ("A1", "A2", "B1", "B2"):
            raise ValueError(f"{folder}: {key} is not a factor of a layer adapter {adapter_name!r} is on (a new "
                             f"layer would need a new graph; serve adapters on other layers from an AdapterBank)")
        new.setdefault(path, {})[part] = t
    for path, parts in new.items():
        layer = layers[path]
        f = layer.lsr_shapes[adapter_name]
        if len(parts) != 4:
            raise ValueError(f"{folder}: layer {path} has factors {sorted(parts)}, not A1, A2, B1, B2")
        A1, A2, B1, B2 = (parts[k] for k in ("A1", "A2", "B1", "B2"))
        fits = (A1.shape[0] <= f.s and A1.shape[1] <= f.r1 and A2.shape[1] <= f.r2 and (A1.shape[2], A2.shape[2])
                == (f.n1, f.n2) and (B1.shape[1], B2.shape[1]) == (f.m1, f.m2))
        if not fits:
            raise ValueError(f"{folder}: layer {path}'s factors A1 {tuple(A1.shape)}, A2 {tuple(A2.shape)}, "
                             f"B1 {tuple(B1.shape)}, B2 {tuple(B2.shape)} do not fit the model's s={f.s}, "
                             f"r=({f.r1}, {f.r2}), n=({f.n1}, {f.n2}), m=({f.m1}, {f.m2}): prepare the model with "
                             f"prepare_model_for_compiled_hotswap(target_s=..., target_r=...) as large as every "
                             f"adapter to be served, before compiling")
    for path, layer in layers.items():
        parts = new.get(path)
        scale = config.for_layer(path).scale_for(parts["A1"].shape[1] * parts["A2"].shape[1]) if parts else 0.0
        ratio = scale / layer.lsr_scale[adapter_name]
        with torch.no_grad():
            for part, mine in zip(("A1", "A2", "B1", "B2"), layer.factors(adapter_name)):
                mine.zero_()
                if parts:
                    t = parts[part].to(mine.dtype) * (ratio if part == "B1" else 1.0)
                    mine[tuple(slice(0, n) for n in t.shape)] = t.to(mine.device)
