"""The refusal-KL frontier: abliteration parametrised as Heretic does (p-e-w/heretic), searched with multi-objective
TPE, and where the single Arditi direction sits against the Pareto front.

The parametrisation, each piece a type:

- `Kernel`: per-layer ablation weights from a linear kernel over layers, `(max_weight, max_weight_position,
  min_weight, min_weight_distance)`: w_l = max + (|l - pos| / distance) (min - max) within `distance` of `pos`,
  0 beyond it (no ablation there), as Heretic's `abliterate`.
- `DirectionStack`: the harmful - harmless mean difference at the last prompt token (`post_instruction[-1]`) of
  every residual, rows indexed as HF's `hidden_states` (row 0: embeddings, row l + 1: output of block l).
  `DirectionStack.at(index)` is Heretic's fractional direction index: `index` counts block outputs, so it blends
  rows floor(index) + 1 and floor(index) + 2 linearly by the fractional part and normalises the blend.
- `Abliteration`: one kernel per component and a direction (a fractional index, the "global" scope, or None: the
  "per layer" scope, where block l ablates its own output's direction, row l + 1). Its `hooks` edit
  `x <- x - w_l (x . r̂) r̂` at each block's attention output and MLP output (`placement="writes"`), which for
  bias-free projections (Llama, Qwen2, Mistral, ...) equals Heretic's weight edit `W <- W - w_l r̂ r̂ᵀ W` of
  `o_proj` / `down_proj` exactly; or at each block's input `resid_pre` (`placement="inputs"`, one kernel
  `"resid"`), a variant Heretic does not have.
- `search`: Heretic's search space and sampler (optuna `TPESampler(multivariate=True, n_ei_candidates=128)`, seeded,
  `n_startup_trials` random trials first) minimising (refusals on harmful val, mean first-token KL(original ||
  ablated) on harmless val, Heretic's `batchmean` KL) -> `Frontier`, whose `front` is the Pareto front
  (`pareto_front`). `Objectives` measures both numbers; `compare` places any other point (e.g. `arditi_point`,
  Arditi et al.'s chosen direction ablated from every residual write with weight 1) against the front.

Named departures from Heretic:
- Refusals are counted by default as harmful val prompts whose first-token refusal score (`probes.refusal`) is
  > 0: one forward per trial instead of generating. `Objectives(refusal="judge")` generates `max_new_tokens`
  greedily and judges the text (`probes.refusal.judge`, default Arditi et al.'s phrases; Heretic generates 100
  tokens and matches its own keyword list); `remeasure` re-scores a front that way.
- The edit is a hook on activations, not a LoRA on weights. It also removes the component of an output bias (GPT-2),
  which Heretic's weight edit leaves; on Gemma-2/3 `hook_attn_out` / `hook_mlp_out` are after the post-norms, where
  Heretic edits `o_proj` / `down_proj` before them.
- `norm_preserving=True` rescales each edited activation to its norm before the edit (at the writes: each write
  keeps its norm; at the inputs: each residual does). Heretic's norm preservation (`row_normalization="full"`,
  after grimjim's norm-preserving biprojected abliteration) acts on the weights instead: it restores the row norms
  of the edited matrices, through a rank-3 SVD of the change.
- The stack's last row is, as Heretic's, HF's last `hidden_states` entry: the last block's output after the final
  norm (`direction_stack(..., final_norm=False)`: before it, in the space the edit acts on). That row is read by
  direction indices >= n_layers - 2 and by the last block under the "per layer" scope.
- The directions are the raw differences by default; Heretic by default first projects out the harmless mean
  (grimjim's projected abliteration): `direction_stack(..., projected=True)`. Winsorisation (off in Heretic by
  default) is not offered.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.activations import last_logits, record
from probes.chat import ChatBatch
from probes.directions import Direction, Hook, ablation_hooks, unit, weighted_ablation_hooks
from probes.generation import generate
from probes.refusal import first_token_kl, judge as judge_texts, refusal_score

PLACEMENTS: dict[str, tuple[str, ...]] = {"writes": ("attn", "mlp"), "inputs": ("resid",)}
COMPONENT_HOOKS = {"attn": "blocks.{layer}.hook_attn_out", "mlp": "blocks.{layer}.hook_mlp_out",
                   "resid": "blocks.{layer}.hook_resid_pre"}
SCOPES = ("global", "per layer")
REFUSALS = ("score", "judge")


def _finite(**values: float) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")


# ---------------------------------------------------------------------------------------------------- the kernel

@dataclass(frozen=True)
class Kernel:
    """Per-layer ablation weights: `max_weight` at `max_weight_position` (a fractional layer), falling linearly to
    `min_weight` at `min_weight_distance` layers from it, and 0 (no ablation) further away."""

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def __post_init__(self) -> None:
        _finite(max_weight=self.max_weight, max_weight_position=self.max_weight_position,
                min_weight=self.min_weight, min_weight_distance=self.min_weight_distance)
        if self.min_weight_distance <= 0:
            raise ValueError(f"min_weight_distance must be > 0, got {self.min_weight_distance}")

    def weights(self, n_layers: int) -> torch.Tensor:
        """`[n_layers]` float64: w_l = max + (d / distance) (min - max) where d = |l - position| <= distance, else 0."""
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
        d = (torch.arange(n_layers, dtype=torch.float64) - self.max_weight_position).abs()
        w = self.max_weight + (d / self.min_weight_distance) * (self.min_weight - self.max_weight)
        return torch.where(d <= self.min_weight_distance, w, torch.zeros_like(w))

    def as_dict(self) -> dict[str, float]:
        return dict(max_weight=float(self.max_weight), max_weight_position=float(self.max_weight_position),
                    min_weight=float(self.min_weight), min_weight_distance=float(self.min_weight_distance))


# -------------------------------------------------------------------------------------------- the direction stack

@dataclass
class DirectionStack:
    """Unit harmful - harmless mean differences `vectors` `[n_layers + 1, d_model]` float64, rows as HF's
    `hidden_states` (row 0: embeddings = `resid_pre` of block 0, row l + 1: `resid_post` of block l, the last one
    after the final norm when `final_norm`), and the raw differences `raw` (same shape). A row whose difference is
    zero (the embeddings at a template token, the same for every prompt) is all zeros in `vectors` and cannot be
    used."""

    vectors: torch.Tensor
    raw: torch.Tensor
    position: str
    model: str = ""
    projected: bool = False
    final_norm: bool = True

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[0] - 1

    def _row(self, i: int) -> torch.Tensor:
        v = self.vectors[i]
        if float(v.norm()) == 0:
            raise ValueError(f"row {i} of the direction stack is a zero difference (no direction there)")
        return v

    def at(self, index: float) -> torch.Tensor:
        """Heretic's fractional direction index: `index` in [-1, n_layers - 1] counts block outputs; the unit
        vector `[d_model]` float64 of `lerp(row[i], row[i + 1], f)` with i = floor(index) + 1, f = index - floor."""
        _finite(direction_index=index)
        if not -1 <= index <= self.n_layers - 1:
            raise ValueError(f"direction index {index} outside [-1, {self.n_layers - 1}] for a "
                             f"{self.n_layers}-layer model")
        base = math.floor(index)
        f, i = index - base, base + 1
        v = self._row(i) if f == 0 else torch.lerp(self._row(i), self._row(i + 1), f)
        return unit(v)

    def for_layer(self, layer: int) -> torch.Tensor:
        """The "per layer" scope's direction of block `layer`: its own output's difference (row layer + 1)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range for a {self.n_layers}-layer model")
        return self._row(layer + 1)

    def direction(self, index: float) -> Direction:
        """`at(index)` as a Direction with provenance (its raw vector is the unit vector: the blend has no scale)."""
        return Direction.from_raw(self.at(index), model=self.model, hook="hidden_states",
                                  layer=math.floor(index) + 1, position=self.position,
                                  data=dict(direction_index=float(index), projected=self.projected))


