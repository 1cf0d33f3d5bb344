"""Record activations of a hooked model at chosen hooks, layers and token positions.

Only the requested layers x positions leave the device, gathered inside the hook as each layer runs, and the
forward stops after the deepest requested layer. Means are accumulated in float64 while streaming, so a mean
over any number of prompts never holds them all.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from probes import checkpoints
from probes.chat import ROLE_ID, ChatBatch
from probes.files import atomic_path

# Short hook names -> TransformerLens hook names (resid_pre of layer l is the input of block l).
HOOKS: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}
_MEAN = re.compile(r"^\s*mean\(\s*([a-z_]+)\s*\)\s*$")

PositionSpec = str | int | Sequence[str | int]


def hook_name(hook: str, layer: int) -> str:
    """The TransformerLens name of `hook` ('resid_post', or a template like 'blocks.{layer}.attn.hook_z')."""
    template = HOOKS.get(hook, hook)
    if "{layer}" not in template:
        raise ValueError(f"unknown hook {hook!r}: use one of {list(HOOKS)} or a template with '{{layer}}'")
    return template.format(layer=layer)


def resolve_layers(layers: int | slice | Sequence[int] | None, n_layers: int) -> list[int]:
    """Layer indices 0..n_layers-1 from None (all), an int, a slice or a list; negative counts from the last layer
    (-1 = the last). Raises ValueError on an empty selection, a layer out of range or a repeated layer."""
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, slice):
        out = list(range(n_layers))[layers]
        if not out:
            raise ValueError(f"{layers.start}:{layers.stop} selects no layer of a {n_layers}-layer model")
        return out
    raw = [layers] if isinstance(layers, int) else list(layers)
    if not raw:
        raise ValueError("no layers given")
    bad = [x for x in raw if not -n_layers <= int(x) < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a {n_layers}-layer model")
    out = [int(x) % n_layers for x in raw]
    if len(set(out)) < len(out):
        raise ValueError(f"layers {raw} name a layer twice")
    return out


def _split_specs(positions: PositionSpec) -> list[str | int]:
    return list(positions) if isinstance(positions, (list, tuple)) else [positions]


def position_selector(batch: ChatBatch, positions: PositionSpec) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """How to pick the k chosen positions out of `[batch, seq, d]` activations.

    Returns `index` `[batch, k]` (absolute positions; -1 for columns that are role means), `weights`
    `[batch, k, seq]` (a role's mask divided by its count for `"mean(role)"` columns, zero elsewhere) and labels.
    Index columns are gathered directly: a one-hot product would cost a matmul over the whole sequence.
    """
    index_cols, weight_cols, labels = [], [], []
    for spec in _split_specs(positions):
        m = _MEAN.match(spec) if isinstance(spec, str) else None
        if m:
            if m[1] not in ROLE_ID or m[1] == "pad":
                raise ValueError(f"unknown role in {spec!r}")
            mask = batch.role_mask(m[1]).float()
            counts = mask.sum(-1, keepdim=True)
            if bool((counts == 0).any()):
                raise ValueError(f"{spec!r}: some prompts have no {m[1]!r} tokens")
            index_cols.append(torch.full((len(batch), 1), -1, dtype=torch.long))
            weight_cols.append((mask / counts)[:, None, :])
            labels.append(f"mean({m[1]})")
        else:
            idx, labs = batch.positions(spec)
            index_cols.append(idx)
            weight_cols.append(torch.zeros(len(batch), idx.shape[1], batch.seq_len))
            labels += labs
    return torch.cat(index_cols, dim=1), torch.cat(weight_cols, dim=1), labels


def position_weights(batch: ChatBatch, positions: PositionSpec) -> tuple[torch.Tensor, list[str]]:
    """`[batch, k, seq]` weights whose product with `[batch, seq, ...]` gives the k chosen positions.

    Index specs give one-hot rows, `"mean(role)"` the role's mask divided by its count. For reducing a whole
    `[batch, seq, ...]` map over query positions (e.g. attention patterns) where a gather does not fit.
    """
    index, weights, labels = position_selector(batch, positions)
    onehot = torch.nn.functional.one_hot(index.clamp_min(0), batch.seq_len).float()
    return torch.where((index < 0)[..., None], weights, onehot), labels


def select_positions(act: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`[batch, k, *feature]` float32 from `[batch, seq, *feature]` activations with a `position_selector`
    result."""
    if index.shape[1] == act.shape[1] and bool((index == torch.arange(act.shape[1], device=index.device)).all()):
        out = act.float().clone()  # every position in order: a plain copy, no gather
    else:
        rows = torch.arange(act.shape[0], device=act.device)[:, None]
        out = act[rows, index.clamp_min(0)].float()
    means = index[0] < 0  # the same columns are means in every row
    if bool(means.any()):
        w = weights[:, means]
        # Only positions a mean reads are multiplied, so a NaN elsewhere (padding) cannot leak in.
        read = (w.sum(1) > 0)[..., None]
        flat = act.float().flatten(2).masked_fill(~read, 0.0)
        out[:, means] = torch.einsum("bks,bsd->bkd", w, flat).reshape(w.shape[0], w.shape[1], *act.shape[2:])
    return out


def expand_positions(batch: ChatBatch, positions: PositionSpec) -> tuple[PositionSpec, list[str] | None]:
    """`positions` with `"all"` expanded to every token (labels "0".."seq-1"; the batch must be unpadded, so
    position i is the same token position in every row), and those labels (None for other specs)."""
    if isinstance(positions, str) and positions == "all":
        if not bool(batch.attention_mask.all()):
            raise ValueError("positions='all' needs an unpadded batch (e.g. batch[i:i+1]); use a role spec such as "
                             "'post_instruction' to align positions across prompts")
        return list(range(-batch.seq_len, 0)), [str(i) for i in range(batch.seq_len)]
    return positions, None


@dataclass
class Activations:
    """Recorded activations of one model on one ChatBatch.

    `tensors[hook]`: `[prompt, layer, position, *feature]` float32 (None when recorded with `keep="mean"`);
    `sums[hook]`: `[layer, position, *feature]` float64 running sums over `count` prompts. feature is `[d_model]`
    for the residual stream, `[head, d_head]` for hooks with a head axis (`attn.hook_z`).
    """

    hooks: list[str]
    layers: list[int]
    positions: list[str]
    model: str
    count: int
    sums: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor] | None = None
    prompts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        def span(xs: list) -> str:
            return repr(xs) if len(xs) <= 6 else f"[{xs[0]}, {xs[1]}, ..., {xs[-1]}] ({len(xs)})"

        shapes = {h: list((self.tensors[h] if self.tensors is not None else self.sums[h]).shape) for h in self.hooks}
        kept = "tensors" if self.tensors is not None else "sums only (keep='mean')"
        return (f"Activations(model={self.model!r}, prompts={self.count}, hooks={self.hooks}, "
                f"layers={span(self.layers)}, positions={span(self.positions)}, {kept} {shapes})")

    @property
    def tensor(self) -> torch.Tensor:
        """The `[prompt, layer, position, *feature]` tensor of the only hook (feature: `[d_model]` for the
        residual stream, `[head, d_head]` for `attn.hook_z`)."""
        if self.tensors is None:
            raise ValueError("recorded with keep='mean': only means are available")
        if len(self.hooks) != 1:
            raise ValueError(f"several hooks recorded ({self.hooks}); use .tensors[hook]")
        return self.tensors[self.hooks[0]]

    def mean(self, hook: str | None = None) -> torch.Tensor:
        """`[layer, position, *feature]` float64 mean over prompts."""
        hook = hook or self._only_hook()
        return self.sums[hook] / self.count

    def _only_hook(self) -> str:
        if len(self.hooks) != 1:
            raise ValueError(f"several hooks recorded ({self.hooks}); name one")
        return self.hooks[0]

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"layer {layer} was not recorded (recorded: {self.layers})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (tensors + JSON metadata); no pickle involved."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {f"sum/{h}": s.contiguous() for h, s in self.sums.items()}
        if self.tensors is not None:
            data |= {f"tensor/{h}": t.contiguous() for h, t in self.tensors.items()}
        meta = dict(hooks=self.hooks, layers=self.layers, positions=self.positions, model=self.model,
                    count=self.count, prompts=self.prompts, meta=self.meta)
        text = json.dumps(meta)
        with atomic_path(path) as tmp:
            save_file(data, str(tmp), metadata={"probes.activations": text, "probes.sha256": _checksum(text, data)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Activations:
        """Read a file written by `save`, checking its metadata against its tensors; errors name the file.

        Checked: the checksum written with the file (labels, count and tensors unchanged since), count > 0,
        distinct layers and positions, shapes `[layer, position, *feature]` / `[count, layer, position, *feature]`,
        finite sums equal to the sums of the kept tensors. Raises `probes.directions.InvalidFileError`.
        """
        from safetensors import SafetensorError, safe_open

        from probes.directions import InvalidFileError

        path = Path(path)

        def bad(msg: str) -> InvalidFileError:
            return InvalidFileError(f"{path}: {msg}")

        if not path.is_file():
            raise bad("no such activations file")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = f.metadata() or {}
                data = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as exc:
            raise bad(f"not a safetensors file ({exc})") from None
        text = raw_meta.get("probes.activations")
        if text is None:
            raise bad("not a probes activations file (no 'probes.activations' metadata)")
        if raw_meta.get("probes.sha256") != _checksum(text, data):
            raise bad("checksum mismatch: its labels, count or tensors changed after it was written")
        meta = json.loads(text)
        hooks, layers, positions, count = meta["hooks"], meta["layers"], meta["positions"], meta["count"]
        if not isinstance(count, int) or count < 1:
            raise bad(f"count must be a positive integer, got {count!r}")
        if not hooks or len(set(layers)) != len(layers) or not all(isinstance(x, int) for x in layers):
            raise bad(f"hooks {hooks!r} / layers {layers!r} are not distinct labels")
        if len(set(positions)) != len(positions):
            raise bad(f"positions {positions!r} are not distinct")
        if meta.get("prompts") is not None and len(meta["prompts"]) != count:
            raise bad(f"{len(meta['prompts'])} prompts for a count of {count}")
        sums, tensors = {}, {}
        for h in hooks:
            s = data.get(f"sum/{h}")
            if s is None or s.ndim < 3 or tuple(s.shape[:2]) != (len(layers), len(positions)):
                raise bad(f"sum/{h} must be [layer={len(layers)}, position={len(positions)}, *feature]")
            if not bool(torch.isfinite(s).all()):
                raise bad(f"sum/{h} has non-finite entries")
            sums[h] = s
            t = data.get(f"tensor/{h}")
            if t is not None:
                if tuple(t.shape) != (count, *s.shape):
                    raise bad(f"tensor/{h} has shape {tuple(t.shape)}, expected {(count, *s.shape)}")
                if not torch.allclose(t.sum(0, dtype=torch.float64), s, rtol=1e-9, atol=1e-9 * float(s.abs().max())):
                    raise bad(f"tensor/{h} does not sum to sum/{h}")
                tensors[h] = t
        if tensors and set(tensors) != set(hooks):
            raise bad("tensors kept for some hooks but not all")
        return cls(hooks=hooks, layers=layers, positions=positions, model=meta["model"], count=count, sums=sums,
                   tensors=tensors or None, prompts=meta["prompts"], meta=meta["meta"])


def _checksum(text: str, data: dict[str, torch.Tensor]) -> str:
    """sha256 of the metadata text and every tensor's name, shape, dtype and bytes."""
    return checkpoints.key(text, data)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def check_fits(model: Any, batch: ChatBatch) -> None:
    """Raise ValueError when the batch is longer than the model's context."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and batch.seq_len > n_ctx:
        raise ValueError(f"batch is {batch.seq_len} tokens long, over the model's context of {n_ctx}")


def forward(model: Any, batch: ChatBatch, *, return_type: str | None = "logits", grad: bool = False,
            **kwargs: Any) -> Any:
    """One forward pass of `model` on `batch` (moved to the model's device), without autograd unless `grad`."""
    device = model_device(model)
    with torch.enable_grad() if grad else torch.no_grad():
        return model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                     return_type=return_type, **kwargs)


def run_with_cache(model: Any, batch: ChatBatch, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """`model.run_with_cache` on a ChatBatch with its attention mask, without autograd: (logits `[batch, seq,
    vocab]`, ActivationCache). kwargs go to `run_with_cache` (`names_filter`, `stop_at_layer`, ...).

    The mask matters: left-padded rows run without it attend to the pad tokens and give other activations.
    """
    if not isinstance(batch, ChatBatch):
        raise TypeError("run_with_cache takes a ChatBatch (pair.encode(...)), whose attention mask it passes; "
                        "for bare ids call model.run_with_cache(ids, attention_mask=...)")
    check_fits(model, batch)
    device = model_device(model)
    with torch.no_grad():
        return model.run_with_cache(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                    **kwargs)


def last_logits(
    model: Any, batch: ChatBatch, hooks: Sequence[tuple[str, Any]] = (), *, position: str | int = "last",
    batch_size: int = 16, progress: bool = False, grad: bool = False,
) -> torch.Tensor:
    """Logits at one position per prompt under `hooks`, `[batch, vocab]` float32 on the CPU.

    Only that position goes through the final norm and unembedding (plus the output soft-cap, e.g. Gemma-2), so
    `[batch, seq, vocab]` logits are never built. With left padding, `"last"` is every row's last real token:
    the distribution of the first response token. Raises FloatingPointError on non-finite logits.
    `grad`: keep the autograd graph (for gradients with respect to activations the hooks capture).
    """
    if len(batch) == 0:
        raise ValueError("empty batch")
    check_fits(model, batch)
    n_layers = int(model.cfg.n_layers)
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    out = []
    chunks = batch.chunks(batch_size)
    for _, sub in tqdm(chunks, desc="logits", disable=not progress or len(chunks) < 2, leave=False):
        pos = sub.positions(position)[0]
        if pos.shape[1] != 1:
            raise ValueError(f"{position!r} selects {pos.shape[1]} positions; logits need exactly one")
        captured: dict[str, torch.Tensor] = {}

        def grab(resid: torch.Tensor, hook: Any) -> None:
            rows = torch.arange(resid.shape[0], device=resid.device)
            captured["x"] = resid[rows, pos[:, 0].to(resid.device)][:, None]  # [b, 1, d_model]

        def stop(resid: torch.Tensor, hook: Any) -> None:
            raise _StopForward  # the bridge ignores stop_at_layer=n_layers: end the forward before the unembedding

        # Registered last, so it reads the residual after any of the caller's hooks on the same point.
        last = f"blocks.{n_layers - 1}.hook_resid_post"
        with model.hooks(fwd_hooks=[*hooks, (last, grab), (last, stop)]):
            try:
                forward(model, sub, return_type=None, grad=grad)
            except _StopForward:
                pass
        with torch.enable_grad() if grad else torch.no_grad():
            logits = model.unembed(model.ln_final(captured["x"]))[:, 0].float()
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
        check_logits(logits, sub, what=f"logits at {position!r}")
        out.append(logits.cpu())
    return torch.cat(out)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what is needed has been captured."""


def check_logits(logits: torch.Tensor, batch: ChatBatch, *, what: str = "logits") -> None:
    """Raise FloatingPointError naming the prompt when a row of `[batch, vocab]` logits is non-finite or degenerate.

    Degenerate: every logit of the row equal (e.g. all zero after an overflowed norm), which makes the distribution
    uniform and every downstream number (entropy ln V, KL 0) meaningless.
    """
    bad = ~torch.isfinite(logits).all(-1)
    flat = logits.amax(-1) == logits.amin(-1)
    for mask, why in ((bad, "non-finite"), (flat, "degenerate (all equal)")):
        if bool(mask.any()):
            row = int(torch.nonzero(mask)[0, 0])
            raise FloatingPointError(f"{why} {what} (after blocks.*.hook_resid_post, final norm and unembedding) "
                                     f"for prompt {row}: '{batch.instructions[row][:60]}'")


def record(
    model: Any,
    batch: ChatBatch,
    hooks: str | Sequence[str] = ("resid_post",),
    layers: int | slice | Sequence[int] | None = None,
    positions: PositionSpec = "post_instruction[-1]",
    *,
    batch_size: int = 16,
    keep: str = "all",
    progress: bool = True,
    model_name: str | None = None,
) -> Activations:
    """Record `hooks` x `layers` x `positions` of `model` on `batch`.

    hooks: short names (`"resid_post"`, see `HOOKS`) or templates such as `"blocks.{layer}.attn.hook_z"`; any
    hook whose activation is `[batch, seq, *feature]` (a head axis is kept: `[..., head, d_head]`).
    layers: None (all), an int, a list or a slice; negative counts from the last (-1 = the last layer).
    positions: a spec understood by `ChatBatch.positions` (`"post_instruction[-1]"`, `"post_instruction"`,
    `"user[0:3]"`, `"last"`, -1), `"mean(role)"`, a list of these, or `"all"` (every token of an unpadded batch,
    as the lens). The absolute index differs per row.
    keep: `"all"` keeps `[prompt, layer, position, d_model]`; `"mean"` keeps only the float64 sums.
    Raises FloatingPointError when an activation is NaN or infinite.
    """
    if keep not in ("all", "mean"):
        raise ValueError("keep must be 'all' or 'mean'")
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    n_layers = int(model.cfg.n_layers)
    if not hooks:
        raise ValueError("nothing to record: no hooks")
    layers = resolve_layers(layers, n_layers)
    if len(batch) == 0:
        raise ValueError("empty batch")
    check_fits(model, batch)
    positions, all_labels = expand_positions(batch, positions)
    labels = all_labels or position_selector(batch[:1], positions)[2]  # validates the spec before any forward

    device = model_device(model)
    # Feature shapes ([d_model], or [head, d_head] for attn.hook_z) are known once a hook first fires.
    sums: dict[str, torch.Tensor] = {}
    # keep="all" writes each chunk straight into its rows of the final tensor: no concatenation copy at the end.
    kept: dict[str, torch.Tensor] | None = {} if keep == "all" else None
    # Stop after the deepest block we need: later blocks cannot change earlier activations.
    stop = max(layers) + 1
    chunks = batch.chunks(batch_size)
    for start, sub in tqdm(chunks, desc=f"record {model_name or model.cfg.model_name}", disable=not progress or len(chunks) < 2,
                       leave=False):
        def one_chunk(sub: ChatBatch = sub, start: int = start) -> dict[str, torch.Tensor]:
            index, weights, _ = position_selector(sub, positions)
            index, weights = index.to(device), weights.to(device)
            got: dict[str, torch.Tensor] = {}

            def make_hook(h: str, li: int):
                def fn(act: torch.Tensor, hook: Any) -> None:
                    if act.ndim < 3 or tuple(act.shape[:2]) != (len(sub), sub.seq_len):
                        raise ValueError(f"{hook.name} gives {tuple(act.shape)}; record needs [batch, seq, ...] "
                                         "activations (attention patterns: probes.attention)")
                    sel = select_positions(act, index, weights)
                    if h not in got:
                        shape = (len(layers), len(labels), *sel.shape[2:])
                        if kept is not None:  # the hooks write straight into this chunk's rows of the result
                            if h not in kept:
                                kept[h] = torch.empty(len(batch), *shape)
                            got[h] = kept[h][start : start + len(sub)]
                        else:
                            got[h] = torch.empty(len(sub), *shape)
                    got[h][:, li] = sel.cpu()
                return fn

            fwd = [(hook_name(h, layer), make_hook(h, li)) for h in hooks for li, layer in enumerate(layers)]
            with model.hooks(fwd_hooks=fwd):
                forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
            return got

        # A finished chunk is kept in the active run's store (if any), so an interrupted run resumes after it.
        out = checkpoints.chunk("record", model, dict(hooks=hooks, layers=layers, positions=labels),
                                [sub.input_ids, sub.attention_mask, sub.roles], one_chunk)
        for h in hooks:
            if kept is not None:
                if h not in kept:
                    kept[h] = torch.empty(len(batch), *out[h].shape[1:])
                rows = kept[h][start : start + len(sub)]
                if out[h].data_ptr() != rows.data_ptr():  # read back from the store: copy it into place
                    rows.copy_(out[h])
            chunk_sum = out[h].sum(0, dtype=torch.float64)
            # A NaN or inf anywhere makes the sum non-finite: one pass checks and accumulates.
            if not bool(torch.isfinite(chunk_sum).all()):
                idx = torch.nonzero(~torch.isfinite(out[h]))[0]
                raise FloatingPointError(
                    f"non-finite activation at {hook_name(h, layers[int(idx[1])])} (layer {layers[int(idx[1])]}) for "
                    f"prompt {start + int(idx[0])}: '{sub.instructions[int(idx[0])][:60]}'")
            sums[h] = sums[h] + chunk_sum if h in sums else chunk_sum
    return Activations(
        hooks=hooks, layers=layers, positions=labels, model=model_name or str(model.cfg.model_name),
        count=len(batch), sums=sums,
        tensors=kept,
        prompts=list(batch.instructions),
    )


def record_pair(pair: Any, batch: ChatBatch, *args: Any, recorder: Any = None, **kwargs: Any
                ) -> dict[str, Activations]:
    """`record` (or `recorder`, with its signature) on both models of `pair` on the same tokens:
    {"base": ..., "instruct": ...}."""
    recorder = recorder or record
    out = {}
    for which in ("base", "instruct"):
        with pair.on_device(which) as model:
            out[which] = recorder(model, batch, *args, model_name=f"{pair.name}/{which}", **kwargs)
    return out
