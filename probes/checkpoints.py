"""Finished chunks of long loops, kept on disk so that an interrupted run resumes where it stopped.

A loop (recording, logit lens, per-token KL, refusal sweep) asks the active `ChunkStore` for a chunk by a key that
hashes everything its result depends on: the loop's name and parameters, the chunk's token ids and attention mask,
and the model's fingerprint. A hit returns the saved tensors (safetensors, never pickle); a miss computes the chunk
and saves it. A run folder activates its store (`probes.runs.Run`); outside a run nothing is stored.

Only un-intervened forwards are stored by the loops that run under a caller's hooks: a hook is code, and code
cannot be hashed, so `cacheable(model)` is False while any forward hook is attached.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from probes.files import atomic_path

_ACTIVE: contextvars.ContextVar[ChunkStore | None] = contextvars.ContextVar("probes_chunk_store", default=None)


def _update(h: Any, x: Any) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, (list, tuple)):
        h.update(f"seq{len(x)}".encode())
        for v in x:
            _update(h, v)
    elif isinstance(x, dict):
        h.update(f"map{len(x)}".encode())
        for k in sorted(x, key=str):
            _update(h, str(k))
            _update(h, x[k])
    else:
        h.update(json.dumps(x, default=str).encode())


def key(*parts: Any) -> str:
    """sha256 over tensors (shape, dtype, bytes), sequences, mappings and JSON-able values."""
    h = hashlib.sha256()
    for p in parts:
        _update(h, p)
    return h.hexdigest()


def fingerprint(model: Any) -> str:
    """A hash of every parameter's name, shape, dtype and bytes; recomputed only after an in-place edit.

    Tensors count their in-place updates (`_version`), so an edited model (e.g. `orthogonalize`) gets a new
    fingerprint and never reuses chunks of the model it was.
    """
    params = sorted(model.named_parameters(), key=lambda kv: kv[0])
    state = tuple((p.data_ptr(), p._version) for _, p in params)
    cached = getattr(model, "_probes_fingerprint", None)
    if cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.sha256()
    for name, p in params:
        h.update(name.encode())
        _update(h, p)
    digest = h.hexdigest()
    with contextlib.suppress(AttributeError, TypeError):
        object.__setattr__(model, "_probes_fingerprint", (state, digest))
    return digest


def cacheable(model: Any) -> bool:
    """False while any forward hook is attached to one of the model's hook points (an intervention is active)."""
    for hp in getattr(model, "hook_dict", {}).values():
        if getattr(hp, "_forward_hooks", None) or getattr(hp, "_forward_pre_hooks", None):
            return False
    return True


class ChunkStore:
    """Chunks as `<folder>/<key>.safetensors`, written atomically (a killed write leaves no partial chunk)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _path(self, k: str) -> Path:
        return self.folder / f"{k}.safetensors"

    def get(self, k: str) -> dict[str, torch.Tensor] | None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._path(k)
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError):  # unreadable chunk: recompute it
            path.unlink(missing_ok=True)
            return None

    def put(self, k: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(k)
        with atomic_path(path) as tmp:
            save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(tmp))

    def compute(self, k: str, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The chunk `k`: loaded if it was finished before, else `fn()` computed and saved."""
        got = self.get(k)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        out = fn()
        self.put(k, out)
        return out

    @contextlib.contextmanager
    def activate(self) -> Iterator[ChunkStore]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def active() -> ChunkStore | None:
    return _ACTIVE.get()


def chunk(name: str, models: Any, params: Any, inputs: Any,
          fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`fn()` through the active store when there is one and every model runs un-intervened; else `fn()` itself.

    name: the loop; models: the model (or models) the chunk runs through, fingerprinted into the key; params: what
    besides the inputs decides the result (hooks, layers, positions, ...); inputs: the chunk's tensors (token ids,
    attention mask, ...).
    """
    store = active()
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if store is None or not all(cacheable(m) for m in models):
        return fn()

    def inner() -> dict[str, torch.Tensor]:
        token = _ACTIVE.set(None)  # loops inside this chunk (e.g. record inside the lens) store nothing twice
        try:
            return fn()
        finally:
            _ACTIVE.reset(token)

    return store.compute(key(name, [fingerprint(m) for m in models], params, inputs), inner)


def pack(parts: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`{group: {name: tensor}}` -> `{"group/name": tensor}`, the flat form a chunk file holds."""
    return {f"{g}/{n}": t for g, d in parts.items() for n, t in d.items()}


def unpack(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        g, n = k.split("/", 1)
        out.setdefault(g, {})[n] = t
    return out
