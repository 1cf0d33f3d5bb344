"""Refusal beyond one direction: harmfulness vs refusal, output-free selection, per-prompt steerability, the
refusal-KL frontier and refusal cones, on a base/instruct pair.

    probes run refusal_geometry --pair toy [--parts harmfulness,cosmic] [--out DIR]
    probes run refusal_geometry --base B --instruct I --harmful harm.csv --harmless less.csv

The reference direction is the refusal_direction experiment's (Arditi et al.: candidates on train, chosen on val);
every part takes the same splits and reports on test unless it says otherwise:

- harmfulness (Zhao et al. 2025): harmful - harmless directions at the last user token (t_inst) and the last
  template token (t_post-inst) per layer, both models: cosine, held-out separability, same-norm steering, and the
  t_inst read-out when the refusal direction is ablated;
- cosmic (COSMIC, Siu et al. 2025): the direction chosen without refusal tokens, against Arditi et al.'s choice;
- steerability (Tan et al. 2024): every test prompt's refusal-score change under ablation and addition at several
  coefficients, wrong-way fractions and per-prompt slopes;
- frontier (after Heretic): per-layer ablation weights from a smooth kernel and a fractional direction index,
  searched with optuna TPE for (refusals, harmless KL), plain and norm-preserving; where the single Arditi
  direction sits on the Pareto front;
- cones (Wollschläger et al. 2025): a gradient-optimised refusal direction (RDO), refusal cones of a few dimensions
  whose samples all mediate refusal, and their representational independence from the difference of means.

Each part's result is kept as it finishes, so `--resume` after an interruption skips the finished parts.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from probes import checkpoints, refusal
from probes.args import (Parser, add_common_args, check_inputs, check_layers, encode_kwargs, load_pair_for, open_run,
                         positive, registry_key, reject, warn_unknown)
from probes.experiments.refusal_direction import prompt_splits
from probes.runs import Run

PARTS = ("harmfulness", "cosmic", "steerability", "frontier", "cones")


def _parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated parts from {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]


def _coeffs(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated numbers") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: positive coefficients (multiples of the direction's norm)")
    return values


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = add_common_args(Parser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--parts", type=_parts, default=list(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--n-train", type=int, default=128)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=None, help="default: the toy test split / the rest of the file")
    p.add_argument("--refusal-phrases", nargs="+", default=list(refusal.DEFAULT_PHRASES))
    p.add_argument("--max-new-tokens", type=positive, default=16, help="greedy tokens judged for refusal rates")
    p.add_argument("--steer-coeffs", type=_coeffs, default=[0.25, 0.5, 1.0, 1.5, 2.0],
                   help="steering / steerability coefficients, multiples of the direction's raw norm")
    p.add_argument("--frontier-trials", type=positive, default=200,
                   help="optuna TPE trials per ablation kind (plain, norm-preserving); the first 30%% (at most 60, "
                        "Heretic's) are random")
    p.add_argument("--cone-dims", type=_dims, default=[2, 3], help="comma-separated cone dimensions (2-8)")
    p.add_argument("--cone-samples", type=positive, default=8, help="Monte-Carlo samples of each cone evaluated "
                                                                    "(and as many random directions, the control)")
    p.add_argument("--rdo-steps", type=positive, default=64, help="optimiser steps of RDO")
    p.add_argument("--cone-steps", type=positive, default=64, help="optimiser steps of each cone")
    p.add_argument("--target-tokens", type=positive, default=12,
                   help="greedy tokens of the targets RDO and the cones are trained on")
    p.add_argument("--threads", type=int, default=1)
    return p


def _dims(text: str) -> list[int]:
    try:
        dims = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated integers") from None
    if not dims or any(not 2 <= k <= 8 for k in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: cone dimensions from 2 to 8 (1 is RDO, always trained)")
    return dims


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def prepare(args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    """Every input read and checked, no model loaded: the train / val / test splits."""
    reject(args, "refusal_geometry", "its directions are read at the chat template's tokens", "raw", "positions")
    check_inputs(args)
    key = registry_key(args)
    if key is not None:
        from probes import registry

        settings = dict(registry.get(key).refusal)
        if settings:  # e.g. the organism: massive activations, masked dimensions and affine ablation
            warnings.warn(f"{key}'s refusal direction is chosen with {settings} in refusal_direction; "
                          "refusal_geometry's parts use the reference methods' plain difference of means and "
                          "directional ablation, which that pair's notes say do not fit it", stacklevel=2)
    return prompt_splits(args)


def main(argv: list[str] | None = None) -> Run:
    args = parse(argv)
    return run(args, prepare(args))


def run(args: argparse.Namespace, splits: dict[str, dict[str, list[str]]]) -> Run:
    torch.set_num_threads(args.threads)
    files = {kind: (getattr(args, kind), sum(len(d[kind]) for d in splits.values()))
             for kind in ("harmful", "harmless") if getattr(args, kind)}
    with open_run("refusal_geometry", args, prompt_files=files,
                  prompts={f"{s}/{k}": v for s, d in splits.items() for k, v in d.items()}) as r:
        compute(r, args, splits)
    return r


def report(run: Run) -> str:
    res = run.results
    if res.get("status") != "ok":
        return f"{res['status']}: {res['reason']}; run folder {run.target}"
    heads = {k[: -len("_headline")]: v for k, v in res.items() if k.endswith("_headline")}
    return f"{run.target}: " + "; ".join(f"{k}: {json.dumps(v)}" for k, v in heads.items())


def _part(name: str, models: list[Any], params: Any, inputs: Any, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A part's JSON result, computed once per run folder: `--resume` reads a finished part back (the key hashes the
    models' weights, the part's parameters and its inputs' token ids)."""
    def as_chunk() -> dict[str, torch.Tensor]:
        text = json.dumps(fn(), allow_nan=False)
        return {"json": torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)}

    got = checkpoints.chunk(f"refusal_geometry/{name}", models, params, inputs, as_chunk)
    return json.loads(bytes(got["json"].tolist()).decode())


