"""A sharded, resumable store of several models' activations on the same tokens, aligned row by row: the data
that dictionaries (crosscoders, diff-SAEs) train on, larger than memory.

A store is a folder:
- `shard-00000.safetensors`, ...: `shard_tokens` rows each (the last may hold fewer). Row r of every tensor in a
  shard is the same token: `"{model}/{hook}/{layer}"` `[rows, *feature]` in the store's dtype, `prompt_id` (index
  within its prompt set), `position` (index among the prompt's real tokens; -1 for a `mean(role)` row), `set`
  (index into the manifest's prompt sets) int32 and `role` (`probes.chat.ROLES` index) uint8 `[rows]`, plus the
  shard's own float64 statistics `"stats/{model}/{hook}/{layer}/mean"` and `".../m2"`.
- `stats.safetensors`: float64 count, mean and M2 (sum of squared deviations) per model x hook x layer over the
  whole store, combined from the shards' own with the parallel Welford formula (Chan et al.), written when the
  store completes.
- `manifest.json`: the inputs' hashes (token ids, attention masks and roles of every prompt set; each model's
  parameter fingerprint), the spec (hooks, layers, positions, dtype, shard size, batch size), the prompt sets,
  the shard list with row counts and sha256, the statistics file's sha256 and whether the store is complete.

Every file is written whole under a temporary name and renamed into place (`probes.files.atomic_path`), shard
first and manifest last, so a killed writer leaves complete shards and a manifest that lists only those: writing
again resumes after the last listed shard, recomputing from the batch that holds its first missing row, with the
same batch boundaries, so the shards come out byte-identical to an uninterrupted write. A store whose inputs or
spec differ is refused, never mixed. Nothing is pickled.

Written by several processes (`write_store(..., distributed=True)` under torchrun), rank r writes its
contiguous share of the rows as `rank-0000r/shard-*.safetensors`, listed in its own `rank-0000r/part.json`
(resumed as above, by the same rank of a launch with as many processes), and rank 0 writes `manifest.json`
and `stats.safetensors` once every part is done: the manifest lists every part's shards in rank order by their
path in the store (`"rank-00001/shard-00000.safetensors"`) plus a `writers` entry per rank. Shard boundaries
then differ from one process's (each part starts a new shard); rows, their order, prompt ids, inputs and spec do
not, so `Store` reads it as the single-process store (format 1: its reader already took a shard's file name as
a path inside the store).

Statistics are those of the stored values (after the cast to the store's dtype), so they describe exactly what
the reader yields. The manifest holds the statistics file's hash rather than the numbers: as JSON they would be
megabytes for a real model (models x hooks x layers x d_model float64).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from tqdm.auto import tqdm

from probes import checkpoints
from probes.activations import (PositionSpec, check_fits, forward, hook_name, position_selector, resolve_layers,
                                select_positions)
from probes.chat import ROLE_ID, ChatBatch, check_position_spec
from probes.files import atomic_path

FORMAT = "probes.store/1"
PART_FORMAT = "probes.store.part/1"
MANIFEST = "manifest.json"
PART = "part.json"
STATS = "stats.safetensors"
META = ("prompt_id", "position", "role", "set")
_RESERVED = (*META, "stats")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_MEAN = re.compile(r"^mean\(([a-z_]+)\)$")
_PART_DIR = re.compile(r"^rank-\d{5}$")
_TEMPORARY = re.compile(r"^\..*\.tmp$")


class StoreError(ValueError):
    """A store folder that cannot be read or resumed: a damaged file, a manifest that does not match it, or inputs
    that differ from those it was written from."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _act_key(model: str, hook: str, layer: int) -> str:
    return f"{model}/{hook}/{layer}"


# --- statistics -----------------------------------------------------------------------------------------------

