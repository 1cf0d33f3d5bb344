"""One rank of the data-parallel checks in test_distributed.py (run by `python -m torch.distributed.run`).

Each rank writes what it returned to `<out>/rank<r>.safetensors` + `.json`; the test compares them with one
process's results. Arguments: <out folder> [kill-store | means]. With `means` (the `accelerate launch` check), the
ranks only record the data-parallel resid_pre means. With `kill-store`, the ranks only write store A to
`<out>/stores/killed`, and rank `$PROBES_TEST_KILL_RANK` kills itself (SIGKILL) right after writing its second
shard, before its part file lists it; the full run (without `kill-store`) then resumes that store.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from probes import distributed as dist  # noqa: E402
from probes import store as S  # noqa: E402
from probes import toy  # noqa: E402
from probes.pairs import load_pair  # noqa: E402
from probes.refusal import Screen, candidates, layer_cutoff, refusal_tokens, sweep  # noqa: E402
from probes.runs import Run  # noqa: E402

# The sets and sizes the test recomputes in one process (kept here, imported by the test).
N_RECORD, BATCH = 22, 4  # 33 prompts, 9 chunks of 4 (the last of 1): rank 0 takes 5 chunks, rank 1 four
N_CANDS, N_VAL = 16, 8
TARGETS = [3, 5, 7]
SCREEN = Screen(kl_max=10.0, induce_min=-100.0, max_frac=1.0)  # every candidate passes: lowest exact bypass


def batches(pair):
    harmful, harmless = toy.prompts("harmful", "train"), toy.prompts("harmless", "train")
    return dict(record=pair.encode(harmful[:N_RECORD] + harmless[:N_RECORD][::2]),
                harmful=pair.encode(harmful[:N_CANDS]), harmless=pair.encode(harmless[:N_CANDS]),
                harmful_val=pair.encode(toy.prompts("harmful", "val")[:N_VAL]),
                harmless_val=pair.encode(toy.prompts("harmless", "val")[:N_VAL]))


# Two stores: every token (float32, two hooks) and a position spec with a role mean (bfloat16). In batches of 2
# the sets make 4 + 5 batches: rank 0 takes harmful and harmless[:2], rank 1 harmless[2:] (it starts mid-set).
STORE_A = dict(hooks=["resid_pre", "resid_post"], layers=[0, 2], shard_tokens=45, batch_size=2, progress=False)
STORE_B = dict(layers=[1, 3], positions=["post_instruction[-1]", "mean(user)"], shard_tokens=5, batch_size=2,
               dtype="bfloat16", progress=False)


def store_sets() -> dict[str, list[str]]:
    return {"harmful": toy.prompts("harmful", "train")[:7], "harmless": toy.prompts("harmless", "train")[:10]}


@contextlib.contextmanager
def logged_writes(folder: Path, log: list[str]):
    """Every file the store code writes, as a path relative to `folder`."""
    real_save, real_json = S._save, S._write_json

    def save(tensors, meta, path):
        log.append(Path(path).relative_to(folder).as_posix())
        return real_save(tensors, meta, path)

    def write_json(path, data):
        log.append(Path(path).relative_to(folder).as_posix())
        return real_json(path, data)

    S._save, S._write_json = save, write_json
    try:
        yield
    finally:
        S._save, S._write_json = real_save, real_json


def kill_store(out: Path) -> None:
    dist.init()
    pair = load_pair("toy")
    if dist.rank() == int(os.environ["PROBES_TEST_KILL_RANK"]):
        real_save, saves = S._save, [0]

        def save(tensors, meta, path):
            sha = real_save(tensors, meta, path)
            saves[0] += 1
            if saves[0] == 2:  # on disk, not yet listed in part.json
                os.kill(os.getpid(), signal.SIGKILL)
            return sha

        S._save = save
    dist.write_store(pair, store_sets(), out / "stores" / "killed", **STORE_A)


def main(out: Path) -> None:
    assert dist.init(), "not launched by torchrun"
    r, w = dist.rank(), dist.world_size()
    pair = load_pair("toy")
    b = batches(pair)
    tensors: dict[str, torch.Tensor] = {}
    facts: dict = {"rank": r, "world_size": w, "is_main": dist.is_main()}

    # Collectives.
    facts["all_reduce"] = dist.all_reduce_sum_float64(torch.tensor([r + 1.0, 0.5], dtype=torch.float32)).tolist()
    facts["all_reduce_dtype"] = str(dist.all_reduce_sum_float64(torch.ones(1)).dtype)
    facts["gather"] = dist.gather_object({"rank": r})
    facts["all_gather"] = dist.all_gather_object(r * 10)
    part = dist.shard_batch(b["record"], BATCH)
    facts["shard"] = [part.start, part.stop, part.bounds]
    dist.barrier()

    model = pair.instruct
    means = dist.record(model, b["record"], "resid_pre", None, "post_instruction", batch_size=BATCH, keep="mean",
                        progress=False)
    tensors["record_mean/sum"] = means.sums["resid_pre"]
    facts["record_mean"] = dict(count=means.count, tensors=means.tensors is None, prompts=means.prompts)
    kept = dist.record(model, b["record"], ["resid_post", "blocks.{layer}.attn.hook_z"], [0, 2], "post_instruction[-1]",
                       batch_size=BATCH, keep="all", progress=False)
    tensors |= {f"record_all/{h}": t for h, t in kept.tensors.items()}
    tensors |= {f"record_all_sum/{h}": t for h, t in kept.sums.items()}

    lens = dist.logit_lens(model, b["record"], positions="post_instruction", targets=TARGETS, batch_size=BATCH,
                           progress=False)
    tensors |= {f"lens/{k}": v for k, v in lens.tensors().items()}
    local = dist.logit_lens(model, b["record"], positions="post_instruction", targets=TARGETS, batch_size=BATCH,
                            progress=False, gather=False)
    facts["lens_local_rows"] = int(local.entropy.shape[0])
    tensors |= {f"lens_means/{k}": v for k, v in dist.lens_means(local).items()}
    paired = dist.paired_lens(pair, b["record"], positions="post_instruction[-1]", batch_size=BATCH, progress=False)
    tensors |= {f"paired/{k}": v for k, v in paired.tensors().items()}
    plocal = dist.paired_lens(pair, b["record"], positions="post_instruction[-1]", batch_size=BATCH, progress=False,
                              gather=False)
    tensors |= {f"paired_means/{k}": v for k, v in dist.lens_means(plocal).items()}

    tok = refusal_tokens(pair.tokenizer)
    cands = candidates(model, b["harmful"], b["harmless"], batch_size=BATCH, progress=False, distributed=True)
    tensors["cands/diff"] = cands.diff
    sw = sweep(model, cands, b["harmful_val"], b["harmless_val"], tok, batch_size=BATCH, progress=False,
               distributed=True)
    tensors |= {"sweep/bypass": sw.bypass, "sweep/induce": sw.induce, "sweep/kl": sw.kl}
    facts["sweep_baselines"] = [sw.baseline_harmful, sw.baseline_harmless]
    fast = sweep(model, cands, b["harmful_val"], b["harmless_val"], tok, batch_size=BATCH, progress=False,
                 distributed=True, screen=SCREEN, layer_bound=layer_cutoff(int(model.cfg.n_layers)))
    tensors |= {"screened/bypass": fast.bypass, "screened/induce": fast.induce, "screened/kl": fast.kl,
                "screened/scored": fast.scored, "screened/induce_scored": fast.induce_scored}
    facts["screened_passes"] = [fast.forwards, fast.backwards]

    # The store: each rank writes its share; every rank gets the whole store back.
    stores = out / "stores"
    log: list[str] = []
    with logged_writes(stores / "a", log):
        st = dist.write_store(pair, store_sets(), stores / "a", **STORE_A)
    facts["store_writes"] = log
    facts["store_rows"] = [st.rows, len(st), st.complete]
    S.write_store(pair, store_sets(), stores / "b", distributed=True, **STORE_B)
    captures, real_capture = [], S._capture
    S._capture = lambda *a, **k: captures.append(1) or real_capture(*a, **k)
    dist.write_store(pair, store_sets(), stores / "killed", **STORE_A)  # the relaunch after the kill
    S._capture = real_capture
    facts["resume_captures"] = len(captures)

    # Every rank opens the same run folder; only rank 0's writes may land there.
    with Run("dist_check", "toy", {"rank_opened": r}, out=out / "run") as run:
        facts["run_dir"] = str(run.dir)
        run.update(rank=r)
        run.save_tensors("mine", {"rank": torch.tensor([r])})
        (run.dir / "direct.txt").write_text(str(r))
    facts["run_dir_exists_after"] = Path(facts["run_dir"]).exists()
    dist.barrier()

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rank{r}.safetensors"))
    (out / f"rank{r}.json").write_text(json.dumps(facts))


def means_only(out: Path) -> None:
    """The data-parallel resid_pre sums of the record set, as `main` records them first."""
    assert dist.init(), "not launched with RANK / WORLD_SIZE"
    pair = load_pair("toy")
    means = dist.record(pair.instruct, batches(pair)["record"], "resid_pre", None, "post_instruction",
                        batch_size=BATCH, keep="mean", progress=False)
    from safetensors.torch import save_file

    save_file({"sum": means.sums["resid_pre"].contiguous()}, str(out / f"means{dist.rank()}.safetensors"))
    (out / f"means{dist.rank()}.json").write_text(json.dumps({"world_size": dist.world_size(), "count": means.count}))


if __name__ == "__main__":
    if sys.argv[2:] == ["kill-store"]:
        kill_store(Path(sys.argv[1]))
    elif sys.argv[2:] == ["means"]:
        means_only(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