def direction_stack(model: Any, harmful: ChatBatch, harmless: ChatBatch, *, position: str = "post_instruction[-1]",
                    projected: bool = False, final_norm: bool = True, batch_size: int = 16, progress: bool = True,
                    model_name: str | None = None) -> DirectionStack:
    """Harmful - harmless means of every residual at `position` (streamed float64 sums).

    final_norm: the last row is the last block's output after the model's final norm, per prompt, as HF's last
    `hidden_states` (Heretic's); False: before it. projected: remove from each unit difference its component along
    that row's unit harmless mean and renormalise (Heretic's default `orthogonalize_direction`, after grimjim's
    projected abliteration)."""
    if len(harmful) == 0 or len(harmless) == 0:
        raise ValueError("the direction stack needs non-empty harmful and harmless sets")
    if len(harmful.positions(position)[1]) != 1:
        raise ValueError(f"position {position!r} selects {len(harmful.positions(position)[1])} positions; the stack "
                         "needs one")
    kw = dict(layers=None, positions=position, batch_size=batch_size, progress=progress, model_name=model_name)

    def rows(batch: ChatBatch) -> torch.Tensor:  # [n_layers + 1, d_model]: resid_pre of every block, the last output
        acts = record(model, batch, hooks="resid_pre", keep="mean", **kw)
        if not final_norm:
            last = record(model, batch, hooks="resid_post", keep="mean", **{**kw, "layers": [-1]}).mean()[0]
        else:  # the norm is per prompt: keep the prompts' outputs, normalise each, then average
            out = record(model, batch, hooks="resid_post", keep="all", **{**kw, "layers": [-1]}).tensors["resid_post"]
            with torch.no_grad():
                normed = model.ln_final(out[:, 0].to(next(model.parameters()).device)).double().cpu()
            last = normed.mean(0)
        return torch.cat([acts.mean()[:, 0], last])

    harm, less = rows(harmful), rows(harmless)
    raw = harm - less
    norms = raw.norm(dim=-1, keepdim=True)
    vectors = torch.where(norms > 0, raw / norms.clamp_min(1e-300), torch.zeros_like(raw))
    if projected:
        g = less / less.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        vectors = vectors - (vectors * g).sum(-1, keepdim=True) * g
        n2 = vectors.norm(dim=-1, keepdim=True)
        vectors = torch.where(n2 > 0, vectors / n2.clamp_min(1e-300), torch.zeros_like(vectors))
    return DirectionStack(vectors=vectors, raw=raw, position=harmful.positions(position)[1][0],
                          model=model_name or str(model.cfg.model_name),
                          projected=projected, final_norm=final_norm)


