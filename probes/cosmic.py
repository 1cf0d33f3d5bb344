"""Output-free refusal-direction selection: COSMIC (Siu et al., ACL Findings 2025, "COSMIC: Generalized Refusal
Direction Identification in LLM Activations").

The candidates are Arditi et al.'s (`probes.refusal.candidates`: harmful - harmless mean of `resid_pre` at every
layer x post-instruction position). COSMIC chooses among them by cosine similarity in activation space, so it needs
no refusal tokens and no judge:

1. `evaluation_layers`: on the train sets, the cosine between the harmful and the harmless mean hidden state of the
   last token at every layer; the `int(0.1 n_layers)` layers with the LOWEST cosine (where the two sets differ
   most in direction) are the layers COSMIC compares, L_low.
2. `sweep`: for every candidate r (at layer l, offset p), on the val sets, with h̄ the mean over prompts and over
   the layers of L_low of the last token's hidden state:
   ablate = cos(h̄(harmful val, r̂ ablated), h̄(harmless val)), add = cos(h̄(harmless val, r added at l),
   h̄(harmful val)), and the first-token KL(harmless || harmless with r̂ ablated). The score is ablate + add (at
   most 2): ablating the direction makes harmful look harmless, adding it makes harmless look harmful.
3. `select`: the highest score among candidates with layer < int(0.8 n_layers), KL <= 0.1 and, at the last
   position only, COSMIC's peak rule (below).
4. `compare`: COSMIC's choice against Arditi et al.'s (`refusal.sweep` + `refusal.select`) on held-out prompts.

Hidden states are HF's `output_hidden_states[l + 1]`, what the reference code reads: `resid_post` of block l,
after the final norm for the last block. Every number here matches the reference code (`pipeline/submodules/
select_direction_cosmic.py` and `run_pipeline_cosmic.py` of wang-research-lab/COSMIC, linear mode) except these
named departures:
- L_low keeps at least one layer (the reference's `int(0.1 n_layers)` is 0 below 10 layers, which leaves nothing
  to compare).
- KL is the exact KL of the two softmaxes (`refusal.first_token_kl`, as in `refusal.sweep`); the reference adds
  1e-6 to both probabilities inside the logs.
- `positions` may compare other tokens than the last (mean over them too); the default is the reference's.
- `ablation="affine"` ablates as `refusal.sweep` does (Marshall et al.'s edit from the candidate's layer on) and
  keeps the plain addition; the reference's affine mode edits one layer and adds relative to the harmless mean.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from probes import checkpoints
from probes.activations import _StopForward, check_fits, forward, last_logits
from probes.chat import ChatBatch
from probes.directions import addition_hooks, cosine
from probes.refusal import (ABLATIONS, Candidates, NoDirectionFound, Selection, evaluate, first_token_kl,
                            layer_cutoff, rates)

DEFAULT_POSITIONS = "post_instruction[-1]"  # the reference compares the last prompt token only

Hooks = Sequence[tuple[str, Any]]


# ------------------------------------------------------------------------------------------------- hidden states

def _check_batch(batch: ChatBatch, positions: str | int | Sequence[str | int], what: str) -> None:
    if len(batch) == 0:
        raise ValueError(f"COSMIC needs a non-empty {what} set")
    batch.positions(positions)  # a bad spec fails here, before any forward


def _check_layers(layers: Sequence[int], n_layers: int, what: str = "evaluation layers") -> list[int]:
    out = [int(x) for x in layers]
    if not out:
        raise ValueError(f"no {what} given")
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"{what} {bad} out of range for a {n_layers}-layer model")
    if len(set(out)) < len(out):
        raise ValueError(f"{what} {out} name a layer twice")
    return out


def hidden_means(model: Any, batch: ChatBatch, layers: Sequence[int], hooks: Hooks = (), *,
                 positions: str | int | Sequence[str | int] = DEFAULT_POSITIONS, batch_size: int = 16) -> torch.Tensor:
    """Mean hidden state `[len(layers), d_model]` float64 over prompts and `positions`, with `hooks` active.

    The hidden state of layer l is HF's `hidden_states[l + 1]`: `blocks.{l}.hook_resid_post`, passed through the
    final norm for the last layer. The forward stops after the deepest requested block.
    """
    n_layers = int(model.cfg.n_layers)
    layers = _check_layers(layers, n_layers)
    _check_batch(batch, positions, "prompt")
    check_fits(model, batch)
    total = torch.zeros(len(layers), int(model.cfg.d_model), dtype=torch.float64)
    deepest = f"blocks.{max(layers)}.hook_resid_post"
    for _, sub in batch.chunks(batch_size):
        idx = sub.positions(positions)[0]
        got: dict[int, torch.Tensor] = {}

        def grab(resid: torch.Tensor, hook: Any, li: int) -> None:
            rows = torch.arange(resid.shape[0], device=resid.device)[:, None]
            got[li] = resid[rows, idx.to(resid.device)]  # [b, k, d_model]

        def stop(resid: torch.Tensor, hook: Any) -> None:
            raise _StopForward

        # Registered after the caller's hooks, so they read the residual those hooks left.
        fwd = [*hooks, *[(f"blocks.{layer}.hook_resid_post", lambda r, hook, li=li: grab(r, hook, li))
                         for li, layer in enumerate(layers)], (deepest, stop)]
        with model.hooks(fwd_hooks=fwd):
            try:
                forward(model, sub, return_type=None)
            except _StopForward:
                pass
        for li, layer in enumerate(layers):
            x = got[li]
            if layer == n_layers - 1:  # HF's last hidden state is after the final norm
                with torch.no_grad():
                    x = model.ln_final(x)
            x = x.double().cpu()
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(f"non-finite hidden state at layer {layer}")
            total[li] += x.sum((0, 1))
    return total / (len(batch) * len(batch.positions(positions)[1]))


def _unit_mean(means: torch.Tensor) -> torch.Tensor:
    """The unit vector of the mean over layers of `[layer, d_model]` per-layer means (the reference's pooling)."""
    v = means.mean(0)
    return v / v.norm().clamp_min(1e-300)


# ------------------------------------------------------------------------------------------------- L_low

@dataclass
class EvaluationLayers:
    """The layers COSMIC compares: `layers` (lowest cosine first), from `cosine` `[n_layers]` float64, the cosine of
    the harmful and the harmless mean hidden state at each layer, keeping `max(1, int(frac * n_layers))`."""

    layers: list[int]
    cosine: torch.Tensor
    frac: float
    positions: str | int | list = DEFAULT_POSITIONS

    def as_dict(self) -> dict[str, Any]:
        return dict(layers=list(self.layers), cosine=self.cosine.tolist(), frac=self.frac,
                    ranked=torch.argsort(self.cosine, stable=True).tolist(), positions=self.positions)


def evaluation_layers(model: Any, harmful: ChatBatch, harmless: ChatBatch, *, frac: float = 0.1,
                      positions: str | int | Sequence[str | int] = DEFAULT_POSITIONS, batch_size: int = 16,
                      progress: bool = True) -> EvaluationLayers:
    """L_low: the `max(1, int(frac * n_layers))` layers where the harmful and harmless mean hidden states (on the
    TRAIN sets, as the reference) have the lowest cosine. Every layer is ranked, including those above the
    selection's layer cut-off."""
    if not (isinstance(frac, (int, float)) and 0 < frac <= 1):
        raise ValueError(f"frac must be in (0, 1], got {frac!r}")
    _check_batch(harmful, positions, "harmful")
    _check_batch(harmless, positions, "harmless")
    n = int(model.cfg.n_layers)
    every = list(range(n))
    means = [hidden_means(model, b, every, positions=positions, batch_size=batch_size)
             for b in tqdm((harmful, harmless), desc="COSMIC layers", disable=not progress, leave=False)]
    cos = cosine(means[0], means[1])  # [n_layers]
    k = max(1, int(frac * n))
    ranked = torch.argsort(cos, stable=True).tolist()
    return EvaluationLayers(layers=ranked[:k], cosine=cos, frac=float(frac),
                            positions=list(positions) if isinstance(positions, (list, tuple)) else positions)


# ------------------------------------------------------------------------------------------------- the sweep

@dataclass
class CosmicSweep:
    """Per-candidate COSMIC terms on the validation sets, each `[layer, position]` float64 (NaN: not scored).

    ablate: cos(h̄ harmful val with the candidate ablated, h̄ harmless val); add: cos(h̄ harmless val with its raw
    difference added at its layer, h̄ harmful val); kl: mean first-token KL(baseline || ablated) on harmless val.
    baseline: cos(h̄ harmful val, h̄ harmless val) un-intervened, the value both terms start from.
    """

    ablate: torch.Tensor
    add: torch.Tensor
    kl: torch.Tensor
    layers: list[int]
    offsets: list[int]
    eval_layers: list[int]
    baseline: float
    positions: str | int | list = DEFAULT_POSITIONS
    ablation: str = "directional"

    @property
    def score(self) -> torch.Tensor:
        """COSMIC's score `[layer, position]`: ablate + add."""
        return self.ablate + self.add

    def as_dict(self) -> dict[str, Any]:
        return dict(ablate=_grid(self.ablate), add=_grid(self.add), kl=_grid(self.kl), score=_grid(self.score),
                    layers=list(self.layers), offsets=list(self.offsets), eval_layers=list(self.eval_layers),
                    baseline=self.baseline, positions=self.positions, ablation=self.ablation)


def _grid(t: torch.Tensor) -> list[list[float | None]]:
    """A `[layer, position]` tensor as nested lists with NaN as None (strict JSON)."""
    return [[float(v) if math.isfinite(v) else None for v in row] for row in t.tolist()]


def sweep(model: Any, cands: Candidates, harmful_val: ChatBatch, harmless_val: ChatBatch,
          eval_layers: EvaluationLayers | Sequence[int], *, positions: str | int | Sequence[str | int] | None = None,
          ablation: str = "directional", batch_size: int = 16, progress: bool = True) -> CosmicSweep:
    """Score every candidate (three forward passes each on the val sets), no refusal tokens involved.

    eval_layers: an `evaluation_layers` result (its positions are used unless `positions` is given) or layer
    indices. ablation: "directional" (Arditi et al.'s, from every residual write) or "affine" (`Candidates.ablation`).
    Zero or non-finite candidates (resid_pre of block 0 under a chat template) are left NaN.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}: one of {ABLATIONS}")
    if positions is None:
        positions = eval_layers.positions if isinstance(eval_layers, EvaluationLayers) else DEFAULT_POSITIONS
    layers = eval_layers.layers if isinstance(eval_layers, EvaluationLayers) else eval_layers
    layers = _check_layers(layers, int(model.cfg.n_layers))
    _check_batch(harmful_val, positions, "harmful validation")
    _check_batch(harmless_val, positions, "harmless validation")
    if cands.diff.ndim != 3 or cands.diff.shape[-1] != int(model.cfg.d_model):
        raise ValueError(f"candidates of shape {tuple(cands.diff.shape)} do not fit a model of d_model "
                         f"{model.cfg.d_model}")
    kw = dict(positions=positions, batch_size=batch_size)
    base_harm = _unit_mean(hidden_means(model, harmful_val, layers, **kw))
    base_less = _unit_mean(hidden_means(model, harmless_val, layers, **kw))
    base_logits = last_logits(model, harmless_val, batch_size=batch_size)
    shape = (len(cands.layers), len(cands.offsets))
    abl_s, add_s, kl_s = (torch.full(shape, math.nan, dtype=torch.float64) for _ in range(3))
    grid = [(li, pi) for li in range(shape[0]) for pi in range(shape[1])]
    for li, pi in tqdm(grid, desc=f"COSMIC sweep {cands.model}", disable=not progress, leave=False):
        raw = cands.diff[li, pi]
        if not bool(torch.isfinite(raw).all()) or float(raw.norm()) == 0:
            continue  # no direction: never selected

        def one(raw: torch.Tensor = raw, layer: int = cands.layers[li], offset: int = cands.offsets[pi]
                ) -> dict[str, torch.Tensor]:
            abl = cands.ablation(model, layer, offset, ablation)
            add = addition_hooks(model, raw, layer)
            h_abl = _unit_mean(hidden_means(model, harmful_val, layers, abl, **kw))
            h_add = _unit_mean(hidden_means(model, harmless_val, layers, add, **kw))
            kl = first_token_kl(base_logits, last_logits(model, harmless_val, abl, batch_size=batch_size)).mean()
            return {"ablate": h_abl @ base_less, "add": h_add @ base_harm, "kl": kl}

        # A scored candidate is kept in the active run's store, so an interrupted sweep resumes after it.
        key = dict(layer=cands.layers[li], eval_layers=layers, positions=positions, ablation=ablation)
        inputs = [raw, harmful_val.input_ids, harmful_val.attention_mask, harmless_val.input_ids,
                  harmless_val.attention_mask]
        if ablation == "affine":
            inputs.append(cands.harmless_mean[li:, pi])
        got = checkpoints.chunk("cosmic_sweep", model, key, inputs, one)
        abl_s[li, pi], add_s[li, pi], kl_s[li, pi] = got["ablate"], got["add"], got["kl"]
    pos_label = list(positions) if isinstance(positions, (list, tuple)) else positions
    return CosmicSweep(abl_s, add_s, kl_s, list(cands.layers), list(cands.offsets), layers,
                       float(base_harm @ base_less), pos_label, ablation)


# ------------------------------------------------------------------------------------------------- selection

@dataclass
class CosmicSelection:
    """COSMIC's choice, shaped like `refusal.Selection`: `layer`, post-instruction `offset`, their indices, plus
    `score` (its ablate + add), the full score grid `scores` `[layer, position]` (NaN: not scored), `passed`
    `[layer, position]` bool, and `ranking`: every passing candidate, best first, as `{layer, position, score,
    ablate, add, kl}`. criteria: the thresholds, the cut-off and the last-position peaks."""

    layer: int
    offset: int
    layer_index: int
    position_index: int
    score: float
    scores: torch.Tensor
    passed: torch.Tensor
    ranking: list[dict[str, Any]]
    layers: list[int]
    offsets: list[int]
    eval_layers: list[int]
    criteria: dict[str, Any] = field(default_factory=dict)
    fallback: bool = False  # COSMIC has no fallback; here for parity with `refusal.Selection`

    def as_dict(self) -> dict[str, Any]:
        return dict(layer=self.layer, position=self.offset, score=self.score, n_passed=int(self.passed.sum()),
                    eval_layers=list(self.eval_layers), criteria=self.criteria, ranking=self.ranking,
                    scores=_grid(self.scores), layers=list(self.layers), offsets=list(self.offsets))

    def rank_of(self, layer: int, offset: int) -> int | None:
        """1-based rank of a candidate among those that passed, or None when it did not pass."""
        for i, r in enumerate(self.ranking, start=1):
            if (r["layer"], r["position"]) == (layer, offset):
                return i
        return None


def _lower_median(values: list[int]) -> int | None:
    """torch.median's median: the lower of the two middle values; None for no values."""
    return sorted(values)[(len(values) - 1) // 2] if values else None


def select(scores: CosmicSweep, n_layers: int, *, max_layer_frac: float = 0.8, kl_max: float = 0.1,
           cutoff: str = "reference", peak_rule: bool = True) -> CosmicSelection:
    """The highest COSMIC score among candidates with layer < the cut-off (`refusal.layer_cutoff`: `int(0.8 n)`),
    finite terms and KL <= `kl_max`, the reference's filters.

    peak_rule (the reference's, on by default): for each position but the last, the layer where its ablate term
    peaks (argmax over all layers), and likewise for add; a candidate at the last position is dropped when its
    layer is above both medians (the lower median, as torch's). With one position the rule does nothing.
    Raises NoDirectionFound (a ValueError) when no candidate passes.
    """
    if not isinstance(n_layers, int) or n_layers < 1 or max(scores.layers) >= n_layers:
        raise ValueError(f"n_layers {n_layers!r} does not hold the candidates' layers {scores.layers}")
    bound = layer_cutoff(n_layers, max_layer_frac, cutoff)
    score = scores.score
    layer_ok = torch.tensor([layer < bound for layer in scores.layers])[:, None]
    finite = torch.isfinite(scores.ablate) & torch.isfinite(scores.add) & torch.isfinite(scores.kl)
    passed = layer_ok & finite & (scores.kl <= kl_max)
    criteria: dict[str, Any] = dict(max_layer_frac=max_layer_frac, cutoff=cutoff, layer_bound=bound, kl_max=kl_max,
                                    peak_rule=peak_rule)
    if peak_rule and len(scores.offsets) > 1:
        def peaks(t: torch.Tensor) -> list[int]:
            return [scores.layers[int(i)] for i in torch.nan_to_num(t[:, :-1], nan=-math.inf).argmax(0)]

        limit_ablate, limit_add = _lower_median(peaks(scores.ablate)), _lower_median(peaks(scores.add))
        late = torch.tensor([layer > limit_ablate and layer > limit_add for layer in scores.layers])
        passed[:, -1] &= ~late
        criteria |= dict(peak_ablate=limit_ablate, peak_add=limit_add)
    if not bool(passed.any()):
        raise NoDirectionFound(f"no candidate passes COSMIC's filters (layer < {bound:g} [{cutoff} cut-off of "
                               f"{max_layer_frac} x {n_layers}], KL <= {kl_max}"
                               + (", the last-position peak rule)" if peak_rule else ")"))
    masked = score.masked_fill(~passed, -math.inf)
    order = [int(i) for i in torch.argsort(masked.flatten(), descending=True, stable=True)[: int(passed.sum())]]
    width = masked.shape[1]
    ranking = [dict(layer=scores.layers[i // width], position=scores.offsets[i % width],
                    score=float(score.flatten()[i]), ablate=float(scores.ablate.flatten()[i]),
                    add=float(scores.add.flatten()[i]), kl=float(scores.kl.flatten()[i])) for i in order]
    li, pi = divmod(order[0], width)
    return CosmicSelection(layer=scores.layers[li], offset=scores.offsets[pi], layer_index=li, position_index=pi,
                           score=float(score[li, pi]), scores=score.clone(), passed=passed, ranking=ranking,
                           layers=list(scores.layers), offsets=list(scores.offsets),
                           eval_layers=list(scores.eval_layers), criteria=criteria)


# ------------------------------------------------------------------------------------------------- vs Arditi et al.

@dataclass
class Comparison:
    """COSMIC's choice against Arditi et al.'s on held-out prompts.

    cosmic, arditi: `{layer, position}`; same: whether they are the same candidate; cosine: of the two chosen
    directions; cosmic_score_of_arditi / arditi_rank_in_cosmic: Arditi's candidate in COSMIC's grid and ranking
    (rank None: it did not pass COSMIC's filters); reports: `{"cosmic": ..., "arditi": ...}`, each a
    `refusal.evaluate` report (ablation on harmful test, addition on harmless test, the same un-intervened
    baseline in both).
    """

    cosmic: dict[str, int]
    arditi: dict[str, int]
    same: bool
    cosine: float
    cosmic_score_of_arditi: float | None
    arditi_rank_in_cosmic: int | None
    reports: dict[str, dict[str, Any]]

    def rates(self, judge: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
        """`{method: {harmful: {baseline, ablated}, harmless: {baseline, added}}}` (`refusal.rates`)."""
        return {k: rates(r, judge) for k, r in self.reports.items()}

    def score_means(self) -> dict[str, dict[str, dict[str, float]]]:
        """`{method: {harmful: {baseline, ablated}, harmless: {baseline, added}}}` mean refusal scores."""
        return {k: {kind: {c: v["score_mean"] for c, v in r[kind].items()} for kind in ("harmful", "harmless")}
                for k, r in self.reports.items()}

    def as_dict(self) -> dict[str, Any]:
        return dict(cosmic=self.cosmic, arditi=self.arditi, same=self.same, cosine=self.cosine,
                    cosmic_score_of_arditi=self.cosmic_score_of_arditi,
                    arditi_rank_in_cosmic=self.arditi_rank_in_cosmic, rates=self.rates(),
                    rates_extended=self.rates("extended"), score_means=self.score_means(),
                    kl_harmless_ablation={k: r["kl_harmless_ablation"] for k, r in self.reports.items()},
                    reports=self.reports)


def compare(model: Any, cands: Candidates, cosmic_choice: CosmicSelection, arditi_choice: Selection,
            harmful_test: ChatBatch, harmless_test: ChatBatch, token_ids: Sequence[int], *,
            ablation: str = "directional", max_new_tokens: int = 16, batch_size: int = 16,
            judge: str | Sequence[str] = "reference", progress: bool = True) -> Comparison:
    """Both choices from the same candidates, evaluated through `refusal.evaluate` on the test sets: `ablation`
    (`Candidates.ablation`) on harmful and harmless, the raw difference added at its layer on harmless.

    arditi_choice: `refusal.select(refusal.sweep(model, cands, harmful_val, harmless_val, token_ids), n_layers)`
    on the same validation sets COSMIC was swept on. `token_ids` are needed here only for the refusal-score
    means of the evaluation, never for COSMIC's choice.
    """
    if len(harmful_test) == 0 or len(harmless_test) == 0:
        raise ValueError("the comparison needs non-empty harmful and harmless test sets")
    picks = {"cosmic": (cosmic_choice.layer, cosmic_choice.offset), "arditi": (arditi_choice.layer,
                                                                              arditi_choice.offset)}
    dirs = {k: cands.direction(layer, offset) for k, (layer, offset) in picks.items()}  # ValueError if absent
    same = picks["cosmic"] == picks["arditi"]
    reports: dict[str, dict[str, Any]] = {}
    for k, (layer, offset) in picks.items():
        if k == "arditi" and same:
            reports[k] = reports["cosmic"]
            continue
        rep = evaluate(model, harmful_test, harmless_test, token_ids,
                       ablation=cands.ablation(model, layer, offset, ablation),
                       addition=addition_hooks(model, dirs[k].raw, layer), baseline=not reports,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, judge=judge, progress=progress)
        if reports:  # one un-intervened baseline for both
            first = reports["cosmic"]
            rep["harmful"] = {"baseline": first["harmful"]["baseline"], **rep["harmful"]}
            rep["harmless"] = {"baseline": first["harmless"]["baseline"], **rep["harmless"]}
        reports[k] = rep
    la, oa = picks["arditi"]
    if la in cosmic_choice.layers and oa in cosmic_choice.offsets:
        v = float(cosmic_choice.scores[cosmic_choice.layers.index(la), cosmic_choice.offsets.index(oa)])
        score_of_arditi = v if math.isfinite(v) else None
    else:
        score_of_arditi = None
    return Comparison(cosmic=dict(layer=picks["cosmic"][0], position=picks["cosmic"][1]),
                      arditi=dict(layer=la, position=oa), same=same,
                      cosine=float(cosine(dirs["cosmic"].raw, dirs["arditi"].raw)),
                      cosmic_score_of_arditi=score_of_arditi, arditi_rank_in_cosmic=cosmic_choice.rank_of(la, oa),
                      reports=reports)
