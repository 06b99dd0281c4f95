"""LSR as a peft tuner layer: per-adapter factor tensors in ParameterDicts, the math from lsr_compile.nn."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import base_layers, formulations
from ..config import LSRConfig
from ..mixed_formulations import segments_of
from ..nn import Dropouts, init_factors, lsr_forward, refuse_derived_merge, regularized_forward
from ..inference_cache import Memo, layer_call
from ..ops import adapter_update, mixed_linear
from ..quantized import base_format, factor_dtype, is_quantized, refuse_merge


class LSRLayer(BaseTunerLayer):
    adapter_layer_names = ("lsr_A1", "lsr_A2", "lsr_B1", "lsr_B2")
    other_param_names = ("lsr_scale", "lsr_shapes", "lsr_dropouts")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.lsr_A1, self.lsr_A2 = nn.ParameterDict({}), nn.ParameterDict({})
        self.lsr_B1, self.lsr_B2 = nn.ParameterDict({}), nn.ParameterDict({})
        self.lsr_scale: dict[str, float] = {}
        self.lsr_shapes: dict = {}
        self.lsr_dropouts: dict[str, Dropouts] = {}
        self._inference_memo = Memo()  # what calls without a graph keep (inference_cache)
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        base = self.get_base_layer()
        if not base_layers.is_adaptable(base):
            raise TypeError(f"LSR adapts {base_layers.kinds()} layers, got {type(base).__name__}")
        self.fan_in_fan_out = base_layers.is_conv1d(base)  # GPT-2's Conv1D: weight stored d_in x d_out
        self.in_features, self.out_features = base_layers.dims(base)

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as d_out x d_in (a Conv1D's transposed: a view). One that torch's pruning or
        old-style ``weight_norm`` computes in the base's forward pre-hooks is computed here first: this layer does
        not call the base's forward (a parametrized one computes itself)."""
        base = self.get_base_layer()
        if "weight" not in base._parameters:
            from torch.nn.utils.prune import BasePruningMethod
            from torch.nn.utils.weight_norm import WeightNorm

            for hook in list(base._forward_pre_hooks.values()):
                if isinstance(hook, (BasePruningMethod, WeightNorm)):
                    hook(base, ())
        return base_layers.as_linear(base.weight, self.fan_in_fan_out)

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
        self.lsr_dropouts[adapter_name] = Dropouts.of(config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def lsr_shape(self, tokens: int, dtype=None):
        """The problem the first active adapter runs for ``tokens`` rows (what ``tune(model)`` tunes); None when no
        active adapter is on this layer (``set_adapter`` to one on other layers), which then runs the base alone."""
        from ..problem import LSRShape

        name = next((a for a in self.active_adapters if a in self.lsr_A1), None)
        if name is None:
            return None
        weight = self.get_base_layer().weight
        dt = dtype or base_layers.compute_dtype(weight, self.lsr_A1[name])
        return LSRShape.of_factors(tokens, self.lsr_shapes[name], dt, base_format(weight))

    def tuning_shapes(self, tokens: int, dtype=None) -> list:
        """Every problem this layer runs for ``tokens`` rows (what ``tune(model)`` tunes): each adapter's, and
        over a dense base the mixed batch (peft's ``adapter_names``) of each group of two or more adapters that
        share a factor structure, one segment per adapter."""
        from ..problem import LSRShape

        weight = self.get_base_layer().weight
        base, groups, out = base_format(weight), {}, []
        for name, f in self.lsr_shapes.items():
            dt = dtype or base_layers.compute_dtype(weight, self.lsr_A1[name])
            groups.setdefault((f, dt), []).append(name)
            out.append(LSRShape.of_factors(tokens, f, dt, base))
        for (f, dt), names in groups.items():
            if len(names) > 1 and base == "dense":
                K = len(names)
                out.append(LSRShape(tokens, f.d_in, f.d_out, f.s, (f.r1, f.r2), (f.n1, f.n2), (f.m1, f.m2), dt,
                                    adapters=K, segments=min(tokens, K)))
        return out

    def factors(self, adapter: str):
        """(A1, A2, B1, B2) of ``adapter``; read from the ParameterDicts' own tables (their ``[]`` cost 1.4 µs
        each, a quarter of a decode step's host time)."""
        m = self._modules
        return (m["lsr_A1"]._parameters[adapter], m["lsr_A2"]._parameters[adapter],
                m["lsr_B1"]._parameters[adapter], m["lsr_B2"]._parameters[adapter])

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._inference_memo.forget()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scale·B·A`` in the base weight's layout (peft's convention: transposed for a Conv1D)."""
        A1, A2, B1, B2 = self.factors(adapter)
        return base_layers.as_linear(formulations.delta_weight(A1, A2, B1, B2, self.lsr_scale[adapter]),
                                     self.fan_in_fan_out)


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
        refuse_derived_merge(base, "merging an LSR adapter")
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
        if adapter_names is None and not self._disable_adapters and not self.merged_adapters:
            # one active adapter over a plain base layer (training, decoding): its peft bookkeeping read directly
            name = self._active_adapter
            if type(name) is not str:
                name = name[0] if len(name) == 1 else None
            base = self._modules["base_layer"]
            scale = self.lsr_scale.get(name)
            if scale is not None and not isinstance(base, BaseTunerLayer):
                p = base._parameters
                weight = p.get("weight")
                if weight is not None:
                    if self.fan_in_fan_out:
                        weight = weight.t()
                    bias = p["bias"] if "bias" in p else base.bias  # a parametrized bias: its attribute
                    A1, A2, B1, B2 = self.factors(name)
                    if self.training:
                        drop = self.lsr_dropouts.get(name)
                        if drop:
                            return regularized_forward(x, weight, bias, A1, A2, B1, B2, scale, drop, base)
                    y = layer_call(self._inference_memo, x, weight, bias, A1, A2, B1, B2, scale)
                    if y is not None:
                        return y
                    return lsr_forward(x, weight, bias, A1, A2, B1, B2, scale, base)
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
        weight = self.base_weight()
        first, *rest = active
        drop = self.lsr_dropouts.get(first) if self.training else None
        if drop:
            y = regularized_forward(x, weight, base.bias, *self.factors(first), self.lsr_scale[first], drop,
                                    self.base_layer)
        else:
            y = lsr_forward(x, weight, base.bias, *self.factors(first), self.lsr_scale[first], self.base_layer)
        for name in rest:  # several active adapters: each adds its own update (its dropout as it is configured)
            A1, A2, B1, B2 = self.factors(name)
            drop = self.lsr_dropouts.get(name) if self.training else None
            if drop and drop.leaves_out():
                continue
            xa = F.dropout(x, drop.input) if drop and drop.input else x
            xa = xa.to(A1.dtype)
            Bt = formulations.build_Bt(B1, B2)
            if drop and drop.rank:
                keep = (torch.rand(Bt.shape[0], device=x.device) >= drop.rank).to(Bt.dtype)
                Bt = Bt * (keep / (1.0 - drop.rank) if drop.rank_scale else keep)[:, None]
            t = xa @ formulations.build_A(A1, A2).T
            y = y + (self.lsr_scale[name] * (t @ Bt)).to(y.dtype)
        return y

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """peft's mixed batch: sample i (``x[i]``) runs adapter ``adapter_names[i]`` (``"__base__"``, or one
        this layer lacks: the base alone), all samples in one ``lsr::mixed_linear`` call per factor structure,
        the bank stacked from the adapters in use (gradients reach each adapter's own factors)."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {x.shape[0]} samples")
        if self.training:
            self._refuse_mixed_dropout(adapter_names)
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
        y, weight, bias = None, self.base_weight(), base.bias
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

    def _refuse_mixed_dropout(self, adapter_names: list[str]) -> None:
        """The mixed op runs the base and every adapter of the batch in one call, on the same input and the
        whole inner rank: dropout (on the adapter's input, over its rank, or of the whole adapter) has no place in
        it, and training without the dropout an adapter was configured with would be silently different."""
        opts = {n: ", ".join(f"{o}={v}" for o, v in (("lsr_dropout", d.input), ("rank_dropout", d.rank),
                                                     ("module_dropout", d.module)) if v)
                for n in dict.fromkeys(adapter_names) if (d := self.lsr_dropouts.get(n))}
        if opts:
            raise ValueError(f"a mixed batch (adapter_names) in training mode cannot apply dropout, and "
                             f"{'; '.join(f'adapter {n!r} sets {o}' for n, o in opts.items())}: set lsr_dropout, "
                             f"rank_dropout and module_dropout to 0 for adapters trained in mixed batches, train one "
                             f"adapter per batch (set_adapter, no adapter_names), or run the mixed batch in eval mode")

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