# ----------------------------------------------------------------------------------------------- the abliteration

@dataclass(frozen=True)
class Abliteration:
    """One point of the search space: a kernel per component of `placement` (writes: "attn", "mlp"; inputs:
    "resid") and a direction: a fractional `direction_index` (`DirectionStack.at`, the "global" scope) or None
    (the "per layer" scope, `DirectionStack.for_layer`)."""

    kernels: Mapping[str, Kernel]
    direction_index: float | None
    placement: str = "writes"
    norm_preserving: bool = False

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}: one of {list(PLACEMENTS)}")
        if set(self.kernels) != set(PLACEMENTS[self.placement]):
            raise ValueError(f"placement {self.placement!r} takes kernels {list(PLACEMENTS[self.placement])}, got "
                             f"{sorted(self.kernels)}")
        if self.direction_index is not None:
            _finite(direction_index=self.direction_index)

    @property
    def scope(self) -> str:
        return "per layer" if self.direction_index is None else "global"

    def weights(self, n_layers: int) -> dict[str, torch.Tensor]:
        """`{component: [n_layers] float64}`."""
        return {c: k.weights(n_layers) for c, k in self.kernels.items()}

    def edits(self, stack: DirectionStack) -> dict[str, tuple[torch.Tensor, float]]:
        """`{hook name: (unit direction [d_model], weight)}` for every hook with a non-zero weight."""
        n = stack.n_layers
        glob = None if self.direction_index is None else stack.at(self.direction_index)
        out: dict[str, tuple[torch.Tensor, float]] = {}
        for comp, w in self.weights(n).items():
            for layer in range(n):
                if float(w[layer]) != 0:
                    r = glob if glob is not None else stack.for_layer(layer)
                    out[COMPONENT_HOOKS[comp].format(layer=layer)] = (r, float(w[layer]))
        return out

    def hooks(self, model: Any, stack: DirectionStack) -> list[Hook]:
        """The edit as hooks on `model` (`probes.directions.weighted_ablation_hooks`)."""
        if stack.n_layers != int(model.cfg.n_layers) or stack.vectors.shape[1] != int(model.cfg.d_model):
            raise ValueError(f"the direction stack is [{stack.n_layers + 1}, {stack.vectors.shape[1]}], the model has "
                             f"{model.cfg.n_layers} layers of width {model.cfg.d_model}")
        return weighted_ablation_hooks(model, self.edits(stack), norm_preserving=self.norm_preserving)

    def as_dict(self) -> dict[str, Any]:
        return dict(scope=self.scope, direction_index=None if self.direction_index is None else float(self.direction_index),
                    placement=self.placement, norm_preserving=self.norm_preserving,
                    kernels={c: k.as_dict() for c, k in self.kernels.items()})


