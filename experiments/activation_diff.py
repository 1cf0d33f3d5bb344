"""Mean activation difference instruct − base by token role, and per-token KL along the response (issue 5).

On identical chat-templated tokens (prompt + the instruct model's own greedy response, or `--response`): the mean
residual difference instruct − base per layer for every token role and post-instruction offset, its norm relative
to the base's activation norm, its cosine across layers and its logit lens (tokens promoted / suppressed); then
KL(instruct ‖ base) of the next-token distributions at every response position, mean over prompts.

    python experiments/activation_diff.py --pair toy
    python experiments/activation_diff.py --pair qwen2.5-0.5b --prompts harmful.csv harmless.csv --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from logit_lens import add_prompt_args, prompt_files, prompt_groups  # noqa: E402

from probes.compare import TokenKL, instruct_responses, mean_diff, per_token_kl  # noqa: E402
from probes.plots import compare as P  # noqa: E402
from probes.args import add_common_args, load_pair_for, open_run  # noqa: E402
from probes.runs import Run  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = add_prompt_args(add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0])))
    p.add_argument("--response", default=None, help="one response for every prompt (default: instruct's greedy one)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--lens-k", type=int, default=5, help="tokens promoted / suppressed listed per layer")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Run:
    torch.set_num_threads(1)
    args = parse(argv)
    groups = prompt_groups(args)
    with open_run("activation_diff", args, prompt_files=prompt_files(args, groups), prompts=groups) as run:
        compute(run, args, groups)
    return run


def compute(run: Run, args: argparse.Namespace, groups: dict[str, list[str]]) -> None:
    pair = load_pair_for(run, args)
    texts = [t for v in groups.values() for t in v]
    group_of = [g for g, v in groups.items() for _ in v]

    if args.response is not None:
        responses = [args.response] * len(texts)
    else:
        responses = instruct_responses(pair, pair.encode(texts), max_new_tokens=args.max_new_tokens,
                                       batch_size=args.batch_size)
    keep = [i for i, r in enumerate(responses) if r.strip()]  # an empty response has no token to compare on
    n_dropped = len(responses) - len(keep)
    if not keep:
        raise SystemExit("every response is empty")
    texts, responses, group_of = [texts[i] for i in keep], [responses[i] for i in keep], [group_of[i] for i in keep]
    rows = {g: [i for i, x in enumerate(group_of) if x == g] for g in groups}
    batch = pair.encode(texts, responses=responses)

    md = mean_diff(pair, batch, hook=args.hook, batch_size=args.batch_size)
    last = "post_instruction[-1]"
    lens = {}
    with pair.on_device("instruct") as model:
        for layer in md.layers:
            lens[str(layer)] = md.lens(model, last, layer, k=args.lens_k).tokens(pair.tokenizer)
    run.update(
        layers=md.layers, hook=args.hook, n_prompts=len(texts), dropped_empty_responses=n_dropped,
        groups=md.groups, token_counts=dict(zip(md.groups, md.counts.tolist())),
        relative_norm={g: md.relative_norm[i].tolist() for i, g in enumerate(md.groups)},
        diff_norm={g: md.diff_norm[i].tolist() for i, g in enumerate(md.groups)},
        base_norm={g: md.norm_base[i].tolist() for i, g in enumerate(md.groups)},
        layer_cosine_post_instruction_last=md.layer_cosine(last).tolist() if last in md.groups else None,
        lens_of_diff_post_instruction_last=lens,
        responses_sample={g: [responses[i] for i in r[:3]] for g, r in rows.items()},
    )
    run.save_tensors("mean_diff", md.tensors(), {"layers": md.layers, "groups": md.groups, "hook": args.hook})

    tk = per_token_kl(pair, batch, batch_size=args.batch_size)

    def sub(r: list[int]) -> TokenKL:
        return TokenKL(**{k: v[r] for k, v in tk.tensors().items()})

    n = tk.valid.shape[1]
    first, later = tk.mean()[:1], tk.mean()[1:][tk.counts[1:] > 0]
    run.update(
        per_token_kl=tk.mean().tolist(),
        per_token_kl_reverse=tk.mean("kl_base_instruct").tolist(),
        per_token_kl_counts=tk.counts.tolist(),
        per_token_kl_by_group={g: sub(r).mean().tolist() for g, r in rows.items() if r},
        per_token_kl_summary={"first_token": float(first.mean()), "later_tokens_mean": float(later.mean())
                              if len(later) else None, "n_positions": n},
    )
    run.save_tensors("per_token_kl", tk.tensors(), {"groups": rows})

    run.save_figure("mean_diff_norm", P.mean_diff_norm_figure(md))
    if last in md.groups:
        run.save_figure("mean_diff_layer_cosine", P.layer_cosine_figure(md, last))
    run.save_figure("per_token_kl", P.per_token_kl_figure(tk, {g: r for g, r in rows.items() if r}))
    print(f"{run.target}: per-token KL(instruct ‖ base) along the response: "
          + ", ".join(f"{v:.3f}" for v in run.results["per_token_kl"]))


if __name__ == "__main__":
    main()
