"""Adapters across formats: an LSR adapter written as an exact peft LoRA adapter, and adapters trained with
the method's public reference code (``lora_A1 (s, r, n1)``, ``lora_A2``, ``lora_B1``, ``lora_B2``) loaded."""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from .. import formulations
from ..config import LSRConfig
from ..nn import LSRLinear
from .layer import LSRLayer


def export_lora(peft_model, out_dir, adapter_name: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the LSR adapter as a standard peft LoRA adapter of rank q with identical outputs.

    ``ΔW = scale·B·A`` is exactly a rank-q LoRA: ``lora_A = A (q, d_in)``, ``lora_B = scale·B (d_out, q)``,
    ``lora_alpha = r = q`` (LoRA scaling 1). Everything else ``save_pretrained`` writes for the adapter (its own
    ``modules_to_save`` copies, e.g. a trained classifier or lm_head) is written under the same keys, and checked:
    an entry the LoRA could not carry is an error, not a silently different model.
    Load it with ``peft.PeftModel.from_pretrained(base_model, out_dir)``.

    A folder that already holds files is refused unless ``overwrite=True``; the adapter is written next to
    it first and moved in place whole, so a failure never leaves a half-written folder. A symlink is followed
    (its target is replaced, the link kept); the working directory, or a folder holding it, is refused, as
    replacing it would leave this process in a deleted folder. Returns the folder written.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    out_dir = Path(out_dir).resolve()
    cwd = Path.cwd().resolve()
    if out_dir == cwd or out_dir in cwd.parents:
        raise ValueError(f"out_dir {out_dir} is the working directory or holds it: export_lora replaces the "
                         f"folder whole, which would pull the working directory from under this process; "
                         f"give a subfolder (e.g. ./lora)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        held = sorted(p.name for p in out_dir.iterdir())[:5] if out_dir.is_dir() else [out_dir.name]
        raise FileExistsError(f"{out_dir} already holds {held}; export_lora(..., overwrite=True) replaces it, "
                              f"or choose another folder")

    adapter_name = adapter_name or peft_model.active_adapter
    cfg = peft_model.peft_config.get(adapter_name)
    if not isinstance(cfg, LSRConfig):
        raise TypeError(f"adapter {adapter_name!r} is not an LSR adapter (got {type(cfg).__name__})")
    layers = {n: m for n, m in peft_model.base_model.model.named_modules()
              if isinstance(m, LSRLayer) and adapter_name in m.lsr_A1}
    if not layers:
        raise ValueError(f"no LSR layers carry adapter {adapter_name!r}")
    ranks = {n: m.lsr_shapes[adapter_name].q for n, m in layers.items()}
    factor_keys = {f"base_model.model.{n}.{p}" for n in layers for p in LSRLayer.adapter_layer_names}
    extra = {k: v for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()
             if k not in factor_keys}  # this adapter's modules_to_save copies, under peft's saved names
    q = max(ranks.values())
    base = copy.deepcopy(peft_model).unload()  # the base model, adapters removed (what they add is set below)
    saved_modules = list(dict.fromkeys(cfg.modules_to_save)) if cfg.modules_to_save else None  # a copy: peft
    # extends a SEQ_CLS config's list in place, which would grow the LSR config's with every export
    lora_cfg = LoraConfig(r=q, lora_alpha=q, target_modules=sorted(layers), modules_to_save=saved_modules,
                          task_type=cfg.task_type, base_model_name_or_path=cfg.base_model_name_or_path,
                          rank_pattern={n: k for n, k in ranks.items() if k != q},
                          alpha_pattern={n: k for n, k in ranks.items() if k != q}, init_lora_weights=False,
                          fan_in_fan_out=any(m.fan_in_fan_out for m in layers.values()),  # GPT-2's Conv1D
                          **({"ensure_weight_tying": True} if cfg.ensure_weight_tying else {}))  # a tied head's copy
    lora = get_peft_model(base, lora_cfg)
    mods = dict(lora.base_model.model.named_modules())
    with torch.no_grad():
        for name, m in layers.items():
            A1, A2, B1, B2 = m.factors(adapter_name)
            target = mods[name]
            target.lora_A["default"].weight.copy_(formulations.build_A(A1, A2))
            target.lora_B["default"].weight.copy_(m.lsr_scale[adapter_name] * formulations.build_B(B1, B2))
    if lora.peft_config["default"].modules_to_save:
        lora.peft_config["default"].modules_to_save = list(dict.fromkeys(lora.peft_config["default"].modules_to_save))
    set_peft_model_state_dict(lora, extra)  # by key, not through unload(): the named adapter's copies, merged or not
    written = get_peft_model_state_dict(lora)
    lost = [k for k, v in extra.items() if k not in written or not torch.equal(written[k].to(v.device), v)]
    if lost:
        raise RuntimeError(f"adapter {adapter_name!r}: save_pretrained writes {lost[:4]}, which a LoRA export "
                           f"cannot carry (modules_to_save of the LoRA config: {saved_modules})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        lora.save_pretrained(staging)
        if out_dir.exists():
            old = staging.with_name(staging.name + ".old")
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _reference_groups(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state_dict.items():
        k = key.removesuffix(".weight")
        for part in ("A1", "A2", "B1", "B2"):
            if k.endswith(f".lora_{part}") or k == f"lora_{part}":
                groups.setdefault(k[: -len(f"lora_{part}")].rstrip("."), {})[part] = t
    return groups


def load_reference_adapter(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           adapter_name: str = "default") -> int:
    """Copy factors saved by the method's reference code into a model's LSR layers (LSRLinear or peft
    layers). Keys ``<module>.lora_A1`` etc.; module paths may differ by a leading prefix. With the same
    alpha and ``scaling="rslora"`` (the reference's ``alpha / r``), outputs are the reference's.
    Returns the number of layers loaded; every LSR layer must be matched, and every reference layer used."""
    groups = _reference_groups(state_dict)
    if not groups:
        raise ValueError("no lora_A1/lora_A2/lora_B1/lora_B2 keys in the state dict")
    targets = {n: m for n, m in model.named_modules() if isinstance(m, (LSRLinear, LSRLayer))}
    used = set()
    for name, m in targets.items():
        hits = [p for p in groups if name == p or name.endswith("." + p) or p.endswith("." + name)]
        if len(hits) != 1:
            raise KeyError(f"LSR layer {name}: {len(hits)} matching reference layers ({hits[:4]}); "
                           f"reference layers: {sorted(groups)[:6]}")
        g = groups[hits[0]]
        if set(g) != {"A1", "A2", "B1", "B2"}:
            raise KeyError(f"reference layer {hits[0]} lacks {sorted({'A1', 'A2', 'B1', 'B2'} - set(g))}")
        factors = (m.A1, m.A2, m.B1, m.B2) if isinstance(m, LSRLinear) else m.factors(adapter_name)
        params = dict(zip(("A1", "A2", "B1", "B2"), factors))
        with torch.no_grad():
            for part, p in params.items():
                if tuple(g[part].shape) != tuple(p.shape):
                    raise ValueError(f"{name}.{part}: reference tensor has shape {tuple(g[part].shape)}, "
                                     f"the layer expects {tuple(p.shape)} (check s, r, n, m of the config)")
                p.copy_(g[part])
        used.add(hits[0])
    if used != set(groups):
        raise KeyError(f"reference layers with no LSR layer here: {sorted(set(groups) - used)[:6]}")
    return len(used)
