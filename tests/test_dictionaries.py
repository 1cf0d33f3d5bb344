"""Sparse dictionaries over paired activations, on planted synthetic data with known answers (CPU, seconds)."""
import math

import pytest
import torch

from probes.dictionaries import (BatchTopKCrosscoder, DiffSAE, L1Crosscoder, classify, dead_latents, delta_norm, fvu,
                                 latent_scaling, train)

D, ROWS = 32, 256
N_SHARED, N_CHAT, N_BASE = 4, 4, 4
N_FEAT = N_SHARED + N_CHAT + N_BASE


def planted(seed=0, p=1 / 6, chat_in_base=0.0):
    """Orthonormal planted features: shared (same direction and code in both models), chat-only, base-only.
    chat_in_base: the chat features' strength in the base model (0 = truly chat-only)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    dirs = q[:, :N_FEAT].T.contiguous()  # [feature, d]
    in_base = torch.tensor([1.0] * N_SHARED + [chat_in_base] * N_CHAT + [1.0] * N_BASE)
    in_chat = torch.tensor([1.0] * N_SHARED + [1.0] * N_CHAT + [0.0] * N_BASE)

    def batch():
        on = (torch.rand(ROWS, N_FEAT, generator=g) < p).float()
        mag = on * (0.5 + torch.rand(ROWS, N_FEAT, generator=g))
        return {"base": (mag * in_base) @ dirs, "instruct": (mag * in_chat) @ dirs, "prompt_id": torch.zeros(ROWS)}

    return dirs, batch


def fit(dictionary, batch, steps=1000):
    return train(dictionary, lambda: (batch() for _ in range(50)), steps=steps, lr=3e-3, warmup_steps=50,
                 threshold_start_step=100, dead_after_tokens=ROWS * 50, progress=False, seed=0)


def unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    dirs, batch = planted()
    cc = BatchTopKCrosscoder(D, 16, k=2)
    record = fit(cc, batch)
    return cc, dirs, batch, record


def best_latents(cc, dirs):
    """For each planted feature: (latent, cosine) of the best decoder row in the model(s) carrying it."""
    w = cc.W_dec.detach()
    out = []
    for i in range(N_FEAT):
        m = 0 if i >= N_SHARED + N_CHAT else 1  # base-only features live in base's decoder, the rest in chat's
        cos = unit(w[:, m]) @ dirs[i]
        out.append((int(cos.argmax()), float(cos.max())))
    return out


def test_batchtopk_recovers_planted_features_and_delta_norm_classifies_them(trained):
    cc, dirs, batch, record = trained
    assert record.steps == 1000 and record.mse[-1] < 0.05 * record.mse[0]
    best = best_latents(cc, dirs)
    assert min(c for _, c in best) > 0.9
    for i, (j, _) in enumerate(best[:N_SHARED]):  # a shared feature's latent decodes the same direction in base
        assert float(unit(cc.W_dec.detach()[j, 0]) @ dirs[i]) > 0.9
    dn = delta_norm(cc)
    kinds = classify(dn)
    expect = ["shared"] * N_SHARED + ["chat-only"] * N_CHAT + ["base-only"] * N_BASE
    assert [kinds[j] for j, _ in best] == expect
    got = torch.tensor([float(dn[j]) for j, _ in best])
    want = torch.tensor([0.5] * N_SHARED + [1.0] * N_CHAT + [0.0] * N_BASE)
    assert (got - want).abs().max() < 0.05
    # the "sum" form agrees at the anchors
    assert (delta_norm(cc, form="sum")[[j for j, _ in best]] - want).abs().max() < 0.05
    held_out = [batch() for _ in range(5)]
    assert all(v < 0.01 for v in fvu(cc, held_out).values())
    assert dead_latents(cc, held_out).shape == (16,)


def test_batchtopk_keeps_k_per_row_in_training_and_thresholds_at_inference(trained):
    cc, _, batch, record = trained
    x = cc.prepare(batch())
    cc.train()
    f = cc.encode(x)
    assert int((f > 0).sum()) == cc.k * x.shape[0]
    pre = cc.pre_activations(x)
    assert torch.equal(f[f > 0], pre[f > 0])  # kept values are the unscaled pre-activations
    kept_scores = cc.scores(pre)[f > 0]
    dropped = cc.scores(pre)[(f == 0) & (pre > 0)]
    assert dropped.numel() == 0 or dropped.max() <= kept_scores.min()
    cc.eval()
    g = cc.encode(x)
    s = cc.scores(pre)
    assert record.threshold == float(cc.threshold) > 0
    assert torch.equal(g > 0, s > cc.threshold)
    assert torch.equal(g[g > 0], pre[g > 0])


def hand_built():
    """Latent 0: chat-only (d^chat = e0, d^base = 0), reads chat's e0. Latent 1: base-only (d^base = e1), reads
    base's e1. Latent 2: base-only, d^base = e0, reads base's e2 (where the base data puts a copy of e0's code)."""
    cc = BatchTopKCrosscoder(4, 3, k=1)
    with torch.no_grad():
        cc.W_enc.zero_(); cc.b_enc.zero_(); cc.W_dec.zero_(); cc.b_dec.zero_()
        e = torch.eye(4)
        cc.W_enc[1, :, 0] = e[0]; cc.W_dec[0, 1] = e[0]
        cc.W_enc[0, :, 1] = e[1]; cc.W_dec[1, 0] = e[1]
        cc.W_enc[0, :, 2] = e[2]; cc.W_dec[2, 0] = e[0]
        cc.threshold.fill_(0.0)
    cc.set_scales([1.0, 1.0])
    cc.eval()
    return cc


def test_latent_scaling_finds_planted_base_presence_in_error_and_reconstruction():
    cc = hand_built()
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        a = torch.rand(64, generator=g) * (torch.rand(64, generator=g) < 0.5)   # the chat latent's code
        b = torch.rand(64, generator=g) * (torch.rand(64, generator=g) < 0.5)
        chat = torch.zeros(64, 4); chat[:, 0] = a; chat[:, 3] = 0.1 * torch.randn(64, generator=g)
        # error case: base holds 0.3 a e0 that no base latent explains (latent 2 reads e2, which is 0 here)
        base = torch.zeros(64, 4); base[:, 0] = 0.3 * a; base[:, 1] = b
        batches.append({"base": base, "instruct": chat})
    ls = latent_scaling(cc, batches, [0])
    assert ls.kind == ["chat-only"] and abs(float(ls.delta_norm[0]) - 1) < 1e-9
    assert abs(float(ls.beta_error_base[0]) - 0.3) < 1e-6 and abs(float(ls.beta_error_chat[0]) - 1) < 1e-6
    assert abs(float(ls.nu_error[0]) - 0.3) < 0.05 and abs(float(ls.nu_recon[0])) < 0.05
    assert not bool(ls.complete_shrinkage[0]) and not bool(ls.latent_decoupling[0])  # 0.3 < default cut 0.5
    assert bool(latent_scaling(cc, batches, [0], shrinkage_cut=0.2).complete_shrinkage[0])

    # decoupling case: base carries a's code on e2, latent 2 rebuilds 0.6 a e0 in base's reconstruction
    for bt in batches:
        a = bt["instruct"][:, 0]
        bt["base"] = torch.zeros(64, 4)
        bt["base"][:, 2] = 0.6 * a
        bt["base"][:, 0] = 0.6 * a
    ls = latent_scaling(cc, batches, [0])
    assert abs(float(ls.nu_recon[0]) - 0.6) < 0.05 and abs(float(ls.nu_error[0])) < 0.05
    assert bool(ls.latent_decoupling[0]) and not bool(ls.complete_shrinkage[0])


def test_latent_scaling_matches_lstsq_on_a_trained_crosscoder(trained):
    cc, _, batch, _ = trained
    batches = [batch() for _ in range(3)]
    latents = [0, 3, 7]
    ls = latent_scaling(cc, batches, latents)
    with torch.no_grad():
        x = torch.cat([cc.prepare(b) for b in batches]).double()
        cc.eval()
        f = torch.cat([cc.encode(cc.prepare(b)) for b in batches]).double()
        x_hat = torch.cat([cc.decode(cc.encode(cc.prepare(b))) for b in batches]).double()
        w = cc.W_dec.detach().double()
    for n, j in enumerate(latents):
        if not (f[:, j] > 0).any():
            assert math.isnan(float(ls.nu_error[n]))
            continue
        a = (f[:, j, None] * w[j, 1]).reshape(-1, 1)  # f_j(x) d_j^chat, flattened over tokens
        for m, err, rec in ((0, ls.beta_error_base, ls.beta_recon_base), (1, ls.beta_error_chat, ls.beta_recon_chat)):
            y_err = x[:, m] - (x_hat[:, m] - f[:, j, None] * w[j, m])
            assert abs(torch.linalg.lstsq(a, y_err.reshape(-1, 1)).solution.item() - float(err[n])) < 1e-8
            assert abs(torch.linalg.lstsq(a, x_hat[:, m].reshape(-1, 1)).solution.item() - float(rec[n])) < 1e-8


def test_l1_crosscoder_shrinks_a_weakly_shared_feature_that_batchtopk_keeps():
    """Chat features present at 0.4 strength in base: L1 shrinks their base decoder (they look chat-only, Complete
    Shrinkage, which Latent Scaling's ν_ε flags); BatchTopK keeps Δ_norm near the planted 0.8."""
    want_dn = 0.5 * ((1 - 0.4) / 1 + 1)
    results = {}
    for name, make in (("topk", lambda: BatchTopKCrosscoder(D, 16, k=2)), ("l1", lambda: L1Crosscoder(D, 16, l1=3.0))):
        torch.manual_seed(0)
        dirs, batch = planted(seed=3, chat_in_base=0.4)
        cc = make()
        fit(cc, batch)
        best = best_latents(cc, dirs)[N_SHARED:N_SHARED + N_CHAT]
        idx = [j for j, c in best if c > 0.9]
        assert len(idx) >= 3, best
        ls = latent_scaling(cc, [batch() for _ in range(10)], idx, shrinkage_cut=0.2)
        # β is measured in the normalised space: the planted 0.4 times base's scale over chat's
        want_nu = 0.4 * float(cc.scales[0] / cc.scales[1])
        results[name] = (delta_norm(cc)[idx], ls, want_nu)
    dn, ls, want_nu = results["topk"]
    assert (dn - want_dn).abs().max() < 0.03 and all(k != "chat-only" for k in ls.kind)
    assert (ls.nu_error - want_nu).abs().max() < 0.01 and not ls.complete_shrinkage.any()
    dn, ls, want_nu = results["l1"]
    assert dn.min() > 0.9 and all(k == "chat-only" for k in ls.kind)
    assert (ls.nu_error - want_nu).abs().max() < 0.05 and ls.complete_shrinkage.all()


def test_diff_sae_recovers_the_chat_minus_base_features():
    torch.manual_seed(0)
    dirs, batch = planted(p=0.25)  # 8 features differ, so 2 per row on average: k
    sae = DiffSAE(D, 16, k=2)
    rec = fit(sae, batch)
    assert rec.mse[-1] < 0.05 * rec.mse[0]
    assert torch.allclose(sae.W_dec.detach().norm(dim=-1), torch.ones(16, 1), atol=1e-5)  # unit decoder kept
    # instruct - base = chat-only features minus base-only features; shared ones cancel
    w = unit(sae.W_dec.detach()[:, 0])
    for i in range(N_SHARED, N_FEAT):
        assert (w @ dirs[i]).abs().max() > 0.9
    held_out = [batch() for _ in range(5)]
    alive = ~dead_latents(sae, held_out)
    assert (w[alive] @ dirs[:N_SHARED].T).abs().max() < 0.2  # no live latent for a shared feature
    assert list(fvu(sae, held_out)) == ["instruct-base"] and fvu(sae, held_out)["instruct-base"] < 0.02


def test_bad_input_raises_before_training():
    with pytest.raises(ValueError, match="k must be"):
        BatchTopKCrosscoder(8, 4, k=5)
    with pytest.raises(ValueError, match="d_model"):
        BatchTopKCrosscoder(0, 4, k=1)
    cc = BatchTopKCrosscoder(8, 4, k=1)
    before = cc.W_enc.detach().clone()
    good = {"base": torch.randn(5, 8), "instruct": torch.randn(5, 8)}
    for bad, msg in (({"base": torch.randn(5, 8)}, "lacks"),
                     ({"base": torch.randn(5, 7), "instruct": torch.randn(5, 7)}, r"\[rows, 8\]"),
                     ({"base": torch.randn(5, 8), "instruct": torch.randn(4, 8)}, "row counts"),
                     ({"base": torch.full((5, 8), float("nan")), "instruct": torch.randn(5, 8)}, "NaN")):
        with pytest.raises(ValueError, match=msg):
            train(cc, [good, bad], steps=5, progress=False)  # the bad one is checked before the first step
    assert torch.equal(cc.W_enc.detach(), before) and torch.isnan(cc.scales).all()
    with pytest.raises(ValueError, match="steps"):
        train(cc, [good], steps=0, progress=False)
    with pytest.raises(ValueError, match="no activation scales"):
        fvu(cc, [good])
    with pytest.raises(ValueError, match="latents must be"):
        cc.set_scales([1.0, 1.0])
        latent_scaling(cc, [good], [9])
