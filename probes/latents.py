"""What a dictionary's latents do on the tokens: where their activation mass lies (by chat role and prompt set),
the tokens they fire hardest on, how their decoder vectors line up with a direction, and what adding one to the
residual stream does to the refusal score.

Dictionaries are `probes.dictionaries` crosscoders / diff-SAEs; batches are what
`probes.store.Store.iter_batches(rows, layers=<int>)` yields: `{"base": [rows, d], "instruct": [rows, d],
"prompt_id", "position", "role", "set": [rows] int64}` (roles index `probes.chat.ROLES`, sets index
`Store.sets`). Codes are always the dictionary's inference-mode codes, `dictionary.encode(dictionary.prepare(b))`
after `eval()`: for a BatchTopK dictionary that is its threshold (or, while the threshold is unset, BatchTopK over
each batch, so codes then depend on the batch size, as in `probes.dictionaries`).

Units: the dictionary sees `x = scale_m * raw_m` (`prepare`, one positive scalar per model), so a decoder row
`d_j^m` is in those units and the raw-space vector it writes is `d_j^m / scale_m` (`decoder_direction`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probes.activations import last_logits
from probes.chat import ROLES, ChatBatch
from probes.dictionaries import Batch, DiffSAE, _Crosscoder, _iter
from probes.directions import Direction, addition_hooks, cosine
from probes.refusal import _token_mask, refusal_score

LABELS: tuple[str, ...] = ("set", "prompt_id", "position", "role")


# ------------------------------------------------------------------------------------------------ inputs

def _check_dictionary(dictionary: Any) -> None:
    if not isinstance(dictionary, _Crosscoder):
        raise ValueError(f"dictionary must be a probes.dictionaries crosscoder or DiffSAE, got "
                         f"{type(dictionary).__name__}")


def _latents(dictionary: _Crosscoder, latents: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """`[L]` long: the chosen latent indices (None: all), checked to be distinct and in range."""
    n = dictionary.n_latents
    if latents is None:
        return torch.arange(n)
    idx = torch.as_tensor(latents)
    if idx.ndim > 1 or idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"latents must be a non-empty list of integer indices, got {latents!r}")
    idx = idx.reshape(-1).long()
    if idx.min() < 0 or idx.max() >= n:
        raise ValueError(f"latents must lie in [0, {n}), got {idx.tolist()}")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"latents repeat: {idx.tolist()}")
    return idx


def _labels(batch: Batch, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The batch's per-token labels `[rows]` (integer), checked before any encoding."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a mapping, got {type(batch).__name__}")
    out = {}
    for k in keys:
        t = batch.get(k)
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"batch[{k!r}] must be an integer tensor [rows], got {shape}")
        out[k] = t.long()
    if len({t.shape[0] for t in out.values()}) > 1:
        raise ValueError(f"labels have different row counts: { {k: t.shape[0] for k, t in out.items()} }")
    if "role" in out and out["role"].numel() and (out["role"].min() < 0 or out["role"].max() >= len(ROLES)):
        raise ValueError(f"batch['role'] holds indices outside probes.chat.ROLES (0..{len(ROLES) - 1})")
    if "set" in out and out["set"].numel() and out["set"].min() < 0:
        raise ValueError("batch['set'] holds negative set indices")
    return out


def _codes(dictionary: _Crosscoder, batch: Batch, idx: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[rows, L]` inference-mode codes of the chosen latents (on the dictionary's device)."""
    f = dictionary.encode(dictionary.prepare(batch))
    rows = next(iter(labels.values())).shape[0]
    if f.shape[0] != rows:
        raise ValueError(f"the batch has {f.shape[0]} activation rows but {rows} label rows")
    return f[:, idx.to(f.device)]


# ------------------------------------------------------------------------------------------------ role mass

