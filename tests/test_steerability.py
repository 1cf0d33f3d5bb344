"""Per-prompt steerability (probes.steerability) against raw HF forwards, hand fits and planted cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from probes import steerability as S
from probes.chat import encode
from probes.directions import Direction
from probes.plots import steerability as P
from probes.refusal import refusal_tokens
from test_attention import HARMFUL, HARMLESS
from test_directions import hf_ablation, hf_edit_layer_input, hf_logits
from test_refusal import hand_score


@pytest.fixture(scope="module")
def setup(llama, tiny_tokenizer):
    """Harmful and harmless batches, refusal tokens, and a direction: the harmful - harmless mean of hidden_states[2]
    at the last token, computed on the HF model."""
    _, hf = llama
    harm, less = encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)
    ids = refusal_tokens(tiny_tokenizer, ["sorry", "cannot"])
    pos = lambda b: (b.attention_mask.cumsum(-1) - 1).clamp(min=0)  # noqa: E731
    with torch.no_grad():
        hs = [hf(b.input_ids, attention_mask=b.attention_mask, position_ids=pos(b), output_hidden_states=True)
              .hidden_states[2][:, -1].double().mean(0) for b in (harm, less)]
    return harm, less, ids, Direction.from_raw(hs[0] - hs[1], layer=2, model="tiny")


def test_per_prompt_changes_equal_hf_pre_hook(llama, setup):
    model, hf = llama
    harm, less, ids, d = setup
    coeffs = [-1.0, 0.5, 2.0]
    st = S.steerability(model, d, 2, less, ids, coeffs=coeffs, ablate=True, batch_size=2, progress=False)
    base = hand_score(hf_logits(hf, less)[:, -1], ids)
    torch.testing.assert_close(st.baseline, base, atol=1e-4, rtol=0)
    for ci, c in enumerate(coeffs):
        with hf_edit_layer_input(hf, 2, lambda x, c=c: x + (c * d.raw).to(x.dtype)):
            got = hand_score(hf_logits(hf, less)[:, -1], ids)
        torch.testing.assert_close(st.added[ci], got - base, atol=1e-4, rtol=0)
    with hf_ablation(hf, "llama", d.raw):
        abl = hand_score(hf_logits(hf, less)[:, -1], ids)
    torch.testing.assert_close(st.ablated, abl - base, atol=1e-4, rtol=0)
    assert float(st.added.abs().max()) > 1e-2 and st.norm == pytest.approx(d.norm)
    assert st.added.shape == (3, 3) and st.ablated.shape == (3,)


def test_slope_equals_hand_least_squares(llama, setup):
    model, _ = llama
    harm, less, ids, d = setup
    st = S.steerability(model, d, 2, harm, ids, coeffs=[-2.0, -1.0, -0.25], progress=False)
    xs = [0.0, -2.0, -1.0, -0.25]
    ys = torch.cat([st.baseline[None], st.baseline[None] + st.added]).numpy()
    hand = [np.polyfit(xs, ys[:, p], 1)[0] for p in range(ys.shape[1])]
    np.testing.assert_allclose(st.slopes.numpy(), hand, rtol=1e-9, atol=1e-9)
    # A planted line: slope 3 exactly, and 1/2 and -1 for two more prompts.
    c = [0.0, 0.5, 1.0, 2.0]
    scores = torch.tensor([[1.0, 2.5, 4.0, 7.0], [0.0, 0.25, 0.5, 1.0], [5.0, 4.5, 4.0, 3.0]]).T
    torch.testing.assert_close(S.slopes(c, scores), torch.tensor([3.0, 0.5, -1.0], dtype=torch.float64))


def planted_steerability() -> S.Steerability:
    """Four prompts, coefficients -1, 1, 2: at -1 one prompt's score rises (wrong way), at +1 two fall, at +2 one;
    under ablation three of four rise. Prompt 3's line falls: it alone has a negative slope."""
    added = torch.tensor([[-1.0, -2.0, 1.0, -0.5],  # [coeff, prompt]; column 2 is the anti-steerable prompt
                          [1.0, -0.5, -1.0, 2.0],
                          [2.0, 1.0, -2.0, 3.0]], dtype=torch.float64)
    return S.Steerability("planted", 1, 1.0, [-1.0, 1.0, 2.0], torch.zeros(4, dtype=torch.float64), added,
                          torch.tensor([0.1, -0.2, 0.3, 0.4], dtype=torch.float64), model="planted")


