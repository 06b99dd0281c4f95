"""Stage 6: the LSRLinear layer and ``apply_lsr`` (wrap a model's nn.Linear layers in place)."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import base_layers, dispatch, formulations, inductor_autotune, step
from .config import FactorShapes, LSRConfig, lora_rank
from .inference_cache import Memo, layer_call
from .ops import adapter_update, autocast_dtype, layer_linear, quantized_base_linear
from .quantized import DENSE, base_format, factor_dtype, refuse_merge
from .problem import OPS, LSRShape

log = logging.getLogger(__name__)


def lsr_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor,
                scale: float, base_forward=None) -> Tensor:
    """The layer as modules run it: over a quantized base, the base's own kernel plus ``lsr::adapter``; else
    autocast respected (all operands cast to the autocast dtype, as nn.Linear does), then one
    ``torch.ops.lsr.linear`` call. Every kernel choice (Triton on a GPU too) is made inside the op at run time,
    so a traced model holds the op and nothing device-specific."""
    base = base_format(weight)
    if base != DENSE and not torch._C._are_functorch_transforms_active():
        # a quantized frozen base runs its own kernels (its module's forward; under autocast its library decides);
        # the adapter beside it computes in the autocast dtype when autocast is on, else in x's
        autocast = torch.is_autocast_enabled(x.device.type)
        dt = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        A1, A2, B1, B2 = (t.to(dt) for t in (A1, A2, B1, B2))
        return quantized_base_linear(x, weight, bias, A1, A2, B1, B2, scale, base, base_forward)
    dt = autocast_dtype(x)  # None also on meta tensors, which autocast does not know
    if dt is not None:
        with torch.autocast(x.device.type, enabled=False):
            args = [None if t is None else t.to(dt) for t in (x, weight, bias, A1, A2, B1, B2)]
            return layer_linear(*args, scale)
    if torch._C._are_functorch_transforms_active():
        # torch.func.grad / vmap / jvp: the op's autograd is not a functorch-transformable Function, the
        # plain-PyTorch formulation is (same function, every transform)
        return step.lsr_linear(x, weight, bias, A1, A2, B1, B2, scale)
    # adapters kept in float32 over a half-precision base (peft's autocast_adapter_dtype): layer_linear says
    # in which dtype the adapter is computed
    return layer_linear(x, weight, bias, A1, A2, B1, B2, scale)


def factor_shapes_of(A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor, d_in: int, d_out: int) -> FactorShapes:
    """The shapes of factors ``A1 (s, r1, n1)``, ``A2 (s, r2, n2)``, ``B1 (s, m1, r1)``, ``B2 (s, m2, r2)`` of a
    ``d_out x d_in`` layer, or a ValueError naming what does not fit."""
    shapes = {n: tuple(t.shape) for n, t in (("A1", A1), ("A2", A2), ("B1", B1), ("B2", B2))}
    if all(len(v) == 3 for v in shapes.values()):
        (s, r1, n1), (_, r2, n2), (_, m1, _), (_, m2, _) = shapes.values()
        f = FactorShapes(s, r1, r2, n1, n2, m1, m2)
        if f.factor_sizes() == shapes and (f.d_in, f.d_out) == (d_in, d_out):
            return f
    raise ValueError(f"the adapter's factors {shapes} do not fit together (or the {d_out}x{d_in} layer): the layout is "
                     f"A1 (s, r1, n1), A2 (s, r2, n2), B1 (s, m1, r1), B2 (s, m2, r2) with n1*n2 = d_in, "
                     f"m1*m2 = d_out; assign all four factors of one adapter")


@dataclass(frozen=True)
class Dropouts:
    """A layer's dropout in training (``LSRConfig``'s ``lsr_dropout``, ``rank_dropout``, ``rank_dropout_scale``,
    ``module_dropout``); false when there is none."""

    input: float = 0.0
    rank: float = 0.0
    rank_scale: bool = False
    module: float = 0.0

    @staticmethod
    def of(config: LSRConfig) -> "Dropouts":
        return Dropouts(config.lsr_dropout, config.rank_dropout, config.rank_dropout_scale, config.module_dropout)

    def __bool__(self) -> bool:
        return bool(self.input or self.rank or self.module)

    def leaves_out(self) -> bool:
        """This call's module-dropout coin, drawn from torch's CPU generator as peft's LoKr does: activation
        checkpointing saves and restores that state, so its recompute makes the same decision (Python's
        ``random`` is not replayed: a different graph, a ``CheckpointError`` or wrong gradients)."""
        return bool(self.module) and torch.rand(()).item() < self.module


def regularized_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], A1: Tensor, A2: Tensor, B1: Tensor,
                        B2: Tensor, scale: float, drop: Dropouts, base_forward=None) -> Tensor:
    """A training call with dropout: the base on ``x``, the adapter on ``dropout(x)`` with a mask over its q rank
    components (``rank``), or left out of the call altogether (``module``), as peft's LoRA and LoKr do. The
    adapter then runs apart from the base (``lsr::adapter``, or in ATen with the mask), not in one fused op."""
    base = base_format(weight)
    base_out = base_forward(x) if base_forward is not None and base != DENSE else F.linear(x, weight, bias)
    if drop.leaves_out():
        return base_out
    xa = F.dropout(x, drop.input) if drop.input else x
    dt = autocast_dtype(x) or base_out.dtype
    if not xa.is_floating_point():
        dt = A1.dtype
    A1, A2, B1, B2 = (t.to(dt) for t in (A1, A2, B1, B2))
    if drop.rank:
        keep = (torch.rand(A1.shape[1] * A2.shape[1], device=x.device) >= drop.rank).to(dt)
        if drop.rank_scale:
            keep = keep / (1.0 - drop.rank)
        Bt = formulations.build_Bt(B1, B2) * keep[:, None]
        update = (xa.to(dt) @ formulations.build_A(A1, A2).T) @ Bt * scale
    else:
        update = adapter_update(xa.to(dt), A1, A2, B1, B2, scale, base)
    return base_out + update.to(base_out.dtype)


def refuse_derived_merge(module: nn.Module, where: str) -> None:
    """A weight computed from others (pruned, parametrized, weight-normed) is recomputed on every call: ΔW folded
    into it would be lost without a word."""
    if "weight" not in module._parameters:
        raise ValueError(f"{where}: the base weight of this {type(module).__name__} is computed (pruned, "
                         f"parametrized or weight-normed), so ΔW folded into it would be lost at its next "
                         f"computation. Make it a plain parameter first (torch.nn.utils.prune.remove(module, "
                         f"'weight'), torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')), or use "
                         f"to_linear() / merge_and_unload after that, or keep the adapter unmerged")


class LSRMergedError(RuntimeError):
    """An operation that needs the adapter apart from the weight ran on a merged layer."""


class _MergedStep(torch.autograd.Function):
    """Identity on a merged layer's output that refuses to send gradients to the factors, which the merged
    weight no longer depends on (without it, training fails deep in autograd: "does not require grad and
    does not have a grad_fn", or the factors silently get none)."""

    @staticmethod
    def forward(ctx, y, *factors):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if any(ctx.needs_input_grad[1:]):
            raise LSRMergedError("this LSRLinear is merged (merge() folded the adapter into the weight), so its "
                                 "factors get no gradient: call layer.unmerge() before training it, or freeze the "
                                 "factors (requires_grad_(False)) to train only what is around it")
        return (grad,) + (None,) * 4


@torch.no_grad()
def init_factors(A1: Tensor, A2: Tensor, B1: Tensor, B2: Tensor, f: FactorShapes, init: str) -> None:
    """``"reference"``: every factor ~ N(0, 0.01²), as the method's code (ΔW ≠ 0 at step 0).
    ``"zeros"``: B2 = 0, so ΔW = 0 at step 0; A1, A2, B1 are random so every factor still trains
    (a Kronecker term with both factors zero would get no gradient in either). Their variances make a
    first SGD step move the output about as much as LoRA's default does at the same learning rate
    (0.4-1.4x at 768², 384x1536, 4096² for s = 4, 16 and r = 2, (2, 4), with the default scale 1):
    ``x Aᵀ`` has LoRA's per-component variance 1/3 for unit-variance x, and B1's variance 1/(2·s·r1)
    keeps the step B2's gradient makes in B from growing with s and the layer's size."""
    if init == "reference":
        for p in (A1, A2, B1, B2):
            p.normal_(0.0, 0.01)
        return
    # Var(A1)·Var(A2)·s·d_in = 1/3
    root_s = math.sqrt(f.s)
    A1.normal_(0.0, 1.0 / math.sqrt(3 ** 0.5 * root_s * f.n1))
    A2.normal_(0.0, 1.0 / math.sqrt(3 ** 0.5 * root_s * f.n2))
    B1.normal_(0.0, 1.0 / math.sqrt(2.0 * f.s * f.r1))
    B2.zero_()


class LSRLinear(nn.Module):
    """A frozen linear layer plus the LSR-Adapt update: ``y = x Wᵀ + b + scale·(x Aᵀ) Bᵀ``.

    ``A = Σ_l A1[l] ⊗ A2[l]`` (``A1 (s, r1, n1)``, ``A2 (s, r2, n2)``) and
    ``B = Σ_l B1[l] ⊗ B2[l]`` (``B1 (s, m1, r1)``, ``B2 (s, m2, r2)``), as in docs/design.md §1.
    The forward runs ``torch.ops.lsr.linear``, i.e. the kernel tuned for this shape.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: Optional[LSRConfig] = None,
                 *, device=None, dtype=None):
        super().__init__()
        config = config or LSRConfig()
        config.shapes_for(in_features, out_features)  # refused before the base is allocated
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base.weight, base.bias, config)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: Optional[LSRConfig] = None) -> "LSRLinear":
        """Wrap an existing ``nn.Linear`` or transformers ``Conv1D`` (GPT-2; its weight stored ``d_in × d_out``,
        ``fan_in_fan_out``); its weight and bias are shared (not copied, kept in their layout) and frozen."""
        if not base_layers.is_adaptable(linear):
            raise TypeError(f"from_linear needs an {base_layers.kinds()}, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        d_in, d_out = base_layers.dims(linear)
        self._setup(linear.weight, linear.bias, config or LSRConfig(), (d_out, d_in), factor_dtype(linear),
                    fan_in_fan_out=base_layers.is_conv1d(linear))
        if isinstance(linear, nn.Linear) and type(linear).forward is not nn.Linear.forward:
            self._base_forward = linear.forward  # a quantized Linear (bitsandbytes) runs its own forward
        return self

    def _setup(self, weight: nn.Parameter, bias: Optional[nn.Parameter], config: LSRConfig, shape=None,
               dtype=None, fan_in_fan_out: bool = False) -> None:
        self._base_forward = None  # a quantized base module's own forward (set by from_linear)
        self._inference_memo = Memo()  # what calls without a graph keep (inference_cache)
        self.fan_in_fan_out = fan_in_fan_out  # the weight is stored d_in x d_out (a Conv1D's)
        d_out, d_in = shape or weight.shape
        f = config.shapes_for(d_in, d_out)
        self.in_features, self.out_features = d_in, d_out
        self.scale = float(config.scale_for(f.q))
        self.init = config.init
        self.dropouts = Dropouts.of(config)
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)  # as nn.Linear: forward finds every tensor in _parameters
        else:
            self.bias = bias
        kw = dict(device=weight.device, dtype=dtype or weight.dtype)
        for name, shape in f.factor_sizes().items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **kw)))
        self.merged = False
        self.reset_adapter()

    @property
    def factor_shapes(self) -> FactorShapes:
        """The adapter's shapes, read off its factors: a layer whose factor parameters were replaced (another
        number of terms, other ranks) describes what it now runs (``lsr_shape``, ``explain``, parameter counts)."""
        return factor_shapes_of(self.A1, self.A2, self.B1, self.B2, self.in_features, self.out_features)

    def reset_adapter(self) -> None:
        init_factors(self.A1, self.A2, self.B1, self.B2, self.factor_shapes, self.init)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            y = F.linear(x, base_layers.as_linear(self.weight, self.fan_in_fan_out), self.bias)
            factors = (self.A1, self.A2, self.B1, self.B2)
            if torch.is_grad_enabled() and any(p.requires_grad for p in factors):
                y = _MergedStep.apply(y, *factors)  # a backward to the factors says what is wrong
            return y
        p = self._parameters  # one dict instead of six Module.__getattr__ calls (a tiny layer's host time)
        try:
            weight, bias, A1, A2, B1, B2 = p["weight"], p["bias"], p["A1"], p["A2"], p["B1"], p["B2"]
        except KeyError:  # pruned or parametrized (torch.nn.utils.prune, parametrize, weight_norm): the attributes
            weight, bias, A1, A2, B1, B2 = self.weight, self.bias, self.A1, self.A2, self.B1, self.B2
        if self.fan_in_fan_out:
            weight = weight.t()
        if self.training and self.dropouts:
            return regularized_forward(x, weight, bias, A1, A2, B1, B2, self.scale, self.dropouts,
                                       self._base_forward)
        y = layer_call(self._inference_memo, x, weight, bias, A1, A2, B1, B2, self.scale)
        if y is not None:
            return y
        return lsr_forward(x, weight, bias, A1, A2, B1, B2, self.scale, self._base_forward)

    def __setstate__(self, state):
        state.pop("_decode_memos", None)  # pickled by an earlier version
        super().__setstate__(state)
        self.__dict__.setdefault("_inference_memo", Memo())

    def delta_weight(self) -> Tensor:
        """``scale · B · A``, shape ``(d_out, d_in)``."""
        return formulations.delta_weight(self.A1, self.A2, self.B1, self.B2, self.scale)

    def lsr_shape(self, tokens: int, dtype=None) -> LSRShape:
        """The problem this layer runs for ``tokens`` rows (what ``tune(model)`` tunes)."""
        return LSRShape.of_factors(tokens, self.factor_shapes, dtype or base_layers.compute_dtype(self.weight, self.A1),
                                   base_format(self.weight))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A state dict always holds the unmerged base weight, so loading it never applies ΔW twice."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            w = self._unmerged_weight
            destination[prefix + "weight"] = w if keep_vars else w.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Loading into a merged layer loads the unmerged weights, then merges the loaded adapter."""
        merged = self.merged
        if merged:
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if merged:
            self.merge()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight (inference); the original weight is kept so ``unmerge`` is exact."""
        if self.merged:
            raise RuntimeError("layer is already merged; call unmerge() first")
        refuse_merge(self.weight, "LSRLinear.merge")
        refuse_derived_merge(self, "LSRLinear.merge")
        self._unmerged_weight = self.weight.detach().clone()
        base_layers.as_linear(self.weight, self.fan_in_fan_out).add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self.weight.copy_(self._unmerged_weight)
        del self._unmerged_weight
        self.merged = False

    def to_linear(self) -> nn.Module:
        """The base layer's kind (an ``nn.Linear``, or a ``Conv1D`` for one) holding ``W + ΔW`` (export, serving)."""
        refuse_merge(self.weight, "LSRLinear.to_linear")
        if self.fan_in_fan_out:
            lin = base_layers.conv1d_class()(self.out_features, self.in_features)
            lin.to(device=self.weight.device, dtype=self.weight.dtype)
            if self.bias is None:
                lin.bias = None
        else:
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = self._unmerged_weight if self.merged else self.weight
            merged = base_layers.as_linear(w, self.fan_in_fan_out) + self.delta_weight().to(w.dtype)
            lin.weight.copy_(base_layers.as_linear(merged, self.fan_in_fan_out))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def num_adapter_parameters(self) -> int:
        return self.factor_shapes.num_params

    def extra_repr(self) -> str:
        f = self.factor_shapes
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"s={f.s}, r=({f.r1}, {f.r2}), n=({f.n1}, {f.n2}), m=({f.m1}, {f.m2}), q={f.q}, "
                f"scale={self.scale:.4g}, adapter_params={f.num_params}" + (", merged" if self.merged else "")
                + (", fan_in_fan_out (Conv1D weight)" if self.fan_in_fan_out else ""))


