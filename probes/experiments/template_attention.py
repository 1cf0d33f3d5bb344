"""Attention on chat-template tokens (after Leong et al., ACL 2025), and the heads that carry refusal.

Descriptive: for base and instruct, harmful and harmless prompts, the attention mass from the post-instruction
template tokens onto each key region per layer x head (raw, and with the BOS attention sink removed), the
harmful - harmless and instruct - base shifts, and the BOS sink mass itself.

Causal (`probes.heads`), on the instruct model unless said: every head ranked by attribution patching of its
template-region output (harmless mean -> harmful), checked against true per-head template patching; the top
heads' and random control heads' effects when patched and when ablated (Ships-style, score and judged refusal
rate), the smallest ablated set that removes refusal, and whether the base model's attribution ranks the same
heads. The attention-shift ranking is kept, with its own patching check, for comparison.

    probes run template_attention --pair toy
    probes run template_attention --pair qwen2.5-0.5b --harmful h.csv --harmless hl.csv --out DIR
"""
from __future__ import annotations

import argparse

import torch

from probes import attention as A
from probes import heads as H
from probes.args import (Parser, add_common_args, check_inputs, check_layers, encode_kwargs, is_toy, load_pair_for,
                         open_run, position_specs, positive, refusal_sets, reject, warn_unknown)
from probes.plots import attention as P
from probes.runs import Run

QUERY = "post_instruction[-1]"


PATH_STEPS = 8  # the path-averaged attribution `--attribution-steps auto` tries beside the plain one


def _steps(text: str) -> int | str:
    return text if text == "auto" else positive(text)


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = add_common_args(Parser(prog=prog, description=__doc__))
    p.add_argument("--top-k", type=positive, default=5, help="heads to rank, patch and ablate")
    p.add_argument("--rank-by", default="attribution", choices=["attribution", "patching", "shift"],
                   help="what ranks the heads that are patched and ablated: attribution patching (default), true "
                        "per-head template patching, or the harmful - harmless attention shift (descriptive)")
    p.add_argument("--attribution-steps", type=_steps, default="auto",
                   help="points on the path from harmful to harmless head outputs whose gradients are averaged "
                        "(1: plain attribution patching, the gradient at the harmful activations), or auto (the "
                        f"default): 1 and {PATH_STEPS} both checked against true patching on the --patch-prompts "
                        "subset, the one with the higher rank correlation ranks the heads")
    p.add_argument("--patch-prompts", type=positive, default=32,
                   help="harmful prompts on which every head is truly patched (the check of the attribution)")
    p.add_argument("--head-ablation", default="mean", choices=list(H.ABLATIONS),
                   help="head ablation: output set to its mean over harmless tokens, or to zero")
    p.add_argument("--max-new-tokens", type=positive, default=32, help="greedy tokens judged for refusal rates")
    p.add_argument("--rank-region", default="post_instruction", choices=list(A.REGIONS),
                   help="key region whose harmful - harmless shift (instruct model) ranks heads by shift")
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
    texts = prompt_sets(args)
    if not 0 <= args.viewer_prompt < len(texts["harmful"]):
        raise SystemExit(f"--viewer-prompt {args.viewer_prompt} out of range: {len(texts['harmful'])} harmful prompts")
    return texts


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
    p, s = run.results["patching"], run.results["shift_patching"]
    return (f"{run.target}: patching the top {p['ranked_by']} heads moves the harmful refusal score "
            f"{p['harmful_clean_mean']:.2f} -> {p['harmful_patched_mean']:.2f} (random control heads: effect "
            f"{p['control_effect']:+.2f}; top-shift heads {s['effect']:+.2f})")


