"""Data-parallel recording and logit lens: 1 vs 2 processes (torchrun, gloo, CPU, one thread per process).

For the toy pair's instruct model and a SmolLM2-135M-shaped random Llama: `probes.distributed.record(...,
keep="mean")` (resid_post, every layer, post_instruction[-1]) and `probes.distributed.logit_lens` (every layer,
post_instruction[-1], gathered); for the toy pair also `probes.distributed.write_store` (both models, resid_post
of every layer, every token, float32, into a fresh folder each time). Each rank times its part between two
barriers; reported: wall seconds (rank 0, median over repetitions), tokens/s from that wall time, and the CPU
seconds of all ranks together, whose ratio to one process's is the cost of splitting (duplicated set-up,
communication). On a machine whose cores are shared with other work the wall-clock speed-up is what the
neighbours leave: read it with the CPU-time ratio.
Run: python benchmarks/distributed.py [--reps 3] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, random_llama, write_section

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "toy": dict(label="toy pair (instruct)", pair_label="toy pair (base + instruct)", n=256, batch_size=32),
    "smollm2": dict(label="SmolLM2-135M-sized random Llama", n=32, batch_size=8, words=56),
}


def prompts(model: str, tok, spec: dict) -> list[str]:
    if model == "toy":
        from probes import toy

        return (toy.prompts("harmful", "train") + toy.prompts("harmless", "train"))[: spec["n"]]
    words = "how do i make a cake bake bread tell me about the sun moon sky please explain".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(spec["words"])) for i in range(spec["n"])]


def worker(model_key: str, folder: str | None, reps: int, scratch: str) -> None:
    """One rank: time record means, the lens (and for the toy pair the store); rank 0 prints every rank's times
    as JSON. scratch: a folder every rank sees, for the stores."""
    torch.set_num_threads(1)
    from probes import distributed as dist
    from probes.chat import encode

    dist.init()
    pair = None
    if model_key == "toy":
        from probes.pairs import load_pair

        pair = load_pair("toy")
        model, tok = pair.instruct, pair.tokenizer
    else:
        from transformers import AutoTokenizer

        from probes.pairs import load_model

        tok = AutoTokenizer.from_pretrained(folder)
        model = load_model(folder, device="cpu", tokenizer=tok)
    spec = MODELS[model_key]
    batch = encode(tok, prompts(model_key, tok, spec))
    bs = spec["batch_size"]
    tasks = {
        "record means": lambda b: dist.record(model, b, "resid_post", None, "post_instruction[-1]", batch_size=bs,
                                              keep="mean", progress=False),
        "logit lens": lambda b: dist.logit_lens(model, b, batch_size=bs, progress=False),
    }
    if pair is not None:
        stores = iter(range(10**6))

        def store(b):  # a fresh folder every call (the same name on every rank: they call in step)
            return dist.write_store(pair, {"p": b}, Path(scratch) / f"store-{next(stores)}", hooks="resid_post",
                                    positions="all", shard_tokens=4096, batch_size=bs, progress=False)

        tasks["store write"] = store
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in tasks}
    for name, fn in tasks.items():
        fn(batch[: bs * dist.world_size()])  # warm-up: one chunk per rank
        for _ in range(reps):
            dist.barrier()
            t, c = time.perf_counter(), time.process_time()
            fn(batch)
            dist.barrier()
            times[name].append((time.perf_counter() - t, time.process_time() - c))
    got = dist.gather_object(times)
    if dist.is_main():
        tokens = int(batch.attention_mask.sum())
        print("RESULT " + json.dumps(dict(ranks=got, tokens=tokens, prompts=len(batch), seq=batch.seq_len)))


def launch(n_proc: int, model_key: str, folder: str | None, reps: int, scratch: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"PYTHONPATH": f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n_proc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), __file__, "--worker", model_key, "--reps", str(reps),
           "--scratch", scratch]
    if folder:
        cmd += ["--folder", folder]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker")
    parser.add_argument("--folder")
    parser.add_argument("--scratch")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.folder, args.reps, args.scratch)
    torch.set_num_threads(1)
    rows = ["| model | task | prompts x max seq | processes | wall s | tokens/s (wall) | speed-up (wall) | "
            "CPU s, all ranks | CPU-time ratio |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"toy": None, "smollm2": str(random_llama(Path(tmp) / "smollm2-135m-random"))}
        for key, folder in folders.items():
            res = {n: launch(n, key, folder, args.reps, tempfile.mkdtemp(dir=tmp)) for n in (1, 2)}
            for task in res[1]["ranks"][0]:
                wall = {n: statistics.median(max(r[task][i][0] for r in res[n]["ranks"]) for i in range(args.reps))
                        for n in res}
                cpu = {n: statistics.median(sum(r[task][i][1] for r in res[n]["ranks"]) for i in range(args.reps))
                       for n in res}
                label = MODELS[key]["pair_label" if task == "store write" else "label"]
                for n in (1, 2):
                    rows.append(f"| {label} | {task} | {res[n]['prompts']} x {res[n]['seq']} | {n} | "
                                f"{wall[n]:.2f} | {res[n]['tokens'] / wall[n]:,.0f} | {wall[1] / wall[n]:.2f}x | "
                                f"{cpu[n]:.2f} | {cpu[n] / cpu[1]:.2f}x |")
                print(rows[-2], rows[-1], sep="\n", flush=True)
    table = "\n".join(rows)
    body = (f"`python benchmarks/distributed.py` — `probes.distributed.record(..., keep=\"mean\")` (resid_post, every "
            "layer, post_instruction[-1]), `probes.distributed.logit_lens` (every layer, post_instruction[-1], "
            "gathered on every rank) and, for the toy pair, `probes.distributed.write_store` (both models, resid_post "
            "of every layer, every token, float32, 4,096-row shards, a fresh folder each time; each rank writes its "
            "own shards, rank 0 the manifest and statistics), launched by `torchrun --nproc-per-node 1` and `2` "
            f"(gloo), one thread per process, {machine()}, median of {args.reps} repetitions. Wall time: the "
            "slowest rank, between barriers (model loading excluded); CPU time: all ranks together, its ratio to one "
            "process's is what splitting costs. The machine's 2 cores are shared with other work: the wall-clock "
            "speed-up is what was left to these processes in this run, not a property of the code.\n\n" + table)
    if not args.no_write:
        write_section("Multi-process", body)


if __name__ == "__main__":
    main()
