"""Before training: how much of each layer's first-step gradient an adapter structure can follow.

A gradient step restricted to an adapter lowers the loss, to first order, by the part of the full weight
gradient ``G = dL/dW`` that the adapter's updates can represent. For LoRA of rank r the best representable part
of ``G`` is its top r singular directions (Eckart-Young); for LSR it is the nearest ``B A`` with ``B`` and ``A``
sums of ``s`` Kronecker products of the layer's factor shapes. ``gradient_fit`` measures, on a batch or two,
the share of ``‖G‖²`` each structure follows, summed over the layers (layers with larger gradients weigh more,
as they do in the loss), for LoRA of rank 1, 2, 4, 8 and for LSR at the same parameter counts, and names
the LSR structure that follows most at each budget.

LSR's fit has no closed form: it starts from the nearest Kronecker sums (Van Loan-Pitsianis: the top ``s``
singular pairs of a rearrangement) of the best rank-q factors and polishes all four factors by L-BFGS. What
it reports is a fit it found, so a lower bound on what the structure can follow. It measures capacity only:
not how fast a given initialisation and learning rate get there (docs/finetuning.md says how well its
ranking agreed with measured accuracy).

    fit = lc.gradient_fit(model, batches, target_modules=["q_proj", "v_proj"])
    print(fit.table())
    config = fit.recommend(0.25)     # the LSRConfig that follows most at 0.25x LoRA-8's parameters
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import base_layers, formulations
from .config import FactorShapes, LSRConfig, LSRConfigWarning, useful_terms

# multiples of LoRA r=8's parameters on the same layers: LoRA r = 1, 2, 4, 8
DEFAULT_BUDGETS = (0.125, 0.25, 0.5, 1.0)
# LSR's inner rank splits (r1, r2) tried at each budget, each with the most terms s the budget allows
DEFAULT_SPLITS = ((1, 2), (2, 2), (2, 4), (4, 2))


@dataclass(frozen=True)
class Candidate:
    """One structure on every target layer: LoRA of rank ``rank`` or LSR with ``config``."""

    name: str
    params: int
    budget: float  # params / LoRA r=8's
    energy: float  # share of Σ‖G‖² followed, 0..1
    per_layer: dict = field(default_factory=dict, compare=False, repr=False)
    rank: Optional[int] = None
    config: Optional[LSRConfig] = field(default=None, compare=False)

    @property
    def is_lora(self) -> bool:
        return self.config is None


@dataclass
class GradientFit:
    """What ``gradient_fit`` measured: the target layers' gradient energies and every candidate's share."""

    layers: dict  # name -> (d_in, d_out)
    gradient_energy: dict  # name -> ‖G‖²
    candidates: list
    lora8_params: int

    def lora(self, rank: int) -> Optional[Candidate]:
        return next((c for c in self.candidates if c.rank == rank), None)

    def lsr(self, budget: Optional[float] = None) -> list:
        """The LSR candidates within ``budget`` (a multiple of LoRA-8's parameters; None: all), best first."""
        out = [c for c in self.candidates if not c.is_lora and (budget is None or c.budget <= budget + 1e-9)]
        return sorted(out, key=lambda c: (-round(c.energy, 4), c.params))  # a tie within the fit's noise: the smaller

    def recommend(self, budget: float) -> LSRConfig:
        """The LSR config that follows the most gradient energy within ``budget`` x LoRA-8's parameters."""
        found = self.lsr(budget)
        if not found:
            smallest = min((c.budget for c in self.lsr()), default=None)
            raise ValueError(f"no LSR candidate within budget={budget:g}x LoRA-8's parameters was measured"
                             + (f"; the smallest took {smallest:.3f}x" if smallest is not None else ""))
        return found[0].config

    def table(self) -> str:
        """A markdown table: every candidate by size, its share of the gradient energy, LoRA's of the same size."""
        rows = ["| structure | trainable params | x LoRA-8 | gradient energy followed | LoRA of this size |",
                "|---|---|---|---|---|"]
        for c in sorted(self.candidates, key=lambda c: (c.params, not c.is_lora, -c.energy)):
            ref = self.lora_at(c.budget)
            rel = "-" if c.is_lora or ref is None else f"{ref.energy:.3f} ({ref.name})"
            rows.append(f"| {c.name} | {c.params:,} | {c.budget:.3f} | {c.energy:.3f} | {rel} |")
        return "\n".join(rows)

    def lora_at(self, budget: float) -> Optional[Candidate]:
        """The LoRA candidate of the largest rank within ``budget`` (x1.05: LSR's sizes round down)."""
        loras = [c for c in self.candidates if c.is_lora and c.budget <= budget * 1.05 + 1e-9]
        return max(loras, key=lambda c: c.params, default=None)

    def __str__(self) -> str:
        return self.table()


def gradient_fit(model: nn.Module, batches, *, target_modules=None, budgets: Sequence[float] = DEFAULT_BUDGETS,
                 splits: Sequence[tuple] = DEFAULT_SPLITS, configs: Sequence[LSRConfig] = (),
                 lora_ranks: Optional[Sequence[int]] = None,
                 loss: Optional[Callable[[nn.Module, Mapping], Tensor]] = None, iters: int = 30) -> GradientFit:
    """Measure each structure's share of the target layers' first-step gradient (module docstring).

    ``model``: the frozen base, its target layers plain (``nn.Linear`` or transformers' ``Conv1D``, floating
    point). ``batches``: one batch (a dict of ``model(**batch)`` arguments) or an iterable of them; the
    gradient is their sum. ``loss(model, batch)`` gives the loss (default: the output's ``.loss``, so give
    ``labels``). ``target_modules`` as in ``LSRConfig`` (``"all-linear"`` too). ``budgets``: multiples of LoRA
    r=8's parameters on those layers; at each, LoRA of that size (rank 8·budget, where an integer) and LSR with
    each split in ``splits`` at the most terms that fit; ``configs``: more LSR configs to measure as given, on the
    target layers they select (``layers_to_transform``; ``rank_pattern`` applies); ``lora_ranks``: LoRA ranks to measure besides
    (default: those of the budgets). ``iters``: L-BFGS iterations per LSR fit."""
    from .nn import _matcher, default_target_modules, lsr_config_for_lora, resolve_targets

    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    for r in lora_ranks or ():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"lora_ranks are positive ints, got {r!r}")
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"budgets are positive multiples of LoRA r=8's parameters (e.g. 0.25), got {b!r}")
    targets = default_target_modules(model) if target_modules is None else target_modules
    if not targets:
        raise ValueError("target_modules is empty: name the layers to measure (or 'all-linear')")
    targets = resolve_targets(model, targets)
    matches = _matcher(targets)
    modules = {n: m for n, m in model.named_modules() if n and matches(n) and base_layers.is_adaptable(m)}
    if not modules:
        raise ValueError(f"target_modules={targets!r} match no {base_layers.kinds()} in {type(model).__name__}")
    for n, m in modules.items():
        if not m.weight.is_floating_point():
            raise ValueError(f"{n}'s weight is {m.weight.dtype}: the gradient is measured on a floating-point "
                             f"base (measure on the unquantized model; the fit does not depend on the storage)")
    grads = _first_step_gradients(model, modules, batches, loss)
    layers = {n: base_layers.dims(m) for n, m in modules.items()}
    lora8 = sum(8 * (d_in + d_out) for d_in, d_out in layers.values())
    energy = {n: float(g.square().sum()) for n, g in grads.items()}
    total = sum(energy.values())
    if not total > 0:
        raise ValueError("the loss's gradient is zero on every target layer: nothing to fit (is the loss "
                         "constant, or are the labels all ignored?)")
    svds = {n: torch.linalg.svd(g, full_matrices=False) for n, g in grads.items()}
    spectra = {n: svd[1].square() for n, svd in svds.items()}

    def share(per: dict) -> dict:
        return {n: per[n] / energy[n] if energy[n] > 0 else float("nan") for n in layers}

    def lora(rank: int) -> Candidate:
        per = {n: float(spectra[n][:rank].sum()) for n in layers}
        params = sum(rank * (d_in + d_out) for d_in, d_out in layers.values())
        return Candidate(f"LoRA r={rank}", params, params / lora8, sum(per.values()) / total, share(per), rank=rank)

    def shapes(cfg: LSRConfig) -> dict:
        """Each layer ``cfg`` adapts -> its factor shapes; a layer it cannot factor is named."""
        out = {}
        for n, (d_in, d_out) in layers.items():
            if not cfg.selects(n):
                continue
            try:
                with warnings.catch_warnings():  # a config asking for more than a layer can use is still one
                    warnings.simplefilter("ignore", LSRConfigWarning)
                    out[n] = cfg.for_layer(n).shapes_for(d_in, d_out)
            except ValueError as e:
                raise ValueError(f"{n} ({d_in} -> {d_out}): {e}; leave it out of target_modules") from None
        return out

    def lsr(cfg: LSRConfig, name: str) -> Candidate:
        groups = {}
        for n, f in shapes(cfg).items():
            groups.setdefault(f, []).append(n)
        params = sum(f.num_params * len(names) for f, names in groups.items())
        per = dict.fromkeys(layers, 0.0)  # a layer the config leaves out follows nothing
        for f, names in groups.items():
            per.update(zip(names, _lsr_followed([svds[n] for n in names], f, iters)))
        return Candidate(name, params, params / lora8, sum(per.values()) / total, share(per), config=cfg)

    shapes(LSRConfig(s=1, r=(1, 1)))  # every target layer has a Kronecker split, or its name is the error
    ranks = sorted({int(8 * b) for b in budgets if float(8 * b).is_integer()} | set(lora_ranks or ()))
    out = [lora(r) for r in ranks]
    seen = set()
    for b in budgets:
        for split in splits:
            q = split[0] * split[1]
            try:
                cfg = lsr_config_for_lora(tuple(split), budget=b * 8 / q, model=model, target_modules=targets)
            except ValueError as e:
                if "fits" in str(e) or "above what" in str(e):  # one term above the budget, q above a layer's rank
                    continue
                raise
            # no more terms than some layer can use: past that, parameters that add nothing
            most = max(useful_terms(min(f.r1, f.n1, f.m1), min(f.r2, f.n2, f.m2), f.n1, f.n2, f.m1, f.m2)
                       for f in shapes(cfg).values())
            cfg = dataclasses.replace(cfg, s=min(cfg.s, most))
            key = (cfg.s, tuple(split))
            if key not in seen:
                seen.add(key)
                out.append(lsr(cfg, f"LSR s={cfg.s} r={tuple(split)}"))
    for cfg in configs:
        pattern = f" rank_pattern={dict(cfg.rank_pattern)}" if cfg.rank_pattern else ""
        out.append(lsr(cfg, f"LSR s={cfg.s} r={tuple(cfg.r)}{pattern}"))
    return GradientFit(layers, energy, out, lora8)


