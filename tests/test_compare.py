"""Base vs instruct comparisons against HF forward passes and means taken by hand."""
from __future__ import annotations

import pytest
import torch

import tiny
from probes.chat import ROLE_ID, encode
from probes.compare import group_masks, instruct_responses, mean_diff, per_token_kl, set_diff
from probes.lens import direction_logits
from probes.pairs import load_pair

PROMPTS = ["how do i make a cake", "tell me about the sun please", "build bomb", "why is the sky"]
RESPONSES = ["sure , bake bread", "ok", "sorry i cannot help with this .", "yes the sun"]
TOL = 1e-5  # fp32 activations, float64 sums


@pytest.fixture(scope="module")
def pairs(tiny_pair_dirs):
    return {arch: load_pair(*tiny_pair_dirs[arch], device="cpu") for arch in ("llama", "gemma2", "gpt2")}


@pytest.fixture(scope="module")
def hf(tiny_pair_dirs):
    return {arch: {w: tiny.hf_model(d) for w, d in zip(("base", "instruct"), tiny_pair_dirs[arch])}
            for arch in ("llama", "gemma2", "gpt2")}


def hf_forward(model, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos, output_hidden_states=True)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("hook", ["resid_pre", "resid_post"])
def test_mean_diff_by_role_matches_hidden_states(arch, hook, pairs, hf, tiny_tokenizer):
    pair = pairs[arch]
    batch = encode(tiny_tokenizer, PROMPTS, responses=RESPONSES)
    L = pair.n_layers
    layers = list(range(L)) if hook == "resid_pre" else list(range(L - 1))  # HF's last hidden state is normed
    res = mean_diff(pair, batch, hook=hook, layers=layers, batch_size=3, progress=False)
    assert res.groups == ["bos", "template", "user", "post_instruction", "response",
                          "post_instruction[-3]", "post_instruction[-2]", "post_instruction[-1]"]
    hs = {w: hf_forward(hf[arch][w], batch).hidden_states for w in ("base", "instruct")}
    for g, group in enumerate(res.groups):
        if "[" in group:
            off = int(group.split("[")[1][:-1])
            idx, _ = batch.positions(f"post_instruction[{off}]")
            mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool).scatter(1, idx, True)
        else:
            mask = batch.roles == ROLE_ID[group]
        assert int(res.counts[g]) == int(mask.sum())
        for li, layer in enumerate(layers):
            h = {w: hs[w][layer if hook == "resid_pre" else layer + 1][mask].double() for w in hs}  # [tokens, d]
            diff = h["instruct"].mean(0) - h["base"].mean(0)
            torch.testing.assert_close(res.diff[g, li], diff, atol=TOL, rtol=0)
            torch.testing.assert_close(res.mean_base[g, li], h["base"].mean(0), atol=TOL, rtol=0)
            base_norm = h["base"].norm(dim=-1).mean()
            torch.testing.assert_close(res.norm_base[g, li], base_norm, atol=TOL, rtol=0)
            torch.testing.assert_close(res.norm_instruct[g, li], h["instruct"].norm(dim=-1).mean(), atol=TOL, rtol=0)
            torch.testing.assert_close(res.relative_norm[g, li], diff.norm() / base_norm, atol=TOL, rtol=0)
    # Cosine between layers, by hand.
    g = res.index("post_instruction[-1]")
    cos = res.layer_cosine("post_instruction[-1]")
    d = res.diff[g]
    for a in range(len(layers)):
        for b in range(len(layers)):
            expected = torch.dot(d[a], d[b]) / (d[a].norm() * d[b].norm())
            torch.testing.assert_close(cos[a, b], expected, atol=1e-12, rtol=0)
    # The lens of the mean difference is the direction lens of that vector.
    lens = res.lens(pair.instruct, "post_instruction[-1]", layers[-1], k=3)
    expected = direction_logits(pair.instruct, res.diff[g, -1])
    assert torch.equal(lens.top_ids, expected.topk(3).indices)


def test_mean_diff_errors(pairs, tiny_tokenizer):
    pair = pairs["llama"]
    batch = encode(tiny_tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="no 'response' tokens"):
        mean_diff(pair, batch, roles=["response"], progress=False)
    with pytest.raises(ValueError, match="unknown role"):
        mean_diff(pair, batch, roles=["assistant"], progress=False)
    with pytest.raises(ValueError, match="layers"):
        mean_diff(pair, batch, layers=[9], progress=False)
    names, masks = group_masks(batch, ["user"], offsets=False)
    assert names == ["user"] and torch.equal(masks[0], batch.roles == ROLE_ID["user"])


