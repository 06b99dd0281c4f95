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

import contextlib
import json
import threading
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from . import base_layers
from .config import FactorShapes, LSRConfig
from .nn import ALL_LINEAR, _matcher, all_linear_layers, default_target_modules
from .mixed_formulations import adapter_rows
from .ops import mixed_linear
from .quantized import factor_dtype, is_quantized

FACTORS = ("A1", "A2", "B1", "B2")
BASE = "__base__"


class BankedLinear(nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) with a bank of adapter slots of one factor structure,
    run by its bank, which assigns a slot to each sample (``slots``) for the call. Called without one (the bank's
    model called directly, e.g. ``bank.model.generate``) it refuses: that ran the base alone without a word.
    Under ``bank.generate`` a batch of ``k`` times as many rows as samples (beams, returned sequences) gives each
    sample's ``k`` consecutive rows its slot, as ``generate`` expands its inputs."""

    def __init__(self, base: nn.Module, f: FactorShapes, capacity: int):
        super().__init__()
        base.requires_grad_(False)
        self.base, self.factor_shapes = base, f
        self.fan_in_fan_out = base_layers.is_conv1d(base)
        self.in_features, self.out_features = base_layers.dims(base)
        kw = dict(device=base.weight.device, dtype=factor_dtype(base))
        for name, size in f.factor_sizes().items():
            self.register_buffer(name, torch.zeros(capacity, *size, **kw))
        self.register_buffer("scales", torch.zeros(capacity, dtype=torch.float32, device=base.weight.device))
        self.slots: Optional[Tensor] = None  # (samples,) int64 slot per sample, set by the bank for one call
        self.expands = False  # under bank.generate: k rows a sample (beams, returned sequences)

    def forward(self, x: Tensor) -> Tensor:
        slots = self.slots
        if slots is None:
            raise RuntimeError("this model's linear layers are served by an AdapterBank: call bank(names, ...) or "
                               "bank.generate(names, ...) with one adapter name per sample (\"__base__\": the base "
                               "alone); called directly, the model would silently run without any adapter")
        if slots.shape[0] != x.shape[0]:
            if not (self.expands and x.shape[0] % slots.shape[0] == 0):
                raise ValueError(f"{slots.shape[0]} adapter names for a batch of {x.shape[0]} samples: give "
                                 f"bank(...) one name per sample")
            slots = slots.repeat_interleave(x.shape[0] // slots.shape[0])
        # one segment per sample; tensors only, so a compiled model is not specialised on the assignment
        per_sample = x.numel() // max(x.shape[0] * x.shape[-1], 1)
        ptr = torch.arange(x.shape[0] + 1, device=x.device) * per_sample
        if is_quantized(self.base.weight):
            # the base through its own library's kernel, the bank's updates beside it (factored: nothing
            # full-precision or LoRA-sized formed, no host synchronisation)
            y = self.base(x)
            x2 = x.reshape(-1, x.shape[-1])
            bank = [getattr(self, p).to(x2.dtype) for p in FACTORS]
            delta = adapter_rows(x2, *bank, self.scales, ptr, slots)
            return y + delta.reshape(*x.shape[:-1], -1).to(y.dtype)
        weight = base_layers.as_linear(self.base.weight, self.fan_in_fan_out)
        return mixed_linear(x, weight, self.base.bias, self.A1, self.A2, self.B1, self.B2, self.scales, ptr, slots)

    def tuning_shapes(self, tokens: int, dtype=None) -> list:
        """What ``tune(model)`` tunes for this layer: the mixed batch it runs over all its slots, one segment per
        slot (a batch of other sizes: tune ``LSRShape(..., adapters=K, segments=S)`` for it). Nothing over a
        quantized base, whose updates run the untuned factored formulation."""
        from .problem import LSRShape

        if is_quantized(self.base.weight):
            return []
        f, K = self.factor_shapes, self.A1.shape[0]
        dt = dtype or base_layers.compute_dtype(self.base.weight, self.A1)
        return [LSRShape(tokens, f.d_in, f.d_out, f.s, (f.r1, f.r2), (f.n1, f.n2), (f.m1, f.m2), dt,
                         adapters=K, segments=min(tokens, K))]

    def storage(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in FACTORS + ("scales",)}

    def use(self, storage: Mapping[str, Tensor]) -> None:
        for name, t in storage.items():
            setattr(self, name, t)

    def grown(self, capacity: int) -> dict[str, Tensor]:
        """New storage of ``capacity`` slots holding the current ones (nothing of this layer changes)."""
        out = {}
        for name, old in self.storage().items():
            out[name] = old.new_zeros(capacity, *old.shape[1:])
            out[name][:old.shape[0]] = old
        return out

    def read(self, slot: int) -> tuple[list[Tensor], Tensor]:
        return [getattr(self, p)[slot].clone() for p in FACTORS], self.scales[slot].clone()

    def write(self, slot: int, factors: list[Tensor], scale) -> None:
        with torch.no_grad():
            for p, t in zip(FACTORS, factors):
                getattr(self, p)[slot].copy_(t)
            self.scales[slot] = scale

    def extra_repr(self) -> str:
        f = self.factor_shapes
        return (f"in_features={self.in_features}, out_features={self.out_features}, slots={self.A1.shape[0]}, "
                f"s={f.s}, r=({f.r1}, {f.r2})")


class AdapterBank:
    """K LSR adapters of one structure, resident on every target layer of ``model`` (replaced in place by
    ``BankedLinear``), served in mixed batches.

    Changes are all-or-nothing: ``add``/``load`` check and convert everything before writing a slot and put
    back what was there if a write fails, so an adapter is served whole or not at all. Calls and changes are
    serialised by a lock: one from another thread waits for the batch in flight to finish, and one made from
    inside a call (a forward hook) is refused, since waiting there would never end and going on would change
    the batch being served.
    """

    def __init__(self, model: nn.Module, config: LSRConfig, capacity: int = 8, prefix: str = "base_model.model."):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        self.model, self.config, self.prefix = model, config, prefix
        target_modules = config.target_modules or default_target_modules(model)
        if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
            target_modules = all_linear_layers(model)
        targets, excluded = _matcher(target_modules), _matcher(config.exclude_modules or ())
        self.layers: dict[str, BankedLinear] = {}
        chosen = []  # every target checked before the model is touched
        for name, module in model.named_modules():
            if not name or not targets(name) or excluded(name) or not config.selects(name):
                continue
            if not base_layers.is_adaptable(module):
                raise TypeError(f"target module {name} is a {type(module).__name__}, not an {base_layers.kinds()}: a "
                                f"bank serves linear layers only (" + ("this model is already served by a bank" if
                                isinstance(module, BankedLinear) else "name the linear layers inside it, e.g. "
                                f"{[n for n, m in module.named_modules() if base_layers.is_adaptable(m)][:3]}")
                                + "); the model was left as it was")
            chosen.append((name, module, config.for_layer(name).shapes_for(*base_layers.dims(module))))
        for name, module, shapes in chosen:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = BankedLinear(module, shapes, capacity)
            setattr(parent, child, layer)
            self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no {base_layers.kinds()} of the model matches target_modules={target_modules!r} (less "
                             f"exclude_modules={config.exclude_modules!r}): a bank needs at least one layer")
        self.slots: dict[str, int] = {}
        self.capacity = capacity
        self._lock = threading.RLock()
        self._serving = False

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
        bank = cls(model, first, len(adapters) if capacity is None else capacity, prefix)
        for name, folder in adapters.items():
            bank.load(name, folder)
        return bank

    def load(self, name: str, folder: str | Path) -> int:
        """Add (or replace) adapter ``name`` from a saved peft folder; returns its slot.

        Served exactly as peft serves it on ``model``, or refused: the adapter must have factors of the bank's
        structure for every layer of the bank and for no other, and no trained module saved whole
        (``modules_to_save``, e.g. a classifier head) inside ``model``. Saved modules outside ``model`` (the
        head above a bank on the encoder) play no part in ``model``'s outputs; applying them is the caller's.
        """
        cfg = _read_config(folder)
        state = _read_state(folder)
        where = f"{folder} (adapter {name!r})"
        for path, layer in self.layers.items():
            try:
                shapes = cfg.for_layer(path).shapes_for(layer.in_features, layer.out_features)
            except ValueError as e:
                raise ValueError(f"{where}: its config does not fit layer {path}: {e}") from e
            if shapes != layer.factor_shapes:
                raise ValueError(f"{where}: its config gives layer {path} factors {_structure(shapes)}, the bank "
                                 f"holds {_structure(layer.factor_shapes)}; serve it from a bank built from its "
                                 f"own config")
        factors: dict[str, dict[str, Tensor]] = {}
        extra, outside, whole = set(), set(), set()  # full module paths, as saved
        for key, t in state.items():
            module, dot, part = key.rpartition(".lsr_")
            inside, path = key.startswith(self.prefix), module[len(self.prefix):]
            if not (dot and part in FACTORS):
                if inside:
                    whole.add(key.rpartition(".")[0])
            elif not inside:
                outside.add(module)
            elif path in self.layers:
                factors.setdefault(path, {})[part] = t
            else:
                extra.add(module)
        # nothing under the prefix, yet the bank's layers under another one: the prefix is wrong
        hint = None if factors else next((m[:-len(p)] for m in sorted(outside | extra) for p in self.layers
                                          if m.endswith("." + p)), None)
        if outside or hint is not None:
            raise ValueError(f"{where}: its factors sit at {sorted(outside | extra)[:3]}, not under this bank's "
                             f"layers with prefix={self.prefix!r}: it was saved from another model layout. Pass "
                             f"the prefix its keys put before this model's module paths"
                             + (f" (here prefix={hint!r})" if hint is not None else ", or serve it through peft"))
        if extra:
            raise ValueError(f"{where} adapts layers the bank holds no slots for: {sorted(extra)[:6]}; build the "
                             f"bank with target_modules covering them (the adapter's: {cfg.target_modules!r}), "
                             f"or serve it through peft")
        if whole:
            raise ValueError(f"{where} holds trained modules saved whole (modules_to_save, e.g. a classifier "
                             f"head): {sorted(whole)[:4]}; the bank would run them with the base model's weights. "
                             f"Serve it through peft (PeftModel.from_pretrained), or build the bank on the part "
                             f"of the model below them (e.g. the encoder, with prefix= the saved keys' path to it)")
        missing = sorted(path for path in self.layers if len(factors.get(path, ())) < len(FACTORS))
        if missing:
            raise ValueError(f"{where} lacks factors for {len(missing)} of the bank's layers ({missing[:4]}): an "
                             f"adapter must cover every layer of the bank; serve it from a bank built from its "
                             f"own config (target_modules={cfg.target_modules!r})")
        scales = {path: cfg.for_layer(path).scale_for(layer.factor_shapes.q) for path, layer in self.layers.items()}
        return self._put(name, {path: [f[p] for p in FACTORS] for path, f in factors.items()}, scales, where)

    def add(self, name: str, factors: Mapping[str, list[Tensor]], scale) -> int:
        """Add (or replace) adapter ``name``: ``factors[layer path] = [A1, A2, B1, B2]`` for every layer of the
        bank, ``scale`` one float or ``{layer path: float}``; returns its slot."""
        return self._put(name, factors, scale, f"adapter {name!r}")

    def _put(self, name: str, factors: Mapping[str, list[Tensor]], scale, where: str) -> int:
        if not isinstance(name, str) or name == BASE:
            raise ValueError(f"adapter names are strings other than {BASE!r} (the base model), got {name!r}")
        unknown = sorted(set(factors) - set(self.layers))
        if unknown:
            raise ValueError(f"{where}: factors for layers the bank does not hold: {unknown[:6]}; its layers: "
                             f"{sorted(self.layers)}")
        staged = {}  # every layer's factors checked and converted before any slot is written
        for path, layer in self.layers.items():
            want = {p: tuple(s) for p, s in layer.factor_shapes.factor_sizes().items()}
            got = list(factors.get(path, ()))
            shapes = {p: tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for p, t in zip(FACTORS, got)}
            if len(got) != len(FACTORS) or shapes != want or not all(t.is_floating_point() for t in got):
                raise ValueError(f"{where} at {path}: got {len(got)} factors {shapes} "
                                 f"({', '.join(str(t.dtype) for t in got if isinstance(t, Tensor))}); the bank "
                                 f"holds 4 floating-point ones {want}")
            try:
                staged[path] = [t.detach().to(device=layer.A1.device, dtype=layer.A1.dtype) for t in got]
            except (RuntimeError, NotImplementedError) as e:  # a meta tensor, a device this process cannot reach
                raise ValueError(f"{where} at {path}: its factors cannot be read into the bank's "
                                 f"{layer.A1.dtype} on {layer.A1.device}: {e}") from e
        if isinstance(scale, Mapping):
            missing = sorted(set(self.layers) - set(scale))
            if missing:
                raise ValueError(f"{where}: no scale for layers {missing[:6]}")
            scales = {path: float(scale[path]) for path in self.layers}
        else:
            scales = dict.fromkeys(self.layers, float(scale))
        with self._changing():
            old = {path: layer.storage() for path, layer in self.layers.items()}
            slot, capacity, backup = self.slots.get(name), self.capacity, {}
            if slot is None:
                used = set(self.slots.values())
                slot = next((k for k in range(self.capacity) if k not in used), None)
            try:
                if slot is None:  # full: every layer's storage doubled (allocated first, then swapped in)
                    slot, capacity = self.capacity, 2 * self.capacity
                    grown = {path: layer.grown(capacity) for path, layer in self.layers.items()}
                    for path, layer in self.layers.items():
                        layer.use(grown[path])
                else:
                    backup = {path: layer.read(slot) for path, layer in self.layers.items()}
                for path, layer in self.layers.items():
                    layer.write(slot, staged[path], scales[path])
            except BaseException:
                for path, layer in self.layers.items():
                    layer.use(old[path])
                    if path in backup:
                        layer.write(slot, *backup[path])
                raise
            self.capacity = capacity
            self.slots[name] = slot
            return slot

    def evict(self, name: str) -> None:
        """Free ``name``'s slot (zeroed, so a stale slot can never serve it); nothing else moves."""
        with self._changing():
            if name not in self.slots:
                raise KeyError(f"no adapter {name!r} in the bank; resident: {sorted(self.slots)}")
            slot = self.slots.pop(name)
            for layer in self.layers.values():
                layer.write(slot, [torch.zeros(())] * len(FACTORS), 0.0)

    @contextlib.contextmanager
    def _changing(self):
        with self._lock:
            if self._serving:
                raise RuntimeError("the bank is serving a batch; change it between calls (not from a forward "
                                   "hook or from inside the model)")
            yield

    def __call__(self, adapter_names: list[str], *args, **kwargs):
        """The model on one batch, sample i with adapter ``adapter_names[i]`` (``"__base__"``: none)."""
        with self._serving_batch(adapter_names, expands=False):
            return self.model(*args, **kwargs)

    def generate(self, adapter_names: list[str], *args, **kwargs):
        """``model.generate`` with sample i decoded through adapter ``adapter_names[i]`` (``"__base__"``: none)
        at every step, prefill and KV-cached decoding alike: each row equals generating it alone with its adapter
        (left padding as ``generate`` takes it). Beams and ``num_return_sequences`` keep their sample's adapter."""
        if not hasattr(self.model, "generate"):
            raise TypeError(f"the bank's model ({type(self.model).__name__}) has no generate(); call bank(names, ...)")
        with self._serving_batch(adapter_names, expands=True):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _serving_batch(self, adapter_names: list[str], expands: bool):
        """Every layer's slots set for the samples named, for the duration of one call."""
        if isinstance(adapter_names, str) or not adapter_names:
            raise ValueError(f"adapter_names must list one adapter name per sample (at least one), got "
                             f"{adapter_names!r}")
        with self._lock:
            if self._serving:
                raise RuntimeError("bank(...) was called while the bank is serving a batch (from a forward hook "
                                   "or from inside the model); one call at a time")
            unknown = sorted({n for n in adapter_names if n != BASE} - set(self.slots), key=str)
            if unknown:
                raise ValueError(f"adapters not in the bank: {unknown}; resident: {sorted(self.slots)}")
            device = next(iter(self.layers.values())).A1.device
            slots = torch.tensor([self.slots.get(n, -1) for n in adapter_names], dtype=torch.int64, device=device)
            self._serving = True
            for layer in self.layers.values():
                layer.slots, layer.expands = slots, expands
            try:
                yield
            finally:
                for layer in self.layers.values():
                    layer.slots, layer.expands = None, False
                self._serving = False

    def bytes_per_adapter(self) -> int:
        """Memory one resident adapter takes: its factors on every layer."""
        return sum(l.factor_shapes.num_params * l.A1.element_size() for l in self.layers.values())

    def lora_bytes_per_adapter(self) -> int:
        """What the same adapter takes exported as a rank-q LoRA: ``q·(d_in + d_out)`` per layer."""
        return sum(l.factor_shapes.q * (l.in_features + l.out_features) * l.A1.element_size()
                   for l in self.layers.values())


def _structure(f: FactorShapes) -> str:
    return f"s={f.s}, r=({f.r1}, {f.r2}), n=({f.n1}, {f.n2}), m=({f.m1}, {f.m2})"


def _read_config(folder) -> LSRConfig:
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a saved peft adapter: " +
                                ("no adapter_config.json in it" if Path(folder).is_dir() else "no such folder"))
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        raise ValueError(f"{path} is corrupt or unreadable ({e}); save the adapter again") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} is corrupt: a JSON {type(d).__name__}, not a peft config object; save the "
                         f"adapter again")
    if d.get("peft_type") != "LSR":
        raise ValueError(f"{folder} holds a {d.get('peft_type')!r} adapter, not LSR")
    try:
        return LSRConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid LSR config: {e}") from e


def _read_state(folder) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        legacy = (Path(folder) / "adapter_model.bin").is_file()
        raise FileNotFoundError(f"{folder} has no adapter_model.safetensors" + (
            " (only adapter_model.bin: save it again with safe_serialization=True)" if legacy else ""))
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # a truncated or garbled file, or one this process cannot read
        raise ValueError(f"{path} is corrupt or unreadable ({type(e).__name__}: {e}); save the adapter "
                         f"again") from e
