"""Safety heads: attention heads ranked by their causal effect on the refusal score, not by how their attention moves.

An attention shift says where a head looks; it does not say whether what the head writes matters for refusal. The
ranking here is causal, in three measurements of the same quantity at different costs:

- `head_attribution`: attribution patching (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms
  Automated Circuit Discovery") of every head's output `blocks.{l}.attn.hook_z` (`[batch, pos, head, d_head]`, the
  input of the output projection). For harmful prompts, the first-order change in the refusal score when a head's
  output at the post-instruction positions takes its harmless mean: `grad · (harmless mean - harmful value)`,
  summed over those positions and `d_head`, for every layer x head from one forward and one backward per batch.
- `template_patching`: the true value of that change, head by head (`probes.attention.head_patching`): the
  template-region patching of Leong et al. (ACL 2025, TASA), harmless -> harmful, one forward per head. It is the
  check of the attribution (`agreement`: rank correlation, top-k overlap, largest error).
- `head_ablation`: Ships-style ablation (Zhou et al., ICLR 2025): a head's output zeroed, or set to its mean over
  reference prompts, at every position (generated tokens included), and the change in refusal score and judged
  refusal rate; `minimal_ablation_set`: the shortest prefix of a ranking whose ablation removes refusal.

Scores follow `PatchResult`: patched minus clean, so a head that carries refusal has a negative score; rankings
put the most negative first (`by="neg"`). `overlap` compares two models' (or two methods') rankings.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from probes import attention as A
from probes.activations import PositionSpec, check_fits, forward, last_logits, model_device
from probes.chat import ChatBatch
from probes.generation import generate
from probes.refusal import first_token_kl, refusal_rate

Head = tuple[int, int]
ScoreFn = Callable[[torch.Tensor], torch.Tensor]
ABLATIONS: tuple[str, ...] = ("mean", "zero")


def all_heads(model: Any) -> list[Head]:
    """Every (layer, head) of `model`, layer-major."""
    return [(layer, h) for layer in range(int(model.cfg.n_layers)) for h in range(int(model.cfg.n_heads))]


def _sem(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    n = x.shape[dim]
    if n < 2:
        return torch.zeros_like(x.select(dim, 0))
    return x.std(dim, unbiased=True) / n**0.5


# -------------------------------------------------------------------------------------------- attribution

@dataclass
class Attribution:
    """Attribution-patching estimate of each head's effect on the score.

    per_prompt: `[prompt, layer, head]` float64, the estimated change in each prompt's score (patched - clean);
    clean: `[prompt]` float64 scores without patching; positions: the patched query labels.
    """

    per_prompt: torch.Tensor
    clean: torch.Tensor
    positions: list[str]
    model: str

    @property
    def scores(self) -> torch.Tensor:
        """`[layer, head]` float64 mean over prompts."""
        return self.per_prompt.mean(0)

    def sem(self) -> torch.Tensor:
        """`[layer, head]` float64 standard error over prompts."""
        return _sem(self.per_prompt)

    def ranking(self, k: int | None = None) -> list[tuple[int, int, float]]:
        """Heads by estimated effect, most negative (carries the most refusal) first."""
        return A.rank_heads(self.scores, k, by="neg")


def head_attribution(
    model: Any, target: ChatBatch, source: ChatBatch, score_fn: ScoreFn, *,
    positions: PositionSpec = "post_instruction", steps: int = 1, batch_size: int = 16, progress: bool = True,
    model_name: str | None = None,
) -> Attribution:
    """Attribution patching of every head's `hook_z` at the template `positions` of `target`, towards the mean over
    `source` at the same offsets (the linear estimate of `head_patching` of each head alone).

    score_fn maps `[batch, vocab]` logits at the last prompt token to `[batch]` scores and must be differentiable
    (`probes.attention.logodds_score` is). One forward and one backward per batch of `target`; the weights get no
    gradient (only the activations are differentiated).

    steps: 1 is attribution patching proper, the gradient at the harmful activations. steps > 1 averages the
    gradient at `steps` midpoints of the straight path from the harmful outputs to the harmless means, all heads
    moved together (integrated gradients over the joint patch, as EAP-IG, Hanna et al. 2024, does for edges):
    `steps` more forward and backward passes, and first-order errors from saturation are averaged out.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if len(target) == 0 or len(source) == 0:
        raise ValueError("empty target or source batch")
    check_fits(model, target)
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers))
    means, labels = A.mean_z(model, source, layers, positions, batch_size=batch_size, progress=progress)
    if target.positions(positions)[1] != labels:
        raise ValueError(f"target positions {target.positions(positions)[1]} differ from source positions {labels}")
    means = means.to(model_device(model))  # [layer, k, head, d_head] float64
    alphas = [(i + 0.5) / steps for i in range(steps)]  # midpoints of the path (steps > 1)
    per_prompt, clean = [], []
    chunks = target.chunks(batch_size)
    for _, sub in tqdm(chunks, desc="head attribution", disable=not progress or len(chunks) < 2, leave=False):
        pos, sub_labels = sub.positions(positions)
        if sub_labels != labels:
            raise ValueError(f"positions {positions!r} select {sub_labels} in one chunk but {labels} in the batch")
        pos = pos.to(model_device(model))
        rows = torch.arange(len(sub), device=pos.device)[:, None]
        z0: dict[int, torch.Tensor] = {}  # [b, k, head, d_head] float64: the unpatched outputs at `positions`
        grads, s0 = _z_gradients(model, sub, layers, rows, pos, z0, means, 0.0, score_fn)  # fills z0
        if steps > 1:
            path = [_z_gradients(model, sub, layers, rows, pos, z0, means, a, score_fn)[0] for a in alphas]
            grads = {layer: sum(g[layer] for g in path) / steps for layer in layers}
        out = torch.stack([(grads[layer] * (means[li][None] - z0[layer])).sum((1, 3)).cpu()
                           for li, layer in enumerate(layers)], 1)  # [b, layer, head]
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError("non-finite attribution: the gradient or the head outputs overflowed")
        per_prompt.append(out)
        clean.append(s0.detach().double().cpu())
    return Attribution(per_prompt=torch.cat(per_prompt), clean=torch.cat(clean), positions=labels,
                       model=model_name or str(model.cfg.model_name))


