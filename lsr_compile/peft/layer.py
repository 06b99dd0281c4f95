"""LSR as a peft tuner layer: per-adapter factor tensors in ParameterDicts, the math from lsr_compile.nn."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import formulations
from ..config import LSRConfig
from ..mixed_formulations import segments_of
from ..nn import init_factors, lsr_forward
from ..ops import adapter_update, mixed_linear
from ..quantized import base_format, factor_dtype, is_quantized, refuse_merge


class LSRLayer(BaseTunerLayer):
    adapter_layer_names = ("lsr_A1", "lsr_A2", "lsr_B1", "lsr_B2")
    other_param_names = ("lsr_scale", "lsr_shapes")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.lsr_A1, self.lsr_A2 = nn.ParameterDict({}), nn.ParameterDict({})
        self.lsr_B1, self.lsr_B2 = nn.ParameterDict({}), nn.ParameterDict({})
        self.lsr_scale: dict[str, float] = {}
        self.lsr_shapes: dict = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LSR adapts nn.Linear layers only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features

    def update_layer(self, adapter_name: str, config: LSRConfig, **kwargs) -> None:
        f = config.shapes_for(self.in_features, self.out_features)
        base = self.get_base_layer()
        kw = dict(device=base.weight.device, dtype=factor_dtype(base))
        tensors = {n: nn.Parameter(torch.empty(sz, **kw)) for n, sz in f.factor_sizes().items()}
        init_factors(*tensors.values(), f, config.init)
        for n, p in tensors.items():
            getattr(self, f"lsr_{n}")[adapter_name] = p
        self.lsr_shapes[adapter_name] = f
        self.lsr_scale[adapter_name] = float(config.scale_for(f.q))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def lsr_shape(self, tokens: int, dtype=None):
        """The problem the first active adapter runs for ``tokens`` rows (what ``tune(model)`` tunes)."""
        from ..problem import LSRShape

        name = next(a for a in self.active_adapters if a in self.lsr_A1)
        return LSRShape.of_factors(tokens, self.lsr_shapes[name], dtype or self.lsr_A1[name].dtype,
                                   base_format(self.get_base_layer().weight))

    def tuning_shapes(self, tokens: int, dtype=None) -> list:
        """Every problem this layer runs for ``tokens`` rows (what ``tune(model)`` tunes): each adapter's, and
        over a dense base the mixed batch (peft's ``adapter_names``) of each group of two or more adapters that
        share a factor structure, one segment per adapter."""
        from ..problem import LSRShape

        base, groups, out = base_format(self.get_base_layer().weight), {}, []
        for name, f in self.lsr_shapes.items():
            dt = dtype or self.lsr_A1[name].dtype
            groups.setdefault((f, dt), []).append(name)
            out.append(LSRShape.of_factors(tokens, f, dt, base))
        for (f, dt), names in groups.items():
            if len(names) > 1 and base == "dense":
                K = len(names)
                out.append(LSRShape(tokens, f.d_in, f.d_out, f.s, (f.r1, f.r2), (f.n1, f.n2), (f.m1, f.m2), dt,
                                    adapters=K, segments=min(tokens, K)))
        return out

    def factors(self, adapter: str):
        return self.lsr_A1[adapter], self.lsr_A2[adapter], self.lsr_B1[adapter], self.lsr_B2[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        A1, A2, B1, B2 = self.factors(adapter)
        return formulations.delta_weight(A1, A2, B1, B2, self.lsr_scale[adapter])


class Linear(nn.Module, LSRLayer):
    """An nn.Linear with one or more named LSR adapters; the active one runs the tuned lsr op."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LSRConfig, **kwargs) -> None:
        super().__init__()
        LSRLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        refuse_merge(base.weight, "merging an LSR adapter")
        for name in adapter_names:
            if name not in self.lsr_A1:
                continue
            delta = self.get_delta_weight(name).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(base.weight.data + delta).all():
                raise ValueError(f"NaNs detected in the merged weights; adapter {name} seems broken")
            base.weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lsr_A1:
                base.weight.data -= self.get_delta_weight(name).to(base.weight.dtype)

    def forward(self, x: torch.Tensor, *args, adapter_names: Optional[list[str]] = None, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError("adapter_names (a mixed batch) cannot run on merged adapters: unmerge first")
            return self._mixed_batch_forward(x, adapter_names)
        active = [a for a in self.active_adapters if a in self.lsr_A1]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        first, *rest = active
        y = lsr_forward(x, base.weight, base.bias, *self.factors(first), self.lsr_scale[first], self.base_layer)
        for name in rest:  # several active adapters: each adds its own update
            A1, A2, B1, B2 = self.factors(name)
            xa = x.to(A1.dtype)
            t = xa @ formulations.build_A(A1, A2).T
            y = y + (self.lsr_scale[name] * (t @ formulations.build_B(B1, B2).T)).to(y.dtype)
        return y

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """peft's mixed batch: sample i (``x[i]``) runs adapter ``adapter_names[i]`` (``"__base__"``, or one
        this layer lacks: the base alone), all samples in one ``lsr::mixed_linear`` call per factor structure,
        the bank stacked from the adapters in use (gradients reach each adapter's own factors)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} samples")
        base = self.get_base_layer()
        if is_quantized(base.weight):
            return self._mixed_over_quantized(x, adapter_names, base_format(base.weight))
        used = [n for n in dict.fromkeys(adapter_names) if n in self.lsr_A1]
        groups: dict = {}
        for n in used:
            groups.setdefault(self.lsr_shapes[n], []).append(n)
        if not groups:
            return self.base_layer(x)
        per_sample = x.numel() // max(x.shape[0] * x.shape[-1], 1)
        y, weight, bias = None, base.weight, base.bias
        for names in groups.values():
            slot = {n: i for i, n in enumerate(names)}
            ptr, seg = segments_of([per_sample] * x.shape[0], [slot.get(n, -1) for n in adapter_names],
                                   device=x.device)
            bank = [torch.stack([getattr(self, f"lsr_{p}")[n] for n in names]).to(weight.dtype)
                    for p in ("A1", "A2", "B1", "B2")]
            scales = torch.tensor([self.lsr_scale[n] for n in names], dtype=torch.float32, device=x.device)
            out = mixed_linear(x.to(weight.dtype), weight, bias, *bank, scales, ptr, seg)
            # a second factor structure adds only its adapters' updates: its base term is subtracted back out
            y = out if y is None else y + out - F.linear(x.to(weight.dtype), weight, bias)
        return y

    def _mixed_over_quantized(self, x: torch.Tensor, adapter_names: list[str], base: str) -> torch.Tensor:
        """A mixed batch over a quantized base: the base once, through its own library's kernel, then each
        adapter in use adds its update to its samples through ``lsr::adapter`` (tuned for this base format).
        One adapter call per adapter in the batch, not per sample; nothing full-precision is formed."""
        samples: dict[str, list[int]] = {}
        for i, n in enumerate(adapter_names):
            if n in self.lsr_A1:
                samples.setdefault(n, []).append(i)
        y = self.base_layer(x)
        for name, idx in samples.items():
            rows = torch.tensor(idx, device=x.device)
            xs = x.index_select(0, rows)
            A1, A2, B1, B2 = (t.to(xs.dtype) for t in self.factors(name))
            delta = adapter_update(xs, A1, A2, B1, B2, self.lsr_scale[name], base)
            y = y.index_add(0, rows, delta.to(y.dtype))
        return y

    def __repr__(self) -> str:
        return "lsr." + super().__repr__()
