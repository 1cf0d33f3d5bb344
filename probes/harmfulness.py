"""Harmfulness and refusal as two directions (Zhao et al. 2025, "LLMs Encode Harmfulness and Refusal Separately").

Two difference-of-means directions, harmful - harmless, of `resid_pre` at every layer, read at two tokens:

- the *harmfulness* direction at `t_inst`, the last token of the user's instruction (`user[-1]`);
- the *refusal* direction at `t_post-inst`, the last token of the prompt (`post_instruction[-1]`, Arditi et al.'s
  position).

`directions` gives both per layer, with their cosine and norms; `separability` how well each separates held-out
harmful from harmless prompts (the fraction on the right side of the train midpoint, per class); `steering` the
causal check that adding each direction, at the same norm, moves the refusal score; `ablation_projection` the
converse check that ablating the refusal direction leaves the harmfulness read-out at `t_inst` where it was.
All take any model of a pair: the base model's `separability` says whether harmfulness is encoded before tuning.

The reference code (Zhao et al.'s `intervention.py`) adds the raw difference of means, times a coefficient, to the
input of one decoder layer (our `resid_pre`) during the prompt's forward pass only, at every prompt token, or (their
reply-inversion task) at every token before the appended question and the template's tail. Here the score is that
of the first response token, one forward, so "prompt's forward only" is all there is; `steering(positions=...)`
offers "all" (their default), "instruction" (every token before the post-instruction template: their context-only
variant, our prompts having no appended question) and "post_instruction". One departure: both directions are added
at the *same* norm (the refusal direction's raw norm at that layer, times the coefficient) so their effects compare
per unit length; the paper steers each with its own raw difference.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.activations import forward, last_logits, record
from probes.chat import ChatBatch
from probes.directions import Direction, ablation_hooks, cosine, unit
from probes.refusal import refusal_score

INST = "user[-1]"  # t_inst
POST = "post_instruction[-1]"  # t_post-inst
KINDS: tuple[str, ...] = ("harmfulness", "refusal")  # the direction read at INST, the one read at POST
STEER_POSITIONS: tuple[str, ...] = ("all", "instruction", "post_instruction")

Hook = tuple[str, Any]


def _nan_list(x: torch.Tensor) -> list:
    """A float tensor as a JSON-ready list with NaN as None."""
    return [None if v != v else float(v) for v in x.tolist()]


# ---------------------------------------------------------------------------------------------- the two directions

@dataclass
class Directions:
    """The harmfulness and refusal directions of one model, per layer.

    harmful_mean, harmless_mean: `[layer, 2, d_model]` float64 means of `resid_pre` at (t_inst, t_post-inst);
    `harmfulness` / `refusal` are the raw differences at those two positions, `[layer, d_model]`.
    """

    harmful_mean: torch.Tensor
    harmless_mean: torch.Tensor
    layers: list[int]
    model: str = ""
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_means(cls, harmful_mean: torch.Tensor, harmless_mean: torch.Tensor, layers: Sequence[int], *,
                   model: str = "", counts: dict[str, int] | None = None) -> Directions:
        """From `[layer, 2, d_model]` means (position 0 = t_inst, 1 = t_post-inst)."""
        if harmful_mean.shape != harmless_mean.shape or harmful_mean.ndim != 3 or harmful_mean.shape[1] != 2:
            raise ValueError(f"means must both be [layer, 2, d_model], got {tuple(harmful_mean.shape)} and "
                             f"{tuple(harmless_mean.shape)}")
        if len(layers) != harmful_mean.shape[0]:
            raise ValueError(f"{len(layers)} layer labels for {harmful_mean.shape[0]} layers")
        return cls(harmful_mean.double(), harmless_mean.double(), list(layers), model, dict(counts or {}))

    @property
    def harmfulness(self) -> torch.Tensor:
        """`[layer, d_model]` float64: harmful - harmless mean at t_inst."""
        return self.harmful_mean[:, 0] - self.harmless_mean[:, 0]

    @property
    def refusal(self) -> torch.Tensor:
        """`[layer, d_model]` float64: harmful - harmless mean at t_post-inst."""
        return self.harmful_mean[:, 1] - self.harmless_mean[:, 1]

    def raw(self, kind: str) -> torch.Tensor:
        if kind not in KINDS:
            raise ValueError(f"unknown direction {kind!r}: one of {KINDS}")
        return self.harmfulness if kind == "harmfulness" else self.refusal

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise ValueError(f"no directions at layer {layer!r} (layers {self.layers})")
        return self.layers.index(layer)

    def cosine(self) -> torch.Tensor:
        """`[layer]` float64 cosine of the two directions; NaN where either is zero (e.g. t_post-inst at layer 0,
        the same template token's embedding for every prompt)."""
        zero = (self.harmfulness.norm(dim=-1) == 0) | (self.refusal.norm(dim=-1) == 0)
        return cosine(self.harmfulness, self.refusal).masked_fill(zero, float("nan"))

    def norms(self) -> dict[str, torch.Tensor]:
        """`{harmfulness, refusal}`: `[layer]` float64 raw norms."""
        return {k: self.raw(k).norm(dim=-1) for k in KINDS}

    def direction(self, kind: str, layer: int) -> Direction:
        """One direction as a `Direction` with provenance (ValueError where it is zero)."""
        raw = self.raw(kind)[self.layer_index(layer)]
        return Direction.from_raw(raw, model=self.model, hook="resid_pre", layer=layer,
                                  position=INST if kind == "harmfulness" else POST, data=dict(self.counts))

    def midpoint(self, kind: str) -> torch.Tensor:
        """`[layer]` float64: the projection of the midpoint of the two class means on the unit direction, at the
        direction's own position (the threshold of `separability`); NaN where the direction is zero."""
        p = 0 if kind == "harmfulness" else 1
        raw = self.raw(kind)
        n = raw.norm(dim=-1, keepdim=True)
        u = raw / n.clamp_min(1e-300)
        mid = ((self.harmful_mean[:, p] + self.harmless_mean[:, p]) / 2 * u).sum(-1)
        return mid.masked_fill(n[:, 0] == 0, float("nan"))

    def as_dict(self) -> dict[str, Any]:
        norms = self.norms()
        return dict(model=self.model, layers=self.layers, positions={"harmfulness": INST, "refusal": POST},
                    cosine=_nan_list(self.cosine()), norm_harmfulness=norms["harmfulness"].tolist(),
                    norm_refusal=norms["refusal"].tolist(), counts=self.counts)


def directions(model: Any, harmful: ChatBatch, harmless: ChatBatch, *, layers: Sequence[int] | None = None,
               batch_size: int = 16, progress: bool = True, model_name: str | None = None) -> Directions:
    """Harmful - harmless means of `resid_pre` at t_inst (`user[-1]`) and t_post-inst (`post_instruction[-1]`) at
    every layer (or `layers`), streamed in float64 (`record(..., keep="mean")`)."""
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("directions need non-empty harmful and harmless sets")
    kw = dict(hooks="resid_pre", layers=layers, positions=[INST, POST], batch_size=batch_size, keep="mean",
              progress=progress, model_name=model_name)
    a, b = record(model, harmful, **kw), record(model, harmless, **kw)
    return Directions.from_means(a.mean(), b.mean(), a.layers, model=a.model,
                                 counts=dict(harmful=len(harmful), harmless=len(harmless)))


# --------------------------------------------------------------------------------------------------- separability

@dataclass
class Separability:
    """Held-out separation along each direction at its own position, per layer.

    For each kind: `harmful` (fraction of harmful prompts whose projection is above the train midpoint), `harmless`
    (fraction below it) and `balanced` (their mean), each `[layer]` float64 (NaN where the direction is zero).
    """

    layers: list[int]
    fractions: dict[str, dict[str, torch.Tensor]]
    n_harmful: int
    n_harmless: int
    model: str = ""

    @classmethod
    def from_activations(cls, dirs: Directions, harmful: torch.Tensor, harmless: torch.Tensor) -> Separability:
        """From held-out `resid_pre` activations `[prompt, layer, 2, d_model]` (positions t_inst, t_post-inst) at
        `dirs.layers`."""
        for name, x in (("harmful", harmful), ("harmless", harmless)):
            if x.ndim != 4 or tuple(x.shape[1:3]) != (len(dirs.layers), 2) or x.shape[0] == 0:
                raise ValueError(f"{name} activations must be [prompt>0, layer={len(dirs.layers)}, 2, d_model], "
                                 f"got {tuple(x.shape)}")
        out: dict[str, dict[str, torch.Tensor]] = {}
        for kind, p in zip(KINDS, (0, 1)):
            raw = dirs.raw(kind)
            zero = raw.norm(dim=-1) == 0
            u = raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-300)  # [layer, d]
            mid = dirs.midpoint(kind)
            above = ((harmful[:, :, p].double() * u).sum(-1) > mid).double().mean(0)
            below = ((harmless[:, :, p].double() * u).sum(-1) < mid).double().mean(0)
            res = {"harmful": above, "harmless": below, "balanced": (above + below) / 2}
            out[kind] = {k: v.masked_fill(zero, float("nan")) for k, v in res.items()}
        return cls(list(dirs.layers), out, int(harmful.shape[0]), int(harmless.shape[0]), dirs.model)

    def as_dict(self) -> dict[str, Any]:
        return dict(model=self.model, layers=self.layers, n_harmful=self.n_harmful, n_harmless=self.n_harmless,
                    **{kind: {k: _nan_list(v) for k, v in d.items()} for kind, d in self.fractions.items()})


