"""probes.distributed: the helpers on one process, and 2 gloo processes (torchrun) against one process.

Tolerances: float64 sums and means to 1e-12 relative (only the order chunk sums are added in differs); per-prompt
activations kept by `record` bitwise (each rank runs the very chunks one process runs); lens and sweep numbers to
float32 rounding (rtol 1e-6), token ids and ranks exactly. The activation store written by 2 ranks reads as one
process's: every stored value and label bitwise, statistics to float64 rounding (1e-12; they are combined over
other shard boundaries), and a rank killed mid-write resumes to the bytes of an uninterrupted 2-rank write.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probes import distributed as dist
from probes import store as S
from probes.runs import Run
from probes.store import Store, StoreError, write_store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker as W  # noqa: E402

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def single(monkeypatch):
    """A plain process: no launcher variables."""
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)


def as_rank(monkeypatch, r: int, w: int) -> None:
    """The variables torchrun sets, without a process group (enough for what reads only the rank)."""
    monkeypatch.setenv("RANK", str(r))
    monkeypatch.setenv("WORLD_SIZE", str(w))
    monkeypatch.setenv("LOCAL_RANK", str(r))


# ------------------------------------------------------------------------------------------ one process: no-ops
def test_helpers_are_noops_on_one_process(single):
    assert (dist.rank(), dist.world_size(), dist.local_rank(), dist.is_main(), dist.launched()) == (0, 1, 0, True, False)
    assert dist.init() is False and not torch.distributed.is_initialized()
    x = torch.tensor([1.5, -2.0], dtype=torch.float32)
    y = dist.all_reduce_sum_float64(x)
    assert y.dtype == torch.float64 and y.tolist() == [1.5, -2.0] and y.data_ptr() != x.data_ptr()
    assert dist.gather_object({"a": 1}) == [{"a": 1}] and dist.all_gather_object(3) == [3]
    dist.barrier()
    s = dist.shard(list(range(7)), block=2)
    assert (s.items, s.start, s.stop, s.bounds, s.total) == (list(range(7)), 0, 7, [(0, 7)], 7)


def test_shard_planted_bounds():
    items = list(range(10))
    parts = [dist.shard(items, block=3, rank=r, world_size=3) for r in range(3)]
    # 4 blocks (3, 3, 3, 1) over 3 ranks: the first rank takes the extra block.
    assert all(p.bounds == [(0, 6), (6, 9), (9, 10)] for p in parts)
    assert [p.items for p in parts] == [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9]]
    # Fewer blocks than ranks: the last ranks get nothing, the cover stays contiguous.
    few = [dist.shard(items[:3], block=2, rank=r, world_size=4) for r in range(4)]
    assert [(p.start, p.stop) for p in few] == [(0, 2), (2, 3), (3, 3), (3, 3)]
    t = torch.arange(12).reshape(6, 2)
    assert torch.equal(dist.shard(t, rank=1, world_size=2).items, t[3:])


def test_shard_bad_input():
    with pytest.raises(ValueError, match="block"):
        dist.shard([1, 2], block=0)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        dist.shard([1, 2], rank=2, world_size=2)


def test_shard_batch_blocks(monkeypatch, toy_batch):
    # 33 prompts, batch 4 over 2 ranks: cut on chunk boundaries.
    as_rank(monkeypatch, 1, 2)
    part = dist.shard_batch(toy_batch, 4)
    assert part.bounds == [(0, 20), (20, 33)] and part.items.instructions == toy_batch.instructions[20:]
    # More ranks than chunks: blocks of ceil(n / world) rows instead.
    as_rank(monkeypatch, 0, 3)
    assert dist.shard_batch(toy_batch, 32).bounds == [(0, 11), (11, 22), (22, 33)]
    as_rank(monkeypatch, 0, 40)
    with pytest.raises(ValueError, match="33 prompts for 40 processes"):
        dist.shard_batch(toy_batch, 4)


def test_collectives_need_the_group(monkeypatch):
    as_rank(monkeypatch, 1, 2)
    assert not dist.is_main() and dist.world_size() == 2
    with pytest.raises(RuntimeError, match="call probes.distributed.init"):
        dist.all_reduce_sum_float64(torch.ones(2))
    with pytest.raises(RuntimeError, match="call probes.distributed.init"):
        dist.gather_object(1)


def test_init_rejects_unknown_backend(monkeypatch):
    as_rank(monkeypatch, 0, 1)
    with pytest.raises(ValueError, match="unknown backend"):
        dist.init("tcp")


# --------------------------------------------------------------------------------------- Run on ranks other than 0
def test_run_on_rank_1_writes_nothing_there(monkeypatch, tmp_path):
    as_rank(monkeypatch, 1, 2)
    with Run("dist_check", "toy", {"x": 1}, out=tmp_path / "run") as run:
        scratch = run.dir
        run.update(a=1)
        run.save_tensors("t", {"x": torch.ones(2)})
        (run.dir / "direct.txt").write_text("1")
        assert not str(scratch).startswith(str(tmp_path)) and (scratch / "t.safetensors").is_file()
    assert list(tmp_path.iterdir()) == [] and not scratch.exists()  # no target, no lock, no partial folder
    with pytest.raises(KeyError), Run("dist_check", "toy", {}, out=tmp_path / "run") as run:
        scratch = run.dir
        raise KeyError("boom")
    assert list(tmp_path.iterdir()) == [] and not scratch.exists()


def test_run_on_rank_0_records_world_size(monkeypatch, tmp_path):
    as_rank(monkeypatch, 0, 2)
    with Run("dist_check", "toy", {}, out=tmp_path / "run") as run:
        run.update(a=1)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["world_size"] == 2


# ------------------------------------------------------------------------------------ 2 processes vs one process
@pytest.fixture(scope="module")
def pair():
    from probes.pairs import load_pair

    return load_pair("toy")


@pytest.fixture(scope="module")
def toy_batch(pair):
    return W.batches(pair)["record"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env |= {"PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(Path(W.__file__)), str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' returns: [(tensors, facts)] in rank order, from one `torchrun --nproc-per-node 2` on gloo.

    Before it, a short launch writes store A to `stores/killed` until rank 1 kills itself after its second shard
    (a copy of that folder is kept as `stores/killed_at_kill`); the full launch resumes it."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("dist")
    killed = torchrun(out, "kill-store", PROBES_TEST_KILL_RANK="1")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-4000:]
    shutil.copytree(out / "stores" / "killed", out / "stores" / "killed_at_kill")
    proc = torchrun(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, [(load_file(str(out / f"rank{r}.safetensors")), json.loads((out / f"rank{r}.json").read_text()))
                 for r in range(2)]


@pytest.fixture(scope="module")
def reference(pair):
    """The same calls in one process, through the single-process functions."""
    from probes.activations import record
    from probes.lens import logit_lens, paired_lens
    from probes.refusal import candidates, layer_cutoff, refusal_tokens, sweep

    b, m, bs = W.batches(pair), pair.instruct, W.BATCH
    out: dict[str, torch.Tensor] = {}
    means = record(m, b["record"], "resid_pre", None, "post_instruction", batch_size=bs, keep="mean", progress=False)
    out["record_mean/sum"] = means.sums["resid_pre"]
    kept = record(m, b["record"], ["resid_post", "blocks.{layer}.attn.hook_z"], [0, 2], "post_instruction[-1]",
                  batch_size=bs, progress=False)
    out |= {f"record_all/{h}": t for h, t in kept.tensors.items()}
    out |= {f"record_all_sum/{h}": t for h, t in kept.sums.items()}
    lens = logit_lens(m, b["record"], positions="post_instruction", targets=W.TARGETS, batch_size=bs, progress=False)
    out |= {f"lens/{k}": v for k, v in lens.tensors().items()}
    out |= {f"lens_means/{k}": v for k, v in dist.lens_means(lens).items()}
    paired = paired_lens(pair, b["record"], positions="post_instruction[-1]", batch_size=bs, progress=False)
    out |= {f"paired/{k}": v for k, v in paired.tensors().items()}
    out |= {f"paired_means/{k}": v for k, v in dist.lens_means(paired).items()}
    cands = candidates(m, b["harmful"], b["harmless"], batch_size=bs, progress=False)
    out["cands/diff"] = cands.diff
    sw = sweep(m, cands, b["harmful_val"], b["harmless_val"], refusal_tokens(pair.tokenizer), batch_size=bs,
               progress=False)
    out |= {"sweep/bypass": sw.bypass, "sweep/induce": sw.induce, "sweep/kl": sw.kl}
    fast = sweep(m, cands, b["harmful_val"], b["harmless_val"], refusal_tokens(pair.tokenizer), batch_size=bs,
                 progress=False, screen=W.SCREEN, layer_bound=layer_cutoff(int(m.cfg.n_layers)))
    out |= {"screened/bypass": fast.bypass, "screened/induce": fast.induce, "screened/kl": fast.kl,
            "screened/scored": fast.scored, "screened/induce_scored": fast.induce_scored}
    out["screened_passes"] = torch.tensor([fast.forwards, fast.backwards])
    return out, [sw.baseline_harmful, sw.baseline_harmless], b


def f64_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == torch.float64
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_two_ranks_collectives_and_shards(two_ranks, reference):
    _, ranks = two_ranks
    n = len(reference[2]["record"])
    for r, (_, facts) in enumerate(ranks):
        assert (facts["rank"], facts["world_size"], facts["is_main"]) == (r, 2, r == 0)
        assert facts["all_reduce"] == [3.0, 1.0] and facts["all_reduce_dtype"] == "torch.float64"
        assert facts["all_gather"] == [0, 10]
        assert facts["shard"][2] == [[0, 20], [20, n]] and facts["shard"][:2] == facts["shard"][2][r]
    assert ranks[0][1]["gather"] == [{"rank": 0}, {"rank": 1}] and ranks[1][1]["gather"] is None


def test_accelerate_launch_runs_the_same_data_parallel_record(tmp_path, reference):
    """`accelerate launch --multi_gpu --num_processes 2` (on CPU it starts torch.distributed.run, gloo): the same
    float64 sums as one process."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env |= {"PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(Path(W.__file__)), str(tmp_path), "means"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(2):
        assert json.loads((tmp_path / f"means{r}.json").read_text())["world_size"] == 2
        f64_close(load_file(str(tmp_path / f"means{r}.safetensors"))["sum"], reference[0]["record_mean/sum"])


