"""Attention mass by chat-template region, and head patching, against raw HF forward passes."""
from __future__ import annotations

import json

import pytest
import torch

import tiny
from probes import attention as A
from probes.chat import ROLE_ID, encode
from probes.pairs import load_model
from probes.plots import attention as P

HARMFUL = ["how do i make a bomb", "help me steal a car please", "build a bomb"]
HARMLESS = ["how do i bake bread", "write a poem about the sun and moon", "tell me a story"]
PROMPTS = ["hello world", "how do i make a cake please explain", "tell me about the sun"]
RESPONSES = ["sure ok", "ok yes", "sorry i cannot"]
ATOL = 1e-6  # float32 patterns; the bridge's pattern equals HF's, the sums differ only in summation order


@pytest.fixture(scope="module")
def models(tiny_pair_dirs):
    """{arch: (bridge, hf model)} of the base model of each tiny pair."""
    return {arch: (load_model(dirs[0], device="cpu"), tiny.hf_model(dirs[0])) for arch, dirs in tiny_pair_dirs.items()}


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    # Different lengths (left padding), a system prompt and responses: every region is populated.
    return encode(tiny_tokenizer, PROMPTS, system="please help", responses=RESPONSES)


def hf_forward(hf, b, **kwargs):
    pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)  # the bridge derives positions from the mask
    with torch.no_grad():
        return hf(b.input_ids, attention_mask=b.attention_mask, position_ids=pos, **kwargs)


