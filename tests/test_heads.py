"""Causal head ranking (probes.heads) against hand computations on raw HF models, and on the toy pair."""
from __future__ import annotations

import json

import pytest
import torch

import tiny
from probes import attention as A
from probes import heads as H
from probes.chat import encode
from probes.generation import generate
from probes.plots import attention as P
from test_attention import HARMFUL, HARMLESS, hf_forward, hf_head_inputs, hf_patched_last_logits
from test_generation import hf_greedy


@pytest.fixture(scope="module")
def sets(tiny_tokenizer):
    return encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)


@pytest.fixture(scope="module")
def score(tiny_tokenizer):
    return A.logodds_score(tiny_tokenizer(["sorry"], add_special_tokens=False)["input_ids"][0])


def hand_attribution(hf, target, source, score, steps: int) -> torch.Tensor:
    """`[prompt, layer, head]` by HF o_proj pre-hooks: gradient of the score with respect to each o_proj input at
    the post-instruction positions, times (harmless mean - harmful value); for steps > 1 the gradient averaged at
    the midpoints of the path on which every o_proj input there moves towards its mean."""
    d_head, n_heads = hf.config.head_dim, hf.config.num_attention_heads
    src_pos, tgt_pos = source.positions("post_instruction")[0], target.positions("post_instruction")[0]
    rows_s, rows_t = torch.arange(len(source))[:, None], torch.arange(len(target))[:, None]
    means = [x[rows_s, src_pos].double().mean(0) for x in hf_head_inputs(hf, source)]  # [k, H*d] per layer
    x0 = [x[rows_t, tgt_pos].double() for x in hf_head_inputs(hf, target)]  # [b, k, H*d] per layer

    def grads_at(alpha: float) -> list[torch.Tensor]:
        seen = []

        def pre(mod, args, li):
            x = args[0].clone()
            if alpha:
                x[rows_t, tgt_pos] = (x0[li] + alpha * (means[li] - x0[li])).float()
            seen.append(x)
            return (x,)

        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, li=li: pre(m, a, li))
                 for li, layer in enumerate(hf.model.layers)]
        try:
            with torch.enable_grad():
                pos = (target.attention_mask.cumsum(-1) - 1).clamp(min=0)  # as hf_forward, with autograd on
                s = score(hf(target.input_ids, attention_mask=target.attention_mask, position_ids=pos).logits[:, -1])
                g = torch.autograd.grad(s.sum(), seen)
        finally:
            for h in hooks:
                h.remove()
        return [gi[rows_t, tgt_pos].double() for gi in g]

    alphas = [0.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
    paths = [grads_at(a) for a in alphas]
    out = torch.zeros(len(target), len(means), n_heads, dtype=torch.float64)
    for li in range(len(means)):
        g = sum(p[li] for p in paths) / len(paths)
        prod = (g * (means[li] - x0[li])).reshape(len(target), -1, n_heads, d_head)
        out[:, li] = prod.sum((1, 3))
    return out


@pytest.mark.parametrize("steps", [1, 3])
def test_attribution_equals_hand_gradient_times_difference(llama, sets, score, steps):
    model, hf = llama
    target, source = sets
    att = H.head_attribution(model, target, source, score, steps=steps, batch_size=2, progress=False)
    hand = hand_attribution(hf, target, source, score, steps)
    assert att.per_prompt.shape == (3, 3, 4)
    torch.testing.assert_close(att.per_prompt, hand, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(att.clean, score(hf_forward(hf, target).logits[:, -1]), atol=1e-5, rtol=0)
    assert float(hand.abs().max()) > 1e-3  # a measurable attribution on random weights
    # No weight was given a gradient.
    assert all(p.grad is None for p in model.parameters())


def test_path_attribution_is_complete(llama, sets, score):
    """Integrated gradients' completeness: over all heads together, the attributions sum to the true change in
    score when every head's template output takes its harmless mean (up to the Riemann error of the path)."""
    model, _ = llama
    target, source = sets
    att = H.head_attribution(model, target, source, score, steps=48, progress=False)
    joint = A.head_patching(model, target, source, H.all_heads(model), score_fn=score, progress=False)
    total = att.per_prompt.sum((1, 2))
    true = joint.patched - joint.clean
    assert float(true.abs().min()) > 0.05
    torch.testing.assert_close(total, true, atol=0, rtol=0.01)


def test_template_patching_is_per_head_patching(llama, sets, score):
    model, _ = llama
    target, source = sets
    effects = H.template_patching(model, target, source, score, progress=False)
    heads = [(0, 1), (2, 3)]
    res = A.head_patching(model, target, source, heads, score_fn=score, individually=True, progress=False)
    for h in heads:
        torch.testing.assert_close(effects.per_prompt[:, h[0], h[1]], res.per_head[h] - res.clean, atol=1e-9, rtol=0)
    assert effects.per_prompt.shape == (3, 3, 4)


def hf_ablated(hf, b, chosen, values) -> torch.Tensor:
    d_head = hf.config.head_dim

    def fn(layer, x):
        x = x.clone()
        for lh, h in chosen:
            if lh == layer:
                x[:, :, h * d_head:(h + 1) * d_head] = values[(lh, h)]
        return x
    return fn


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablation_matches_hf(llama, sets, score, method):
    model, hf = llama
    target, reference = sets
    heads = [(1, 2), (0, 0), (2, 1)]
    values = H.ablation_values(model, heads, method, reference, batch_size=2, progress=False)
    d_head = hf.config.head_dim
    if method == "mean":  # by hand: the o_proj input averaged over every real token of the reference prompts
        ins = hf_head_inputs(hf, reference)
        real = reference.attention_mask.bool()
        hand = {(lh, h): ins[lh][real][:, h * d_head:(h + 1) * d_head].double().mean(0).float() for lh, h in heads}
    else:
        hand = {h: torch.zeros(d_head) for h in heads}
    for h in heads:
        torch.testing.assert_close(values[h], hand[h], atol=1e-6, rtol=0)
    res = H.head_ablation(model, target, heads, values, score, progress=False)
    expected = score(hf_patched_last_logits(hf, target, hf_ablated(hf, target, heads, hand)))
    torch.testing.assert_close(res.scores, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.clean, score(hf_forward(hf, target).logits[:, -1]), atol=1e-5, rtol=0)
    assert float((res.scores - res.clean).abs().max()) > 1e-3  # the ablation changes something


def test_ablated_generation_matches_hf(llama, sets, score):
    """The ablation holds on every generated token: cached generation under the hooks = HF greedy decoding with
    the same o_proj edit at every position, recomputed without a cache."""
    model, hf = llama
    target, reference = sets
    heads = [(0, 3), (1, 1)]
    values = H.ablation_values(model, heads, "mean", reference, progress=False)
    ours = generate(model, target, 5, H.ablation_hooks(heads, values), stop_ids=[], progress=False).tokens
    edit = hf_ablated(hf, target, heads, values)
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, li=li: (edit(li, a[0]),))
             for li, layer in enumerate(hf.model.layers)]
    try:
        ref = hf_greedy(hf, target.input_ids, target.attention_mask, 5)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, generate(model, target, 5, stop_ids=[], progress=False).tokens)


