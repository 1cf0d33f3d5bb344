"""Sparse dictionaries over paired base / instruct activations: crosscoders, a diff-SAE, and Latent Scaling.

- `BatchTopKCrosscoder`: one shared code over both models' activations (Lindsey et al. 2024, "Sparse Crosscoders"),
  sparsified with BatchTopK as in Minder, Dumas et al. (NeurIPS 2025, "Overcoming Sparsity Artifacts in
  Crosscoders to Interpret Chat-Tuning"), following the reference `BatchTopKCrossCoder` of
  science-of-finetuning/dictionary_learning.
- `L1Crosscoder`: ReLU code with Lindsey's decoder-norm-weighted L1 penalty, for comparison (the loss whose
  Complete Shrinkage and Latent Decoupling the paper describes).
- `DiffSAE`: a BatchTopK SAE on `instruct - base` (the one-model case of the same class, unit-norm decoder as the
  reference `BatchTopKSAE`).
- `train`: Adam over streamed `{"base": [rows, d], "instruct": [rows, d]}` batches (what
  `probes.store.Store.iter_batches(..., layers=<int>)` yields; other keys are ignored).
- `latent_scaling`: the paper's closed-form β of each latent in each model and the ratios ν_ε, ν_r.
- `delta_norm`, `classify`, `fvu`, `dead_latents`.

Shapes: `x` is `[rows, n_models, d_model]` in the dictionary's normalised space (`prepare`), codes are
`[rows, n_latents]`. Normalisation: one scalar per model, set by `train` from its first batches, so that
E||x_m||² = d_model (the reference also scales by one dataset-level number per model); every function here reads
activations through `prepare`, so they all see that space, and Latent Scaling's β are measured in it.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

Batch = Mapping[str, torch.Tensor]
Batches = Iterable[Batch] | Callable[[], Iterable[Batch]]
KINDS: tuple[str, ...] = ("shared", "chat-only", "base-only", "other")


# ------------------------------------------------------------------------------------------------ dictionaries

class _Crosscoder(nn.Module):
    """Shared encoder over the models' activations, one decoder per model.

    W_enc `[n_models, d_model, n_latents]`, b_enc `[n_latents]`, W_dec `[n_latents, n_models, d_model]`,
    b_dec `[n_models, d_model]`; `scales` `[n_models]` multiplies raw activations (NaN until `train` sets it).
    Initialisation as the reference: encoder Kaiming-uniform with each (model, latent) column rescaled to norm 1,
    decoder its transpose, biases zero.
    """

    def __init__(self, d_model: int, n_latents: int, n_models: int = 2,
                 models: Sequence[str] = ("base", "instruct")) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("n_latents", n_latents), ("n_models", n_models)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        models = tuple(models)
        if len(set(models)) != len(models) or not all(isinstance(m, str) for m in models):
            raise ValueError(f"models must be distinct names, got {models!r}")
        if n_models > 1 and len(models) != n_models:
            raise ValueError(f"{n_models} models need {n_models} names, got {models!r}")
        self.d_model, self.n_latents, self.n_models, self.models = d_model, n_latents, n_models, models
        w = nn.init.kaiming_uniform_(torch.empty(n_models, d_model, n_latents))
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_enc = nn.Parameter(w)
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(w.permute(2, 0, 1).clone())
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))
        self.register_buffer("scales", torch.full((n_models,), float("nan")))

    # -- inputs
    def _raw(self, batch: Batch) -> torch.Tensor:
        """`[rows, n_models, d_model]` float32, unscaled; checks keys, shapes and finiteness."""
        if not isinstance(batch, Mapping):
            raise ValueError(f"a batch must be a mapping of model name -> [rows, d_model], got {type(batch).__name__}")
        missing = [m for m in self.models if m not in batch]
        if missing:
            raise ValueError(f"batch lacks {missing} (has {sorted(batch)})")
        acts = [batch[m] for m in self.models]
        for m, a in zip(self.models, acts):
            if not isinstance(a, torch.Tensor) or a.ndim != 2 or a.shape[1] != self.d_model or a.shape[0] < 1:
                shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"batch[{m!r}] must be [rows, {self.d_model}], got {shape}")
        if len({a.shape[0] for a in acts}) != 1:
            raise ValueError(f"models have different row counts: {[a.shape[0] for a in acts]}")
        x = torch.stack([a.float() for a in acts], 1)
        if not torch.isfinite(x).all():
            raise ValueError("batch has NaN or infinite activations")
        return x

    def _input(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def prepare(self, batch: Batch) -> torch.Tensor:
        """A batch as the dictionary sees it: `[rows, n_models, d_model]`, scaled by `scales`."""
        if torch.isnan(self.scales).any():
            raise ValueError("the dictionary has no activation scales yet: train it, or call set_scales")
        x = self._input(self._raw(batch)).to(self.W_enc.device)
        return x * self.scales.view(1, -1, 1)

    def set_scales(self, scales: torch.Tensor | Sequence[float]) -> None:
        """Set the per-model activation multipliers `[n_models]` (positive, finite)."""
        s = torch.as_tensor(scales, dtype=torch.float32).reshape(-1)
        if s.numel() != self.n_models or not (torch.isfinite(s) & (s > 0)).all():
            raise ValueError(f"scales must be {self.n_models} positive finite numbers, got {s.tolist()}")
        self.scales.copy_(s.to(self.scales.device))

    # -- code
    def decoder_norms(self) -> torch.Tensor:
        """`[n_latents, n_models]`: ||d_j^m||."""
        return self.W_dec.norm(dim=-1)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(Σ_m x_m W_enc[m] + b_enc): `[rows, n_latents]`."""
        return torch.relu(torch.einsum("bmd,mdl->bl", x, self.W_enc) + self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """`[rows, n_latents]` -> `[rows, n_models, d_model]` (with b_dec)."""
        return torch.einsum("bl,lmd->bmd", f, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f


class BatchTopKCrosscoder(_Crosscoder):
    """BatchTopK crosscoder (Minder, Dumas et al. 2025), `n_models=1` a BatchTopK SAE.

    Training (`self.training`): of the batch's `rows x n_latents` ReLU pre-activations f, the `k x rows` with the
    largest score f_j · Σ_m ||d_j^m|| are kept (their unscaled f), the rest zeroed, so exactly `k x rows` codes
    are nonzero when that many pre-activations are positive. Inference (`eval()`): f_j is kept where its score
    exceeds `threshold`, the running estimate `train` keeps of the smallest kept score; while the threshold is
    unset (negative) inference falls back to BatchTopK over the batch, as the reference does.
    """

    def __init__(self, d_model: int, n_latents: int, k: int, n_models: int = 2,
                 models: Sequence[str] = ("base", "instruct")) -> None:
        super().__init__(d_model, n_latents, n_models, models)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_latents:
            raise ValueError(f"k must be an integer in [1, n_latents={n_latents}], got {k!r}")
        self.k = k
        self.register_buffer("threshold", torch.tensor(-1.0))

    def scores(self, f: torch.Tensor) -> torch.Tensor:
        """Activation times the latent's summed decoder norm: what BatchTopK ranks and the threshold cuts."""
        return f * self.decoder_norms().sum(-1)

    def batch_topk(self, f: torch.Tensor) -> torch.Tensor:
        """Keep the `k x rows` largest scores of the batch (values: f itself)."""
        flat = self.scores(f).flatten()
        idx = flat.topk(min(self.k * f.shape[0], flat.numel()), sorted=False).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).view_as(f)
        return f * mask

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        f = self.pre_activations(x)
        if self.training or float(self.threshold) < 0:
            return self.batch_topk(f)
        return f * (self.scores(f) > self.threshold)


class L1Crosscoder(_Crosscoder):
    """ReLU crosscoder with Lindsey et al.'s loss Σ_m ||x_m - x̂_m||² + λ Σ_j f_j Σ_m ||d_j^m|| (`train` adds it).

    `l1`: λ. The reference `CrossCoderTrainer` trains the unsquared L2 norm and an L1 on the code; this follows
    the crosscoder paper's loss, as the brief for this module asks.
    """

    def __init__(self, d_model: int, n_latents: int, l1: float = 1.0, n_models: int = 2,
                 models: Sequence[str] = ("base", "instruct")) -> None:
        super().__init__(d_model, n_latents, n_models, models)
        if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):
            raise ValueError(f"l1 must be a finite non-negative number, got {l1!r}")
        self.l1 = float(l1)

    def sparsity(self, f: torch.Tensor) -> torch.Tensor:
        """Mean over rows of Σ_j f_j Σ_m ||d_j^m||."""
        return (f * self.decoder_norms().sum(-1)).sum(-1).mean()