def test_two_ranks_record_equals_one_process(two_ranks, reference):
    _, ranks = two_ranks
    ref, _, b = reference
    for got, facts in ranks:
        f64_close(got["record_mean/sum"], ref["record_mean/sum"])
        assert facts["record_mean"] == dict(count=len(b["record"]), tensors=True, prompts=b["record"].instructions)
        for h in ("resid_post", "blocks.{layer}.attn.hook_z"):
            assert torch.equal(got[f"record_all/{h}"], ref[f"record_all/{h}"])  # the same chunks: bitwise
            f64_close(got[f"record_all_sum/{h}"], ref[f"record_all_sum/{h}"])
        f64_close(got["cands/diff"], ref["cands/diff"])


def test_two_ranks_lens_equals_one_process(two_ranks, reference):
    _, ranks = two_ranks
    ref = reference[0]
    keys = [k for k in ref if k.startswith(("lens/", "paired/"))]
    assert {"lens/topk_ids", "lens/target_rank", "paired/kl_instruct_base", "paired/first_diff_layer"} <= set(keys)
    for got, facts in ranks:
        assert facts["lens_local_rows"] == 20 - 7 * facts["rank"]  # gather=False kept this rank's rows only
        for k in keys:
            assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype, k
            if ref[k].is_floating_point():
                torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
            else:
                assert torch.equal(got[k], ref[k]), k
        means = [k for k in ref if k.startswith(("lens_means/", "paired_means/"))]
        assert {"lens_means/entropy", "lens_means/target_logprob", "paired_means/kl_base_instruct"} <= set(means)
        for k in means:  # all-reduced from each rank's shard vs taken over the whole result
            f64_close(got[k], ref[k])


