"""Serving many LSR adapters at once: an ``AdapterBank`` puts a bank of adapter slots on every target layer of
a model and runs each sample of a batch with its own adapter through ``lsr::mixed_linear``.

Slots hold factors only (a q = 8 adapter of a 768² layer: 3,584 numbers, its LoRA export 12,288): nothing
LoRA-sized is ever formed. Adapters load from saved peft folders (``adapter_config.json`` +
``adapter_model.safetensors``); adding one writes its slots in place, evicting one frees them, and the bank
grows (doubling, the only time slots move) when it is full.

    bank = AdapterBank.from_pretrained(model, {"fr": "adapters/fr", "de": "adapters/de"})
    out = bank(["fr", "__base__", "de"], input_ids=ids)   # sample i with adapter i ("__base__": none)
    bank.load("it", "adapters/it"); bank.evict("fr")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from .config import FactorShapes, LSRConfig
from .nn import _matcher, default_target_modules
from .mixed_formulations import adapter_rows
from .ops import mixed_linear
from .quantized import factor_dtype, is_quantized

FACTORS = ("A1", "A2", "B1", "B2")
BASE = "__base__"


class BankedLinear(nn.Module):
    """A frozen ``nn.Linear`` with a bank of adapter slots of one factor structure. Without a batch
    assignment (``slots`` unset) it is the base layer."""

    def __init__(self, base: nn.Linear, f: FactorShapes, capacity: int):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.factor_shapes = base, f
        self.in_features, self.out_features = base.in_features, base.out_features
        kw = dict(device=base.weight.device, dtype=factor_dtype(base))
        for name, size in f.factor_sizes().items():
            self.register_buffer(name, torch.zeros(capacity, *size, **kw))
        self.register_buffer("scales", torch.zeros(capacity, dtype=torch.float32, device=base.weight.device))
        self.slots: Optional[Tensor] = None  # (samples,) int64 slot per sample, set by the bank for one call

    def forward(self, x: Tensor) -> Tensor:
        if self.slots is None:
            return self.base(x)
        if self.slots.shape[0] != x.shape[0]:
            raise ValueError(f"{self.slots.shape[0]} adapter names for a batch of {x.shape[0]} samples")
        # one segment per sample; tensors only, so a compiled model is not specialised on the assignment
        per_sample = x.numel() // max(x.shape[0] * x.shape[-1], 1)
        ptr = torch.arange(x.shape[0] + 1, device=x.device) * per_sample
        if is_quantized(self.base.weight):
            # the base through its own library's kernel, the bank's updates beside it (factored: nothing
            # full-precision or LoRA-sized formed, no host synchronisation)
            y = self.base(x)
            x2 = x.reshape(-1, x.shape[-1])
            bank = [getattr(self, p).to(x2.dtype) for p in FACTORS]
            delta = adapter_rows(x2, *bank, self.scales, ptr, self.slots)
            return y + delta.reshape(*x.shape[:-1], -1).to(y.dtype)
        return mixed_linear(x, self.base.weight, self.base.bias, self.A1, self.A2, self.B1, self.B2, self.scales,
                            ptr, self.slots)

    def grow(self, capacity: int) -> None:
        for name in FACTORS + ("scales",):
            old = getattr(self, name)
            new = old.new_zeros(capacity, *old.shape[1:])
            new[:old.shape[0]] = old
            setattr(self, name, new)

    def extra_repr(self) -> str:
        f = self.factor_shapes
        return (f"in_features={self.in_features}, out_features={self.out_features}, slots={self.A1.shape[0]}, "
                f"s={f.s}, r=({f.r1}, {f.r2})")


class AdapterBank:
    """K LSR adapters of one structure, resident on every target layer of ``model`` (replaced in place by
    ``BankedLinear``), served in mixed batches."""

    def __init__(self, model: nn.Module, config: LSRConfig, capacity: int = 8, prefix: str = "base_model.model."):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.model, self.config, self.prefix = model, config, prefix
        targets = _matcher(config.target_modules or default_target_modules(model))
        excluded = _matcher(config.exclude_modules or ())
        self.layers: dict[str, BankedLinear] = {}
        for name, module in list(model.named_modules()):
            if name and targets(name) and not excluded(name) and isinstance(module, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                layer = BankedLinear(module, config.shapes_for(module.in_features, module.out_features), capacity)
                setattr(parent, child, layer)
                self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no nn.Linear of the model matches target_modules={config.target_modules!r}")
        self.slots: dict[str, int] = {}
        self.capacity = capacity

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapters: Mapping[str, str | Path], capacity: Optional[int] = None,
                        prefix: str = "base_model.model.") -> "AdapterBank":
        """A bank on ``model`` holding the saved LSR adapters ``{name: peft folder}`` (their structure: the
        first one's config; the others must share its factor shapes). ``prefix``: what the saved keys put
        before ``model``'s own module paths (peft's ``base_model.model.``; add e.g. ``bert.`` when ``model``
        is the encoder of the model the adapters were trained on)."""
        if not adapters:
            raise ValueError("adapters is empty: give {name: saved peft folder}")
        first = _read_config(next(iter(adapters.values())))
        bank = cls(model, first, capacity or len(adapters), prefix)
        for name, folder in adapters.items():
            bank.load(name, folder)
        return bank

    def load(self, name: str, folder: str | Path) -> int:
        """Add (or replace) adapter ``name`` from a saved peft folder; returns its slot."""
        from safetensors.torch import load_file

        cfg = _read_config(folder)
        state = load_file(str(Path(folder) / "adapter_model.safetensors"))
        factors = {}
        for path, layer in self.layers.items():
            keys = [f"{self.prefix}{path}.lsr_{p}" for p in FACTORS]
            missing = [k for k in keys if k not in state]
            if missing:
                raise KeyError(f"{folder}: no factors for layer {path} (missing {missing[0]}); the adapter must "
                               f"cover the bank's layers {sorted(self.layers)}")
            factors[path] = [state[k] for k in keys]
        scale = cfg.scale_for(next(iter(self.layers.values())).factor_shapes.q)
        return self.add(name, factors, scale)

    def add(self, name: str, factors: Mapping[str, list[Tensor]], scale: float) -> int:
        """Add (or replace) adapter ``name``: ``factors[layer path] = [A1, A2, B1, B2]``; returns its slot."""
        if name == BASE:
            raise ValueError(f"{BASE!r} names the base model, not an adapter")
        for path, layer in self.layers.items():
            want = layer.factor_shapes.factor_sizes()
            got = {p: tuple(t.shape) for p, t in zip(FACTORS, factors.get(path, ()))}
            if got != {p: tuple(s) for p, s in want.items()}:
                raise ValueError(f"adapter {name!r} at {path}: factor shapes {got or 'missing'}, the bank holds "
                                 f"{dict(want)}")
        slot = self.slots.get(name)
        if slot is None:
            used = set(self.slots.values())
            slot = next((k for k in range(self.capacity) if k not in used), None)
            if slot is None:
                slot = self.capacity
                self.capacity *= 2
                for layer in self.layers.values():
                    layer.grow(self.capacity)
        with torch.no_grad():
            for path, layer in self.layers.items():
                for p, t in zip(FACTORS, factors[path]):
                    getattr(layer, p)[slot].copy_(t)
                layer.scales[slot] = float(scale)
        self.slots[name] = slot
        return slot

    def evict(self, name: str) -> None:
        """Free ``name``'s slot (zeroed, so a stale slot can never serve it); nothing else moves."""
        if name not in self.slots:
            raise KeyError(f"no adapter {name!r} in the bank; resident: {sorted(self.slots)}")
        slot = self.slots.pop(name)
        with torch.no_grad():
            for layer in self.layers.values():
                for p in FACTORS:
                    getattr(layer, p)[slot].zero_()
                layer.scales[slot] = 0.0

    def __call__(self, adapter_names: list[str], *args, **kwargs):
        """The model on one batch, sample i with adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        unknown = sorted({n for n in adapter_names if n != BASE} - set(self.slots))
        if unknown:
            raise ValueError(f"adapters not in the bank: {unknown}; resident: {sorted(self.slots)}")
        device = next(iter(self.layers.values())).A1.device
        slots = torch.tensor([self.slots.get(n, -1) for n in adapter_names], dtype=torch.int64, device=device)
        for layer in self.layers.values():
            layer.slots = slots
        try:
            return self.model(*args, **kwargs)
        finally:
            for layer in self.layers.values():
                layer.slots = None

    def bytes_per_adapter(self) -> int:
        """Memory one resident adapter takes: its factors on every layer."""
        return sum(l.factor_shapes.num_params * l.A1.element_size() for l in self.layers.values())

    def lora_bytes_per_adapter(self) -> int:
        """What the same adapter takes exported as a rank-q LoRA: ``q·(d_in + d_out)`` per layer."""
        return sum(l.factor_shapes.q * (l.in_features + l.out_features) * l.A1.element_size()
                   for l in self.layers.values())


def _read_config(folder) -> LSRConfig:
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved peft adapter (no adapter_config.json)")
    d = json.loads(path.read_text())
    if d.get("peft_type") != "LSR":
        raise ValueError(f"{folder} holds a {d.get('peft_type')!r} adapter, not LSR")
    return LSRConfig.from_pretrained(str(folder))