@dataclass
class RoleMass:
    """Where the chosen latents' activation lies.

    latents `[L]`; by_role `[L, n_roles]` float64: Σ of each latent's activation over the tokens of each role
    (columns in `roles` = `probes.chat.ROLES` order); by_set `[L, n_sets]` float64: the same per prompt set;
    tokens_by_role `[n_roles]`, tokens_by_set `[n_sets]` int64: tokens seen; fires `[L]` int64: tokens where the
    latent's activation is > 0.
    """

    latents: torch.Tensor
    by_role: torch.Tensor
    by_set: torch.Tensor
    tokens_by_role: torch.Tensor
    tokens_by_set: torch.Tensor
    fires: torch.Tensor
    roles: tuple[str, ...] = ROLES

    def _role_index(self, roles: Sequence[str]) -> list[int]:
        if isinstance(roles, str):
            roles = [roles]
        roles = list(roles)
        unknown = [r for r in roles if r not in self.roles]
        if not roles or unknown:
            raise ValueError(f"unknown roles {unknown or roles!r}; roles are {self.roles}")
        return sorted({self.roles.index(r) for r in roles})

    def share(self, roles: Sequence[str]) -> torch.Tensor:
        """`[L]` float64: the fraction of each latent's activation mass on tokens of `roles` (NaN for a latent
        that never fires)."""
        cols = self._role_index(roles)
        total = self.by_role.sum(-1)
        return torch.where(total > 0, self.by_role[:, cols].sum(-1) / total.clamp_min(1e-300), torch.nan)

    def per_token(self) -> torch.Tensor:
        """`[L, n_roles]` float64: mean activation per token of each role (NaN for a role with no tokens), which
        corrects the mass for how many tokens each role has."""
        n = self.tokens_by_role.double()
        return torch.where(n > 0, self.by_role / n.clamp_min(1), torch.nan)

    def main_role(self) -> list[str]:
        """The role holding most of each latent's mass; "none" for a latent that never fires."""
        best = self.by_role.argmax(-1).tolist()
        return [self.roles[b] if t > 0 else "none" for b, t in zip(best, self.by_role.sum(-1).tolist())]


def role_mass(dictionary: _Crosscoder, batches: Iterable[Batch], latents: Sequence[int] | torch.Tensor | None = None,
              *, n_sets: int | None = None, progress: bool = False) -> RoleMass:
    """Sum of each latent's inference-mode activation over the tokens of each chat role and each prompt set,
    streamed, in float64.

    batches: store batches (with "role" and "set"), or a callable returning them. latents: None = all.
    n_sets: the number of prompt sets (`len(Store.sets)`); None = one more than the largest set index seen.
    """
    _check_dictionary(dictionary)
    idx = _latents(dictionary, latents)
    if n_sets is not None and (not isinstance(n_sets, int) or isinstance(n_sets, bool) or n_sets < 1):
        raise ValueError(f"n_sets must be a positive integer, got {n_sets!r}")
    dev = dictionary.W_enc.device
    n_roles = len(ROLES)
    by_role = torch.zeros(len(idx), n_roles, dtype=torch.float64, device=dev)
    by_set = torch.zeros(len(idx), n_sets or 0, dtype=torch.float64, device=dev)
    tok_role = torch.zeros(n_roles, dtype=torch.long)
    tok_set = torch.zeros(n_sets or 0, dtype=torch.long)
    fires = torch.zeros(len(idx), dtype=torch.long, device=dev)
    seen = 0
    dictionary.eval()
    with torch.no_grad():
        for b in _iter(batches, progress, "role mass"):
            lab = _labels(b, ("role", "set"))
            role, sets = lab["role"], lab["set"]
            top = int(sets.max()) + 1 if sets.numel() else 0
            if n_sets is not None and top > n_sets:
                raise ValueError(f"batch['set'] holds set {top - 1}, but n_sets={n_sets}")
            if top > by_set.shape[1]:  # n_sets=None: grow to the sets seen so far
                by_set = torch.cat([by_set, by_set.new_zeros(len(idx), top - by_set.shape[1])], 1)
                tok_set = torch.cat([tok_set, tok_set.new_zeros(top - tok_set.shape[0])])
            f = _codes(dictionary, b, idx, lab).double()              # [rows, L]
            by_role += f.T @ torch.nn.functional.one_hot(role, n_roles).to(f)
            by_set += f.T @ torch.nn.functional.one_hot(sets, by_set.shape[1]).to(f)
            tok_role += torch.bincount(role, minlength=n_roles)
            tok_set += torch.bincount(sets, minlength=tok_set.shape[0])
            fires += (f > 0).sum(0)
            seen += f.shape[0]
    if seen == 0:
        raise ValueError("no batches")
    return RoleMass(latents=idx, by_role=by_role.cpu(), by_set=by_set.cpu(), tokens_by_role=tok_role,
                    tokens_by_set=tok_set, fires=fires.cpu())