def moments(x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) in float64 over the rows of `x` `[rows, *feature]`; M2 = sum of squared deviations."""
    x = x.double()
    mean = x.mean(0)
    return int(x.shape[0]), mean, ((x - mean) ** 2).sum(0)


def combine(a: tuple[int, torch.Tensor, torch.Tensor],
            b: tuple[int, torch.Tensor, torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The (count, mean, M2) of two disjoint row sets from theirs (Chan, Golub & LeVeque's parallel update)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    if na == 0:
        return b
    if nb == 0:
        return a
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


# --- writing --------------------------------------------------------------------------------------------------

def _resolve_models(source: Any, names: Sequence[str]) -> tuple[dict[str, Any], Any]:
    """{name: model} and the pair (None for a plain mapping), checked to be the same shape."""
    from probes.pairs import ModelPair

    names = [names] if isinstance(names, str) else list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"models must be distinct names, got {names!r}")
    bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or n in _RESERVED]
    if bad:
        raise ValueError(f"model names {bad!r} are not usable (non-empty, no '/', not one of {_RESERVED})")
    if isinstance(source, ModelPair):
        pair, avail = source, source.models
    elif isinstance(source, Mapping):
        pair, avail = None, source
    else:
        raise ValueError("write_store takes a ModelPair or a {name: model} mapping")
    missing = [n for n in names if n not in avail]
    if missing:
        raise ValueError(f"no model named {missing!r} (have {list(avail)})")
    models = {n: avail[n] for n in names}
    shapes = {n: (int(m.cfg.n_layers), int(m.cfg.d_model)) for n, m in models.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"models differ in (layers, d_model): {shapes}")
    return models, pair


def _resolve_sets(prompts: Any, pair: Any) -> dict[str, ChatBatch]:
    if isinstance(prompts, ChatBatch):
        prompts = {"prompts": prompts}
    if not isinstance(prompts, Mapping) or not prompts:
        raise ValueError("prompts must be a ChatBatch or a non-empty {set name: ChatBatch or list of str} mapping")
    out = {}
    for name, batch in prompts.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"prompt set names must be non-empty strings, got {name!r}")
        if not isinstance(batch, ChatBatch):
            if pair is None:
                raise ValueError(f"prompt set {name!r} is not encoded: pass a ChatBatch, or a ModelPair to encode "
                                 "strings with")
            batch = pair.encode(list(batch))
        if len(batch) == 0:
            raise ValueError(f"prompt set {name!r} is empty")
        out[name] = batch
    return out


def _positions_json(positions: PositionSpec) -> Any:
    if isinstance(positions, str) and positions == "all":
        return "all"
    specs = list(positions) if isinstance(positions, (list, tuple)) else [positions]
    if not specs:
        raise ValueError("empty position list")
    for s in specs:
        if s == "all":
            raise ValueError("'all' cannot be combined with other position specs")
        check_position_spec(s)
    return specs


def _chunk_rows(sub: ChatBatch, positions: Any) -> tuple[int, list[str] | None]:
    """Rows a chunk gives and the spec's column labels (None for 'all'); raises ValueError on a spec that does
    not fit some prompt, before any forward."""
    if positions == "all":
        return int(sub.attention_mask.sum()), None
    _, _, labels = position_selector(sub, positions)
    return len(sub) * len(labels), labels


def _capture(model: Any, sub: ChatBatch, hooks: list[str], layers: list[int], positions: Any,
             ) -> tuple[dict[tuple[str, int], torch.Tensor], dict[str, torch.Tensor]]:
    """One forward of `sub`: ({(hook, layer): [rows, *feature] float32}, {prompt, position, role: [rows]})."""
    n_layers = int(model.cfg.n_layers)
    device = next(model.parameters()).device
    pad = sub.seq_len - sub.attention_mask.sum(-1)  # [batch] left padding per row
    if positions == "all":
        b_idx, s_idx = torch.nonzero(sub.attention_mask.bool(), as_tuple=True)  # row-major: prompt, then position
        meta = {"prompt": b_idx, "position": s_idx - pad[b_idx], "role": sub.roles[b_idx, s_idx]}
        b_dev, s_dev = b_idx.to(device), s_idx.to(device)
    else:
        index, weights, labels = position_selector(sub, positions)
        k = index.shape[1]
        is_mean = index < 0
        mean_role = torch.tensor([ROLE_ID[m[1]] if (m := _MEAN.match(lab)) else -1 for lab in labels])
        safe = index.clamp_min(0)
        role = torch.where(is_mean, mean_role.expand_as(index), sub.roles.gather(1, safe))
        meta = {"prompt": torch.arange(len(sub)).repeat_interleave(k),
                "position": torch.where(is_mean, -1, index - pad[:, None]).flatten(), "role": role.flatten()}
        index, weights = index.to(device), weights.to(device)
    got: dict[tuple[str, int], torch.Tensor] = {}

    def make_hook(h: str, layer: int):
        def fn(act: torch.Tensor, hook: Any) -> None:
            if act.ndim < 3 or tuple(act.shape[:2]) != (len(sub), sub.seq_len):
                raise ValueError(f"{hook.name} gives {tuple(act.shape)}; a store needs [batch, seq, ...] activations")
            if positions == "all":
                sel = act[b_dev, s_dev].float()
            else:
                sel = select_positions(act, index, weights).flatten(0, 1)
            got[h, layer] = sel.cpu()
        return fn

    fwd = [(hook_name(h, layer), make_hook(h, layer)) for h in hooks for layer in layers]
    stop = max(layers) + 1
    with model.hooks(fwd_hooks=fwd):
        forward(model, sub, return_type=None, stop_at_layer=stop if stop < n_layers else None)
    return got, meta


class _Buffer:
    """Rows waiting to be written: per-chunk pieces, joined only when a shard is cut from them."""

    def __init__(self) -> None:
        self.pieces: list[dict[str, torch.Tensor]] = []
        self.rows = 0
        self.peak = 0  # the most rows held at once (tests read it: memory stays bounded by one shard + one batch)

    def add(self, piece: dict[str, torch.Tensor]) -> None:
        n = int(next(iter(piece.values())).shape[0])
        if n:
            self.pieces.append(piece)
            self.rows += n
            self.peak = max(self.peak, self.rows)

    def take(self, n: int) -> dict[str, torch.Tensor]:
        """The first `n` rows, removed from the buffer."""
        out: dict[str, list[torch.Tensor]] = {}
        need = n
        while need:
            piece = self.pieces[0]
            m = int(next(iter(piece.values())).shape[0])
            use = min(m, need)
            for k, t in piece.items():
                out.setdefault(k, []).append(t[:use])
            if use == m:
                self.pieces.pop(0)
            else:
                self.pieces[0] = {k: t[use:] for k, t in piece.items()}
            need -= use
        self.rows -= n
        return {k: torch.cat(v) for k, v in out.items()}


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1))


def _save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> str:
    """Write a safetensors file atomically; its sha256. One metadata entry, so its bytes are deterministic."""
    from safetensors.torch import save

    data = save({k: t.contiguous() for k, t in tensors.items()}, metadata={"probes.store": json.dumps(meta)})
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return _sha256(data)


def _stats_tensors(stats: dict[str, tuple[int, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, (n, mean, m2) in stats.items():
        out[f"stats/{k}/count"] = torch.tensor([n], dtype=torch.int64)
        out[f"stats/{k}/mean"], out[f"stats/{k}/m2"] = mean, m2
    return out


def _differences(old: Any, new: Any, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _differences(old.get(k), new.get(k), f"{where}.{k}")]
    return [] if old == new else [where]


@dataclass
class _Job:
    """What a write needs, validated: the models, the prompt sets, the plan of batches and the manifest's
    inputs and spec (the same on every rank of a distributed write)."""

    models: dict[str, Any]
    pair: Any
    hooks: list[str]
    layers: list[int]
    positions: Any
    dtype: torch.dtype
    shard_tokens: int
    plan: list[tuple[int, str, int, ChatBatch, int]]  # (set index, set name, first prompt, batch, rows)
    set_info: list[dict[str, Any]]
    inputs: dict[str, Any]
    spec: dict[str, Any]

    @property
    def total(self) -> int:
        return sum(p[-1] for p in self.plan)

    def keys(self) -> list[str]:
        return [_act_key(m, h, layer) for m in self.models for h in self.hooks for layer in self.layers]


def _prepare(source: Any, prompts: Any, hooks: Any, layers: Any, positions: PositionSpec, shard_tokens: Any,
             dtype: Any, models: Sequence[str], batch_size: Any) -> _Job:
    """Every check that needs no forward, and the plan of batches (which validates the position spec on every
    prompt)."""
    models_map, pair = _resolve_models(source, models)
    sets = _resolve_sets(prompts, pair)
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks or len(set(hooks)) != len(hooks) or any(not isinstance(h, str) or "/" in h for h in hooks):
        raise ValueError(f"hooks must be distinct names without '/', got {hooks!r}")
    first = next(iter(models_map.values()))
    n_layers = int(first.cfg.n_layers)
    layers = resolve_layers(layers, n_layers)
    for h in hooks:
        hook_name(h, 0)  # an unknown hook name fails here
    dtype_name = dtype if isinstance(dtype, str) else {v: k for k, v in DTYPES.items()}.get(dtype)
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    positions = _positions_json(positions)

    # The plan: every batch's row count, which validates the position spec on every prompt before any forward.
    plan: list[tuple[int, str, int, ChatBatch, int]] = []
    set_info, labels = [], None
    for si, (name, batch) in enumerate(sets.items()):
        for m in models_map.values():
            check_fits(m, batch)
        n_rows = 0
        for start, sub in batch.chunks(batch_size):
            rows, labels = _chunk_rows(sub, positions)
            plan.append((si, name, start, sub, rows))
            n_rows += rows
        set_info.append({"name": name, "prompts": len(batch), "rows": n_rows})
    inputs = {
        "tokens": checkpoints.key([[name, b.input_ids, b.attention_mask, b.roles] for name, b in sets.items()]),
        "models": {n: checkpoints.fingerprint(m) for n, m in models_map.items()},
    }
    spec = {"models": list(models_map), "hooks": hooks, "layers": layers, "positions": positions,
            "position_labels": labels, "dtype": dtype_name, "shard_tokens": shard_tokens, "batch_size": batch_size}
    return _Job(models=models_map, pair=pair, hooks=hooks, layers=layers, positions=positions,
                dtype=DTYPES[dtype_name], shard_tokens=shard_tokens, plan=plan, set_info=set_info, inputs=inputs,
                spec=spec)


def _resume_stats(folder: Path, shards: list[dict[str, Any]], keys: list[str],
                  ) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """The statistics of the complete shards listed, from their own, after checking each shard's sha256."""
    stats: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    for i, entry in enumerate(shards):
        t = _load_shard(folder, entry, i)
        for k in keys:
            part = (entry["rows"], t[f"stats/{k}/mean"], t[f"stats/{k}/m2"])
            stats[k] = combine(stats[k], part) if k in stats else part
        del t
    return stats


