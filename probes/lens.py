"""Logit lens: decode every layer's residual stream through the model's own final norm and unembedding.

The lens of a residual `x` is `log_softmax(softcap(W_U · norm(x) + b_U))`, where `norm` is the model's own final
norm module (the HF module the bridge wraps, recomputed on `x`), `W_U`, `b_U` its unembedding, and `softcap` the
final logit soft-cap where the family has one (Gemma-2: `cap * tanh(logits / cap)`). The lens of the last block's
`resid_post` is therefore the model's real output distribution (tested to fp32 precision).

Per layer x position we keep top-k tokens, entropy, KL to the final layer and the rank / log-probability of
target tokens; full-vocabulary log-probs are decoded chunk by chunk and dropped, unless asked for (bounded).

Conventions (as in tuned-lens): entropy in nats; `kl_to_final` is KL(p_final ‖ p_layer); ranks count the tokens
with a strictly larger log-prob (0 = top token). Paired lenses add KL(instruct ‖ base) and KL(base ‖ instruct)
on identical tokens, and the first layer where the two models' top tokens differ.

The lens of a direction (`direction_lens`) is `W_U (g ⊙ v)`: the direction scaled by the final norm's effective
weight `g` (centred first for LayerNorm, which removes the mean of any input), without the division by the RMS
(a direction has no natural scale) and without bias or soft-cap (both are not linear in `v`).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from probes import checkpoints
from probes.activations import expand_positions, record, resolve_layers
from probes.chat import ChatBatch

# Above this many float32 elements (1 GiB) `keep_logprobs` refuses: keep top-k or fewer positions instead.
MAX_KEPT_LOGPROBS = 2**28

PositionsArg = str | int | Sequence[str | int]


# --------------------------------------------------------------------------------------------------- the head
@dataclass
class Head:
    """The model's own decoder: final norm module, unembedding weight `[d_vocab, d_model]`, bias, soft-cap.

    `norm` is the HF module wrapped by the bridge's `ln_final` (identical outputs, checked in the tests against a
    separately loaded HF model). `softcap` is None when the model has no final logit soft-cap.
    """

    norm: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None

    @classmethod
    def from_model(cls, model: Any) -> Head:
        for name in ("ln_final", "unembed"):
            if not hasattr(model, name):
                raise ValueError(f"model has no {name!r} component: the logit lens needs a final norm and an unembedding")
        norm = getattr(model.ln_final, "original_component", model.ln_final)
        lm_head = getattr(model.unembed, "original_component", model.unembed)
        weight = getattr(lm_head, "weight", None)
        if weight is None or weight.ndim != 2:
            raise ValueError("could not read the unembedding weight from model.unembed")
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        return cls(norm=norm, weight=weight, bias=getattr(lm_head, "bias", None),
                   softcap=float(cap) if cap is not None and cap > 0 else None)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def to(self, device: str | torch.device) -> Head:
        """A copy on `device` (used with offloaded pairs, so both heads can be on the device at once)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return Head(norm=copy.deepcopy(self.norm).to(device), weight=self.weight.to(device),
                    bias=None if self.bias is None else self.bias.to(device), softcap=self.softcap)

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        """`[..., d_model]` residuals -> `[..., d_vocab]` float32 logits (norm, unembed, soft-cap in model dtype)."""
        with torch.no_grad():
            x = self.norm(resid.to(self.device, self.dtype))
            out = torch.nn.functional.linear(x, self.weight, self.bias)
            if self.softcap is not None:  # as HF does it: in the model's dtype, after the unembedding
                out = torch.tanh(out / self.softcap) * self.softcap
            return out.float()

    def logprobs(self, resid: torch.Tensor) -> torch.Tensor:
        """`[..., d_model]` -> `[..., d_vocab]` float32 log-probabilities."""
        return torch.log_softmax(self.logits(resid), dim=-1)

    def norm_scale(self) -> tuple[torch.Tensor, bool]:
        """(effective elementwise weight `g` `[d_model]` float64, whether the norm centres its input).

        Read by probing the module, not by family: an RMSNorm maps `c·1` (large c) to `g` itself, whatever its
        parametrisation (Llama `w`, Gemma `1 + w`); a LayerNorm centres, so its weight is read directly.
        """
        if isinstance(self.norm, torch.nn.LayerNorm):
            return self.norm.weight.detach().double().cpu(), True
        d = self.weight.shape[1]
        with torch.no_grad():
            c = 1e3  # c/sqrt(c² + eps) = 1 to fp32 precision for any eps <= 1e-3
            probe = torch.full((1, d), c, dtype=self.dtype, device=self.device)
            g = self.norm(probe)[0].double().cpu()
            if hasattr(self.norm, "bias") and isinstance(self.norm.bias, torch.Tensor):
                g = g - self.norm.bias.detach().double().cpu()
        return g, False


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"non-finite values in {what}")


