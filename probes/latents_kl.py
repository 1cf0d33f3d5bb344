"""How much of the instruct model's next-token behaviour a set of dictionary latents explains: the KL gap.

Following Minder, Dumas et al. (NeurIPS 2025, "Overcoming Sparsity Artifacts in Crosscoders to Interpret
Chat-Tuning", arXiv 2504.02922; reference: `CrossCoderSteeringLatent` / `evaluate_interventions` of
science-of-finetuning/sparsity-artifacts-crosscoders): at layer l the instruct model is run from the BASE model's
activation with some latents' instruct - base decoder difference added back, and compared with its own output.

Splice, at `blocks.{l}.hook_resid_pre` (HF `hidden_states[l]`, the input of block l) of the instruct model, at every
real token of the prompt (padding keeps the instruct model's own activation, which no real token attends to):

    h ← h_base + Σ_{j∈S} f_j(x) (d_j^instruct / s_instruct − d_j^base / s_base)

with x the pair (h_base, h_instruct) at that token as the dictionary sees it (`prepare`: times the scales s),
f its code in inference mode, d_j^m latent j's decoder row for model m; dividing by s puts the decoder back in raw
units. For a `DiffSAE` (one decoder, of instruct − base) the difference is d_j / s. Then q_S is the instruct
model's next-token distribution at `position` (one per prompt, default the first response position), p the
unspliced one, and

    KL_S = KL(p ‖ q_S) (per prompt),   gap = mean KL_∅ (h = h_base),   recovery(S) = 1 − mean KL_S / gap.

Besides the caller's sets, every result holds four reference splices:
  "none"           S = ∅, the base activation alone (KL = gap, recovery 0);
  "all"            S = every latent (as the reference's "steer all"; no decoder bias);
  "reconstruction" h_base + (x̂_instruct / s_instruct − x̂_base / s_base), the full reconstructions with b_dec, so
                   "exact" − "reconstruction" is what the dictionary's error terms carry;
  "exact"          h_base + (h_instruct − h_base): the instruct activation again (KL 0 up to float rounding).

Departures from the reference: it averages the KL over every assistant token of chat conversations; this measures
one position per prompt (prompts here end before the response). The reference casts the spliced activation to
bfloat16; here it keeps the model's dtype. The KL direction is the reference's (`kl_div(log q, log p,
log_target=True)` = KL(p ‖ q)).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.activations import _StopForward, forward, last_logits
from probes.chat import ChatBatch
from probes.dictionaries import BatchTopKCrosscoder, DiffSAE, _Crosscoder
from probes.refusal import first_token_kl

REFERENCE_SETS: tuple[str, ...] = ("none", "all", "reconstruction", "exact")


@dataclass
class KLGapRecovery:
    """Result of `kl_gap_recovery`.

    gap: mean over prompts of KL(p ‖ q_∅) (nats). kl[name]: mean KL(p ‖ q_S) (nats); recovery[name]: 1 − kl / gap;
    per_prompt[name]: `[prompt]` float64 KLs; sizes[name]: |S| (-1 for "reconstruction" and "exact", which are not
    latent sets). Names: the caller's sets and `REFERENCE_SETS`. layer, position: where it was measured.
    """

    gap: float
    kl: dict[str, float]
    recovery: dict[str, float]
    per_prompt: dict[str, torch.Tensor]
    sizes: dict[str, int]
    layer: int
    position: str | int
    prompts: list[str] = field(default_factory=list)


def _check_dictionary(dictionary: Any, d_model: int) -> None:
    if not isinstance(dictionary, _Crosscoder):
        raise ValueError(f"dictionary must be a crosscoder or DiffSAE, got {type(dictionary).__name__}")
    if isinstance(dictionary, DiffSAE):
        if tuple(dictionary.models) != ("base", "instruct"):
            raise ValueError(f"the DiffSAE must be over ('base', 'instruct'), got {dictionary.models!r}")
    elif dictionary.n_models != 2 or set(dictionary.models) != {"base", "instruct"}:
        raise ValueError(f"the crosscoder must be over {{'base', 'instruct'}}, got {dictionary.models!r}")
    if dictionary.d_model != d_model:
        raise ValueError(f"the dictionary is {dictionary.d_model} wide, the pair's residual stream {d_model}")
    if torch.isnan(dictionary.scales).any():
        raise ValueError("the dictionary has no activation scales yet: train it, or call set_scales")
    if isinstance(dictionary, BatchTopKCrosscoder) and float(dictionary.threshold) < 0:
        raise ValueError("the BatchTopK dictionary has no inference threshold (train it past threshold_start_step, or "
                         "set dictionary.threshold): without one its codes depend on which tokens share a batch")


def _check_sets(latent_sets: Mapping[str, Sequence[int]], n_latents: int) -> dict[str, torch.Tensor]:
    if not isinstance(latent_sets, Mapping):
        raise ValueError(f"latent_sets must map names to latent indices, got {type(latent_sets).__name__}")
    out = {}
    for name, idx in latent_sets.items():
        if not isinstance(name, str) or name in REFERENCE_SETS:
            raise ValueError(f"set name {name!r} must be a string other than the reference splices {REFERENCE_SETS}")
        t = torch.as_tensor(list(idx), dtype=torch.long).reshape(-1) if not isinstance(idx, torch.Tensor) \
            else idx.reshape(-1).long()
        if t.numel() and (t.min() < 0 or t.max() >= n_latents):
            raise ValueError(f"set {name!r}: latent indices must lie in [0, {n_latents}), got {t.tolist()}")
        if t.unique().numel() != t.numel():
            raise ValueError(f"set {name!r} names a latent twice: {t.tolist()}")
        out[name] = t
    return out


def _capture(model: Any, batch: ChatBatch, name: str, stop_at: int | None) -> torch.Tensor:
    """`[batch, seq, d_model]` activation at hook `name`, the forward ended right after it."""
    got: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook: Any) -> None:
        got["x"] = act.detach().clone()
        raise _StopForward

    with model.hooks(fwd_hooks=[(name, grab)]):
        try:
            forward(model, batch, return_type=None, stop_at_layer=stop_at)
        except _StopForward:
            pass
    return got["x"]


def kl_gap_recovery(pair: Any, dictionary: _Crosscoder, batch: ChatBatch, layer: int,
                    latent_sets: Mapping[str, Sequence[int]], *, position: str | int = "post_instruction[-1]",
                    batch_size: int = 8, progress: bool = True) -> KLGapRecovery:
    """KL of the instruct model's next-token distribution when layer `layer`'s activation is the base one plus the
    instruct − base decoder difference of each latent set (module docstring), and the fraction of the gap closed.

    pair: a `ModelPair` (models "base", "instruct", same tokens); dictionary: a two-model crosscoder over
    {"base", "instruct"} or a `DiffSAE`, trained on `resid_pre` of `layer` (raw activations; its scales say how it
    normalised them). batch: the prompts; position: one position per prompt (a `ChatBatch.positions` spec).
    latent_sets: name -> latent indices (an empty set is the base activation). Per `batch_size` prompts: one
    forward of each model to `layer`, one clean instruct forward, one spliced instruct forward per set.
    Raises ValueError on bad input before any forward.
    """
    if not isinstance(batch, ChatBatch):
        raise ValueError(f"batch must be a ChatBatch (pair.encode(...)), got {type(batch).__name__}")
    if len(batch) == 0:
        raise ValueError("empty batch")
    n_layers, d_model = int(pair.base.cfg.n_layers), int(pair.base.cfg.d_model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an integer in [0, {n_layers}), got {layer!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_dictionary(dictionary, d_model)
    sets = _check_sets(latent_sets, dictionary.n_latents)
    if batch.positions(position)[0].shape[1] != 1:
        raise ValueError(f"position {position!r} selects several positions; the KL needs exactly one per prompt")

    dictionary.eval()
    dev = dictionary.W_enc.device
    W = dictionary.W_dec.detach()
    s = dictionary.scales.detach()
    if isinstance(dictionary, DiffSAE):
        delta_dec = W[:, 0] / s[0]                                       # [n_latents, d]
        b_delta = dictionary.b_dec.detach()[0] / s[0]
    else:
        bi, ii = dictionary.models.index("base"), dictionary.models.index("instruct")
        delta_dec = W[:, ii] / s[ii] - W[:, bi] / s[bi]
        b_delta = dictionary.b_dec.detach()[ii] / s[ii] - dictionary.b_dec.detach()[bi] / s[bi]
    names = ["none", *sets, "all", "reconstruction", "exact"]
    kls: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hook = f"blocks.{layer}.hook_resid_pre"
    stop_at = layer + 1 if layer + 1 < n_layers else None
    chunks = batch.chunks(batch_size)
    for _, sub in tqdm(chunks, desc=f"KL gap at layer {layer}", disable=not progress, leave=False):
        with pair.on_device("base") as base:
            h_base = _capture(base, sub, hook, stop_at)
        with pair.on_device("instruct") as model:
            got: dict[str, torch.Tensor] = {}  # the instruct activation, read in its clean forward

            def grab(act: torch.Tensor, hook: Any) -> None:
                got["x"] = act.detach().clone()

            p = last_logits(model, sub, [(hook, grab)], position=position, batch_size=len(sub))
            h_inst = got["x"]
            real = sub.attention_mask.bool().to(h_inst.device)           # [b, seq]
            hb, hi = h_base.to(h_inst.device)[real], h_inst[real]         # [tokens, d]
            with torch.no_grad():
                x = dictionary.prepare({"base": hb.to(dev), "instruct": hi.to(dev)})
                f = dictionary.encode(x)                                  # [tokens, n_latents]
                deltas = {"none": torch.zeros_like(hb, dtype=torch.float32, device=dev)}
                for n, idx in sets.items():
                    idx = idx.to(dev)
                    deltas[n] = f[:, idx] @ delta_dec[idx]
                deltas["all"] = f @ delta_dec
                deltas["reconstruction"] = deltas["all"] + b_delta
            for n in names:
                if n == "exact":
                    spliced_real = hb + (hi - hb)
                else:
                    spliced_real = hb + deltas[n].to(hb.device, hb.dtype)
                spliced = h_inst.clone()
                spliced[real] = spliced_real

                def put(act: torch.Tensor, hook: Any, spliced: torch.Tensor = spliced) -> torch.Tensor:
                    if act.shape != spliced.shape:
                        raise RuntimeError(f"{hook.name} is {tuple(act.shape)}, the splice {tuple(spliced.shape)}")
                    return spliced

                q = last_logits(model, sub, [(hook, put)], position=position, batch_size=len(sub))
                kls[n].append(first_token_kl(p, q))
    per_prompt = {n: torch.cat(v) for n, v in kls.items()}
    gap = float(per_prompt["none"].mean())
    kl = {n: float(v.mean()) for n, v in per_prompt.items()}
    recovery = {n: (1 - kl[n] / gap) if gap > 0 else float("nan") for n in names}
    sizes = {"none": 0, **{n: int(t.numel()) for n, t in sets.items()}, "all": dictionary.n_latents,
             "reconstruction": -1, "exact": -1}
    return KLGapRecovery(gap=gap, kl=kl, recovery=recovery, per_prompt=per_prompt, sizes=sizes, layer=layer,
                         position=position, prompts=list(batch.instructions))


def random_latent_sets(n_latents: int, size: int, n_draws: int, seed: int = 0,
                       exclude: Sequence[int] | None = None) -> dict[str, list[int]]:
    """`n_draws` random sets of `size` distinct latents from [0, n_latents) minus `exclude`, named "random-0",
    "random-1", ...: the control for a latent set (draw sets the size of the chat-only set from the other
    latents). Each set sorted; reproducible from `seed`."""
    for name, v in (("n_latents", n_latents), ("size", size), ("n_draws", n_draws)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name != "size" else 0):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'size' else 'positive'} integer, got {v!r}")
    ex = set() if exclude is None else {int(i) for i in exclude}
    if any(not 0 <= i < n_latents for i in ex):
        raise ValueError(f"exclude must hold indices in [0, {n_latents}), got {sorted(ex)}")
    pool = torch.tensor([i for i in range(n_latents) if i not in ex], dtype=torch.long)
    if size > pool.numel():
        raise ValueError(f"sets of {size} latents cannot be drawn from the {pool.numel()} not excluded")
    g = torch.Generator().manual_seed(seed)
    return {f"random-{k}": sorted(pool[torch.randperm(pool.numel(), generator=g)[:size]].tolist())
            for k in range(n_draws)}
