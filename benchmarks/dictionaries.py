"""Training throughput of the dictionaries (tokens per CPU second) and the cost of Latent Scaling.

    python benchmarks/dictionaries.py [--threads 1] [--steps 20] [--no-write]

Shapes: the toy pair's (d_model 64, 256 latents, k 8) and a SmolLM2-135M-sized layer (d_model 576, 4,608 latents =
8 x d, k 64), each on 256- and 1,024-token batches of random paired activations (the arithmetic does not depend
on what the activations mean). Each dictionary trains `--steps` steps after 5 warm-up steps, timed with
`time.process_time`; ratios are against the BatchTopK crosscoder of the same shape and batch, in the same run.
Writes the `## Dictionary training` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import machine, write_section
from probes import dictionaries as D

SHAPES = [("toy pair shape", 64, 256, 8), ("SmolLM2-135M shape", 576, 4608, 64)]


def _batches(d: int, rows: int, n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, rows, d, generator=g)
    inst = base + 0.3 * torch.randn(n, rows, d, generator=g)
    return [{"base": base[i], "instruct": inst[i]} for i in range(n)]


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows_out = []
    for name, d, n_latents, k in SHAPES:
        for rows in (256, 1024):
            data = _batches(d, rows, 8)
            base_rate = None
            for kind, make in (("BatchTopK crosscoder", lambda: D.BatchTopKCrosscoder(d, n_latents, k)),
                               ("L1 crosscoder", lambda: D.L1Crosscoder(d, n_latents, l1=1.0)),
                               ("diff-SAE (BatchTopK)", lambda: D.DiffSAE(d, n_latents, k))):
                dc = make()
                D.train(dc, data, 5, warmup_steps=1, threshold_start_step=1, progress=False)  # warm-up, scales set
                secs = _cpu(lambda: D.train(dc, data, args.steps, warmup_steps=1, threshold_start_step=1,
                                            progress=False))
                rate = args.steps * rows / secs
                base_rate = base_rate or rate
                ls = "—"
                if kind != "diff-SAE (BatchTopK)":
                    ls = f"{len(data) * rows / _cpu(lambda: D.latent_scaling(dc, data)):,.0f}"
                rows_out.append(f"| {name} (d {d}, {n_latents} latents, k {k}) | {kind} | {rows} | "
                                f"{secs / args.steps * 1000:.1f} | {rate:,.0f} | {rate / base_rate:.2f}x | {ls} |")
    table = ("| shape | dictionary | tokens per step | CPU ms per step | tokens / CPU s | vs BatchTopK | "
             "Latent Scaling tokens / CPU s |\n|---|---|---:|---:|---:|---:|---:|\n" + "\n".join(rows_out))
    body = (f"`python benchmarks/dictionaries.py` — {machine()}, {args.steps} Adam steps "
            "after 5 warm-up steps, float32, random paired activations. One token = one row of both models' "
            "activations (the diff-SAE reads their difference). Latent Scaling: one streamed pass over 8 batches "
            "with every latent's four β accumulated in float64.\n\n" + table + "\n")
    print(body)
    if not args.no_write:
        write_section("Dictionary training", body)
    return body


if __name__ == "__main__":
    main()