class DiffSAE(BatchTopKCrosscoder):
    """BatchTopK SAE on `batch[models[1]] - batch[models[0]]` (instruct - base): one "model", unit-norm decoder."""

    def __init__(self, d_model: int, n_latents: int, k: int, models: Sequence[str] = ("base", "instruct")) -> None:
        models = tuple(models)
        if len(models) != 2:
            raise ValueError(f"DiffSAE needs (base, instruct) names, got {models!r}")
        super().__init__(d_model, n_latents, k, n_models=1, models=models)
        with torch.no_grad():  # the reference SAE starts from a unit-norm decoder and keeps it there
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            self.W_enc.copy_(self.W_dec.permute(1, 2, 0))

    def _input(self, raw: torch.Tensor) -> torch.Tensor:
        return raw[:, 1:2] - raw[:, 0:1]


# ------------------------------------------------------------------------------------------------ training

@dataclass
class TrainingRecord:
    """Per step: `loss` (total), `mse` (Σ_m squared error, mean over rows), `aux` (AuxK for BatchTopK, the
    λ-free sparsity term for L1), `lr`; `dead` latents at the end (no fire for `dead_after_tokens`), `threshold`
    (BatchTopK inference threshold, NaN for L1), `scales` the normalisation multipliers."""

    loss: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    dead: int = 0
    threshold: float = float("nan")
    scales: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.loss)


