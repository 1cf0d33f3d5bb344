"""What latents do on the tokens (probes.latents): planted dictionaries whose codes are set by hand, brute-force
sorts, and steering on the toy pair against a raw HF forward with a pre-hook."""
from __future__ import annotations

import itertools

import pytest
import torch

from probes import latents as LT
from probes.chat import ROLE_ID, ROLES
from probes.dictionaries import BatchTopKCrosscoder, DiffSAE, L1Crosscoder

D, L = 8, 4
SCALES = (2.0, 0.25)  # base, instruct: distinct, so a swapped or inverted scale shows


def planted(kind: str = "l1", threshold: float = 0.5):
    """A dictionary whose pre-activation of latent j is exactly the raw instruct activation's coordinate j: the
    instruct encoder is e_j / scale (prepare multiplies by the scale), the base encoder zero. Decoder rows have
    norms summing to 1 over the models, so a BatchTopK score equals the activation."""
    cc = L1Crosscoder(D, L) if kind == "l1" else BatchTopKCrosscoder(D, L, k=1)
    cc.set_scales(SCALES)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[1, :L, :] = torch.eye(L) / SCALES[1]
        cc.b_enc.zero_()
        w = torch.randn(L, 2, D, generator=torch.Generator().manual_seed(3))
        cc.W_dec.copy_(w / w.norm(dim=-1).sum(-1)[:, None, None])
        if kind == "topk":
            cc.threshold.fill_(threshold)
    return cc


def token_stream(seed: int = 0, n_batches: int = 3, rows: int = 20):
    """Batches whose instruct coordinates 0..L-1 are the codes, drawn from {-1, 0, 0.5, 1, 2, 3} (negatives: below
    the ReLU; repeated values: ties); the last batch holds only set 2, so n_sets=None must grow."""
    g = torch.Generator().manual_seed(seed)
    values = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0])
    out = []
    for i in range(n_batches):
        codes = values[torch.randint(0, len(values), (rows, L), generator=g)]
        inst = torch.cat([codes, torch.randn(rows, D - L, generator=g)], 1)
        last = i == n_batches - 1
        out.append({
            "base": torch.randn(rows, D, generator=g), "instruct": inst,
            "prompt_id": torch.randint(0, 50, (rows,), generator=g), "position": torch.arange(rows) + 100 * i,
            "role": torch.randint(1, len(ROLES), (rows,), generator=g),
            "set": torch.full((rows,), 2) if last else torch.randint(0, 2, (rows,), generator=g),
        })
    return out


def hand_mass(batches, keep):
    """by_role [L, roles], by_set [L, 3], tokens, fires by explicit loops over tokens."""
    by_role, by_set = torch.zeros(L, len(ROLES), dtype=torch.float64), torch.zeros(L, 3, dtype=torch.float64)
    fires = torch.zeros(L, dtype=torch.long)
    tok_role, tok_set = torch.zeros(len(ROLES), dtype=torch.long), torch.zeros(3, dtype=torch.long)
    for b in batches:
        for t in range(b["role"].shape[0]):
            r, s = int(b["role"][t]), int(b["set"][t])
            tok_role[r] += 1
            tok_set[s] += 1
            for j in range(L):
                a = float(b["instruct"][t, j])
                if keep(a):
                    by_role[j, r] += a
                    by_set[j, s] += a
                    fires[j] += 1
    return by_role, by_set, tok_role, tok_set, fires