def _z_gradients(model: Any, sub: ChatBatch, layers: list[int], rows: torch.Tensor, pos: torch.Tensor,
                 z0: dict[int, torch.Tensor], means: torch.Tensor, alpha: float, score_fn: ScoreFn,
                 ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Gradient of the score with respect to every layer's `hook_z` at `pos` (`{layer: [b, k, head, d_head]}`
    float64) and the score. alpha 0: the unpatched run, which fills `z0`; alpha > 0: every head's output at
    `pos` set to `z0 + alpha (mean - z0)` (the path of the integrated-gradients variant)."""
    zs: dict[int, torch.Tensor] = {}

    def leaf(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        # A graph even when the weights are frozen; autograd.grad below leaves the weights' .grad untouched.
        return resid.detach().requires_grad_(True)

    def make_hook(li: int, layer: int):
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            # Returned, so this copy is what the output projection reads (the bridge may hand the hook a view and
            # go on with the unhooked tensor when the hook returns nothing).
            z = z.clone()
            if alpha:
                z[rows, pos] = (z0[layer] + alpha * (means[li][None] - z0[layer])).to(z.dtype)
            else:
                z0[layer] = z[rows, pos].detach().double()
            zs[layer] = z
            return z
        return fn

    hooks = [("blocks.0.hook_resid_pre", leaf)] + [(A.Z_HOOK.format(layer=layer), make_hook(li, layer))
                                                   for li, layer in enumerate(layers)]
    with torch.enable_grad():
        logits = last_logits(model, sub, hooks, batch_size=len(sub), grad=True)
        missing = [layer for layer in layers if layer not in zs]
        if missing:
            raise RuntimeError(f"hook_z did not fire for layers {missing}: this model exposes no per-head output")
        s = score_fn(logits)
        if s.shape != (len(sub),):
            raise ValueError(f"score_fn returned shape {tuple(s.shape)}, expected ({len(sub)},)")
        if not s.requires_grad:
            raise ValueError("score_fn is not differentiable (its output carries no gradient)")
        grads = torch.autograd.grad(s.sum(), [zs[layer] for layer in layers])
    return {layer: g[rows, pos].double() for layer, g in zip(layers, grads)}, s


# --------------------------------------------------------------------------------------- true patching

@dataclass
class HeadEffects:
    """True per-head effects: `[prompt, layer, head]` float64 changes in score (patched - clean) and clean scores."""

    per_prompt: torch.Tensor
    clean: torch.Tensor

    @property
    def scores(self) -> torch.Tensor:
        return self.per_prompt.mean(0)

    def sem(self) -> torch.Tensor:
        return _sem(self.per_prompt)


def template_patching(model: Any, target: ChatBatch, source: ChatBatch, score_fn: ScoreFn, *,
                      positions: PositionSpec = "post_instruction", heads: Sequence[Head] | None = None,
                      batch_size: int = 16, progress: bool = True) -> HeadEffects:
    """Every head's output on the template `positions` of `target` set to its mean over `source`, one head at a
    time (TASA-style, harmless -> harmful): the true values of `head_attribution`. Heads not in `heads` stay 0."""
    heads = all_heads(model) if heads is None else list(heads)
    res = A.head_patching(model, target, source, heads, positions=positions, score_fn=score_fn, individually=True,
                          batch_size=batch_size, progress=progress)
    out = torch.zeros(len(target), int(model.cfg.n_layers), int(model.cfg.n_heads), dtype=torch.float64)
    for (layer, h), s in res.per_head.items():
        out[:, layer, h] = s - res.clean
    return HeadEffects(per_prompt=out, clean=res.clean)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally shaped score tensors (average ranks for ties)."""
    x, y = a.flatten().double(), b.flatten().double()
    if x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need two score tensors of the same shape with 2+ entries, got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")

    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=v.dtype)
        for val in torch.unique(v):  # ties share their average rank
            tied = v == val
            if int(tied.sum()) > 1:
                r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.norm() * ry.norm()))
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def top_heads(scores: torch.Tensor, k: int) -> list[Head]:
    """The `k` heads with the most negative `[layer, head]` score (those that carry refusal)."""
    return [(layer, h) for layer, h, _ in A.rank_heads(scores, k, by="neg")]


