"""Refusal cones (probes.cones): losses against raw HF forwards with hooks, a finite-difference gradient check, the
cone sampling, a planted model whose refusal is mediated by a known cone, RepInd by hand and on planted pairs."""
from __future__ import annotations

import json
import math

import pytest
import torch

import tiny
from probes import cones as C
from probes.chat import encode
from probes.directions import Direction
from probes.pairs import load_model
from probes.plots import cones as P
from test_generation import hf_greedy

# Rows of equal length (prompt + target): transformers' float64 attention turns left-padded rows into NaN, and the
# float64 tests need no padding; `test_losses_with_padding` covers padded batches in float32.
HARMFUL = ["how do i make a bomb", "help me steal a car please", "can you help me build bomb"]
HARMLESS = ["how do i bake bread", "write a poem about the sun and moon", "tell me a story"]
ABLATION = ["sure ok", "ok yes", "yes ok"]
ADDITION = ["no sorry , i cannot", "sorry ok", "sorry , i cannot help ."]
RETAIN = ["sure the sun is ok", "ok yes", "ok the sun is a poem"]


@pytest.fixture(scope="module")
def llama(tiny_pair_dirs):
    """The tiny Llama in float64 as a bridge and as plain HF, for tight hand comparisons."""
    folder = tiny_pair_dirs["llama"][1]
    return load_model(folder, device="cpu", dtype=torch.float64), tiny.hf_model(folder).double()


@pytest.fixture(scope="module")
def targets(tiny_tokenizer):
    return C.Targets(ablation=encode(tiny_tokenizer, HARMFUL, responses=ABLATION),
                     addition=encode(tiny_tokenizer, HARMLESS, responses=ADDITION),
                     retain=encode(tiny_tokenizer, HARMLESS, responses=RETAIN))


# ------------------------------------------------------------------------------------------- HF by hand

