"""Per-prompt steerability of a refusal direction (Tan et al. 2024, "Analyzing the generalization and reliability of
steering vectors").

A mean effect can hide prompts that do not move, or move the wrong way. For one direction and layer, every prompt's
change in refusal score (`probes.refusal.refusal_score` of the last logits, a log-odds: Tan et al.'s propensity is
a logit difference of the same kind) is measured under

- activation addition of `coeff` x the raw difference at `resid_pre[layer]`, every position
  (`probes.directions.addition_hooks`, Arditi et al.'s addition), for several coefficients;
- directional ablation (`probes.directions.ablation_hooks`), whose intended effect is a lower score.

Reported: the full per-prompt distribution, its quantiles, the fraction steered the wrong way (the score moves
against the sign of the coefficient; up under ablation) and Tan et al.'s per-prompt steerability: the least-squares
slope of the score against the coefficient, the point (0, baseline) included, with the fraction of prompts whose
slope is negative ("anti-steerable"). Tan et al. fit one symmetric range of multipliers on one prompt set; here
each prompt set gets the coefficients that ask its own question (harmless prompts: positive, does refusal appear;
harmful prompts: negative, does it go), so both fits include 0 but neither spans both signs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.chat import ChatBatch
from probes.directions import Direction, ablation_hooks, addition_hooks
from probes.refusal import score_prompts

DEFAULT_COEFFS: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5, 2.0)
QUANTILES: tuple[float, ...] = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def slopes(coeffs: Sequence[float], scores: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of each column of `scores` `[coeff, prompt]` against `coeffs`, `[prompt]` float64."""
    c = torch.as_tensor(list(coeffs), dtype=torch.float64)
    if scores.ndim != 2 or scores.shape[0] != c.shape[0]:
        raise ValueError(f"scores must be [coeff={c.shape[0]}, prompt], got {tuple(scores.shape)}")
    if c.shape[0] < 2 or float(c.var()) == 0:
        raise ValueError("a slope needs at least two distinct coefficients")
    cc = c - c.mean()
    s = scores.double()
    return (cc[:, None] * (s - s.mean(0))).sum(0) / (cc**2).sum()


@dataclass
class Steerability:
    """One prompt set under one direction at one layer.

    coeffs: multiples of the direction's raw norm (the baseline, 0, is not among them). baseline: `[prompt]` float64
    scores un-intervened; added: `[coeff, prompt]` float64 changes (steered - baseline); ablated: `[prompt]` changes
    under directional ablation, or None.
    """

    name: str
    layer: int
    norm: float
    coeffs: list[float]
    baseline: torch.Tensor
    added: torch.Tensor
    ablated: torch.Tensor | None = None
    model: str = ""

    @property
    def slopes(self) -> torch.Tensor:
        """`[prompt]` float64: Tan et al.'s per-prompt steerability, the slope of score vs coefficient over
        `[0, *coeffs]` (score change per unit of the raw difference)."""
        scores = torch.cat([self.baseline[None], self.baseline[None] + self.added])
        return slopes([0.0, *self.coeffs], scores)

    def wrong_way(self) -> dict[str, Any]:
        """`{"added": [coeff] fractions whose change has the opposite sign of the coefficient, "ablated": fraction
        whose score rose, or None, "slope": fraction with a negative slope}`."""
        sign = torch.sign(torch.as_tensor(self.coeffs, dtype=torch.float64))[:, None]
        return {"added": ((self.added * sign) < 0).double().mean(-1).tolist(),
                "ablated": None if self.ablated is None else float((self.ablated > 0).double().mean()),
                "slope": float((self.slopes < 0).double().mean())}

    def quantiles(self, q: Sequence[float] = QUANTILES) -> dict[str, Any]:
        """`{"q": q, "added": [coeff][len(q)], "ablated": [len(q)] or None, "slope": [len(q)]}` (linear
        interpolation, as numpy's default)."""
        qt = torch.as_tensor(list(q), dtype=torch.float64)
        return {"q": qt.tolist(), "added": torch.quantile(self.added, qt, dim=-1).T.tolist(),
                "ablated": None if self.ablated is None else torch.quantile(self.ablated, qt).tolist(),
                "slope": torch.quantile(self.slopes, qt).tolist()}

    def as_dict(self) -> dict[str, Any]:
        return dict(name=self.name, model=self.model, layer=self.layer, norm=self.norm, coeffs=self.coeffs,
                    n=int(self.baseline.shape[0]), baseline=self.baseline.tolist(), changes=self.added.tolist(),
                    mean_change=self.added.mean(-1).tolist(),
                    ablation=None if self.ablated is None else self.ablated.tolist(),
                    ablation_mean=None if self.ablated is None else float(self.ablated.mean()),
                    slopes=self.slopes.tolist(), mean_slope=float(self.slopes.mean()),
                    wrong_way=self.wrong_way(), quantiles=self.quantiles())