def separability(model: Any, dirs: Directions, harmful: ChatBatch, harmless: ChatBatch, *, batch_size: int = 16,
                 progress: bool = True) -> Separability:
    """`Separability` of held-out prompts (use prompts the directions were not computed from): each prompt's
    `resid_pre` at t_inst projected on the harmfulness direction and at t_post-inst on the refusal direction,
    against the midpoint of the train means."""
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("separability needs non-empty harmful and harmless sets")
    kw = dict(hooks="resid_pre", layers=dirs.layers, positions=[INST, POST], batch_size=batch_size, keep="all",
              progress=progress)
    return Separability.from_activations(dirs, record(model, harmful, **kw).tensor, record(model, harmless, **kw).tensor)


# ------------------------------------------------------------------------------------------------------- steering

def position_mask(batch: ChatBatch, positions: str) -> torch.Tensor:
    """`[batch, seq]` bool: the tokens `steering` edits. "all": every real token; "instruction": every real token
    before the post-instruction template (system, user and the template before them); "post_instruction": the
    template tokens after the user's text."""
    real = batch.attention_mask.bool()
    if positions == "all":
        return real
    if positions == "instruction":
        return real & ~batch.role_mask("post_instruction") & ~batch.role_mask("response")
    if positions == "post_instruction":
        return batch.role_mask("post_instruction")
    raise ValueError(f"unknown steering positions {positions!r}: one of {STEER_POSITIONS}")