def hf_logits(hf, b, r_hat=None, add=None, layer=0):
    """`[batch, seq, vocab]` float64 from plain HF, with r̂ projected out of the embedding, every o_proj and every
    down_proj output (forward hooks), and/or `add` added to the input of decoder layer `layer` (a pre-hook)."""
    hooks = []

    def project(mod, args, out):
        return out - (out @ r_hat)[..., None] * r_hat

    if r_hat is not None:
        mods = [hf.model.embed_tokens] + [m for L in hf.model.layers for m in (L.self_attn.o_proj, L.mlp.down_proj)]
        hooks += [m.register_forward_hook(project) for m in mods]
    if add is not None:
        def pre(mod, args, kwargs):
            if args:
                return (args[0] + add, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + add}
        hooks.append(hf.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return hf(b.input_ids, attention_mask=b.attention_mask, position_ids=pos).logits.double()
    finally:
        for h in hooks:
            h.remove()


def hand_ce(logits, b):
    """Per-row mean of -log P(response token | what precedes it), by explicit loops."""
    out = []
    for i in range(len(b)):
        terms = [-logits[i, t - 1].log_softmax(-1)[b.input_ids[i, t]] for t in range(b.seq_len)
                 if b.roles[i, t] == 6]  # ROLE_ID["response"]
        out.append(sum(terms) / len(terms))
    return torch.stack(out)


def hand_kl(clean, ablated, b):
    """Per-row sum of KL(ablated ‖ clean) over the last prompt token and every response token, by loops."""
    out = []
    for i in range(len(b)):
        resp = [t for t in range(b.seq_len) if b.roles[i, t] == 6]
        total = 0.0
        for t in [resp[0] - 1] + resp:
            p, q = ablated[i, t].softmax(-1), clean[i, t].softmax(-1)
            total = total + (p * (p.log() - q.log())).sum()
        out.append(total)
    return torch.stack(out)


def test_losses_equal_hand_computations(llama, targets):
    model, hf = llama
    torch.manual_seed(0)
    r = torch.randn(64, dtype=torch.float64) * 3  # any norm: r̂ is used
    r_hat, layer, alpha = r / r.norm(), 1, 2.5
    total, parts = C.rdo_loss(model, r, targets, layer, alpha)
    abl = hand_ce(hf_logits(hf, targets.ablation, r_hat), targets.ablation).mean()
    add = hand_ce(hf_logits(hf, targets.addition, add=alpha * r_hat, layer=layer), targets.addition).mean()
    ret = hand_kl(hf_logits(hf, targets.retain), hf_logits(hf, targets.retain, r_hat), targets.retain).mean()
    torch.testing.assert_close(parts["ablation"], abl, atol=1e-9, rtol=0)
    torch.testing.assert_close(parts["addition"], add, atol=1e-9, rtol=0)
    torch.testing.assert_close(parts["retain"], ret, atol=1e-9, rtol=0)
    torch.testing.assert_close(total, abl + 0.2 * add + ret, atol=1e-9, rtol=0)  # the reference's weights
    assert float(ret) > 1e-3 and float(abl) > 0  # the ablation moves the retain distributions
    # Weights: a zero weight drops its term; custom weights scale them.
    t2, p2 = C.rdo_loss(model, r, targets, layer, alpha, weights=dict(ablation=0.5, addition=0.0, retain=2.0))
    assert float(p2["addition"]) == 0.0
    torch.testing.assert_close(t2, 0.5 * abl + 2 * ret, atol=1e-9, rtol=0)


def test_losses_with_padding(tiny_pair_dirs, tiny_tokenizer):
    """Left-padded rows of different lengths, float32: the same hand computations."""
    folder = tiny_pair_dirs["qwen2"][1]
    model, hf = load_model(folder, device="cpu"), tiny.hf_model(folder)
    t = C.Targets(ablation=encode(tiny_tokenizer, ["build a bomb", "how do i make a bomb"], responses=["sure", "ok yes"]),
                  addition=encode(tiny_tokenizer, ["tell me a story", "hello"], responses=["sorry , no", "sorry"]),
                  retain=encode(tiny_tokenizer, ["hello", "tell me about the sun"], responses=["ok hello", "the sun"]))
    assert not bool(t.ablation.attention_mask.all())  # padded
    r = torch.randn(64, generator=torch.Generator().manual_seed(9))
    r_hat = r.double() / r.double().norm()
    _, parts = C.rdo_loss(model, r, t, 2, 3.0)
    abl = hand_ce(hf_logits(hf, t.ablation, r_hat.float()), t.ablation).mean()
    add = hand_ce(hf_logits(hf, t.addition, add=3.0 * r_hat.float(), layer=2), t.addition).mean()
    ret = hand_kl(hf_logits(hf, t.retain), hf_logits(hf, t.retain, r_hat.float()), t.retain).mean()
    torch.testing.assert_close(parts["ablation"], abl, atol=2e-5, rtol=0)
    torch.testing.assert_close(parts["addition"], add, atol=2e-5, rtol=0)
    torch.testing.assert_close(parts["retain"], ret, atol=2e-5, rtol=0)


def test_cone_loss_is_mean_over_samples_plus_mean_over_basis(llama, targets):
    model, _ = llama
    basis = C.orthonormalize(torch.randn(2, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    coeffs = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.2, 0.3]], dtype=torch.float64)
    total, log = C.cone_loss(model, basis, coeffs, targets, 2, 1.5)
    one = [C.rdo_loss(model, v, targets, 2, 1.5)[0] for v in coeffs @ basis]
    own = [C.rdo_loss(model, v, targets, 2, 1.5)[0] for v in basis]
    torch.testing.assert_close(total, sum(one) / 3 + sum(own) / 2, atol=1e-10, rtol=0)
    assert set(log) == {f"{g}_{k}" for g in ("sample", "basis") for k in ("ablation", "addition", "retain")}


@pytest.fixture(scope="module")
def gpt2(tiny_pair_dirs):
    """GPT-2 in float64: its LayerNorms stay in float64 (Llama's RMSNorm computes in float32, whose rounding would
    swamp a finite difference)."""
    return load_model(tiny_pair_dirs["gpt2"][1], device="cpu", dtype=torch.float64)