def _batches(batches) -> list:
    if isinstance(batches, Mapping):
        return [batches]
    out = list(batches)
    if not out or not all(isinstance(b, Mapping) for b in out):
        raise ValueError("batches must be one batch (a dict of the model's keyword arguments) or a non-empty "
                         "iterable of them")
    return out


def _first_step_gradients(model: nn.Module, modules: dict, batches, loss) -> dict:
    """``dL/dW`` (``d_out x d_in``, float64) of every target layer summed over ``batches``, with every other
    parameter frozen; the model's ``requires_grad``, ``.grad`` and train/eval mode are as they were after."""
    params = list(model.parameters())
    was = [(p.requires_grad, p.grad) for p in params]
    modes = [(m, m.training) for m in model.modules()]
    weights = {n: m.weight for n, m in modules.items()}
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        model.eval()  # the gradient of the model as it is, not of one dropout draw
        device = next(iter(weights.values())).device
        for batch in _batches(batches):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with torch.enable_grad():
                value = loss(model, batch) if loss is not None else getattr(model(**batch), "loss", None)
            if value is None:
                raise ValueError("the model returned no loss: give labels in the batch, or loss=")
            if value.ndim != 0:
                raise ValueError(f"the loss must be a scalar, got shape {tuple(value.shape)}")
            value.backward()
        grads = {}
        for n, m in modules.items():
            g = weights[n].grad
            if g is None:
                raise ValueError(f"{n} got no gradient from the loss: is it on the loss's path?")
            grads[n] = base_layers.as_linear(g, base_layers.is_conv1d(m)).detach().double().cpu()
        return grads
    finally:
        for p, (req, grad) in zip(params, was):
            p.requires_grad_(req)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