# ------------------------------------------------------------------------------------------------ statistics
def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """`[..., vocab]` log-probs -> `[...]` entropy in nats."""
    return -(logprobs.exp() * logprobs).sum(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) in nats over the last dimension, from log-probs `[..., vocab]`."""
    return (logp.exp() * (logp - logq)).sum(-1)


def ranks(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rank of each target (0 = most likely): tokens with a strictly larger log-prob.

    logprobs `[..., vocab]`, targets `[..., n]` long -> `[..., n]` long.
    """
    tl = logprobs.gather(-1, targets)
    return (logprobs.unsqueeze(-2) > tl.unsqueeze(-1)).sum(-1)


# ------------------------------------------------------------------------------------------------ the results
@dataclass
class LensResult:
    """Logit lens of one model on one batch, per prompt x layer x position.

    layers: the decoded layers (of `hook`); positions: position labels; k = len(positions).
    token_ids, roles: `[prompt, k]` the token at each decoded position and its role index.
    topk_ids, topk_logprobs: `[prompt, layer, k, top_k]`; entropy, kl_to_final: `[prompt, layer, k]`.
    targets: `[prompt, n_targets]` or None; target_rank (long), target_logprob: `[prompt, layer, k, n_targets]`.
    With `hook == "resid_post"`, the last layer's entries describe the model's real output distribution.
    logprobs: `[prompt, layer, k, vocab]`, only with `keep_logprobs=True`.
    """

    model: str
    hook: str
    layers: list[int]
    positions: list[str]
    token_ids: torch.Tensor
    roles: torch.Tensor
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    entropy: torch.Tensor
    kl_to_final: torch.Tensor
    targets: torch.Tensor | None = None
    target_rank: torch.Tensor | None = None
    target_logprob: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top1(self) -> torch.Tensor:
        """`[prompt, layer, k]` the lens's most likely token."""
        return self.topk_ids[..., 0]

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The tensors, named for `Run.save_tensors`."""
        out = {"token_ids": self.token_ids, "roles": self.roles, "topk_ids": self.topk_ids,
               "topk_logprobs": self.topk_logprobs, "entropy": self.entropy, "kl_to_final": self.kl_to_final}
        for name in ("targets", "target_rank", "target_logprob"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {prefix + k: v for k, v in out.items()}


@dataclass
class PairedLens:
    """Lens of base and instruct on identical tokens, with their divergences.

    kl_instruct_base = KL(p_instruct ‖ p_base), kl_base_instruct = KL(p_base ‖ p_instruct): `[prompt, layer, k]`.
    first_diff_layer: `[prompt, k]` long, the first decoded layer (a layer number, not an index) where the
    models' top tokens differ, -1 where they agree at every decoded layer.
    """

    base: LensResult
    instruct: LensResult
    kl_instruct_base: torch.Tensor
    kl_base_instruct: torch.Tensor
    first_diff_layer: torch.Tensor

    @property
    def layers(self) -> list[int]:
        return self.base.layers

    @property
    def positions(self) -> list[str]:
        return self.base.positions

    def tensors(self) -> dict[str, torch.Tensor]:
        shared = ("token_ids", "roles", "targets")  # the same tokens for both models: stored once
        per_model = {f"{w}/{k}": v for w, res in (("base", self.base), ("instruct", self.instruct))
                     for k, v in res.tensors().items() if k not in shared}
        return {**{k: v for k, v in self.base.tensors().items() if k in shared}, **per_model,
                "kl_instruct_base": self.kl_instruct_base, "kl_base_instruct": self.kl_base_instruct,
                "first_diff_layer": self.first_diff_layer}


# --------------------------------------------------------------------------------------------------- helpers
def token_ids(tokenizer: Any, words: str | Sequence[str]) -> list[int]:
    """Ids of single-token strings (e.g. `["sorry", "cannot"]`), with a clear error for any that is not one token."""
    words = [words] if isinstance(words, str) else list(words)
    if not words:
        raise ValueError("no target tokens given")
    out = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{w!r} is {len(ids)} tokens ({ids}), not one")
        out.append(int(ids[0]))
    return out


def _resolve_positions(batch: ChatBatch, positions: PositionsArg) -> tuple[list[str | int] | str | int, list[str]]:
    """A spec for `record` and labels. `"all"`: every token; needs a batch without padding (e.g. one prompt)."""
    spec, labels = expand_positions(batch, positions)
    return spec, labels if labels is not None else batch.positions(spec)[1]


def _targets(targets: Any, n_prompts: int, d_vocab: int) -> torch.Tensor | None:
    if targets is None:
        return None
    t = torch.as_tensor(targets, dtype=torch.long)
    if t.ndim == 0:
        t = t[None]
    if t.ndim == 1:
        t = t[None].expand(n_prompts, -1)
    if t.ndim != 2 or t.shape[0] != n_prompts or t.shape[1] == 0:
        raise ValueError(f"targets must be [n_targets] or [prompt, n_targets] with {n_prompts} prompts, "
                         f"got shape {tuple(t.shape)}")
    if bool((t < 0).any()) or bool((t >= d_vocab).any()):
        raise ValueError(f"target ids out of range for a vocabulary of {d_vocab}")
    return t.contiguous()


def _layers(model: Any, layers: int | Sequence[int] | None) -> list[int]:
    return resolve_layers(layers, int(model.cfg.n_layers))


def _capture(model: Any, sub: ChatBatch, hook: str, layers: list[int], spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(`[b, layer, k, d]` residuals at `hook`, `[b, k, d]` last block's resid_post) for one chunk, on the CPU."""
    last = int(model.cfg.n_layers) - 1
    if hook == "resid_post":
        need = sorted(set(layers) | {last})
        acts = record(model, sub, "resid_post", need, spec, batch_size=len(sub), progress=False).tensor
        return acts[:, [need.index(layer) for layer in layers]], acts[:, need.index(last)]
    acts = record(model, sub, [hook, "resid_post"], sorted(set(layers) | {last}), spec, batch_size=len(sub),
                  progress=False)
    need = acts.layers
    return acts.tensors[hook][:, [need.index(layer) for layer in layers]], acts.tensors["resid_post"][:, need.index(last)]


