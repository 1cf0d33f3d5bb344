"""The KL gap of dictionary latents (probes.latents_kl) against raw HF forwards with a pre-hook splice, on the toy
pair: a crosscoder trained on its layer-2 activations, and a planted pair whose instruct - base difference at
layer 0 is one direction carried by one latent."""
from __future__ import annotations

import pytest
import torch

import tiny
from probes import latents_kl as K
from probes import toy
from probes.dictionaries import BatchTopKCrosscoder, DiffSAE, train
from probes.pairs import load_pair
from probes.store import write_store

LAYER = 2


@pytest.fixture(scope="module")
def toy_pair():
    return load_pair("toy", device="cpu")


@pytest.fixture(scope="module")
def hf_pair():
    return {w: tiny.hf_model(toy.path() / w) for w in ("base", "instruct")}


@pytest.fixture(scope="module")
def batch(toy_pair):
    # Different lengths, so rows are left-padded.
    prompts = toy.prompts("harmful", "val")[:3] + toy.prompts("harmless", "val")[:2] + ["hello"]
    b = toy_pair.encode(prompts)
    assert not bool(b.attention_mask.all())
    return b


@pytest.fixture(scope="module")
def trained(toy_pair, tmp_path_factory):
    prompts = toy.prompts("harmful", "train")[:48] + toy.prompts("harmless", "train")[:48]
    st = write_store(toy_pair, {"train": prompts}, tmp_path_factory.mktemp("store"), hooks="resid_pre",
                     layers=[LAYER], positions="all", progress=False)
    cc = BatchTopKCrosscoder(64, 128, k=8)
    train(cc, lambda: st.iter_batches(256, layers=LAYER, shuffle=True), steps=300, lr=1e-3, warmup_steps=20,
          threshold_start_step=50, progress=False)
    assert float(cc.threshold) > 0
    return cc


def hf_hidden(hf, b, layer):
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(b.input_ids, attention_mask=b.attention_mask, position_ids=pos,
                  output_hidden_states=True).hidden_states[layer]


def hf_spliced_logits(hf, b, layer, new, position):
    """Logits at `position` with model.layers[layer]'s input hidden states replaced by `new` `[b, seq, d]`."""
    def pre(mod, args, kwargs):
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    h = hf.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = hf(b.input_ids, attention_mask=b.attention_mask, position_ids=pos).logits
    finally:
        h.remove()
    idx = b.positions(position)[0][:, 0]
    return logits[torch.arange(len(b)), idx]


def hand_kl(p_logits, q_logits):
    p = torch.softmax(p_logits.double(), -1)
    return (p * (p.log() - torch.log_softmax(q_logits.double(), -1))).sum(-1)