def test_two_ranks_sweep_equals_one_process(two_ranks, reference):
    _, ranks = two_ranks
    ref, baselines, _ = reference
    for got, facts in ranks:
        for k in ("sweep/bypass", "sweep/induce", "sweep/kl"):
            # Layer 0's resid_pre is the embedding of the same template tokens in both sets: no direction, NaN.
            assert not bool(torch.isfinite(ref[k][0]).any()) and bool(torch.isfinite(ref[k][1:]).all())
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, equal_nan=True, msg=k)
        torch.testing.assert_close(torch.tensor(facts["sweep_baselines"]), torch.tensor(baselines), rtol=1e-6, atol=0)


def test_two_ranks_screened_sweep_equals_one_process(two_ranks, reference):
    """The screen's initial exact set split over the ranks: the same cells scored, the same scores; the passes
    summed over ranks (each also runs the baselines, the estimates and the verification rounds)."""
    _, ranks = two_ranks
    ref = reference[0]
    assert int(ref["screened/scored"].sum()) > 1
    for got, facts in ranks:
        for k in ("screened/scored", "screened/induce_scored"):
            assert torch.equal(got[k], ref[k]), k
        for k in ("screened/bypass", "screened/induce", "screened/kl"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, equal_nan=True, msg=k)
        fwd, bwd = facts["screened_passes"]
        assert int(ref["screened_passes"][0]) < fwd < 2 * int(ref["screened_passes"][0])
        assert bwd == 2 * int(ref["screened_passes"][1])