def _decode_chunk(
    head: Head, resid: torch.Tensor, final: torch.Tensor, targets: torch.Tensor | None, top_k: int, pos_chunk: int,
    keep: bool,
) -> dict[str, torch.Tensor]:
    """Statistics of one prompt chunk. resid `[b, L, k, d]`, final `[b, k, d]` -> dict of CPU tensors.

    Decodes `pos_chunk` positions of one layer at a time so at most `[b, pos_chunk, vocab]` is alive.
    """
    b, n_layers, k, _ = resid.shape
    out: dict[str, torch.Tensor] = {
        "topk_ids": torch.empty(b, n_layers, k, top_k, dtype=torch.long),
        "topk_logprobs": torch.empty(b, n_layers, k, top_k),
        "entropy": torch.empty(b, n_layers, k),
        "kl_to_final": torch.empty(b, n_layers, k),
    }
    if targets is not None:
        out["target_rank"] = torch.empty(b, n_layers, k, targets.shape[1], dtype=torch.long)
        out["target_logprob"] = torch.empty(b, n_layers, k, targets.shape[1])
    if keep:
        out["logprobs"] = torch.empty(b, n_layers, k, head.weight.shape[0])
    for p0 in range(0, k, pos_chunk):
        sl = slice(p0, p0 + pos_chunk)
        final_lp = head.logprobs(final[:, sl])
        tgt = None if targets is None else targets.to(head.device)[:, None, :].expand(-1, final_lp.shape[1], -1)
        for li in range(n_layers):
            lp = head.logprobs(resid[:, li, sl])
            _check_finite(lp, f"lens log-probs at layer index {li}")
            flat = lp.amax(-1) == lp.amin(-1)  # a uniform row: the norm overflowed or the head is degenerate
            if bool(flat.any()):
                raise FloatingPointError(f"degenerate lens log-probs (all equal) at layer index {li}, prompt "
                                         f"{int(torch.nonzero(flat)[0, 0])} of the chunk: the residual's norm "
                                         "overflowed or the head maps it to a constant")
            v, i = lp.topk(top_k, dim=-1)
            out["topk_ids"][:, li, sl], out["topk_logprobs"][:, li, sl] = i.cpu(), v.cpu()
            out["entropy"][:, li, sl] = entropy(lp).cpu()
            out["kl_to_final"][:, li, sl] = kl(final_lp, lp).cpu()
            if tgt is not None:
                out["target_rank"][:, li, sl] = ranks(lp, tgt).cpu()
                out["target_logprob"][:, li, sl] = lp.gather(-1, tgt).cpu()
            if keep:
                out["logprobs"][:, li, sl] = lp.cpu()
    return out