# ------------------------------------------------------------------------------------------------ top activations

def top_activations(dictionary: _Crosscoder, batches: Iterable[Batch], latents: Sequence[int] | torch.Tensor,
                    k: int = 10, *, progress: bool = False) -> dict[int, list[dict[str, Any]]]:
    """The `k` tokens on which each latent fires hardest: `{latent: [{"value", "set", "prompt_id", "position",
    "role"}, ...]}`, highest first; only tokens where the latent is active (> 0), so a latent may have fewer than
    `k` (none if dead). role: the role's name; set: the index into `Store.sets`. Ties keep stream order (the
    earlier token first).

    Streamed: memory holds the running top `k` of every chosen latent plus one batch's codes.
    """
    _check_dictionary(dictionary)
    if latents is None:
        raise ValueError("top_activations needs the latents to look at")
    idx = _latents(dictionary, latents)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    best_v: torch.Tensor | None = None   # [≤k, L]
    best_m: torch.Tensor | None = None   # [≤k, L, 4] labels in LABELS order
    dictionary.eval()
    with torch.no_grad():
        for b in _iter(batches, progress, "top activations"):
            lab = _labels(b, LABELS)
            f = _codes(dictionary, b, idx, lab).float().cpu()        # [rows, L]
            meta = torch.stack([lab[key] for key in LABELS], -1)      # [rows, 4]
            v, order = f.sort(dim=0, descending=True, stable=True)
            v, order = v[:k], order[:k]                               # this batch's top k per latent
            m = meta[order]                                           # [k', L, 4]
            if best_v is not None:                                    # earlier tokens first: ties keep them
                v, m = torch.cat([best_v, v]), torch.cat([best_m, m])
                v, order = v.sort(dim=0, descending=True, stable=True)
                v, order = v[:k], order[:k]
                m = m.gather(0, order[..., None].expand(-1, -1, m.shape[-1]))
            best_v, best_m = v, m
    if best_v is None:
        raise ValueError("no batches")
    out: dict[int, list[dict[str, Any]]] = {}
    for c, j in enumerate(idx.tolist()):
        rows = []
        for r in range(best_v.shape[0]):
            value = float(best_v[r, c])
            if value <= 0:
                break
            s, p, pos, role = best_m[r, c].tolist()
            rows.append(dict(value=value, set=s, prompt_id=p, position=pos, role=ROLES[role]))
        out[j] = rows
    return out


# ------------------------------------------------------------------------------------------------ decoder geometry

def _model_index(dictionary: _Crosscoder, model: str) -> int:
    """Which decoder `model` names. A DiffSAE has one, writing instruct - base: named by the instruct model (the
    model whose side of the difference it describes) or by "instruct-base"."""
    if isinstance(dictionary, DiffSAE):
        names = (dictionary.models[1], f"{dictionary.models[1]}-{dictionary.models[0]}")
        if model not in names:
            raise ValueError(f"a DiffSAE has one decoder (of {names[1]}); model must be one of {names}, got {model!r}")
        return 0
    if model not in dictionary.models or dictionary.models.index(model) >= dictionary.n_models:
        raise ValueError(f"model must be one of {dictionary.models[:dictionary.n_models]}, got {model!r}")
    return dictionary.models.index(model)