def test_two_ranks_only_rank_0_writes_the_run(two_ranks):
    out, ranks = two_ranks
    run = out / "run"
    assert {p.name for p in out.iterdir()} == {"run", ".run.lock", "stores"} | {f"rank{r}.{e}" for r in range(2)
                                                                    for e in ("json", "safetensors")}
    assert json.loads((run / "results.json").read_text()) == {"rank": 0}
    assert (run / "direct.txt").read_text() == "0"
    config = json.loads((run / "config.json").read_text())
    assert config["rank_opened"] == 0 and config["world_size"] == 2
    assert ranks[0][1]["run_dir"] == str(out / ".run.partial") and not (out / ".run.partial").exists()
    assert not ranks[1][1]["run_dir"].startswith(str(out)) and not ranks[1][1]["run_dir_exists_after"]


# ----------------------------------------------------------------------------------- the store from 2 processes
@pytest.fixture(scope="module")
def one_process_stores(pair, tmp_path_factory):
    """Stores A and B written by one process, from the same arguments as the workers'."""
    root = tmp_path_factory.mktemp("one_process")
    return {name: write_store(pair, W.store_sets(), root / name, **kw) for name, kw in (("a", W.STORE_A),
                                                                                       ("b", W.STORE_B))}


def all_rows(st: Store) -> dict[str, torch.Tensor]:
    """Every tensor of every row, in store order, shard by shard (so shard boundaries do not matter)."""
    keys = [k for k in st.shard(0) if not k.startswith("stats/")]
    return {k: torch.cat([st.shard(i)[k] for i in range(len(st))]) for k in keys}


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_ranks_store_reads_as_one_process(two_ranks, one_process_stores):
    out, ranks = two_ranks
    for name in ("a", "b"):
        got, ref = Store(out / "stores" / name), one_process_stores[name]
        for k in ("inputs", "spec", "sets", "rows", "format", "complete"):
            assert got.manifest[k] == ref.manifest[k], (name, k)
        rows, want = all_rows(got), all_rows(ref)
        s = got.spec
        assert sorted(rows) == sorted(want) and len(want) == 4 + 2 * len(s["hooks"]) * len(s["layers"])
        for k in want:  # activations and labels: bitwise, row by row
            assert rows[k].dtype == want[k].dtype and torch.equal(rows[k], want[k]), (name, k)
        # Through the ordinary reader too, batches across the ranks' shards.
        for hook in got.spec["hooks"]:
            a, b = [list(s.iter_batches(7, hook=hook)) for s in (got, ref)]
            assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
        for m in got.spec["models"]:
            for hook in got.spec["hooks"]:
                for layer in got.spec["layers"]:
                    assert got.count(m, hook, layer) == ref.count(m, hook, layer) == ref.rows
                    f64_close(got.mean(m, hook, layer), ref.mean(m, hook, layer))
                    f64_close(got.var(m, hook, layer), ref.var(m, hook, layer))
                    x = want[f"{m}/{hook}/{layer}"].double()  # and against torch on the rows themselves
                    f64_close(got.var(m, hook, layer), x.var(0))
        # Each rank's shards, in rank order: rank 1 starts inside the harmless set, at its global prompt 2.
        files = [s["file"] for s in got.manifest["shards"]]
        n0 = got.manifest["writers"][0]["shards"]
        assert all(f.startswith("rank-00000/") for f in files[:n0]) and all(f.startswith("rank-00001/")
                                                                            for f in files[n0:])
        first = got.shard(n0)
        assert (int(first["set"][0]), int(first["prompt_id"][0])) == (1, 2)
        assert [w["batches"] for w in got.manifest["writers"]] == [[0, 5], [5, 9]]
    for _, facts in ranks:  # every rank returned the whole store
        assert facts["store_rows"] == [one_process_stores["a"].rows, len(Store(out / "stores" / "a")), True]