def _check_batch(batch: ChatBatch, top_k: int, batch_size: int, pos_chunk: int, d_vocab: int) -> None:
    if len(batch) == 0:
        raise ValueError("empty batch")
    if not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k must be in 1..{d_vocab}, got {top_k}")
    if batch_size < 1 or pos_chunk < 1:
        raise ValueError("batch_size and pos_chunk must be >= 1")


def _position_tokens(batch: ChatBatch, spec: Any) -> tuple[torch.Tensor, torch.Tensor]:
    idx, _ = batch.positions(spec)
    return batch.input_ids.gather(1, idx), batch.roles.gather(1, idx)


# --------------------------------------------------------------------------------------------------- the lens
def logit_lens(
    model: Any,
    batch: ChatBatch,
    *,
    hook: str = "resid_post",
    layers: int | Sequence[int] | None = None,
    positions: PositionsArg = "post_instruction[-1]",
    targets: Any = None,
    top_k: int = 5,
    batch_size: int = 8,
    pos_chunk: int = 64,
    keep_logprobs: bool = False,
    progress: bool = True,
    model_name: str | None = None,
) -> LensResult:
    """Logit lens of `model` on `batch`: every layer's `hook` residual decoded by the model's own head.

    hook: `"resid_post"` (the last layer's lens is the model's output) or `"resid_pre"` (layer l = `hidden_states[l]`).
    positions: a `ChatBatch.positions` spec (`"post_instruction[-1]"`, `"post_instruction"`, `"response[0:5]"`,
    `"last"`), or `"all"` for every token of an unpadded batch.
    targets: token ids `[n_targets]` (same for every prompt) or `[prompt, n_targets]`, for ranks and log-probs.
    Memory: residuals `[batch_size, layer, k, d_model]` per chunk and `[batch_size, pos_chunk, vocab]` log-probs;
    `keep_logprobs` keeps `[prompt, layer, k, vocab]` and refuses above `MAX_KEPT_LOGPROBS` elements.
    """
    return _lens({"model": model}, batch, hook=hook, layers=layers, positions=positions, targets=targets,
                 top_k=top_k, batch_size=batch_size, pos_chunk=pos_chunk, keep_logprobs=keep_logprobs,
                 progress=progress, names={"model": model_name or str(model.cfg.model_name)})["model"]