def compute(run: Run, args: argparse.Namespace, texts: dict[str, list[str]]) -> None:
    pair = load_pair_for(run, args)
    run.update(unknown_token_fraction=warn_unknown(pair.tokenizer, texts))
    batches = {kind: pair.encode(t, **encode_kwargs(args)) for kind, t in texts.items()}
    L, H_ = pair.n_layers, pair.n_heads
    layers = check_layers(args, L) or list(range(L))

    # Attention mass from every post-instruction token (column -1 is the query that predicts the response).
    masses: dict[str, dict[str, A.AttentionMass]] = {"base": {}, "instruct": {}}
    for which in ("base", "instruct"):
        with pair.on_device(which) as model:
            for kind, batch in batches.items():
                masses[which][kind] = A.attention_mass(model, batch, query_positions(args), layers, keep="all",
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
        pair=pair.name, n_layers=L, n_heads=H_, n_key_value_heads=getattr(pair.cfg, "n_key_value_heads", None),
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

    # The BOS attention sink, and the masses among the other regions once it is removed (renormalised per prompt).
    has_bos = all(int(b.role_mask("bos").sum()) == len(b) for b in batches.values())
    if has_bos:
        free = {w: {k: m.without("bos") for k, m in ms.items()} for w, ms in masses.items()}
        free_regions = [r for r in regions if r != "bos"]
        sink = {w: {k: m.region("bos", query) for k, m in ms.items()} for w, ms in masses.items()}
        run.update(
            sink_mass=sink,
            sink_mass_mean={w: {k: float(v.mean()) for k, v in ks.items()} for w, ks in sink.items()},
            mass_without_sink={w: {k: {r: m.at(query)[..., i] for i, r in enumerate(free_regions)}
                                   for k, m in ms.items()} for w, ms in free.items()},
            shift_harmful_minus_harmless_without_sink={
                w: {r: A.shift(ms["harmful"], ms["harmless"], query)[..., i] for i, r in enumerate(free_regions)}
                for w, ms in free.items()})
    else:
        run.update(sink_mass=None, sink_note="no BOS token in this template: its attention sink (the first "
                                             "template token) stays in the 'template' region")

    heads_causal(run, args, pair, batches, shift_ranked=top_hh, shift_control=bottom)

    # Figures.
    for kind in batches:
        run.save_figure(f"mass_post_instruction_{kind}", P.mass_heatmaps(
            mass["base"][kind]["post_instruction"], mass["instruct"][kind]["post_instruction"],
            region="post-instruction template", layers=layers, data=f"{pair.name} {kind}", query=query))
    for which in masses:
        run.save_figure(f"shift_harmful_minus_harmless_{which}", P.shift_heatmap(
            shift_hh[which][args.rank_region], sem=shift_hh_sem[which][args.rank_region], layers=layers,
            title=f"{pair.name} {which}: harmful − harmless attention from {query} onto {args.rank_region} "
                  "(descriptive)"))
    if has_bos:
        run.save_figure("sink_mass", P.mass_heatmaps(
            sink["base"]["harmful"], sink["instruct"]["harmful"], region="BOS (attention sink)", layers=layers,
            data=f"{pair.name} harmful", query=query))
        if args.rank_region != "bos":
            ri = free_regions.index(args.rank_region)
            run.save_figure("shift_without_sink_instruct", P.shift_heatmap(
                A.shift(free["instruct"]["harmful"], free["instruct"]["harmless"], query)[..., ri], layers=layers,
                title=f"{pair.name} instruct: harmful − harmless attention from {query} onto {args.rank_region}, "
                      "BOS sink removed and renormalised"))
    run.save_figure("region_bars", P.region_bars(
        {f"{w} / {k}": m.per_layer(query) for w, ms in masses.items() for k, m in ms.items()}, regions, layers=layers,
        title=f"{pair.name}: where {query} looks, by layer (mean over heads and prompts)"))
    b = batches["harmful"]
    vi = args.viewer_prompt
    with pair.on_device("instruct") as model:
        view_heads = ([(layer, h) for layer in layers for h in range(H_)] if L * H_ <= args.viewer_max_heads
                      else [tuple(h) for h in run.results["patching"]["heads"]])
        patterns = A.prompt_patterns(model, b, vi, view_heads)
    run.save_figure("attention_viewer", P.attention_viewer(
        patterns, b.tokens(vi), b.row_roles(vi), title=f"{pair.name} instruct, harmful prompt {vi}"))


def _fmt(heads: list, **values: torch.Tensor) -> list[dict]:
    """Heads as records with each named `[layer, head]` value."""
    return [{"layer": layer, "head": h, **{k: float(v[layer, h]) for k, v in values.items()}} for layer, h in heads]


def heads_causal(run: Run, args: argparse.Namespace, pair, batches: dict, *, shift_ranked: list,
                 shift_control: list) -> None:
    """The causal ranking of heads (`probes.heads`) and its checks; results and figures into `run`."""
    score_fn, score_name = score_function(pair, args.refusal_words)
    harmful, harmless = batches["harmful"], batches["harmless"]
    bs, k, steps = args.batch_size, args.top_k, args.attribution_steps
    name = lambda hd: f"L{hd[0]}H{hd[1]}"  # noqa: E731
    n_heads_total = pair.n_layers * pair.n_heads
    if k >= n_heads_total:
        raise SystemExit(f"--top-k {k} leaves no control heads among {n_heads_total}")
    subset = harmful[: min(args.patch_prompts, len(harmful))]
    tried = [1, PATH_STEPS] if steps == "auto" else sorted({1, steps})
    with pair.on_device("instruct") as model:
        # The check, on a subset: true per-head patching against the attribution (plain and path-averaged). Which
        # agrees better depends on the model (heads that saturate favour the path; on real models the plain
        # gradient often wins), so `auto` lets the check decide.
        truth = H.template_patching(model, subset, harmless, score_fn, batch_size=bs)
        sub = {s: H.head_attribution(model, subset, harmless, score_fn, steps=s, batch_size=bs) for s in tried}
        agree = {s: H.agreement(a.scores, truth.scores, k) for s, a in sub.items()}
        if steps == "auto":
            steps = max(tried, key=lambda s: agree[s]["spearman"])  # a tie keeps the plain one
        sub_attr = sub[steps]
    attribution = {}
    for which in ("base", "instruct"):
        with pair.on_device(which) as model:
            # The same refusal tokens in both models: does the base already route them through the same heads?
            attribution[which] = H.head_attribution(model, harmful, harmless, score_fn, steps=steps, batch_size=bs,
                                                    model_name=f"{pair.name}/{which}")
    with pair.on_device("instruct") as model:
        rank_scores = {"attribution": attribution["instruct"].scores, "patching": truth.scores}
        if args.rank_by == "shift":
            ranked = [(layer, h) for layer, h, _ in shift_ranked]
        else:
            ranked = H.top_heads(rank_scores[args.rank_by], k)
        control = H.random_heads(model, k, exclude=ranked, seed=args.seed)

        # Patching the ranked heads' template outputs (and each alone) against the random control heads.
        res = A.head_patching(model, harmful, harmless, ranked, score_fn=score_fn, individually=True, batch_size=bs)
        ctrl = A.head_patching(model, harmful, harmless, control, score_fn=score_fn, individually=True,
                               batch_size=bs)
        by_shift = A.head_patching(model, harmful, harmless, [(lh[0], lh[1]) for lh in shift_ranked],
                                   score_fn=score_fn, batch_size=bs)
        shift_ctrl = A.head_patching(model, harmful, harmless, [(lh[0], lh[1]) for lh in shift_control],
                                     score_fn=score_fn, batch_size=bs)
        harmless_clean = score_fn(A.last_logits(model, harmless, batch_size=bs)).double()

        # Ablation, one head at a time and as sets, with responses judged; the smallest set that removes refusal.
        if args.rank_by == "shift":  # the shift's top-k first, then the rest by attribution
            order = ranked + [h for h in H.top_heads(attribution["instruct"].scores, n_heads_total) if h not in ranked]
        else:
            order = H.top_heads(rank_scores[args.rank_by], n_heads_total)
        values = H.ablation_values(model, H.all_heads(model), args.head_ablation, harmless, batch_size=bs)
        clean = res.clean
        clean_rate, _ = H.judged_rate(model, harmful, args.max_new_tokens, batch_size=bs)
        abl = lambda hs: H.head_ablation(model, harmful, hs, values, score_fn, clean=clean,  # noqa: E731
                                         max_new_tokens=args.max_new_tokens, batch_size=bs)
        one_top = {h: abl([h]) for h in ranked}
        one_ctrl = {h: abl([h]) for h in control}
        set_top, set_ctrl = abl(ranked), abl(control)
        minimal = H.minimal_ablation_set(model, harmful, order, values, score_fn, batch_size=bs)
        minimal_out: dict = dict(found=minimal.found, tried=minimal.tried, threshold=minimal.threshold,
                                 first_token_rates=minimal.rates, n_heads=len(minimal.heads))
        if minimal.found:
            m = abl(minimal.heads)
            minimal_out.update(m.as_dict(), harmless_kl=H.harmless_kl(model, harmless,
                                                                      H.ablation_hooks(minimal.heads, values),
                                                                      batch_size=bs))
        kl_top = H.harmless_kl(model, harmless, H.ablation_hooks(ranked, values), batch_size=bs)
        kl_ctrl = H.harmless_kl(model, harmless, H.ablation_hooks(control, values), batch_size=bs)

    inst, base = attribution["instruct"].scores, attribution["base"].scores
    top_base = H.top_heads(base, k)
    run.update(
        top_heads_causal=_fmt(ranked, attribution=inst, template_patching=truth.scores),
        heads_headline={
            "ranked_by": args.rank_by, "top_heads": [name(h) for h in ranked],
            "patching_effect_top": res.effect, "patching_effect_random_control": ctrl.effect,
            "patching_effect_top_shift": by_shift.effect,
            "attribution_vs_patching_spearman": H.rank_correlation(sub_attr.scores, truth.scores),
            "ablation_rate_clean_top_control": [clean_rate, set_top.rate, set_ctrl.rate],
            "minimal_ablation_set": [name(h) for h in minimal.heads] if minimal.found else None,
            "base_vs_instruct_top_k_jaccard": H.jaccard(H.top_heads(inst, k), top_base)},
        attribution={"score": score_name, "steps": steps, "steps_chosen": args.attribution_steps == "auto",
                     "steps_tried": tried, "positions": attribution["instruct"].positions,
                     "method": "attribution patching" if steps == 1 else
                               f"attribution patching, gradients averaged over {steps} points of the path",
                     "instruct": inst, "instruct_sem": attribution["instruct"].sem(), "base": base,
                     "base_sem": attribution["base"].sem()},
        template_patching={"n_prompts": len(subset), "instruct": truth.scores, "instruct_sem": truth.sem(),
                           "description": "each head's output on the post-instruction positions of harmful prompts "
                                          "set to its harmless mean, one head at a time (patched - clean score)"},
        agreement={"n_prompts": len(subset),
                   "attribution_vs_patching": agree[steps],
                   "plain_attribution_vs_patching": agree[1],
                   **({f"{tried[-1]}_point_attribution_vs_patching": agree[tried[-1]]} if len(tried) > 1 else {})},
        base_vs_instruct={"top_k": k, "instruct_top": [name(h) for h in H.top_heads(inst, k)],
                          "base_top": [name(h) for h in top_base],
                          "top_k_jaccard": H.jaccard(H.top_heads(inst, k), top_base),
                          "spearman": H.rank_correlation(inst, base)},
        patching={
            "model": "instruct", "score": score_name, "ranked_by": args.rank_by, "positions": res.positions,
            "heads": [list(h) for h in ranked], "harmful_clean_mean": float(res.clean.mean()),
            "harmful_patched_mean": float(res.patched.mean()), "effect": res.effect, "effect_sem": res.sem(),
            "per_head_effect": {name(h): v for h, v in res.head_effects().items()},
            "per_head_effect_sem": {name(h): v for h, v in res.head_sems().items()},
            "control": "random heads outside the ranked ones (seeded)", "control_heads": [list(h) for h in control],
            "control_effect": ctrl.effect, "control_effect_sem": ctrl.sem(),
            "control_per_head_effect": {name(h): v for h, v in ctrl.head_effects().items()},
            "harmless_clean_mean": float(harmless_clean.mean())},
        shift_patching={"heads": [list(h) for h in by_shift.heads], "effect": by_shift.effect,
                        "effect_sem": by_shift.sem(), "control_heads": [list(h) for h in shift_ctrl.heads],
                        "control": "the heads with the smallest |shift|", "control_effect": shift_ctrl.effect,
                        "control_effect_sem": shift_ctrl.sem()},
        ablation={"method": args.head_ablation, "max_new_tokens": args.max_new_tokens, "judge": "reference",
                  "clean": {"score_mean": float(clean.mean()), "first_token_rate": float((clean > 0).double().mean()),
                            "refusal_rate": clean_rate},
                  "heads": [{"layer": h[0], "head": h[1], **one_top[h].as_dict()} for h in ranked],
                  "control": [{"layer": h[0], "head": h[1], **one_ctrl[h].as_dict()} for h in control],
                  "top_set": {**set_top.as_dict(), "harmless_kl": kl_top},
                  "control_set": {**set_ctrl.as_dict(), "harmless_kl": kl_ctrl},
                  "minimal_set": minimal_out},
    )
    run.save_tensors("head_scores", {"attribution/instruct": inst, "attribution/base": base,
                                     "template_patching/instruct": truth.scores},
                     {"dims": "[layer, head]", "sign": "patched - clean refusal score"})

    pair_name = pair.name
    run.save_figure("head_attribution_vs_patching", P.head_score_heatmaps(
        {f"attribution ({'plain' if steps == 1 else f'{steps}-point path'}), {len(subset)} prompts": sub_attr.scores,
         f"true template patching, {len(subset)} prompts": truth.scores},
        title=f"{pair_name} instruct: refusal score change when each head's template output takes its harmless "
              "mean"))
    run.save_figure("head_attribution_base_vs_instruct", P.head_score_heatmaps(
        {"base": base, "instruct": inst},
        title=f"{pair_name}: attribution of each head to the refusal-token score, harmful prompts (same tokens, "
              "same score in both models)"))
    bars = {f"top {k} ({args.rank_by})": res.effect, **{name(h): v for h, v in res.head_effects().items()},
            f"random {k}": ctrl.effect, f"top {k} (attention shift)": by_shift.effect,
            f"lowest-shift {k}": shift_ctrl.effect}
    errs = {f"top {k} ({args.rank_by})": res.sem(), **{name(h): v for h, v in res.head_sems().items()},
            f"random {k}": ctrl.sem(), f"top {k} (attention shift)": by_shift.sem(),
            f"lowest-shift {k}": shift_ctrl.sem()}
    run.save_figure("patching", P.patching_bars(
        bars, errors=errs, control=[f"random {k}", f"lowest-shift {k}"],
        control_note="grey hatched: control sets (random heads; the smallest attention shift)",
        title=f"{pair_name} instruct: refusal score change when heads' template outputs take their harmless mean"))
    entries = ([(f"{name(h)}", one_top[h], False) for h in ranked] + [(f"top {k} together", set_top, False)]
               + [(f"{name(h)} (random)", one_ctrl[h], True) for h in control]
               + [(f"random {k} together", set_ctrl, True)])
    run.save_figure("head_ablation", P.ablation_bars(
        [dict(name=n, effect=a.effect, sem=a.sem(), rate=a.rate, control=c) for n, a, c in entries],
        clean_rate=clean_rate,
        title=f"{pair_name} instruct, harmful prompts: {args.head_ablation}-ablating heads' outputs at every position"))