def test_set_diff_uses_diff_of_means(pairs, hf, tiny_tokenizer):
    pair = pairs["llama"]
    a, b = encode(tiny_tokenizer, PROMPTS[:2]), encode(tiny_tokenizer, PROMPTS[2:] + ["hello world"])
    got = set_diff(pair.base, a, b, hook="resid_pre", layers=[1, 2], progress=False)
    assert got.shape == (2, 1, pair.d_model) and got.dtype == torch.float64
    means = []
    for batch in (a, b):
        hs = hf_forward(hf["llama"]["base"], batch).hidden_states
        idx, _ = batch.positions("post_instruction[-1]")
        means.append(torch.stack([hs[layer][torch.arange(len(batch)), idx[:, 0]].double().mean(0) for layer in (1, 2)]))
    torch.testing.assert_close(got[:, 0], means[0] - means[1], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_per_token_kl_matches_two_hf_forwards(arch, pairs, hf, tiny_tokenizer):
    pair = pairs[arch]
    batch = encode(tiny_tokenizer, PROMPTS, responses=RESPONSES)
    res = per_token_kl(pair, batch, batch_size=3, pos_chunk=2, progress=False)
    lengths = [len(r.split()) for r in RESPONSES]
    assert res.kl_instruct_base.shape == (4, max(lengths))
    assert res.valid.sum(-1).tolist() == lengths
    lp = {w: torch.log_softmax(hf_forward(hf[arch][w], batch).logits, -1) for w in ("base", "instruct")}
    seq = batch.seq_len
    for r, n in enumerate(lengths):
        for j in range(n):
            p = seq - n - 1 + j  # the position predicting response token j (responses end every row)
            tok = batch.input_ids[r, p + 1]
            assert int(res.response_ids[r, j]) == int(tok)
            li, lb = lp["instruct"][r, p], lp["base"][r, p]
            torch.testing.assert_close(res.kl_instruct_base[r, j], (li.exp() * (li - lb)).sum(), atol=TOL, rtol=0)
            torch.testing.assert_close(res.kl_base_instruct[r, j], (lb.exp() * (lb - li)).sum(), atol=TOL, rtol=0)
            torch.testing.assert_close(res.logprob_instruct[r, j], li[tok], atol=TOL, rtol=0)
            torch.testing.assert_close(res.logprob_base[r, j], lb[tok], atol=TOL, rtol=0)
        assert bool((res.kl_instruct_base[r, n:] == 0).all()) and bool((res.response_ids[r, n:] == -1).all())
    # j = 0 is predicted at post_instruction[-1].
    idx, _ = batch.positions("post_instruction[-1]")
    assert torch.equal(idx[:, 0], torch.tensor([seq - n - 1 for n in lengths]))
    # Mean over the prompts whose response reaches each position, by hand.
    for j in range(max(lengths)):
        rows = [r for r, n in enumerate(lengths) if n > j]
        torch.testing.assert_close(res.mean()[j], res.kl_instruct_base[rows, j].mean(), atol=1e-7, rtol=0)
        assert int(res.counts[j]) == len(rows)


def test_per_token_kl_needs_responses(pairs, tiny_tokenizer):
    with pytest.raises(ValueError, match="no response tokens"):
        per_token_kl(pairs["llama"], encode(tiny_tokenizer, PROMPTS), progress=False)
    partial = encode(tiny_tokenizer, PROMPTS[:2], responses=["ok", ""])
    with pytest.raises(ValueError, match="prompt 1 has no response"):
        per_token_kl(pairs["llama"], partial, progress=False)


def test_instruct_responses_are_hf_greedy(pairs, hf, tiny_tokenizer):
    pair = pairs["llama"]
    batch = encode(tiny_tokenizer, PROMPTS[:3])
    texts = instruct_responses(pair, batch, max_new_tokens=5, progress=False)
    model = hf["llama"]["instruct"]
    for r in range(3):
        one = batch[r]
        with torch.no_grad():
            ids = model.generate(one.input_ids, attention_mask=one.attention_mask, max_new_tokens=5, do_sample=False,
                                 eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
        assert texts[r] and texts[r] == tiny_tokenizer.decode(ids[0, one.seq_len:], skip_special_tokens=True)


@pytest.mark.slow
def test_activation_diff_experiment_on_tiny_pair(tiny_pair_dirs, hf, tiny_tokenizer, tmp_path):
    import json

    base, inst = tiny_pair_dirs["llama"]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(PROMPTS))
    run = tiny.load_experiment("activation_diff").main([
        "--base", str(base), "--instruct", str(inst), "--prompts", str(prompts), "--out", str(tmp_path / "run"),
        "--device", "cpu", "--response", "sure , bake bread"])
    r = json.loads((run.dir / "results.json").read_text())
    # Independent: two HF forwards on prompt + the fixed 4-token response; KL at each predicting position.
    batch = encode(tiny_tokenizer, PROMPTS, responses=["sure , bake bread"] * 4)
    lp = {w: torch.log_softmax(hf_forward(hf["llama"][w], batch).logits, -1) for w in ("base", "instruct")}
    seq = batch.seq_len
    expected = [float((lp["instruct"][:, p].exp() * (lp["instruct"][:, p] - lp["base"][:, p])).sum(-1).mean())
                for p in range(seq - 5, seq - 1)]
    assert r["per_token_kl"] == pytest.approx(expected, abs=TOL, rel=0)
    assert r["per_token_kl_counts"] == [4, 4, 4, 4]
    assert r["token_counts"]["response"] == 16 and "post_instruction[-1]" in r["relative_norm"]
    for fig in ("mean_diff_norm", "mean_diff_layer_cosine", "per_token_kl"):
        assert (run.dir / f"{fig}.html").stat().st_size > 1000


@pytest.mark.slow
def test_activation_diff_experiment_on_toy_pair(tmp_path):
    from probes import toy

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip("toy pair weights are absent (python -m probes.toy.train)")
    import json

    run = tiny.load_experiment("activation_diff").main(["--pair", "toy", "--out", str(tmp_path / "run"), "--device", "cpu"])
    r = json.loads((run.dir / "results.json").read_text())
    assert len(r["per_token_kl"]) >= 1 and all(v >= 0 for v in r["per_token_kl"])
    assert set(r["per_token_kl_by_group"]) == {"harmful", "harmless"}
    assert len(r["relative_norm"]["post_instruction[-1]"]) == 4
