"""The activation store against `record` of the same activations in memory, in the same run.

Both record `resid_post` at every layer and every token (`positions="all"`) of both models of a pair, on prompts
of one length (record's "all" needs an unpadded batch). Pairs: the toy pair, and a pair of SmolLM2-135M-shaped
random Llamas (seeds 0 and 1; see benchmarks/record_throughput.py).
- Throughput: CPU seconds for record (both models, tensors kept in memory) and for write_store (float32 and
  bfloat16 shards on disk, written, hashed, statistics computed), interleaved repetitions, median.
- Peak RSS against the number of prompts, each in a fresh process that loads the pair and runs one method once;
  "load + 1 forward" is the same process running one prompt through each model instead
  (the weights are memory-mapped, so before a forward they are not yet resident).
Run: python benchmarks/activation_store.py [--reps 3] [--no-write]
"""
from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's probes, not another install's
from _common import machine, median_time, peak_rss_mib, random_llama, write_section

import torch

SETTINGS = {  # pair: (prompts timed, prompt counts for peak RSS, shard_tokens, batch_size)
    "toy": (256, (256, 1024, 4096), 1024, 32),
    "smollm2-135m-random": (16, (16, 32, 64), 256, 8),
}
METHODS = ("record", "store_f32", "store_bf16")


def load(kind: str, root: Path):
    """(pair, prompts(n) -> unpadded ChatBatch of n prompts)."""
    from probes.pairs import load_pair

    if kind == "toy":
        from probes import toy

        pair = load_pair("toy", device="cpu")
        pool = toy.prompts("harmless", "train") + toy.prompts("harmful", "train")
        lengths = pair.encode(pool).attention_mask.sum(-1).tolist()
        common = collections.Counter(lengths).most_common(1)[0][0]
        pool = [p for p, n in zip(pool, lengths) if n == common]
    else:
        pair = load_pair(root / "base", root / "instruct", device="cpu")
        words = "how do i make a cake bake bread tell me about the sun moon sky please explain".split()
        # The tiny word-level tokenizer: 24 words are 24 tokens, so every prompt has one length.
        pool = [" ".join(words[(i + j) % len(words)] for j in range(24)) for i in range(len(words))]

    def prompts(n: int):
        batch = pair.encode([pool[i % len(pool)] for i in range(n)])
        assert bool(batch.attention_mask.all())
        return batch

    return pair, prompts


def methods(pair, batch, out: Path, shard_tokens: int, batch_size: int) -> dict:
    from probes.activations import record
    from probes.store import write_store

    def rec():
        return {w: record(pair[w], batch, hooks="resid_post", positions="all", batch_size=batch_size, progress=False)
                for w in ("base", "instruct")}

    def store(dtype):
        def fn():
            shutil.rmtree(out, ignore_errors=True)
            return write_store(pair, {"p": batch}, out, hooks="resid_post", positions="all", dtype=dtype,
                               shard_tokens=shard_tokens, batch_size=batch_size, progress=False)
        return fn

    return {"record": rec, "store_f32": store(torch.float32), "store_bf16": store(torch.bfloat16)}


def child(kind: str, root: str, method: str, n: int) -> None:
    """Print the peak RSS of loading the pair and running `method` once on n prompts."""
    torch.set_num_threads(1)
    pair, prompts = load(kind, Path(root))
    shard_tokens, batch_size = SETTINGS[kind][2:]
    if method == "load":  # the weights are memory-mapped: a forward pages them in, so the baseline runs one
        from probes.activations import forward

        for w in ("base", "instruct"):
            forward(pair[w], prompts(1), return_type=None)
    else:
        batch = prompts(n)
        with tempfile.TemporaryDirectory() as tmp:
            fns = methods(pair, batch, Path(tmp) / "store", shard_tokens, batch_size)
            result = fns[method]()
            del result
    print(peak_rss_mib())