def paired_lens(
    pair: Any,
    batch: ChatBatch,
    *,
    hook: str = "resid_post",
    layers: int | Sequence[int] | None = None,
    positions: PositionsArg = "post_instruction[-1]",
    targets: Any = None,
    top_k: int = 5,
    batch_size: int = 8,
    pos_chunk: int = 64,
    keep_logprobs: bool = False,
    progress: bool = True,
) -> PairedLens:
    """`logit_lens` of base and instruct on identical tokens, plus KL both ways and the first differing layer.

    Each model decodes with its own head. With an offloaded pair, both heads (norm + unembedding) are copied
    to the device, never both full models.
    """
    res = _lens(pair, batch, hook=hook, layers=layers, positions=positions, targets=targets, top_k=top_k,
                batch_size=batch_size, pos_chunk=pos_chunk, keep_logprobs=keep_logprobs, progress=progress,
                names={w: f"{pair.name}/{w}" for w in ("base", "instruct")}, paired=True)
    base, inst = res["base"], res["instruct"]
    differs = base.top1 != inst.top1  # [prompt, layer, k]
    layer_t = torch.tensor(base.layers, dtype=torch.long)
    first = torch.where(differs.any(1), layer_t[differs.long().argmax(1)], torch.full_like(differs[:, 0], -1, dtype=torch.long))
    return PairedLens(base=base, instruct=inst, kl_instruct_base=res["kl_instruct_base"],
                      kl_base_instruct=res["kl_base_instruct"], first_diff_layer=first)


def _lens(models: Any, batch: ChatBatch, *, hook: str, layers: Any, positions: PositionsArg, targets: Any,
          top_k: int, batch_size: int, pos_chunk: int, keep_logprobs: bool, progress: bool, names: dict[str, str],
          paired: bool = False) -> dict[str, Any]:
    """Shared engine of `logit_lens` (`models={"model": m}`) and `paired_lens` (`models` = a ModelPair)."""
    whiches = ["base", "instruct"] if paired else ["model"]
    if hook not in ("resid_pre", "resid_post"):
        raise ValueError(f"hook must be 'resid_pre' or 'resid_post', got {hook!r}")

    def on_device(which: str):
        return models.on_device(which) if paired else _nullctx(models[which])

    first_model = models["instruct"] if paired else models["model"]
    d_vocab = int(first_model.cfg.d_vocab)
    _check_batch(batch, top_k, batch_size, pos_chunk, d_vocab)
    layer_list = _layers(first_model, layers)
    spec, labels = _resolve_positions(batch, positions)
    tok, roles = _position_tokens(batch, spec)
    tgt = _targets(targets, len(batch), d_vocab)
    k = len(labels)
    n_kept = len(batch) * len(layer_list) * k * d_vocab
    if keep_logprobs and n_kept > MAX_KEPT_LOGPROBS:
        raise ValueError(f"keep_logprobs would hold {n_kept:,} floats (prompts x layers x positions x vocab); "
                         f"decode fewer prompts, layers or positions, or use the top-k")

    # Heads stay on the pair's device for the whole run; with offload they are copies (small next to a model).
    heads = {}
    for which in whiches:
        with on_device(which) as model:
            head = Head.from_model(model)
            heads[which] = head.to(models.device) if paired and models.offload else head
    parts: dict[str, list[dict[str, torch.Tensor]]] = {w: [] for w in whiches}
    kls: dict[str, list[torch.Tensor]] = {"kl_instruct_base": [], "kl_base_instruct": []}
    chunks = batch.chunks(batch_size)
    params = dict(hook=hook, layers=layer_list, positions=labels, spec=str(spec), top_k=top_k, keep=keep_logprobs)
    for first_row, sub in tqdm(chunks, desc="logit lens", disable=not progress or len(chunks) < 2, leave=False):
        sub_tgt = None if tgt is None else tgt[first_row : first_row + len(sub)]

        def one_chunk(sub: ChatBatch = sub, sub_tgt: torch.Tensor | None = sub_tgt) -> dict[str, torch.Tensor]:
            resid = {}
            for which in whiches:
                with on_device(which) as model:
                    resid[which] = _capture(model, sub, hook, layer_list, spec)
            got = {which: _decode_chunk(heads[which], *resid[which], sub_tgt, top_k, pos_chunk, keep_logprobs)
                   for which in whiches}
            if paired:
                kib, kbi = _paired_kl(heads, resid, pos_chunk)
                got["kl"] = {"kl_instruct_base": kib, "kl_base_instruct": kbi}
            return checkpoints.pack(got)

        # A finished chunk is kept in the active run's store, so an interrupted run resumes after it.
        got = checkpoints.unpack(checkpoints.chunk(
            "logit_lens", [models[w] for w in whiches], params,
            [sub.input_ids, sub.attention_mask, sub.roles, sub_tgt], one_chunk))
        for which in whiches:
            parts[which].append(got[which])
        if paired:
            kls["kl_instruct_base"].append(got["kl"]["kl_instruct_base"])
            kls["kl_base_instruct"].append(got["kl"]["kl_base_instruct"])

    out: dict[str, Any] = {}
    for which in whiches:
        cat = {key: torch.cat([p[key] for p in parts[which]]) for key in parts[which][0]}
        out[which] = LensResult(model=names[which], hook=hook, layers=layer_list, positions=labels, token_ids=tok,
                                roles=roles, targets=tgt, **cat)
    if paired:
        out |= {key: torch.cat(v) for key, v in kls.items()}
    return out


