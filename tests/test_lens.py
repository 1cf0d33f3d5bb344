"""Logit lens parity: every reported number against HF forward passes and hand computations with HF modules."""
from __future__ import annotations

import pytest
import torch

import tiny
from probes.chat import encode
from probes.lens import (Head, direction_lens, direction_logits, logit_lens, paired_lens, token_ids)
from probes.pairs import load_pair

PROMPTS = ["how do i make a cake", "tell me about the sun please", "build bomb"]
TOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def pairs(tiny_pair_dirs):
    return {arch: load_pair(b, i, device="cpu") for arch, (b, i) in tiny_pair_dirs.items()}


@pytest.fixture(scope="module")
def hf(tiny_pair_dirs):
    return {arch: {w: tiny.hf_model(d) for w, d in zip(("base", "instruct"), dirs)}
            for arch, dirs in tiny_pair_dirs.items()}


def hf_forward(model, batch):
    """HF hidden states and logits, with the positions the bridge derives from the left-padded mask."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos, output_hidden_states=True)


def hf_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def hand_logprobs(model, resid):
    """Final norm (HF module), lm_head weight, soft-cap by hand, log-softmax: `[..., d]` -> `[..., vocab]`."""
    with torch.no_grad():
        logits = hf_norm(model)(resid) @ model.lm_head.weight.T
        if model.lm_head.bias is not None:
            logits = logits + model.lm_head.bias
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return torch.log_softmax(logits, -1)


def gather(x, idx):
    """x `[b, seq, ...]`, idx `[b, k]` -> `[b, k, ...]`."""
    return x[torch.arange(x.shape[0])[:, None], idx]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_last_layer_lens_is_the_model_output(arch, pairs, hf, tiny_tokenizer):
    pair = pairs[arch]
    batch = encode(tiny_tokenizer, PROMPTS)
    res = logit_lens(pair.instruct, batch, positions="post_instruction", keep_logprobs=True, progress=False)
    idx, _ = batch.positions("post_instruction")
    real = torch.log_softmax(gather(hf_forward(hf[arch]["instruct"], batch).logits, idx), -1)
    assert res.logprobs.shape == (3, pair.n_layers, 3, pair.d_vocab)
    torch.testing.assert_close(res.logprobs[:, -1], real, atol=TOL, rtol=0)
    # The final layer's KL to the final distribution is zero by definition.
    assert res.kl_to_final[:, -1].abs().max() <= TOL


@pytest.mark.parametrize("arch", tiny.ARCHS)
@pytest.mark.parametrize("hook", ["resid_pre", "resid_post"])
def test_every_layer_matches_hand_computation(arch, hook, pairs, hf, tiny_tokenizer):
    pair, model = pairs[arch], hf[arch]["instruct"]
    batch = encode(tiny_tokenizer, PROMPTS)
    targets = token_ids(tiny_tokenizer, ["sorry", "sure", "cake"])
    res = logit_lens(pair.instruct, batch, hook=hook, positions=["user[0]", "post_instruction[-1]"],
                     targets=targets, top_k=4, keep_logprobs=True, batch_size=2, pos_chunk=1, progress=False)
    out = hf_forward(model, batch)
    idx, _ = batch.positions(["user[0]", "post_instruction[-1]"])
    final = torch.log_softmax(gather(out.logits, idx), -1)
    L = pair.n_layers
    # hidden_states[l] = resid_pre l; resid_post l = hidden_states[l + 1] except the last (HF's is after the norm).
    layers = range(L) if hook == "resid_pre" else range(L - 1)
    for layer in layers:
        h = out.hidden_states[layer if hook == "resid_pre" else layer + 1]
        lp = hand_logprobs(model, gather(h, idx))  # [b, k, vocab]
        torch.testing.assert_close(res.logprobs[:, layer], lp, atol=TOL, rtol=0)
        p = lp.exp()
        torch.testing.assert_close(res.entropy[:, layer], -(p * lp).sum(-1), atol=TOL, rtol=0)
        torch.testing.assert_close(res.kl_to_final[:, layer], (final.exp() * (final - lp)).sum(-1), atol=TOL, rtol=0)
        order = lp.argsort(-1, descending=True)
        assert torch.equal(res.topk_ids[:, layer], order[..., :4])
        torch.testing.assert_close(res.topk_logprobs[:, layer], lp.gather(-1, order[..., :4]), atol=TOL, rtol=0)
        for j, t in enumerate(targets):
            rank_by_sort = (order == t).float().argmax(-1)  # position of the target in the sorted vocabulary
            assert torch.equal(res.target_rank[:, layer, :, j], rank_by_sort)
            torch.testing.assert_close(res.target_logprob[:, layer, :, j], lp[..., t], atol=TOL, rtol=0)
    assert torch.equal(res.token_ids, gather(batch.input_ids, idx))
    assert res.positions == ["user[0]", "post_instruction[-1]"]


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_paired_kl_and_first_differing_layer(arch, pairs, hf, tiny_tokenizer):
    pair = pairs[arch]
    batch = encode(tiny_tokenizer, PROMPTS)
    res = paired_lens(pair, batch, positions="post_instruction", batch_size=2, progress=False)
    idx, _ = batch.positions("post_instruction")
    outs = {w: hf_forward(hf[arch][w], batch) for w in ("base", "instruct")}
    L = pair.n_layers
    top1 = {w: [] for w in outs}
    for layer in range(L):
        lp = {}
        for w, out in outs.items():
            if layer < L - 1:
                lp[w] = hand_logprobs(hf[arch][w], gather(out.hidden_states[layer + 1], idx))
            else:
                lp[w] = torch.log_softmax(gather(out.logits, idx), -1)
            top1[w].append(lp[w].argmax(-1))
        kib = (lp["instruct"].exp() * (lp["instruct"] - lp["base"])).sum(-1)
        kbi = (lp["base"].exp() * (lp["base"] - lp["instruct"])).sum(-1)
        torch.testing.assert_close(res.kl_instruct_base[:, layer], kib, atol=TOL, rtol=0)
        torch.testing.assert_close(res.kl_base_instruct[:, layer], kbi, atol=TOL, rtol=0)
    assert (res.kl_instruct_base - res.kl_base_instruct).abs().max() > 1e-4  # the two directions really differ
    expected = torch.full(idx.shape, -1)
    for r in range(idx.shape[0]):
        for c in range(idx.shape[1]):
            for layer in range(L):
                if top1["base"][layer][r, c] != top1["instruct"][layer][r, c]:
                    expected[r, c] = layer
                    break
    assert torch.equal(res.first_diff_layer, expected)
    assert torch.equal(res.base.top1, torch.stack(top1["base"], 1))


def test_first_differing_layer_is_minus_one_for_identical_models(pairs, tiny_pair_dirs, tiny_tokenizer):
    base_dir = tiny_pair_dirs["llama"][0]
    same = load_pair(base_dir, base_dir, device="cpu")
    res = paired_lens(same, encode(tiny_tokenizer, PROMPTS), progress=False)
    assert torch.equal(res.first_diff_layer, torch.full((3, 1), -1))
    assert res.kl_instruct_base.abs().max() <= TOL


def test_all_positions_of_one_prompt(pairs, hf, tiny_tokenizer):
    batch = encode(tiny_tokenizer, PROMPTS)[1:2]
    res = logit_lens(pairs["qwen2"].base, batch, positions="all", top_k=2, progress=False)
    out = hf_forward(hf["qwen2"]["base"], batch)
    assert res.positions == [str(i) for i in range(batch.seq_len)]
    assert torch.equal(res.token_ids[0], batch.input_ids[0])
    lp = torch.log_softmax(out.logits, -1)
    torch.testing.assert_close(res.topk_logprobs[:, -1], lp.topk(2, -1).values, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_direction_lens_by_hand(arch, pairs, hf):
    model = hf[arch]["instruct"]
    v = torch.randn(pairs[arch].d_model, generator=torch.Generator().manual_seed(0))
    norm = hf_norm(model)
    if arch in ("gemma2", "gemma3"):
        g = 1 + norm.weight  # Gemma's RMSNorm scales by (1 + w)
    else:
        g = norm.weight
    u = v - v.mean() if arch == "gpt2" else v  # LayerNorm removes the mean of its input
    expected = model.lm_head.weight.double() @ (u * g).double()
    got = direction_logits(pairs[arch].instruct, v)
    torch.testing.assert_close(got, expected.detach(), atol=TOL, rtol=0)  # g is probed through the fp32 norm module
    plain = direction_logits(pairs[arch].instruct, v, apply_norm_weight=False)
    torch.testing.assert_close(plain, (model.lm_head.weight.double() @ u.double()).detach(), atol=TOL, rtol=0)  # g is probed through the fp32 norm module
    dl = direction_lens(pairs[arch].instruct, v, k=3)
    order = expected.argsort(descending=True)
    assert torch.equal(dl.top_ids, order[:3]) and torch.equal(dl.bottom_ids, order.flip(0)[:3])
    torch.testing.assert_close(dl.top_logits, expected[order[:3]].detach(), atol=TOL, rtol=0)  # g is probed through the fp32 norm module


def test_bad_input(pairs, tiny_tokenizer, monkeypatch):
    model = pairs["llama"].instruct
    batch = encode(tiny_tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="hook"):
        logit_lens(model, batch, hook="attn_out", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, batch, layers=[7], progress=False)
    with pytest.raises(ValueError, match="unpadded"):
        logit_lens(model, batch, positions="all", progress=False)
    with pytest.raises(ValueError, match="targets"):
        logit_lens(model, batch, targets=torch.zeros(2, 1, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="out of range"):
        logit_lens(model, batch, targets=[10_000], progress=False)
    with pytest.raises(ValueError, match="top_k"):
        logit_lens(model, batch, top_k=0, progress=False)
    with pytest.raises(ValueError, match="response"):
        logit_lens(model, batch, positions="response[0]", progress=False)
    monkeypatch.setattr("probes.lens.MAX_KEPT_LOGPROBS", 10)
    with pytest.raises(ValueError, match="keep_logprobs"):
        logit_lens(model, batch, keep_logprobs=True, progress=False)
    with pytest.raises(ValueError, match="shape"):
        direction_logits(model, torch.ones(3))
    with pytest.raises(FloatingPointError):
        direction_logits(model, torch.full((64,), float("nan")))
    with pytest.raises(ValueError, match="not one"):
        token_ids(tiny_tokenizer, "sorry cannot")


def test_head_reads_softcap_and_copies_to_another_device(pairs):
    head = Head.from_model(pairs["gemma2"].instruct)
    assert head.to("cpu") is head
    assert Head.from_model(pairs["llama"].instruct).softcap is None
    assert head.softcap == 5.0
    meta = head.to("meta")
    assert meta.weight.device.type == "meta" and head.weight.device.type == "cpu"


@pytest.mark.slow
def test_logit_lens_experiment_on_tiny_pair(tiny_pair_dirs, hf, tiny_tokenizer, tmp_path):
    import json

    base, inst = tiny_pair_dirs["llama"]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(PROMPTS))
    run = tiny.load_experiment("logit_lens").main(["--base", str(base), "--instruct", str(inst), "--prompts", str(prompts),
                                              "--out", str(tmp_path / "run"), "--device", "cpu"])
    results = json.loads((run.dir / "results.json").read_text())
    # Independent: HF forwards of both models, lens by hand at post_instruction[-1], mean over prompts.
    batch = encode(tiny_tokenizer, PROMPTS)
    idx, _ = batch.positions("post_instruction[-1]")
    outs = {w: hf_forward(hf["llama"][w], batch) for w in ("base", "instruct")}
    expected = []
    for layer in range(3):
        lp = {}
        for w, out in outs.items():
            src = out.hidden_states[layer + 1] if layer < 2 else None
            lp[w] = (hand_logprobs(hf["llama"][w], gather(src, idx)) if src is not None
                     else torch.log_softmax(gather(out.logits, idx), -1))[:, 0]
        expected.append(float((lp["instruct"].exp() * (lp["instruct"] - lp["base"])).sum(-1).double().mean()))
    assert results["kl_instruct_base"] == pytest.approx(expected, abs=TOL, rel=0)
    assert len(results["kl_base_instruct"]) == 3 and results["positions"][-1] == "post_instruction[-1]"
    for fig in ("layer_lines", "kl_post_instruction", "lens_p_0", "kl_p_0"):
        assert (run.dir / f"{fig}.html").stat().st_size > 1000
    assert (run.dir / "index.html").exists()


@pytest.mark.slow
def test_logit_lens_experiment_on_toy_pair(tmp_path):
    from probes import toy

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip("toy pair weights are absent (python -m probes.toy.train)")
    import json

    run = tiny.load_experiment("logit_lens").main(["--pair", "toy", "--out", str(tmp_path / "run"), "--device", "cpu",
                                              "--examples", "1"])
    r = json.loads((run.dir / "results.json").read_text())
    assert len(r["kl_instruct_base"]) == 4 and all(v >= 0 for v in r["kl_instruct_base"])
    assert set(r["kl_instruct_base_by_group"]) == {"harmful", "harmless"}
    assert r["n_prompts"] == len(toy.prompts("harmful", "test")) + len(toy.prompts("harmless", "test"))