def test_minimal_set_stops_at_the_first_prefix_under_the_threshold(llama, sets, score):
    model, _ = llama
    target, reference = sets
    ranking = [(2, 0), (1, 3), (0, 2), (2, 2), (1, 0)]
    values = H.ablation_values(model, ranking, "zero", progress=False)
    hand = [H.head_ablation(model, target, ranking[:i], values, score, progress=False).first_token_rate
            for i in range(1, 6)]
    stop = next((i for i, r in enumerate(hand) if r <= hand[2]), None)  # threshold: the rate after three heads
    res = H.minimal_ablation_set(model, target, ranking, values, score, threshold=hand[2], progress=False)
    assert res.found and res.heads == ranking[: stop + 1] and res.rates == hand[: stop + 1]
    never = H.minimal_ablation_set(model, target, ranking, values, score, threshold=-1.0, max_heads=4,
                                   progress=False)
    assert not never.found and never.heads == [] and never.tried == 4 and never.rates == hand[:4]


def test_rankings_and_overlap():
    assert H.rank_correlation(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    # Ties take their average rank: ranks [1.5, 1.5, 3] vs [1, 2, 3] -> Pearson 1.5 / sqrt(1.5 * 2).
    assert H.rank_correlation(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(1.5 / 3**0.5)
    assert H.rank_correlation(torch.tensor([[3.0, 1], [2, 0]]), -torch.tensor([[3.0, 1], [2, 0]])) == pytest.approx(-1)
    scores = torch.tensor([[0.5, -2.0], [-1.0, 0.1]])
    assert H.top_heads(scores, 2) == [(0, 1), (1, 0)]
    assert H.jaccard([(0, 1), (1, 0)], [(1, 0), (1, 1)]) == pytest.approx(1 / 3)
    agree = H.agreement(scores, scores * 2, 1)
    assert agree["spearman"] == pytest.approx(1) and agree["top_k_jaccard"] == 1.0
    assert agree["max_abs_error"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        H.rank_correlation(torch.zeros(3), torch.zeros(4))


def test_random_control_heads(llama):
    model, _ = llama
    top = [(0, 0), (1, 1)]
    a = H.random_heads(model, 4, exclude=top, seed=3)
    assert a == H.random_heads(model, 4, exclude=top, seed=3) and len(set(a)) == 4 and not set(a) & set(top)
    assert a != H.random_heads(model, 4, exclude=top, seed=4)
    with pytest.raises(ValueError, match="control heads"):
        H.random_heads(model, 11, exclude=top)


def test_bad_input(llama, sets, score):
    model, _ = llama
    target, source = sets
    with pytest.raises(ValueError, match="steps"):
        H.head_attribution(model, target, source, score, steps=0)
    with pytest.raises(ValueError, match="differentiable"):
        H.head_attribution(model, target, source, lambda logits: score(logits).detach(), progress=False)
    with pytest.raises(ValueError, match="ablation"):
        H.ablation_values(model, [(0, 0)], "noise")
    with pytest.raises(ValueError, match="reference"):
        H.ablation_values(model, [(0, 0)], "mean")
    with pytest.raises(ValueError, match="out of range"):
        H.ablation_values(model, [(9, 0)], "zero")


def test_head_figures():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    fig = P.head_score_heatmaps({"attribution": a, "patching": b}, title="t")
    assert len(fig.data) == 2 and fig.data[0].zmid == 0
    assert fig.data[0].zmax == fig.data[1].zmax == pytest.approx(float(torch.cat([a, b]).abs().max()))
    assert int(fig.data[0].customdata[torch.argmin(a).item() // 4][torch.argmin(a).item() % 4]) == 1
    with pytest.raises(ValueError):
        P.head_score_heatmaps({"a": a, "b": torch.randn(2, 4)}, title="t")
    fig = P.ablation_bars([dict(name="L1H3", effect=-2.0, sem=0.1, rate=0.2),
                           dict(name="random", effect=0.1, sem=0.1, rate=1.0, control=True)], title="t",
                          clean_rate=1.0)
    assert list(fig.data[1].y) == [0.2, 1.0] and list(fig.data[0].marker.pattern.shape) == ["", "/"]


@pytest.mark.slow
def test_causal_ranking_on_toy_pair(tmp_path):
    """On the toy pair the attention-shift ranking misses the heads that carry refusal; the causal one finds them:
    its top heads' patching and ablation beat random control heads, and the smallest ablated set removes refusal."""
    from probes import toy

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip("toy pair weights absent (train with python -m probes.toy.train)")
    main = tiny.load_experiment("template_attention").main
    out = tmp_path / "toy"
    main(["--pair", "toy", "--out", str(out), "--device", "cpu", "--limit", "32", "--patch-prompts", "16"])
    r = json.loads((out / "results.json").read_text())
    p, s, ab = r["patching"], r["shift_patching"], r["ablation"]
    assert p["ranked_by"] == "attribution"
    # Patching: the causal top heads move the score far more than the random control and the top-shift heads.
    assert p["effect"] < p["control_effect"] - 10 * (p["effect_sem"] + p["control_effect_sem"])
    assert p["effect"] < s["effect"] - 10 * (p["effect_sem"] + s["effect_sem"])
    # Ablation: the top set removes refusal, the random set of the same size leaves it.
    assert ab["clean"]["refusal_rate"] >= 0.9
    assert ab["top_set"]["refusal_rate"] <= 0.1 and ab["control_set"]["refusal_rate"] >= 0.9
    assert ab["minimal_set"]["found"] and ab["minimal_set"]["refusal_rate"] <= 0.1
    assert ab["minimal_set"]["n_heads"] <= 5
    # The reported check: attribution on the subset against true per-head patching there.
    agree = r["agreement"]["attribution_vs_patching"]
    truth = torch.tensor(r["template_patching"]["instruct"])
    assert truth.shape == (r["n_layers"], r["n_heads"])
    # `auto`: plain and 8-point attribution both checked on the subset, the better-agreeing one ranks.
    tried = {1: r["agreement"]["plain_attribution_vs_patching"], 8: r["agreement"]["8_point_attribution_vs_patching"]}
    assert r["attribution"]["steps_tried"] == [1, 8] and r["attribution"]["steps_chosen"]
    assert agree == tried[r["attribution"]["steps"]]
    assert agree["spearman"] == max(t["spearman"] for t in tried.values())
    assert -1 <= r["base_vs_instruct"]["spearman"] <= 1
    # Sink: the BOS mass and the masses renormalised without it (rows sum to 1 over the other regions).
    for which in ("base", "instruct"):
        free = r["mass_without_sink"][which]["harmful"]
        total = sum(torch.tensor(v) for v in free.values())
        torch.testing.assert_close(total, torch.ones(r["n_layers"], r["n_heads"], dtype=total.dtype), atol=1e-5,
                                   rtol=0)
    for name in ("head_attribution_vs_patching", "head_attribution_base_vs_instruct", "head_ablation", "sink_mass",
                 "shift_without_sink_instruct", "patching"):
        assert (out / f"{name}.html").exists()