@pytest.mark.parametrize("kind", ["l1", "topk"])
def test_role_mass_equals_hand_sums(kind):
    cc = planted(kind)
    cc.train()  # role_mass must switch to inference: BatchTopK over a batch would keep other tokens
    batches = token_stream()
    rm = LT.role_mass(cc, batches)
    keep = (lambda a: a > 0) if kind == "l1" else (lambda a: a > 0.5)  # the threshold cuts the score f_j
    by_role, by_set, tok_role, tok_set, fires = hand_mass(batches, keep)
    torch.testing.assert_close(rm.by_role, by_role, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm.by_set, by_set, rtol=1e-6, atol=1e-6)
    assert rm.by_role.dtype == torch.float64 and rm.by_role.shape == (L, len(ROLES))
    assert torch.equal(rm.tokens_by_role, tok_role) and torch.equal(rm.tokens_by_set, tok_set)
    assert torch.equal(rm.fires, fires) and torch.equal(rm.latents, torch.arange(L))
    # share / main_role / per_token from the hand sums
    user, post = ROLE_ID["user"], ROLE_ID["post_instruction"]
    torch.testing.assert_close(rm.share(["user", "post_instruction"]),
                               (by_role[:, user] + by_role[:, post]) / by_role.sum(-1), rtol=1e-6, atol=0)
    torch.testing.assert_close(rm.share(ROLES), torch.ones(L, dtype=torch.float64))
    assert rm.main_role() == [ROLES[int(i)] for i in by_role.argmax(-1)]
    torch.testing.assert_close(rm.per_token()[:, user], by_role[:, user] / tok_role[user], rtol=1e-6, atol=0)
    assert torch.isnan(rm.per_token()[:, ROLE_ID["pad"]]).all()  # the stream has no pad tokens
    if kind == "topk":  # the cut matters: values 0.5 are active under ReLU but not past the threshold
        assert (fires < hand_mass(batches, lambda a: a > 0)[4]).any()


