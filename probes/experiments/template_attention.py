"""Attention on chat-template tokens (after Leong et al., ACL 2025).

For base and instruct, harmful and harmless prompts: the attention mass from the post-instruction template
tokens onto each key region per layer x head, the harmful - harmless and instruct - base shifts, the heads that
shift most, and a causal check: patching those heads' outputs at the template positions of harmful prompts
with their harmless mean, measured by the refusal score of the instruct model.

    probes run template_attention --pair toy
    probes run template_attention --pair qwen2.5-0.5b --harmful h.csv --harmless hl.csv --out DIR
"""
from __future__ import annotations

import argparse

import torch

from probes import attention as A
from probes.args import (Parser, add_common_args, check_inputs, check_layers, encode_kwargs, is_toy, load_pair_for,
                         open_run, position_specs, refusal_sets, reject, warn_unknown)
from probes.plots import attention as P
from probes.runs import Run

QUERY = "post_instruction[-1]"


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = add_common_args(Parser(prog=prog, description=__doc__))
    p.add_argument("--top-k", type=int, default=5, help="heads to rank and patch")
    p.add_argument("--rank-region", default="post_instruction", choices=list(A.REGIONS),
                   help="key region whose harmful - harmless shift (instruct model) ranks the heads")
    p.add_argument("--refusal-words", default="sorry",
                   help="comma-separated words whose first tokens form the refusal score when probes.refusal is "
                        "not available")
    p.add_argument("--viewer-prompt", type=int, default=0, help="harmful prompt shown in the attention viewer")
    p.add_argument("--viewer-max-heads", type=int, default=64, help="all heads if at most this many, else top-k")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def prompt_sets(args: argparse.Namespace) -> dict[str, list[str]]:
    """Files if given, else the toy pair's test split or the built-in demo sets."""
    from probes.prompts import default_sets

    files = refusal_sets(args, "template_attention")
    defaults = default_sets(is_toy(args))
    out = {}
    for kind in ("harmful", "harmless"):
        texts = files[kind].instructions if files[kind] is not None else defaults[kind][: args.limit]
        out[kind] = texts
        if not out[kind]:
            raise SystemExit(f"no {kind} prompts")
    return out


def query_positions(args: argparse.Namespace) -> list[str | int] | str:
    """--positions (the query tokens whose attention is measured), else every post-instruction token."""
    return position_specs(args.positions) or "post_instruction"


def score_function(pair, words: str):
    try:
        return A.default_score_fn(pair.tokenizer), "probes.refusal.refusal_score"
    except (ImportError, ValueError):  # no probes.refusal, or none of its phrases in this vocabulary
        ids = []
        for w in (w.strip() for w in words.split(",")):
            if w:
                ids.append(pair.tokenizer(w, add_special_tokens=False)["input_ids"][0])
        return A.logodds_score(ids), f"log-odds of first tokens of {words!r} (ids {ids})"


def prepare(args: argparse.Namespace) -> dict[str, list[str]]:
    """Every input read and checked, no model loaded: {"harmful", "harmless"} instructions."""
    reject(args, "template_attention", "it measures attention on the chat template's tokens", "raw")
    check_inputs(args)
    return prompt_sets(args)


def main(argv: list[str] | None = None) -> Run:
    args = parse(argv)
    return run(args, prepare(args))


def run(args: argparse.Namespace, texts: dict[str, list[str]]) -> Run:
    torch.set_num_threads(1)
    files = {kind: (getattr(args, kind), len(texts[kind])) for kind in texts if getattr(args, kind)}
    with open_run("template_attention", args, prompt_files=files, prompts=texts) as r:
        compute(r, args, texts)
    return r


def report(run: Run) -> str:
    p = run.results["patching"]
    return (f"{run.target}: patching the top heads moves the harmful refusal score {p['harmful_clean_mean']:.2f} "
            f"-> {p['harmful_patched_mean']:.2f} (control heads: effect {p['control_effect']:+.2f})")