def _clean_temporaries(folder: Path) -> None:
    for stale in folder.glob(".*.tmp"):  # temporaries of a killed writer
        stale.unlink(missing_ok=True)


def _fill(job: _Job, folder: Path, batches: Sequence[tuple[int, str, int, ChatBatch, int]], first_row: int,
          shards: list[dict[str, Any]], stats: dict[str, tuple[int, torch.Tensor, torch.Tensor]],
          save_manifest: Any, shard_meta: dict[str, Any], progress: bool, desc: str) -> None:
    """Write the rows of `batches` (whose first row is row `first_row` of the store) as shards in `folder`,
    after the rows already in its complete `shards`; `shards` and `stats` are extended in place and
    `save_manifest()` is called after every shard, so the shard is on disk before a manifest lists it."""
    done = sum(s["rows"] for s in shards)  # rows already in complete shards
    buffer = _Buffer()

    def flush(n: int) -> None:
        rows = buffer.take(n)
        i = len(shards)
        tensors = {k: v for k, v in rows.items()}
        for k in [k for k in rows if k not in META]:
            part = moments(rows[k])
            tensors[f"stats/{k}/mean"], tensors[f"stats/{k}/m2"] = part[1], part[2]
            stats[k] = combine(stats[k], part) if k in stats else part
        first = first_row + sum(s["rows"] for s in shards)
        sha = _save(tensors, {"format": FORMAT, "shard": i, "first_row": first, "inputs": job.inputs, **shard_meta},
                    folder / shard_name(i))
        shards.append({"file": shard_name(i), "rows": n, "first_row": first, "sha256": sha})
        save_manifest()

    row = 0  # rows of `batches` passed so far
    for si, name, start, sub, n_rows in tqdm(batches, desc=desc, disable=not progress, leave=False):
        if row + n_rows <= done:  # already stored
            row += n_rows
            continue
        acts: dict[str, torch.Tensor] = {}
        meta: dict[str, torch.Tensor] = {}
        for mname in job.models:
            pair = job.pair
            with pair.on_device(mname) if pair is not None else contextlib.nullcontext(job.models[mname]) as model:
                got, meta = _capture(model, sub, job.hooks, job.layers, job.positions)
            for (h, layer), t in got.items():
                if not bool(torch.isfinite(t).all()):
                    r = int(torch.nonzero(~torch.isfinite(t))[0, 0])
                    p = int(meta["prompt"][r])
                    raise FloatingPointError(f"non-finite {mname} activation at {hook_name(h, layer)} for prompt "
                                             f"{start + p} of set {name!r}: '{sub.instructions[p][:60]}'")
                acts[_act_key(mname, h, layer)] = t.to(job.dtype)
        piece = {**acts, "prompt_id": (meta["prompt"] + start).to(torch.int32),
                 "position": meta["position"].to(torch.int32), "role": meta["role"].to(torch.uint8),
                 "set": torch.full((n_rows,), si, dtype=torch.int32)}
        skip = max(done - row, 0)  # the start of this batch is already in the last complete shard
        buffer.add({k: v[skip:] for k, v in piece.items()})
        row += n_rows
        while buffer.rows >= job.shard_tokens:
            flush(job.shard_tokens)
    if buffer.rows:
        flush(buffer.rows)