def _matcher(targets: Union[str, Iterable[str]]):
    if isinstance(targets, str):
        pattern = re.compile(targets)
        return lambda name: pattern.fullmatch(name) is not None
    targets = tuple(targets)
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's LoRA defaults for known architectures (BERT/RoBERTa: query, value; LLaMA: q_proj, v_proj)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in defaults:
        raise ValueError(f"no default target modules for model type {model_type!r}; pass target_modules "
                         f"(e.g. ('query', 'value') or a regex)")
    return list(defaults[model_type])


def apply_lsr(model: nn.Module, config: Optional[LSRConfig] = None, target_modules=None,
              exclude_modules=None, trainable: Iterable[str] = (), freeze: bool = True) -> nn.Module:
    """Replace matching ``nn.Linear`` layers of ``model`` by ``LSRLinear`` in place.

    ``target_modules``: names (suffix match) or a regex (full match); defaults to
    ``config.target_modules``, then to peft's defaults for the architecture.
    With ``freeze``, every other parameter is frozen except modules named in
    ``trainable`` (e.g. a classifier head). Logs the trainable-parameter count.
    All or nothing: every target is checked before the model is touched, so a call that raises (a layer
    that does not factor, a second call, a target that is not a Linear) leaves the model as it was.
    """
    config = config or LSRConfig()
    targets = resolve_targets(model, target_modules or config.target_modules or default_target_modules(model))
    matches = _matcher(targets)
    excluded = _matcher(exclude_modules or config.exclude_modules or ())
    chosen, found = [], []
    for name, module in model.named_modules():
        if not name or not matches(name) or excluded(name):
            continue
        if isinstance(module, LSRLinear):
            raise ValueError(f"{name} is already an LSRLinear; apply_lsr was called twice on this model "
                             f"(the model was left as it was)")
        if not base_layers.is_adaptable(module):
            raise TypeError(f"target module {name} is a {type(module).__name__}, not an {base_layers.kinds()}; "
                            f"narrow target_modules")
        found.append(name)
        if not config.selects(name):
            continue
        config.for_layer(name).shapes_for(*base_layers.dims(module))  # FactorizationError before any change
        chosen.append(name)
    if not chosen:
        raise _nothing_matched(model, targets, config, found)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LSRLinear.from_linear(model.get_submodule(name), config.for_layer(name)))
    keep = _matcher(trainable)
    for name, module in model.named_modules():
        if name and keep(name):
            for p in module.parameters():
                p.requires_grad_(True)
    n_train, n_total = count_parameters(model)
    log.info("apply_lsr: %d layers wrapped; trainable params %d / %d (%.3f%%)", len(chosen), n_train, n_total,
             100.0 * n_train / max(n_total, 1))
    return model


