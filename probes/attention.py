"""Attention mass from chosen query positions onto chat-template key regions, per layer x head.

The anchor is Leong et al. (ACL 2025): aligned models read harmfulness from the post-instruction template
region. `attention_mass` measures, for every layer and head, how much attention the chosen query tokens (e.g.
`post_instruction[-1]`, the last template token before the response) put on each key region (`bos`, `system`,
`template`, `user`, `post_instruction`, `response`). It reduces `blocks.{l}.attn.hook_pattern`
(`[batch, head, query, key]`) to `[batch, head, k, region]` inside the hook, one layer at a time, so no layer's
full pattern outlives its hook.

Conventions:
- Heads are QUERY heads: with grouped-query attention (Qwen2, Llama-3, Gemma-2) the bridge's pattern has one row
  per query head (`n_heads`), several of which share a key/value head.
- Key regions are the `ChatBatch` roles; pads belong to no region and must carry no attention (checked: a
  pattern that puts more than `PAD_TOLERANCE` on pad keys raises). Masked keys (causal, sliding window) are 0 in
  the pattern, so sliding-window layers simply give 0 to regions outside the window.
- BOS is its own region, so an attention sink on BOS shows up there instead of inflating a role; use
  `AttentionMass.without("bos")` for the share among the remaining regions. Templates without a BOS token
  (Qwen2's ChatML) sink on their first template token instead, which counts as `template`.

`head_patching` is the causal check: it overwrites chosen heads' outputs (`blocks.{l}.attn.hook_z`,
`[batch, pos, head, d_head]`, the input of the output projection) at the post-instruction positions of harmful
prompts with their mean over harmless prompts at the same offsets, and reports the change in refusal score.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.activations import PositionSpec, check_fits, resolve_layers, forward, last_logits, model_device, position_weights
from probes.chat import ROLE_ID, ChatBatch
from probes.refusal import refusal_score, refusal_tokens

REGIONS: tuple[str, ...] = ("bos", "system", "template", "user", "post_instruction", "response")
PATTERN_HOOK = "blocks.{layer}.attn.hook_pattern"
Z_HOOK = "blocks.{layer}.attn.hook_z"
# Attention on pad keys above this (per query row) means the padding leaks: a masking bug, never a rounding error.
PAD_TOLERANCE = 1e-4

Head = tuple[int, int]
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _layers(model: Any, layers: int | Sequence[int] | None) -> list[int]:
    return resolve_layers(layers, int(model.cfg.n_layers))


def _same_columns(labels: list[str], chunk_labels: list[str], spec: Any) -> None:
    # A slice such as "response[0:5]" is cut to the shortest row, so a chunk could select fewer columns.
    if chunk_labels != labels:
        raise ValueError(f"position spec {spec!r} selects {chunk_labels} in one chunk but {labels} in the whole "
                         "batch; use positions that every prompt has the same way")


def _check_fired(fired: set[int], layers: Sequence[int], hook: str) -> None:
    # An attention implementation that bypasses the bridge's hooks would otherwise leave the outputs unwritten.
    missing = [layer for layer in layers if layer not in fired]
    if missing:
        raise RuntimeError(f"{hook.format(layer=missing[0])} did not fire for layers {missing}: this model's "
                           "attention does not expose it")


def region_onehot(batch: ChatBatch, regions: Sequence[str] = REGIONS) -> torch.Tensor:
    """`[batch, seq, region]` float: 1 where the key token has that role; pads are all-zero rows."""
    bad = [r for r in regions if r not in ROLE_ID or r == "pad"]
    if bad:
        raise ValueError(f"unknown regions {bad}; regions are roles other than 'pad': {REGIONS}")
    return torch.stack([batch.role_mask(r) for r in regions], dim=-1).float()


@dataclass
class AttentionMass:
    """Attention mass of one model on one ChatBatch, by layer x query head x query position x key region.

    sums, sq_sums: `[layer, head, k, region]` float64 sums over `count` prompts of the mass and its square.
    per_prompt: `[prompt, layer, head, k, region]` float32, or None (recorded with `keep="mean"`).
    positions: a label for each of the k query positions. Each (layer, head, position) row sums to 1 over
    `REGIONS` (up to float rounding) when all regions are recorded.
    """

    layers: list[int]
    positions: list[str]
    regions: list[str]
    model: str
    count: int
    sums: torch.Tensor
    sq_sums: torch.Tensor
    per_prompt: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def full(self) -> torch.Tensor:
        """`[layer, head, k, region]` float64 mean over prompts."""
        return self.sums / self.count

    def mean(self) -> torch.Tensor:
        """`[layer, head, region]` float64: mean over prompts and over the k query positions."""
        return self.full.mean(2)

    def at(self, position: str | int) -> torch.Tensor:
        """`[layer, head, region]` float64 for one query position (its label, or its column index)."""
        return self.full[:, :, self._position_index(position)]

    def region(self, name: str, position: str | int | None = None) -> torch.Tensor:
        """`[layer, head]` float64 mass on region `name` (averaged over query positions unless one is named)."""
        m = self.mean() if position is None else self.at(position)
        return m[..., self._region_index(name)]

    def per_layer(self, position: str | int | None = None) -> torch.Tensor:
        """`[layer, region]` float64: the head-average of where the query tokens look."""
        m = self.mean() if position is None else self.at(position)
        return m.mean(1)

    def sem(self) -> torch.Tensor:
        """`[layer, head, k, region]` float64 standard error of the mean over prompts (0 for one prompt)."""
        if self.count < 2:
            return torch.zeros_like(self.sums)
        mean = self.full
        var = (self.sq_sums / self.count - mean**2).clamp(min=0) * self.count / (self.count - 1)
        return (var / self.count).sqrt()

    def without(self, *regions: str) -> AttentionMass:
        """The share among the other regions (e.g. `without("bos")` removes a BOS attention sink), renormalised
        per prompt so rows still sum to 1. Needs per-prompt masses (`keep="all"`)."""
        if self.per_prompt is None:
            raise ValueError("renormalising needs per-prompt masses: record with keep='all'")
        keep = [i for i, r in enumerate(self.regions) if r not in regions]
        unknown = [r for r in regions if r not in self.regions]
        if unknown or not keep:
            raise ValueError(f"cannot drop {regions} from regions {self.regions}")
        x = self.per_prompt[..., keep].double()
        x = x / x.sum(-1, keepdim=True).clamp(min=1e-12)
        return AttentionMass(self.layers, self.positions, [self.regions[i] for i in keep], self.model, self.count,
                             x.sum(0), (x**2).sum(0), x.float(), {**self.meta, "without": list(regions)})

    def _position_index(self, position: str | int) -> int:
        if isinstance(position, int):
            if not -len(self.positions) <= position < len(self.positions):
                raise ValueError(f"query position column {position} out of range ({len(self.positions)} recorded)")
            return position
        if position not in self.positions:
            raise ValueError(f"query position {position!r} was not recorded (recorded: {self.positions})")
        return self.positions.index(position)

    def _region_index(self, name: str) -> int:
        if name not in self.regions:
            raise ValueError(f"region {name!r} was not recorded (recorded: {self.regions})")
        return self.regions.index(name)


def attention_mass(
    model: Any,
    batch: ChatBatch,
    positions: PositionSpec = "post_instruction[-1]",
    layers: int | Sequence[int] | None = None,
    *,
    regions: Sequence[str] = REGIONS,
    batch_size: int = 16,
    keep: str = "mean",
    progress: bool = True,
    model_name: str | None = None,
) -> AttentionMass:
    """Attention mass from the query `positions` onto each key region, per layer x query head.

    positions: a `ChatBatch.positions` spec (`"post_instruction[-1]"`, `"post_instruction"` for all template
    tokens after the instruction, `"response[0:5]"`), `"mean(role)"`, or a list of these; each gives a query
    column. keep: `"mean"` keeps float64 sums; `"all"` also keeps `[prompt, layer, head, k, region]` float32.
    Raises ValueError on an empty batch, a bad spec or layer, or attention that leaks onto pad keys, and
    FloatingPointError on a non-finite pattern at a chosen query.
    """
    if keep not in ("all", "mean"):
        raise ValueError("keep must be 'all' or 'mean'")
    if len(batch) == 0:
        raise ValueError("empty batch")
    layers = _layers(model, layers)
    check_fits(model, batch)
    regions = list(regions)
    region_onehot(batch[:1], regions)  # validates the regions before any forward pass
    _, labels = position_weights(batch, positions)  # validates the spec on every row before any forward pass
    n_heads, device = int(model.cfg.n_heads), model_device(model)
    k, n_reg = len(labels), len(regions)
    sums = torch.zeros(len(layers), n_heads, k, n_reg, dtype=torch.float64)
    sq_sums = torch.zeros_like(sums)
    kept: list[torch.Tensor] = []
    stop = max(layers) + 1
    n_layers = int(model.cfg.n_layers)
    chunks = batch.chunks(batch_size)
    for _, sub in tqdm(chunks, desc=f"attention {model_name or model.cfg.model_name}",
                       disable=not progress or len(chunks) < 2, leave=False):
        q_weights, sub_labels = position_weights(sub, positions)  # [b, k, seq]
        _same_columns(labels, sub_labels, positions)
        # Only the query columns some prompt uses are read from the pattern (one column for "post_instruction[-1]",
        # which left padding aligns): the float copy is [b, head, n_cols, seq], never the whole pattern.
        cols = torch.nonzero(q_weights.sum((0, 1)) > 0).flatten().to(device)  # [n_cols]
        q_weights = q_weights[:, :, cols.cpu()].to(device)  # [b, k, n_cols]
        # Unselected query rows (pads included) are zeroed so that 0 * NaN there cannot leak into a selection.
        unselected = (q_weights.sum(1) == 0)[:, None, :, None]  # [b, 1, n_cols, 1]
        keys = region_onehot(sub, regions).to(device)  # [b, seq, region]
        pad_keys = sub.role_mask("pad").float().to(device)  # [b, seq]
        out = torch.empty(len(sub), len(layers), n_heads, k, n_reg)
        fired: set[int] = set()

        def make_hook(li: int, layer: int):
            def fn(pattern: torch.Tensor, hook: Any) -> None:
                if pattern.shape[1] != n_heads or pattern.shape[-1] != sub.seq_len:
                    raise ValueError(f"{hook.name}: pattern of shape {tuple(pattern.shape)}, expected "
                                     f"[batch, {n_heads}, {sub.seq_len}, {sub.seq_len}]")
                p = pattern.index_select(2, cols).float().masked_fill(unselected, 0.0)  # [b, head, n_cols, key]
                rows = torch.einsum("bkq,bhqs->bhks", q_weights, p)  # [b, head, k, key]
                if not bool(torch.isfinite(rows).all()):
                    raise FloatingPointError(f"non-finite attention pattern at layer {layer}")
                leak = torch.einsum("bhks,bs->bhk", rows, pad_keys)
                if float(leak.max()) > PAD_TOLERANCE:
                    raise ValueError(f"layer {layer}: {float(leak.max()):.3g} of the attention falls on pad "
                                     "tokens; the attention mask does not reach the model")
                out[:, li] = torch.einsum("bhks,bsr->bhkr", rows, keys).cpu()
                fired.add(layer)
            return fn

        fwd = [(PATTERN_HOOK.format(layer=layer), make_hook(li, layer)) for li, layer in enumerate(layers)]
        with model.hooks(fwd_hooks=fwd):
            forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
        _check_fired(fired, layers, PATTERN_HOOK)
        sums += out.double().sum(0)
        sq_sums += (out.double() ** 2).sum(0)
        if keep == "all":
            kept.append(out)
    meta = {"n_key_value_heads": getattr(model.cfg, "n_key_value_heads", None), "query_spec": str(positions)}
    return AttentionMass(layers=layers, positions=labels, regions=regions, model=model_name or str(model.cfg.model_name),
                         count=len(batch), sums=sums, sq_sums=sq_sums,
                         per_prompt=torch.cat(kept) if keep == "all" else None, meta=meta)


def attention_mass_pair(pair: Any, batch: ChatBatch, *args: Any, **kwargs: Any) -> dict[str, AttentionMass]:
    """`attention_mass` of both models of `pair` on the same tokens: {"base": ..., "instruct": ...}."""
    out = {}
    for which in ("base", "instruct"):
        with pair.on_device(which) as model:
            out[which] = attention_mass(model, batch, *args, model_name=f"{pair.name}/{which}", **kwargs)
    return out


def _check_comparable(a: AttentionMass, b: AttentionMass) -> None:
    for name in ("layers", "positions", "regions"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"cannot compare attention masses with different {name}: "
                             f"{getattr(a, name)} vs {getattr(b, name)}")
    if a.sums.shape != b.sums.shape:
        raise ValueError(f"shape mismatch {tuple(a.sums.shape)} vs {tuple(b.sums.shape)}")


def shift(a: AttentionMass, b: AttentionMass, position: str | int | None = None) -> torch.Tensor:
    """`[layer, head, region]` float64: mean mass of `a` minus that of `b`.

    harmful - harmless on one model is the paper's delta; instruct - base on one prompt set compares models.
    """
    _check_comparable(a, b)
    if position is None:
        return a.mean() - b.mean()
    return a.at(position) - b.at(position)


def rank_heads(delta: torch.Tensor, k: int | None = None, *, by: str = "abs",
               layers: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
    """Heads sorted by a `[layer, head]` score: `(layer, head, value)` triples, top `k` (all when None).

    by: `"abs"` (largest magnitude), `"pos"` (largest), `"neg"` (most negative). `layers` maps row i of
    `delta` to its layer number (default 0..n-1).
    """
    if delta.ndim != 2:
        raise ValueError(f"rank_heads needs a [layer, head] tensor, got shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("rank_heads got non-finite scores")
    key = {"abs": delta.abs(), "pos": delta, "neg": -delta}.get(by)
    if key is None:
        raise ValueError("by must be 'abs', 'pos' or 'neg'")
    layer_ids = list(range(delta.shape[0])) if layers is None else list(layers)
    if len(layer_ids) != delta.shape[0]:
        raise ValueError(f"{len(layer_ids)} layer numbers for {delta.shape[0]} rows")
    order = torch.argsort(key.flatten(), descending=True, stable=True)
    if k is not None:
        if k < 1:
            raise ValueError("k must be >= 1")
        order = order[:k]
    n_heads = delta.shape[1]
    return [(layer_ids[int(i) // n_heads], int(i) % n_heads, float(delta.flatten()[i])) for i in order]


# ----------------------------------------------------------------------------------------------------------
# One prompt's full pattern, for the interactive viewer.

def prompt_patterns(model: Any, batch: ChatBatch, row: int, heads: Sequence[Head]) -> dict[Head, torch.Tensor]:
    """`{(layer, head): [query, key]}` float32 patterns of one prompt (pads dropped) for the chosen heads only."""
    if not 0 <= row < len(batch):
        raise ValueError(f"row {row} out of range for a batch of {len(batch)}")
    if not heads:
        raise ValueError("no heads chosen")
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    bad = [h for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(f"heads {bad} out of range ({n_layers} layers x {n_heads} heads)")
    one = batch[row]  # trims this row's padding
    out: dict[Head, torch.Tensor] = {}
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def make_hook(layer: int):
        def fn(pattern: torch.Tensor, hook: Any) -> None:
            for h in by_layer[layer]:
                out[(layer, h)] = pattern[0, h].float().cpu()
        return fn

    stop = max(by_layer) + 1
    with model.hooks(fwd_hooks=[(PATTERN_HOOK.format(layer=layer), make_hook(layer)) for layer in by_layer]):
        forward(model, one, return_type=None, stop_at_layer=stop if stop < n_layers else None)
    return {h: out[h] for h in heads}


# ----------------------------------------------------------------------------------------------------------
# Causal check: patch chosen heads' outputs (hook_z) at the post-instruction positions.

def _check_heads(model: Any, heads: Sequence[Head]) -> list[Head]:
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = [(int(layer), int(h)) for layer, h in heads]
    bad = [h for h in heads if not (0 <= h[0] < n_layers and 0 <= h[1] < n_heads)]
    if bad:
        raise ValueError(f"heads {bad} out of range ({n_layers} layers x {n_heads} heads)")
    if len(set(heads)) != len(heads):
        raise ValueError(f"repeated heads in {heads}")
    return heads


def mean_z(model: Any, batch: ChatBatch, layers: Sequence[int], positions: PositionSpec = "post_instruction",
           *, batch_size: int = 16, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Mean per-head attention output over prompts at the query `positions`.

    Returns (`[layer, k, head, d_head]` float64 in the order of `layers`, position labels). With
    `"post_instruction"` column j is the same template offset in every prompt, whatever its length.
    """
    layers = _layers(model, layers)
    if len(batch) == 0:
        raise ValueError("empty batch")
    _, labels = batch.positions(positions)
    n_heads, d_head = int(model.cfg.n_heads), int(model.cfg.d_head)
    sums = torch.zeros(len(layers), len(labels), n_heads, d_head, dtype=torch.float64)
    chunks = batch.chunks(batch_size)
    n_layers = int(model.cfg.n_layers)
    for _, sub in tqdm(chunks, desc="mean hook_z", disable=not progress or len(chunks) < 2, leave=False):
        pos, sub_labels = sub.positions(positions)
        _same_columns(labels, sub_labels, positions)
        pos = pos.to(model_device(model))  # [b, k]
        rows = torch.arange(len(sub), device=pos.device)[:, None]

        fired: set[int] = set()

        def make_hook(li: int):
            def fn(z: torch.Tensor, hook: Any) -> None:
                sums[li] += z[rows, pos].double().sum(0).cpu()  # [b, k, head, d_head] -> [k, head, d_head]
                fired.add(layers[li])
            return fn

        stop = max(layers) + 1
        with model.hooks(fwd_hooks=[(Z_HOOK.format(layer=layer), make_hook(li)) for li, layer in enumerate(layers)]):
            forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
        _check_fired(fired, layers, Z_HOOK)
    if not bool(torch.isfinite(sums).all()):
        raise FloatingPointError("non-finite head outputs")
    return sums / len(batch), labels