def _paired_kl(heads: dict[str, Head], resid: dict[str, tuple], pos_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(instruct ‖ base) and KL(base ‖ instruct) `[b, layer, k]` for one chunk."""
    rb, ri = resid["base"][0], resid["instruct"][0]
    b, n_layers, k, _ = rb.shape
    kib, kbi = torch.empty(b, n_layers, k), torch.empty(b, n_layers, k)
    for p0 in range(0, k, pos_chunk):
        sl = slice(p0, p0 + pos_chunk)
        for li in range(n_layers):
            lb = heads["base"].logprobs(rb[:, li, sl])
            lq = heads["instruct"].logprobs(ri[:, li, sl]).to(lb.device)
            kib[:, li, sl], kbi[:, li, sl] = kl(lq, lb).cpu(), kl(lb, lq).cpu()
    return kib, kbi


class _nullctx:
    def __init__(self, value: Any):
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc: Any) -> None:
        return None


# ------------------------------------------------------------------------------------------- direction lens
@dataclass
class DirectionLens:
    """Tokens a direction promotes (largest logits) and suppresses (smallest), with their logit values.

    top_ids, top_logits, bottom_ids, bottom_logits: `[k]`; logits: `[d_vocab]` float64.
    """

    top_ids: torch.Tensor
    top_logits: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_logits: torch.Tensor
    logits: torch.Tensor

    def tokens(self, tokenizer: Any) -> dict[str, list[tuple[str, float]]]:
        """{"promoted": [(token, logit)], "suppressed": [...]}: decoded, for results.json."""
        dec = lambda ids, vals: [(tokenizer.decode([int(i)]), float(v)) for i, v in zip(ids, vals)]  # noqa: E731
        return {"promoted": dec(self.top_ids, self.top_logits), "suppressed": dec(self.bottom_ids, self.bottom_logits)}


def direction_logits(model_or_head: Any, direction: torch.Tensor, *, apply_norm_weight: bool = True) -> torch.Tensor:
    """`[d_vocab]` float64 logits `W_U (g ⊙ v)` of a direction `[d_model]` (module docstring: choice of scaling).

    With `apply_norm_weight=False`: plain `W_U v` (still centred for LayerNorm models).
    """
    head = model_or_head if isinstance(model_or_head, Head) else Head.from_model(model_or_head)
    v = torch.as_tensor(direction).detach().double().cpu()
    d_model = head.weight.shape[1]
    if v.shape != (d_model,):
        raise ValueError(f"direction must have shape [{d_model}], got {tuple(v.shape)}")
    _check_finite(v, "the direction")
    g, centre = head.norm_scale()
    if centre:
        v = v - v.mean()
    if apply_norm_weight:
        v = v * g
    return head.weight.detach().double().cpu() @ v


def direction_lens(model_or_head: Any, direction: torch.Tensor, *, k: int = 10, apply_norm_weight: bool = True) -> DirectionLens:
    """Top-k tokens promoted and suppressed by `direction` `[d_model]` through the model's unembedding."""
    logits = direction_logits(model_or_head, direction, apply_norm_weight=apply_norm_weight)
    if not 1 <= k <= logits.shape[0]:
        raise ValueError(f"k must be in 1..{logits.shape[0]}")
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    return DirectionLens(top_ids=top.indices, top_logits=top.values, bottom_ids=bottom.indices,
                         bottom_logits=bottom.values, logits=logits)
