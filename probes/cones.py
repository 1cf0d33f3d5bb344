"""Refusal cones and representational independence (Wollschläger et al., ICML 2025, "The Geometry of Refusal in
Large Language Models: Concept Cones and Representational Independence").

Three pieces, each a function:

1. `rdo`: refusal direction optimisation. A unit direction r in `d_model`, trained by gradient descent through the
   frozen model so that (a) ablating r from every residual write on harmful prompts makes the model produce its
   non-refusing completion, (b) adding `alpha r̂` at `resid_pre` of the chosen layer on harmless prompts makes it
   produce a refusal, and (c) ablating r on harmless prompts keeps their output distributions (KL to the
   un-intervened model). As the reference, (a) and (b) are cross-entropies on target completions that the
   difference-of-means (DIM) direction produces (`make_targets`: harmful prompts with DIM ablated; harmless with
   DIM added, cut at the first "."), (c) is KL(ablated ‖ clean) summed over the last prompt position and every
   retain-target token; weights 1 / 0.2 / 1; `alpha` is the norm of the DIM mean difference and the layer is
   DIM's. Optimiser as the reference: Adam (amsgrad, betas 0.9 / 0.98, lr 0.01), gradient projected on the
   sphere's tangent, clipped to norm 10, the vector renormalised after each step, the lowest-loss vector kept.
2. `train_cone`: a k-dimensional cone, an orthonormal basis B `[k, d]` (Gram-Schmidt after every step) trained so
   that Monte-Carlo samples of it mediate refusal: coefficients `|N(0, I_k)|` normalised (uniform on the positive
   orthant of the unit sphere), a sample direction `normalise(c B)`; the loss of a step is the mean of the RDO loss
   over `n_samples` fresh samples plus its mean over the k basis vectors (the reference's `optimize_basis`). RDO is
   the same loop with k = 1 and no samples, as in the reference. `train_cones` trains k = 2, 3, ... each from the
   previous cone's basis plus one random vector. `evaluate_cone` measures N samples of a learned cone against N
   random unit directions (the control): mean refusal score (and first-token and optional judged rates) on
   harmful prompts with the direction ablated, on harmless prompts with `alpha` times it added, and the harmless
   first-token KL under ablation.
3. `representational_independence`: the reference's RepInd measure of two directions a, b: at `resid_pre` of each
   layer (the first 90% of layers, as the reference), at the last prompt token of harmful prompts, the change of
   cos(x, b) when a is ablated from every residual write, and of cos(x, a) when b is ablated; `loss` is the
   reference's RepInd loss (mean over prompts and layers of the squared change, the two ways summed), 0 for
   independent directions. Reported with the plain cosine of a and b.

Named departures from the reference: a fixed number of steps on seeded mini-batches of `batch_size` prompts
(one forward per loss term) instead of an epoch of batch-1 steps with gradient accumulation, patience and
learning-rate reduction; the lowest-loss vector is the one its loss was computed at (the reference pairs a step's
loss with the vector after the step); targets are tokenised as the response under the chat template (the
reference tokenises prompt + target text together). Training RepInd-constrained directions is not implemented;
only the measure is.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.activations import check_fits, forward, last_logits, model_device
from probes.chat import ChatBatch, encode
from probes.directions import (Direction, _check_layer, ablation_hooks, addition_hooks, cosine,
                               residual_write_hooks, unit)
from probes.generation import generate
from probes.refusal import JUDGES, first_token_kl, refusal_rate, refusal_score

Hook = tuple[str, Any]
WEIGHTS = {"ablation": 1.0, "addition": 0.2, "retain": 1.0}  # the reference's loss weights
CLIP = 10.0  # the reference's gradient-norm clip
BETAS = (0.9, 0.98)
REPIND_LAYER_FRAC = 0.9


# --------------------------------------------------------------------------------------------- geometry helpers

def orthonormalize(vectors: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of the rows of `[k, d]`, in order, in float64; ValueError when a row depends on earlier ones."""
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"a basis is a [k >= 1, d_model] tensor, got shape {tuple(vectors.shape)}")
    v = vectors.detach().double().cpu()
    if not bool(torch.isfinite(v).all()):
        raise ValueError("the basis has NaN or infinite entries")
    out: list[torch.Tensor] = []
    for i, row in enumerate(v):
        for q in out:  # twice: one pass loses orthogonality when rows are nearly dependent
            row = row - (row @ q) * q
        for q in out:
            row = row - (row @ q) * q
        norm = row.norm()
        if float(norm) <= 1e-8 * max(float(v[i].norm()), 1e-300):
            raise ValueError(f"basis row {i} lies in the span of the rows before it")
        out.append(row / norm)
    return torch.stack(out)


