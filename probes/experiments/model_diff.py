"""Model diffing with dictionaries: a BatchTopK crosscoder over both models' activations, Latent Scaling, an L1
crosscoder and a diff-SAE for comparison, and the chat-only latents tied to chat-template roles and to refusal.

Both models' residual stream at one layer (default the middle; `resid_pre`, i.e. HF hidden_states[layer]) on the
same tokens is written to an activation store (`probes.store`): harmful and harmless prompts in the chat template
with the instruct model's own greedy responses, and the harmless prompts as raw text (base-style data). Then:
- a BatchTopK crosscoder (Minder, Dumas et al. 2025) and an L1 crosscoder (Lindsey et al. 2024) on the train
  store, a BatchTopK diff-SAE on instruct - base; FVU per model and dead latents on a held-out store;
- latent classes by relative decoder norm (shared / chat-only / base-only) and Latent Scaling's ν_ε, ν_r, which
  flag chat-only latents that are artefacts (Complete Shrinkage, Latent Decoupling);
- every latent's activation mass by role and prompt set; the share of chat-only latents firing mainly on template
  and post-instruction tokens; their top activating tokens;
- the cosine of chat-only decoder directions with the refusal direction (difference of means at the layer's last
  post-instruction token), and the refusal score of harmless prompts steered along the best-aligned latent;
- KL-gap recovery: the instruct model's first-response-token KL to its own output when the layer's activation is
  the base model's plus the chat-only latents' decoded difference, against random latent sets of the same size.

    probes run model_diff --pair toy
    probes run model_diff --pair gemma-3-270m-organism --latents 4096 --k 64 --steps 20000
"""
from __future__ import annotations

import argparse

import torch

from probes import dictionaries as D
from probes import latents as LT
from probes import latents_kl as KL
from probes import refusal
from probes.args import (
    Parser,
    add_common_args,
    check_inputs,
    encode_kwargs,
    load_pair_for,
    open_run,
    positive,
    reject,
    warn_unknown,
)
from probes.chat import ROLES, encode
from probes.compare import instruct_responses
from probes.experiments.refusal_direction import prompt_splits
from probes.plots import dictionaries as PD
from probes.plots import token_text
from probes.runs import Run
from probes.store import Store, write_store

CHAT_ROLES = ("template", "post_instruction")


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = add_common_args(Parser(prog=prog, description=__doc__))
    p.add_argument("--layer", type=int, default=None, help="residual layer (resid_pre); default the middle one")
    p.add_argument("--n-train", type=positive, default=128, help="prompts per set for the train store")
    p.add_argument("--n-val", type=positive, default=32, help="prompts per set for the held-out store and KL")
    p.add_argument("--n-test", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-new-tokens", type=positive, default=12, help="the instruct model's greedy response")
    p.add_argument("--latents", type=positive, default=None, help="dictionary size (default 4 x d_model)")
    p.add_argument("--k", type=positive, default=8, help="BatchTopK: active latents per token on average")
    p.add_argument("--l1", type=float, default=1.0, help="the L1 crosscoder's sparsity coefficient")
    p.add_argument("--steps", type=positive, default=3000, help="training steps of each dictionary")
    p.add_argument("--batch-rows", type=positive, default=256, help="tokens per training step")
    p.add_argument("--control-draws", type=positive, default=8, help="random latent sets for the KL control")
    p.add_argument("--top-latents", type=positive, default=12, help="chat-only latents shown in the figures")
    p.add_argument("--steer-coeffs", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0],
                   help="steering coefficients, multiples of the refusal direction's raw norm")
    p.add_argument("--refusal-phrases", nargs="+", default=list(refusal.DEFAULT_PHRASES))
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def prepare(args: argparse.Namespace) -> dict[str, dict[str, list[str]]]:
    """Every input read and checked, no model loaded: the train / val prompt splits."""
    reject(args, "model_diff", "it stores every token of each prompt, with and without the template", "raw",
           "positions", "layers")
    if args.latents is not None and args.k > args.latents:
        raise SystemExit(f"--k {args.k} exceeds --latents {args.latents}")
    if not args.l1 > 0:
        raise SystemExit(f"--l1 must be positive, got {args.l1}")
    if any(c < 0 for c in args.steer_coeffs) or 0.0 not in args.steer_coeffs:
        raise SystemExit("--steer-coeffs must be non-negative and include 0 (the baseline)")
    check_inputs(args)
    return prompt_splits(args)