def test_role_mass_subset_sets_and_dead_latent():
    cc = planted()
    with torch.no_grad():
        cc.W_enc[1, :, 3] = 0.0
        cc.b_enc[3] = -1.0  # latent 3 never fires
    batches = token_stream()
    rm = LT.role_mass(cc, batches, [3, 1], n_sets=5)
    by_role, by_set, *_ = hand_mass(batches, lambda a: a > 0)
    torch.testing.assert_close(rm.by_role[1], by_role[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rm.by_set[1, :3], by_set[1], rtol=1e-6, atol=1e-6)
    assert rm.by_set.shape == (2, 5) and rm.by_set[:, 3:].abs().sum() == 0
    assert rm.by_role[0].abs().sum() == 0 and rm.fires[0] == 0
    assert rm.main_role()[0] == "none" and torch.isnan(rm.share("user")[0])
    assert torch.equal(rm.latents, torch.tensor([3, 1]))


def brute_top(cc, batches, latents, k):
    """Every token of the stream encoded at once, sorted per latent (stable: earlier tokens win ties)."""
    cat = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
    cc.eval()
    with torch.no_grad():
        f = cc.encode(cc.prepare(cat))
    out = {}
    for j in latents:
        v, order = f[:, j].sort(descending=True, stable=True)
        out[j] = [dict(value=float(v[i]), set=int(cat["set"][t]), prompt_id=int(cat["prompt_id"][t]),
                       position=int(cat["position"][t]), role=ROLES[int(cat["role"][t])])
                  for i, t in enumerate(order[:k].tolist()) if float(v[i]) > 0]
    return out


def test_top_activations_equal_brute_force_sort():
    torch.manual_seed(0)
    cc = L1Crosscoder(D, 16)  # random weights, continuous values
    cc.set_scales(SCALES)
    with torch.no_grad():
        cc.b_enc.fill_(-0.5)
    batches = token_stream(seed=1, n_batches=4, rows=13)
    got = LT.top_activations(cc, iter(batches), [0, 5, 9, 15], k=7)  # a one-shot iterator: streamed
    assert got == brute_top(cc, batches, [0, 5, 9, 15], 7)
    assert all(len(v) == 7 for v in got.values())
    assert all(a["value"] >= b["value"] for v in got.values() for a, b in itertools.pairwise(v))


def test_top_activations_ties_and_short_lists():
    cc = planted()
    batches = token_stream()
    got = LT.top_activations(cc, batches, [2, 0], k=50)  # k beyond the active count: only active tokens
    want = brute_top(cc, batches, [2, 0], 50)
    assert got == want and list(got) == [2, 0]
    values = [e["value"] for e in got[0]]
    assert len(values) < 50 and len(values) > len(set(values))  # ties across batches, ordered by stream
    assert [e["position"] for e in got[0] if e["value"] == 3.0] == sorted(e["position"] for e in got[0]
                                                                          if e["value"] == 3.0)


def test_decoder_direction_is_raw_units_and_cosines():
    """A planted crosscoder that reconstructs raw activations exactly: instruct raw = Σ_j c_j v_j with orthonormal
    v_j, decoder rows scale * v_j; decoder_direction must give v_j back, and the one-hot decode divided by the
    scale the raw reconstruction."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    v_base, v_inst = q[:, :L].T, q[:, L:2 * L].T  # [L, D] each, orthonormal
    cc = L1Crosscoder(D, L)
    cc.set_scales(SCALES)
    with torch.no_grad():
        cc.b_enc.zero_()
        cc.b_dec.zero_()
        cc.W_dec[:, 0] = (SCALES[0] * v_base).float()
        cc.W_dec[:, 1] = (SCALES[1] * v_inst).float()
        cc.W_enc[0] = (v_base.T / (2 * SCALES[0])).float()  # each model's half of the code
        cc.W_enc[1] = (v_inst.T / (2 * SCALES[1])).float()
    codes = torch.rand(5, L, generator=g, dtype=torch.float64) + 0.1
    raw = {"base": codes @ v_base, "instruct": codes @ v_inst}
    with torch.no_grad():
        x_hat, f = cc(cc.prepare(raw))
    torch.testing.assert_close(f.double(), codes, atol=1e-5, rtol=0)  # the planted code is the one encoded
    for m, name, v in ((0, "base", v_base), (1, "instruct", v_inst)):
        torch.testing.assert_close(x_hat[:, m].double() / SCALES[m], raw[name], atol=1e-5, rtol=0)
        for j in range(L):
            dj = LT.decoder_direction(cc, j, name)
            torch.testing.assert_close(dj, v[j], atol=1e-6, rtol=0)
            one_hot = torch.zeros(1, L)
            one_hot[0, j] = 1.0
            with torch.no_grad():
                torch.testing.assert_close(dj, cc.decode(one_hot)[0, m].double() / SCALES[m], atol=1e-6, rtol=0)
        # f @ raw directions rebuilds the raw activations
        rebuilt = codes @ torch.stack([LT.decoder_direction(cc, j, name) for j in range(L)])
        torch.testing.assert_close(rebuilt, raw[name], atol=1e-5, rtol=0)
        cos = LT.decoder_cosines(cc, 3.0 * v[2], name)  # cosine ignores the direction's length and the scale
        torch.testing.assert_close(cos, torch.eye(L, dtype=torch.float64)[2], atol=1e-6, rtol=0)
    # a random direction: the cosine of the normalised decoder equals that of the raw-unit one
    r = torch.randn(D, generator=g, dtype=torch.float64)
    raw_dirs = torch.stack([LT.decoder_direction(cc, j, "instruct") for j in range(L)])
    torch.testing.assert_close(LT.decoder_cosines(cc, r), raw_dirs @ r / (raw_dirs.norm(dim=-1) * r.norm()))


def test_diff_sae_decoder_direction():
    sae = DiffSAE(D, L, k=1)
    sae.set_scales([0.5])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_dec.zero_()
    raw = {"base": torch.randn(3, D, generator=g), "instruct": torch.randn(3, D, generator=g)}
    x = sae.prepare(raw)  # the difference, scaled
    torch.testing.assert_close(x[:, 0] / 0.5, raw["instruct"] - raw["base"])
    with torch.no_grad():
        for j in range(L):
            one_hot = torch.zeros(1, L)
            one_hot[0, j] = 1.0
            want = sae.decode(one_hot)[0, 0].double() / 0.5
            torch.testing.assert_close(LT.decoder_direction(sae, j), want)
            torch.testing.assert_close(LT.decoder_direction(sae, j, "instruct-base"), want)
    with pytest.raises(ValueError, match="one decoder"):
        LT.decoder_direction(sae, 0, "base")


def test_bad_input():
    cc = planted()
    batches = token_stream()
    with pytest.raises(ValueError, match="latents"):
        LT.role_mass(cc, batches, [0, L])
    with pytest.raises(ValueError, match="latents"):
        LT.role_mass(cc, batches, [-1])
    with pytest.raises(ValueError, match="repeat"):
        LT.top_activations(cc, batches, [1, 1])
    with pytest.raises(ValueError, match="k must"):
        LT.top_activations(cc, batches, [1], k=0)
    with pytest.raises(ValueError, match=r"batch\['instruct'\]"):
        LT.role_mass(cc, [{**batches[0], "instruct": torch.zeros(20, D + 1)}])
    with pytest.raises(ValueError, match=r"batch\['role'\]"):
        LT.role_mass(cc, [{**batches[0], "role": batches[0]["role"][:, None]}])
    with pytest.raises(ValueError, match=r"batch\['role'\]"):
        LT.role_mass(cc, [{**batches[0], "role": torch.full((20,), len(ROLES))}])
    with pytest.raises(ValueError, match="label rows"):
        LT.top_activations(cc, [{k: v[:10] if k in LT.LABELS else v for k, v in batches[0].items()}], [0])
    with pytest.raises(ValueError, match="n_sets"):
        LT.role_mass(cc, batches, n_sets=2)  # the last batch holds set 2
    with pytest.raises(ValueError, match="no batches"):
        LT.role_mass(cc, [])
    rm = LT.role_mass(cc, batches)
    with pytest.raises(ValueError, match="unknown roles"):
        rm.share(["assistant"])
    with pytest.raises(ValueError, match="direction"):
        LT.decoder_cosines(cc, torch.ones(D + 1))
    with pytest.raises(ValueError, match="zero"):
        LT.decoder_cosines(cc, torch.zeros(D))
    with pytest.raises(ValueError, match="model"):
        LT.decoder_cosines(cc, torch.ones(D), "chat")
    with pytest.raises(ValueError, match="latent"):
        LT.decoder_direction(cc, L)
    with pytest.raises(ValueError, match="scales"):
        LT.decoder_direction(L1Crosscoder(D, L), 0)


# ------------------------------------------------------------------------------------------------ the toy pair

@pytest.fixture(scope="module")
def toy_setup():
    from probes import refusal, toy
    from probes.pairs import load_pair

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip(f"the toy pair's weights are not in {toy.path()}")
    pair = load_pair("toy")
    cands = refusal.candidates(pair.instruct, pair.encode(toy.prompts("harmful", "train")[:32]),
                               pair.encode(toy.prompts("harmless", "train")[:32]), layers=[2], progress=False)
    harmless = pair.encode(toy.prompts("harmless", "val")[:16])
    return pair, cands.direction(2, -1), harmless, refusal.refusal_tokens(pair.tokenizer)


def hf_steered_scores(folder, batch, vector, layer, coeff, ids):
    """Mean refusal score from a plain HF forward with `coeff x vector` added to decoder layer `layer`'s input
    hidden states at every position (a forward pre-hook)."""
    import tiny
    from probes.refusal import refusal_score

    hf = tiny.hf_model(folder)
    add = (coeff * vector).float()

    def pre(module, args, kwargs):
        if args:
            return (args[0] + add, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + add}

    handle = hf.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits[:, -1]
    finally:
        handle.remove()
    return float(refusal_score(logits, ids).mean())


def test_steering_effect_on_toy_pair(toy_setup):
    from probes import toy

    pair, direction, harmless, ids = toy_setup
    coeffs = [0.0, 0.25, 0.5, 1.0]
    eff = LT.steering_effect(pair.instruct, harmless, direction, 2, coeffs, ids, batch_size=8)
    assert eff.shape == (4,) and eff.dtype == torch.float64
    assert eff[0] < 0 < eff[-1]  # harmless prompts refused once the direction is added
    assert (eff.diff() > 0).all()
    for c, e in zip([0.0, 0.5, 1.0], eff[[0, 2, 3]].tolist()):
        want = hf_steered_scores(toy.path() / "instruct", harmless, direction.raw, 2, c, ids)
        assert e == pytest.approx(want, abs=1e-4)
    # the same call takes a tensor, and batch size does not change the numbers
    again = LT.steering_effect(pair.instruct, harmless, direction.raw, 2, [1.0], ids, batch_size=16)
    assert float(again[0]) == pytest.approx(float(eff[-1]), abs=1e-5)


def test_steering_bad_input(toy_setup):
    pair, direction, harmless, ids = toy_setup
    m = pair.instruct
    with pytest.raises(ValueError, match="layer"):
        LT.steering_effect(m, harmless, direction, 99, [1.0], ids)
    with pytest.raises(ValueError, match="d_model"):
        LT.steering_effect(m, harmless, torch.ones(3), 2, [1.0], ids)
    with pytest.raises(ValueError, match="coeffs"):
        LT.steering_effect(m, harmless, direction, 2, [float("nan")], ids)
    with pytest.raises(ValueError, match="coeffs"):
        LT.steering_effect(m, harmless, direction, 2, [], ids)
    with pytest.raises(ValueError, match="out of range"):
        LT.steering_effect(m, harmless, direction, 2, [1.0], [10**6])
    with pytest.raises(ValueError, match="ChatBatch"):
        LT.steering_effect(m, harmless[[]], direction, 2, [1.0], ids)


def test_store_batches_on_toy_pair(toy_setup, tmp_path):
    """Batches from a real store: token counts per role and set are the ChatBatches' own, and each top token's
    labels point at a residual whose code (recomputed from a fresh bridge cache) is the reported value."""
    from probes.activations import run_with_cache
    from probes.store import write_store

    pair, _, _, _ = toy_setup
    texts = {"harmful": ["how do I build a bomb", "steal a car"], "harmless": ["bake a cake", "paint a fence please"]}
    st = write_store(pair, texts, tmp_path / "s", layers=[2], shard_tokens=17, progress=False)
    assert len(st) > 1  # batches run across shards
    torch.manual_seed(0)
    cc = L1Crosscoder(pair.d_model, 6)
    cc.set_scales([0.7, 1.3])
    with torch.no_grad():
        cc.b_enc.fill_(-0.2)
    rm = LT.role_mass(cc, lambda: st.iter_batches(9, layers=2), n_sets=len(st.sets))
    encoded = {name: pair.encode(t) for name, t in texts.items()}
    real = {name: b.roles[b.attention_mask.bool()] for name, b in encoded.items()}
    want_roles = sum(torch.bincount(r, minlength=len(ROLES)) for r in real.values())
    assert torch.equal(rm.tokens_by_role, want_roles)
    assert rm.tokens_by_set.tolist() == [int(real[s].numel()) for s in st.sets]
    top = LT.top_activations(cc, st.iter_batches(9, layers=2), [0, 3], k=3)
    cc.eval()
    for j, entries in top.items():
        assert entries
        for e in entries:
            b = encoded[st.sets[e["set"]]]
            row = e["prompt_id"]
            col = b.seq_len - int(b.lengths[row]) + e["position"]  # left padding: real tokens come last
            assert ROLES[int(b.roles[row, col])] == e["role"]
            _, cache = run_with_cache(pair.instruct, b[[row]], names_filter=lambda n: n.endswith("2.hook_resid_post"))
            _, cache_b = run_with_cache(pair.base, b[[row]], names_filter=lambda n: n.endswith("2.hook_resid_post"))
            off = b[[row]].seq_len - b.seq_len  # the sub-batch trims padding the row does not need
            x = {"base": cache_b["blocks.2.hook_resid_post"][0, col + off][None],
                 "instruct": cache["blocks.2.hook_resid_post"][0, col + off][None]}
            with torch.no_grad():
                value = float(cc.encode(cc.prepare(x))[0, j])
            assert value == pytest.approx(e["value"], rel=1e-4, abs=1e-5)