def write_store(
    source: Any,
    prompts: ChatBatch | Mapping[str, ChatBatch | Sequence[str]],
    out_dir: str | os.PathLike,
    *,
    hooks: str | Sequence[str] = ("resid_post",),
    layers: int | slice | Sequence[int] | None = None,
    positions: PositionSpec = "all",
    shard_tokens: int = 65536,
    dtype: torch.dtype | str = torch.float32,
    models: Sequence[str] = ("base", "instruct"),
    batch_size: int = 16,
    progress: bool = True,
    distributed: bool = False,
) -> Store:
    """Write (or resume writing) the activations of `models` on `prompts` to a store in `out_dir`; the `Store`.

    source: a `ModelPair` (models `"base"`, `"instruct"`; strings in `prompts` are encoded with it) or a
    `{name: model}` mapping of hooked models with the same layers and width.
    prompts: a ChatBatch, or `{set name: ChatBatch or list of instructions}`; rows follow set, prompt, position.
    hooks, layers: as `probes.activations.record` (short names or templates with `{layer}`; None = all layers).
    positions: `"all"` (every real token of every prompt, padded batches included) or a spec `record` accepts
    (`"post_instruction"`, `"user[-1]"`, `"mean(user)"`, a list of these): one row per prompt and column.
    shard_tokens: rows per shard; memory holds at most one shard plus one batch of rows.
    dtype: float32 or bfloat16 (activations are captured in float32 and cast when stored).
    batch_size: prompts per forward; part of the spec, since batch composition decides the last bits of a float.
    Each batch runs through every model in turn (so rows pair up without holding a model's whole output); with an
    offloaded pair that moves each model to the device once per batch.
    distributed: under torchrun (every rank calling with the same arguments), each rank runs a contiguous share
    of the batches and writes its own shards in `out_dir/rank-NNNNN/`; rank 0 writes the manifest and the
    statistics when all are done, and every rank returns the whole store, which reads as the single-process store
    of the same arguments (the module docstring says how). ValueError when some rank would get no batch. Without a
    launcher (or with one process) it is the plain write.
    Raises ValueError on bad input before any forward, `StoreError` when `out_dir` holds a store of other
    inputs or spec (or a damaged shard), FloatingPointError on a non-finite activation.
    """
    job = _prepare(source, prompts, hooks, layers, positions, shard_tokens, dtype, models, batch_size)
    out = Path(out_dir)
    if distributed:
        from probes import distributed as dist

        if dist.world_size() > 1:
            return _write_parts(job, out, progress)
    return _write_whole(job, out, progress)