def _ids(*batches: Any) -> list[torch.Tensor]:
    return [t for b in batches for t in (b.input_ids, b.attention_mask, b.roles)]


def _grid(rows: list) -> torch.Tensor:
    """A JSON grid (None: no value) as a float tensor with NaN."""
    return torch.tensor([[float("nan") if v is None else v for v in r] for r in rows], dtype=torch.float64)


def _short(x: Any) -> Any:
    """Floats to 3 significant digits, so a headline fits the run page's table."""
    if isinstance(x, float):
        return float(f"{x:.3g}")
    if isinstance(x, dict):
        return {k: _short(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_short(v) for v in x]
    return x


def _at(coeffs: list[float], values: list[float], c: float = 1.0) -> tuple[float, float]:
    """(coefficient, value) at the coefficient nearest `c`."""
    i = min(range(len(coeffs)), key=lambda j: abs(coeffs[j] - c))
    return coeffs[i], values[i]


def harmfulness_headline(res: dict[str, Any], layer: int) -> dict[str, Any]:
    """The short numbers: cosine of the two directions at the refusal layer (both models), steering of harmless
    prompts at about 1x the refusal norm (both directions, instruct), the harmfulness separation kept under
    refusal ablation, and the base model's best held-out harmfulness separability."""
    d = res["directions"]
    li = d["instruct"]["layers"].index(layer)
    st = res["steering"]["instruct"]
    c, harm = _at(st["coeffs"], st["mean_change"]["harmfulness"])
    _, ref = _at(st["coeffs"], st["mean_change"]["refusal"])
    base_sep = [v for v in res["separability"]["base"]["harmfulness"]["balanced"] if v is not None]
    abl = res["ablation"]
    return dict(layer=layer, cosine={m: d[m]["cosine"][li] for m in ("base", "instruct")},
                steer_coeff=c, steer_change_instruct=dict(harmfulness=harm, refusal=ref),
                separation_kept_under_ablation=abl["separation_kept"][abl["layers"].index(layer)],
                base_harmfulness_separability_max=max(base_sep) if base_sep else None)


def cosmic_headline(res: dict[str, Any]) -> dict[str, Any]:
    if res["status"] != "ok":
        return dict(status=res["status"])
    c = res["comparison"]
    return dict(cosmic=c["cosmic"], arditi=c["arditi"], same=c["same"], cosine=c["cosine"],
                ablated_harmful_rate={k: v["harmful"]["ablated"] for k, v in c["rates"].items()},
                added_harmless_rate={k: v["harmless"]["added"] for k, v in c["rates"].items()})


def steerability_headline(res: dict[str, Any]) -> dict[str, Any]:
    """Wrong-way fractions at about 1x the norm and under ablation, anti-steerable fractions, mean slopes."""
    out: dict[str, Any] = {}
    for kind, sign in (("harmless", 1.0), ("harmful", -1.0)):
        s = res[kind]
        c, wrong = _at(s["coeffs"], s["wrong_way"]["added"], sign)
        out[kind] = dict(coeff=c, wrong_way=wrong, anti_steerable=s["wrong_way"]["slope"], mean_slope=s["mean_slope"])
    out["harmful"]["wrong_way_ablation"] = res["harmful"]["wrong_way"]["ablated"]
    return out


def frontier_headline(res: dict[str, Any]) -> dict[str, Any]:
    """Per ablation kind: the Arditi point (val refusals, KL), whether the search dominates it and the least KL at
    its refusal count; on test, how many front points still dominate it."""
    out = {}
    for label, c in res["comparison"].items():
        a = res["arditi"][label]
        out[label] = dict(arditi=[a["refusals"], a["kl"]], dominated=c["dominated"], kl_at_refusals=c["kl_at_refusals"],
                          test_dominating=len(res["test"][label]["front_dominating_arditi"]))
    return out


def cones_headline(res: dict[str, Any]) -> dict[str, Any]:
    """RDO vs the difference of means (cosine, first-token rates ablated / added), each cone's mean sample rates
    against the random control, and the RepInd loss."""
    e = res["effects"]
    rates = lambda x: [x["ablated_rate"], x["added_rate"]]  # noqa: E731
    out: dict[str, Any] = dict(cosine_rdo_dim=res["cosine_rdo_dim"], rates_ablated_added=dict(
        rdo=rates(e["rdo"]), dim=rates(e["dim"])))
    for k, c in res["cones"].items():
        s = c["evaluation"]["samples"]
        out["rates_ablated_added"][f"cone{k}"] = [s["ablated_rate"]["mean"], s["added_rate"]["mean"]]
    r = next(iter(res["cones"].values()))["evaluation"]["random"]
    out["rates_ablated_added"]["random"] = [r["ablated_rate"]["mean"], r["added_rate"]["mean"]]
    out["repind_loss"] = res["repind"]["repind_loss"]
    return out


def compute(run: Run, args: argparse.Namespace, splits: dict[str, dict[str, list[str]]]) -> None:
    t0 = time.perf_counter()
    pair = load_pair_for(run, args)
    tok_ids = refusal.refusal_tokens(pair.tokenizer, args.refusal_phrases)
    run.update(unknown_token_fraction=warn_unknown(
        pair.tokenizer, {k: [t for d in splits.values() for t in d[k]] for k in ("harmful", "harmless")}))
    b = {s: {k: pair.encode(v, **encode_kwargs(args)) for k, v in d.items()} for s, d in splits.items()}
    bs, L = args.batch_size, pair.n_layers
    layers = check_layers(args, L)
    run.update(parts=args.parts, refusal_tokens=tok_ids, counts={s: {k: len(v) for k, v in d.items()}
                                                                 for s, d in b.items()})
    # The reference: Arditi et al.'s direction, as the refusal_direction experiment chooses it.
    with pair.on_device("instruct") as inst:
        for s in ("train", "val"):
            try:
                b[s]["harmful"], b[s]["harmless"], c = refusal.filter_by_score(
                    inst, b[s]["harmful"], b[s]["harmless"], tok_ids, batch_size=bs)
            except refusal.NoRefusal as exc:
                run.update(status="no_refusal", reason=f"{s} split: {exc}")
                return
            run.update(**{f"filtered_{s}": c})
        cands = refusal.candidates(inst, b["train"]["harmful"], b["train"]["harmless"], layers=layers, batch_size=bs,
                                   model_name=f"{pair.name}/instruct")
        scores = refusal.sweep(inst, cands, b["val"]["harmful"], b["val"]["harmless"], tok_ids, batch_size=bs)
        try:
            sel = refusal.select(scores, L)
        except refusal.NoDirectionFound as exc:
            run.update(status="no_direction", reason=str(exc))
            return
        chosen = cands.direction(sel.layer, sel.offset)
    run.update(status="ok", arditi=sel.as_dict(), arditi_norm=chosen.norm)
    tr, va, te = b["train"], b["val"], b["test"]
    title = pair.name
    common = dict(batch_size=bs, progress=True)

    if "harmfulness" in args.parts:
        from probes import harmfulness as HF
        from probes.plots import harmfulness as PH

        def harm() -> dict[str, Any]:
            out: dict[str, Any] = {"directions": {}, "separability": {}, "steering": {}}
            for which in ("base", "instruct"):
                with pair.on_device(which) as model:
                    d = HF.directions(model, tr["harmful"], tr["harmless"], layers=layers, model_name=which, **common)
                    out["directions"][which] = d.as_dict()
                    out["separability"][which] = HF.separability(model, d, te["harmful"], te["harmless"],
                                                                 **common).as_dict()
                    out["steering"][which] = HF.steering(model, d, sel.layer, te["harmless"], tok_ids,
                                                         coeffs=args.steer_coeffs, **common).as_dict()
                    if which == "instruct":
                        out["ablation"] = HF.ablation_projection(model, d, sel.layer, te["harmful"], te["harmless"],
                                                                 token_ids=tok_ids, **common).as_dict()
            return out

        res = _part("harmfulness", [pair.base, pair.instruct],
                    dict(layers=layers, layer=sel.layer, coeffs=args.steer_coeffs, tok=tok_ids),
                    _ids(tr["harmful"], tr["harmless"], te["harmful"], te["harmless"]), harm)
        run.update(harmfulness=res, harmfulness_headline=_short(harmfulness_headline(res, sel.layer)))
        run.save_figure("harmfulness_vs_refusal", PH.geometry(
            res["directions"], res["separability"],
            title=f"{title}: harmfulness (t_inst) vs refusal (t_post-inst) directions, train; separation on test"))
        run.save_figure("harmfulness_steering", PH.steering_effects(
            res["steering"], title=f"{title}: steering harmless test prompts at resid_pre[{sel.layer}], same norm"))

    if "cosmic" in args.parts:
        from probes import cosmic

        def cos() -> dict[str, Any]:
            with pair.on_device("instruct") as inst:
                ev = cosmic.evaluation_layers(inst, tr["harmful"], tr["harmless"], **common)
                cs = cosmic.sweep(inst, cands, va["harmful"], va["harmless"], ev, **common)
                try:
                    csel = cosmic.select(cs, L)
                except refusal.NoDirectionFound as exc:
                    return dict(status="no_direction", reason=str(exc), sweep=cs.as_dict())
                cmp = cosmic.compare(inst, cands, csel, sel, te["harmful"], te["harmless"], tok_ids,
                                     max_new_tokens=args.max_new_tokens, **common)
            return dict(status="ok", sweep=cs.as_dict(), selection=csel.as_dict(), comparison=cmp.as_dict())

        res = _part("cosmic", [pair.instruct], dict(layers=layers, sel=sel.as_dict(), tok=tok_ids,
                                                    n=args.max_new_tokens),
                    _ids(tr["harmful"], tr["harmless"], va["harmful"], va["harmless"], te["harmful"], te["harmless"]),
                    cos)
        run.update(cosmic=res, cosmic_headline=_short(cosmic_headline(res)))
        if res["status"] == "ok":
            from probes.plots import cosmic as PC

            sw, cs = res["sweep"], res["selection"]
            run.save_figure("cosmic_scores", PC.score_heatmap(
                _grid(cs["scores"]), layers=cs["layers"], offsets=cs["offsets"], cosmic=(cs["layer"], cs["position"]),
                arditi=(sel.layer, sel.offset), ablate=_grid(sw["ablate"]), add=_grid(sw["add"]),
                kl=_grid(sw["kl"]),
                title=f"{title} instruct: COSMIC score per candidate (val); COSMIC's and Arditi et al.'s choices"))

    if "steerability" in args.parts:
        from probes import steerability as ST
        from probes.plots import steerability as PS

        def steer() -> dict[str, Any]:
            with pair.on_device("instruct") as inst:
                return ST.refusal_steerability(inst, chosen, sel.layer, te["harmful"], te["harmless"], tok_ids,
                                               coeffs=args.steer_coeffs, **common).as_dict()

        res = _part("steerability", [pair.instruct], dict(sel=sel.as_dict(), coeffs=args.steer_coeffs, tok=tok_ids),
                    _ids(te["harmful"], te["harmless"]), steer)
        run.update(steerability=res, steerability_headline=_short(steerability_headline(res)))
        run.save_figure("steerability", PS.change_distributions(
            res, title=f"{title} instruct: per-prompt refusal-score change (test), direction of layer {sel.layer}"))
        run.save_figure("steerability_slopes", PS.slope_distributions(
            res, title=f"{title} instruct: per-prompt steerability (slope per unit of the raw difference)"))

    if "frontier" in args.parts:
        from probes import frontier as FR
        from probes.plots import frontier as PF

        def front() -> dict[str, Any]:
            out: dict[str, Any] = {"search": {}, "arditi": {}, "comparison": {}, "test": {}}
            with pair.on_device("instruct") as inst:
                stack = FR.direction_stack(inst, tr["harmful"], tr["harmless"], **common)
                val = FR.Objectives(inst, va["harmful"], va["harmless"], tok_ids, batch_size=bs)
                # Held out: the front re-measured on test by the judge of generated text, not the fast count.
                test = FR.Objectives(inst, te["harmful"], te["harmless"], tok_ids, refusal="judge",
                                     max_new_tokens=args.max_new_tokens, batch_size=bs)
                for label, keep_norm in (("plain", False), ("norm-preserving", True)):
                    f = FR.search(inst, stack, val, n_trials=args.frontier_trials,
                                  n_startup_trials=min(60, args.frontier_trials * 3 // 10), seed=args.seed,
                                  norm_preserving=keep_norm)
                    point = FR.arditi_point(inst, chosen, val, norm_preserving=keep_norm)
                    out["search"][label], out["arditi"][label] = f.as_dict(), point.as_dict()
                    out["comparison"][label] = FR.compare(point, f).as_dict()
                    on_test = FR.remeasure(inst, stack, f, test)
                    point_test = FR.arditi_point(inst, chosen, test, norm_preserving=keep_norm)
                    out["test"][label] = dict(
                        baseline=test.baseline.as_dict(), arditi=point_test.as_dict(),
                        front={str(n): m.as_dict() for n, m in on_test.items()},
                        front_dominating_arditi=[n for n, m in on_test.items() if FR.dominates(
                            (m.refusals, m.kl), (point_test.refusals, point_test.kl))])
            return out

        res = _part("frontier", [pair.instruct],
                    dict(sel=sel.as_dict(), trials=args.frontier_trials, seed=args.seed, n=args.max_new_tokens,
                         tok=tok_ids),
                    _ids(tr["harmful"], tr["harmless"], va["harmful"], va["harmless"], te["harmful"], te["harmless"]),
                    front)
        run.update(frontier=res, frontier_headline=_short(frontier_headline(res)))
        run.save_figure("frontier", PF.frontier_scatter(
            res["search"], res["arditi"],
            title=f"{title} instruct: refusals vs harmless KL (val) of every ablation tried, the Pareto fronts and the "
                  "single Arditi direction"))

    if "cones" in args.parts:
        from probes import cones as C
        from probes.directions import cosine
        from probes.plots import cones as PCo

        def cone() -> dict[str, Any]:
            kw = dict(batch_size=bs, seed=args.seed, progress=True)
            alpha = chosen.norm  # additions at the reference direction's layer and norm, as the paper
            with pair.on_device("instruct") as inst:
                targets = C.make_targets(inst, tr["harmful"], tr["harmless"], chosen,
                                         max_new_tokens=args.target_tokens, **common)
                fit = C.rdo(inst, targets, chosen, steps=args.rdo_steps, **kw)
                fits = C.train_cones(inst, targets, chosen, args.cone_dims, init=fit.basis, steps=args.cone_steps, **kw)
                effect = lambda v: C.direction_effects(  # noqa: E731
                    inst, v[None], te["harmful"], te["harmless"], tok_ids, sel.layer, alpha,
                    max_new_tokens=args.max_new_tokens, **common)[0]
                effects = {"rdo": effect(fit.direction), "dim": effect(chosen.vector.float())}
                evals = {k: C.evaluate_cone(inst, f.basis, te["harmful"], te["harmless"], tok_ids, sel.layer, alpha,
                                            n=args.cone_samples, seed=args.seed, **common).as_dict()
                         for k, f in fits.items()}
                rep = C.representational_independence(inst, fit.direction, chosen.vector.float(), te["harmful"],
                                                      names=("rdo", "dim"), batch_size=bs)
            return dict(rdo=fit.as_dict(), rdo_direction=fit.direction.tolist(),
                        cosine_rdo_dim=float(cosine(fit.direction.double(), chosen.vector.double())),
                        effects=effects, cones={str(k): dict(fit=f.as_dict(), evaluation=evals[k])
                                                for k, f in fits.items()},
                        repind=rep.as_dict())

        res = _part("cones", [pair.instruct],
                    dict(sel=sel.as_dict(), dims=args.cone_dims, steps=[args.rdo_steps, args.cone_steps],
                         samples=args.cone_samples, target=args.target_tokens, n=args.max_new_tokens,
                         seed=args.seed, tok=tok_ids),
                    _ids(tr["harmful"], tr["harmless"], te["harmful"], te["harmless"]), cone)
        run.update(cones=res, cones_headline=_short(cones_headline(res)))
        groups = {"difference of means": [res["effects"]["dim"]], "RDO": [res["effects"]["rdo"]],
                  **{f"cone k={k} samples": c["evaluation"]["per_sample"] for k, c in res["cones"].items()},
                  "random directions": next(iter(res["cones"].values()))["evaluation"]["per_random"]}
        base_line = next(iter(res["cones"].values()))["evaluation"]["baseline"]
        run.save_figure("cone_effects", PCo.effect_strips(
            groups, baseline=base_line,
            title=f"{title} instruct: refusal score of test prompts, harmful with each direction ablated, harmless "
                  f"with it added at resid_pre[{sel.layer}]"))
        run.save_figure("repind", PCo.repind_curves(
            res["repind"], title=f"{title} instruct: representational independence of RDO and the difference of "
                                 "means (harmful test, last token)"))
        run.save_figure("cone_training", PCo.loss_curves(
            {"RDO": res["rdo"]["history"], **{f"cone k={k}": c["fit"]["history"] for k, c in res["cones"].items()}},
            title=f"{title} instruct: RDO and cone training loss"))

    run.update(wall_s=time.perf_counter() - t0)