def jaccard(a: Sequence[Head], b: Sequence[Head]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def agreement(estimate: torch.Tensor, truth: torch.Tensor, k: int) -> dict[str, Any]:
    """How well a `[layer, head]` estimate ranks heads as `truth` does: Spearman correlation, Jaccard overlap of
    the top-k (most negative) heads, and the largest absolute difference."""
    if estimate.shape != truth.shape:
        raise ValueError(f"shapes differ: {tuple(estimate.shape)} vs {tuple(truth.shape)}")
    return dict(spearman=rank_correlation(estimate, truth), top_k=k,
                top_k_jaccard=jaccard(top_heads(estimate, k), top_heads(truth, k)),
                max_abs_error=float((estimate - truth).abs().max()),
                mean_abs_truth=float(truth.abs().mean()))


def random_heads(model: Any, k: int, *, exclude: Sequence[Head] = (), seed: int = 0) -> list[Head]:
    """`k` distinct heads drawn uniformly (seeded) from those not in `exclude`: the control set."""
    pool = [h for h in all_heads(model) if h not in set(exclude)]
    if k > len(pool):
        raise ValueError(f"cannot draw {k} control heads from {len(pool)} heads outside the ranked ones")
    return sorted(random.Random(seed).sample(pool, k))


# ---------------------------------------------------------------------------------------------- ablation

def ablation_values(model: Any, heads: Sequence[Head], method: str = "mean", reference: ChatBatch | None = None, *,
                    batch_size: int = 16, progress: bool = True) -> dict[Head, torch.Tensor]:
    """The value each head's output takes when ablated: `{(layer, head): [d_head]}` float32.

    "zero": zeros. "mean": the head's output averaged over every real (non-pad) token of the `reference` prompts,
    the same vector at every position.
    """
    heads = A._check_heads(model, heads)
    d_head = int(model.cfg.d_head)
    if method == "zero":
        return {h: torch.zeros(d_head) for h in heads}
    if method != "mean":
        raise ValueError(f"ablation must be one of {ABLATIONS}, not {method!r}")
    if reference is None or len(reference) == 0:
        raise ValueError("mean ablation needs reference prompts")
    layers = sorted({layer for layer, _ in heads})
    n_heads = int(model.cfg.n_heads)
    sums = torch.zeros(len(layers), n_heads, d_head, dtype=torch.float64)
    count = 0
    n_layers = int(model.cfg.n_layers)
    chunks = reference.chunks(batch_size)
    for _, sub in tqdm(chunks, desc="mean head outputs", disable=not progress or len(chunks) < 2, leave=False):
        real = sub.attention_mask.bool().to(model_device(model))  # [b, seq]
        fired: set[int] = set()

        def make_hook(li: int, layer: int):
            def fn(z: torch.Tensor, hook: Any) -> None:
                sums[li] += z[real].double().sum(0).cpu()  # [n_real, head, d_head] -> [head, d_head]
                fired.add(layer)
            return fn

        stop = max(layers) + 1
        with model.hooks(fwd_hooks=[(A.Z_HOOK.format(layer=layer), make_hook(li, layer))
                                    for li, layer in enumerate(layers)]):
            forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
        A._check_fired(fired, layers, A.Z_HOOK)
        count += int(real.sum())
    if not bool(torch.isfinite(sums).all()):
        raise FloatingPointError("non-finite head outputs")
    means = sums / count
    return {(layer, h): means[layers.index(layer), h].float() for layer, h in heads}


def ablation_hooks(heads: Sequence[Head], values: dict[Head, torch.Tensor]) -> list[tuple[str, Callable]]:
    """Forward hooks that set `hook_z[:, :, head]` to `values[(layer, head)]` (`[d_head]`) at every position,
    including each generated token."""
    missing = [h for h in heads if h not in values]
    if missing:
        raise ValueError(f"no ablation values for heads {missing}")
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)

    def make_hook(layer: int):
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            for h in by_layer[layer]:
                z[:, :, h] = values[(layer, h)].to(z.device, z.dtype)
            return z
        return fn

    return [(A.Z_HOOK.format(layer=layer), make_hook(layer)) for layer in sorted(by_layer)]