def _stream(batches: Batches) -> Iterator[Batch]:
    """A callable is called again each time its iterable runs out; a re-iterable (list) is cycled; a one-shot
    iterator is read once."""
    if callable(batches):
        while True:
            got = False
            for b in batches():
                got = True
                yield b
            if not got:
                return
    if iter(batches) is batches:
        yield from batches
        return
    while True:
        got = False
        for b in batches:
            got = True
            yield b
        if not got:
            return


def _geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's iteration over rows of `[rows, d]` (the reference starts b_dec there)."""
    guess = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - guess).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - guess).norm() < tol:
            return new
        guess = new
    return guess


def _lr_factor(step: int, steps: int, warmup: int, decay_start: int | None) -> float:
    f = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if decay_start is not None and step >= decay_start:
        f *= max(0.0, (steps - step) / max(1, steps - decay_start))
    return f


def train(dictionary: _Crosscoder, batches: Batches, steps: int, lr: float | None = None, *,
          auxk_alpha: float = 1 / 32, dead_after_tokens: int = 10_000_000, warmup_steps: int = 1000,
          decay_start: int | None = None, threshold_beta: float = 0.999, threshold_start_step: int = 1000,
          scale_batches: int = 10, grad_clip: float = 1.0, progress: bool = True, seed: int = 0) -> TrainingRecord:
    """Train `dictionary` in place for up to `steps` batches; returns the `TrainingRecord`.

    batches: mappings `{model: [rows, d_model]}` (extra keys ignored), or a callable returning a fresh iterable
    (called again when one runs out); a list is cycled, a one-shot iterator ends training when it runs out.
    Before the first step: the scales (if unset) from the first `scale_batches` batches, one per model, such that
    E||x_m||² = d_model; b_dec at the geometric median of the first batch (reference). lr: None = the reference's
    2e-4 / sqrt(n_latents / 2^14). Adam (0.9, 0.999), linear warmup over `warmup_steps`, linear decay to 0 from
    `decay_start` (None: none), gradient norm clipped at `grad_clip`.

    BatchTopK: loss = Σ_m MSE + auxk_alpha · AuxK, where AuxK (reference, after OpenAI's TopK SAE) reconstructs
    the detached residual from the top `d_model // 2` per-row scores among latents that have not fired for
    `dead_after_tokens` tokens, without b_dec, normalised by the residual's variance. Departure: the reference
    crosscoder trainer trains the mean unsquared L2 norm per model; here the squared error summed over models.
    The inference threshold: EMA (`threshold_beta`) of the batch's smallest kept score, after
    `threshold_start_step`. Decoder norms: free for crosscoders (they carry model specificity, as the reference);
    for `n_models=1` (DiffSAE) kept at 1 with the gradient parallel to each decoder row removed, as the reference
    SAE. L1: loss = Σ_m MSE + λ Σ_j f_j Σ_m ||d_j^m||, decoder norms free.
    """
    if not isinstance(dictionary, _Crosscoder):
        raise ValueError(f"dictionary must be a crosscoder or DiffSAE, got {type(dictionary).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 < threshold_beta < 1 or not isinstance(scale_batches, int) or scale_batches < 1:
        raise ValueError("threshold_beta must lie in (0, 1) and scale_batches be a positive integer")
    topk = isinstance(dictionary, BatchTopKCrosscoder)
    unit_decoder = topk and dictionary.n_models == 1
    torch.manual_seed(seed)
    stream = _stream(batches)
    head = list(itertools.islice(stream, scale_batches))
    if not head:
        raise ValueError("no batches to train on")
    raws = [dictionary._input(dictionary._raw(b)) for b in head]  # checks every head batch before any step
    if torch.isnan(dictionary.scales).any():
        sq = torch.stack([r.double().pow(2).sum(-1).sum(0) for r in raws]).sum(0)  # [n_models]
        rows = sum(r.shape[0] for r in raws)
        mean_sq = sq / rows
        if (mean_sq <= 0).any():
            raise ValueError("a model's activations are all zero: no scale makes E||x||^2 = d_model")
        dictionary.set_scales((dictionary.d_model / mean_sq).sqrt().float())
    lr = lr if lr is not None else 2e-4 / (dictionary.n_latents / 2**14) ** 0.5
    dev = dictionary.W_enc.device
    with torch.no_grad():
        x0 = raws[0].to(dev) * dictionary.scales.view(1, -1, 1)
        dictionary.b_dec.copy_(torch.stack([_geometric_median(x0[:, m]) for m in range(dictionary.n_models)]))
    del raws
    opt = torch.optim.Adam(dictionary.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(dictionary.n_latents, dtype=torch.long, device=dev)
    record = TrainingRecord()
    dictionary.train()
    k_aux = dictionary.d_model // 2
    bar = tqdm(total=steps, desc=f"train {type(dictionary).__name__}", disable=not progress, leave=False)
    for step, batch in enumerate(itertools.chain(head, stream)):
        if step >= steps:
            break
        x = dictionary.prepare(batch)
        factor = _lr_factor(step, steps, warmup_steps, decay_start)
        for g in opt.param_groups:
            g["lr"] = lr * factor
        pre = dictionary.pre_activations(x)
        if topk:
            f = dictionary.batch_topk(pre)
        else:
            f = pre
        x_hat = dictionary.decode(f)
        e = x - x_hat
        mse = e.pow(2).sum(-1).sum(-1).mean()
        fired = (f > 0).any(0)
        since_fired += x.shape[0]
        since_fired[fired] = 0
        if topk:
            aux = _auxk(dictionary, e.detach(), pre, since_fired >= dead_after_tokens, k_aux)
            loss = mse + auxk_alpha * aux
            if step > threshold_start_step:
                with torch.no_grad():
                    s = dictionary.scores(f)
                    kept = s[s > 0]
                    low = kept.min() if kept.numel() else torch.zeros((), device=dev)
                    t = dictionary.threshold
                    dictionary.threshold.copy_(low if t < 0 else threshold_beta * t + (1 - threshold_beta) * low)
        else:
            aux = dictionary.sparsity(f)
            loss = mse + dictionary.l1 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if unit_decoder:
            with torch.no_grad():  # gradient along each (unit) decoder row would only change its norm
                w, g = dictionary.W_dec, dictionary.W_dec.grad
                g -= (g * w).sum(-1, keepdim=True) * w
        if grad_clip:
            nn.utils.clip_grad_norm_(dictionary.parameters(), grad_clip)
        opt.step()
        if unit_decoder:
            with torch.no_grad():
                dictionary.W_dec.div_(dictionary.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))
        record.loss.append(loss.item())
        record.mse.append(mse.item())
        record.aux.append(aux.item())
        record.lr.append(lr * factor)
        bar.update(1)
    bar.close()
    dictionary.eval()
    record.dead = int((since_fired >= dead_after_tokens).sum())
    record.threshold = float(dictionary.threshold) if topk else float("nan")
    record.scales = dictionary.scales.tolist()
    return record


def _auxk(dictionary: BatchTopKCrosscoder, residual: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor,
          k_aux: int) -> torch.Tensor:
    """AuxK: how well the top dead latents (per row, by score) reconstruct the residual, variance-normalised."""
    n_dead = int(dead.sum())
    if n_dead == 0 or k_aux < 1:
        return torch.zeros((), device=residual.device)
    s = torch.where(dead[None], dictionary.scores(pre), -torch.inf).detach()
    idx = s.topk(min(k_aux, n_dead), dim=-1, sorted=False).indices
    f_aux = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    r = residual.flatten(1)
    recon = torch.einsum("bl,lmd->bmd", f_aux, dictionary.W_dec).flatten(1)
    num = (r - recon).pow(2).sum(-1).mean()
    den = (r - r.mean(0, keepdim=True)).pow(2).sum(-1).mean()
    return (num / den).nan_to_num(0.0)


# ------------------------------------------------------------------------------------------------ analysis

def _iter(batches: Iterable[Batch], progress: bool, desc: str) -> Iterator[Batch]:
    if callable(batches):
        batches = batches()
    return iter(tqdm(batches, desc=desc, disable=not progress, leave=False))


def fvu(dictionary: _Crosscoder, batches: Iterable[Batch], *, progress: bool = False) -> dict[str, float]:
    """Fraction of variance unexplained per model (the DiffSAE's one entry is named "instruct-base"):
    Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - x̄||², accumulated in float64, in inference mode."""
    n, sse, s1, s2 = 0, 0.0, None, None
    dictionary.eval()
    with torch.no_grad():
        for b in _iter(batches, progress, "fvu"):
            x = dictionary.prepare(b)
            x_hat, _ = dictionary(x)
            xd = x.double()
            sse = sse + (xd - x_hat.double()).pow(2).sum((0, 2))
            s1 = xd.sum(0) if s1 is None else s1 + xd.sum(0)
            s2 = xd.pow(2).sum((0, 2)) if s2 is None else s2 + xd.pow(2).sum((0, 2))
            n += x.shape[0]
    if n == 0:
        raise ValueError("no batches")
    total = s2 - s1.pow(2).sum(-1) / n
    names = [f"{dictionary.models[1]}-{dictionary.models[0]}"] if isinstance(dictionary, DiffSAE) \
        else list(dictionary.models)
    return {m: float(sse[i] / total[i]) for i, m in enumerate(names)}


def dead_latents(dictionary: _Crosscoder, batches: Iterable[Batch], *, progress: bool = False) -> torch.Tensor:
    """`[n_latents]` bool: latents never active (inference mode) over `batches`."""
    fired = None
    dictionary.eval()
    with torch.no_grad():
        for b in _iter(batches, progress, "dead latents"):
            a = (dictionary.encode(dictionary.prepare(b)) > 0).any(0)
            fired = a if fired is None else fired | a
    if fired is None:
        raise ValueError("no batches")
    return ~fired.cpu()


def delta_norm(dictionary: _Crosscoder, *, chat: str = "instruct", base: str = "base",
               form: str = "max") -> torch.Tensor:
    """`[n_latents]` relative decoder norm, 0 = base-only, 0.5 = shared, 1 = chat-only.

    form "max" (Minder, Dumas et al.): ½((||d^chat|| - ||d^base||) / max(||d^chat||, ||d^base||) + 1);
    form "sum" (Lindsey et al.'s relative norm): ||d^chat|| / (||d^chat|| + ||d^base||). Both agree at 0, ½, 1.
    """
    if dictionary.n_models != 2 or {chat, base} != set(dictionary.models):
        raise ValueError(f"delta_norm needs a two-model crosscoder over {{{base!r}, {chat!r}}}")
    norms = dictionary.decoder_norms().detach()
    c, b = norms[:, dictionary.models.index(chat)], norms[:, dictionary.models.index(base)]
    if form == "max":
        return 0.5 * ((c - b) / torch.maximum(c, b).clamp_min(1e-12) + 1)
    if form == "sum":
        return c / (c + b).clamp_min(1e-12)
    raise ValueError(f"form must be 'max' or 'sum', got {form!r}")


def classify(dn: torch.Tensor, *, chat_only: float = 0.9, base_only: float = 0.1,
             shared: tuple[float, float] = (0.4, 0.6)) -> list[str]:
    """Kind of each latent from its Δ_norm, with the paper's bands: chat-only ≥ 0.9, base-only ≤ 0.1, shared in
    [0.4, 0.6], the rest "other"."""
    out = []
    for v in dn.tolist():
        out.append("chat-only" if v >= chat_only else "base-only" if v <= base_only
                   else "shared" if shared[0] <= v <= shared[1] else "other")
    return out


@dataclass
class LatentScaling:
    """Latent Scaling of the chosen latents (all `[latent]`, float64).

    beta_error_{base,chat}, beta_recon_{base,chat}: least-squares β_j (see `latent_scaling`); nu_error = ν_ε =
    β^ε_base / β^ε_chat, nu_recon = ν_r = β^r_base / β^r_chat; active: tokens where f_j > 0; delta_norm and kind
    from the decoder norms; complete_shrinkage / latent_decoupling: chat-only latents whose ν_ε / ν_r exceed the
    chosen cut (the base model does carry the latent's chat direction, in its error / in its reconstruction).
    """

    latents: torch.Tensor
    beta_error_base: torch.Tensor
    beta_error_chat: torch.Tensor
    beta_recon_base: torch.Tensor
    beta_recon_chat: torch.Tensor
    nu_error: torch.Tensor
    nu_recon: torch.Tensor
    active: torch.Tensor
    delta_norm: torch.Tensor
    kind: list[str]
    complete_shrinkage: torch.Tensor
    latent_decoupling: torch.Tensor


def latent_scaling(dictionary: _Crosscoder, batches: Iterable[Batch], latents: Sequence[int] | torch.Tensor | None = None,
                   *, chat: str = "instruct", base: str = "base", shrinkage_cut: float = 0.5,
                   decoupling_cut: float = 0.5, progress: bool = False) -> LatentScaling:
    """Latent Scaling (Minder, Dumas et al. 2025) of a two-model crosscoder, streamed, in float64.

    For latent j with code f_j(x) and chat decoder d_j = d_j^chat, and a target y_m(x) in model m, β_j^m is the
    least-squares scale of f_j(x) d_j: argmin_β Σ_x ||β f_j(x) d_j - y_m(x)||², i.e.
    β = Σ_x f_j(x) <d_j, y_m(x)> / (||d_j||² Σ_x f_j(x)²). Targets, as the reference (`load_*_error` /
    `load_*_reconstruction` of science-of-finetuning/sparsity-artifacts-crosscoders):
      error:          y_m = h_m - (ĥ_m - f_j d_j^m) = ε_m + f_j d_j^m  (the reconstruction error with latent j's
                      own contribution put back, so β^ε asks how much of d_j the model's activation holds that the
                      other latents do not explain);
      reconstruction: y_m = ĥ_m (the crosscoder's full reconstruction, b_dec included).
    ν_ε = β^ε_base / β^ε_chat (high: Complete Shrinkage, the base model holds the direction but its decoder
    was shrunk away), ν_r = β^r_base / β^r_chat (high: Latent Decoupling, other latents rebuild it in base).
    In the dictionary's normalised space (`prepare`); codes in inference mode. latents: None = all.
    `shrinkage_cut` / `decoupling_cut`: ν above which a chat-only latent is flagged (this toolkit's cut; the paper
    ranks latents by ν rather than fixing one).
    """
    if isinstance(dictionary, DiffSAE) or dictionary.n_models != 2 or {chat, base} != set(dictionary.models):
        raise ValueError(f"latent_scaling needs a two-model crosscoder over {{{base!r}, {chat!r}}}")
    idx = torch.arange(dictionary.n_latents) if latents is None else torch.as_tensor(latents, dtype=torch.long).reshape(-1)
    if idx.numel() == 0 or idx.min() < 0 or idx.max() >= dictionary.n_latents:
        raise ValueError(f"latents must be indices in [0, {dictionary.n_latents}), got {idx.tolist()}")
    ci, bi = dictionary.models.index(chat), dictionary.models.index(base)
    dictionary.eval()
    W = dictionary.W_dec.detach().double()
    dev = W.device
    idx = idx.to(dev)
    d = W[idx, ci]                                       # [J, d] chat decoder rows
    dd = d.pow(2).sum(-1)                                # ||d_j||²
    self_term = {m: (W[idx, m] * d).sum(-1) for m in (bi, ci)}  # <d_j^m, d_j>
    num = {key: torch.zeros(len(idx), dtype=torch.float64, device=dev) for key in ("eb", "ec", "rb", "rc")}
    f2 = torch.zeros(len(idx), dtype=torch.float64, device=dev)
    active = torch.zeros(len(idx), dtype=torch.long, device=dev)
    n = 0
    with torch.no_grad():
        for b in _iter(batches, progress, "latent scaling"):
            x = dictionary.prepare(b)
            x_hat, f = dictionary(x)
            x, x_hat, fj = x.double(), x_hat.double(), f[:, idx].double()
            for key, m in (("eb", bi), ("ec", ci)):
                eps = x[:, m] - x_hat[:, m]
                num[key] += (fj * (eps @ d.T)).sum(0) + fj.pow(2).sum(0) * self_term[m]
            for key, m in (("rb", bi), ("rc", ci)):
                num[key] += (fj * (x_hat[:, m] @ d.T)).sum(0)
            f2 += fj.pow(2).sum(0)
            active += (fj > 0).sum(0)
            n += x.shape[0]
    if n == 0:
        raise ValueError("no batches")
    den = f2 * dd
    beta = {key: torch.where(den > 0, v / den.clamp_min(1e-300), torch.nan).cpu() for key, v in num.items()}
    nu_e, nu_r = beta["eb"] / beta["ec"], beta["rb"] / beta["rc"]
    dn = delta_norm(dictionary, chat=chat, base=base)[idx].double().cpu()
    kind = classify(dn)
    chat_only = torch.tensor([k == "chat-only" for k in kind])
    return LatentScaling(latents=idx.cpu(), beta_error_base=beta["eb"], beta_error_chat=beta["ec"],
                         beta_recon_base=beta["rb"], beta_recon_chat=beta["rc"], nu_error=nu_e, nu_recon=nu_r,
                         active=active.cpu(), delta_norm=dn, kind=kind,
                         complete_shrinkage=chat_only & (nu_e > shrinkage_cut),
                         latent_decoupling=chat_only & (nu_r > decoupling_cut))