def rss(kind: str, root: Path, method: str, n: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(root), method, str(n)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def section(kind: str, root: Path, reps: int) -> str:
    n_time, n_rss, shard_tokens, batch_size = SETTINGS[kind]
    pair, prompts = load(kind, root)
    batch = prompts(n_time)
    tokens = batch.input_ids.numel()
    with tempfile.TemporaryDirectory() as tmp:
        fns = methods(pair, batch, Path(tmp) / "store", shard_tokens, batch_size)
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}
        wall: dict[str, list[float]] = {m: [] for m in METHODS}
        for rep in range(reps):  # interleaved, so machine noise hits every method alike
            for m in METHODS:
                w, c = median_time(fns[m], reps=1, warmup=1 if rep == 0 else 0)
                cpu[m].append(c)
                wall[m].append(w)
        st = fns["store_f32"]()
        n_shards, mib = len(st), sum((st.path / s["file"]).stat().st_size for s in st.manifest["shards"]) / 2**20
    med = {m: statistics.median(v) for m, v in cpu.items()}
    med_wall = {m: statistics.median(v) for m, v in wall.items()}
    n_layers, d = pair.n_layers, pair.d_model
    del pair
    rows = ["| method | CPU s | wall s | tokens/s (CPU; each token through both models) | vs record |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for m in METHODS:
        rows.append(f"| {m} | {med[m]:.3f} | {med_wall[m]:.3f} | {tokens / med[m]:,.0f} | {med['record'] / med[m]:.2f}x |")
    throughput = "\n".join(rows)
    base = rss(kind, root, "load", 0)
    mem = {(m, n): rss(kind, root, m, n) for n in n_rss for m in ("record", "store_f32")}
    seq = batch.seq_len
    rows = ["| prompts | tokens | activations (MiB, both models, float32) | record peak RSS (MiB) | "
            "store_f32 peak RSS (MiB) |", "| ---: | ---: | ---: | ---: | ---: |"]
    for n in n_rss:
        act = 2 * n * seq * n_layers * d * 4 / 2**20
        rows.append(f"| {n} | {n * seq:,} | {act:,.0f} | {mem['record', n]:,.0f} | {mem['store_f32', n]:,.0f} |")
    memory = "\n".join(rows)
    print(throughput, memory, sep="\n\n")
    name = ("the toy pair (4 layers, d_model 64)" if kind == "toy" else
            "a pair of SmolLM2-135M-shaped random Llamas (30 layers, d_model 576; seeds 0 and 1)")
    return (f"**{name}** — `resid_post` at all {n_layers} layers, every token, both models; {n_time} prompts of "
            f"{seq} tokens, batch {batch_size}, shards of {shard_tokens:,} rows ({n_shards} shards, {mib:,.1f} MiB "
            f"float32 on disk).\n\n{throughput}\n\nPeak RSS of a fresh process (load + 1 forward of each model: "
            f"{base:,.0f} MiB):\n\n"
            f"{memory}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--only", choices=list(SETTINGS))
    parser.add_argument("--child", nargs=4, metavar=("KIND", "ROOT", "METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, root, method, n = args.child
        child(kind, root, method, int(n))
        return
    torch.set_num_threads(1)
    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in [args.only] if args.only else list(SETTINGS):
            if kind != "toy":
                random_llama(root / "base", seed=0)
                random_llama(root / "instruct", seed=1)
            parts.append(section(kind, root, args.reps))
    body = (f"`python benchmarks/activation_store.py` — CPU, {machine()}, {args.reps} interleaved repetitions "
            "(median; ratios from single-thread CPU time, measured in the same run). `record` keeps both models' "
            "activations in memory; `store_*` writes them as shards with `probes.store.write_store` (cast, "
            "sha256, float64 statistics, manifest) and holds at most one shard plus one batch, so its peak RSS "
            "stays one shard's buffers above the models' own as prompts grow, while record's grows with what it keeps."
            "\n\n"
            + "\n".join(parts))
    if not args.no_write:
        write_section("Activation store", body)


if __name__ == "__main__":
    main()