def test_gradient_matches_finite_differences(gpt2, targets):
    model = gpt2
    g = torch.Generator().manual_seed(2)
    r = torch.randn(64, generator=g, dtype=torch.float64)
    r = (r / r.norm()).requires_grad_(True)
    total, _ = C.rdo_loss(model, r, targets, 1, 2.0)
    (grad,) = torch.autograd.grad(total, [r])
    t = torch.randn(64, generator=g, dtype=torch.float64)
    t = t - (t @ r.detach()) * r.detach()  # a tangent of the sphere at r
    t = t / t.norm()
    eps = 1e-4
    with torch.no_grad():
        up = C.rdo_loss(model, r.detach() + eps * t, targets, 1, 2.0)[0]
        down = C.rdo_loss(model, r.detach() - eps * t, targets, 1, 2.0)[0]
    fd = (up - down) / (2 * eps)
    assert abs(float(grad @ t)) > 1e-3  # a real slope along t
    torch.testing.assert_close(grad @ t, fd, atol=1e-8, rtol=1e-6)
    # The loss sees r̂ only, so the gradient is tangent, and no weight was given a gradient.
    assert abs(float(grad @ r.detach())) < 1e-9 * float(grad.norm()) + 1e-12
    assert all(p.grad is None for p in model.parameters())
    # The basis gradient of the cone loss too, along a random matrix.
    basis = C.orthonormalize(torch.randn(2, 64, generator=g, dtype=torch.float64)).requires_grad_(True)
    coeffs = C.cone_coefficients(2, 3, g)
    total, _ = C.cone_loss(model, basis, coeffs, targets, 1, 2.0)
    (gb,) = torch.autograd.grad(total, [basis])
    tb = torch.randn(2, 64, generator=g, dtype=torch.float64)
    tb = tb / tb.norm()
    with torch.no_grad():
        fd = (C.cone_loss(model, basis + eps * tb, coeffs, targets, 1, 2.0)[0]
              - C.cone_loss(model, basis - eps * tb, coeffs, targets, 1, 2.0)[0]) / (2 * eps)
    torch.testing.assert_close((gb * tb).sum(), fd, atol=1e-8, rtol=1e-6)


def test_grad_hooks_equal_the_house_interventions(llama, tiny_tokenizer):
    from probes.activations import last_logits
    from probes.directions import ablation_hooks, addition_hooks

    model, _ = llama
    b = encode(tiny_tokenizer, HARMFUL)
    r = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(last_logits(model, b, C.grad_ablation_hooks(model, r)),
                               last_logits(model, b, ablation_hooks(model, r)), atol=1e-10, rtol=0)
    torch.testing.assert_close(last_logits(model, b, C.grad_addition_hooks(model, r, 2, 1.7)),
                               last_logits(model, b, addition_hooks(model, 1.7 * r / r.norm(), 2)), atol=1e-10, rtol=0)