def _check_coeffs(coeffs: Sequence[float]) -> list[float]:
    out = [float(c) for c in coeffs]
    if not out:
        raise ValueError("no coefficients")
    if any(not torch.isfinite(torch.tensor(c)) for c in out):
        raise ValueError(f"non-finite coefficient in {out}")
    if 0.0 in out:
        raise ValueError("coefficient 0 is the baseline, measured anyway: leave it out")
    if len(set(out)) < len(out):
        raise ValueError(f"coefficients repeat: {out}")
    return out


def steerability(model: Any, direction: Direction | torch.Tensor, layer: int, prompts: ChatBatch,
                 token_ids: Sequence[int], *, coeffs: Sequence[float] = DEFAULT_COEFFS, ablate: bool = False,
                 batch_size: int = 16, progress: bool = True, name: str = "") -> Steerability:
    """Every prompt's refusal-score change under addition of `coeff` x `direction` (a Direction adds its raw
    difference; a tensor is the raw difference) at `resid_pre[layer]`, all positions, for each of `coeffs`, and,
    with `ablate`, under directional ablation of it. One forward per coefficient (and one for the ablation) per
    batch."""
    coeffs = _check_coeffs(coeffs)
    if len(prompts) == 0:
        raise ValueError("no prompts")
    raw = direction.raw if isinstance(direction, Direction) else direction
    if not isinstance(raw, torch.Tensor) or raw.ndim != 1:
        raise ValueError("direction must be a Direction or a 1-D tensor [d_model]")
    addition_hooks(model, raw, layer)  # checks layer, shape and finiteness before any forward
    norm = float(raw.double().norm())
    if norm == 0:
        raise ValueError("the direction is zero")
    baseline = score_prompts(model, prompts, token_ids, batch_size=batch_size)
    added = torch.empty(len(coeffs), len(prompts), dtype=torch.float64)
    steps = [("add", c) for c in coeffs] + ([("ablate", None)] if ablate else [])
    ablated = None
    for what, c in tqdm(steps, desc=f"steerability {name or ''}".strip(), disable=not progress, leave=False):
        hooks = addition_hooks(model, raw, layer, c) if what == "add" else ablation_hooks(model, raw)
        change = score_prompts(model, prompts, token_ids, hooks, batch_size=batch_size) - baseline
        if what == "add":
            added[coeffs.index(c)] = change
        else:
            ablated = change
    return Steerability(name, layer, norm, coeffs, baseline, added, ablated,
                        getattr(direction, "model", "") or str(getattr(model.cfg, "model_name", "")))


@dataclass
class RefusalSteerability:
    """Both prompt sets: harmless under positive coefficients, harmful under ablation (and negative
    coefficients)."""

    harmless: Steerability
    harmful: Steerability

    def as_dict(self) -> dict[str, Any]:
        return {"harmless": self.harmless.as_dict(), "harmful": self.harmful.as_dict()}


def refusal_steerability(model: Any, direction: Direction | torch.Tensor, layer: int, harmful: ChatBatch,
                         harmless: ChatBatch, token_ids: Sequence[int], *, coeffs: Sequence[float] = DEFAULT_COEFFS,
                         batch_size: int = 16, progress: bool = True) -> RefusalSteerability:
    """`steerability` of harmless prompts at `+coeffs` (refusal should appear) and of harmful prompts under
    ablation and at `-coeffs` (refusal should go). `coeffs` are magnitudes (> 0)."""
    coeffs = _check_coeffs(coeffs)
    if any(c < 0 for c in coeffs):
        raise ValueError(f"coeffs are magnitudes here (the harmful set gets their negatives): {coeffs}")
    return RefusalSteerability(
        harmless=steerability(model, direction, layer, harmless, token_ids, coeffs=coeffs, batch_size=batch_size,
                              progress=progress, name="harmless"),
        harmful=steerability(model, direction, layer, harmful, token_ids, coeffs=[-c for c in coeffs], ablate=True,
                             batch_size=batch_size, progress=progress, name="harmful"))