def cone_coefficients(k: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """`[n, k]` float64 coefficients uniform on the positive orthant of the unit sphere: `|N(0, I_k)|` normalised
    (the reference's "hypersphere" sampling)."""
    if k < 1 or n < 1:
        raise ValueError(f"need k >= 1 and n >= 1 samples, got k={k}, n={n}")
    c = torch.randn(n, k, generator=generator, dtype=torch.float64).abs()
    return c / c.norm(dim=-1, keepdim=True)


def sample_cone(basis: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """`n` unit vectors `[n, d]` (float64) of the cone spanned by the rows of `basis` (orthonormalised first):
    non-negative combinations `c B` normalised, with `c` from `cone_coefficients` (seeded)."""
    b = orthonormalize(basis)
    c = cone_coefficients(b.shape[0], n, torch.Generator().manual_seed(seed))
    v = c @ b
    return v / v.norm(dim=-1, keepdim=True)


def random_directions(d: int, n: int, *, seed: int = 0) -> torch.Tensor:
    """`n` unit vectors `[n, d]` (float64) uniform on the sphere (normalised Gaussians, seeded): the control."""
    if d < 1 or n < 1:
        raise ValueError(f"need d >= 1 and n >= 1, got d={d}, n={n}")
    v = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------- differentiable interventions

def _check_direction(model: Any, r: torch.Tensor) -> None:
    d = int(model.cfg.d_model)
    if not isinstance(r, torch.Tensor) or r.shape != (d,):
        raise ValueError(f"a direction is a [d_model={d}] tensor, got "
                         f"{tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__}")
    if not bool(torch.isfinite(r.detach()).all()) or float(r.detach().norm()) == 0:
        raise ValueError("cannot use a zero or non-finite direction")


def grad_ablation_hooks(model: Any, r: torch.Tensor) -> list[Hook]:
    """Directional ablation of r̂ = r / |r| from every residual write (as `directions.ablation_hooks`), with r
    kept in the autograd graph so the loss can be differentiated with respect to it."""
    _check_direction(model, r)

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        dt = torch.promote_types(act.dtype, torch.float32)
        rh = r.to(device=act.device, dtype=dt)
        rh = rh / rh.norm()
        x = act.to(dt)
        return (x - (x @ rh)[..., None] * rh).to(act.dtype)

    return [(name, fn) for name in residual_write_hooks(model)]


def grad_addition_hooks(model: Any, r: torch.Tensor, layer: int, alpha: float) -> list[Hook]:
    """`resid_pre[layer] += alpha r̂` at every position (as `directions.addition_hooks` with `alpha * unit(r)`),
    differentiable with respect to r."""
    _check_direction(model, r)
    _check_layer(model, layer)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        dt = torch.promote_types(act.dtype, torch.float32)
        rh = r.to(device=act.device, dtype=dt)
        return (act.to(dt) + alpha * rh / rh.norm()).to(act.dtype)

    return [(f"blocks.{layer}.hook_resid_pre", fn)]


@contextlib.contextmanager
def frozen(model: Any) -> Iterator[Any]:
    """Every parameter of `model` with `requires_grad=False` inside the block (restored after): gradients reach
    only the directions, and no graph is kept for the weights."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# ------------------------------------------------------------------------------------------------ the targets

@dataclass
class Targets:
    """Prompts with their target completions as responses (`ChatBatch` with `response` tokens).

    ablation: harmful prompts + the completion the model gives with the DIM direction ablated (non-refusing);
    addition: harmless prompts + the completion with the DIM difference added (refusing), cut at the first ".";
    retain: harmless prompts + the model's own completion.
    """

    ablation: ChatBatch
    addition: ChatBatch
    retain: ChatBatch

    def as_dict(self) -> dict[str, Any]:
        return {k: [dict(prompt=p, target=t) for p, t in zip(b.instructions, b.responses or [])]
                for k, b in (("ablation", self.ablation), ("addition", self.addition), ("retain", self.retain))}


def _with_responses(batch: ChatBatch, texts: Sequence[str], what: str) -> ChatBatch:
    if batch.tokenizer is None:
        raise ValueError("the batch carries no tokenizer: encode it with probes.chat.encode / pair.encode")
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        raise ValueError(f"every {what} target completion is empty: nothing to train on")
    if len(keep) < len(texts):
        warnings.warn(f"{len(texts) - len(keep)} of {len(texts)} {what} targets are empty: those prompts are dropped",
                      stacklevel=3)
    return encode(batch.tokenizer, [batch.instructions[i] for i in keep], system=batch.system,
                  responses=[texts[i] for i in keep], template=batch.template)


def make_targets(model: Any, harmful: ChatBatch, harmless: ChatBatch, dim: Direction, *, max_new_tokens: int = 30,
                 batch_size: int = 16, progress: bool = True) -> Targets:
    """The reference's target completions, by greedy generation (`probes.generation.generate`) under the DIM
    direction `dim` (its layer; its raw difference is what is added): see `Targets`."""
    if not isinstance(dim, Direction):
        raise ValueError("dim must be a Direction (its layer and raw difference set the addition)")
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("targets need non-empty harmful and harmless sets")
    if harmful.responses is not None or harmless.responses is not None:
        raise ValueError("pass prompts without responses: the targets are generated here")
    kw = dict(batch_size=batch_size, progress=progress)
    abl = generate(model, harmful, max_new_tokens, ablation_hooks(model, dim), **kw).texts
    add = generate(model, harmless, max_new_tokens, addition_hooks(model, dim, dim.layer), **kw).texts
    ret = generate(model, harmless, max_new_tokens, **kw).texts
    add = [t.split(".")[0] for t in add]
    return Targets(ablation=_with_responses(harmful, abl, "ablation"),
                   addition=_with_responses(harmless, add, "addition"),
                   retain=_with_responses(harmless, ret, "retain"))


# ------------------------------------------------------------------------------------------------- the losses

def _logits(model: Any, batch: ChatBatch, hooks: Sequence[Hook], grad: bool) -> torch.Tensor:
    """`[batch, seq, vocab]` logits under `hooks` (autograd on if `grad`)."""
    check_fits(model, batch)
    with model.hooks(fwd_hooks=list(hooks)):
        out = forward(model, batch, return_type="logits", grad=grad)
    return out.to(torch.promote_types(out.dtype, torch.float32))


def _response(batch: ChatBatch) -> torch.Tensor:
    resp = batch.role_mask("response")
    if bool((resp.sum(-1) == 0).any()):
        raise ValueError("every prompt needs a target completion (response tokens): build the batches with "
                         "make_targets or encode(..., responses=...)")
    return resp


def target_ce(logits: torch.Tensor, batch: ChatBatch) -> torch.Tensor:
    """`[batch]` mean cross-entropy of each row's response tokens given everything before them (the
    reference's ablation / addition loss of one prompt)."""
    resp = _response(batch).to(logits.device)
    ids = batch.input_ids.to(logits.device)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [b, seq-1]: log P(token t+1)
    m = resp[:, 1:]
    return -logp.masked_fill(~m, 0.0).sum(-1) / m.sum(-1)  # masked, not multiplied: pad logits may be non-finite


def retain_positions(batch: ChatBatch) -> torch.Tensor:
    """`[batch, seq]` bool: the last prompt token and every response token (the positions whose next-token
    distributions the retain loss keeps)."""
    resp = _response(batch)
    out = resp.clone()
    out[:, :-1] |= resp[:, 1:]  # the position before each response token; inside the response it already is one
    return out


def retain_kl(clean: torch.Tensor, intervened: torch.Tensor, batch: ChatBatch) -> torch.Tensor:
    """`[batch]` KL(intervened ‖ clean) summed over `retain_positions` (the reference's retain loss, which is
    `kl_div(log_softmax(clean), softmax(intervened))`)."""
    pos = retain_positions(batch).to(clean.device)
    p = intervened.log_softmax(-1)
    q = clean.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)  # [b, seq]
    return kl.masked_fill(~pos, 0.0).sum(-1)


def _check_weights(weights: dict[str, float] | None) -> dict[str, float]:
    w = dict(WEIGHTS) if weights is None else dict(weights)
    if set(w) != set(WEIGHTS):
        raise ValueError(f"loss weights must name exactly {sorted(WEIGHTS)}, got {sorted(w)}")
    if any(not math.isfinite(v) or v < 0 for v in w.values()) or not any(w.values()):
        raise ValueError(f"loss weights must be finite, >= 0 and not all 0, got {w}")
    return w


def rdo_loss(model: Any, r: torch.Tensor, targets: Targets, layer: int, alpha: float, *,
             weights: dict[str, float] | None = None, clean_retain: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The RDO loss of direction r `[d_model]` (any norm: r̂ = r / |r| is used) on `targets`, differentiable with
    respect to r: `(total, {"ablation", "addition", "retain"})`, each term the mean over its prompts.

    ablation: `target_ce` on `targets.ablation` with r̂ ablated from every residual write; addition: `target_ce` on
    `targets.addition` with `alpha r̂` added at `resid_pre[layer]`; retain: `retain_kl` on `targets.retain` under
    the ablation against the clean logits (`clean_retain`, `[batch, seq, vocab]`, computed here when None).
    A term whose weight is 0 is not computed (reported as 0).
    """
    w = _check_weights(weights)
    _check_direction(model, r)
    _check_layer(model, layer)
    grad = r.requires_grad
    zero = torch.zeros((), dtype=torch.float64)
    parts: dict[str, torch.Tensor] = {}
    abl = grad_ablation_hooks(model, r)
    with frozen(model):
        if w["ablation"]:
            parts["ablation"] = target_ce(_logits(model, targets.ablation, abl, grad), targets.ablation).mean()
        if w["addition"]:
            add = grad_addition_hooks(model, r, layer, alpha)
            parts["addition"] = target_ce(_logits(model, targets.addition, add, grad), targets.addition).mean()
        if w["retain"]:
            if clean_retain is None:
                clean_retain = _logits(model, targets.retain, (), False)
            ablated = _logits(model, targets.retain, abl, grad)
            parts["retain"] = retain_kl(clean_retain.to(ablated.device), ablated, targets.retain).mean()
    device = next(iter(parts.values())).device
    parts = {k: parts[k].double() if k in parts else zero.to(device) for k in WEIGHTS}
    total = sum(w[k] * parts[k] for k in WEIGHTS)
    return total, parts


def cone_loss(model: Any, basis: torch.Tensor, coefficients: torch.Tensor | None, targets: Targets, layer: int,
              alpha: float, *, weights: dict[str, float] | None = None, include_basis: bool = True,
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The cone loss of `basis` `[k, d]` (its rows, as given): the mean RDO loss over the sample directions
    `normalise(coefficients @ basis)` (`coefficients` `[n, k]`, or None for none) plus, with `include_basis`, the
    mean RDO loss over the basis rows. Differentiable with respect to `basis`. Returns (total, terms as floats:
    `sample_*` and `basis_*` for each loss term)."""
    if basis.ndim != 2:
        raise ValueError(f"basis must be [k, d_model], got shape {tuple(basis.shape)}")
    if coefficients is None and not include_basis:
        raise ValueError("no samples and no basis vectors: nothing to compute")
    clean = None
    if _check_weights(weights)["retain"]:
        with frozen(model):
            clean = _logits(model, targets.retain, (), False)
    total = torch.zeros((), dtype=torch.float64, device=basis.device)
    log: dict[str, float] = {}
    groups = []
    if coefficients is not None:
        if coefficients.ndim != 2 or coefficients.shape[1] != basis.shape[0] or bool((coefficients < 0).any()):
            raise ValueError(f"coefficients must be non-negative [n, k={basis.shape[0]}], got "
                             f"{tuple(coefficients.shape)}")
        groups.append(("sample", coefficients.to(basis.dtype) @ basis))
    if include_basis:
        groups.append(("basis", basis))
    for name, dirs in groups:
        for v in dirs:
            t, parts = rdo_loss(model, v, targets, layer, alpha, weights=weights, clean_retain=clean)
            total = total + t.to(total.device) / len(dirs)
            for k, p in parts.items():
                log[f"{name}_{k}"] = log.get(f"{name}_{k}", 0.0) + float(p.detach()) / len(dirs)
    return total, log


# ------------------------------------------------------------------------------------------------ the training

@dataclass
class ConeFit:
    """A trained cone (k = 1: an RDO direction).

    basis: `[k, d_model]` float32 orthonormal rows, the lowest-loss basis seen (`best_step`); history: one dict per
    step (`loss` and its terms, `grad_norm`); the settings it was trained with.
    """

    basis: torch.Tensor
    layer: int
    alpha: float
    history: list[dict[str, float]]
    best_step: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    @property
    def direction(self) -> torch.Tensor:
        """The unit direction `[d_model]` of a k = 1 fit (RDO)."""
        if self.k != 1:
            raise ValueError(f"a {self.k}-dimensional cone has no single direction: use .basis or sample_cone")
        return self.basis[0]

    def to_direction(self, model: str = "") -> Direction:
        """The RDO direction as a `Direction` (raw = alpha r̂, the vector its addition adds), with provenance."""
        return Direction.from_raw(self.direction.double() * self.alpha, model=model, hook="resid_pre",
                                  layer=self.layer, position="rdo",
                                  data=dict(method="rdo", best_step=self.best_step, **self.settings))

    def as_dict(self) -> dict[str, Any]:
        return dict(k=self.k, layer=self.layer, alpha=self.alpha, best_step=self.best_step,
                    best_loss=self.history[self.best_step]["loss"], final_loss=self.history[-1]["loss"],
                    settings=self.settings, history=self.history)


class _Cursor:
    """Seeded mini-batches of a ChatBatch: a permutation, reshuffled each time it is used up."""

    def __init__(self, batch: ChatBatch, size: int, generator: torch.Generator):
        self.batch, self.size, self.gen, self.order, self.at = batch, min(size, len(batch)), generator, [], 0

    def next(self) -> ChatBatch:
        if self.at + self.size > len(self.order):
            self.order, self.at = torch.randperm(len(self.batch), generator=self.gen).tolist(), 0
        rows = self.order[self.at:self.at + self.size]
        self.at += self.size
        return self.batch[rows]


def _check_targets(model: Any, targets: Targets) -> None:
    if not isinstance(targets, Targets):
        raise ValueError("targets must be a Targets (make_targets)")
    for name in ("ablation", "addition", "retain"):
        b = getattr(targets, name)
        if len(b) == 0:
            raise ValueError(f"no {name} targets")
        _response(b)
        check_fits(model, b)


def train_cone(model: Any, targets: Targets, dim: Direction, k: int, *, n_samples: int = 8, steps: int = 32,
               lr: float = 0.01, batch_size: int = 16, seed: int = 0, init: torch.Tensor | None = None,
               alpha: float | None = None, weights: dict[str, float] | None = None, progress: bool = True,
               ) -> ConeFit:
    """Train a k-dimensional refusal cone (k = 1: RDO) through the frozen `model` (see the module notes).

    dim: the DIM direction, whose layer is where additions go and whose norm is `alpha` (unless given). init:
    `[j <= k, d_model]` rows for the first j basis vectors (the rest random, seeded); None: all random, as the
    reference. Each of `steps` steps uses a seeded mini-batch of `batch_size` prompts of each target set and, for
    k > 1, `n_samples` fresh cone samples. Returns the lowest-loss basis.
    """
    if not isinstance(dim, Direction):
        raise ValueError("dim must be the DIM Direction (its layer and norm set the addition)")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"cone dimension k must be an int >= 1, got {k!r}")
    if k > int(model.cfg.d_model):
        raise ValueError(f"k={k} exceeds d_model={model.cfg.d_model}")
    if steps < 1 or batch_size < 1 or (k > 1 and n_samples < 1):
        raise ValueError(f"need steps >= 1, batch_size >= 1 and (k > 1) n_samples >= 1; got steps={steps}, "
                         f"batch_size={batch_size}, n_samples={n_samples}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr}")
    _check_layer(model, dim.layer)
    _check_weights(weights)
    _check_targets(model, targets)
    alpha = float(dim.norm) if alpha is None else float(alpha)
    d = int(model.cfg.d_model)
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(k, d, generator=gen, dtype=torch.float64)
    if init is not None:
        init = torch.as_tensor(init).detach().double().cpu()
        init = init[None] if init.ndim == 1 else init
        if init.ndim != 2 or init.shape[1] != d or not 1 <= init.shape[0] <= k:
            raise ValueError(f"init must be [1..{k}, {d}], got {tuple(init.shape)}")
        start[: init.shape[0]] = init
    device = model_device(model)
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    basis = torch.nn.Parameter(orthonormalize(start).to(device=device, dtype=dtype))
    opt = torch.optim.Adam([basis], lr=lr, betas=BETAS, weight_decay=0.0, amsgrad=True)
    cursors = {name: _Cursor(getattr(targets, name), batch_size, gen) for name in ("ablation", "addition", "retain")}
    history: list[dict[str, float]] = []
    best, best_basis = math.inf, basis.detach().clone()
    for step in tqdm(range(steps), desc=f"train cone k={k}", disable=not progress, leave=False):
        mini = Targets(**{name: c.next() for name, c in cursors.items()})
        coeffs = cone_coefficients(k, n_samples, gen) if k > 1 else None
        loss, log = cone_loss(model, basis, coeffs, mini, dim.layer, alpha, weights=weights)
        opt.zero_grad()
        (g,) = torch.autograd.grad(loss, [basis])
        with torch.no_grad():
            rows = basis.detach()
            g = g - (g * rows).sum(-1, keepdim=True) * rows  # each row's tangent to its sphere
            norm = float(g.norm())
            g = g * min(1.0, CLIP / (norm + 1e-6))
        value = float(loss.detach())
        history.append(dict(step=step, loss=value, grad_norm=norm, **log))
        if value < best:  # the basis this loss was computed at
            best, best_basis = value, basis.detach().clone()
        basis.grad = g
        opt.step()
        with torch.no_grad():
            basis.copy_(orthonormalize(basis.detach()).to(device=device, dtype=dtype))
    best_step = min(range(len(history)), key=lambda i: history[i]["loss"])
    settings = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed, n_samples=n_samples if k > 1 else 0,
                    weights=_check_weights(weights), init=None if init is None else int(init.shape[0]))
    return ConeFit(basis=best_basis.float().cpu(), layer=dim.layer, alpha=alpha, history=history,
                   best_step=best_step, settings=settings)