def steering_hooks(model: Any, vector: torch.Tensor, layer: int, mask: torch.Tensor) -> list[Hook]:
    """`resid_pre[layer] += vector` at the tokens where `mask` (`[batch, seq]` bool, for one batch) is True."""
    n = int(model.cfg.n_layers)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} out of range for a {n}-layer model")
    if vector.shape != (int(model.cfg.d_model),) or not bool(torch.isfinite(vector).all()):
        raise ValueError(f"the added vector must be a finite [d_model={model.cfg.d_model}]")
    v = vector.detach().double().cpu()

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if tuple(act.shape[:2]) != tuple(mask.shape):
            raise ValueError(f"{hook.name}: activation {tuple(act.shape)} does not match the mask {tuple(mask.shape)}")
        m = mask.to(device=act.device, dtype=act.dtype)[..., None]
        return act + m * v.to(device=act.device, dtype=act.dtype)

    return [(f"blocks.{layer}.hook_resid_pre", fn)]


def scores_under(model: Any, batch: ChatBatch, token_ids: Sequence[int],
                 make_hooks: Callable[[ChatBatch], Sequence[Hook]], *, batch_size: int = 16) -> torch.Tensor:
    """Refusal score `[batch]` float64 with hooks built for each chunk (`make_hooks(chunk)`: masks are per chunk)."""
    out = []
    for _, sub in batch.chunks(batch_size):
        out.append(refusal_score(last_logits(model, sub, list(make_hooks(sub)), batch_size=len(sub)), token_ids))
    return torch.cat(out)


@dataclass
class Steering:
    """Refusal-score changes when each direction is added at `layer`, at the same norm.

    changes[kind]: `[coeff, prompt]` float64, steered minus baseline score; the added vector is `coeff * scale *`
    the unit direction, `scale` the refusal direction's raw norm at `layer`. baseline: `[prompt]` float64.
    """

    layer: int
    coeffs: list[float]
    positions: str
    scale: float
    baseline: torch.Tensor
    changes: dict[str, torch.Tensor]
    model: str = ""

    def mean_change(self) -> dict[str, torch.Tensor]:
        """`{kind: [coeff]}` float64 mean change over prompts."""
        return {k: v.mean(-1) for k, v in self.changes.items()}

    def as_dict(self) -> dict[str, Any]:
        mean = self.mean_change()
        return dict(model=self.model, layer=self.layer, coeffs=self.coeffs, positions=self.positions,
                    scale=self.scale, baseline_mean=float(self.baseline.mean()),
                    mean_change={k: v.tolist() for k, v in mean.items()},
                    ratio_harmfulness_to_refusal=[float(h / r) if r != 0 else None
                                                  for h, r in zip(mean["harmfulness"].tolist(),
                                                                  mean["refusal"].tolist())])