def decoder_cosines(dictionary: _Crosscoder, direction: Direction | torch.Tensor, model: str = "instruct") -> torch.Tensor:
    """`[n_latents]` float64: cosine of each latent's decoder vector for `model` with a raw-space `direction`
    `[d_model]` (a Direction: its raw mean difference).

    The dictionary's normalisation multiplies each model's activations by one positive scalar, so a decoder
    vector in raw units is the normalised one divided by that scalar: same direction, and the cosine is unchanged.
    """
    _check_dictionary(dictionary)
    m = _model_index(dictionary, model)
    v = direction.raw if isinstance(direction, Direction) else direction
    if not isinstance(v, torch.Tensor) or v.shape != (dictionary.d_model,):
        raise ValueError(f"direction must be [d_model={dictionary.d_model}], got "
                         f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
    v = v.detach().double().cpu()
    if not torch.isfinite(v).all() or v.norm() == 0:
        raise ValueError("direction is zero or not finite")
    return cosine(dictionary.W_dec.detach()[:, m].double().cpu(), v[None])


def decoder_direction(dictionary: _Crosscoder, latent: int, model: str = "instruct") -> torch.Tensor:
    """`[d_model]` float64: what one unit of `latent`'s code adds to `model`'s raw activations, `d_j^m / scale_m`
    (prepare feeds the dictionary `scale_m * raw`, so its reconstruction in raw units is `x̂ / scale_m`)."""
    _check_dictionary(dictionary)
    m = _model_index(dictionary, model)
    if not isinstance(latent, int) or isinstance(latent, bool) or not 0 <= latent < dictionary.n_latents:
        raise ValueError(f"latent must be an index in [0, {dictionary.n_latents}), got {latent!r}")
    scale = dictionary.scales.detach()[m]
    if torch.isnan(scale):
        raise ValueError("the dictionary has no activation scales yet: train it, or call set_scales")
    return (dictionary.W_dec.detach()[latent, m].double() / scale.double()).cpu()


# ------------------------------------------------------------------------------------------------ steering

def steering_effect(model: Any, batch: ChatBatch, direction: Direction | torch.Tensor, layer: int,
                    coeffs: Sequence[float] | torch.Tensor, token_ids: Sequence[int], *, batch_size: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """`[len(coeffs)]` float64: mean refusal score (`probes.refusal.refusal_score` of the last position's logits)
    over `batch` with `coeff x direction` added to `resid_pre` of `layer` at every position
    (`probes.directions.addition_hooks`), for each coefficient; a coefficient of 0 runs without hooks (the
    baseline). direction: raw units, e.g. `decoder_direction(dictionary, j)` (a Direction adds its raw mean
    difference)."""
    if not isinstance(batch, ChatBatch) or len(batch) == 0:
        raise ValueError("batch must be a non-empty ChatBatch")
    c = torch.as_tensor(coeffs, dtype=torch.float64)
    if c.ndim != 1 or c.numel() == 0 or not torch.isfinite(c).all():
        raise ValueError(f"coeffs must be a non-empty list of finite numbers, got {coeffs!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    addition_hooks(model, direction, layer, 0.0)  # checks layer and direction before any forward
    _token_mask(token_ids, int(model.cfg.d_vocab))
    out = []
    for coeff in c.tolist():
        hooks = addition_hooks(model, direction, layer, coeff) if coeff != 0 else []
        logits = last_logits(model, batch, hooks, batch_size=batch_size, progress=progress)
        out.append(refusal_score(logits, token_ids).mean())
    return torch.stack(out)


__all__ = ["LABELS", "RoleMass", "decoder_cosines", "decoder_direction", "role_mass", "steering_effect",
           "top_activations"]