def rdo(model: Any, targets: Targets, dim: Direction, *, steps: int = 32, lr: float = 0.01, batch_size: int = 16,
        seed: int = 0, init: torch.Tensor | None = None, alpha: float | None = None,
        weights: dict[str, float] | None = None, progress: bool = True) -> ConeFit:
    """Refusal direction optimisation: `train_cone` with k = 1 (the reference trains RDO as a 1-dimensional cone).
    `.direction` is the unit direction, `.to_direction()` a `Direction`."""
    return train_cone(model, targets, dim, 1, steps=steps, lr=lr, batch_size=batch_size, seed=seed, init=init,
                      alpha=alpha, weights=weights, progress=progress)


def train_cones(model: Any, targets: Targets, dim: Direction, ks: Sequence[int] = (2, 3), *,
                init: torch.Tensor | None = None, **kwargs: Any) -> dict[int, ConeFit]:
    """Cones of increasing dimension, each started from the previous one's basis plus one random vector (the
    reference's schedule; the first from `init` or random). kwargs go to `train_cone`."""
    ks = list(ks)
    if not ks or ks != sorted(set(ks)) or ks[0] < 1:
        raise ValueError(f"ks must be increasing dimensions >= 1, got {ks}")
    out: dict[int, ConeFit] = {}
    for k in ks:
        out[k] = train_cone(model, targets, dim, k, init=init, **kwargs)
        init = out[k].basis
    return out