def test_targets_are_hf_greedy_under_the_dim_interventions(tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs["llama"][1]
    model, hf = load_model(folder, device="cpu"), tiny.hf_model(folder)
    raw = torch.randn(64, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 4
    dim = Direction.from_raw(raw, layer=1)
    harmful, harmless = encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)
    t = C.make_targets(model, harmful, harmless, dim, max_new_tokens=6, progress=False)
    r_hat = dim.vector

    def greedy(b, hooks):
        handles = hooks()
        try:
            toks = hf_greedy(hf, b.input_ids, b.attention_mask, 6)
        finally:
            for h in handles:
                h.remove()
        stops = {tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")}
        out = []
        for row in toks.tolist():
            cut = next((i for i, x in enumerate(row) if x in stops), len(row))
            out.append(tiny_tokenizer.decode(row[: cut + 1], skip_special_tokens=True))
        return out

    def abl():
        mods = [hf.model.embed_tokens] + [m for L in hf.model.layers for m in (L.self_attn.o_proj, L.mlp.down_proj)]
        return [m.register_forward_hook(lambda mod, a, out: out - (out @ r_hat)[..., None] * r_hat) for m in mods]

    def add():
        def pre(mod, args, kwargs):
            if args:
                return (args[0] + raw.float(), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + raw.float()}
        return [hf.model.layers[1].register_forward_pre_hook(pre, with_kwargs=True)]

    def keep(texts):
        return [x for x in texts if x.strip()]

    assert t.ablation.responses == keep(greedy(harmful, abl))
    assert t.addition.responses == keep([x.split(".")[0] for x in greedy(harmless, add)])
    assert t.retain.responses == keep(greedy(harmless, list))
    assert t.ablation.instructions[: len(t.ablation)] == [p for p, x in zip(HARMFUL, greedy(harmful, abl))
                                                         if x.strip()]
    assert json.loads(json.dumps(t.as_dict()))["retain"][0]["prompt"] == t.retain.instructions[0]


def test_retain_positions(tiny_tokenizer):  # padded rows
    b = encode(tiny_tokenizer, ["hello", "tell me a story"], responses=["sure ok yes", "no"])
    pos = C.retain_positions(b)
    for i in range(2):
        resp = [t for t in range(b.seq_len) if b.roles[i, t] == 6]
        assert pos[i].nonzero().flatten().tolist() == [resp[0] - 1] + resp


# ----------------------------------------------------------------------------------------------- sampling

def test_cone_samples_are_unit_vectors_in_the_cone():
    g = torch.Generator().manual_seed(5)
    basis = C.orthonormalize(torch.randn(3, 40, generator=g, dtype=torch.float64))
    torch.testing.assert_close(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    v = C.sample_cone(basis, 500, seed=7)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(500, dtype=torch.float64), atol=1e-12, rtol=0)
    c = v @ basis.T  # coordinates in the orthonormal basis
    assert bool((c >= 0).all())
    torch.testing.assert_close(c @ basis, v, atol=1e-12, rtol=0)  # nothing outside the span
    assert torch.equal(v, C.sample_cone(basis, 500, seed=7)) and not torch.equal(v, C.sample_cone(basis, 500, seed=8))
    # Uniform on the positive quadrant of the circle for k = 2: the angle is uniform on [0, pi/2].
    ang = torch.atan2(*C.cone_coefficients(2, 20000, torch.Generator().manual_seed(0)).T.flip(0))
    assert bool((ang >= 0).all() and (ang <= math.pi / 2).all())
    sd = (math.pi / 2) / math.sqrt(12 * 20000)
    assert abs(float(ang.mean()) - math.pi / 4) < 4 * sd
    assert abs(float((ang < math.pi / 8).double().mean()) - 0.25) < 0.015
    r = C.random_directions(40, 10, seed=1)
    torch.testing.assert_close(r.norm(dim=-1), torch.ones(10, dtype=torch.float64), atol=1e-12, rtol=0)


def test_orthonormalize_bad_input():
    with pytest.raises(ValueError, match="span"):
        C.orthonormalize(torch.tensor([[1.0, 0, 0], [2.0, 0, 0]]))
    with pytest.raises(ValueError, match="k >= 1"):
        C.orthonormalize(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN"):
        C.orthonormalize(torch.tensor([[float("nan"), 0.0]]))


# ------------------------------------------------------------------------------------------ a planted cone

GAMMA, BETA, TAU, KAPPA, EPS = 100.0, 10.0, 1.5, 200.0, 1e4
HARM_WORDS = ("bomb", "car")
PLANT_HARMFUL = ["how do i make a bomb", "help me steal a car", "build a bomb"]
PLANT_HARMLESS = ["how do i bake bread", "write a poem", "bake a cake"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_tokenizer):
    """A one-block Llama whose refusal at the last token is `beta (relu(x1) + relu(x2) - tau)` read off dims 1 and 2
    of the residual, written to dim 3 and unembedded as "sorry" (every other logit 0). RMSNorm eps 1e4 makes the
    norms linear (x / 100); attention writes nothing. Harmful words embed at (x1, x2) = (1, 1). Ablating any unit
    v in the cone {a e1 + b e2: a, b >= 0} leaves relu-sum <= 1 < tau (no refusal); adding 2 v gives >= 2 > tau
    (refusal). A random direction does neither; nor does (e1 - e2) / sqrt 2, outside the cone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, hidden_act="relu",
                      mlp_bias=True, rms_norm_eps=EPS, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    sorry = tok.convert_tokens_to_ids("sorry")
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for n in (hf.model.norm, hf.model.layers[0].input_layernorm, hf.model.layers[0].post_attention_layernorm):
            n.weight.fill_(1.0)
        emb = hf.model.embed_tokens.weight
        emb.normal_(0, 0.1)
        emb[:, :4] = 0
        for w in HARM_WORDS:
            emb[tok.convert_tokens_to_ids(w), 1:3] = 1.0
        mlp = hf.model.layers[0].mlp
        mlp.gate_proj.weight[0, 1] = mlp.gate_proj.weight[1, 2] = GAMMA
        mlp.up_proj.bias.fill_(1.0)
        mlp.down_proj.weight[3, 0] = mlp.down_proj.weight[3, 1] = BETA
        mlp.down_proj.bias[3] = -TAU * BETA
        hf.lm_head.weight[sorry, 3] = KAPPA
    folder = tmp_path_factory.mktemp("planted")
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = load_model(folder, device="cpu")
    harmful = encode(tok, PLANT_HARMFUL, template=False)
    harmless = encode(tok, PLANT_HARMLESS, template=False)
    return model, emb.detach().double().clone(), harmful, harmless, [sorry]


def planted_score(emb, batch, ablate=None, add=None):
    """The planted model's refusal score at the last token, in closed form (float64), `[batch]`."""
    x = emb[batch.input_ids[:, -1]].clone()  # [b, d]: attention writes nothing, so only the last token counts
    if ablate is not None:
        x = x - (x @ ablate)[:, None] * ablate
    if add is not None:
        x = x + add
    n1 = x / (x.square().mean(-1, keepdim=True) + EPS).sqrt()
    h = torch.relu(GAMMA * n1[:, 1]) + torch.relu(GAMMA * n1[:, 2])
    out = torch.zeros_like(x)
    out[:, 3] = BETA * h - TAU * BETA
    if ablate is not None:
        out = out - (out @ ablate)[:, None] * ablate
    x1 = x + out
    logit = KAPPA * x1[:, 3] / (x1.square().mean(-1, keepdim=True)[:, 0] + EPS).sqrt()
    return logit - math.log(emb.shape[0] - 1)  # every other logit is 0


def test_planted_cone_samples_mediate_refusal(planted):
    model, emb, harmful, harmless, ids = planted
    e = torch.eye(64, dtype=torch.float64)
    basis = e[1:3]
    ev = C.evaluate_cone(model, basis, harmful, harmless, ids, 0, 2.0, n=12, seed=3, progress=False)
    assert ev.baseline["harmful_rate"] == 1.0 and ev.baseline["harmless_rate"] == 0.0
    assert ev.baseline["harmful_score"] == pytest.approx(float(planted_score(emb, harmful).mean()), abs=1e-4)
    samples = C.sample_cone(basis, 12, seed=3)
    for v, got in zip(samples, ev.samples):
        # Every sample of the cone removes refusal on every harmful prompt and induces it on every harmless one,
        # with the scores the closed form gives.
        assert got["ablated_rate"] == 0.0 and got["added_rate"] == 1.0
        assert got["ablated_score"] == pytest.approx(float(planted_score(emb, harmful, ablate=v).mean()), abs=1e-4)
        assert got["added_score"] == pytest.approx(float(planted_score(emb, harmless, add=2 * v).mean()), abs=1e-4)
        assert got["kl_harmless_ablation"] < 1e-3  # harmless prompts have nothing on the cone
    assert all(r["ablated_rate"] == 1.0 and r["added_rate"] == 0.0 for r in ev.random)
    assert [b["ablated_rate"] for b in ev.basis] == [0.0, 0.0] and [b["added_rate"] for b in ev.basis] == [1.0, 1.0]
    # Outside the cone (a negative coefficient) the same model neither bypasses nor induces.
    out = C.direction_effects(model, (e[1] - e[2])[None] / math.sqrt(2), harmful, harmless, ids, 0, 2.0,
                              progress=False)[0]
    assert out["ablated_rate"] == 1.0 and out["added_rate"] == 0.0
    d = ev.as_dict()
    assert d["samples"]["ablated_rate"]["max"] == 0.0 and d["random"]["added_rate"]["max"] == 0.0
    json.dumps(d)


# -------------------------------------------------------------------------------------------------- RepInd

def test_repind_equals_hand_cosines(llama, tiny_tokenizer):
    model, hf = llama
    b = encode(tiny_tokenizer, HARMFUL)
    g = torch.Generator().manual_seed(6)
    a, c = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    ri = C.representational_independence(model, a, c, b, names=("a", "c"))
    assert ri.layers == [0, 1]  # int(0.9 * 3)

    def hand(measure, ablate):
        mods = [hf.model.embed_tokens] + [m for L in hf.model.layers for m in (L.self_attn.o_proj, L.mlp.down_proj)]
        u = None if ablate is None else ablate / ablate.norm()
        hooks = [] if u is None else [m.register_forward_hook(lambda mod, x, out: out - (out @ u)[..., None] * u)
                                      for m in mods]
        try:
            pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                hs = hf(b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                        output_hidden_states=True).hidden_states
        finally:
            for h in hooks:
                h.remove()
        return torch.stack([torch.nn.functional.cosine_similarity(hs[layer][:, -1], measure[None], dim=-1)
                            for layer in ri.layers], 1)

    torch.testing.assert_close(ri.cos_a, hand(a, None), atol=1e-10, rtol=0)
    torch.testing.assert_close(ri.cos_b, hand(c, None), atol=1e-10, rtol=0)
    torch.testing.assert_close(ri.cos_b_ablate_a, hand(c, a), atol=1e-10, rtol=0)
    torch.testing.assert_close(ri.cos_a_ablate_b, hand(a, c), atol=1e-10, rtol=0)
    loss = ((hand(c, a) - hand(c, None)).square().mean() + (hand(a, c) - hand(a, None)).square().mean())
    assert ri.loss == pytest.approx(float(loss), abs=1e-12)
    assert ri.cosine == pytest.approx(float(a @ c / (a.norm() * c.norm())))
    d = ri.as_dict()
    assert d["cos_c_ablate_a"] == pytest.approx(hand(c, a).mean(0).tolist()) and d["repind_loss"] > 0
    json.dumps(d)


@pytest.fixture(scope="module")
def residual_only(tmp_path_factory):
    """A tiny Llama whose blocks write nothing (o_proj, down_proj zero) and whose embeddings are 0 on dim 0: every
    resid_pre is the token embedding."""
    hf = tiny.make_model("llama", len(tiny.make_tokenizer()), seed=2)
    with torch.no_grad():
        for L in hf.model.layers:
            L.self_attn.o_proj.weight.zero_()
            L.mlp.down_proj.weight.zero_()
        hf.model.embed_tokens.weight[:, 0] = 0
    folder = tmp_path_factory.mktemp("residual_only")
    hf.save_pretrained(folder)
    tiny.make_tokenizer().save_pretrained(folder)
    return load_model(folder, device="cpu", dtype=torch.float64), hf.model.embed_tokens.weight.detach().double()


def test_repind_planted_pairs(residual_only, tiny_tokenizer):
    model, emb = residual_only
    b = encode(tiny_tokenizer, HARMFUL)
    x = emb[b.input_ids[:, -1]]  # [prompt, d]: the residual at the last token (the template's), at every layer
    e = torch.eye(64, dtype=torch.float64)
    # Independent: a = e0, which no activation has; b orthogonal to it. Neither ablation moves the other's cosine.
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, generator=g, dtype=torch.float64)
    w[0] = 0
    ind = C.representational_independence(model, e[0], w, b, layers=[0, 1, 2])
    assert ind.cosine == 0.0 and ind.loss < 1e-24
    torch.testing.assert_close(ind.cos_a, torch.zeros(3, 3, dtype=torch.float64), atol=1e-12, rtol=0)
    # Dependent: the same direction twice. Ablating it sends the other's cosine to 0.
    same = C.representational_independence(model, w, w, b, layers=[0, 2])
    torch.testing.assert_close(same.cos_b_ablate_a, torch.zeros(3, 2, dtype=torch.float64), atol=1e-12, rtol=0)
    cos = (x @ w) / (x.norm(dim=-1) * w.norm())
    assert same.loss == pytest.approx(2 * float(cos.square().mean()), rel=1e-9) and same.loss > 1e-3
    # Orthogonal but dependent: a has a large part of the activations, so ablating it shortens them and moves
    # cos(x, u) for a u orthogonal to a.
    z = torch.randn(64, generator=g, dtype=torch.float64)
    a = x[0] / x[0].norm() + z / z.norm()
    a = a / a.norm()
    u = torch.randn(64, generator=g, dtype=torch.float64)
    u = u - (u @ a) * a
    ortho = C.representational_independence(model, a, u, b, layers=[1])
    x_ab = x - (x @ a)[:, None] * a
    want = (x @ u) / (x_ab.norm(dim=-1) * u.norm())
    torch.testing.assert_close(ortho.cos_b_ablate_a[:, 0], want, atol=1e-12, rtol=0)
    assert abs(ortho.cosine) < 1e-12 and ortho.loss > 1e-4  # orthogonal, yet not independent


# ---------------------------------------------------------------------------------------------- bad input

def test_bad_input(llama, targets, tiny_tokenizer):
    model, _ = llama
    dim = Direction.from_raw(torch.randn(64, dtype=torch.float64), layer=1)
    r = torch.randn(64, dtype=torch.float64)
    for kw, match in ((dict(k=0), "k must be"), (dict(k=2, steps=0), "steps"), (dict(k=2, n_samples=0), "n_samples"),
                      (dict(k=1, lr=0.0), "lr"), (dict(k=2, init=torch.randn(3, 64)), "init"),
                      (dict(k=1, weights=dict(ablation=1.0)), "weights"),
                      (dict(k=1, weights=dict(ablation=-1.0, addition=0.2, retain=1.0)), "weights"),
                      (dict(k=100), "d_model")):
        with pytest.raises(ValueError, match=match):
            C.train_cone(model, targets, dim, progress=False, **kw)
    with pytest.raises(ValueError, match="Direction"):
        C.rdo(model, targets, r, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        C.rdo(model, targets, Direction.from_raw(r, layer=7), progress=False)
    no_resp = C.Targets(targets.ablation, encode(tiny_tokenizer, HARMLESS), targets.retain)
    with pytest.raises(ValueError, match="target completion"):
        C.rdo(model, no_resp, dim, progress=False)
    with pytest.raises(ValueError, match="d_model"):
        C.rdo_loss(model, torch.randn(63), targets, 1, 1.0)
    with pytest.raises(ValueError, match="zero"):
        C.rdo_loss(model, torch.zeros(64), targets, 1, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        C.cone_loss(model, torch.eye(64)[:2].double(), -torch.ones(1, 2), targets, 1, 1.0)
    with pytest.raises(ValueError, match="without responses"):
        C.make_targets(model, targets.ablation, encode(tiny_tokenizer, HARMLESS), dim)
    with pytest.raises(ValueError, match="d_model"):
        C.representational_independence(model, torch.randn(5), r, encode(tiny_tokenizer, HARMFUL))
    with pytest.raises(ValueError, match="out of range"):
        C.representational_independence(model, r, -r, encode(tiny_tokenizer, HARMFUL), layers=[3])
    with pytest.raises(ValueError, match="dims"):
        C.evaluate_cone(model, torch.randn(2, 10), targets.ablation, targets.retain, [5], 1, 1.0)
    with pytest.raises(ValueError, match="increasing"):
        C.train_cones(model, targets, dim, (3, 2))


# -------------------------------------------------------------------------------------------- training

def test_training_lowers_the_loss_and_is_seeded(llama, targets):
    model, _ = llama
    dim = Direction.from_raw(torch.randn(64, generator=torch.Generator().manual_seed(8), dtype=torch.float64),
                             layer=1)
    fit = C.rdo(model, targets, dim, steps=6, lr=0.05, batch_size=2, seed=1, progress=False)
    again = C.rdo(model, targets, dim, steps=6, lr=0.05, batch_size=2, seed=1, progress=False)
    assert torch.equal(fit.basis, again.basis) and fit.history == again.history
    assert fit.basis.shape == (1, 64) and float(fit.direction.norm()) == pytest.approx(1, abs=1e-6)
    assert fit.history[fit.best_step]["loss"] == min(h["loss"] for h in fit.history)
    assert fit.alpha == pytest.approx(dim.norm) and fit.layer == 1
    d = fit.to_direction("tiny")
    assert d.layer == 1 and d.norm == pytest.approx(dim.norm)
    cones = C.train_cones(model, targets, dim, (2, 3), steps=2, batch_size=2, n_samples=2, progress=False)
    b2, b3 = cones[2].basis, cones[3].basis
    torch.testing.assert_close(b3 @ b3.T, torch.eye(3), atol=1e-5, rtol=0)
    assert b2.shape == (2, 64) and cones[3].settings["init"] == 2
    json.dumps(fit.as_dict()), json.dumps(cones[3].as_dict())


def test_figures():
    fig = P.effect_strips({"cone k=2": [dict(ablated_score=-1.0, added_score=2.0)] * 3,
                           "random": [dict(ablated_score=5.0, added_score=-6.0)] * 3},
                          baseline=dict(harmful_score=5.5, harmless_score=-8.0), title="t")
    assert len(fig.data) == 4 and list(fig.data[0].y) == [-1.0] * 3
    rep = C.RepInd(layers=[0, 1], cos_a=torch.zeros(2, 2), cos_b=torch.ones(2, 2) * 0.5,
                   cos_a_ablate_b=torch.zeros(2, 2), cos_b_ablate_a=torch.ones(2, 2) * 0.1, cosine=0.3,
                   names=("rdo", "dim"))
    fig = P.repind_curves(rep, title="t")
    assert len(fig.data) == 4 and list(fig.data[1].y) == pytest.approx([0.1, 0.1])
    fig = P.loss_curves({"rdo": [dict(loss=2.0), dict(loss=1.0)]}, title="t")
    assert list(fig.data[0].y) == [2.0, 1.0]
    with pytest.raises(ValueError):
        P.effect_strips({}, baseline={}, title="t")


@pytest.mark.slow
def test_toy_pair_rdo_and_cones():
    """On the toy pair, a few steps of RDO from the DIM direction keep it a refusal direction, and a k=2 cone's
    samples ablate and induce refusal where random directions do not (seconds)."""
    from probes import toy
    from probes import refusal as R
    from probes.pairs import load_pair

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip("toy pair weights absent (train with python -m probes.toy.train)")
    pair = load_pair("toy", device="cpu")
    m = pair.instruct
    enc = lambda kind, split: pair.encode(toy.prompts(kind, split))  # noqa: E731
    ids = R.refusal_tokens(pair.tokenizer)
    cands = R.candidates(m, enc("harmful", "train"), enc("harmless", "train"), progress=False)
    dim = cands.direction(2, -1)  # the toy's selected DIM candidate (probes.refusal.select)
    targets = C.make_targets(m, enc("harmful", "train")[:32], enc("harmless", "train")[:32], dim, max_new_tokens=8,
                             progress=False)
    assert all(t.startswith("sorry") for t in targets.addition.responses)
    assert not any("sorry" in t for t in targets.ablation.responses)
    test_harm, test_less = enc("harmful", "test")[:24], enc("harmless", "test")[:24]
    fit = C.rdo(m, targets, dim, steps=4, init=dim.vector, progress=False)
    eff = C.direction_effects(m, fit.basis.double(), test_harm, test_less, ids, dim.layer, dim.norm, progress=False)[0]
    assert eff["ablated_rate"] <= 0.1 and eff["added_rate"] >= 0.9
    cone = C.train_cone(m, targets, dim, 2, steps=4, n_samples=2, init=dim.vector, progress=False)
    ev = C.evaluate_cone(m, cone.basis, test_harm, test_less, ids, dim.layer, dim.norm, n=4, progress=False)
    s, r = ev.as_dict()["samples"], ev.as_dict()["random"]
    assert s["ablated_score"]["mean"] < r["ablated_score"]["mean"] - 3
    assert s["added_score"]["mean"] > r["added_score"]["mean"] + 3
    assert r["ablated_rate"]["min"] >= 0.9 and r["added_rate"]["max"] <= 0.1
