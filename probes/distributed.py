"""Data-parallel runs over several processes with torch.distributed (`torchrun`, `accelerate launch`).

Every process runs the same script on the same prompts; each one computes its share and the shares are combined,
so every rank returns what a single process would have returned:

- `record`: each rank records a contiguous shard of the prompts; float64 sums are all-reduced (count-weighted by
  construction: a sum over n prompts plus a sum over m prompts is the sum over n + m), kept tensors gathered in order.
- `logit_lens` / `paired_lens`: per-prompt results gathered in prompt order; `lens_means` reduces means over
  prompts without gathering (with `gather=False`).
- the refusal sweep: `probes.refusal.sweep(..., distributed=True)` splits the candidates, not the prompts.
- `write_store`: each rank writes the activation shards of its share of the batches into its own folder of the
  store; rank 0 writes the manifest and the combined statistics.

Shards are cut on `batch_size` boundaries, so each rank runs exactly the chunks (same rows, same padding) that a
single process runs: per-prompt activations are bitwise those of one process, and float64 sums differ from its
sums only by the order in which chunk sums are added (relative 1e-16 per addition). Only when there are fewer
chunks than ranks are the blocks made smaller, and then chunks differ at float32 rounding.

Without `RANK` / `WORLD_SIZE` in the environment (not launched by torchrun) everything here is a no-op on one
process. Only rank 0 writes a run folder: `probes.runs.Run` on another rank writes into a private scratch
folder that it deletes when the run ends.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from probes import activations as _activations
from probes import lens as _lens
from probes.activations import Activations
from probes.chat import ChatBatch


# ------------------------------------------------------------------------------------------------ process group
def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank: the process group's, else torchrun's `RANK` variable, else 0."""
    return torch.distributed.get_rank() if _initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """How many processes take part: the process group's size, else torchrun's `WORLD_SIZE`, else 1."""
    return torch.distributed.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its node (torchrun's `LOCAL_RANK`, else 0): its GPU index."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on rank 0, the one process that writes files and prints."""
    return rank() == 0


def launched() -> bool:
    """True when started by a launcher that sets `RANK` and `WORLD_SIZE` (torchrun, accelerate launch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(backend: str | None = None) -> bool:
    """Join the process group torchrun set up; False (and nothing done) when not launched by torchrun.

    backend: `"nccl"` when CUDA is available (each rank then uses GPU `LOCAL_RANK`), else `"gloo"`. Rendezvous
    comes from the environment (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`). Calling it twice is harmless.
    """
    if not launched():
        return False
    if _initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "mpi"):
        raise ValueError(f"unknown backend {backend!r}: 'nccl' (GPUs), 'gloo' (CPU) or 'mpi'")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend=backend)
    return True


def device() -> torch.device:
    """The device this rank computes on: `cuda:LOCAL_RANK` when CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _require_group() -> bool:
    """True when collectives must run (more than one process); raises when the group was never joined."""
    if world_size() == 1:
        return False
    if not _initialized():
        raise RuntimeError(f"WORLD_SIZE is {world_size()} but this process has not joined the process group: "
                           "call probes.distributed.init() first")
    return True


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if _require_group():
        torch.distributed.barrier()


def all_reduce_sum_float64(t: torch.Tensor) -> torch.Tensor:
    """The float64 sum of `t` over all ranks, on every rank, on `t`'s device (a float64 copy on one process)."""
    out = t.detach().to(torch.float64).clone()
    if not _require_group():
        return out
    buf = out.to(_comm_device())
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf.to(t.device)


def gather_object(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj` (picklable) in rank order on rank `dst`, None on the others; `[obj]` on one process."""
    if not _require_group():
        return [obj]
    out = [None] * world_size() if rank() == dst else None
    torch.distributed.gather_object(obj, out, dst=dst)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable) in rank order, on every rank; `[obj]` on one process."""
    if not _require_group():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


_this_rank, _this_world = rank, world_size  # `shard`'s arguments shadow them


# ---------------------------------------------------------------------------------------------------- sharding
@dataclass
class Shard:
    """This rank's contiguous slice of the items: `items[start:stop]`.

    bounds: every rank's `(start, stop)` in rank order (contiguous, covering `0..total`), to put per-rank results
    back in order.
    """

    items: Any
    start: int
    stop: int
    bounds: list[tuple[int, int]]
    total: int

    def __len__(self) -> int:
        return self.stop - self.start


def shard(items: Any, *, block: int = 1, rank: int | None = None, world_size: int | None = None) -> Shard:
    """This rank's contiguous slice of `items` (anything with `len` and slicing: a list, a ChatBatch, a tensor).

    The items are cut into blocks of `block` (the last may be shorter) and the blocks dealt out contiguously, the
    first `n_blocks % world_size` ranks taking one more. A rank may get nothing when there are fewer blocks than
    ranks. rank / world_size: this process's by default.
    """
    r = _this_rank() if rank is None else rank
    w = _this_world() if world_size is None else world_size
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank {r} is not in 0..{w - 1}")
    n = len(items)
    n_blocks = math.ceil(n / block)
    bounds = []
    for i in range(w):
        b0 = i * (n_blocks // w) + min(i, n_blocks % w)
        b1 = b0 + n_blocks // w + (i < n_blocks % w)
        bounds.append((min(b0 * block, n), min(b1 * block, n)))
    start, stop = bounds[r]
    return Shard(items=items[start:stop], start=start, stop=stop, bounds=bounds, total=n)


def shard_batch(batch: ChatBatch, batch_size: int) -> Shard:
    """`shard` of a ChatBatch on `batch_size` boundaries (each rank runs the chunks one process would), or in
    `ceil(n / world_size)` blocks when there are fewer chunks than ranks. ValueError when a rank would get none."""
    w = world_size()
    if len(batch) < w:
        raise ValueError(f"{len(batch)} prompts for {w} processes: every process needs at least one prompt")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    block = batch_size if math.ceil(len(batch) / batch_size) >= w else math.ceil(len(batch) / w)
    return shard(batch, block=block)


def _cat_in_order(local: Any) -> Any:
    """All ranks' `local` tensors (or None) concatenated along dim 0 in rank order, on every rank."""
    parts = all_gather_object(local)
    if parts[0] is None:
        return None
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------- recording
def record(model: Any, batch: ChatBatch, hooks: str | Sequence[str] = ("resid_post",),
           layers: int | slice | Sequence[int] | None = None,
           positions: _activations.PositionSpec = "post_instruction[-1]", *, batch_size: int = 16,
           keep: str = "mean", progress: bool = True, model_name: str | None = None) -> Activations:
    """`probes.activations.record` with the prompts split over the ranks; every rank returns the whole result.

    Sums are all-reduced in float64 (`all_reduce_sum_float64`), so `mean()` is the mean over all prompts; with
    `keep="all"` the per-prompt tensors are gathered in prompt order (each rank then holds all of them). The
    default here is `keep="mean"`: only `[layer, position, *feature]` sums cross between processes.
    """
    if keep not in ("all", "mean"):
        raise ValueError("keep must be 'all' or 'mean'")
    part = shard_batch(batch, batch_size)
    acts = _activations.record(model, part.items, hooks, layers, positions, batch_size=batch_size, keep=keep,
                               progress=progress and is_main(), model_name=model_name)
    if world_size() == 1:
        return acts
    sums = {h: all_reduce_sum_float64(s) for h, s in acts.sums.items()}
    count = int(all_reduce_sum_float64(torch.tensor(float(acts.count))).item())
    tensors = None if acts.tensors is None else {h: _cat_in_order(t) for h, t in acts.tensors.items()}
    return Activations(hooks=acts.hooks, layers=acts.layers, positions=acts.positions, model=acts.model,
                       count=count, sums=sums, tensors=tensors, prompts=list(batch.instructions), meta=acts.meta)


def record_pair(pair: Any, batch: ChatBatch, *args: Any, **kwargs: Any) -> dict[str, Activations]:
    """`record` (data-parallel) on both models of `pair`: {"base": ..., "instruct": ...}."""
    return _activations.record_pair(pair, batch, *args, recorder=record, **kwargs)


# ---------------------------------------------------------------------------------------------------- the lens
_PER_PROMPT = ("token_ids", "roles", "topk_ids", "topk_logprobs", "entropy", "kl_to_final", "targets",
               "target_rank", "target_logprob", "logprobs")
_MEANS = ("entropy", "kl_to_final", "target_logprob")


def _gather_lens(res: _lens.LensResult) -> _lens.LensResult:
    fields = {name: _cat_in_order(getattr(res, name)) for name in _PER_PROMPT}
    meta = {k: v for k, v in res.meta.items() if k != "shard"}
    return _lens.LensResult(model=res.model, hook=res.hook, layers=res.layers, positions=res.positions, meta=meta,
                            **fields)


def logit_lens(model: Any, batch: ChatBatch, *, batch_size: int = 8, gather: bool = True, progress: bool = True,
               targets: Any = None, **kwargs: Any) -> _lens.LensResult:
    """`probes.lens.logit_lens` with the prompts split over the ranks.

    gather=True: every rank returns the whole result, per-prompt fields in prompt order. gather=False: each rank
    returns its own prompts' result (`meta["shard"]` records which), for `lens_means` without moving per-prompt
    tensors between processes. kwargs go to `logit_lens` (hook, layers, positions, top_k, pos_chunk, ...).
    """
    part = shard_batch(batch, batch_size)
    res = _lens.logit_lens(model, part.items, batch_size=batch_size, progress=progress and is_main(),
                           targets=_shard_targets(targets, part), **kwargs)
    return _finish_lens(res, part, gather)


def paired_lens(pair: Any, batch: ChatBatch, *, batch_size: int = 8, gather: bool = True, progress: bool = True,
                targets: Any = None, **kwargs: Any) -> _lens.PairedLens:
    """`probes.lens.paired_lens` with the prompts split over the ranks (`gather` as in `logit_lens`)."""
    part = shard_batch(batch, batch_size)
    res = _lens.paired_lens(pair, part.items, batch_size=batch_size, progress=progress and is_main(),
                            targets=_shard_targets(targets, part), **kwargs)
    base, inst = _finish_lens(res.base, part, gather), _finish_lens(res.instruct, part, gather)
    rest = {k: getattr(res, k) for k in ("kl_instruct_base", "kl_base_instruct", "first_diff_layer")}
    if gather and world_size() > 1:
        rest = {k: _cat_in_order(v) for k, v in rest.items()}
    return _lens.PairedLens(base=base, instruct=inst, **rest)


def _shard_targets(targets: Any, part: Shard) -> Any:
    """Per-prompt targets `[prompt, n]` cut to the shard; shared targets `[n]` as they are."""
    if targets is None:
        return None
    t = torch.as_tensor(targets)
    if t.ndim == 2:
        if t.shape[0] != part.total:
            raise ValueError(f"targets must be [n_targets] or [prompt, n_targets] with {part.total} prompts, "
                             f"got shape {tuple(t.shape)}")
        return t[part.start : part.stop]
    return targets


def _finish_lens(res: _lens.LensResult, part: Shard, gather: bool) -> _lens.LensResult:
    if world_size() == 1:
        return res
    if gather:
        return _gather_lens(res)
    res.meta["shard"] = {"start": part.start, "stop": part.stop, "total": part.total}
    return res


def lens_means(res: _lens.LensResult | _lens.PairedLens) -> dict[str, torch.Tensor]:
    """Means over all prompts, `[layer, k]` float64 (`[layer, k, n_targets]` for `target_logprob`).

    Keys: `entropy`, `kl_to_final`, `target_logprob` (with targets); for a PairedLens `base/...`, `instruct/...`,
    `kl_instruct_base`, `kl_base_instruct`. On a rank's shard (`gather=False`), float64 sums and counts are
    all-reduced; on a whole result (one process, or gathered), the mean is taken locally.
    """
    if isinstance(res, _lens.PairedLens):
        out = {f"{w}/{k}": v for w in ("base", "instruct") for k, v in lens_means(getattr(res, w)).items()}
        local = "shard" in res.base.meta
        for k in ("kl_instruct_base", "kl_base_instruct"):
            out[k] = _mean(getattr(res, k), local)
        return out
    local = "shard" in res.meta
    return {k: _mean(getattr(res, k), local) for k in _MEANS if getattr(res, k) is not None}


def _mean(x: torch.Tensor, sharded: bool) -> torch.Tensor:
    total = x.sum(0, dtype=torch.float64)
    count = torch.tensor(float(x.shape[0]))
    if sharded:
        total, count = all_reduce_sum_float64(total), all_reduce_sum_float64(count)
    return total / count


# ------------------------------------------------------------------------------------------------------- store
def write_store(source: Any, prompts: Any, out_dir: Any, **kwargs: Any) -> Any:
    """`probes.store.write_store(source, prompts, out_dir, distributed=True, **kwargs)`: each rank writes (or
    resumes) its contiguous share of the batches as its own shards, rank 0 the manifest and statistics; every rank
    returns the whole `probes.store.Store`, which reads as the single-process store of the same arguments."""
    from probes.store import write_store as _write_store

    return _write_store(source, prompts, out_dir, distributed=True, **kwargs)