# ---------------------------------------------------------------------------------------------- the evaluation

def direction_effects(model: Any, directions: torch.Tensor, harmful: ChatBatch, harmless: ChatBatch,
                      token_ids: Sequence[int], layer: int, alpha: float, *, max_new_tokens: int = 0,
                      judge: str | Sequence[str] = "reference", batch_size: int = 16, progress: bool = True,
                      ) -> list[dict[str, float]]:
    """Effects of each row of `directions` `[n, d_model]` (unit-normalised here): on `harmful`, with it ablated from
    every residual write, the mean refusal score and the first-token refusal rate (score > 0); on `harmless`,
    with `alpha` times it added at `resid_pre[layer]`, the same; and the mean first-token KL(clean ‖ ablated) on
    `harmless`. With `max_new_tokens` > 0 also the judged rates of greedy generations (`refusal_rate`): by
    `judge` (`*_judged_rate`) and by each named judge (`*_judged_reference`, `*_judged_extended`)."""
    if directions.ndim != 2 or directions.shape[1] != int(model.cfg.d_model) or directions.shape[0] < 1:
        raise ValueError(f"directions must be [n >= 1, d_model={model.cfg.d_model}], got {tuple(directions.shape)}")
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("need non-empty harmful and harmless prompts")
    _check_layer(model, layer)
    clean = last_logits(model, harmless, batch_size=batch_size)
    out = []
    for v in tqdm(directions, desc="direction effects", disable=not progress, leave=False):
        r = unit(v)
        abl, add = ablation_hooks(model, r), addition_hooks(model, alpha * r, layer)
        s_harm = refusal_score(last_logits(model, harmful, abl, batch_size=batch_size), token_ids)
        abl_less = last_logits(model, harmless, abl, batch_size=batch_size)
        s_less = refusal_score(last_logits(model, harmless, add, batch_size=batch_size), token_ids)
        res = dict(ablated_score=float(s_harm.mean()), ablated_rate=float((s_harm > 0).double().mean()),
                   added_score=float(s_less.mean()), added_rate=float((s_less > 0).double().mean()),
                   kl_harmless_ablation=float(first_token_kl(clean, abl_less).mean()))
        if max_new_tokens > 0:
            kw = dict(batch_size=batch_size, progress=False)
            for name, batch, hooks in (("ablated", harmful, abl), ("added", harmless, add)):
                texts = generate(model, batch, max_new_tokens, hooks, **kw).texts
                res[f"{name}_judged_rate"] = refusal_rate(texts, judge)["rate"]
                for j in JUDGES:  # both named judges, whichever is chosen (as refusal.evaluate)
                    res[f"{name}_judged_{j}"] = refusal_rate(texts, j)["rate"]
        out.append(res)
    return out