def _existing(out: Path, job: _Job) -> dict[str, Any] | None:
    """The manifest of the store in `out`, None when there is none; StoreError when it has other inputs or spec."""
    if not (out / MANIFEST).is_file():
        return None
    old = _read_manifest(out)
    diffs = _differences(old["inputs"], job.inputs, "inputs") + _differences(old["spec"], job.spec, "spec")
    if diffs:
        raise StoreError(f"{out} holds a store of other inputs or spec ({', '.join(diffs)}); write to a new folder "
                         "or delete it")
    return old


def _write_whole(job: _Job, out: Path, progress: bool) -> Store:
    """One process writes (or resumes) every shard."""
    manifest_path = out / MANIFEST
    shards: list[dict[str, Any]] = []
    stats: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    old = _existing(out, job)
    if old is not None:
        if old["complete"]:
            return Store(out)
        shards = list(old["shards"])  # resume: keep the complete shards after checking each
        stats = _resume_stats(out, shards, job.keys())
    elif out.exists() and any(out.iterdir()):
        parts = sorted(p.name for p in out.iterdir() if _PART_DIR.match(p.name))
        if parts:
            raise StoreError(f"{out} holds the parts of a write by several processes ({', '.join(parts)}), not yet "
                             "finished: resume it under torchrun with distributed=True and as many processes")
        raise StoreError(f"{out} is not empty and holds no {MANIFEST}: not a store to resume")
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out)

    def manifest(complete: bool, stats_sha: str | None = None) -> dict[str, Any]:
        return {"format": FORMAT, "inputs": job.inputs, "spec": job.spec, "sets": job.set_info, "rows": job.total,
                "complete": complete, "shards": shards, "stats": {"file": STATS, "sha256": stats_sha}}

    _write_json(manifest_path, manifest(False))
    _fill(job, out, job.plan, 0, shards, stats, lambda: _write_json(manifest_path, manifest(False)), {}, progress,
          f"store {out.name}")
    stats_sha = _save(_stats_tensors(stats), {"format": FORMAT, "inputs": job.inputs}, out / STATS)
    _write_json(manifest_path, manifest(True, stats_sha))
    return Store(out)


# --- writing from several processes ---------------------------------------------------------------------------

def part_dir(rank: int) -> str:
    """The folder of a store that rank `rank` of a distributed write writes its shards to."""
    return f"rank-{rank:05d}"


def _part_bounds(job: _Job, world: int) -> list[tuple[int, int]]:
    """Every rank's batches `plan[b0:b1]`, contiguous and in rank order (ValueError when one would get none)."""
    from probes.distributed import shard

    bounds = shard(job.plan, rank=0, world_size=world).bounds
    if any(b0 == b1 for b0, b1 in bounds):
        raise ValueError(f"{len(job.plan)} batches of up to {job.spec['batch_size']} prompts for {world} processes: "
                         "every process needs at least one batch (lower batch_size or launch fewer processes)")
    return bounds