def nearest_kron_sum(M: Tensor, s: int, left: tuple, right: tuple) -> tuple:
    """``X (s, p, u)``, ``Y (s, k, v)`` with ``Σ_l X[l] ⊗ Y[l]`` nearest to ``M (p*k, u*v)`` in Frobenius norm
    (Van Loan-Pitsianis); terms past the rearrangement's rank are zero."""
    (p, u), (k, v) = left, right
    if tuple(M.shape) != (p * k, u * v):
        raise ValueError(f"M is {tuple(M.shape)}; a sum of ({p}, {u}) ⊗ ({k}, {v}) is ({p * k}, {u * v})")
    R = M.reshape(p, k, u, v).permute(0, 2, 1, 3).reshape(p * u, k * v)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    t = min(s, S.numel())
    X = M.new_zeros(s, p * u)
    Y = M.new_zeros(s, k * v)
    root = S[:t].sqrt()
    X[:t] = (U[:, :t] * root).T
    Y[:t] = root[:, None] * Vh[:t]
    return X.view(s, p, u), Y.view(s, k, v)


def _kron_sums(X1: Tensor, X2: Tensor) -> Tensor:
    """``Σ_l X1[:, l] ⊗ X2[:, l]`` for a batch of layers: ``X1 (L, s, p, u)``, ``X2 (L, s, k, v)`` -> ``(L, p*k, u*v)``."""
    L, _, p, u = X1.shape
    k, v = X2.shape[2:]
    return torch.einsum("lspu,lskv->lpkuv", X1, X2).reshape(L, p * k, u * v)