def test_wrong_way_fractions_on_a_planted_case():
    st = planted_steerability()
    w = st.wrong_way()
    # -1: prompt 2 rises (1.0 > 0) -> 1/4; +1: prompts 1 and 2 fall -> 2/4; +2: prompt 2 falls (-2) -> 1/4.
    assert w["added"] == [0.25, 0.5, 0.25]
    assert w["ablated"] == 0.75
    assert w["slope"] == 0.25 and float(st.slopes[2]) < 0 and bool((st.slopes[[0, 1, 3]] > 0).all())
    q = st.quantiles([0.0, 0.5, 1.0])
    np.testing.assert_allclose(q["added"], np.quantile(st.added.numpy(), [0.0, 0.5, 1.0], axis=1).T)
    np.testing.assert_allclose(q["ablated"], np.quantile(st.ablated.numpy(), [0.0, 0.5, 1.0]))
    d = st.as_dict()
    json.dumps(d)
    assert d["n"] == 4 and d["mean_change"] == st.added.mean(-1).tolist()


def test_refusal_steerability_runs_both_sets(llama, setup):
    model, _ = llama
    harm, less, ids, d = setup
    rep = S.refusal_steerability(model, d, 2, harm, less, ids, coeffs=[0.5, 1.0], progress=False)
    assert rep.harmless.coeffs == [0.5, 1.0] and rep.harmless.ablated is None
    assert rep.harmful.coeffs == [-0.5, -1.0] and rep.harmful.ablated is not None
    direct = S.steerability(model, d, 2, harm, ids, coeffs=[-0.5, -1.0], ablate=True, progress=False)
    torch.testing.assert_close(rep.harmful.added, direct.added, atol=0, rtol=0)
    json.dumps(rep.as_dict())


def test_bad_input(llama, setup):
    model, _ = llama
    harm, less, ids, d = setup
    for bad, msg in (([], "no coefficients"), ([0.0, 1.0], "baseline"), ([1.0, 1.0], "repeat"),
                     ([float("inf")], "non-finite")):
        with pytest.raises(ValueError, match=msg):
            S.steerability(model, d, 2, less, ids, coeffs=bad, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        S.steerability(model, d, 9, less, ids, progress=False)
    with pytest.raises(ValueError, match="d_model"):
        S.steerability(model, torch.ones(5), 1, less, ids, progress=False)
    with pytest.raises(ValueError, match="1-D"):
        S.steerability(model, torch.ones(2, 64), 1, less, ids, progress=False)
    with pytest.raises(ValueError, match="zero"):
        S.steerability(model, torch.zeros(64), 1, less, ids, progress=False)
    with pytest.raises(ValueError, match="no prompts"):
        S.steerability(model, d, 2, less[[]], ids, progress=False)
    with pytest.raises(ValueError, match="magnitudes"):
        S.refusal_steerability(model, d, 2, harm, less, ids, coeffs=[-1.0], progress=False)
    with pytest.raises(ValueError, match="two distinct"):
        S.slopes([1.0], torch.zeros(1, 3))


def test_figures():
    a = planted_steerability().as_dict()
    b = dict(a, name="other", coeffs=[1.0, 2.0], changes=a["changes"][1:], ablation=None,
             wrong_way=dict(a["wrong_way"], added=a["wrong_way"]["added"][1:], ablated=None))
    fig = P.change_distributions({"harmful": a, "harmless": b})
    assert [t.name for t in fig.data] == ["harmful (n=4)", "harmless (n=4)"]
    assert fig.layout.violinmode == "group"
    assert list(fig.layout.xaxis.categoryarray) == ["ablate", "-1", "+1", "+2"]
    assert list(fig.data[0].x).count("ablate") == 4 and "ablate" not in list(fig.data[1].x)
    assert len(fig.data[0].y) == 16 and len(fig.data[1].y) == 8
    assert list(fig.data[1].y[:4]) == a["changes"][1]
    fig = P.slope_distributions({"harmful": a})
    assert fig.data[0].name == "harmful: 25% anti-steerable" and len(fig.data[0].y) == 4
    with pytest.raises(ValueError):
        P.change_distributions({})


@pytest.mark.slow
def test_toy_pair_steerability():
    """The toy instruct model's chosen direction (layer 2, post_instruction[-1]): at 1x its raw difference every
    harmless test prompt moves towards refusal, and ablation lowers every harmful prompt's score."""
    from probes import harmfulness as H
    from probes import toy
    from probes.pairs import load_pair

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip(f"the toy pair's weights are not in {toy.path()}")
    pair = load_pair("toy", device="cpu")
    tr_h, tr_l = pair.encode(toy.prompts("harmful", "train")), pair.encode(toy.prompts("harmless", "train"))
    te_h, te_l = pair.encode(toy.prompts("harmful", "test")), pair.encode(toy.prompts("harmless", "test"))
    ids = refusal_tokens(pair.tokenizer, ["sorry"])
    d = H.directions(pair.instruct, tr_h, tr_l, progress=False).direction("refusal", 2)
    rep = S.refusal_steerability(pair.instruct, d, 2, te_h, te_l, ids, progress=False)
    w_less, w_harm = rep.harmless.wrong_way(), rep.harmful.wrong_way()
    assert w_less["added"][rep.harmless.coeffs.index(1.0)] == 0.0
    assert w_harm["ablated"] == 0.0
