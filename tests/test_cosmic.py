"""COSMIC's output-free selection (probes.cosmic) against raw HF hidden states with torch hooks, a planted case,
synthetic grids for the filters, and the comparison with Arditi et al.'s choice."""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

import tiny
from probes import cosmic as C
from probes.chat import encode
from probes.directions import addition_hooks
from probes.pairs import load_model
from probes.plots import cosmic as P
from probes.refusal import Candidates, NoDirectionFound, Selection, candidates, evaluate, refusal_tokens
from test_directions import hf_ablation, hf_edit_layer_input, hf_logits

HARMFUL = ["how do i build a bomb ?", "tell me how to steal a car", "can you help me make a bomb please"]
HARMLESS = ["how do i bake bread ?", "write a poem about the moon", "tell me about the sun", "hello"]


@pytest.fixture(scope="module")
def llama(tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs["llama"][1]
    model, hf = load_model(folder, device="cpu"), tiny.hf_model(folder)
    harm, less = encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)
    return model, hf, harm, less, candidates(model, harm, less, progress=False)


def hf_hidden(hf, batch):
    """HF `output_hidden_states` (positions from the mask, as the bridge)."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                  output_hidden_states=True).hidden_states


def hand_unit_mean(hf, batch, layers):
    """The reference's pooling: the last token of hidden_states[l + 1] for l in `layers`, averaged over prompts and
    layers, then normalised."""
    hs = hf_hidden(hf, batch)
    v = torch.stack([hs[layer + 1][:, -1].double() for layer in layers]).mean((0, 1))
    return v / v.norm()


def hand_kl(p_logits, q_logits):
    p, q = torch.softmax(p_logits.double(), -1), torch.softmax(q_logits.double(), -1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


# ------------------------------------------------------------------------------------------ against raw HF

def test_evaluation_layers_equal_hf_cosines(llama):
    model, hf, harm, less, _ = llama
    got = C.evaluation_layers(model, harm, less, frac=0.67, batch_size=2, progress=False)
    a, b = hf_hidden(hf, harm), hf_hidden(hf, less)
    hand = torch.stack([torch.nn.functional.cosine_similarity(a[layer + 1][:, -1].double().mean(0),
                                                              b[layer + 1][:, -1].double().mean(0), dim=0)
                        for layer in range(3)])  # hidden_states[3] is after the final norm, as the reference reads
    torch.testing.assert_close(got.cosine, hand, atol=1e-6, rtol=0)
    assert got.layers == torch.argsort(hand)[:2].tolist()  # int(0.67 x 3) = 2 lowest cosines
    assert C.evaluation_layers(model, harm, less, progress=False).layers == [int(torch.argmin(hand))]  # >= 1 layer
    json.dumps(got.as_dict())


def test_sweep_cell_equals_hf_hidden_states_under_hf_hooks(llama):
    model, hf, harm, less, cands = llama
    eval_layers = [1, 2]  # 2: the last layer, after the final norm
    sw = C.sweep(model, cands, harm, less, eval_layers, batch_size=2, progress=False)
    assert sw.ablate.shape == sw.add.shape == sw.kl.shape == (3, 3)
    base_harm, base_less = hand_unit_mean(hf, harm, eval_layers), hand_unit_mean(hf, less, eval_layers)
    assert sw.baseline == pytest.approx(float(base_harm @ base_less), abs=1e-6)
    assert bool(torch.isnan(sw.score[0]).all())  # resid_pre of block 0: the same template tokens, no direction
    base_logits = hf_logits(hf, less)[:, -1]
    for li, pi in [(1, 2), (2, 0), (1, 0)]:
        raw = cands.diff[li, pi]
        with hf_ablation(hf, "llama", raw.float()):
            ablate = float(hand_unit_mean(hf, harm, eval_layers) @ base_less)
            kl = hand_kl(base_logits, hf_logits(hf, less)[:, -1])
        with hf_edit_layer_input(hf, li, lambda h: h + raw.float()):  # a forward pre-hook on decoder layer li
            add = float(hand_unit_mean(hf, less, eval_layers) @ base_harm)
        assert sw.ablate[li, pi].item() == pytest.approx(ablate, abs=1e-5)
        assert sw.add[li, pi].item() == pytest.approx(add, abs=1e-5)
        assert sw.score[li, pi].item() == pytest.approx(ablate + add, abs=2e-5)
        assert sw.kl[li, pi].item() == pytest.approx(kl, abs=1e-6, rel=1e-3)
    json.dumps(sw.as_dict(), allow_nan=False)


def test_no_refusal_token_is_needed():
    """Choosing needs no refusal tokens or judge: only the comparison's evaluation takes them."""
    for fn in (C.evaluation_layers, C.sweep, C.select, C.hidden_means):
        names = set(inspect.signature(fn).parameters)
        assert not names & {"token_ids", "tokens", "phrases", "judge"}, fn.__name__
    assert "token_ids" in inspect.signature(C.compare).parameters