def _lsr_followed(svds: list, f: FactorShapes, iters: int) -> list:
    """``‖G‖² - min ‖G - B A‖²`` over Kronecker-sum factors of shapes ``f``, for each layer's ``G`` (given by its
    thin SVD), as far as the fit gets. The layers are fitted together (one L-BFGS over the sum of their residuals,
    each relative to its layer's energy), not one by one. The fit runs on each ``G``'s top singular directions (all but 1e-4 of its energy), where
    ``⟨G, B A⟩`` and ``‖B A‖²`` cost ``(d_in + d_out)·q·k``, not ``d_in·d_out·q``; what is returned is measured
    against the whole ``G``."""
    energies = [S.square() for _, S, _ in svds]
    k = max(int(torch.searchsorted(e.cumsum(0), e.sum() * (1 - 1e-4)).clamp(max=e.numel() - 1)) + 1
            for e in energies)
    q = min(f.q, svds[0][1].numel())
    dtype = svds[0][1].dtype
    init, US, V = [[] for _ in range(4)], [], []
    for U, S, Vh in svds:
        root = torch.zeros(f.q, dtype=dtype)
        root[:q] = S[:q].sqrt()
        B0 = torch.zeros(f.d_out, f.q, dtype=dtype)
        B0[:, :q] = U[:, :q]
        A0 = torch.zeros(f.q, f.d_in, dtype=dtype)
        A0[:q] = Vh[:q]
        pieces = (*nearest_kron_sum(root[:, None] * A0, f.s, (f.r1, f.n1), (f.r2, f.n2)),
                  *nearest_kron_sum(B0 * root, f.s, (f.m1, f.r1), (f.m2, f.r2)))
        for lst, x in zip(init, pieces):
            lst.append(x)
        US.append(U * S)
        V.append(Vh)
    US, V = torch.stack(US), torch.stack(V)
    # each layer's residual relative to its own energy: the same minimiser (the layers are independent), and a
    # layer with a small gradient is fitted as well as a large one
    weight = 1.0 / torch.stack([e.sum() for e in energies]).clamp(min=torch.finfo(dtype).tiny)
    kept = torch.stack([e[:k].sum() for e in energies])
    start = [torch.stack(lst) for lst in init]
    gen = torch.Generator().manual_seed(0)
    factors = [(x + 1e-3 * x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
                * torch.randn(x.shape, generator=gen, dtype=dtype)).requires_grad_(True) for x in start]

    def followed(X: list, G_US: Tensor, G_V: Tensor) -> Tensor:
        """Per layer ``2⟨G', B A⟩ - ‖B A‖²`` for ``G' = G_US @ G_V``: what the fit takes off ``‖G'‖²``."""
        A = _kron_sums(X[0], X[1])
        B = _kron_sums(X[2], X[3])
        inner = ((B.mT @ G_US) * (A @ G_V.mT)).sum((1, 2))
        return 2 * inner - ((B.mT @ B) * (A @ A.mT)).sum((1, 2))

    with torch.enable_grad():
        opt = torch.optim.LBFGS(factors, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                tolerance_change=1e-12)
        US_k, V_k = US[:, :, :k], V[:, :k]

        def closure():
            opt.zero_grad()
            value = ((kept - followed(factors, US_k, V_k)) * weight).sum()
            value.backward()
            return value

        opt.step(closure)
    with torch.no_grad():  # both are fits of B A, so both bound what the structure follows; the better one
        polished = followed(factors, US, V)
        polished = torch.where(polished.isfinite(), polished, torch.zeros_like(polished))
        got = torch.maximum(polished, followed(start, US, V))
    return got.clamp(min=0.0).tolist()
