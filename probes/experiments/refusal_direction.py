"""Refusal direction of a base/instruct pair (Arditi et al. 2024), and how it compares between the two models.

    probes run refusal_direction --pair toy [--out DIR]
    probes run refusal_direction --base B --instruct I --harmful harm.csv --harmless less.csv

Candidates (harmful - harmless mean of resid_pre at every layer x post-instruction position) come from the train
split, the direction is selected on val, and every reported rate is on test. Writes config.json, results.json,
directions.safetensors and the figures to the run folder.
"""
from __future__ import annotations

import argparse
import time

import torch

from probes import distributed, refusal
from probes.activations import record
from probes.args import (Parser, add_common_args, check_inputs, check_layers, encode_kwargs, is_toy, load_pair_for,
                         open_run, refusal_sets, registry_key, reject, warn_unknown)
from probes.directions import (ablation_hooks, addition_hooks, affine_hooks, cosine, recorded_ablation_hooks,
                               save_orthogonalized)
from probes.plots import refusal as figs
from probes.prompts import default_sets
from probes.runs import Run



def _nan_none(t: torch.Tensor) -> list:
    """A nested list with NaN (candidates that are no direction, e.g. layer 0) as None: JSON has no NaN."""
    return [_nan_none(x) for x in t] if t.ndim else (None if bool(torch.isnan(t)) else float(t))


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = add_common_args(Parser(prog=prog, description=__doc__))
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=None, help="default: the toy test split / the rest of the file")
    p.add_argument("--no-filter", action="store_true", help="keep prompts whatever their un-intervened refusal score")
    p.add_argument("--refusal-phrases", nargs="+", default=list(refusal.DEFAULT_PHRASES))
    p.add_argument("--judge", choices=list(refusal.JUDGES), default=None,
                   help="judge of generated text behind refusal_rate: reference (Arditi et al.'s phrases, "
                        "lower-cased match as their code; the default) or extended (plus bare sorry/cannot). Both "
                        "are reported either way")
    p.add_argument("--judge-phrases", nargs="+", default=None,
                   help="judge by these phrases instead (lower-cased match)")
    p.add_argument("--max-layer-frac", type=float, default=0.8)
    p.add_argument("--cutoff", choices=list(refusal.CUTOFFS), default="reference",
                   help="layer cut-off: layer < int(frac x n_layers) (reference, Arditi et al.'s code) or "
                        "layer < frac x n_layers (fractional)")
    p.add_argument("--kl-max", type=float, default=0.1)
    p.add_argument("--induce-min", type=float, default=0.0)
    p.add_argument("--fallback", action="store_true",
                   help="if no candidate passes, take the best bypass below the cut-off with KL <= --kl-max")
    p.add_argument("--ablation", choices=list(refusal.ABLATIONS), default=None,
                   help="how a candidate is ablated in the sweep and the evaluation: directional (Arditi et al.: "
                        "the direction removed from every residual write) or affine (the projection set to the "
                        "harmless mean's, from the candidate's layer on; Marshall et al.). Default: the pair's "
                        "registry setting, else directional")
    p.add_argument("--mask-massive", type=float, default=None, metavar="FACTOR",
                   help="zero massive-activation dimensions (harmless mean over FACTOR x the median magnitude) in "
                        "the candidates; 0 keeps the raw difference. Default: the pair's registry setting, else 0")
    p.add_argument("--exhaustive-sweep", action="store_true",
                   help="score every candidate of the full layer x position grid exactly (Arditi et al.'s sweep) "
                        "instead of screening them to first order and scoring exactly only the few per layer band "
                        "the estimates rank best, below the layer cut-off")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-orthogonalized", action="store_true",
                   help="also write the instruct model with the chosen direction orthogonalised out of its weights "
                        "(<out>/orthogonalized, loads in plain transformers)")
    p.add_argument("--gguf", choices=("f32", "f16", "q8_0"), default=None,
                   help="also write the orthogonalised model as <out>/orthogonalized.gguf in this dtype, for "
                        "llama.cpp and Ollama (implies --save-orthogonalized; Llama-family and Qwen2 models)")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def prompt_splits(args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    """{split: {harmful, harmless}} — the toy pair's own splits, or files split with the seed."""
    sizes = dict(train=args.n_train, val=args.n_val)
    files = refusal_sets(args, "refusal_direction")
    if files["harmful"] is None and is_toy(args):
        out = {s: default_sets(True, s) for s in ("train", "val", "test")}
        for s, n in sizes.items():
            out[s] = {k: v[:n] for k, v in out[s].items()}
        if args.n_test is not None:
            out["test"] = {k: v[: args.n_test] for k, v in out["test"].items()}
        if args.limit is not None:  # --limit caps every set of every split
            out = {s: {k: v[: args.limit] for k, v in d.items()} for s, d in out.items()}
        return out
    from probes.prompts import builtin

    sets = {k: files[k] if files[k] is not None else builtin(k) for k in ("harmful", "harmless")}
    out: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}, "test": {}}
    for kind, ps in sets.items():
        n_tr, n_va = min(args.n_train, len(ps) // 2), min(args.n_val, len(ps) // 4)
        n_te = len(ps) - n_tr - n_va if args.n_test is None else args.n_test
        if min(n_tr, n_va, n_te) < 1 or n_tr + n_va + n_te > len(ps):
            raise SystemExit(f"{kind}: {len(ps)} prompts cannot give train {n_tr} / val {n_va} / test {n_te}")
        tr, va, te = ps.split([n_tr, n_va, n_te], seed=args.seed)
        out["train"][kind], out["val"][kind], out["test"][kind] = tr.instructions, va.instructions, te.instructions
    return out


def prepare(args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    """Every input read and checked, no model loaded: the train / val / test splits."""
    reject(args, "refusal_direction", "its candidates are every post-instruction token of the chat template "
           "(Arditi et al.)", "raw", "positions")
    check_inputs(args)
    defaults = dict(ablation="directional", mask_massive=0.0)
    key = registry_key(args)
    if key is not None:
        from probes import registry

        defaults.update(dict(registry.get(key).refusal))
    for name, value in defaults.items():  # a flag given on the command line wins over the pair's setting
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.mask_massive < 0:
        raise SystemExit(f"--mask-massive {args.mask_massive:g}: a factor >= 0 (0: no masking)")
    if args.ablation != "directional" and (args.save_orthogonalized or args.gguf):
        raise SystemExit(f"--save-orthogonalized / --gguf write directional ablation into the weights; with "
                         f"--ablation {args.ablation} that is not the intervention the direction is chosen for")
    return prompt_splits(args)


def main(argv: list[str] | None = None) -> Run:
    args = parse(argv)
    return run(args, prepare(args))


def run(args: argparse.Namespace, splits: dict[str, dict[str, list[str]]]) -> Run:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    files = {kind: (getattr(args, kind), sum(len(d[kind]) for d in splits.values()))
             for kind in ("harmful", "harmless") if getattr(args, kind)}
    with open_run("refusal_direction", args, prompt_files=files,
                  prompts={f"{s}/{k}": v for s, d in splits.items() for k, v in d.items()}) as run:
        compute(run, args, splits, t0)
    return run


def _stop(run: Run, status: str, reason: str, t0: float) -> None:
    """End a run that has no direction to evaluate: results.json says why, holds no refusal rates."""
    run.update(status=status, chosen=None, reason=reason, wall_s=time.perf_counter() - t0)
    print(f"{status}: {reason}")


def _screen_record(info: dict) -> dict:
    """The screen's record as JSON (an error bound not yet known is infinite: null)."""
    ratios = {k: None if v == float("inf") else v for k, v in info.get("error_ratios", {}).items()}
    return {k: v for k, v in info.items() if k != "error_ratios"} | ({"error_ratios": ratios} if info else {})


def compute(run: Run, args: argparse.Namespace, splits: dict[str, dict[str, list[str]]], t0: float) -> None:
    # Under torchrun / accelerate launch the candidates' means and the sweep's scoring are split over the ranks
    # (exact: see probes.distributed); the rest runs on every rank and only rank 0 writes the run folder.
    par = distributed.init()
    pair = load_pair_for(run, args)
    tok_ids = refusal.refusal_tokens(pair.tokenizer, args.refusal_phrases)
    run.update(unknown_token_fraction=warn_unknown(
        pair.tokenizer, {k: [t for d in splits.values() for t in d[k]] for k in ("harmful", "harmless")}))
    b = {s: {k: pair.encode(v, **encode_kwargs(args)) for k, v in d.items()} for s, d in splits.items()}
    bs, L = args.batch_size, pair.n_layers
    layers = check_layers(args, L)
    judge_name = args.judge or "reference"
    judge = args.judge_phrases or judge_name
    run.update(refusal_tokens=tok_ids, refusal_token_text=[pair.tokenizer.decode([i]) for i in tok_ids],
               counts={s: {k: len(v) for k, v in d.items()} for s, d in b.items()},
               judge=judge_name if args.judge_phrases is None else dict(phrases=list(args.judge_phrases)))

    with pair.on_device("instruct") as inst:
        if not args.no_filter:  # as the paper: keep only prompts the instruct model already treats as labelled
            for s in ("train", "val"):
                try:
                    b[s]["harmful"], b[s]["harmless"], c = refusal.filter_by_score(
                        inst, b[s]["harmful"], b[s]["harmless"], tok_ids, batch_size=bs)
                except refusal.NoRefusal as exc:
                    return _stop(run, "no_refusal", f"{s} split: {exc}", t0)
                run.update(**{f"filtered_{s}": c})
        cands = refusal.candidates(inst, b["train"]["harmful"], b["train"]["harmless"], layers=layers, batch_size=bs,
                                   model_name=f"{pair.name}/instruct", distributed=par)
        if args.mask_massive:
            cands = cands.mask_massive(args.mask_massive)
        run.update(ablation=args.ablation, mask_massive=args.mask_massive,
                   masked_dims={str(k): v for k, v in cands.masked.items()})
        screen, bound = None, None
        if not args.exhaustive_sweep:  # the same criteria as the selection below: the screen keeps its choice
            screen = refusal.Screen(kl_max=args.kl_max, induce_min=args.induce_min, fallback=args.fallback)
            bound = refusal.layer_cutoff(L, args.max_layer_frac, args.cutoff)
        scores = refusal.sweep(inst, cands, b["val"]["harmful"], b["val"]["harmless"], tok_ids, batch_size=bs,
                               ablation=args.ablation, screen=screen, layer_bound=bound, distributed=par)
        run.update(sweep=dict(layers=scores.layers, positions=scores.offsets, bypass=_nan_none(scores.bypass),
                              induce=_nan_none(scores.induce), kl=_nan_none(scores.kl),
                              baseline_harmful=scores.baseline_harmful, baseline_harmless=scores.baseline_harmless,
                              exhaustive=args.exhaustive_sweep, layer_bound=bound, forwards=scores.forwards,
                              backwards=scores.backwards, scored=scores.scored.tolist(),
                              induce_scored=scores.induce_scored.tolist(),
                              estimate=None if scores.estimate is None else
                              {k: _nan_none(v) for k, v in scores.estimate.items()},
                              screen=_screen_record(scores.screen)))
        try:
            sel = refusal.select(scores, L, max_layer_frac=args.max_layer_frac, kl_max=args.kl_max,
                                 induce_min=args.induce_min, fallback=args.fallback, cutoff=args.cutoff)
        except refusal.NoDirectionFound as exc:
            return _stop(run, "no_direction", str(exc), t0)
        chosen = cands.direction(sel.layer, sel.offset)
        chosen.data["ablation"] = ({"method": "directional"} if args.ablation == "directional" else
                                   {"method": args.ablation, **cands.affine_reference(sel.layer, sel.offset, chosen)})
        run.update(status="ok", chosen=sel.as_dict(), chosen_norm=chosen.norm)
        test_h, test_l = b["test"]["harmful"], b["test"]["harmless"]
        kw = dict(max_new_tokens=args.max_new_tokens, batch_size=bs, judge=judge)
        main_eval = refusal.evaluate(inst, test_h, test_l, tok_ids, ablation=recorded_ablation_hooks(inst, chosen),
                                     addition=addition_hooks(inst, chosen, sel.layer), **kw)
        # The other ablation, for comparison. Directional runs: affine ablation at every layer, the projection set
        # to the harmless train mean's (at the chosen position); affine runs: Arditi et al.'s directional ablation.
        if args.ablation == "directional":
            other_name = "affine_ablation"
            affine_ref = cands.harmless_mean[:, sel.position_index]
            if len(cands.layers) != L:  # --layers: affine ablation sets every layer, so it needs every layer's mean
                affine_ref = record(inst, b["train"]["harmless"], "resid_pre", None, f"post_instruction[{sel.offset}]",
                                    batch_size=bs, keep="mean", progress=False).mean()[:, 0]
            other_hooks = affine_hooks(inst, chosen, affine_ref)
        else:
            other_name, other_hooks = "directional_ablation", ablation_hooks(inst, chosen)
        other_eval = refusal.evaluate(inst, test_h, test_l, tok_ids, baseline=False, ablation=other_hooks, **kw)
        # Control: a random direction of the same norm, ablated and added the same way.
        g = torch.Generator().manual_seed(args.seed)
        rand = torch.randn(pair.d_model, generator=g, dtype=torch.float64)
        rand = rand / rand.norm() * chosen.norm
        rand_eval = refusal.evaluate(inst, test_h, test_l, tok_ids, baseline=False,
                                     ablation=cands.ablation(inst, sel.layer, sel.offset, args.ablation, rand),
                                     addition=addition_hooks(inst, rand, sel.layer), **kw)
        pca_inst = [record(inst, b["test"][k], "resid_pre", [sel.layer], f"post_instruction[{sel.offset}]",
                           batch_size=bs, progress=False).tensor[:, 0, 0] for k in ("harmful", "harmless")]
    run.update(refusal_rate=refusal.rates(main_eval), refusal_rate_reference=refusal.rates(main_eval, "reference"),
               refusal_rate_extended=refusal.rates(main_eval, "extended"), kl_harmless_ablation=main_eval["kl_harmless_ablation"],
               refusal_counts={k: {m: {"refused": v["refused"], "n": v["n"]} for m, v in main_eval[k].items()}
                               for k in ("harmful", "harmless")},
               refusal_score_mean={k: {m: v["score_mean"] for m, v in main_eval[k].items()}
                                   for k in ("harmful", "harmless")},
               examples={k: {m: v["examples"] for m, v in main_eval[k].items()} for k in ("harmful", "harmless")},
               **{other_name: dict(harmful_rate=other_eval["harmful"]["ablated"]["rate"],
                                   harmful_score_mean=other_eval["harmful"]["ablated"]["score_mean"],
                                   kl_harmless=other_eval["kl_harmless_ablation"])},
               random_control=dict(norm=float(rand.norm()), **refusal.rates(rand_eval),
                                   kl_harmless_ablation=rand_eval["kl_harmless_ablation"]))

    # Base model: its own candidates on the same tokens, its refusal, and transfer both ways.
    with pair.on_device("base") as base:
        base_cands = refusal.candidates(base, b["train"]["harmful"], b["train"]["harmless"], layers=layers,
                                        batch_size=bs, model_name=f"{pair.name}/base", distributed=par)
        if args.mask_massive:
            base_cands = base_cands.mask_massive(args.mask_massive)
        base_dir = base_cands.direction(sel.layer, sel.offset)
        # Transfer: each model's own harmless means are the affine reference for a direction ablated in it.
        inst_in_base = refusal.evaluate(base, test_h, test_l, tok_ids,
                                        ablation=base_cands.ablation(base, sel.layer, sel.offset, args.ablation, chosen),
                                        addition=addition_hooks(base, chosen, sel.layer), **kw)
        pca_base = [record(base, b["test"][k], "resid_pre", [sel.layer], f"post_instruction[{sel.offset}]",
                           batch_size=bs, progress=False).tensor[:, 0, 0] for k in ("harmful", "harmless")]
    with pair.on_device("instruct") as inst:
        base_in_inst = refusal.evaluate(inst, test_h, test_l, tok_ids, baseline=False,
                                        ablation=cands.ablation(inst, sel.layer, sel.offset, args.ablation, base_dir),
                                        addition=addition_hooks(inst, base_dir, sel.layer), **kw)
    cos_all = cosine(base_cands.diff, cands.diff)  # [layer, position]
    cos_all[(base_cands.diff.norm(dim=-1) == 0) | (cands.diff.norm(dim=-1) == 0)] = float("nan")  # no direction
    run.update(cosine_base_instruct=_nan_none(cos_all[:, sel.position_index]), cosine_base_instruct_all=_nan_none(cos_all),
               base_refusal_rate=refusal.rates(inst_in_base)["harmful"]["baseline"],
               base_refusal_rate_harmless=refusal.rates(inst_in_base)["harmless"]["baseline"],
               transfer=dict(
                   base_direction_in_instruct=dict(**refusal.rates(base_in_inst),
                                                   kl_harmless_ablation=base_in_inst["kl_harmless_ablation"],
                                                   score_mean={k: {m: v["score_mean"] for m, v in base_in_inst[k].items()}
                                                               for k in ("harmful", "harmless")}),
                   instruct_direction_in_base=dict(**refusal.rates(inst_in_base),
                                                   kl_harmless_ablation=inst_in_base["kl_harmless_ablation"],
                                                   score_mean={k: {m: v["score_mean"] for m, v in inst_in_base[k].items()}
                                                               for k in ("harmful", "harmless")})))

    if args.save_orthogonalized or args.gguf:
        from probes.gguf import GGUFError

        out = run.path("orthogonalized")
        try:
            folder = save_orthogonalized(pair.instruct, chosen, out, tokenizer=pair.tokenizer, gguf=args.gguf)
            run.update(orthogonalized=folder.name)  # relative: the run folder moves into place when complete
            if args.gguf:
                run.update(orthogonalized_gguf=f"{folder.name}.gguf")
        except NotImplementedError as exc:  # post-norm architectures: only hook ablation is exact there
            run.update(orthogonalized=f"not written: {exc}")
        except GGUFError as exc:  # the folder was written; the GGUF cannot hold this model or tokenizer
            print(f"warning: GGUF not written: {exc}")
            run.update(orthogonalized=out.name, orthogonalized_gguf=f"not written: {exc}")
    # `Direction.load(path)` reads "chosen", `Direction.load(path, key="base/chosen")` the base model's.
    meta = {"chosen": chosen.provenance(), "layers": cands.layers, "positions": cands.offsets, "pair": pair.name,
            "base/chosen": base_dir.provenance()}
    run.save_tensors("directions", {"instruct/candidates": cands.diff, "base/candidates": base_cands.diff,
                                    "chosen": chosen.vector.clone(), "chosen/raw": chosen.raw.clone(),
                                    "base/chosen": base_dir.vector.clone(), "base/chosen/raw": base_dir.raw.clone(),
                                    "random_control": rand}, meta)
    title = f"{pair.name} instruct"
    run.save_figure("sweep", figs.sweep_heatmaps(scores.bypass, scores.induce, scores.kl, layers=scores.layers,
                                                 offsets=scores.offsets, chosen=(sel.layer, sel.offset),
                                                 title=f"{title}: refusal direction candidates (val)"))
    run.save_figure("cosine", figs.cosine_per_layer(
        {f"post_instruction[{o}]": cos_all[:, i] for i, o in enumerate(cands.offsets)}, layers=cands.layers,
        title=f"{pair.name}: cosine of base and instruct harmful-harmless directions (train)"))
    run.save_figure("scores", figs.score_distributions({
        "harmful baseline": main_eval["harmful"]["baseline"]["scores"],
        "harmful ablated": main_eval["harmful"]["ablated"]["scores"],
        "harmless baseline": main_eval["harmless"]["baseline"]["scores"],
        "harmless added": main_eval["harmless"]["added"]["scores"]},
        title=f"{title}: refusal score on test, before / after the chosen direction"))
    run.save_figure("pca", figs.pca_projection({"base": pca_base, "instruct": pca_inst},
                                               title=f"{pair.name}: resid_pre[{sel.layer}] at post_instruction"
                                                     f"[{sel.offset}], test prompts, top-2 PCs"))
    run.update(wall_s=time.perf_counter() - t0)



def report(run: Run) -> str:
    """One line of the run's headline numbers."""
    res = run.results
    if res.get("status") != "ok":
        return f"{res['status']}: {res['reason']}; no refusal rates; run folder {run.target}"
    return (f"chosen {res['chosen']}; refusal rates {res['refusal_rate']}; KL {res['kl_harmless_ablation']:.4f}; "
            f"run folder {run.target}")