def _coeff_list(coeffs: Sequence[float]) -> list[float]:
    out = [float(c) for c in coeffs]
    if not out:
        raise ValueError("no coefficients")
    if any(c != c or c in (float("inf"), float("-inf")) for c in out):
        raise ValueError(f"non-finite coefficient in {out}")
    if len(set(out)) < len(out):
        raise ValueError(f"coefficients repeat: {out}")
    return out


def steering(model: Any, dirs: Directions, layer: int, prompts: ChatBatch, token_ids: Sequence[int], *,
             coeffs: Sequence[float] = (0.5, 1.0, 1.5, 2.0), positions: str = "all", batch_size: int = 16,
             progress: bool = True) -> Steering:
    """Add the harmfulness and the refusal direction of `layer` to `resid_pre[layer]` at `positions` (see the module
    note), each scaled to `coeff` x the refusal direction's raw norm there, and measure the change in each prompt's
    refusal score (`probes.refusal.refusal_score` of the last logits). Typically `prompts` are harmless (does the
    direction induce refusal?); negative coefficients on harmful prompts ask whether it removes refusal.
    """
    coeffs = _coeff_list(coeffs)
    if positions not in STEER_POSITIONS:
        raise ValueError(f"unknown steering positions {positions!r}: one of {STEER_POSITIONS}")
    if len(prompts) == 0:
        raise ValueError("no prompts to steer")
    li = dirs.layer_index(layer)
    units = {k: unit(dirs.raw(k)[li]) if float(dirs.raw(k)[li].norm()) > 0 else None for k in KINDS}
    missing = [k for k, u in units.items() if u is None]
    if missing:
        raise ValueError(f"the {' and '.join(missing)} direction is zero at layer {layer}: nothing to steer with "
                         "(layer 0's t_post-inst is the same template token for every prompt)")
    scale = float(dirs.refusal[li].norm())
    baseline = scores_under(model, prompts, token_ids, lambda sub: [], batch_size=batch_size)
    changes = {k: torch.empty(len(coeffs), len(prompts), dtype=torch.float64) for k in KINDS}
    grid = [(k, ci) for k in KINDS for ci in range(len(coeffs))]
    for kind, ci in tqdm(grid, desc=f"steer layer {layer}", disable=not progress, leave=False):
        vec = coeffs[ci] * scale * units[kind]
        s = scores_under(model, prompts, token_ids,
                         lambda sub, vec=vec: steering_hooks(model, vec, layer, position_mask(sub, positions)),
                         batch_size=batch_size)
        changes[kind][ci] = s - baseline
    return Steering(layer, coeffs, positions, scale, baseline, changes, dirs.model)


# --------------------------------------------------------------------------------- ablation and the t_inst read-out

def resid_at(model: Any, batch: ChatBatch, spec: str, layers: Sequence[int], hooks: Sequence[Hook] = (), *,
             batch_size: int = 16) -> torch.Tensor:
    """`resid_pre` at one position per prompt (`spec`, e.g. "user[-1]") for `layers` under `hooks`,
    `[prompt, layer, d_model]` float64. Recorded here rather than by `record`, whose stored chunks do not know
    about hooks active around it."""
    layers = list(layers)
    n_layers = int(model.cfg.n_layers)
    out = []
    for _, sub in batch.chunks(batch_size):
        pos = sub.positions(spec)[0]
        if pos.shape[1] != 1:
            raise ValueError(f"{spec!r} selects {pos.shape[1]} positions; one is needed")
        got: dict[int, torch.Tensor] = {}

        def make(li: int):
            def fn(act: torch.Tensor, hook: Any) -> None:
                rows = torch.arange(act.shape[0], device=act.device)
                got[li] = act[rows, pos[:, 0].to(act.device)].detach().double().cpu()
            return fn

        grabs = [(f"blocks.{layer}.hook_resid_pre", make(li)) for li, layer in enumerate(layers)]
        stop = max(layers) + 1
        with model.hooks(fwd_hooks=[*hooks, *grabs]):
            forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
        out.append(torch.stack([got[li] for li in range(len(layers))], 1))
    return torch.cat(out)