# ------------------------------------------------------------------------------------------------- the objectives

@dataclass(frozen=True)
class Measurement:
    """refusals: harmful val prompts counted as refusals (of `n_harmful`; method in `Objectives.refusal`); kl: mean
    first-token KL(original || intervened) over harmless val, nats; score_mean: mean refusal score on harmful val."""

    refusals: int
    kl: float
    score_mean: float
    n_harmful: int

    @property
    def rate(self) -> float:
        return self.refusals / self.n_harmful

    def as_dict(self) -> dict[str, float | int]:
        return dict(refusals=int(self.refusals), rate=float(self.rate), kl=float(self.kl),
                    score_mean=float(self.score_mean), n_harmful=int(self.n_harmful))


class Objectives:
    """The two numbers a search minimises, for any hook list: refusals on `harmful_val` and mean first-token KL on
    `harmless_val` against the un-intervened model (its logits computed once, here).

    refusal: "score" — prompts whose first-token refusal score (`probes.refusal.refusal_score` on `token_ids`) is
    > 0, one forward; "judge" — greedy generation of `max_new_tokens` under the hooks, judged by `judge` (a name
    or phrases, `probes.refusal.judge`). `baseline` is the un-intervened measurement.
    """

    def __init__(self, model: Any, harmful_val: ChatBatch, harmless_val: ChatBatch, token_ids: Sequence[int], *,
                 refusal: str = "score", judge: str | Sequence[str] = "reference", max_new_tokens: int = 32,
                 batch_size: int = 16):
        if refusal not in REFUSALS:
            raise ValueError(f"unknown refusal count {refusal!r}: one of {REFUSALS}")
        if len(harmful_val) == 0 or len(harmless_val) == 0:
            raise ValueError("the objectives need non-empty harmful and harmless validation sets")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        judge_texts([], judge)  # an unknown judge name fails here, before any forward
        self.model, self.harmful, self.harmless = model, harmful_val, harmless_val
        self.token_ids, self.refusal, self.judge = list(token_ids), refusal, judge
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.base_logits = last_logits(model, harmless_val, batch_size=batch_size)
        self.baseline = self(())

    def __call__(self, hooks: Sequence[Hook]) -> Measurement:
        bs = self.batch_size
        scores = refusal_score(last_logits(self.model, self.harmful, hooks, batch_size=bs), self.token_ids)
        if self.refusal == "score":
            refusals = int((scores > 0).sum())
        else:
            gen = generate(self.model, self.harmful, self.max_new_tokens, hooks, batch_size=bs, progress=False)
            refusals = sum(judge_texts(gen.texts, self.judge))
        kl = first_token_kl(self.base_logits, last_logits(self.model, self.harmless, hooks, batch_size=bs))
        return Measurement(refusals=refusals, kl=float(kl.mean()), score_mean=float(scores.mean()),
                           n_harmful=len(self.harmful))

    def settings(self) -> dict[str, Any]:
        return dict(refusal=self.refusal, judge=self.judge if isinstance(self.judge, str) else list(self.judge),
                    max_new_tokens=self.max_new_tokens if self.refusal == "judge" else None,
                    n_harmful=len(self.harmful), n_harmless=len(self.harmless))


def arditi_point(model: Any, direction: Direction | torch.Tensor, objectives: Objectives, *,
                 norm_preserving: bool = False) -> Measurement:
    """Arditi et al.'s intervention measured like a trial: `direction` removed from every residual write
    (embeddings included) with weight 1 (`probes.directions.ablation_hooks`)."""
    return objectives(ablation_hooks(model, direction, norm_preserving=norm_preserving))


# ---------------------------------------------------------------------------------------------- the Pareto front