def hand_mass(hf, b, spec) -> torch.Tensor:
    """`[prompt, layer, head, k, region]` from HF output_attentions, by explicit loops over keys."""
    att = hf_forward(hf, b, output_attentions=True).attentions
    qpos = b.positions(spec)[0]
    out = torch.zeros(len(b), len(att), att[0].shape[1], qpos.shape[1], len(A.REGIONS), dtype=torch.float64)
    for i in range(len(b)):
        for ri, region in enumerate(A.REGIONS):
            keys = [s for s in range(b.seq_len) if int(b.roles[i, s]) == ROLE_ID[region]]
            for j in range(qpos.shape[1]):
                q = int(qpos[i, j])
                for layer, a in enumerate(att):
                    out[i, layer, :, j, ri] = a[i, :, q, keys].double().sum(-1) if keys else 0.0
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_mass_matches_hf_output_attentions(models, batch, arch):
    model, hf = models[arch]
    spec = ["post_instruction", "user[-1]", "response[0:2]"]
    m = A.attention_mass(model, batch, spec, keep="all", batch_size=2, progress=False)
    expected = hand_mass(hf, batch, spec)
    assert m.positions == ["post_instruction[-3]", "post_instruction[-2]", "post_instruction[-1]", "user[-1]",
                           "response[0]", "response[1]"]
    assert m.per_prompt.shape == (3, 3, 4, 6, 6)  # query heads (4), not key/value heads (2 with GQA)
    torch.testing.assert_close(m.per_prompt.double(), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(m.full, expected.mean(0), atol=ATOL, rtol=0)
    torch.testing.assert_close(m.sums, expected.sum(0), atol=3 * ATOL, rtol=0)
    # Every region is populated in this batch and the rows sum to 1 over regions.
    assert bool((expected.sum((0, 1, 2, 3)) > 0).all())
    torch.testing.assert_close(m.per_prompt.double().sum(-1), torch.ones(3, 3, 4, 6, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_gqa_heads_are_query_heads(models, batch):
    model, _ = models["qwen2"]
    assert model.cfg.n_key_value_heads == 2 and model.cfg.n_heads == 4
    m = A.attention_mass(model, batch, progress=False)
    assert m.meta["n_key_value_heads"] == 2
    # Query heads sharing a key/value head still attend differently (they have their own queries).
    mean = m.mean()
    assert not torch.allclose(mean[:, 0], mean[:, 1], atol=1e-3)


def test_gemma2_sliding_window_layers_mask_far_keys(models, batch):
    model, hf = models["gemma2"]
    window = hf.config.sliding_window
    sliding = [i for i, t in enumerate(hf.config.layer_types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(hf.config.layer_types) if t == "full_attention"]
    assert sliding and full
    m = A.attention_mass(model, batch, "post_instruction[-1]", keep="all", progress=False)
    q = batch.positions("post_instruction[-1]")[0][:, 0]
    first = batch.attention_mask.argmax(-1)  # BOS column of each row
    assert bool((q - first >= window).all())  # BOS lies outside the window for every prompt
    bos = A.REGIONS.index("bos")
    assert float(m.per_prompt[:, sliding, :, 0, bos].abs().max()) == 0.0
    assert float(m.per_prompt[:, full, :, 0, bos].min()) > 0.0


def test_padding_does_not_leak(models, batch):
    model, _ = models["llama"]
    together = A.attention_mass(model, batch, "post_instruction", keep="all", progress=False)
    for i in range(len(batch)):
        alone = A.attention_mass(model, batch[i], "post_instruction", keep="all", progress=False)
        assert batch[i].seq_len < batch.seq_len or i == 1  # the other rows lose their padding
        torch.testing.assert_close(together.per_prompt[i], alone.per_prompt[0], atol=ATOL, rtol=0)


def test_visible_padding_is_refused(models, batch):
    model, _ = models["llama"]
    from dataclasses import replace

    leaky = replace(batch, attention_mask=torch.ones_like(batch.attention_mask))  # pads no longer masked
    with pytest.raises(ValueError, match="pad"):
        A.attention_mass(model, leaky, progress=False)


def test_without_bos_renormalises(models, batch):
    model, _ = models["llama"]
    m = A.attention_mass(model, batch, "post_instruction", keep="all", progress=False)
    nb = m.without("bos")
    assert nb.regions == [r for r in A.REGIONS if r != "bos"]
    x = m.per_prompt.double()
    hand = x[..., 1:] / (1.0 - x[..., :1])  # rows sum to 1, so the rest is 1 - bos
    torch.testing.assert_close(nb.per_prompt.double(), hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(nb.full, hand.mean(0), atol=1e-5, rtol=0)
    # Sink-corrected: each prompt's row sums to 1 over the regions other than BOS.
    torch.testing.assert_close(nb.per_prompt.double().sum(-1), torch.ones(x.shape[:-1], dtype=torch.float64),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="keep='all'"):
        A.attention_mass(model, batch, progress=False).without("bos")


def test_summaries_shift_and_ranking(models, tiny_tokenizer):
    model, hf = models["llama"]
    harmful, harmless = encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)
    a = A.attention_mass(model, harmful, "post_instruction", progress=False)
    b = A.attention_mass(model, harmless, "post_instruction", progress=False)
    ha, hb = hand_mass(hf, harmful, "post_instruction"), hand_mass(hf, harmless, "post_instruction")
    torch.testing.assert_close(A.shift(a, b), ha.mean((0, 3)) - hb.mean((0, 3)), atol=ATOL, rtol=0)
    torch.testing.assert_close(A.shift(a, b, "post_instruction[-1]"), ha[:, :, :, -1].mean(0) - hb[:, :, :, -1].mean(0),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(a.region("user"), ha[..., A.REGIONS.index("user")].mean((0, 3)), atol=ATOL, rtol=0)
    torch.testing.assert_close(a.per_layer("post_instruction[-1]"), ha[:, :, :, -1].mean((0, 2)), atol=ATOL, rtol=0)
    # Standard error over prompts: sample std / sqrt(n).
    torch.testing.assert_close(a.sem(), ha.std(0) / 3 ** 0.5, atol=1e-6, rtol=0)
    # "mean(role)" queries: the average of that role's query rows (all rows have 3 post-instruction tokens here).
    mq = A.attention_mass(model, harmful, "mean(post_instruction)", progress=False)
    assert mq.positions == ["mean(post_instruction)"]
    torch.testing.assert_close(mq.full[:, :, 0], ha.mean((0, 3)), atol=ATOL, rtol=0)
    c = A.attention_mass(model, harmless, "post_instruction[-1]", progress=False)
    with pytest.raises(ValueError, match="positions"):
        A.shift(a, c)

    d = torch.tensor([[0.1, -0.5], [0.3, 0.0]])
    assert A.rank_heads(d) == [(0, 1, pytest.approx(-0.5)), (1, 0, pytest.approx(0.3)), (0, 0, pytest.approx(0.1)),
                               (1, 1, 0.0)]
    assert A.rank_heads(d, 1, by="pos") == [(1, 0, pytest.approx(0.3))]
    assert A.rank_heads(d, 1, by="neg", layers=[5, 7]) == [(5, 1, pytest.approx(-0.5))]
    with pytest.raises(ValueError):
        A.rank_heads(torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        A.rank_heads(torch.tensor([[float("nan")]]))


def test_bad_input(models, batch):
    model, _ = models["llama"]
    with pytest.raises(ValueError, match="empty"):
        A.attention_mass(model, batch[0:0], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        A.attention_mass(model, batch, layers=[7], progress=False)
    with pytest.raises(ValueError, match="region"):
        A.attention_mass(model, batch, regions=["pad"], progress=False)
    with pytest.raises(ValueError, match="position spec"):
        A.attention_mass(model, batch, "nonsense[0]", progress=False)
    with pytest.raises(ValueError, match="keep"):
        A.attention_mass(model, batch, keep="some", progress=False)
    m = A.attention_mass(model, batch, progress=False)
    with pytest.raises(ValueError, match="not recorded"):
        m.at("user[0]")
    with pytest.raises(ValueError, match="out of range"):
        A.head_patching(model, batch, batch, [(0, 9)], score_fn=A.logodds_score([1]))
    with pytest.raises(ValueError, match="no heads"):
        A.head_patching(model, batch, batch, [], score_fn=A.logodds_score([1]))


def test_layer_subset_matches_full(models, batch):
    model, _ = models["qwen2"]
    full = A.attention_mass(model, batch, progress=False)
    part = A.attention_mass(model, batch, layers=[1], progress=False)  # stops after block 1
    torch.testing.assert_close(part.sums[0], full.sums[1], atol=0, rtol=0)


def test_prompt_patterns_match_hf(models, batch):
    model, hf = models["qwen2"]
    att = hf_forward(hf, batch, output_attentions=True).attentions
    row = 0
    keep = batch.attention_mask[row].bool()
    pats = A.prompt_patterns(model, batch, row, [(2, 3), (0, 1)])
    assert list(pats) == [(2, 3), (0, 1)]
    for (layer, head), p in pats.items():
        torch.testing.assert_close(p, att[layer][row, head][keep][:, keep], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- patching

def hf_head_inputs(hf, b) -> list[torch.Tensor]:
    """Per-layer input of each attention output projection `[batch, seq, n_heads * d_head]` (HF hooks)."""
    got = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args: got.append(args[0].clone()))
             for layer in hf.model.layers]
    try:
        hf_forward(hf, b)
    finally:
        for h in hooks:
            h.remove()
    return got


def hf_patched_last_logits(hf, b, replace_fn) -> torch.Tensor:
    """Last-position logits with each layer's o_proj input rewritten by `replace_fn(layer, x) -> x`."""
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda mod, args, li=li: (replace_fn(li, args[0]),))
             for li, layer in enumerate(hf.model.layers)]
    try:
        return hf_forward(hf, b).logits[:, -1]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_last_logits_match_hf(models, batch, arch):
    model, hf = models[arch]
    torch.testing.assert_close(A.last_logits(model, batch, position="last"), hf_forward(hf, batch).logits[:, -1],
                               atol=1e-5, rtol=0)


def test_logodds_score_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits.double(), -1)[:, [1, 3]].sum(-1)
    torch.testing.assert_close(A.logodds_score([3, 1, 1])(logits), torch.log(p / (1 - p)), atol=1e-12, rtol=0)
    with pytest.raises(ValueError):
        A.logodds_score([9])(logits)
    with pytest.raises(ValueError):
        A.logodds_score([])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_head_patching_matches_hf(models, tiny_tokenizer, arch):
    model, hf = models[arch]
    target, source = encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)
    heads = [(1, 2), (0, 0), (2, 3), (1, 0)]
    score = A.logodds_score(tiny_tokenizer(["sorry"], add_special_tokens=False)["input_ids"][0])
    res = A.head_patching(model, target, source, heads, score_fn=score, individually=True, batch_size=2,
                          progress=False)
    assert res.positions == ["post_instruction[-3]", "post_instruction[-2]", "post_instruction[-1]"]

    # Independent: mean o_proj input over harmless prompts at the post-instruction offsets, written into HF.
    d_head = model.cfg.d_head
    src_pos = source.positions("post_instruction")[0]
    tgt_pos = target.positions("post_instruction")[0]
    src_in = hf_head_inputs(hf, source)
    means = [x[torch.arange(len(source))[:, None], src_pos].double().mean(0) for x in src_in]  # [k, H*d]

    def patcher(chosen):
        def fn(layer, x):
            x = x.clone()
            for lh, h in chosen:
                if lh == layer:
                    sl = slice(h * d_head, (h + 1) * d_head)
                    for i in range(len(target)):
                        x[i, tgt_pos[i], sl] = means[layer][:, sl].float()
            return x
        return fn

    clean = score(hf_forward(hf, target).logits[:, -1])
    torch.testing.assert_close(res.clean, clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.patched, score(hf_patched_last_logits(hf, target, patcher(heads))), atol=1e-5,
                               rtol=0)
    for h in heads:
        torch.testing.assert_close(res.per_head[h], score(hf_patched_last_logits(hf, target, patcher([h]))),
                                   atol=1e-5, rtol=0)
    assert abs(res.effect) > 1e-3  # the patch does something measurable on random weights
    assert res.effect == pytest.approx(float((res.patched - res.clean).mean()))


def test_patching_with_own_values_changes_nothing(models, tiny_tokenizer):
    model, _ = models["llama"]
    one = encode(tiny_tokenizer, HARMFUL[:1])
    score = A.logodds_score([5, 6])
    all_heads = [(layer, h) for layer in range(3) for h in range(4)]
    res = A.head_patching(model, one, one, all_heads, score_fn=score, progress=False)
    torch.testing.assert_close(res.patched, res.clean, atol=1e-6, rtol=0)


def test_patching_every_head_everywhere_with_another_prompt(models, tiny_tokenizer):
    """All heads at all positions take prompt A's outputs in prompt B's run: every attention output is then A's
    (embeddings and MLPs still see B, so the logits are not A's); the logits equal HF with A's o_proj inputs."""
    model, hf = models["qwen2"]
    a, b = encode(tiny_tokenizer, ["how do i make a bomb"]), encode(tiny_tokenizer, ["how do i bake a cake"])
    assert a.seq_len == b.seq_len
    heads = [(layer, h) for layer in range(3) for h in range(4)]
    z_a: dict = {}

    def grab(layer):
        def fn(z, hook):
            z_a[layer] = z.clone()
        return fn

    attn_a: dict = {}
    attn_b: dict = {}

    def grab_out(store, layer):
        def fn(x, hook):
            store[layer] = x.clone()
        return fn

    with model.hooks(fwd_hooks=[(A.Z_HOOK.format(layer=layer), grab(layer)) for layer in range(3)]
                     + [(f"blocks.{layer}.hook_attn_out", grab_out(attn_a, layer)) for layer in range(3)]):
        A.last_logits(model, a, position="last")
    pos = torch.arange(b.seq_len)[None]
    values = {(layer, h): z_a[layer][:, :, h] for layer, h in heads}  # [1, seq, d_head]
    hooks = A.z_patch_hooks(heads, pos, values)
    with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_attn_out", grab_out(attn_b, layer)) for layer in range(3)]):
        patched = A.last_logits(model, b, hooks, position="last")
    for layer in range(3):
        torch.testing.assert_close(attn_b[layer], attn_a[layer], atol=1e-6, rtol=0)
    a_in = hf_head_inputs(hf, a)
    torch.testing.assert_close(patched, hf_patched_last_logits(hf, b, lambda layer, x: a_in[layer]), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- figures

def test_figures():
    base, inst = torch.rand(3, 4), torch.rand(3, 4)
    fig = P.mass_heatmaps(base, inst, region="post_instruction", data="toy harmful")
    assert len(fig.data) == 3
    torch.testing.assert_close(torch.tensor(fig.data[2].z), (inst - base).double())
    assert fig.data[2].zmid == 0
    with pytest.raises(ValueError):
        P.mass_heatmaps(base, torch.rand(2, 4), region="user")
    fig = P.shift_heatmap(inst - base, title="t", sem=torch.rand(3, 4))
    assert fig.data[0].zmid == 0 and "±" in fig.data[0].customdata[0][0]
    per_layer = torch.softmax(torch.randn(3, 6), -1)
    fig = P.region_bars({"base": per_layer, "instruct": per_layer}, A.REGIONS)
    assert len(fig.data) == 12 and fig.layout.barmode == "stack"
    stacked = sum(torch.tensor(tr.y) for tr in fig.data[:6])
    torch.testing.assert_close(stacked, torch.ones(3, dtype=torch.float64))
    pats = {(0, 1): torch.rand(3, 3), (2, 0): torch.rand(3, 3)}
    fig = P.attention_viewer(pats, ["<bos>", "a", "b"], ["bos", "user", "post_instruction"], title="x")
    assert len(fig.data) == 2 and fig.data[0].visible and not fig.data[1].visible
    assert len(fig.layout.updatemenus[0].buttons) == 2
    assert "user" in fig.layout.annotations[0].text
    with pytest.raises(ValueError):
        P.attention_viewer(pats, ["a", "b"], ["user", "user"])
    fig = P.patching_bars({"top": -1.0, "control": 0.1}, title="p")
    assert list(fig.data[0].x) == ["top", "control"]


# ---------------------------------------------------------------------------------------------- experiment

@pytest.mark.slow
def test_experiment_on_tiny_pair(tiny_pair_dirs, tmp_path):
    main = tiny.load_experiment("template_attention").main
    base, inst = tiny_pair_dirs["llama"]
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL))
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS))
    out = tmp_path / "run"
    main(["--base", str(base), "--instruct", str(inst), "--harmful", str(tmp_path / "harmful.txt"),
          "--harmless", str(tmp_path / "harmless.txt"), "--out", str(out), "--device", "cpu", "--top-k", "2"])
    r = json.loads((out / "results.json").read_text())
    for key in ("mass", "shift_harmful_minus_harmless", "shift_instruct_minus_base", "top_heads", "patching",
                "per_layer"):
        assert key in r
    # The reported masses are the hand computation from HF attentions.
    tok = tiny.make_tokenizer()
    for which, folder in (("base", base), ("instruct", inst)):
        hand = hand_mass(tiny.hf_model(folder), encode(tok, HARMFUL), "post_instruction[-1]").mean(0)[:, :, 0]
        for ri, region in enumerate(A.REGIONS):
            torch.testing.assert_close(torch.tensor(r["mass"][which]["harmful"][region], dtype=torch.float64),
                                       hand[..., ri], atol=ATOL, rtol=0)
    assert len(r["top_heads"]["harmful_minus_harmless_instruct"]) == 2
    for name in ("mass_post_instruction_harmful", "shift_harmful_minus_harmless_instruct", "region_bars",
                 "attention_viewer", "patching"):
        assert (out / f"{name}.html").exists()


@pytest.mark.slow
def test_experiment_on_toy_pair(tmp_path):
    from probes import toy

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip("toy pair weights absent (train with python -m probes.toy.train)")
    main = tiny.load_experiment("template_attention").main
    out = tmp_path / "toy"
    main(["--pair", "toy", "--out", str(out), "--device", "cpu", "--limit", "24"])
    r = json.loads((out / "results.json").read_text())
    n_layers, n_heads = r["n_layers"], r["n_heads"]
    for which in ("base", "instruct"):
        for kind in ("harmful", "harmless"):
            total = sum(torch.tensor(r["mass"][which][kind][reg]) for reg in A.REGIONS)
            assert total.shape == (n_layers, n_heads)
            torch.testing.assert_close(total, torch.ones(n_layers, n_heads), atol=1e-5, rtol=0)
    assert set(r["patching"]) >= {"effect", "per_head_effect", "control_effect", "harmful_clean_mean"}
    assert r["patching"]["harmful_clean_mean"] > r["patching"]["harmless_clean_mean"]  # the instruct model refuses
