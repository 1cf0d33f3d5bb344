"""Logit lens of a base/instruct pair on identical chat-templated prompts.

Every layer's `resid_post` is decoded by each model's own final norm and unembedding (the last layer's lens is the
model's real output) at the post-instruction positions; results: KL(instruct ‖ base) and the reverse per layer at
`post_instruction[-1]` (mean over prompts), each model's entropy, KL to its final layer, target-token rank and
probability, and the first layer where the two models' top tokens differ. Figures: per-layer lines, the mean KL
heatmap over post-instruction offsets, and for example prompts the layer x token lens of both models and their KL.

    probes run logit_lens --pair toy
    probes run logit_lens --pair qwen2.5-0.5b --prompts harmful.csv harmless.csv --out DIR
    probes run logit_lens --pair toy --raw --positions last     # base-style prompts, no chat template
"""
from __future__ import annotations

import argparse
import warnings

import torch

from probes.args import (Parser, add_common_args, check_inputs, check_layers, encode_kwargs, load_pair_for,
                         nonnegative, open_run, position_specs, prompt_groups, warn_unknown)
from probes.lens import paired_lens
from probes.plots import heatmap
from probes.plots import lens as P
from probes.runs import Run

LAST = "post_instruction[-1]"


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = add_common_args(Parser(prog=prog, description=__doc__))
    p.add_argument("--hook", default="resid_post", choices=["resid_post", "resid_pre"])
    p.add_argument("--targets", default="sorry,sure",
                   help="comma-separated words whose first token's rank and probability are tracked")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--examples", type=nonnegative, default=1, help="example prompts per group with a layer x token figure")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def positions(args: argparse.Namespace) -> list[str | int] | str:
    """--positions, else every post-instruction token (the last token of a raw prompt with --raw)."""
    return position_specs(args.positions) or ("last" if args.raw else "post_instruction")


def first_tokens(tokenizer, words: str) -> tuple[list[int], list[str]]:
    """The token that starts a response with each comma-separated word under the chat template
    (`probes.refusal.response_start_tokens`: the variant, with or without a leading space, that is the whole word;
    a warning when only a fragment is), and its text.

    Words outside the vocabulary (tokenised as the unknown token) are skipped with a message.
    """
    from probes.refusal import response_start_tokens

    ids = []
    for w in (w.strip() for w in words.split(",")):
        if w:
            try:
                found = response_start_tokens(tokenizer, [w])
            except ValueError:  # <unk> with and without the leading space
                found = []
            if not found:
                warnings.warn(f"target {w!r} is not in the vocabulary: skipped", stacklevel=2)
                continue
            if found[0] not in ids:
                ids.append(found[0])
    if not ids:
        raise SystemExit("--targets names no word of the vocabulary")
    return ids, [tokenizer.decode([i]) for i in ids]


def prepare(args: argparse.Namespace) -> tuple[dict[str, list[str]], dict[str, tuple[str, int]]]:
    """Every input read and checked, no model loaded: ({group: instructions}, {group: (file, n used)})."""
    check_inputs(args)
    return prompt_groups(args)


def main(argv: list[str] | None = None) -> Run:
    args = parse(argv)
    return run(args, prepare(args))


def run(args: argparse.Namespace, inputs: tuple[dict[str, list[str]], dict[str, tuple[str, int]]]) -> Run:
    torch.set_num_threads(1)
    groups, files = inputs
    with open_run("logit_lens", args, prompt_files=files, prompts=groups) as r:
        compute(r, args, groups)
    return r


def report(run: Run) -> str:
    res = run.results
    return (f"{run.target}: KL(instruct ‖ base) at {res['summary_position']} by layer: "
            + ", ".join(f"{v:.3f}" for v in res["kl_instruct_base"]))


