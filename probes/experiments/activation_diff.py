"""Mean activation difference instruct − base by token role, and per-token KL along the response.

On identical chat-templated tokens (prompt + the instruct model's own greedy response, or `--response`): the mean
residual difference instruct − base per layer for every token role and post-instruction offset, its norm relative
to the base's activation norm, its cosine across layers and its logit lens (tokens promoted / suppressed); then
KL(instruct ‖ base) of the next-token distributions at every response position, mean over prompts.

    probes run activation_diff --pair toy
    probes run activation_diff --pair qwen2.5-0.5b --prompts harmful.csv harmless.csv --out DIR
"""
from __future__ import annotations

import argparse

import torch

from probes.args import (Parser, add_common_args, check_inputs, check_layers, encode_kwargs, load_pair_for, open_run,
                         prompt_groups, reject, warn_unknown)
from probes.compare import TokenKL, instruct_responses, mean_diff, per_token_kl
from probes.plots import compare as P
from probes.runs import Run



def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = add_common_args(Parser(prog=prog, description=__doc__))
    p.add_argument("--hook", default="resid_post", choices=["resid_post", "resid_pre"])
    p.add_argument("--response", default=None, help="one response for every prompt (default: instruct's greedy one)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--lens-k", type=int, default=5, help="tokens promoted / suppressed listed per layer")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, tuple[str, int]]]:
    """Every input read and checked, no model loaded: ({group: instructions}, {group: (file, n used)})."""
    reject(args, "activation_diff", "it averages over every token of each role and post-instruction offset",
           "positions")
    check_inputs(args)
    return prompt_groups(args)


def main(argv: list[str] | None = None) -> Run:
    args = parse(argv)
    return run(args, prepare(args))


def run(args: argparse.Namespace, inputs: tuple[dict[str, list[str]], dict[str, tuple[str, int]]]) -> Run:
    torch.set_num_threads(1)
    groups, files = inputs
    with open_run("activation_diff", args, prompt_files=files, prompts=groups) as r:
        compute(r, args, groups)
    return r


def report(run: Run) -> str:
    return (f"{run.target}: per-token KL(instruct ‖ base) along the response: "
            + ", ".join(f"{v:.3f}" for v in run.results["per_token_kl"]))


def compute(run: Run, args: argparse.Namespace, groups: dict[str, list[str]]) -> None:
    pair = load_pair_for(run, args)
    texts = [t for v in groups.values() for t in v]
    group_of = [g for g, v in groups.items() for _ in v]

    run.update(unknown_token_fraction=warn_unknown(pair.tokenizer, groups))
    enc = encode_kwargs(args)
    if args.response is not None:
        responses = [args.response] * len(texts)
    else:
        responses = instruct_responses(pair, pair.encode(texts, **enc), max_new_tokens=args.max_new_tokens,
                                       batch_size=args.batch_size)
    keep = [i for i, r in enumerate(responses) if r.strip()]  # an empty response has no token to compare on
    n_dropped = len(responses) - len(keep)
    if not keep:
        raise SystemExit("every response is empty")
    texts, responses, group_of = [texts[i] for i in keep], [responses[i] for i in keep], [group_of[i] for i in keep]
    rows = {g: [i for i, x in enumerate(group_of) if x == g] for g in groups}
    batch = pair.encode(texts, responses=responses, **enc)

    md = mean_diff(pair, batch, hook=args.hook, layers=check_layers(args, pair.n_layers), batch_size=args.batch_size)
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
