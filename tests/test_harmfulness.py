"""Harmfulness vs refusal directions (probes.harmfulness) against raw HF forwards, planted cases and the toy pair."""
from __future__ import annotations

import json
import math

import pytest
import torch

from probes import harmfulness as H
from probes.chat import encode
from probes.directions import cosine
from probes.plots import harmfulness as P
from probes.refusal import refusal_tokens
from test_attention import HARMFUL, HARMLESS
from test_directions import hf_ablation, hf_edit_layer_input, hf_logits
from test_refusal import hand_score

# The tiny ChatML template ends "<|im_end|> <|im_start|> assistant": in every left-padded row the last 3 tokens are
# the post-instruction template, so t_post-inst is column -1 and t_inst (the user's last word) column -4.
T_INST, T_POST, N_POST = -4, -1, 3


@pytest.fixture(scope="module")
def sets(tiny_tokenizer):
    return encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)


@pytest.fixture(scope="module")
def ids(tiny_tokenizer):
    return refusal_tokens(tiny_tokenizer, ["sorry", "cannot"])


@pytest.fixture(scope="module")
def dirs(llama, sets):
    return H.directions(llama[0], *sets, batch_size=2, progress=False)


def hf_hidden(hf, b) -> list[torch.Tensor]:
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(b.input_ids, attention_mask=b.attention_mask, position_ids=pos, output_hidden_states=True).hidden_states


def test_directions_equal_hand_diff_of_means(llama, sets, dirs):
    _, hf = llama
    harm, less = sets
    hs_h, hs_l = hf_hidden(hf, harm), hf_hidden(hf, less)
    for layer in range(3):  # hidden_states[l] is resid_pre of block l
        h = hs_h[layer][:, T_INST].double().mean(0) - hs_l[layer][:, T_INST].double().mean(0)
        r = hs_h[layer][:, T_POST].double().mean(0) - hs_l[layer][:, T_POST].double().mean(0)
        torch.testing.assert_close(dirs.harmfulness[layer], h, atol=1e-5, rtol=0)
        torch.testing.assert_close(dirs.refusal[layer], r, atol=1e-5, rtol=0)
        if layer > 0:
            assert float(dirs.cosine()[layer]) == pytest.approx(float(h @ r / (h.norm() * r.norm())), abs=1e-5)
            assert float(dirs.norms()["harmfulness"][layer]) == pytest.approx(float(h.norm()), abs=1e-5)
    # resid_pre of block 0 at t_post-inst is the embedding of "assistant" in every prompt: no refusal direction.
    assert float(dirs.refusal[0].norm()) == 0 and math.isnan(float(dirs.cosine()[0]))
    d = dirs.as_dict()
    assert d["cosine"][0] is None and d["counts"] == {"harmful": 3, "harmless": 3}
    json.dumps(d)
    got = dirs.direction("harmfulness", 2)
    assert got.position == "user[-1]" and got.layer == 2
    assert float(got.vector.double() @ dirs.harmfulness[2]) == pytest.approx(float(dirs.harmfulness[2].norm()), rel=1e-6)


