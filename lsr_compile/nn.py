"""Stage 6: the LSRLinear layer and ``apply_lsr`` (wrap a model's nn.Linear layers in place)."""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import dispatch, formulations, step
from .config import FactorShapes, LSRConfig
from .ops import autocast_dtype, layer_linear, quantized_base_linear
from .quantized import DENSE, base_format, factor_dtype, refuse_merge
from .problem import LSRShape

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
    if A1.dtype != weight.dtype:
        # adapters kept in float32 over a half-precision base (peft's autocast_adapter_dtype): compute in
        # the base's dtype, as the base layer does; gradients reach the float32 factors through the cast
        A1, A2, B1, B2 = (t.to(weight.dtype) for t in (A1, A2, B1, B2))
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
    def from_linear(cls, linear: nn.Linear, config: Optional[LSRConfig] = None) -> "LSRLinear":
        """Wrap an existing nn.Linear; its weight and bias are shared (not copied) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, config or LSRConfig(), (linear.out_features, linear.in_features),
                    factor_dtype(linear))
        if type(linear).forward is not nn.Linear.forward:  # a quantized Linear (bitsandbytes) runs its own forward
            self._base_forward = linear.forward
        return self

    def _setup(self, weight: nn.Parameter, bias: Optional[nn.Parameter], config: LSRConfig, shape=None,
               dtype=None) -> None:
        self._base_forward = None  # a quantized base module's own forward (set by from_linear)
        d_out, d_in = shape or weight.shape
        f = config.shapes_for(d_in, d_out)
        self.in_features, self.out_features = d_in, d_out
        self.scale = float(config.scale_for(f.q))
        self.init = config.init
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight
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
            y = F.linear(x, self.weight, self.bias)
            factors = (self.A1, self.A2, self.B1, self.B2)
            if torch.is_grad_enabled() and any(p.requires_grad for p in factors):
                y = _MergedStep.apply(y, *factors)  # a backward to the factors says what is wrong
            return y
        p = self._parameters  # one dict instead of six Module.__getattr__ calls (a tiny layer's host time)
        return lsr_forward(x, p["weight"], p.get("bias"), p["A1"], p["A2"], p["B1"], p["B2"], self.scale,
                           self._base_forward)

    def delta_weight(self) -> Tensor:
        """``scale · B · A``, shape ``(d_out, d_in)``."""
        return formulations.delta_weight(self.A1, self.A2, self.B1, self.B2, self.scale)

    def lsr_shape(self, tokens: int, dtype=None) -> LSRShape:
        """The problem this layer runs for ``tokens`` rows (what ``tune(model)`` tunes)."""
        return LSRShape.of_factors(tokens, self.factor_shapes, dtype or self.A1.dtype, base_format(self.weight))

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
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self.weight.copy_(self._unmerged_weight)
        del self._unmerged_weight
        self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding ``W + ΔW`` (for export/serving)."""
        refuse_merge(self.weight, "LSRLinear.to_linear")
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            w = self._unmerged_weight if self.merged else self.weight
            lin.weight.copy_(w + self.delta_weight().to(w.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def num_adapter_parameters(self) -> int:
        return self.factor_shapes.num_params

    def extra_repr(self) -> str:
        f = self.factor_shapes
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"s={f.s}, r=({f.r1}, {f.r2}), n=({f.n1}, {f.n2}), m=({f.m1}, {f.m2}), q={f.q}, "
                f"scale={self.scale:.4g}, adapter_params={f.num_params}" + (", merged" if self.merged else ""))


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
    targets = target_modules or config.target_modules or default_target_modules(model)
    matches = _matcher(targets)
    excluded = _matcher(exclude_modules or config.exclude_modules or ())
    chosen = []
    for name, module in model.named_modules():
        if not name or not matches(name) or excluded(name):
            continue
        if isinstance(module, LSRLinear):
            raise ValueError(f"{name} is already an LSRLinear; apply_lsr was called twice on this model "
                             f"(the model was left as it was)")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"target module {name} is a {type(module).__name__}, not an nn.Linear; "
                            f"narrow target_modules")
        config.shapes_for(module.in_features, module.out_features)  # FactorizationError before any change
        chosen.append(name)
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"no nn.Linear matched target_modules={targets!r}; some linear layers of this model: "
                         f"{linears}")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LSRLinear.from_linear(model.get_submodule(name), config))
    keep = _matcher(trainable)
    for name, module in model.named_modules():
        if name and keep(name):
            for p in module.parameters():
                p.requires_grad_(True)
    n_train, n_total = count_parameters(model)
    log.info("apply_lsr: %d layers wrapped; trainable params %d / %d (%.3f%%)", len(chosen), n_train, n_total,
             100.0 * n_train / max(n_total, 1))
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def lsr_layers(model: nn.Module) -> dict[str, LSRLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LSRLinear)}


def explain(obj, tokens: Optional[int] = None, device=None) -> str:
    """Which kernel runs for a layer (at ``tokens`` rows, default 2048, on its device) or an LSRShape (on
    ``device``, default the CPU), forward and backward, and why."""
    if isinstance(obj, LSRLinear):
        return dispatch.explain(obj.lsr_shape(tokens or 2048), device or obj.weight.device)
    if isinstance(obj, LSRShape):
        shape = obj if tokens is None else dataclasses.replace(obj, tokens=tokens)
        return dispatch.explain(shape, device)
    raise TypeError(f"explain() takes an LSRLinear or an LSRShape, got {type(obj).__name__}")