def test_one_process_reads_and_resumes_the_two_rank_store(two_ranks, pair, monkeypatch):
    out, _ = two_ranks
    monkeypatch.setattr(S, "_capture", lambda *a, **k: pytest.fail("a forward ran"))
    # Complete: the same inputs hash and spec, so one process finds nothing to do.
    st = write_store(pair, W.store_sets(), out / "stores" / "a", **W.STORE_A)
    assert st.complete and st.rows == Store(out / "stores" / "a").rows
    # Unfinished parts are refused by one process, and by a launch of another size, before any forward.
    at_kill = out / "stores" / "killed_at_kill"
    with pytest.raises(StoreError, match=r"parts of a write by several processes \(rank-00000, rank-00001\)"):
        write_store(pair, W.store_sets(), at_kill, **W.STORE_A)
    job = S._prepare(pair, W.store_sets(), W.STORE_A["hooks"], W.STORE_A["layers"], "all", W.STORE_A["shard_tokens"],
                     "float32", ("base", "instruct"), W.STORE_A["batch_size"])
    with pytest.raises(StoreError, match="written by 2 processes, not 3"):
        S._open_part(job, at_kill, 1, 3, S._part_bounds(job, 3))
    with pytest.raises(StoreError, match=r"more processes \(rank-00001\)"):
        S._open_part(job, at_kill, 0, 1, S._part_bounds(job, 1))
    other = S._prepare(pair, W.store_sets(), ["resid_pre"], [0, 2], "all", 45, "float32", ("base", "instruct"), 2)
    with pytest.raises(StoreError, match=r"rank-00001\.spec\.hooks"):
        S._open_part(other, at_kill, 1, 2, S._part_bounds(other, 2))


def test_killed_rank_resumes_to_the_same_bytes(two_ranks, pair):
    out, ranks = two_ranks
    at_kill = out / "stores" / "killed_at_kill"
    part1 = json.loads((at_kill / "rank-00001" / "part.json").read_text())
    assert not (at_kill / "manifest.json").exists() and not part1["complete"]
    assert [s["file"] for s in part1["shards"]] == [S.shard_name(0)]
    assert (at_kill / "rank-00001" / S.shard_name(1)).is_file()  # written, never listed: the resume rewrites it
    # The relaunch ran only rank 1's batches from the one that holds its first unlisted row, in both models.
    job = S._prepare(pair, W.store_sets(), W.STORE_A["hooks"], W.STORE_A["layers"], "all", W.STORE_A["shard_tokens"],
                     "float32", ("base", "instruct"), W.STORE_A["batch_size"])
    b0, b1 = S._part_bounds(job, 2)[1]
    ends = torch.tensor([p[-1] for p in job.plan[b0:b1]]).cumsum(0)
    assert ranks[1][1]["resume_captures"] == 2 * int((ends > part1["shards"][0]["rows"]).sum()) < 2 * (b1 - b0)
    resumed, clean = files_of(out / "stores" / "killed"), files_of(out / "stores" / "a")
    assert list(resumed) == list(clean)
    for name in clean:
        assert resumed[name] == clean[name], name