def _points(points: Any) -> torch.Tensor:
    p = torch.as_tensor(points, dtype=torch.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"points must be [n, objectives >= 2], got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError("points must be finite")
    return p


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when `a` is no worse than `b` in every objective and better in one (all minimised)."""
    a_, b_ = _points([a, b])
    return bool((a_ <= b_).all() and (a_ < b_).any())


def pareto_front(points: Any) -> list[int]:
    """Indices of the non-dominated rows of `points` `[n, k]` (every objective minimised), ordered by the first
    objective then the second. Equal points do not dominate each other: duplicates on the front are all kept."""
    p = _points(points)
    le = (p[:, None, :] <= p[None, :, :]).all(-1)  # [i, j]: i no worse than j everywhere
    lt = (p[:, None, :] < p[None, :, :]).any(-1)
    dominated = (le & lt).any(0)
    idx = torch.nonzero(~dominated).flatten().tolist()
    return sorted(idx, key=lambda i: tuple(p[i].tolist()) + (i,))


# -------------------------------------------------------------------------------------------------- the search

@dataclass
class Trial:
    """One search trial: its optuna `number`, the sampled `params` as optuna holds them, the `abliteration` they
    define and its `measurement`."""

    number: int
    params: dict[str, Any]
    abliteration: Abliteration
    measurement: Measurement

    def as_dict(self) -> dict[str, Any]:
        return dict(number=self.number, params=dict(self.params), abliteration=self.abliteration.as_dict(),
                    **self.measurement.as_dict())


@dataclass
class Frontier:
    """All trials of a search, its Pareto `front` (indices into `trials`, fewest refusals first), the un-ablated
    `baseline` and the search `settings` (space, sampler, seed, objectives)."""

    trials: list[Trial]
    front: list[int]
    baseline: Measurement
    settings: dict[str, Any] = field(default_factory=dict)

    def points(self) -> torch.Tensor:
        """`[trial, 2]` float64: (refusals, KL) of every trial."""
        return torch.tensor([[t.measurement.refusals, t.measurement.kl] for t in self.trials], dtype=torch.float64)

    def front_trials(self) -> list[Trial]:
        return [self.trials[i] for i in self.front]

    def as_dict(self) -> dict[str, Any]:
        return dict(settings=self.settings, baseline=self.baseline.as_dict(), front=list(self.front),
                    front_points=[[t.measurement.refusals, t.measurement.kl] for t in self.front_trials()],
                    trials=[t.as_dict() for t in self.trials])


@dataclass
class Comparison:
    """Where a point (refusals, KL) sits against a front: `dominated` by some trial (`dominating`: their trial
    numbers); `kl_at_refusals`: the least KL among trials with no more refusals than the point (None if none);
    `refusals_at_kl`: the fewest refusals among trials with no more KL (None if none)."""

    point: Measurement
    dominated: bool
    dominating: list[int]
    kl_at_refusals: float | None
    refusals_at_kl: int | None

    def as_dict(self) -> dict[str, Any]:
        return dict(point=self.point.as_dict(), dominated=self.dominated, dominating=list(self.dominating),
                    kl_at_refusals=self.kl_at_refusals, refusals_at_kl=self.refusals_at_kl)


def compare(point: Measurement, frontier: Frontier) -> Comparison:
    """Place `point` against every trial of `frontier` (the front holds every non-dominated one)."""
    if not frontier.trials:
        raise ValueError("the frontier has no trials")
    p = (float(point.refusals), float(point.kl))
    pts = frontier.points().tolist()
    dom = [frontier.trials[i].number for i, q in enumerate(pts) if dominates(q, p)]
    kls = [q[1] for q in pts if q[0] <= p[0]]
    refs = [int(q[0]) for q in pts if q[1] <= p[1]]
    return Comparison(point=point, dominated=bool(dom), dominating=dom, kl_at_refusals=min(kls) if kls else None,
                      refusals_at_kl=min(refs) if refs else None)


def _suggest(trial: Any, n_layers: int, placement: str, norm_preserving: bool) -> Abliteration:
    """Heretic's search space for a model of `n_layers` blocks (ranges in units of the last block index L - 1).

    direction_scope: global | per layer; direction_index in [0.4, 0.9] (L - 1), always sampled (multivariate TPE
    takes no conditional parameters); per component: max_weight in [0.8, 1.5] ("mlp": [-0.25, 1.5] clamped at 0,
    so the MLP can be left alone with positive probability), max_weight_position in [0.6, 1.0] (L - 1), min_weight
    a fraction [0, 1] of max_weight, min_weight_distance in [1, max(0.6 (L - 1), 1)]. The "resid" component of the
    inputs placement takes the attention ranges.
    """
    last = n_layers - 1
    scope = trial.suggest_categorical("direction_scope", list(SCOPES))
    index = trial.suggest_float("direction_index", 0.4 * last, 0.9 * last)
    kernels = {}
    for comp in PLACEMENTS[placement]:
        max_w = max(0.0, trial.suggest_float(f"{comp}.max_weight", -0.25 if comp == "mlp" else 0.8, 1.5))
        pos = trial.suggest_float(f"{comp}.max_weight_position", 0.6 * last, 1.0 * last)
        min_frac = trial.suggest_float(f"{comp}.min_weight", 0.0, 1.0)
        dist = trial.suggest_float(f"{comp}.min_weight_distance", 1.0, max(0.6 * last, 1.0))
        kernels[comp] = Kernel(max_weight=max_w, max_weight_position=pos, min_weight=min_frac * max_w,
                               min_weight_distance=dist)
    return Abliteration(kernels=kernels, direction_index=index if scope == "global" else None, placement=placement,
                        norm_preserving=norm_preserving)


def search(model: Any, stack: DirectionStack, objectives: Objectives, *, n_trials: int = 200,
           n_startup_trials: int = 60, seed: int = 0, placement: str = "writes", norm_preserving: bool = False,
           progress: bool = True) -> Frontier:
    """Multi-objective TPE over Heretic's space (`_suggest`), minimising (refusals, KL) by `objectives`.

    The sampler is Heretic's: `optuna.samplers.TPESampler(n_startup_trials, n_ei_candidates=128, multivariate=True,
    seed=seed)`; defaults n_trials=200, n_startup_trials=60 as Heretic's. The same seed, model and sets give the
    same trials.
    """
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
    if not isinstance(n_startup_trials, int) or n_startup_trials < 0:
        raise ValueError(f"n_startup_trials must be a non-negative integer, got {n_startup_trials!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}: one of {list(PLACEMENTS)}")
    n_layers = int(model.cfg.n_layers)
    if stack.n_layers != n_layers or stack.vectors.shape[1] != int(model.cfg.d_model):
        raise ValueError(f"the direction stack is [{stack.n_layers + 1}, {stack.vectors.shape[1]}], the model has "
                         f"{n_layers} layers of width {model.cfg.d_model}")
    if objectives.model is not model:
        raise ValueError("the objectives were built for another model")
    try:
        import optuna
    except ImportError as exc:
        raise ImportError("the frontier search needs optuna (a dependency of probes): pip install optuna") from exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate TPE is "experimental"
        sampler = optuna.samplers.TPESampler(n_startup_trials=n_startup_trials, n_ei_candidates=128,
                                             multivariate=True, seed=seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    trials: list[Trial] = []
    for _ in tqdm(range(n_trials), desc="frontier search", disable=not progress, leave=False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ot = study.ask()
            abl = _suggest(ot, n_layers, placement, norm_preserving)
        m = objectives(abl.hooks(model, stack))
        study.tell(ot, [float(m.refusals), m.kl])
        trials.append(Trial(number=ot.number, params=dict(ot.params), abliteration=abl, measurement=m))
    settings = dict(n_trials=n_trials, n_startup_trials=n_startup_trials, seed=seed, placement=placement,
                    norm_preserving=norm_preserving, sampler="optuna TPESampler(multivariate=True, n_ei_candidates=128)",
                    optuna=optuna.__version__, position=stack.position, projected=stack.projected,
                    final_norm=stack.final_norm,
                    **objectives.settings())
    front = pareto_front([[t.measurement.refusals, t.measurement.kl] for t in trials])
    return Frontier(trials=trials, front=front, baseline=objectives.baseline, settings=settings)


def remeasure(model: Any, stack: DirectionStack, frontier: Frontier, objectives: Objectives,
              trials: Sequence[int] | None = None) -> dict[int, Measurement]:
    """`{trial number: Measurement}` of some trials (default: the front) under other `objectives` (e.g.
    `refusal="judge"` on the same or held-out sets)."""
    chosen = frontier.front_trials() if trials is None else [t for t in frontier.trials if t.number in set(trials)]
    return {t.number: objectives(t.abliteration.hooks(model, stack)) for t in chosen}