def main(argv: list[str] | None = None) -> Run:
    args = parse(argv)
    return run(args, prepare(args))


def run(args: argparse.Namespace, splits: dict[str, dict[str, list[str]]]) -> Run:
    torch.set_num_threads(1)
    with open_run("model_diff", args, prompts={f"{s}/{k}": v for s, d in splits.items() for k, v in d.items()}) as r:
        compute(r, args, splits)
    return r


def report(run: Run) -> str:
    c, k = run.results["classes"], run.results["kl_gap"]
    t = k["tested"]
    return (f"{run.target}: {c['chat-only']} chat-only / {c['shared']} shared / {c['base-only']} base-only latents; "
            f"KL gap ({k['gap']:.3f} nats) recovered by the {t} latents: {k['recovery'][t]:.2f} (random "
            f"{k['control_mean']:.2f})")


def _sets(pair, tok, split: dict[str, list[str]], args) -> dict:
    """{set name: ChatBatch}: harmful / harmless in the template with the instruct model's responses, and the
    harmless prompts as raw text."""
    enc = encode_kwargs(args)
    out = {}
    for kind in ("harmful", "harmless"):
        prompts = pair.encode(split[kind], **enc)
        responses = instruct_responses(pair, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        out[kind] = pair.encode(split[kind], responses=responses, **enc)
    out["harmless_raw"] = encode(tok, split["harmless"], template=False)
    return out


def _batches(store: Store, layer: int, rows: int, shuffle: bool, seed: int = 0):
    """A fresh stream of `{"base", "instruct", labels}` batches of one layer (a callable, re-iterated by train)."""
    epoch = [seed]

    def fresh():
        epoch[0] += 1
        return store.iter_batches(rows, layers=layer, shuffle=shuffle, seed=epoch[0])
    return fresh


def compute(run: Run, args: argparse.Namespace, splits: dict[str, dict[str, list[str]]]) -> None:
    pair = load_pair_for(run, args)
    tok = pair.tokenizer
    L, d = pair.n_layers, int(pair.instruct.cfg.d_model)
    layer = L // 2 if args.layer is None else args.layer
    if not 0 <= layer < L:
        raise SystemExit(f"--layer {layer}: the pair has layers 0..{L - 1}")
    n_latents = args.latents or 4 * d
    if args.k > n_latents:
        raise SystemExit(f"--k {args.k} exceeds --latents {n_latents}")
    run.update(layer=layer, hook="resid_pre", n_latents=n_latents, k=args.k, steps=args.steps,
               unknown_token_fraction=warn_unknown(tok, {k: splits["train"][k] for k in ("harmful", "harmless")}))

    batches = {s: _sets(pair, tok, splits[s], args) for s in ("train", "val")}
    stores = {s: write_store(pair, b, run.dir / "store" / s, hooks=["resid_pre"], layers=[layer], positions="all",
                             batch_size=args.batch_size) for s, b in batches.items()}
    run.update(store={s: dict(rows=st.rows, sets=st.sets, shards=len(st)) for s, st in stores.items()})
    val = _batches(stores["val"], layer, 4096, shuffle=False)

    # Dictionaries.
    torch.manual_seed(args.seed)
    warm = max(1, min(1000, args.steps // 10))
    kw = dict(warmup_steps=warm, threshold_start_step=min(1000, args.steps // 4), seed=args.seed)
    train_stream = _batches(stores["train"], layer, args.batch_rows, shuffle=True, seed=args.seed)
    dicts = {"batchtopk": D.BatchTopKCrosscoder(d, n_latents, args.k),
             "l1": D.L1Crosscoder(d, n_latents, l1=args.l1),
             "diff_sae": D.DiffSAE(d, n_latents, args.k)}
    records = {name: D.train(dc, train_stream, args.steps, **kw) for name, dc in dicts.items()}
    deads = {name: D.dead_latents(dc, val()) for name, dc in dicts.items()}
    quality = {name: dict(fvu=D.fvu(dc, val()), dead=int(deads[name].sum()),
                          final_loss=records[name].loss[-1]) for name, dc in dicts.items()}
    for name, dc in dicts.items():
        run.save_tensors(f"dictionary_{name}", {k: v.detach().contiguous() for k, v in dc.state_dict().items()},
                         {"class": type(dc).__name__, "d_model": d, "n_latents": n_latents, "layer": layer,
                          "k": args.k if name != "l1" else None, "l1": args.l1 if name == "l1" else None})
    cc = dicts["batchtopk"]

    # Latent classes and Latent Scaling.
    ls = D.latent_scaling(cc, val())
    kinds = ls.kind
    ids = {kind: [i for i, k in enumerate(kinds) if k == kind] for kind in D.KINDS}
    dead = deads["batchtopk"]
    chat_only = [i for i in ids["chat-only"] if not bool(dead[i])]
    l1_ls = D.latent_scaling(dicts["l1"], val())
    run.update(quality=quality, classes={k: len(v) for k, v in ids.items()},
               classes_alive={k: sum(1 for i in v if not bool(dead[i])) for k, v in ids.items()},
               l1_classes={k: l1_ls.kind.count(k) for k in D.KINDS},
               complete_shrinkage={"batchtopk": int(ls.complete_shrinkage.sum()),
                                   "l1": int(l1_ls.complete_shrinkage.sum())},
               latent_decoupling={"batchtopk": int(ls.latent_decoupling.sum()), "l1": int(l1_ls.latent_decoupling.sum())},
               chat_only=chat_only,
               nu_error_chat_only=[_num(ls.nu_error[i]) for i in chat_only],
               nu_recon_chat_only=[_num(ls.nu_recon[i]) for i in chat_only])
    run.save_tensors("latent_scaling", {k: getattr(ls, k).contiguous() for k in
                                        ("nu_error", "nu_recon", "delta_norm", "beta_error_base", "beta_error_chat",
                                         "beta_recon_base", "beta_recon_chat", "active")}, {"kind": kinds})

    # Roles and prompt sets.
    rm = LT.role_mass(cc, val(), n_sets=len(stores["val"].sets))
    share = rm.share(list(CHAT_ROLES))
    on_template = [i for i in chat_only if float(share[i]) > 0.5]
    run.update(roles=list(ROLES), sets=stores["val"].sets,
               chat_only_on_template=len(on_template), chat_only_on_template_share=(
                   len(on_template) / len(chat_only) if chat_only else None),
               template_share_by_class={k: _mean([float(share[i]) for i in v if not bool(dead[i])])
                                        for k, v in ids.items()},
               main_role_chat_only={str(i): rm.main_role()[i] for i in chat_only},
               template_share_top_delta_norm={str(i): _num(share[i]) for i in
                                              sorted(range(n_latents), key=lambda i: -float(ls.delta_norm[i]))[:args.k]})
    run.save_tensors("role_mass", {"by_role": rm.by_role.contiguous(), "by_set": rm.by_set.contiguous(),
                                   "fires": rm.fires.contiguous()}, {"roles": list(ROLES), "sets": stores["val"].sets})

    # Refusal: the direction at this layer, the chat-only decoders' cosines with it, steering along the best one.
    tok_ids = refusal.refusal_tokens(tok, args.refusal_phrases)
    train_b = {k: pair.encode(splits["train"][k], **encode_kwargs(args)) for k in ("harmful", "harmless")}
    with pair.on_device("instruct") as inst:
        cands = refusal.candidates(inst, train_b["harmful"], train_b["harmless"], layers=[layer],
                                   batch_size=args.batch_size, model_name=f"{pair.name}/instruct")
        direction = cands.direction(layer, -1)
        cos = LT.decoder_cosines(cc, direction.raw, "instruct")
        pool = chat_only or [i for i in range(n_latents) if not bool(dead[i])]
        best = max(pool, key=lambda i: abs(float(cos[i])))
        sign = 1.0 if float(cos[best]) >= 0 else -1.0
        latent_dir = LT.decoder_direction(cc, best, "instruct")
        scale = float(direction.raw.norm())
        harmless_val = pair.encode(splits["val"]["harmless"], **encode_kwargs(args))
        steer = {name: LT.steering_effect(inst, harmless_val, v / v.norm() * scale, layer, args.steer_coeffs, tok_ids,
                                          batch_size=args.batch_size).tolist()
                 for name, v in (("latent", sign * latent_dir.float()), ("refusal_direction", direction.raw.float()))}
    run.update(refusal_direction=dict(layer=layer, offset=-1, norm=scale),
               refusal_cosine_chat_only={str(i): float(cos[i]) for i in chat_only},
               refusal_aligned_latent=dict(latent=best, cosine=float(cos[best]), kind=kinds[best],
                                           from_chat_only=bool(chat_only)),
               steering=dict(coeffs=list(args.steer_coeffs), **steer))

    # KL-gap recovery at the first response token, against random latent sets of the tested set's size. Where the
    # crosscoder has no live chat-only latent, the most chat-specific ones (highest relative norm) stand in.
    kl_batch = pair.encode(splits["val"]["harmful"] + splits["val"]["harmless"], **encode_kwargs(args))
    alive = [i for i in range(n_latents) if not bool(dead[i])]
    n_top = max(len(chat_only), args.k)
    by_norm = sorted(alive, key=lambda i: -float(ls.delta_norm[i]))[:n_top]
    sets = {"chat-only": chat_only, "shared": [i for i in ids["shared"] if not bool(dead[i])],
            "top_delta_norm": by_norm}
    sets = {k: v for k, v in sets.items() if v}
    tested = chat_only or by_norm
    controls = KL.random_latent_sets(n_latents, len(tested), args.control_draws, args.seed, exclude=tested)
    kl = KL.kl_gap_recovery(pair, cc, kl_batch, layer, sets | controls, batch_size=args.batch_size)
    rec = {k: float(kl.recovery[k]) for k in [*sets, "all", "reconstruction"]}
    ctrl = [float(kl.recovery[k]) for k in controls]
    n_harm = len(splits["val"]["harmful"])
    by_kind = {kind: {k: _recovery(kl.per_prompt[k][rows], kl.per_prompt["none"][rows]) for k in rec}
               for kind, rows in (("harmful", slice(0, n_harm)), ("harmless", slice(n_harm, None)))}
    run.update(kl_gap=dict(gap=float(kl.gap), recovery=rec, control=ctrl, control_mean=_mean(ctrl),
                           tested="chat-only" if chat_only else "top_delta_norm", by_set=by_kind,
                           gap_by_set={k: float(kl.per_prompt["none"][r].mean()) for k, r in
                                       (("harmful", slice(0, n_harm)), ("harmless", slice(n_harm, None)))},
                           sizes={k: len(v) for k, v in sets.items()}, top_delta_norm=by_norm))

    # Figures.
    top = sorted(tested, key=lambda i: -float(rm.by_role[i].sum()))[: args.top_latents]
    what = "chat-only" if chat_only else "most chat-specific (highest relative norm)"
    flags = {"complete shrinkage": ls.complete_shrinkage, "latent decoupling": ls.latent_decoupling}
    run.save_figure("nu_scatter", PD.nu_scatter(ls.nu_error, ls.nu_recon, kinds, latent_ids=ls.latents,
                                                delta_norm=ls.delta_norm, flags=flags,
                                                title=f"Latent Scaling, BatchTopK crosscoder at layer {layer}"))
    if top:
        run.save_figure("role_mass", PD.role_mass_bars(rm.by_role[top], top, list(ROLES),
                                                       title=f"activation mass by role, {what} latents"))
        examples = LT.top_activations(cc, val(), top[:6], k=5)
        run.save_figure("top_tokens", PD.top_tokens(_with_text(examples, batches["val"], stores["val"].sets, tok)))
    run.save_figure("kl_recovery", PD.kl_recovery_bars(rec, ctrl or None, gap=float(kl.gap)))


def _with_text(examples: dict, batches: dict, set_names: list[str], tok, context: int = 6) -> dict:
    """Top activations with the token's text and the few tokens before it (the prompt's real tokens)."""
    out = {}
    for latent, rows in examples.items():
        out[latent] = []
        for e in rows:
            b = batches[set_names[e["set"]]]
            ids = b.input_ids[e["prompt_id"]][b.attention_mask[e["prompt_id"]].bool()].tolist()
            pos = e["position"]
            text = token_text(tok.decode([ids[pos]]))
            ctx = "".join(token_text(tok.decode([i])) for i in ids[max(0, pos - context):pos])
            out[latent].append(dict(e, set=set_names[e["set"]], text=text, context=ctx))
    return out


def _recovery(kl: torch.Tensor, gap: torch.Tensor) -> float | None:
    """1 - mean KL / mean gap over some prompts (None when they have no gap)."""
    g = float(gap.mean())
    return 1 - float(kl.mean()) / g if g > 0 else None


def _num(x: torch.Tensor) -> float | None:
    v = float(x)
    return v if v == v else None


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else None
