"""Base vs instruct on the same tokens: mean activation difference by token role, and per-token KL along a response.

- `mean_diff`: mean over tokens of the instruct and base residuals at every layer, grouped by token role
  (`bos`, `system`, `template`, `user`, `post_instruction`, `response`) and by post-instruction offset
  (`post_instruction[-1]` = the last template token before the response); their difference instruct − base, its
  norm relative to the base's mean activation norm, cosine between layers, and its logit lens (the activation-
  difference lens of Minder et al. 2025). Means are token-weighted (every token of a group counts once, over all
  prompts) and accumulated in float64 while streaming, so memory is `[group, layer, d_model]` whatever the data.
- `set_diff`: difference of means between two prompt sets within one model (`probes.directions.diff_of_means`).
- `per_token_kl`: KL(instruct ‖ base) (and the reverse) of the next-token distributions along a teacher-forced
  response (Qi et al. 2024): value j is at the position that predicts response token j, i.e.
  `post_instruction[-1]` for j = 0. `instruct_responses` gives the instruct model's own greedy responses.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from probes import checkpoints
from probes.activations import PositionSpec, forward, hook_name, model_device, record, resolve_layers
from probes.chat import ROLE_ID, ROLES, ChatBatch
from probes.directions import cosine, diff_of_means
from probes.lens import DirectionLens, Head, direction_lens, kl

DEFAULT_ROLES: tuple[str, ...] = ("bos", "system", "template", "user", "post_instruction", "response")


# ---------------------------------------------------------------------------------------- mean difference by role
@dataclass
class MeanDiff:
    """Token-weighted mean residuals of base and instruct on identical tokens, per group x layer.

    groups: role names and post-instruction offsets (`"post_instruction[-2]"`); counts `[group]` tokens;
    mean_base, mean_instruct: `[group, layer, d_model]` float64; norm_base, norm_instruct: `[group, layer]` float64
    mean over tokens of the activation's L2 norm.
    """

    hook: str
    layers: list[int]
    groups: list[str]
    counts: torch.Tensor
    mean_base: torch.Tensor
    mean_instruct: torch.Tensor
    norm_base: torch.Tensor
    norm_instruct: torch.Tensor

    @property
    def diff(self) -> torch.Tensor:
        """`[group, layer, d_model]` float64 mean(instruct) − mean(base)."""
        return self.mean_instruct - self.mean_base

    @property
    def diff_norm(self) -> torch.Tensor:
        """`[group, layer]` L2 norm of the mean difference."""
        return self.diff.norm(dim=-1)

    @property
    def relative_norm(self) -> torch.Tensor:
        """`[group, layer]` ‖mean difference‖ / mean ‖base activation‖ on the same tokens."""
        return self.diff_norm / self.norm_base

    def index(self, group: str) -> int:
        try:
            return self.groups.index(group)
        except ValueError:
            raise ValueError(f"no group {group!r}; groups are {self.groups}") from None

    def layer_cosine(self, group: str) -> torch.Tensor:
        """`[layer, layer]` cosine between the group's mean differences at every pair of layers."""
        d = self.diff[self.index(group)]
        return cosine(d[:, None, :], d[None, :, :])

    def lens(self, model_or_head: Any, group: str, layer: int, *, k: int = 10) -> DirectionLens:
        """Tokens promoted (+) and suppressed (−) by the group's mean difference at `layer` (`direction_lens`)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not recorded (recorded: {self.layers})")
        return direction_lens(model_or_head, self.diff[self.index(group), self.layers.index(layer)], k=k)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "mean_base": self.mean_base, "mean_instruct": self.mean_instruct,
                "norm_base": self.norm_base, "norm_instruct": self.norm_instruct}


def group_masks(batch: ChatBatch, roles: Sequence[str] | None = None, offsets: bool = True) -> tuple[list[str], torch.Tensor]:
    """(group names, `[group, batch, seq]` bool masks): one per role present, then one per post-instruction offset.

    With `roles=None`, the roles of `DEFAULT_ROLES` that occur in the batch; a role named explicitly must occur.
    Offsets need the same number of post-instruction tokens in every row (templates give that).
    """
    names, masks = [], []
    for role in DEFAULT_ROLES if roles is None else roles:
        if role not in ROLE_ID or role == "pad":
            raise ValueError(f"unknown role {role!r}; roles are {ROLES[1:]}")
        m = batch.role_mask(role)
        if not bool(m.any()):
            if roles is not None:
                raise ValueError(f"no {role!r} tokens in the batch")
            continue
        names.append(role)
        masks.append(m)
    if offsets and bool(batch.role_mask("post_instruction").any()):
        for off in batch.post_instruction_offsets:
            idx, labels = batch.positions(f"post_instruction[{off}]")
            names.append(labels[0])
            masks.append(torch.zeros_like(batch.attention_mask, dtype=torch.bool).scatter(1, idx, True))
    if not names:
        raise ValueError("no token groups to average over")
    return names, torch.stack(masks)


def mean_diff(
    pair: Any,
    batch: ChatBatch,
    *,
    hook: str = "resid_post",
    layers: int | Sequence[int] | None = None,
    roles: Sequence[str] | None = None,
    offsets: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> MeanDiff:
    """Token-weighted mean activations of base and instruct on `batch`, by role and post-instruction offset.

    One forward per model per chunk, hooks on every requested layer; each hook reduces `[b, seq, d_model]` to
    `[group, d_model]` float64 sums at once. Raises FloatingPointError on a non-finite activation in a group.
    """
    n_layers = pair.n_layers
    layer_list = resolve_layers(layers, n_layers)
    if len(batch) == 0:
        raise ValueError("empty batch")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    names, _ = group_masks(batch, roles, offsets)
    explicit = roles if roles is not None else [n for n in names if "[" not in n]
    G, L, d = len(names), len(layer_list), pair.d_model
    sums = {w: torch.zeros(G, L, d, dtype=torch.float64) for w in ("base", "instruct")}
    norms = {w: torch.zeros(G, L, dtype=torch.float64) for w in ("base", "instruct")}
    counts = torch.zeros(G, dtype=torch.long)
    stop = max(layer_list) + 1
    chunks = batch.chunks(batch_size)
    for _, sub in tqdm(chunks, desc="mean diff", disable=not progress or len(chunks) < 2, leave=False):
        sub_names, masks = group_masks(sub, explicit, offsets)
        if sub_names != names:  # a role absent from this chunk: keep the full batch's group order
            full = torch.zeros(G, *masks.shape[1:], dtype=torch.bool)
            for j, n in enumerate(sub_names):
                full[names.index(n)] = masks[j]
            masks = full
        counts += masks.sum((1, 2))
        for which in ("base", "instruct"):
            with pair.on_device(which) as model:
                w = masks.to(model_device(model), torch.float64)
                read = w.sum(0).bool()[..., None]  # tokens some group reads (never padding)

                def make_hook(li: int, which: str = which, w: torch.Tensor = w, read: torch.Tensor = read):
                    def fn(act: torch.Tensor, hook: Any) -> None:
                        a = act.double().masked_fill(~read, 0.0)  # a NaN in padding cannot leak into a sum
                        if not bool(torch.isfinite(a).all()):
                            raise FloatingPointError(f"non-finite activation in {which} at {hook.name}")
                        sums[which][:, li] += torch.einsum("gbs,bsd->gd", w, a).cpu()
                        norms[which][:, li] += torch.einsum("gbs,bs->g", w, a.norm(dim=-1)).cpu()
                    return fn

                fwd = [(hook_name(hook, layer), make_hook(li)) for li, layer in enumerate(layer_list)]
                with model.hooks(fwd_hooks=fwd):
                    forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
    c = counts.double()[:, None]
    return MeanDiff(hook=hook, layers=layer_list, groups=names, counts=counts,
                    mean_base=sums["base"] / c[..., None], mean_instruct=sums["instruct"] / c[..., None],
                    norm_base=norms["base"] / c, norm_instruct=norms["instruct"] / c)


def set_diff(
    model: Any, a: ChatBatch, b: ChatBatch, *, hook: str = "resid_post", layers: int | Sequence[int] | None = None,
    positions: PositionSpec = "post_instruction[-1]", batch_size: int = 16, progress: bool = True,
) -> torch.Tensor:
    """`[layer, position, d_model]` float64 mean(a) − mean(b) within one model (`directions.diff_of_means`)."""
    ra = record(model, a, hook, layers, positions, batch_size=batch_size, keep="mean", progress=progress)
    rb = record(model, b, hook, layers, positions, batch_size=batch_size, keep="mean", progress=progress)
    return diff_of_means(ra, rb)


# ------------------------------------------------------------------------------------------------ per-token KL
@dataclass
class TokenKL:
    """Divergence of the two models along a teacher-forced response, per prompt x response position.

    kl_instruct_base, kl_base_instruct, logprob_base, logprob_instruct (of the response token): `[prompt, n]`
    float32, zero where `valid` `[prompt, n]` is False (responses shorter than the longest);
    response_ids `[prompt, n]` long (-1 where not valid).
    """

    kl_instruct_base: torch.Tensor
    kl_base_instruct: torch.Tensor
    logprob_base: torch.Tensor
    logprob_instruct: torch.Tensor
    response_ids: torch.Tensor
    valid: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """`[n]` prompts whose response reaches each position."""
        return self.valid.sum(0)

    def mean(self, name: str = "kl_instruct_base") -> torch.Tensor:
        """`[n]` mean over the prompts whose response reaches each position."""
        x = getattr(self, name)
        return (x * self.valid).sum(0) / self.counts.clamp_min(1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("kl_instruct_base", "kl_base_instruct", "logprob_base",
                                              "logprob_instruct", "response_ids", "valid")}


def _response_index(batch: ChatBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(`[b, n]` positions predicting each response token, `[b, n]` response token ids, `[b, n]` valid)."""
    resp = batch.role_mask("response")
    n = resp.sum(-1)
    if bool((n == 0).any()):
        raise ValueError(f"prompt {int(torch.nonzero(n == 0)[0])} has no response tokens: encode with responses=")
    n_max = int(n.max())
    j = torch.arange(n_max)[None]
    valid = j < n[:, None]
    first = resp.long().argmax(-1)  # first response token (responses are contiguous at the end of each row)
    tok_pos = (first[:, None] + j).clamp(max=batch.seq_len - 1)
    ids = torch.where(valid, batch.input_ids.gather(1, tok_pos), torch.full_like(tok_pos, -1))
    return (tok_pos - 1).clamp(min=0), ids, valid