def _open_part(job: _Job, out: Path, rank: int, world: int, bounds: list[tuple[int, int]],
               ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, tuple[int, torch.Tensor, torch.Tensor]]]:
    """Rank `rank`'s part header, its complete shards and their statistics (a resume), checked against the
    folder; StoreError when `out` or the part folder holds something else. Reads only: nothing is written."""
    b0, b1 = bounds[rank]
    header = {"format": PART_FORMAT, "inputs": job.inputs, "spec": job.spec, "rank": rank, "world_size": world,
              "batches": [b0, b1], "first_row": sum(p[-1] for p in job.plan[:b0]),
              "rows": sum(p[-1] for p in job.plan[b0:b1])}
    if (out / MANIFEST).is_file():
        raise StoreError(f"{out} holds a store written by one process, not finished: resume it with one process "
                         "(distributed=False)")
    if out.exists():
        names = [p.name for p in out.iterdir() if not _TEMPORARY.match(p.name)]
        foreign = [n for n in names if not (_PART_DIR.match(n) and (out / n).is_dir())]
        if foreign:
            raise StoreError(f"{out} is not empty ({', '.join(sorted(foreign)[:3])}) and holds no {MANIFEST}: "
                             "not a store to resume")
        extra = sorted(n for n in names if int(n[len("rank-"):]) >= world)
        if extra:
            raise StoreError(f"{out} holds parts of a write by more processes ({', '.join(extra)}): relaunch with "
                             "as many processes as wrote it")
    folder = out / part_dir(rank)
    path = folder / PART
    if not path.is_file():
        if folder.exists() and any(not _TEMPORARY.match(p.name) for p in folder.iterdir()):
            raise StoreError(f"{folder} holds files but no {PART}: not a part to resume")
        return header, [], {}
    old = _read_json(path, PART_FORMAT, "file")
    if old.get("world_size") != world:
        raise StoreError(f"{out} was being written by {old.get('world_size')} processes, not {world}: relaunch with "
                         f"as many")
    diffs = [d for k in header if k != "shards" for d in _differences(old.get(k), header[k], f"{part_dir(rank)}.{k}")]
    if diffs:
        raise StoreError(f"{out} holds a store of other inputs or spec ({', '.join(diffs)}); write to a new folder "
                         "or delete it")
    shards = list(old["shards"])
    return header, shards, _resume_stats(folder, shards, job.keys())


def _write_parts(job: _Job, out: Path, progress: bool) -> Store:
    """Each rank of a torchrun launch writes (or resumes) its share of the batches; rank 0 then writes the
    manifest and statistics of the whole store.

    Rank r runs the contiguous batches `plan[b0:b1]` (`probes.distributed.shard` over the batches of all sets
    in order, so the ranks' rows are contiguous runs of the store's rows in rank order) and writes them as
    `rank-0000r/shard-*.safetensors` with their global prompt ids, listed in `rank-0000r/part.json` after each
    shard, as one process lists its shards. Every batch is one that a single process runs, so every stored value
    is bitwise a single process's. When every part is done, each rank's shard list and float64 (count, mean,
    M2) are gathered to rank 0 in rank order and combined there with `combine` (the parallel Welford update;
    a float64 all-reduce would need raw power sums, which cancel), and rank 0 writes `stats.safetensors` and
    `manifest.json`, whose shards are every part's in rank order. Its inputs and spec are those of a single
    process's store on the same arguments. Checks of the folder run on every rank before any forward and are
    shared, so every rank raises the same StoreError.
    """
    from probes import distributed as dist

    rank, world = dist.rank(), dist.world_size()
    bounds = _part_bounds(job, world)
    old = _existing(out, job)
    if old is not None and old["complete"]:
        return Store(out)
    problem = None
    try:
        header, shards, stats = _open_part(job, out, rank, world, bounds)
    except StoreError as exc:
        problem = f"rank {rank}: {exc}"
    problems = [p for p in dist.all_gather_object(problem) if p]
    if problems:
        raise StoreError("; ".join(problems))

    folder = out / part_dir(rank)
    folder.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(folder)
    path = folder / PART

    def save(complete: bool = False) -> None:
        _write_json(path, {**header, "complete": complete, "shards": shards})

    save()
    b0, b1 = bounds[rank]
    _fill(job, folder, job.plan[b0:b1], header["first_row"], shards, stats, save, {"rank": rank},
          progress and dist.is_main(), f"store {out.name} (rank {rank} of {world})")
    save(True)

    parts = dist.gather_object((shards, stats))  # rank order
    problem = None
    if rank == 0:
        try:
            _finish_parts(job, out, parts, bounds)
        except StoreError as exc:
            problem = str(exc)
    problem = dist.all_gather_object(problem)[0]  # also the barrier: the manifest is written when this returns
    if problem:
        raise StoreError(problem)
    return Store(out)