def z_patch_hooks(heads: Sequence[Head], positions: torch.Tensor, values: dict[Head, torch.Tensor],
                  fired: set[int] | None = None) -> list[tuple[str, Callable]]:
    """Forward hooks that write `values[(layer, head)]` into `hook_z[:, positions, head]`.

    positions: `[batch, k]` absolute positions in the patched batch. values: `[batch or 1, k, d_head]` per head
    (1 broadcasts one value, e.g. a mean over another prompt set, to every prompt). `fired`, if given, collects
    the layers whose hook ran, so a caller can tell a patch that never happened from one that changed nothing.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    for key, v in values.items():
        if v.ndim != 3 or v.shape[1] != positions.shape[1]:
            raise ValueError(f"values for head {key} have shape {tuple(v.shape)}, expected [batch or 1, "
                             f"{positions.shape[1]}, d_head]")
    missing = [h for h in heads if h not in values]
    if missing:
        raise ValueError(f"no values for heads {missing}")

    def make_hook(layer: int):
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            if fired is not None:
                fired.add(layer)
            z = z.clone()
            pos = positions.to(z.device)
            rows = torch.arange(z.shape[0], device=z.device)[:, None]
            for h in by_layer[layer]:
                z[rows, pos, h] = values[(layer, h)].to(z.device, z.dtype)
            return z
        return fn

    return [(Z_HOOK.format(layer=layer), make_hook(layer)) for layer in by_layer]


def default_score_fn(tokenizer: Any) -> ScoreFn:
    """The refusal score of `probes.refusal` (log-odds of the refusal tokens) for `tokenizer`.

    Raises ValueError when none of its refusal phrases is in this vocabulary: pick words with `logodds_score`.
    """
    return logodds_score(refusal_tokens(tokenizer))


def logodds_score(token_ids: Sequence[int]) -> ScoreFn:
    """A score fn: log P(any of `token_ids`) - log(1 - P(...)) at the next token, float64 `[batch]`."""
    ids = sorted(set(int(t) for t in token_ids))
    if not ids:
        raise ValueError("no token ids to score")
    return lambda logits: refusal_score(logits, ids)


@dataclass
class PatchResult:
    """Refusal score of the target prompts before and after patching.

    clean, patched: `[prompt]` float64 scores; per_head: `{(layer, head): [prompt]}` scores with that head alone
    patched (empty unless asked for); positions: the patched query labels.
    """

    heads: list[Head]
    positions: list[str]
    clean: torch.Tensor
    patched: torch.Tensor
    per_head: dict[Head, torch.Tensor] = field(default_factory=dict)

    @property
    def effect(self) -> float:
        """Mean change in score (patched - clean)."""
        return float((self.patched - self.clean).mean())

    def head_effects(self) -> dict[Head, float]:
        return {h: float((s - self.clean).mean()) for h, s in self.per_head.items()}

    def sem(self) -> float:
        """Standard error over prompts of the change in score (0 for one prompt)."""
        return _sem(self.patched - self.clean)

    def head_sems(self) -> dict[Head, float]:
        return {h: _sem(s - self.clean) for h, s in self.per_head.items()}


def _sem(x: torch.Tensor) -> float:
    return float(x.double().std(unbiased=True) / len(x) ** 0.5) if len(x) > 1 else 0.0


def head_patching(
    model: Any,
    target: ChatBatch,
    source: ChatBatch,
    heads: Sequence[Head],
    *,
    positions: PositionSpec = "post_instruction",
    score_fn: ScoreFn | None = None,
    individually: bool = False,
    batch_size: int = 16,
    progress: bool = True,
) -> PatchResult:
    """Patch `heads`' outputs at the template `positions` of `target` prompts with their mean over `source`.

    For harmful targets and harmless sources this asks whether those heads carry the harmfulness signal that
    the template region passes to the refusal. Positions are matched by label (template offset), since prompts
    differ in length. score_fn maps `[batch, vocab]` logits at `post_instruction[-1]` to `[batch]` scores
    (default: `probes.refusal`'s refusal score). `individually` also patches each head alone.
    """
    heads = _check_heads(model, heads)
    if not heads:
        raise ValueError("no heads to patch")
    if len(target) == 0 or len(source) == 0:
        raise ValueError("empty target or source batch")
    score_fn = score_fn or default_score_fn(target.tokenizer)
    layers = sorted({layer for layer, _ in heads})
    means, labels = mean_z(model, source, layers, positions, batch_size=batch_size, progress=progress)
    target_labels = target.positions(positions)[1]
    if target_labels != labels:
        raise ValueError(f"target positions {target_labels} differ from source positions {labels}")
    values = {(layer, h): means[layers.index(layer), :, h][None] for layer, h in heads}  # [1, k, d_head]
    runs: list[tuple[Head | None, list[Head]]] = [(None, []), (None, heads)]
    if individually:
        runs += [(h, [h]) for h in heads]
    scores: list[list[torch.Tensor]] = [[] for _ in runs]
    chunks = target.chunks(batch_size)
    for _, sub in tqdm(chunks, desc="head patching", disable=not progress or len(chunks) < 2, leave=False):
        pos, sub_labels = sub.positions(positions)
        _same_columns(labels, sub_labels, positions)
        for i, (_, hs) in enumerate(runs):
            fired: set[int] = set()
            hooks = z_patch_hooks(hs, pos, {h: values[h] for h in hs}, fired) if hs else []
            s = score_fn(last_logits(model, sub, hooks, position="post_instruction[-1]")).double().cpu()
            if fired != {layer for layer, _ in hs}:
                raise RuntimeError(f"hook_z did not fire at layers {sorted({l for l, _ in hs} - fired)}: this "
                                   "architecture's bridge exposes no per-head output to patch")
            if s.shape != (len(sub),):
                raise ValueError(f"score_fn returned shape {tuple(s.shape)}, expected ({len(sub)},)")
            scores[i].append(s)
    cat = [torch.cat(s) for s in scores]
    per_head = {h: cat[i] for i, (h, _) in enumerate(runs) if h is not None}
    return PatchResult(heads=heads, positions=labels, clean=cat[0], patched=cat[1], per_head=per_head)