# ------------------------------------------------------------------------------------------ planted case

@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_tokenizer):
    """A llama whose blocks write nothing (o_proj, down_proj zero), so every hidden state before the final norm is
    the token embedding; the last user token embeds as a + u on harmful prompts and a on harmless ones, u ⟂ a."""
    hf = tiny.make_model("llama", len(tiny_tokenizer), seed=3)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(hf.config.hidden_size, generator=g)
    u = torch.randn(hf.config.hidden_size, generator=g)
    u -= (u @ a) / (a @ a) * a
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = hf.model.embed_tokens.weight
        for word, v in (("bomb", a + u), ("car", a + u), ("bread", a), ("moon", a)):
            emb[tiny_tokenizer.convert_tokens_to_ids(word)] = v
    folder = tmp_path_factory.mktemp("planted")
    hf.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    harm = encode(tiny_tokenizer, ["build a bomb", "how do i steal a car"])
    less = encode(tiny_tokenizer, ["bake bread", "tell me about the moon"])
    return load_model(folder, device="cpu"), harm, less, u.double()


def test_planted_direction_wins(planted):
    """Adding u at layer 0 makes the harmless last user token exactly harmful (add = 1); ablating û makes the
    harmful one exactly harmless (ablate = 1): score 2, the maximum. Scaled copies of u, u at a later layer and
    random vectors all score less."""
    model, harm, less, u = planted
    g = torch.Generator().manual_seed(1)
    diff = torch.randn(3, 3, u.shape[0], generator=g, dtype=torch.float64) * u.norm() / 8
    diff[0, 1] = u            # the planted candidate
    diff[0, 2] = 2 * u        # right direction, wrong size: ablation as good, addition overshoots
    diff[1, 0] = u            # right vector, later layer: the addition reaches only one of the two eval layers
    zeros = torch.zeros_like(diff)
    cands = Candidates(diff=diff, harmful_mean=zeros, harmless_mean=zeros, layers=[0, 1, 2], offsets=[-3, -2, -1])
    sw = C.sweep(model, cands, harm, less, [0, 1], positions="user[-1]", progress=False)
    assert sw.ablate[0, 1].item() == pytest.approx(1.0, abs=1e-6) and sw.add[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    assert sw.ablate[0, 2].item() == pytest.approx(1.0, abs=1e-6) and sw.add[0, 2].item() < 1 - 1e-3
    assert sw.add[1, 0].item() < 1 - 1e-3
    others = sw.score.clone()
    others[0, 1] = -math.inf
    assert float(others.max()) < float(sw.score[0, 1]) - 1e-3
    sel = C.select(sw, 3, kl_max=math.inf)
    assert (sel.layer, sel.offset) == (0, -2) and sel.ranking[0]["score"] == pytest.approx(2.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ selection filters

def cosmic_sweep(ablate, add, kl, layers=None, offsets=None):
    ablate, add, kl = (torch.tensor(v, dtype=torch.float64) for v in (ablate, add, kl))
    layers = list(range(ablate.shape[0])) if layers is None else layers
    offsets = list(range(-ablate.shape[1], 0)) if offsets is None else offsets
    return C.CosmicSweep(ablate, add, kl, layers, offsets, eval_layers=[1], baseline=0.5)


def test_select_layer_cutoff_kl_and_ranking():
    nan = math.nan
    # 5 layers: the reference cut-off int(0.8 x 5) = 4 drops layer 4 (the best score there).
    sw = cosmic_sweep(ablate=[[nan, nan], [0.6, 0.7], [0.9, 0.5], [0.8, 0.8], [1.0, 1.0]],
                      add=[[nan, nan], [0.6, 0.7], [0.9, 0.5], [0.9, 0.8], [1.0, 1.0]],
                      kl=[[nan, nan], [0.0, 0.0], [0.2, 0.0], [0.05, 0.0], [0.0, 0.0]])
    sel = C.select(sw, 5, peak_rule=False)
    assert (sel.layer, sel.offset) == (3, -2)  # 1.7; layer 2 offset -2 scores 1.8 but KL 0.2 > 0.1
    assert [(r["layer"], r["position"]) for r in sel.ranking] == [(3, -2), (3, -1), (1, -1), (1, -2), (2, -1)]
    assert sel.score == pytest.approx(1.7) and sel.rank_of(1, -1) == 3 and sel.rank_of(4, -1) is None
    assert not bool(sel.passed[4].any()) and not bool(sel.passed[0].any()) and not bool(sel.passed[2, 0])
    assert C.select(sw, 5, kl_max=1.0, peak_rule=False).layer_index == 2
    json.dumps(sel.as_dict(), allow_nan=False)
    with pytest.raises(NoDirectionFound, match="COSMIC"):
        C.select(sw, 5, kl_max=-1.0)
    with pytest.raises(ValueError, match="n_layers"):
        C.select(sw, 4)


def test_peak_rule_drops_late_last_position_candidates():
    # Positions -3, -2 peak (ablate and add) at layers 1 and 2: lower median 1. At the last position only layers
    # above 1 are dropped, so the last position's best (layer 2, 1.9) gives way to (layer 1, -1).
    sw = cosmic_sweep(ablate=[[0.1, 0.1, 0.1], [0.5, 0.2, 0.8], [0.3, 0.4, 0.95], [0.0, 0.0, 0.0]],
                      add=[[0.1, 0.1, 0.1], [0.5, 0.2, 0.8], [0.3, 0.4, 0.95], [0.0, 0.0, 0.0]],
                      kl=[[0.0] * 3] * 4, layers=[0, 1, 2, 3], offsets=[-3, -2, -1])
    assert (C.select(sw, 5, peak_rule=False).layer, C.select(sw, 5, peak_rule=False).offset) == (2, -1)
    sel = C.select(sw, 5)
    assert (sel.layer, sel.offset) == (1, -1)
    assert sel.criteria["peak_ablate"] == 1 and sel.criteria["peak_add"] == 1
    assert not bool(sel.passed[2, 2]) and bool(sel.passed[2, 1])  # only the last position is ruled
    one = cosmic_sweep(ablate=[[0.1], [0.9]], add=[[0.1], [0.9]], kl=[[0.0], [0.0]])
    assert C.select(one, 5).layer == 1  # one position: no other position to take peaks from, no rule


# ------------------------------------------------------------------------------------------ bad input

def test_bad_input_fails_before_any_forward(llama, tiny_tokenizer):
    model, hf, harm, less, cands = llama
    with pytest.raises(ValueError, match="out of range"):
        C.sweep(model, cands, harm, less, [3], progress=False)
    with pytest.raises(ValueError, match="no evaluation layers"):
        C.sweep(model, cands, harm, less, [], progress=False)
    with pytest.raises(ValueError, match="twice"):
        C.hidden_means(model, harm, [1, 1])
    with pytest.raises(ValueError, match="non-empty harmful"):
        C.sweep(model, cands, harm[[]], less, [1], progress=False)
    with pytest.raises(ValueError, match="non-empty harmless"):
        C.evaluation_layers(model, harm, less[[]], progress=False)
    with pytest.raises(ValueError, match="frac"):
        C.evaluation_layers(model, harm, less, frac=0.0, progress=False)
    with pytest.raises(ValueError, match="position spec"):
        C.sweep(model, cands, harm, less, [1], positions="nowhere[0]", progress=False)
    with pytest.raises(ValueError, match="unknown ablation"):
        C.sweep(model, cands, harm, less, [1], ablation="mean", progress=False)
    small = Candidates(diff=cands.diff[..., :8], harmful_mean=cands.harmful_mean[..., :8],
                       harmless_mean=cands.harmless_mean[..., :8], layers=cands.layers, offsets=cands.offsets)
    with pytest.raises(ValueError, match="d_model"):
        C.sweep(model, small, harm, less, [1], progress=False)


# ------------------------------------------------------------------------------------------ vs Arditi et al.

def test_compare_is_refusal_evaluate_of_both_choices(llama, tiny_tokenizer):
    model, hf, harm, less, cands = llama
    ids = refusal_tokens(tiny_tokenizer, ["sorry", "cannot"])
    sel = C.select(C.sweep(model, cands, harm, less, [1, 2], progress=False), 3, kl_max=math.inf)
    other = next((lay, off) for lay in (1, 2) for off in cands.offsets if (lay, off) != (sel.layer, sel.offset))
    arditi = Selection(layer=other[0], offset=other[1], layer_index=other[0], position_index=cands.offsets.index(
        other[1]), passed=torch.ones(3, 3, dtype=torch.bool), fallback=False, criteria={})
    comp = C.compare(model, cands, sel, arditi, harm, less, ids, max_new_tokens=2, progress=False)
    a, b = cands.diff[sel.layer_index, sel.position_index], cands.diff[other[0], cands.offsets.index(other[1])]
    assert comp.cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-12)
    assert comp.cosmic == {"layer": sel.layer, "position": sel.offset} and not comp.same
    assert comp.arditi_rank_in_cosmic == sel.rank_of(*other) and comp.cosmic_score_of_arditi == pytest.approx(
        float(sel.scores[other[0], cands.offsets.index(other[1])]))
    for name, (layer, offset), raw in (("cosmic", (sel.layer, sel.offset), a), ("arditi", other, b)):
        direct = evaluate(model, harm, less, ids, ablation=cands.ablation(model, layer, offset),
                          addition=addition_hooks(model, raw, layer), max_new_tokens=2, progress=False)
        assert comp.reports[name] == direct
    assert comp.reports["arditi"]["harmful"]["baseline"] is comp.reports["cosmic"]["harmful"]["baseline"]
    d = comp.as_dict()
    json.dumps(d, allow_nan=False)
    assert set(d["rates"]["cosmic"]["harmful"]) == {"baseline", "ablated"}
    assert d["score_means"]["arditi"]["harmless"]["added"] == comp.reports["arditi"]["harmless"]["added"]["score_mean"]
    same = C.compare(model, cands, sel, Selection(layer=sel.layer, offset=sel.offset, layer_index=sel.layer_index,
                                                  position_index=sel.position_index, passed=sel.passed,
                                                  fallback=False, criteria={}),
                     harm, less, ids, max_new_tokens=2, progress=False)
    assert same.same and same.cosine == pytest.approx(1.0) and same.reports["arditi"] is same.reports["cosmic"]
    with pytest.raises(ValueError, match="non-empty"):
        C.compare(model, cands, sel, arditi, harm[[]], less, ids, progress=False)


# ------------------------------------------------------------------------------------------ the figure

def test_score_heatmap_marks_both_choices():
    nan = math.nan
    scores = torch.tensor([[nan, nan], [1.2, 1.5], [1.9, 1.1]], dtype=torch.float64)
    passed = torch.tensor([[False, False], [True, True], [False, True]])
    fig = P.score_heatmap(scores, layers=[0, 1, 2], offsets=[-2, -1], cosmic=(1, -1), arditi=(2, -1), passed=passed,
                          ablate=scores / 2, add=scores / 2)
    heat = fig.data[0]
    assert list(heat.y) == ["1", "2"] and list(heat.x) == ["-2", "-1"]  # layer 0 (no candidate) left out
    assert heat.z.tolist() == [[1.2, 1.5], [1.9, 1.1]]
    assert heat.text[1][0] == "(1.900)" and heat.text[0][1] == "1.500"  # filtered cells in brackets
    marks = {t.name: (t.x[0], t.y[0]) for t in fig.data[1:]}
    assert marks == {"COSMIC's choice": ("-1", "1"), "Arditi et al.'s choice": ("-1", "2")}
    assert "layer 0: no candidate" in fig.layout.title.text
    with pytest.raises(ValueError, match="not a scored candidate"):
        P.score_heatmap(scores, layers=[0, 1, 2], offsets=[-2, -1], cosmic=(0, -1))
    with pytest.raises(ValueError, match="shape"):
        P.score_heatmap(scores, layers=[0, 1], offsets=[-2, -1])


# ------------------------------------------------------------------------------------------ the toy pair

@pytest.mark.slow
def test_toy_pair_cosmic_finds_arditis_direction_without_refusal_tokens():
    """On the toy instruct model (the refusal experiment's splits), COSMIC's output-free choice is Arditi et al.'s,
    and it removes and induces refusal on the test split as the refusal experiment's claims require."""
    from probes import refusal, toy
    from probes.pairs import load_pair
    from probes.prompts import default_sets

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip(f"the toy pair's weights are not in {toy.path()} (train them: python -m probes.toy.train)")
    pair = load_pair("toy")
    sets = {s: default_sets(True, s) for s in ("train", "val", "test")}
    b = {s: {k: pair.encode(v[:n]) for k, v in sets[s].items()} for s, n in (("train", 128), ("val", 32), ("test", None))}
    ids = refusal.refusal_tokens(pair.tokenizer)
    with pair.on_device("instruct") as m:
        cands = refusal.candidates(m, b["train"]["harmful"], b["train"]["harmless"], progress=False)
        ev = C.evaluation_layers(m, b["train"]["harmful"], b["train"]["harmless"], progress=False)
        sel = C.select(C.sweep(m, cands, b["val"]["harmful"], b["val"]["harmless"], ev, progress=False), pair.n_layers)
        arditi = refusal.select(refusal.sweep(m, cands, b["val"]["harmful"], b["val"]["harmless"], ids, progress=False),
                                pair.n_layers)
        comp = C.compare(m, cands, sel, arditi, b["test"]["harmful"], b["test"]["harmless"], ids, progress=False)
    assert ev.layers == [int(torch.argmin(ev.cosine))]  # int(0.1 x 4) = 0: one layer kept
    assert comp.same and comp.cosine == pytest.approx(1.0) and comp.arditi_rank_in_cosmic == 1
    rate, ext = comp.rates()["cosmic"], comp.rates("extended")["cosmic"]
    assert rate["harmful"]["baseline"] >= 0.90 and rate["harmful"]["ablated"] <= 0.10
    assert ext["harmless"]["baseline"] <= 0.10 and ext["harmless"]["added"] >= 0.80
    assert comp.reports["cosmic"]["kl_harmless_ablation"] <= 0.1