def hand_kls(hf_pair, cc, b, layer, sets, position="post_instruction[-1]"):
    """Per-prompt KLs by HF hidden states, the splice written out with the dictionary's weights and scales, and HF
    pre-hooks."""
    hb, hi = hf_hidden(hf_pair["base"], b, layer), hf_hidden(hf_pair["instruct"], b, layer)
    real = b.attention_mask.bool()
    s = cc.scales
    with torch.no_grad():
        x = torch.stack([hb[real] * s[0], hi[real] * s[1]], 1)        # cc.models == ("base", "instruct")
        f = cc.encode(x)
        W, bd = cc.W_dec, cc.b_dec
        contrib = {n: f[:, idx] @ (W[idx, 1] / s[1] - W[idx, 0] / s[0]) for n, idx in sets.items()}
        contrib["reconstruction"] = (cc.decode(f)[:, 1] / s[1] - cc.decode(f)[:, 0] / s[0])
    assert torch.allclose(bd[1] / s[1] - bd[0] / s[0], contrib["reconstruction"] - contrib["all"], atol=1e-5)
    idx = b.positions(position)[0][:, 0]
    p = hf_pair["instruct"](b.input_ids, attention_mask=b.attention_mask,
                            position_ids=(b.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits.detach()
    p = p[torch.arange(len(b)), idx]
    out = {}
    for n, c in contrib.items():
        new = hi.clone()
        new[real] = hb[real] + c
        out[n] = hand_kl(p, hf_spliced_logits(hf_pair["instruct"], b, layer, new, position))
    return out


def test_splice_equals_raw_hf_pre_hook(toy_pair, hf_pair, trained, batch):
    kl_sets = {"few": [3, 7, 40, 99], "none": [], "all": list(range(trained.n_latents))}
    user = {"few": kl_sets["few"], "also all": kl_sets["all"]}
    res = K.kl_gap_recovery(toy_pair, trained, batch, LAYER, user, batch_size=4, progress=False)
    hand = hand_kls(hf_pair, trained, batch, LAYER, kl_sets)
    for n in ("few", "none", "all", "reconstruction"):
        torch.testing.assert_close(res.per_prompt[n], hand[n], atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(res.per_prompt["also all"], res.per_prompt["all"], atol=1e-9, rtol=0)
    assert res.per_prompt["none"].shape == (len(batch),)
    assert float(hand["none"].min()) > 1e-3  # a real gap on every prompt
    assert res.gap == pytest.approx(float(hand["none"].mean()), rel=1e-4)
    assert res.sizes == {"none": 0, "few": 4, "also all": 128, "all": 128, "reconstruction": -1, "exact": -1}
    # The same numbers whatever the chunking.
    one = K.kl_gap_recovery(toy_pair, trained, batch, LAYER, user, batch_size=1, progress=False)
    for n in res.per_prompt:
        torch.testing.assert_close(one.per_prompt[n], res.per_prompt[n], atol=2e-6, rtol=1e-4)


def test_other_layer_and_position_match_hf(toy_pair, hf_pair, trained, batch):
    """The last layer (no early stop) and a position before the response."""
    sets = {"few": [1, 2, 5]}
    res = K.kl_gap_recovery(toy_pair, trained, batch, 3, sets, position="user[-1]", progress=False)
    hand = hand_kls(hf_pair, trained, batch, 3, {**sets, "none": [], "all": list(range(128))}, position="user[-1]")
    for n in ("few", "none", "all", "reconstruction"):
        torch.testing.assert_close(res.per_prompt[n], hand[n], atol=2e-6, rtol=1e-4)


def test_empty_set_is_the_gap_and_the_exact_difference_recovers_it(toy_pair, trained, batch):
    res = K.kl_gap_recovery(toy_pair, trained, batch, LAYER, {"empty": []}, progress=False)
    assert res.gap > 0.01
    torch.testing.assert_close(res.per_prompt["empty"], res.per_prompt["none"], atol=0, rtol=0)
    assert res.kl["none"] == res.gap and res.recovery["none"] == 0 and res.recovery["empty"] == 0
    assert float(res.per_prompt["exact"].abs().max()) < 1e-9
    assert res.recovery["exact"] == pytest.approx(1, abs=1e-8)
    for n in res.kl:
        assert res.recovery[n] == pytest.approx(1 - res.kl[n] / res.gap, abs=1e-12)
        assert res.kl[n] == pytest.approx(float(res.per_prompt[n].mean()), abs=1e-12)


@pytest.fixture(scope="module")
def planted_pair():
    """The toy pair with the instruct embedding replaced by the base one plus c_t v (c_t in [0.5, 1.5]): at layer 0
    the instruct - base difference is c_t v at every token."""
    pair = load_pair("toy", device="cpu")
    g = torch.Generator().manual_seed(0)
    base_w = pair.base.original_model.model.embed_tokens.weight
    v = torch.randn(64, generator=g)
    v = v / v.norm() * 2 * float(base_w.norm(dim=-1).mean())
    c = 0.5 + torch.rand(base_w.shape[0], generator=g)
    with torch.no_grad():
        pair.instruct.original_model.model.embed_tokens.weight.copy_(base_w + c[:, None] * v)
    return pair, v


def planted_crosscoder(v, scales=(2.0, 0.5)):
    """Latent 0 reads c_t = <h_inst - h_base, v> / |v|² and writes v into instruct only (in raw units); latents 1-3
    are shared (equal raw decoders in both models) and fire on every token."""
    sb, si = scales
    cc = BatchTopKCrosscoder(64, 4, k=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_dec.zero_()
        cc.b_dec.zero_()
        vv = v.pow(2).sum()
        cc.W_enc[1, :, 0] = v / (si * vv)
        cc.W_enc[0, :, 0] = -v / (sb * vv)
        cc.W_dec[0, 1] = si * v
        for j in (1, 2, 3):
            w = torch.randn(64, generator=g)
            cc.W_dec[j, 0], cc.W_dec[j, 1] = sb * w, si * w
        cc.b_enc[1:] = 1.0  # ReLU(0 + 1): the shared latents fire everywhere
        cc.b_dec[0], cc.b_dec[1] = sb * torch.ones(64), si * torch.ones(64)  # same raw bias in both models
    cc.set_scales(scales)
    cc.threshold.fill_(0.0)
    return cc.eval()


def test_planted_latent_recovers_the_whole_gap(planted_pair, batch):
    pair, v = planted_pair
    cc = planted_crosscoder(v)
    sets = {"carrier": [0], "shared": [1, 2, 3], "one shared": [2]}
    res = K.kl_gap_recovery(pair, cc, batch, 0, sets, progress=False)
    assert res.gap > 0.05
    assert res.recovery["carrier"] == pytest.approx(1, abs=1e-6)
    assert res.recovery["all"] == pytest.approx(1, abs=1e-6)
    assert res.recovery["reconstruction"] == pytest.approx(1, abs=1e-6)
    assert abs(res.recovery["shared"]) < 1e-6 and abs(res.recovery["one shared"]) < 1e-6
    # The random control from the latents other than the carrier: the shared ones, recovery 0.
    control = K.random_latent_sets(4, 1, 3, seed=0, exclude=[0])
    ctrl = K.kl_gap_recovery(pair, cc, batch, 0, control, progress=False)
    assert all(abs(ctrl.recovery[n]) < 1e-6 for n in control)


def test_planted_diff_sae(planted_pair, batch):
    """A DiffSAE whose one latent reads and writes the difference direction: the same full recovery."""
    pair, v = planted_pair
    sae = DiffSAE(64, 2, k=1)
    s = 4.0
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_dec.zero_()
        sae.b_dec.zero_()
        sae.W_enc[0, :, 0] = v / (s * v.pow(2).sum())
        sae.W_dec[0, 0] = s * v
        sae.W_dec[1, 0] = torch.randn(64)
    sae.set_scales([s])
    sae.threshold.fill_(0.0)
    res = K.kl_gap_recovery(pair, sae.eval(), batch, 0, {"carrier": [0], "other": [1]}, progress=False)
    assert res.recovery["carrier"] == pytest.approx(1, abs=1e-6)
    assert res.recovery["other"] == 0  # latent 1 never fires (its encoder is zero)


def test_random_latent_sets():
    sets = K.random_latent_sets(20, 5, 4, seed=3, exclude=[0, 1, 2])
    assert list(sets) == ["random-0", "random-1", "random-2", "random-3"]
    for s in sets.values():
        assert len(s) == 5 == len(set(s)) and s == sorted(s) and not {0, 1, 2} & set(s)
        assert all(3 <= i < 20 for i in s)
    assert sets == K.random_latent_sets(20, 5, 4, seed=3, exclude=[0, 1, 2])
    assert sets != K.random_latent_sets(20, 5, 4, seed=4, exclude=[0, 1, 2])
    assert set().union(*K.random_latent_sets(6, 3, 50, seed=0, exclude=[0]).values()) == {1, 2, 3, 4, 5}
    for args in [(20, 18, 1, 0, [0, 1, 2]), (20, 2, 0, 0, None), (0, 1, 1, 0, None), (5, 1, 1, 0, [5])]:
        with pytest.raises(ValueError):
            K.random_latent_sets(*args)


def test_bad_input_raises_before_any_forward(toy_pair, trained, batch, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(K, "forward", boom)
    monkeypatch.setattr(K, "last_logits", boom)
    ok = {"a": [1, 2]}
    cases = [
        dict(layer=4), dict(layer=-1), dict(layer="2"),
        dict(latent_sets={"a": [128]}), dict(latent_sets={"a": [-1]}), dict(latent_sets={"a": [1, 1]}),
        dict(latent_sets={"all": [1]}), dict(latent_sets=[[1]]),
        dict(batch=batch[[]]), dict(batch="hello"),
        dict(position="post_instruction"), dict(position="nonsense[0]"), dict(batch_size=0),
        dict(dictionary=BatchTopKCrosscoder(32, 8, 2)),
        dict(dictionary=BatchTopKCrosscoder(64, 8, 2, models=("a", "b"))),
    ]
    unscaled = BatchTopKCrosscoder(64, 8, 2)
    cases.append(dict(dictionary=unscaled))
    no_threshold = BatchTopKCrosscoder(64, 8, 2)
    no_threshold.set_scales([1.0, 1.0])
    cases.append(dict(dictionary=no_threshold))
    for case in cases:
        kw = dict(dictionary=trained, batch=batch, layer=LAYER, latent_sets=ok) | case
        with pytest.raises(ValueError):
            K.kl_gap_recovery(toy_pair, kw["dictionary"], kw["batch"], kw["layer"], kw["latent_sets"],
                              **{k: v for k, v in kw.items() if k in ("position", "batch_size")}, progress=False)