def per_token_kl(
    pair: Any, batch: ChatBatch, *, batch_size: int = 8, pos_chunk: int = 64, progress: bool = True,
) -> TokenKL:
    """KL between the instruct and base next-token distributions at every response position of `batch`.

    batch: encoded with `responses=` (e.g. `instruct_responses`). The distributions are the models' real outputs
    (final norm + unembedding + soft-cap of the last block's residual, gathered at the predicting positions only:
    memory `[batch_size, n, d_model]` residuals and `[batch_size, pos_chunk, vocab]` log-probs).
    """
    if len(batch) == 0:
        raise ValueError("empty batch")
    if batch_size < 1 or pos_chunk < 1:
        raise ValueError("batch_size and pos_chunk must be >= 1")
    last = pair.n_layers - 1
    heads: dict[str, Head] = {}
    for which in ("base", "instruct"):
        with pair.on_device(which) as model:
            head = Head.from_model(model)
            heads[which] = head.to(pair.device) if pair.offload else head
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("kib", "kbi", "lpb", "lpi", "ids", "valid")}
    n_all = int(batch.role_mask("response").sum(-1).max())
    chunks = batch.chunks(batch_size)
    for _, sub in tqdm(chunks, desc="per-token KL", disable=not progress or len(chunks) < 2, leave=False):
        # A finished chunk is kept in the active run's store, so an interrupted run resumes after it.
        got = checkpoints.chunk("per_token_kl", [pair.base, pair.instruct], dict(n_all=n_all),
                                [sub.input_ids, sub.attention_mask, sub.roles],
                                lambda sub=sub: _token_kl_chunk(pair, heads, sub, n_all, last, pos_chunk))
        for k in out:
            out[k].append(got[k])
    cat = {k: torch.cat(v) for k, v in out.items()}
    return TokenKL(kl_instruct_base=cat["kib"], kl_base_instruct=cat["kbi"], logprob_base=cat["lpb"],
                   logprob_instruct=cat["lpi"], response_ids=cat["ids"], valid=cat["valid"])