def summarise(effects: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """`{metric: {mean, min, max}}` over a list of `direction_effects` results."""
    if not effects:
        raise ValueError("no effects to summarise")
    return {k: dict(mean=sum(e[k] for e in effects) / len(effects), min=min(e[k] for e in effects),
                    max=max(e[k] for e in effects)) for k in effects[0]}


@dataclass
class ConeEvaluation:
    """`direction_effects` of N samples of a cone, of its basis vectors and of N random unit directions (control),
    with the un-intervened baseline `{harmful_score, harmful_rate, harmless_score, harmless_rate}`."""

    k: int
    samples: list[dict[str, float]]
    basis: list[dict[str, float]]
    random: list[dict[str, float]]
    baseline: dict[str, float]
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return dict(k=self.k, n=len(self.samples), seed=self.seed, baseline=self.baseline,
                    samples=summarise(self.samples), random=summarise(self.random), basis=self.basis,
                    per_sample=self.samples, per_random=self.random)


def evaluate_cone(model: Any, basis: torch.Tensor, harmful: ChatBatch, harmless: ChatBatch,
                  token_ids: Sequence[int], layer: int, alpha: float, *, n: int = 16, seed: int = 0,
                  max_new_tokens: int = 0, judge: str | Sequence[str] = "reference", batch_size: int = 16,
                  progress: bool = True) -> ConeEvaluation:
    """`n` seeded samples of the cone of `basis` `[k, d]` (`sample_cone`), its basis vectors and `n` random unit
    directions (`random_directions`, seed + 1), each measured by `direction_effects`."""
    b = orthonormalize(basis)
    if b.shape[1] != int(model.cfg.d_model):
        raise ValueError(f"basis has {b.shape[1]} dims, the model {model.cfg.d_model}")
    kw = dict(max_new_tokens=max_new_tokens, judge=judge, batch_size=batch_size, progress=progress)
    s_harm = refusal_score(last_logits(model, harmful, batch_size=batch_size), token_ids)
    s_less = refusal_score(last_logits(model, harmless, batch_size=batch_size), token_ids)
    baseline = dict(harmful_score=float(s_harm.mean()), harmful_rate=float((s_harm > 0).double().mean()),
                    harmless_score=float(s_less.mean()), harmless_rate=float((s_less > 0).double().mean()))
    args = (harmful, harmless, token_ids, layer, alpha)
    return ConeEvaluation(
        k=b.shape[0], seed=seed, baseline=baseline,
        samples=direction_effects(model, sample_cone(b, n, seed=seed), *args, **kw),
        basis=direction_effects(model, b, *args, **kw),
        random=direction_effects(model, random_directions(b.shape[1], n, seed=seed + 1), *args, **kw))


# ------------------------------------------------------------------------------- representational independence

@dataclass
class RepInd:
    """Representational independence of directions a and b (`representational_independence`).

    cos_a, cos_b: `[prompt, layer]` float64 cos(resid_pre, a) / cos(resid_pre, b), un-intervened; cos_a_ablate_b:
    cos(resid_pre, a) with b ablated from every residual write; cos_b_ablate_a likewise. cosine: cos(a, b).
    """

    layers: list[int]
    cos_a: torch.Tensor
    cos_b: torch.Tensor
    cos_a_ablate_b: torch.Tensor
    cos_b_ablate_a: torch.Tensor
    cosine: float
    names: tuple[str, str] = ("a", "b")

    @property
    def change_b_ablate_a(self) -> torch.Tensor:
        """`[prompt, layer]`: how much ablating a moves cos(x, b)."""
        return self.cos_b_ablate_a - self.cos_b

    @property
    def change_a_ablate_b(self) -> torch.Tensor:
        return self.cos_a_ablate_b - self.cos_a

    @property
    def loss(self) -> float:
        """The reference's RepInd loss: mean over prompts and layers of the squared change, both ways summed."""
        return float(self.change_b_ablate_a.square().mean() + self.change_a_ablate_b.square().mean())

    def as_dict(self) -> dict[str, Any]:
        a, b = self.names
        return {"names": list(self.names), "layers": self.layers, "cosine": self.cosine, "repind_loss": self.loss,
                f"cos_{a}": self.cos_a.mean(0).tolist(), f"cos_{b}": self.cos_b.mean(0).tolist(),
                f"cos_{a}_ablate_{b}": self.cos_a_ablate_b.mean(0).tolist(),
                f"cos_{b}_ablate_{a}": self.cos_b_ablate_a.mean(0).tolist(),
                f"max_abs_change_{b}_ablate_{a}": float(self.change_b_ablate_a.mean(0).abs().max()),
                f"max_abs_change_{a}_ablate_{b}": float(self.change_a_ablate_b.mean(0).abs().max())}


def resid_cosines(model: Any, batch: ChatBatch, vectors: torch.Tensor, layers: Sequence[int],
                  hooks: Sequence[Hook] = (), *, position: str | int = "last", batch_size: int = 16) -> torch.Tensor:
    """`[prompt, layer, vector]` float64 cosine of `resid_pre` at `position` of each of `layers` with each row of
    `vectors` `[m, d]`, with `hooks` active."""
    n_layers = int(model.cfg.n_layers)
    vs = vectors.detach().double().cpu()
    out = []
    for _, sub in batch.chunks(batch_size):
        pos = sub.positions(position)[0]
        if pos.shape[1] != 1:
            raise ValueError(f"{position!r} selects {pos.shape[1]} positions; RepInd reads one")
        got: dict[int, torch.Tensor] = {}

        def make(layer: int):
            def fn(x: torch.Tensor, hook: Any) -> None:
                got[layer] = x[torch.arange(x.shape[0]), pos[:, 0].to(x.device)].detach().double().cpu()
            return fn

        grab = [(f"blocks.{layer}.hook_resid_pre", make(layer)) for layer in layers]
        stop = max(layers) + 1
        with model.hooks(fwd_hooks=[*hooks, *grab]):
            forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
        out.append(torch.stack([cosine(got[layer][:, None], vs[None]) for layer in layers], 1))
    return torch.cat(out)


def representational_independence(model: Any, a: Direction | torch.Tensor, b: Direction | torch.Tensor,
                                  batch: ChatBatch, *, layers: Sequence[int] | None = None,
                                  position: str | int = "last", names: tuple[str, str] = ("a", "b"),
                                  batch_size: int = 16) -> RepInd:
    """The RepInd measure of a and b on `batch` (the reference uses harmful prompts, last prompt token): see
    `RepInd`. layers: default the first `int(0.9 n_layers)` (the reference's)."""
    if len(batch) == 0:
        raise ValueError("empty batch")
    ua, ub = unit(a), unit(b)
    d = int(model.cfg.d_model)
    if ua.shape != (d,) or ub.shape != (d,):
        raise ValueError(f"directions must be [d_model={d}], got {tuple(ua.shape)} and {tuple(ub.shape)}")
    n = int(model.cfg.n_layers)
    layers = list(range(max(1, int(REPIND_LAYER_FRAC * n)))) if layers is None else list(layers)
    if not layers:
        raise ValueError("no layers")
    for layer in layers:
        _check_layer(model, layer)
    check_fits(model, batch)
    both = torch.stack([ua, ub])
    kw = dict(position=position, batch_size=batch_size)
    with torch.no_grad():
        base = resid_cosines(model, batch, both, layers, **kw)
        abl_a = resid_cosines(model, batch, ub[None], layers, ablation_hooks(model, ua), **kw)[..., 0]
        abl_b = resid_cosines(model, batch, ua[None], layers, ablation_hooks(model, ub), **kw)[..., 0]
    return RepInd(layers=layers, cos_a=base[..., 0], cos_b=base[..., 1], cos_a_ablate_b=abl_b, cos_b_ablate_a=abl_a,
                  cosine=float(cosine(ua, ub)), names=tuple(names))


__all__ = ["ConeEvaluation", "ConeFit", "RepInd", "Targets", "cone_coefficients", "cone_loss", "direction_effects",
           "evaluate_cone", "frozen", "grad_ablation_hooks", "grad_addition_hooks", "make_targets", "orthonormalize",
           "random_directions", "rdo", "rdo_loss", "representational_independence", "resid_cosines",
           "retain_kl", "retain_positions", "sample_cone", "summarise", "target_ce", "train_cone", "train_cones"]