def test_ranks_write_only_their_own_files(two_ranks):
    out, ranks = two_ranks
    writes = [facts["store_writes"] for _, facts in ranks]
    assert set(writes[0]).isdisjoint(writes[1])  # no file written by both ranks
    assert all(w.startswith("rank-00001/") for w in writes[1])
    assert [w for w in writes[0] if not w.startswith("rank-00000/")] == ["stats.safetensors", "manifest.json"]
    for r in range(2):  # the part file, then each shard once and the part file listing it, then "complete"
        own = [w for w in writes[r] if w.startswith(f"rank-0000{r}/")]
        part, n = f"rank-0000{r}/part.json", len(own) // 2 - 1
        assert n >= 3 and own == [part, *(x for i in range(n) for x in (f"rank-0000{r}/{S.shard_name(i)}", part)),
                                  part]
    names = set(files_of(out / "stores" / "a"))
    assert {n for n in names if "/" not in n} == {"manifest.json", "stats.safetensors"}  # no temporaries left
    assert names == set(writes[0]) | set(writes[1])


def test_reader_checks_the_shard_list(two_ranks, tmp_path):
    out, _ = two_ranks
    folder = tmp_path / "a"
    shutil.copytree(out / "stores" / "a", folder)
    good = json.loads((folder / "manifest.json").read_text())
    for change, match in [(lambda m: m["shards"][0].update(file="../a/rank-00000/shard-00000.safetensors"),
                           "not a shard file"),
                          (lambda m: m["shards"][0].update(file="/tmp/shard-00000.safetensors"), "not a shard file"),
                          (lambda m: m["shards"][0].update(file="rank-1/shard-00000.safetensors"), "not a shard file"),
                          (lambda m: m["shards"].reverse(), "has a gap or is out of order"),
                          (lambda m: m["shards"].pop(), "hold 226 of 249 rows")]:
        bad = json.loads(json.dumps(good))
        change(bad)
        (folder / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(StoreError, match=match):
            Store(folder)


def test_write_store_on_one_process_is_the_plain_store(single, pair, tmp_path):
    sets = {"h": W.store_sets()["harmless"][:3]}
    kw = dict(layers=[1], shard_tokens=20, batch_size=2, progress=False)
    dist.write_store(pair, sets, tmp_path / "d", **kw)
    write_store(pair, sets, tmp_path / "p", **kw)
    assert files_of(tmp_path / "d") == files_of(tmp_path / "p") and not list(tmp_path.glob("d/rank-*"))


def test_a_rank_without_a_batch_is_refused_before_any_forward(monkeypatch, pair, tmp_path):
    monkeypatch.setattr(S, "_capture", lambda *a, **k: pytest.fail("a forward ran"))
    for r in (0, 15):
        as_rank(monkeypatch, r, 16)  # no process group: the check needs none
        with pytest.raises(ValueError, match="9 batches of up to 2 prompts for 16 processes"):
            dist.write_store(pair, W.store_sets(), tmp_path / "s", **W.STORE_A)
    with pytest.raises(ValueError, match="batch_size"):
        dist.write_store(pair, W.store_sets(), tmp_path / "s", **{**W.STORE_A, "batch_size": 0})
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_refusal_experiment_under_torchrun_equals_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 probes run refusal_direction` on the toy pair: rank 0's run folder holds one
    process's numbers (candidates' means and the screened sweep split over the ranks), and only it exists."""
    from safetensors.torch import load_file

    from probes import cli

    flags = ["--n-train", "32", "--n-val", "16", "--n-test", "4", "--max-new-tokens", "4", "--batch-size", "8"]
    assert cli.main(["run", "refusal_direction", "--out", str(tmp_path / "one"), *flags]) == 0
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env |= {"PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "probes.cli", "run", "refusal_direction", "--out",
           str(tmp_path / "two"), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["one", "two"]
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two"))
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert (one["chosen"]["layer"], one["chosen"]["position"]) == (two["chosen"]["layer"], two["chosen"]["position"])
    assert one["sweep"]["scored"] == two["sweep"]["scored"] and one["refusal_rate"] == two["refusal_rate"]
    for k in ("bypass", "induce", "kl"):
        a, b = (torch.tensor([[math.nan if v is None else v for v in row] for row in r["sweep"][k]]) for r in (one, two))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)
    d1, d2 = (load_file(str(tmp_path / n / "directions.safetensors")) for n in ("one", "two"))
    assert d1.keys() == d2.keys()
    for k in d1:
        torch.testing.assert_close(d2[k], d1[k], rtol=1e-5, atol=1e-6, msg=k)