ALL_LINEAR = "all-linear"


# LoraConfig's names that lsr_config_for_lora takes with LoRA's meaning (besides r), and LSRConfig's for each
LORA_NAMES = {"lora_alpha": "alpha", "lora_dropout": "lsr_dropout", "use_rslora": "scaling"}


def lsr_config_for_lora(rank: Union[int, tuple, None] = None, budget: Optional[float] = None, model: Optional[nn.Module] = None,
                        shape: Optional[tuple[int, int]] = None, **config) -> LSRConfig:
    """The LSR config that stands in for a LoRA of rank ``rank`` (default 8): the same rank of update (inner rank
    ``q = r1·r2 = rank``, the most balanced split: 8 -> r = (4, 2); a pair ``(r1, r2)`` is taken as the split) and,
    with ``budget``, the most Kronecker terms ``s`` whose trainable parameters stay within ``budget`` times those
    of the LoRA of the same ranks on the layers it would adapt (those of ``model`` that ``config``'s target_modules
    select, or one ``shape = (d_in, d_out)``); without ``budget``, ``s`` as given (default 4). Layers whose ``s`` a
    ``rank_pattern`` entry sets keep it, and their parameters count against the budget first.

    LoRA's spelling means what it means in ``LoraConfig``: ``r=`` is ``rank`` (give one of them), an int in
    ``rank_pattern`` is that layer's LoRA rank (split as ``rank`` is; a pair or a dict is LSR's structure, as in
    ``LSRConfig``), ``lora_alpha`` is ``alpha`` with LoRA's scale ``lora_alpha / rank`` (``scaling="lora"``;
    ``use_rslora=True``: ``/ sqrt(rank)``), ``lora_dropout`` is ``lsr_dropout``. Other keyword arguments go to
    ``LSRConfig`` (target_modules, alpha, ...). A rank above a layer's ``min(d_in, d_out)`` is refused when the
    layers are known.

        cfg = lc.lsr_config_for_lora(8, budget=0.3, model=model)   # rank 8 at <= 0.3x LoRA-8's parameters"""
    config = _lsr_names(config)
    if "r" in config:
        if rank is not None:
            raise TypeError(f"lsr_config_for_lora got rank={rank!r} and r={config['r']!r}: give LoRA's rank once "
                            f"(r= is LoraConfig's spelling of rank)")
        rank = config.pop("r")
    split = lora_rank(8 if rank is None else rank)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        raise ValueError(f"budget must be a finite, positive multiple of LoRA's parameters (e.g. 0.3), got {budget!r}")
    if model is not None and shape is not None:
        raise ValueError("give the layers to count on once: model= (its target layers) or shape=(d_in, d_out)")
    if shape is not None and not (isinstance(shape, (tuple, list)) and len(shape) == 2
                                  and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise ValueError(f"shape must be one layer's (d_in, d_out), a pair of ints, got {shape!r} (a square layer: "
                         f"(4096, 4096))")
    pattern = {k: v if isinstance(v, (dict, tuple, list)) else lora_rank(v, f"rank_pattern[{k!r}]")
               for k, v in dict(config.pop("rank_pattern", None) or {}).items()}
    cfg = LSRConfig(**({"r": split, "rank_pattern": pattern} | config))
    if model is None and shape is None:
        if budget is not None:
            raise ValueError("give the layers the budget is counted on: model= (its target layers) or "
                             "shape=(d_in, d_out)")
        return cfg
    if shape is not None:
        layers = {"layer": tuple(shape)}
    else:
        targets = resolve_targets(model, cfg.target_modules or default_target_modules(model))
        matches, excluded = _matcher(targets), _matcher(cfg.exclude_modules or ())
        found = {n: m for n, m in model.named_modules() if n and matches(n) and not excluded(n)
                 and base_layers.is_adaptable(m)}
        layers = {n: base_layers.dims(m) for n, m in found.items() if cfg.selects(n)}
        if not layers:
            raise _nothing_matched(model, targets, cfg, list(found))
    lora = fixed = per_term = 0
    for name, (d_in, d_out) in layers.items():
        layer_cfg = cfg.for_layer(name)
        if layer_cfg.inner_rank > min(d_in, d_out):
            raise ValueError(f"rank {layer_cfg.inner_rank} is above what {name} ({d_in} -> {d_out}) can carry: its "
                             f"update has rank at most min(d_in, d_out) = {min(d_in, d_out)}; give a rank of at most "
                             f"that")
        f = layer_cfg.shapes_for(d_in, d_out)
        lora += f.q * (d_in + d_out)
        if "s" in cfg.pattern_for(name):
            fixed += f.num_params
        else:
            per_term += f.num_params // f.s
    if budget is None:
        return cfg
    pinned = f" ({fixed / lora:.3f}x taken by the layers whose s rank_pattern sets)" if fixed else ""
    if fixed > budget * lora:
        raise ValueError(f"the layers whose s rank_pattern sets already take {fixed / lora:.3f}x LoRA's parameters, "
                         f"above budget={budget:g}: lower their s, or raise the budget")
    if not per_term:
        return cfg
    s = int((budget * lora - fixed) // per_term)
    if s < 1:
        raise ValueError(f"no LSR config of inner rank {cfg.inner_rank} fits {budget:g}x LoRA's parameters here: one "
                         f"Kronecker term already takes {per_term / lora:.3f}x{pinned}")
    return dataclasses.replace(cfg, s=s)


def _lsr_names(config: dict) -> dict:
    """``lsr_config_for_lora``'s keyword arguments with LoraConfig's names as LSRConfig's, LoRA's meaning kept."""
    out = dict(config)
    for lora_name, name in LORA_NAMES.items():
        if lora_name in out:
            if name in out:
                raise TypeError(f"lsr_config_for_lora got {lora_name} (LoRA's name) and {name} (LSR's) for the same "
                                f"thing: give one")
            v = out.pop(lora_name)
            out[name] = ("rslora" if v else "lora") if lora_name == "use_rslora" else v
    if "lora_alpha" in config:
        out.setdefault("scaling", "lora")  # LoRA's scale: lora_alpha / rank
    unknown = set(out) - {f.name for f in dataclasses.fields(LSRConfig)}
    if unknown:
        raise TypeError(f"lsr_config_for_lora got {', '.join(sorted(unknown))}, which LSRConfig does not take; of "
                        f"LoraConfig's own names it takes r (as rank), "
                        f"{', '.join(f'{k} (as {v})' for k, v in LORA_NAMES.items())}")
    return out


def _nothing_matched(model: nn.Module, targets, config: LSRConfig, found: list) -> ValueError:
    """No layer to adapt: which option left them all out, and what it could have read."""
    if not found:
        linears = [n for n, m in model.named_modules() if base_layers.is_adaptable(m)][:8]
        return ValueError(f"no nn.Linear matched target_modules={targets!r} (transformers' Conv1D layers count too); "
                          f"some linear layers of this model: {linears}")
    where = f"layers_to_transform={config.layers_to_transform!r}, layers_pattern={config.layers_pattern!r}"
    indices = sorted({i for i in map(config.layer_index, found) if i is not None})
    if indices:
        return ValueError(f"target_modules={targets!r} matched {len(found)} layers, but {where} kept none of them: "
                          f"their layer indices are {indices}")
    lists = sorted({m.group(1) for m in (re.match(r"(?:^|.*?\.)([^.]+)\.\d+\.", n) for n in found) if m})
    return ValueError(f"target_modules={targets!r} matched {len(found)} layers (e.g. {found[0]}), but {where} finds no "
                      f"layer index in their names" + (f": set layers_pattern to the name of the layer list, e.g. "
                                                       f"{lists[0]!r}" if lists else ""))


def resolve_targets(model: nn.Module, targets):
    """``target_modules`` as matched: names (suffix match) or a regex, with ``"all-linear"`` expanded to the
    model's linear layers."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return all_linear_layers(model)
    return targets


def all_linear_layers(model: nn.Module) -> list[str]:
    """peft's ``"all-linear"``: every ``nn.Linear`` and ``Conv1D`` but the model's output layer (the one its
    ``get_output_embeddings()`` returns, else a layer named ``lm_head``)."""
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if name and base_layers.is_adaptable(m) and m is not out_layer and name.split(".")[-1] != "lm_head"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def lsr_layers(model: nn.Module) -> dict[str, LSRLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LSRLinear)}


def explain(obj, tokens: Optional[int] = None, device=None) -> str:
    """Which kernel runs, forward and backward, and why: for a layer (``LSRLinear`` or peft's LSR layer) at
    ``tokens`` rows (default 2048) on its device; for a model, each distinct layer problem with the layers that
    run it; for an ``LSRShape``, on ``device`` (default the CPU)."""
    if isinstance(obj, LSRShape):
        shape = obj if tokens is None else dataclasses.replace(obj, tokens=tokens)
        return _with_max_autotune(dispatch.explain(shape, device), [shape])
    if not isinstance(obj, nn.Module):
        raise TypeError(f"explain() takes an LSR layer, a model with LSR layers or an LSRShape, got "
                        f"{type(obj).__name__}")
    layers = {name: m for name, m in obj.named_modules() if callable(getattr(m, "lsr_shape", None))}
    if not layers:
        raise TypeError(f"explain() takes an LSR layer, a model with LSR layers or an LSRShape; this "
                        f"{type(obj).__name__} holds no LSR layer (wrap it with apply_lsr or peft's get_peft_model)")
    groups: dict = {}
    base_only = []  # peft layers without the active adapter (set_adapter to one on other layers)
    for name, m in layers.items():
        dev = device or next(m.parameters()).device
        if torch.device(dev).type == "meta":
            raise ValueError(f"explain(): {name or type(m).__name__} is on the meta device (built, not loaded), where "
                             f"every call runs a PyTorch formulation on shapes alone; pass device='cpu' or 'cuda' to "
                             f"see what will run there, or call explain after to_empty() and loading the weights")
        shape = m.lsr_shape(tokens or 2048)
        if shape is None:
            base_only.append((name or type(m).__name__, m))
        else:
            groups.setdefault((shape, torch.device(dev)), []).append(name or type(m).__name__)
    if "" in layers and len(groups) == 1:  # one layer: no list of names
        (shape, dev), = groups
        return _with_max_autotune(dispatch.explain(shape, dev), [shape])
    text = "\n".join(f"{_some(names)}:\n" + dispatch.explain(shape, dev) for (shape, dev), names in groups.items())
    if base_only:
        active = sorted({a for _, m in base_only for a in m.active_adapters})
        text += (f"\n{_some([n for n, _ in base_only])}: the base layer alone, no LSR kernel (the active adapter "
                 f"{', '.join(active)} is not on these layers)")
    return _with_max_autotune(text.strip("\n"), [shape for shape, _ in groups])


def _some(names: list) -> str:
    return f"{', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"


def _with_max_autotune(text: str, shapes) -> str:
    """``explain``'s last line, for the dense layer's ops: what ``torch.compile(mode="max-autotune")`` does."""
    if not any(s.ops == OPS for s in shapes):
        return text
    return text + "\n" + inductor_autotune.describe()