@dataclass
class Ablated:
    """One ablation on one prompt set: `scores` `[prompt]` float64 refusal scores, and the judged responses."""

    heads: list[Head]
    scores: torch.Tensor
    clean: torch.Tensor
    rate: float | None = None
    texts: list[str] | None = None

    @property
    def effect(self) -> float:
        return float((self.scores - self.clean).mean())

    def sem(self) -> float:
        return float(_sem(self.scores - self.clean))

    @property
    def first_token_rate(self) -> float:
        """Fraction of prompts whose refusal score is > 0 (P(refusal token) > 1/2)."""
        return float((self.scores > 0).double().mean())

    def as_dict(self) -> dict[str, Any]:
        out = dict(heads=[list(h) for h in self.heads], effect=self.effect, effect_sem=self.sem(),
                   score_mean=float(self.scores.mean()), first_token_rate=self.first_token_rate)
        if self.rate is not None:
            out.update(refusal_rate=self.rate, examples=(self.texts or [])[:3])
        return out


def head_ablation(model: Any, batch: ChatBatch, heads: Sequence[Head], values: dict[Head, torch.Tensor],
                  score_fn: ScoreFn, *, clean: torch.Tensor | None = None, max_new_tokens: int = 0,
                  judge: str = "reference", batch_size: int = 16, progress: bool = True) -> Ablated:
    """Refusal scores of `batch` with `heads` ablated together (`values` from `ablation_values`); with
    `max_new_tokens` > 0 also greedy responses under the ablation and their judged refusal rate."""
    heads = A._check_heads(model, heads)
    if clean is None:
        clean = score_fn(last_logits(model, batch, batch_size=batch_size)).double()
    hooks = ablation_hooks(heads, values)
    scores = score_fn(last_logits(model, batch, hooks, batch_size=batch_size)).double()
    out = Ablated(heads=heads, scores=scores, clean=clean)
    if max_new_tokens > 0:
        gen = generate(model, batch, max_new_tokens, hooks, batch_size=batch_size, progress=progress)
        out.rate, out.texts = float(refusal_rate(gen.texts, judge)["rate"]), gen.texts
    return out


def judged_rate(model: Any, batch: ChatBatch, max_new_tokens: int, *, judge: str = "reference",
                batch_size: int = 16, progress: bool = True) -> tuple[float, list[str]]:
    """Judged refusal rate of `batch` without intervention, and the responses."""
    gen = generate(model, batch, max_new_tokens, batch_size=batch_size, progress=progress)
    return float(refusal_rate(gen.texts, judge)["rate"]), gen.texts


@dataclass
class MinimalSet:
    """The shortest prefix of a ranking whose ablation takes the first-token refusal rate to `threshold` or below
    (`heads` empty and `found` False when no prefix up to `tried` heads does); `rates[i]` is the rate with the
    first i + 1 heads ablated."""

    heads: list[Head]
    found: bool
    tried: int
    rates: list[float]
    threshold: float


def minimal_ablation_set(model: Any, batch: ChatBatch, ranking: Sequence[Head], values: dict[Head, torch.Tensor],
                         score_fn: ScoreFn, *, threshold: float = 0.1, max_heads: int | None = None,
                         batch_size: int = 16, progress: bool = True) -> MinimalSet:
    """Ablate the first 1, 2, ... heads of `ranking` until at most `threshold` of `batch` has refusal score > 0.

    First-token scores only (one forward per prefix); judge the set's responses with `head_ablation`.
    """
    ranking = A._check_heads(model, ranking)
    n = len(ranking) if max_heads is None else min(max_heads, len(ranking))
    rates: list[float] = []
    for i in tqdm(range(1, n + 1), desc="minimal head set", disable=not progress, leave=False):
        hooks = ablation_hooks(ranking[:i], values)
        rate = float((score_fn(last_logits(model, batch, hooks, batch_size=batch_size)) > 0).double().mean())
        rates.append(rate)
        if rate <= threshold:
            return MinimalSet(heads=ranking[:i], found=True, tried=i, rates=rates, threshold=threshold)
    return MinimalSet(heads=[], found=False, tried=n, rates=rates, threshold=threshold)


def harmless_kl(model: Any, batch: ChatBatch, hooks: list, *, batch_size: int = 16) -> float:
    """Mean first-token KL(clean ‖ intervened) over `batch`: what an intervention costs on prompts it should spare."""
    return float(first_token_kl(last_logits(model, batch, batch_size=batch_size),
                                last_logits(model, batch, hooks, batch_size=batch_size)).mean())