def _finish_parts(job: _Job, out: Path, parts: list[Any], bounds: list[tuple[int, int]]) -> None:
    """Rank 0: the whole store's manifest and statistics from every rank's shards and statistics."""
    _clean_temporaries(out)
    shards: list[dict[str, Any]] = []
    stats: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    writers = []
    for rank, (part_shards, part_stats) in enumerate(parts):
        d = part_dir(rank)
        for entry in part_shards:
            if not (out / d / entry["file"]).is_file():
                raise StoreError(f"{out / d / entry['file']}: rank {rank}'s shard is not visible to rank 0 (is "
                                 f"{out} on a file system every rank shares?)")
            shards.append({**entry, "file": f"{d}/{entry['file']}"})
        for k, part in part_stats.items():
            stats[k] = combine(stats[k], part) if k in stats else part
        writers.append({"rank": rank, "dir": d, "batches": list(bounds[rank]), "shards": len(part_shards),
                        "rows": sum(s["rows"] for s in part_shards)})
    stats_sha = _save(_stats_tensors(stats), {"format": FORMAT, "inputs": job.inputs}, out / STATS)
    _write_json(out / MANIFEST, {"format": FORMAT, "inputs": job.inputs, "spec": job.spec, "sets": job.set_info,
                                 "rows": job.total, "complete": True, "shards": shards,
                                 "stats": {"file": STATS, "sha256": stats_sha}, "writers": writers})


# --- reading --------------------------------------------------------------------------------------------------

def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise StoreError(f"{folder}: no {MANIFEST}, not an activation store")
    return _read_json(path, FORMAT, "manifest")