def _token_kl_chunk(pair: Any, heads: dict[str, Head], sub: ChatBatch, n_all: int, last: int,
                    pos_chunk: int) -> dict[str, torch.Tensor]:
    """`per_token_kl`'s statistics of one chunk, each `[b, n_all]`: kib, kbi, lpb, lpi (float), ids, valid."""
    pos, ids, valid = _response_index(sub)
    resid = {}
    for which in ("base", "instruct"):
        with pair.on_device(which) as model:
            got: list[torch.Tensor] = []
            p = pos.to(model_device(model))

            def fn(act: torch.Tensor, hook: Any) -> None:
                got.append(act[torch.arange(act.shape[0], device=act.device)[:, None], p].cpu())

            with model.hooks(fwd_hooks=[(hook_name("resid_post", last), fn)]):
                forward(model, sub, return_type=None)
            resid[which] = got[0]
    b, n = ids.shape
    parts = {k: torch.zeros(b, n_all) for k in ("kib", "kbi", "lpb", "lpi")}
    tgt = ids.clamp(min=0)
    for p0 in range(0, n, pos_chunk):
        sl = slice(p0, min(p0 + pos_chunk, n))  # parts are n_all >= n wide: never broadcast into padding
        lb = heads["base"].logprobs(resid["base"][:, sl])
        li = heads["instruct"].logprobs(resid["instruct"][:, sl]).to(lb.device)
        if not (bool(torch.isfinite(lb).all()) and bool(torch.isfinite(li).all())):
            raise FloatingPointError("non-finite log-probs along the response")
        t = tgt[:, sl, None].to(lb.device)
        v = valid[:, sl]
        parts["kib"][:, sl] = kl(li, lb).cpu() * v
        parts["kbi"][:, sl] = kl(lb, li).cpu() * v
        parts["lpb"][:, sl] = lb.gather(-1, t)[..., 0].cpu() * v
        parts["lpi"][:, sl] = li.gather(-1, t)[..., 0].cpu() * v
    return {**parts, "ids": torch.nn.functional.pad(ids, (0, n_all - n), value=-1),
            "valid": torch.nn.functional.pad(valid, (0, n_all - n), value=False)}


def instruct_responses(pair: Any, batch: ChatBatch, *, max_new_tokens: int = 16, batch_size: int = 16,
                       progress: bool = True) -> list[str]:
    """The instruct model's own greedy responses to `batch` (`probes.generation.generate`), as text.

    A model that stops at once gives an empty string; `per_token_kl` refuses such rows, so filter them first.
    """
    from probes.generation import generate

    with pair.on_device("instruct") as model:
        return list(generate(model, batch, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             progress=progress).texts)
