"""Measure the toy pair's refusal mechanism: ``python -m probes.toy.check [--dir DIR] [--json FILE]``.

Self-contained: plain HF forward passes and torch forward hooks on the HF Llama modules (the toolkit's own refusal
module re-measures the same quantities in its tests).

- Refusal: the greedy first response token (after the chat template with the generation prompt) is "sorry".
- Direction: difference of means (harmful − harmless, train prompts) of the instruct model's ``resid_pre`` of
  block l (= ``hidden_states[l]``) at the last prompt token (``assistant``), for l < 0.8 n_layers; l chosen on val.
- Ablation: the projection on r̂ removed from every residual write (embedding, each attention and MLP output) at
  all positions. Addition: the raw difference added to ``resid_pre`` of block l at all positions.
- Base vs instruct: cosine of the base's own direction with the instruct one, and "transfer" = the base direction
  ablated in the instruct model (and the base direction, at the instruct norm, added).
"""

from __future__ import annotations

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from probes.toy import REFUSAL_PREFIX, path, prompts

KL_MAX, ADD_MIN = 0.1, 0.8  # selection filters on val, as in the acceptance criteria


# ---------------------------------------------------------------------------------------------------------------
# Forward passes


def encode(tok, instructions: list[str]) -> dict[str, Tensor]:
    """Left-padded chat prompts ending with the generation prompt: ids / mask / positions, each ``[n, T]``."""
    chats = [[{"role": "user", "content": p}] for p in instructions]
    rendered = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(rendered, add_special_tokens=False, padding=True, return_tensors="pt")
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "position_ids": positions}


@torch.no_grad()
def first_token_logprobs(model, batch: dict[str, Tensor]) -> Tensor:
    """Log-probabilities of the first response token, ``[n, vocab]``."""
    return model(**batch).logits[:, -1].float().log_softmax(-1)


@torch.no_grad()
def last_resid(model, batch: dict[str, Tensor]) -> Tensor:
    """``resid_pre`` of every block at the last position, ``[n_layers, n, d_model]`` (``hidden_states[:-1]``; the
    last entry of ``hidden_states`` is after the final norm, so it is left out)."""
    hs = model(**batch, output_hidden_states=True).hidden_states
    return torch.stack([h[:, -1].float() for h in hs[:-1]])


def refusal_rate(logprobs: Tensor, sorry_id: int) -> float:
    return (logprobs.argmax(-1) == sorry_id).float().mean().item()