@dataclass
class Preservation:
    """The harmfulness read-out at t_inst with and without the refusal direction ablated.

    projection[set][state]: `[prompt, layer]` float64, each prompt's `resid_pre` at t_inst projected on the unit
    harmfulness direction of that layer (set: harmful / harmless; state: clean / ablated). orthogonal: the same on
    the harmfulness direction made orthogonal to r̂, the part ablation cannot remove by construction. cosine:
    `[layer]` cosine of each layer's harmfulness direction with the ablated r̂ (of `refusal_layer`). scores:
    mean refusal score of the harmful prompts clean and ablated (when refusal tokens were given).
    """

    layers: list[int]
    refusal_layer: int
    cosine: torch.Tensor
    projection: dict[str, dict[str, torch.Tensor]]
    orthogonal: dict[str, dict[str, torch.Tensor]]
    scores: dict[str, float] = field(default_factory=dict)
    model: str = ""

    def means(self, which: str = "projection") -> dict[str, dict[str, torch.Tensor]]:
        """`{set: {state: [layer]}}` float64 means over prompts."""
        src = self.projection if which == "projection" else self.orthogonal
        return {s: {k: v.mean(0) for k, v in d.items()} for s, d in src.items()}

    def separation_kept(self) -> torch.Tensor:
        """`[layer]`: (harmful - harmless mean projection) ablated / clean."""
        m = self.means()
        return (m["harmful"]["ablated"] - m["harmless"]["ablated"]) / (m["harmful"]["clean"] - m["harmless"]["clean"])

    def as_dict(self) -> dict[str, Any]:
        def lists(d: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, list]]:
            return {s: {k: _nan_list(v) for k, v in x.items()} for s, x in d.items()}

        return dict(model=self.model, layers=self.layers, refusal_layer=self.refusal_layer, position=INST,
                    cosine_harmfulness_refusal=_nan_list(self.cosine), mean_projection=lists(self.means()),
                    mean_projection_orthogonal=lists(self.means("orthogonal")),
                    separation_kept=_nan_list(self.separation_kept()), scores=self.scores)


def ablation_projection(model: Any, dirs: Directions, refusal_layer: int, harmful: ChatBatch, harmless: ChatBatch,
                        *, token_ids: Sequence[int] | None = None, batch_size: int = 16,
                        progress: bool = True) -> Preservation:
    """Ablate the refusal direction of `refusal_layer` (`probes.directions.ablation_hooks`: removed from every
    residual write, so every layer is downstream of the ablation) and read each prompt's t_inst `resid_pre` on the
    harmfulness direction of every layer (those with a non-zero harmfulness direction), clean and ablated.

    The ablated stream has no r̂ component, so the projection on ĥ loses `(x . r̂) cos(ĥ, r̂)` mechanically;
    `orthogonal` reads the part of ĥ orthogonal to r̂, which only a downstream (causal) effect can move.
    """
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("ablation_projection needs non-empty harmful and harmless sets")
    r_hat = unit(dirs.direction("refusal", refusal_layer).raw)
    keep = [li for li in range(len(dirs.layers)) if float(dirs.harmfulness[li].norm()) > 0]
    if not keep:
        raise ValueError("the harmfulness direction is zero at every layer")
    layers = [dirs.layers[li] for li in keep]
    h = dirs.harmfulness[keep]
    h_hat = h / h.norm(dim=-1, keepdim=True)
    perp = h_hat - (h_hat @ r_hat)[:, None] * r_hat
    perp_norm = perp.norm(dim=-1, keepdim=True)
    perp_hat = torch.where(perp_norm > 1e-12, perp / perp_norm.clamp_min(1e-300), torch.full_like(perp, float("nan")))
    abl = ablation_hooks(model, r_hat)
    projection: dict[str, dict[str, torch.Tensor]] = {}
    orthogonal: dict[str, dict[str, torch.Tensor]] = {}
    runs = [(name, b, state, hooks) for name, b in (("harmful", harmful), ("harmless", harmless))
            for state, hooks in (("clean", []), ("ablated", abl))]
    for name, b, state, hooks in tqdm(runs, desc="ablation read-out", disable=not progress, leave=False):
        x = resid_at(model, b, INST, layers, hooks, batch_size=batch_size)  # [prompt, layer, d]
        projection.setdefault(name, {})[state] = (x * h_hat).sum(-1)
        orthogonal.setdefault(name, {})[state] = (x * perp_hat).sum(-1)
    scores: dict[str, float] = {}
    if token_ids is not None:
        for state, hooks in (("clean", []), ("ablated", abl)):
            scores[f"harmful_{state}"] = float(refusal_score(
                last_logits(model, harmful, hooks, batch_size=batch_size), token_ids).mean())
    return Preservation(layers, refusal_layer, h_hat @ r_hat, projection, orthogonal, scores, dirs.model)