def compute(run: Run, args: argparse.Namespace, groups: dict[str, list[str]]) -> None:
    pair = load_pair_for(run, args)
    texts = [t for v in groups.values() for t in v]
    rows, start = {}, 0
    for name, v in groups.items():
        rows[name], start = list(range(start, start + len(v))), start + len(v)
    run.update(unknown_token_fraction=warn_unknown(pair.tokenizer, groups))
    batch = pair.encode(texts, **encode_kwargs(args))
    target_ids, target_names = first_tokens(pair.tokenizer, args.targets)

    res = paired_lens(pair, batch, hook=args.hook, layers=check_layers(args, pair.n_layers), positions=positions(args),
                      targets=target_ids, top_k=args.top_k, batch_size=args.batch_size)
    # The per-layer summaries are at the last post-instruction token (the first response token's prediction), or
    # at the last position asked for when that one is not among them.
    summary = LAST if LAST in res.positions else res.positions[-1]
    last = res.positions.index(summary)
    L = res.layers

    def per_layer(x: torch.Tensor, idx: list[int] | None = None) -> list[float]:
        """`[prompt, layer, k]` -> mean over prompts at post_instruction[-1], one value per layer."""
        x = x[:, :, last] if idx is None else x[idx][:, :, last]
        return x.double().mean(0).tolist()

    fdl = res.first_diff_layer[:, last]
    run.update(
        layers=L, hook=args.hook, positions=res.positions, summary_position=summary, n_prompts=len(texts),
        groups={k: len(v) for k, v in groups.items()},
        targets=dict(zip(target_names, target_ids)),
        kl_instruct_base=per_layer(res.kl_instruct_base),
        kl_base_instruct=per_layer(res.kl_base_instruct),
        kl_instruct_base_by_group={g: per_layer(res.kl_instruct_base, r) for g, r in rows.items()},
        kl_instruct_base_by_offset={lab: res.kl_instruct_base[:, :, j].double().mean(0).tolist()
                                    for j, lab in enumerate(res.positions)},
        entropy={w: per_layer(getattr(res, w).entropy) for w in ("base", "instruct")},
        kl_to_final={w: per_layer(getattr(res, w).kl_to_final) for w in ("base", "instruct")},
        target_median_rank={w: {name: getattr(res, w).target_rank[:, :, last, t].double().median(0).values.tolist()
                                for t, name in enumerate(target_names)} for w in ("base", "instruct")},
        target_prob_by_group={w: {g: {name: getattr(res, w).target_logprob[r][:, :, last, t].exp().double().mean(0).tolist()
                                      for t, name in enumerate(target_names)} for g, r in rows.items()}
                              for w in ("base", "instruct")},
        first_diff_layer={"counts": {str(layer): int((fdl == layer).sum()) for layer in [*L, -1]},
                          "note": "first layer where the top tokens at post_instruction[-1] differ; -1: never"},
    )
    run.save_tensors("lens", res.tensors(), {"layers": L, "positions": res.positions, "targets": target_ids,
                                             "groups": rows})

    run.save_figure("layer_lines", P.layer_lines(
        res, last, target=0, target_name=repr(target_names[0]),
        title=f"logit lens per layer at {summary} (mean over {len(texts)} prompts)"))
    for g, r in rows.items():
        run.save_figure(f"layer_lines_{g}", P.layer_lines(
            res, last, target=0, target_name=repr(target_names[0]), rows=r,
            title=f"logit lens per layer at {summary}, {g} prompts (mean over {len(r)})"))
    mean_kl = res.kl_instruct_base.double().mean(0)  # [layer, offset]
    run.save_figure("kl_post_instruction", heatmap(
        mean_kl, x=res.positions, y=L, colorbar="nats", zmin=0, xaxis="token position",
        yaxis=f"layer ({args.hook})", text=[[f"{v:.2f}" for v in row] for row in mean_kl.tolist()],
        title=f"KL(instruct ‖ base) of the logit lens, mean over {len(texts)} prompts"))
    for g, r in rows.items():
        for i in r[: args.examples]:
            one = paired_lens(pair, batch[i], hook=args.hook, layers=check_layers(args, pair.n_layers),
                              positions="all", targets=target_ids, top_k=args.top_k, progress=False)
            run.save_figure(f"lens_{g}_{i}", P.paired_lens_heatmap(
                one, 0, pair.tokenizer, title=f"logit lens of {pair.name} on {g} prompt {i}: {texts[i][:60]!r}"))
            run.save_figure(f"kl_{g}_{i}", P.kl_heatmap(
                one, 0, pair.tokenizer, title=f"KL(instruct ‖ base) per layer and token, {g} prompt {i}"))