def compute(run: Run, args: argparse.Namespace, texts: dict[str, list[str]]) -> None:
    pair = load_pair_for(run, args)
    run.update(unknown_token_fraction=warn_unknown(pair.tokenizer, texts))
    batches = {kind: pair.encode(t, **encode_kwargs(args)) for kind, t in texts.items()}
    L, H = pair.n_layers, pair.n_heads
    layers = check_layers(args, L) or list(range(L))

    # Attention mass from every post-instruction token (column -1 is the query that predicts the response).
    masses: dict[str, dict[str, A.AttentionMass]] = {"base": {}, "instruct": {}}
    for which in ("base", "instruct"):
        with pair.on_device(which) as model:
            for kind, batch in batches.items():
                masses[which][kind] = A.attention_mass(model, batch, query_positions(args), layers,
                                                       batch_size=args.batch_size, model_name=f"{pair.name}/{which}")
    regions = list(A.REGIONS)
    queries = masses["base"]["harmful"].positions
    # The query that predicts the response, or the last query position asked for when it is not among them.
    query = QUERY if QUERY in queries else queries[-1]

    def by_region(t: torch.Tensor) -> dict[str, torch.Tensor]:  # [layer, head, region] -> {region: [layer, head]}
        return {r: t[..., i] for i, r in enumerate(regions)}

    mass = {w: {k: by_region(m.at(query)) for k, m in ms.items()} for w, ms in masses.items()}
    mass_all = {w: {k: by_region(m.mean()) for k, m in ms.items()} for w, ms in masses.items()}
    qi = queries.index(query)
    shift_hh = {w: by_region(A.shift(ms["harmful"], ms["harmless"], query)) for w, ms in masses.items()}
    shift_hh_sem = {w: by_region((ms["harmful"].sem()[:, :, qi] ** 2 + ms["harmless"].sem()[:, :, qi] ** 2).sqrt())
                    for w, ms in masses.items()}
    shift_ib = {k: by_region(A.shift(masses["instruct"][k], masses["base"][k], query)) for k in batches}
    per_layer = {w: {k: {r: m.per_layer(query)[:, i] for i, r in enumerate(regions)} for k, m in ms.items()}
                 for w, ms in masses.items()}
    rank_by = shift_hh["instruct"][args.rank_region]
    top_hh = A.rank_heads(rank_by, args.top_k, layers=layers)
    top_ib = A.rank_heads(shift_ib["harmful"][args.rank_region], args.top_k, layers=layers)
    bottom = A.rank_heads(-rank_by.abs(), args.top_k, by="pos", layers=layers)  # smallest |shift|: the control heads
    fmt = lambda hs, key: [{"layer": layer, "head": h, key: v} for layer, h, v in hs]  # noqa: E731
    run.update(
        pair=pair.name, n_layers=L, n_heads=H, n_key_value_heads=getattr(pair.cfg, "n_key_value_heads", None),
        regions=regions, query=query, template_queries=queries,
        n_prompts={k: len(b) for k, b in batches.items()},
        mass=mass, mass_template_queries=mass_all, per_layer=per_layer,
        shift_harmful_minus_harmless=shift_hh, shift_harmful_minus_harmless_sem=shift_hh_sem,
        shift_instruct_minus_base=shift_ib,
        top_heads={"rank_region": args.rank_region,
                   "harmful_minus_harmless_instruct": fmt(top_hh, "shift"),
                   "instruct_minus_base_harmful": fmt(top_ib, "shift")},
    )
    run.save_tensors("attention_mass", {f"{w}/{k}": m.full for w, ms in masses.items() for k, m in ms.items()},
                     {"dims": "[layer, head, query, region]", "queries": queries, "regions": regions})

    # Causal check on the instruct model: the top heads, all together and one by one, and a control set.
    score_fn, score_name = score_function(pair, args.refusal_words)
    heads = [(layer, h) for layer, h, _ in top_hh]
    control = [(layer, h) for layer, h, _ in bottom]
    with pair.on_device("instruct") as model:
        res = A.head_patching(model, batches["harmful"], batches["harmless"], heads, score_fn=score_fn,
                              individually=True, batch_size=args.batch_size)
        ctrl = A.head_patching(model, batches["harmful"], batches["harmless"], control, score_fn=score_fn,
                               batch_size=args.batch_size)
        harmless_clean = torch.cat([score_fn(A.last_logits(model, sub)).double()
                                    for _, sub in batches["harmless"].chunks(args.batch_size)])
        vi = args.viewer_prompt
        if not 0 <= vi < len(batches["harmful"]):
            raise SystemExit(f"--viewer-prompt {vi} out of range")
        view_heads = ([(layer, h) for layer in layers for h in range(H)] if L * H <= args.viewer_max_heads
                      else heads)
        patterns = A.prompt_patterns(model, batches["harmful"], vi, view_heads)
    name = lambda hd: f"L{hd[0]}H{hd[1]}"  # noqa: E731
    run.update(patching={
        "model": "instruct", "score": score_name, "positions": res.positions,
        "heads": [list(h) for h in heads], "harmful_clean_mean": float(res.clean.mean()),
        "harmful_patched_mean": float(res.patched.mean()), "effect": res.effect, "effect_sem": res.sem(),
        "per_head_effect": {name(h): v for h, v in res.head_effects().items()},
        "control_heads": [list(h) for h in control], "control_effect": ctrl.effect,
        "control_effect_sem": ctrl.sem(), "per_head_effect_sem": {name(h): v for h, v in res.head_sems().items()},
        "harmless_clean_mean": float(harmless_clean.mean()),
    })

    # Figures.
    for kind in batches:
        run.save_figure(f"mass_post_instruction_{kind}", P.mass_heatmaps(
            mass["base"][kind]["post_instruction"], mass["instruct"][kind]["post_instruction"],
            region="post-instruction template", layers=layers, data=f"{pair.name} {kind}", query=query))
    for which in masses:
        run.save_figure(f"shift_harmful_minus_harmless_{which}", P.shift_heatmap(
            shift_hh[which][args.rank_region], sem=shift_hh_sem[which][args.rank_region], layers=layers,
            title=f"{pair.name} {which}: harmful − harmless attention from {query} onto {args.rank_region}"))
    run.save_figure("region_bars", P.region_bars(
        {f"{w} / {k}": m.per_layer(query) for w, ms in masses.items() for k, m in ms.items()}, regions, layers=layers,
        title=f"{pair.name}: where {query} looks, by layer (mean over heads and prompts)"))
    run.save_figure("patching", P.patching_bars(
        {"top heads": res.effect, **{name(h): v for h, v in res.head_effects().items()},
         "control heads": ctrl.effect},
        errors={"top heads": res.sem(), **{name(h): v for h, v in res.head_sems().items()},
                "control heads": ctrl.sem()}, control=["control heads"],
        title=f"{pair.name} instruct: refusal score change when heads' template outputs take their harmless mean"))
    b = batches["harmful"]
    run.save_figure("attention_viewer", P.attention_viewer(
        patterns, b.tokens(vi), b.row_roles(vi), title=f"{pair.name} instruct, harmful prompt {vi}"))