def _read_json(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A JSON object of format `fmt` from `path`; StoreError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise StoreError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise StoreError(f"{path}: not a {fmt} {what}")
    return data


def _read_shard_bytes(folder: Path, entry: dict[str, Any], i: int) -> bytes:
    path = folder / entry["file"]
    if not path.is_file():
        raise StoreError(f"{path}: shard {i} listed in the manifest is missing")
    data = path.read_bytes()
    if _sha256(data) != entry["sha256"]:
        raise StoreError(f"{path}: sha256 mismatch, shard {i} changed or was damaged after it was written")
    return data


def _load_shard(folder: Path, entry: dict[str, Any], i: int) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_shard_bytes(folder, entry, i)
    try:
        return load(data)
    except SafetensorError as exc:
        raise StoreError(f"{folder / entry['file']}: not a safetensors file ({exc})") from None


class Store:
    """A store folder written by `write_store`, read shard by shard.

    `Store(path)` reads the manifest; a store whose writer has not finished is refused unless `allow_partial`
    (then only its complete shards are read, and statistics are combined from theirs). Every shard read is
    checked against the manifest's sha256 and shapes (`StoreError` names the file).
    """

    def __init__(self, path: str | os.PathLike, *, allow_partial: bool = False):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        if not self.manifest["complete"] and not allow_partial:
            done = sum(s["rows"] for s in self.manifest["shards"])
            raise StoreError(f"{self.path}: incomplete store ({done} of {self.manifest['rows']} rows); resume it with "
                             "write_store on the same inputs, or open it with allow_partial=True")
        self._check_shard_list()
        self._stats: dict[str, tuple[int, torch.Tensor, torch.Tensor]] | None = None

    def _check_shard_list(self) -> None:
        """Shards are files inside the store (at its top, or in one rank's folder of a distributed write) whose
        rows follow one another without a gap."""
        first = 0
        where = self.path / MANIFEST
        for i, entry in enumerate(self.manifest["shards"]):
            name = PurePosixPath(str(entry.get("file", "")))
            inside = len(name.parts) == 1 or (len(name.parts) == 2 and _PART_DIR.match(name.parts[0]))
            if not inside or not re.match(r"^shard-\d{5}\.safetensors$", name.name):
                raise StoreError(f"{where}: shard {i} is {str(name)!r}, not a shard file of this store")
            if entry.get("first_row") != first:
                raise StoreError(f"{where}: shard {i} starts at row {entry.get('first_row')}, not {first}: the shard "
                                 "list has a gap or is out of order")
            first += int(entry["rows"])
        if self.manifest["complete"] and first != self.manifest["rows"]:
            raise StoreError(f"{where}: complete, but its shards hold {first} of {self.manifest['rows']} rows")

    def __repr__(self) -> str:
        s = self.spec
        return (f"Store({str(self.path)!r}, rows={self.rows}, shards={len(self)}, models={s['models']}, "
                f"hooks={s['hooks']}, layers={s['layers']}, dtype={s['dtype']})")

    @property
    def spec(self) -> dict[str, Any]:
        return self.manifest["spec"]

    @property
    def rows(self) -> int:
        """Rows in the store's complete shards (all rows once the store is complete)."""
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def sets(self) -> list[str]:
        return [s["name"] for s in self.manifest["sets"]]

    def __len__(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, i: int) -> dict[str, torch.Tensor]:
        """Shard `i` as `{"{model}/{hook}/{layer}": [rows, *feature], "prompt_id", "position", "role", "set":
        [rows], "stats/...": float64}`, checked against the manifest."""
        if not 0 <= i < len(self):
            raise IndexError(f"shard {i} of a store with {len(self)} shards")
        entry = self.manifest["shards"][i]
        tensors = _load_shard(self.path, entry, i)
        s = self.spec
        want = [*META, *(_act_key(m, h, layer) for m in s["models"] for h in s["hooks"] for layer in s["layers"])]
        for k in want:
            t = tensors.get(k)
            if t is None or t.shape[0] != entry["rows"]:
                raise StoreError(f"{self.path / entry['file']}: {k} missing or not {entry['rows']} rows")
        return tensors

    def _all_stats(self) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
        if self._stats is not None:
            return self._stats
        stats: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
        if self.complete:
            from safetensors.torch import load

            path = self.path / STATS
            if not path.is_file():
                raise StoreError(f"{path}: statistics file missing")
            data = path.read_bytes()
            if _sha256(data) != self.manifest["stats"]["sha256"]:
                raise StoreError(f"{path}: sha256 mismatch, the statistics changed after they were written")
            flat = load(data)
            for k in {k.rsplit("/", 1)[0][len("stats/"):] for k in flat}:
                stats[k] = (int(flat[f"stats/{k}/count"][0]), flat[f"stats/{k}/mean"], flat[f"stats/{k}/m2"])
        else:
            for i, entry in enumerate(self.manifest["shards"]):
                t = self.shard(i)
                for k in (k for k in t if k not in META and not k.startswith("stats/")):
                    part = (entry["rows"], t[f"stats/{k}/mean"], t[f"stats/{k}/m2"])
                    stats[k] = combine(stats[k], part) if k in stats else part
        self._stats = stats
        return stats

    def _stat(self, model: str, hook: str, layer: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        s = self.spec
        if model not in s["models"] or hook not in s["hooks"] or layer not in s["layers"]:
            raise ValueError(f"({model!r}, {hook!r}, {layer}) is not stored: models {s['models']}, hooks "
                             f"{s['hooks']}, layers {s['layers']}")
        got = self._all_stats().get(_act_key(model, hook, layer))
        if got is None:
            raise ValueError("no rows stored yet")
        return got

    def count(self, model: str, hook: str, layer: int) -> int:
        return self._stat(model, hook, layer)[0]

    def mean(self, model: str, hook: str, layer: int) -> torch.Tensor:
        """`[*feature]` float64 mean over every stored row."""
        return self._stat(model, hook, layer)[1]

    def var(self, model: str, hook: str, layer: int, *, correction: int = 1) -> torch.Tensor:
        """`[*feature]` float64 variance over every stored row; `correction=1` (unbiased) as `torch.var`."""
        n, _, m2 = self._stat(model, hook, layer)
        if n - correction <= 0:
            raise ValueError(f"{n} rows: too few for a variance with correction {correction}")
        return m2 / (n - correction)

    def iter_batches(
        self, batch_rows: int, *, models: Sequence[str] | None = None, hook: str | None = None,
        layers: int | Sequence[int] | None = None, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of `batch_rows` rows, streamed one shard at a time: `{model: activations, "prompt_id",
        "position", "role", "set": [rows] int64}`.

        activations: `[rows, *feature]` for an int `layers`, `[rows, layer, *feature]` for a list (None = every
        stored layer), in the store's dtype. hook: None when only one is stored. Batches run across shard
        boundaries; the last may be short unless `drop_last`. shuffle: shards in a random order and rows shuffled
        within each shard (a shard-local shuffle, memory stays at one shard), reproducible from `seed`. Each
        shard is read whole, to check its sha256, whatever subset of it is asked for.
        """
        s = self.spec
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise ValueError(f"batch_rows must be a positive integer, got {batch_rows!r}")
        models = list(s["models"]) if models is None else ([models] if isinstance(models, str) else list(models))
        missing = [m for m in models if m not in s["models"]]
        if not models or missing:
            raise ValueError(f"models {missing or models!r} not stored (stored: {s['models']})")
        if hook is None:
            if len(s["hooks"]) != 1:
                raise ValueError(f"several hooks stored ({s['hooks']}); name one")
            hook = s["hooks"][0]
        elif hook not in s["hooks"]:
            raise ValueError(f"hook {hook!r} not stored (stored: {s['hooks']})")
        one = isinstance(layers, int)
        chosen = list(s["layers"]) if layers is None else ([layers] if one else list(layers))
        bad = [layer for layer in chosen if layer not in s["layers"]]
        if not chosen or bad:
            raise ValueError(f"layers {bad or chosen!r} not stored (stored: {s['layers']})")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=gen).tolist() if shuffle else list(range(len(self)))
        buffer = _Buffer()
        for i in order:
            t = self.shard(i)
            piece = {k: t[k].long() for k in META}
            for m in models:
                acts = [t[_act_key(m, hook, layer)] for layer in chosen]
                piece[m] = acts[0] if one else torch.stack(acts, 1)
            del t
            if shuffle:
                perm = torch.randperm(self.manifest["shards"][i]["rows"], generator=gen)
                piece = {k: v[perm] for k, v in piece.items()}
            buffer.add(piece)
            while buffer.rows >= batch_rows:
                yield buffer.take(batch_rows)
        if buffer.rows and not drop_last:
            yield buffer.take(buffer.rows)