def planted(n: int = 200, d: int = 32, cos: float = 0.4, seed: int = 0):
    """Activations `[n, layer=2, 2, d]` with a harmfulness direction h planted at t_inst (every harmful prompt) and
    a refusal direction r at t_post-inst (only the first half of the harmful prompts), cos(h, r) = `cos`. The same
    h and r for every seed; `seed` draws the noise."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    g = torch.Generator().manual_seed(100 + seed)
    h, e = q[:, 0], q[:, 1]
    r = cos * h + math.sqrt(1 - cos**2) * e

    def noise():
        return 0.05 * torch.randn(n, 2, 2, d, generator=g, dtype=torch.float64)

    harmful, harmless = noise(), noise()
    harmful[:, :, 0] += 2 * h
    harmful[: n // 2, :, 1] += 2 * r
    return harmful, harmless, h, r


def test_planted_directions_are_recovered_with_their_cosine():
    harmful, harmless, h, r = planted()
    dirs = H.Directions.from_means(harmful.mean(0), harmless.mean(0), [0, 1])
    for layer in range(2):
        assert float(cosine(dirs.harmfulness[layer], h)) > 0.99
        assert float(cosine(dirs.refusal[layer], r)) > 0.99
    torch.testing.assert_close(dirs.cosine(), torch.full((2,), 0.4, dtype=torch.float64), atol=0.02, rtol=0)
    # Held-out prompts from the same planted law: harmfulness separates every prompt; the refusal direction only
    # the harmful half that carries it (the other half sits with the harmless prompts).
    test_h, test_l, _, _ = planted(seed=1)
    sep = H.Separability.from_activations(dirs, test_h, test_l)
    assert sep.fractions["harmfulness"]["harmful"].tolist() == [1.0, 1.0]
    assert sep.fractions["harmfulness"]["balanced"].tolist() == [1.0, 1.0]
    assert sep.fractions["refusal"]["harmful"].tolist() == [0.5, 0.5]
    assert sep.fractions["refusal"]["harmless"].tolist() == [1.0, 1.0]
    assert sep.fractions["refusal"]["balanced"].tolist() == [0.75, 0.75]
    json.dumps(sep.as_dict())


def test_separability_equals_hand_projection(llama, sets, dirs, tiny_tokenizer):
    _, hf = llama
    test_h = encode(tiny_tokenizer, ["steal a car", "how do i build a bomb please", "help me make a bomb"])
    test_l = encode(tiny_tokenizer, ["bake a cake", "tell me about the sky", "what is the moon"])
    sep = H.separability(llama[0], dirs, test_h, test_l, batch_size=2, progress=False)
    hs_h, hs_l = hf_hidden(hf, test_h), hf_hidden(hf, test_l)
    harm, less = sets
    tr_h, tr_l = hf_hidden(hf, harm), hf_hidden(hf, less)
    for kind, col in (("harmfulness", T_INST), ("refusal", T_POST)):
        for layer in range(1, 3):
            mh, ml = tr_h[layer][:, col].double().mean(0), tr_l[layer][:, col].double().mean(0)
            u = (mh - ml) / (mh - ml).norm()
            mid = float((mh + ml) / 2 @ u)
            above = float(((hs_h[layer][:, col].double() @ u) > mid).double().mean())
            below = float(((hs_l[layer][:, col].double() @ u) < mid).double().mean())
            assert float(sep.fractions[kind]["harmful"][layer]) == above
            assert float(sep.fractions[kind]["harmless"][layer]) == below
    assert math.isnan(float(sep.fractions["refusal"]["balanced"][0]))


@pytest.mark.parametrize("positions", H.STEER_POSITIONS)
def test_steering_equals_hf_pre_hook(llama, sets, dirs, ids, positions):
    model, hf = llama
    _, less = sets
    layer, coeffs = 1, [0.5, 2.0]
    st = H.steering(model, dirs, layer, less, ids, coeffs=coeffs, positions=positions, batch_size=2, progress=False)
    seq = less.seq_len
    col = torch.arange(seq)[None, :].expand(len(less), seq)
    real = less.attention_mask.bool()
    mask = {"all": real, "instruction": real & (col < seq - N_POST), "post_instruction": col >= seq - N_POST}[positions]
    base = hand_score(hf_logits(hf, less)[:, -1], ids)
    torch.testing.assert_close(st.baseline, base, atol=1e-4, rtol=0)
    scale = float(dirs.refusal[layer].norm())
    assert st.scale == pytest.approx(scale)
    for kind in H.KINDS:
        raw = dirs.raw(kind)[layer]
        for ci, c in enumerate(coeffs):
            vec = (c * scale * raw / raw.norm()).float()
            with hf_edit_layer_input(hf, layer, lambda x, vec=vec: x + mask[..., None].to(x.dtype) * vec):
                steered = hand_score(hf_logits(hf, less)[:, -1], ids)
            torch.testing.assert_close(st.changes[kind][ci], steered - base, atol=1e-4, rtol=0)
    assert float(st.changes["refusal"].abs().max()) > 1e-2  # the steering does something on random weights
    mean = st.mean_change()
    assert mean["harmfulness"].shape == (2,)
    json.dumps(st.as_dict())


def test_ablation_projection_equals_hf(llama, sets, dirs, ids):
    model, hf = llama
    harm, less = sets
    pres = H.ablation_projection(model, dirs, 2, harm, less, token_ids=ids, batch_size=2, progress=False)
    r = dirs.refusal[2]
    r_hat = r / r.norm()
    assert pres.layers == [0, 1, 2]
    for name, b in (("harmful", harm), ("harmless", less)):
        clean = hf_hidden(hf, b)
        with hf_ablation(hf, "llama", r.float()):
            ablated = hf_hidden(hf, b)
            if name == "harmful":
                abl_score = hand_score(hf_logits(hf, b)[:, -1], ids).mean()
        for layer in range(3):
            h_hat = dirs.harmfulness[layer] / dirs.harmfulness[layer].norm()
            perp = h_hat - (h_hat @ r_hat) * r_hat
            perp = perp / perp.norm()
            for state, hs in (("clean", clean), ("ablated", ablated)):
                x = hs[layer][:, T_INST].double()
                torch.testing.assert_close(pres.projection[name][state][:, layer], x @ h_hat, atol=1e-5, rtol=0)
                torch.testing.assert_close(pres.orthogonal[name][state][:, layer], x @ perp, atol=1e-5, rtol=0)
            # Ablation leaves nothing along r̂ at t_inst.
            assert float((ablated[layer][:, T_INST].double() @ r_hat).abs().max()) < 1e-5
    assert pres.scores["harmful_ablated"] == pytest.approx(float(abl_score), abs=1e-4)
    assert pres.scores["harmful_clean"] == pytest.approx(float(hand_score(hf_logits(hf, harm)[:, -1], ids).mean()),
                                                         abs=1e-4)
    m = pres.means()
    kept = (m["harmful"]["ablated"] - m["harmless"]["ablated"]) / (m["harmful"]["clean"] - m["harmless"]["clean"])
    torch.testing.assert_close(pres.separation_kept(), kept)
    json.dumps(pres.as_dict())


def test_bad_input(llama, sets, dirs, ids, tiny_tokenizer):
    model, _ = llama
    harm, less = sets
    with pytest.raises(ValueError, match="non-empty"):
        H.directions(model, harm[[]], less, progress=False)
    with pytest.raises(ValueError, match="layer, 2, d_model"):
        H.Directions.from_means(torch.zeros(3, 2, 8), torch.zeros(3, 3, 8), [0, 1, 2])
    with pytest.raises(ValueError, match="layer labels"):
        H.Directions.from_means(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), [0, 1])
    with pytest.raises(ValueError, match="unknown direction"):
        dirs.raw("harm")
    with pytest.raises(ValueError, match="activations must be"):
        H.Separability.from_activations(dirs, torch.zeros(2, 3, 1, 64), torch.zeros(2, 3, 2, 64))
    with pytest.raises(ValueError, match="unknown steering positions"):
        H.steering(model, dirs, 1, less, ids, positions="user", progress=False)
    with pytest.raises(ValueError, match="no directions at layer"):
        H.steering(model, dirs, 5, less, ids, progress=False)
    with pytest.raises(ValueError, match="zero at layer 0"):
        H.steering(model, dirs, 0, less, ids, progress=False)
    for bad, msg in (([], "no coefficients"), ([1.0, 1.0], "repeat"), ([float("nan")], "non-finite")):
        with pytest.raises(ValueError, match=msg):
            H.steering(model, dirs, 1, less, ids, coeffs=bad, progress=False)
    with pytest.raises(ValueError, match="zero or non-finite"):
        H.ablation_projection(model, dirs, 0, harm, less, progress=False)  # no refusal direction at layer 0
    with pytest.raises(ValueError, match="out of range"):
        H.steering_hooks(model, torch.zeros(64), 7, torch.ones(1, 1, dtype=torch.bool))


def test_figures(dirs):
    sep = H.Separability.from_activations(dirs, torch.randn(4, 3, 2, 64), torch.randn(4, 3, 2, 64))
    fig = P.geometry({"instruct": dirs.as_dict(), "base": dirs.as_dict()}, {"instruct": sep.as_dict()})
    names = [t.name for t in fig.data]
    assert names.count("instruct: cosine") == 1 and "base: refusal norm" in names
    assert "instruct: harmfulness separation" in names and "base: harmfulness separation" not in names
    st = H.Steering(1, [0.5, 1.0], "all", 2.0, torch.zeros(3),
                    {"harmfulness": torch.ones(2, 3), "refusal": 2 * torch.ones(2, 3)})
    fig = P.steering_effects({"instruct": st.as_dict()})
    assert [t.name for t in fig.data] == ["instruct: harmfulness (layer 1, all)", "instruct: refusal (layer 1, all)"]
    assert list(fig.data[1].y) == [2.0, 2.0]
    with pytest.raises(ValueError):
        P.geometry({})


@pytest.mark.slow
def test_toy_pair_harmfulness_and_refusal():
    """The toy pair's geometry: both models separate harmful from harmless at t_inst on held-out prompts; the
    directions are distinct (cosine well below 1); at the same norm, the refusal direction moves the instruct
    model's refusal score more than the harmfulness direction; ablating refusal keeps most of the separation."""
    from probes import toy
    from probes.pairs import load_pair

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip(f"the toy pair's weights are not in {toy.path()}")
    pair = load_pair("toy", device="cpu")
    tr_h, tr_l = pair.encode(toy.prompts("harmful", "train")), pair.encode(toy.prompts("harmless", "train"))
    te_h, te_l = pair.encode(toy.prompts("harmful", "test")), pair.encode(toy.prompts("harmless", "test"))
    ids = refusal_tokens(pair.tokenizer, ["sorry"])
    for which in ("base", "instruct"):
        d = H.directions(pair[which], tr_h, tr_l, progress=False)
        sep = H.separability(pair[which], d, te_h, te_l, progress=False)
        assert float(sep.fractions["harmfulness"]["balanced"][1:].min()) >= 0.9
        assert float(d.cosine()[1:].max()) < 0.7
    st = H.steering(pair.instruct, d, 2, te_l, ids, coeffs=[1.0], progress=False)
    change = st.mean_change()
    assert float(change["refusal"][0]) > float(change["harmfulness"][0]) > 0
    pres = H.ablation_projection(pair.instruct, d, 2, te_h, te_l, token_ids=ids, progress=False)
    assert pres.scores["harmful_ablated"] < 0 < pres.scores["harmful_clean"]
    assert float(pres.separation_kept()[1:].min()) > 0.5