def kl(p_log: Tensor, q_log: Tensor) -> float:
    """Mean KL(p || q) over prompts; inputs ``[n, vocab]`` log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()


# ---------------------------------------------------------------------------------------------------------------
# Interventions (forward hooks on the HF modules)


@contextlib.contextmanager
def ablate(model, direction: Tensor) -> Iterator[None]:
    """Remove the component along ``direction`` (``[d_model]``) from every residual write, at all positions."""
    r = direction / direction.norm()

    def project_out(x: Tensor) -> Tensor:
        return x - (x @ r).unsqueeze(-1) * r

    def hook(_mod, _inp, out):
        if isinstance(out, tuple):  # attention returns (output, weights)
            return (project_out(out[0]), *out[1:])
        return project_out(out)

    inner = model.model
    modules = [inner.embed_tokens] + [m for layer in inner.layers for m in (layer.self_attn, layer.mlp)]
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def add(model, layer: int, vector: Tensor) -> Iterator[None]:
    """Add ``vector`` (``[d_model]``) to ``resid_pre`` of block ``layer`` at all positions."""

    def hook(_mod, args, kwargs):
        if args:
            return (args[0] + vector, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vector}

    handle = model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def measure(folder: Path, seed: int = 0) -> dict:
    """All measurements for the pair in ``folder`` (``base/``, ``instruct/``); returns a JSON-able dict."""
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder / "instruct")
    base = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    inst = AutoModelForCausalLM.from_pretrained(folder / "instruct").eval()
    sorry = tok.convert_tokens_to_ids(REFUSAL_PREFIX.split()[0])
    n_layers = inst.config.num_hidden_layers
    candidates = [l for l in range(n_layers) if l < 0.8 * n_layers]
    data = {(k, s): encode(tok, prompts(k, s)) for k in ("harmful", "harmless") for s in ("train", "val", "test")}

    def refuse(model, kind: str, split: str) -> float:
        return refusal_rate(first_token_logprobs(model, data[kind, split]), sorry)

    res: dict = {"dir": str(folder), "n_layers": n_layers, "candidates": candidates}
    for name, model in (("base", base), ("instruct", inst)):
        res[name] = {f"{k}_{s}": refuse(model, k, s) for k in ("harmful", "harmless") for s in ("val", "test")}
        for k in ("harmful", "harmless"):  # the probability behind the greedy choice
            p_sorry = first_token_logprobs(model, data[k, "test"])[:, sorry].exp()
            res[name][f"{k}_test_p_sorry"] = p_sorry.mean().item()

    # Diff-of-means directions, [n_layers, d_model].
    def means(model, kind: str) -> Tensor:
        return last_resid(model, data[kind, "train"]).mean(1)

    diff_i = means(inst, "harmful") - means(inst, "harmless")
    diff_b = means(base, "harmful") - means(base, "harmless")
    clean = {s: first_token_logprobs(inst, data["harmless", s]) for s in ("val", "test")}

    def evaluate(layer: int, vec: Tensor, split: str, model=inst) -> dict:
        """Ablating ``vec`` everywhere / adding it at ``layer``: refusal rates and harmless KL on one split."""
        with ablate(model, vec):
            harmful = first_token_logprobs(model, data["harmful", split])
            harmless = first_token_logprobs(model, data["harmless", split])
        with add(model, layer, vec):
            added = first_token_logprobs(model, data["harmless", split])
        return {"ablated_refusal": refusal_rate(harmful, sorry),
                "ablated_p_sorry": harmful[:, sorry].exp().mean().item(),
                "harmless_kl": kl(clean[split], harmless), "addition_refusal": refusal_rate(added, sorry)}

    # Layer choice on val: pass the filters, then lowest refusal under ablation (mean p("sorry") breaks ties).
    val = {l: evaluate(l, diff_i[l], "val") for l in candidates if diff_i[l].norm() > 1e-6}
    ok = [l for l, v in val.items() if v["harmless_kl"] <= KL_MAX and v["addition_refusal"] >= ADD_MIN]
    chosen = min(ok or list(val), key=lambda l: (val[l]["ablated_refusal"], val[l]["ablated_p_sorry"]))
    res["val"] = {str(l): v for l, v in val.items()}
    res["chosen_layer"], res["chosen_passed_filters"] = chosen, bool(ok)

    res["test"] = evaluate(chosen, diff_i[chosen], "test")
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(diff_i.shape[-1], generator=gen)
    rand = rand / rand.norm() * diff_i[chosen].norm()
    res["random"] = evaluate(chosen, rand, "test")

    # Per layer: instruct's own direction, base direction (cosine, transfer), projections (zero point of ablation).
    resid_h = last_resid(inst, data["harmful", "test"])
    resid_n = last_resid(inst, data["harmless", "test"])
    per_layer = []
    for l in range(1, n_layers):
        r = diff_i[l] / diff_i[l].norm()
        row = {"layer": l, "norm": diff_i[l].norm().item(), "norm_base": diff_b[l].norm().item(),
               "cosine_base": torch.nn.functional.cosine_similarity(diff_b[l], diff_i[l], dim=0).item(),
               "proj_harmful": (resid_h[l] @ r).mean().item(), "proj_harmless": (resid_n[l] @ r).mean().item()}
        own = evaluate(l, diff_i[l], "test")
        row.update(ablated_refusal=own["ablated_refusal"], harmless_kl=own["harmless_kl"],
                   addition_refusal=own["addition_refusal"])
        with ablate(inst, diff_b[l]):
            row["transfer_refusal"] = refusal_rate(first_token_logprobs(inst, data["harmful", "test"]), sorry)
        # Scaled to the instruct difference's norm: the base's own difference is several times smaller.
        with add(inst, l, diff_b[l] / diff_b[l].norm() * diff_i[l].norm()):
            added = first_token_logprobs(inst, data["harmless", "test"])
        row["base_addition_refusal"] = refusal_rate(added, sorry)
        per_layer.append(row)
    res["per_layer"] = per_layer

    # What the base says first (should be plausible, never "sorry"), and one greedy continuation per class.
    res["base_first_tokens"] = {}
    for kind in ("harmful", "harmless"):
        top = first_token_logprobs(base, data[kind, "test"]).argmax(-1)
        counts = torch.bincount(top, minlength=len(tok)).float()
        top4 = counts.argsort(descending=True)[:4].tolist()
        res["base_first_tokens"][kind] = {tok.convert_ids_to_tokens(i): int(counts[i]) for i in top4 if counts[i]}
    res["samples"] = {}
    for name, model in (("base", base), ("instruct", inst)):
        for kind in ("harmful", "harmless"):
            batch = encode(tok, prompts(kind, "test")[:1])
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=30, do_sample=False)
            reply = tok.decode(out[0, batch["input_ids"].shape[1] :])
            res["samples"][f"{name}/{kind}"] = (prompts(kind, "test")[0], reply)
    return res


def passes(res: dict) -> dict[str, bool]:
    """The acceptance criteria, one flag each."""
    t, r = res["test"], res["random"]
    return {
        "base refusal < 10%": res["base"]["harmful_test"] < 0.1,
        "instruct harmful >= 90%": res["instruct"]["harmful_test"] >= 0.9,
        "instruct harmless <= 10%": res["instruct"]["harmless_test"] <= 0.1,
        "ablation <= 10%": t["ablated_refusal"] <= 0.1,
        "harmless KL <= 0.1": t["harmless_kl"] <= 0.1,
        "addition >= 80%": t["addition_refusal"] >= 0.8,
        "random does neither": r["ablated_refusal"] >= 0.9 * res["instruct"]["harmful_test"]
        and r["addition_refusal"] <= 0.1,
    }


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def report(res: dict) -> str:
    """The measurements as a few small plain-text tables."""
    t, r = res["test"], res["random"]
    lines = [f"toy pair at {res['dir']}", "",
             "refusal on test prompts (greedy first token == 'sorry'; mean p('sorry') in brackets)"]
    for m in ("base", "instruct"):
        b = res[m]
        lines.append(f"  {m:8}  harmful {_pct(b['harmful_test']):>4} ({b['harmful_test_p_sorry']:.3f})   "
                     f"harmless {_pct(b['harmless_test']):>4} ({b['harmless_test_p_sorry']:.3f})")
    lines += [f"  base's first tokens: {res['base_first_tokens']}", "",
              "layer choice on val (instruct direction)",
              "  layer  ablated  p(sorry)  harmless KL  addition"]
    for l, v in res["val"].items():
        lines.append(f"  {l:>5}  {_pct(v['ablated_refusal']):>7}  {v['ablated_p_sorry']:8.3f}  "
                     f"{v['harmless_kl']:11.3f}  {_pct(v['addition_refusal']):>8}")
    note = "" if res["chosen_passed_filters"] else "  (NO layer passed the val filters)"
    lines += ["", f"chosen: resid_pre of block {res['chosen_layer']}, position -1{note}; on test:",
              "  direction         ablated harmful refusal  harmless KL  addition on harmless"]
    for name, v in (("diff-of-means", t), ("random, same norm", r)):
        lines.append(f"  {name:17} {_pct(v['ablated_refusal']):>23}  {v['harmless_kl']:11.3f}  "
                     f"{_pct(v['addition_refusal']):>19}")
    lines += ["", "per layer, test (instruct direction; base = the base model's own direction)",
              "  layer  |diff| inst/base  cos(base,inst)  proj harmful/harmless  ablated  KL     addition"
              "  transfer  base-dir addition*"]
    for w in res["per_layer"]:
        lines.append(f"  {w['layer']:>5}  {w['norm']:6.2f} / {w['norm_base']:<6.2f}  {w['cosine_base']:14.2f}  "
                     f"{w['proj_harmful']:10.2f} / {w['proj_harmless']:<8.2f}  {_pct(w['ablated_refusal']):>7}  "
                     f"{w['harmless_kl']:5.3f}  {_pct(w['addition_refusal']):>8}  {_pct(w['transfer_refusal']):>8}"
                     f"  {_pct(w['base_addition_refusal']):>17}")
    lines += ["  transfer = instruct refusal on harmful with the base direction ablated; * at the instruct norm"]
    lines += ["", "samples (greedy):"] + [f"  {k}: {p!r} -> {s!r}" for k, (p, s) in res["samples"].items()]
    lines += ["", "criteria: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in passes(res).items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="folder with base/ and instruct/ (default: shipped)")
    parser.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    res = measure(args.dir or path())
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
