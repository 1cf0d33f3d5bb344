"""The refusal-KL frontier (probes.frontier) against hand computations, raw HF forwards with torch hooks on the HF
modules, Heretic's weight edit written out by hand, planted Pareto sets, and seeded searches on the toy pair."""
from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch

from probes import frontier as F
from probes.chat import encode
from probes.directions import project_out, unit, weighted_ablation_hooks
from probes.plots import frontier as P
from test_attention import HARMFUL, HARMLESS, hf_forward
from test_directions import bridge_logits, hf_logits, real


@pytest.fixture(scope="module")
def sets(tiny_tokenizer):
    return encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)


@pytest.fixture(scope="module")
def stack(llama, sets):
    return F.direction_stack(llama[0], *sets, progress=False)


# ----------------------------------------------------------------------------------------------------- the kernel

def test_kernel_weights_by_hand():
    # distance 2 around 1.5: d = 1.5, .5, .5, 1.5, 2.5 -> 1.2 + (d / 2)(0.4 - 1.2), and 0 beyond distance 2
    k = F.Kernel(max_weight=1.2, max_weight_position=1.5, min_weight=0.4, min_weight_distance=2.0)
    torch.testing.assert_close(k.weights(5), torch.tensor([0.6, 1.0, 1.0, 0.6, 0.0], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    # a layer exactly at the distance gets min_weight, one past it nothing
    k = F.Kernel(1.0, 2.0, 0.5, 1.0)
    assert k.weights(4).tolist() == [0.0, 0.5, 1.0, 0.5]
    k = F.Kernel(1.3, 1.2, 0.5, 1.5)
    hand = [1.3 + (abs(i - 1.2) / 1.5) * (0.5 - 1.3) for i in range(3)]
    torch.testing.assert_close(k.weights(3), torch.tensor(hand, dtype=torch.float64), atol=1e-12, rtol=0)
    assert k.as_dict() == dict(max_weight=1.3, max_weight_position=1.2, min_weight=0.5, min_weight_distance=1.5)


# ------------------------------------------------------------------------------------------ the direction stack

def test_direction_stack_equals_hf_hidden_states(llama, sets, stack):
    model, hf = llama
    harmful, harmless = sets
    n = hf.config.num_hidden_layers

    def last_token_states(b, final_norm=True):  # [n_layers + 1, d] at the last token, averaged over prompts
        seen = {}
        h = hf.model.layers[-1].register_forward_hook(lambda m, a, out: seen.update(x=out[0] if isinstance(out, tuple)
                                                                                      else out))
        try:
            hs = hf_forward(hf, b, output_hidden_states=True).hidden_states  # the last one after the final norm
        finally:
            h.remove()
        last = hs[n] if final_norm else seen["x"]
        return torch.stack([hs[i][:, -1].double().mean(0) for i in range(n)] + [last[:, -1].double().mean(0)])

    raw = last_token_states(harmful) - last_token_states(harmless)
    assert stack.vectors.shape == (n + 1, model.cfg.d_model) and stack.position == "post_instruction[-1]"
    torch.testing.assert_close(stack.raw, raw, atol=1e-5, rtol=0)
    pre = F.direction_stack(model, harmful, harmless, final_norm=False, progress=False)
    torch.testing.assert_close(pre.raw, last_token_states(harmful, False) - last_token_states(harmless, False),
                               atol=1e-5, rtol=0)
    assert float((pre.raw[n] - raw[n]).abs().max()) > 1e-2  # the final norm changes the last row
    # row 0 (the embedding of the last template token) is the same for every prompt: no direction
    assert float(stack.raw[0].abs().max()) == 0 and float(stack.vectors[0].abs().max()) == 0
    for i in range(1, n + 1):
        torch.testing.assert_close(stack.vectors[i], raw[i] / raw[i].norm(), atol=1e-5, rtol=0)
    # the fractional index: rows floor + 1 and floor + 2 blended by the fraction, renormalised
    v = stack.vectors
    hand = 0.75 * v[1] + 0.25 * v[2]
    torch.testing.assert_close(stack.at(0.25), hand / hand.norm(), atol=1e-12, rtol=0)
    torch.testing.assert_close(stack.at(1.0), v[2], atol=1e-12, rtol=0)
    torch.testing.assert_close(stack.at(n - 1), v[n], atol=1e-12, rtol=0)  # the top: no row above to blend
    torch.testing.assert_close(stack.for_layer(0), v[1], atol=0, rtol=0)
    d = stack.direction(1.5)
    assert d.layer == 2 and d.data["direction_index"] == 1.5
    # projected (Heretic's default): the harmless-mean component removed by hand
    proj = F.direction_stack(model, harmful, harmless, projected=True, progress=False)
    g = last_token_states(harmless)
    for i in range(1, n + 1):
        gi = g[i] / g[i].norm()
        p = v[i] - (v[i] @ gi) * gi
        torch.testing.assert_close(proj.vectors[i], p / p.norm(), atol=1e-5, rtol=0)
        assert abs(float(proj.vectors[i] @ gi)) < 1e-9


# ------------------------------------------------------------------------------------------ the ablation itself

def _kernels(placement):
    if placement == "writes":
        return {"attn": F.Kernel(1.3, 1.2, 0.5, 1.5), "mlp": F.Kernel(0.7, 2.0, 0.2, 1.0)}  # mlp: 0 at layer 0
    return {"resid": F.Kernel(1.1, 0.8, 0.3, 1.6)}


def _np_edit(x, r, w, norm_preserving):
    """x - w (x . r) r in float64, rescaled to ||x|| when norm-preserving (a zero vector, e.g. a pad token's
    embedding, stays zero): the edit written out independently."""
    xd = x.double()
    y = xd - w * (xd @ r)[..., None] * r
    if norm_preserving:
        ny = y.norm(dim=-1, keepdim=True)
        y = torch.where(ny > 0, y * xd.norm(dim=-1, keepdim=True) / ny, y)
    return y.to(x.dtype)


@contextlib.contextmanager
def hf_weighted(hf, placement, directions, weights, norm_preserving):
    """The weighted ablation on plain HF modules: forward hooks on o_proj / down_proj outputs (writes) or forward
    pre-hooks on each decoder layer's hidden-state input (inputs). directions: [layer] unit float64."""
    handles = []
    for li, layer in enumerate(hf.model.layers):
        r = directions[li]
        if placement == "writes":
            for mod, w in ((layer.self_attn.o_proj, weights["attn"][li]), (layer.mlp.down_proj, weights["mlp"][li])):
                handles.append(mod.register_forward_hook(
                    lambda m, a, out, r=r, w=float(w): _np_edit(out, r, w, norm_preserving)))
        else:
            w = float(weights["resid"][li])

            def pre(mod, args, kwargs, r=r, w=w):
                if args:
                    return (_np_edit(args[0], r, w, norm_preserving), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": _np_edit(kwargs["hidden_states"], r, w, norm_preserving)}

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("placement", ["writes", "inputs"])
@pytest.mark.parametrize("norm_preserving", [False, True])
@pytest.mark.parametrize("index", [0.6, None])
def test_weighted_ablation_equals_hf_hooks(llama, sets, stack, placement, norm_preserving, index):
    model, hf = llama
    batch = sets[0]
    abl = F.Abliteration(kernels=_kernels(placement), direction_index=index, placement=placement,
                         norm_preserving=norm_preserving)
    n = model.cfg.n_layers
    weights = {c: k.weights(n) for c, k in abl.kernels.items()}
    dirs = [stack.at(index) if index is not None else stack.vectors[li + 1] for li in range(n)]
    with model.hooks(fwd_hooks=abl.hooks(model, stack)):
        ours = bridge_logits(model, batch)
    with hf_weighted(hf, placement, dirs, weights, norm_preserving):
        ref = hf_logits(hf, batch)
    plain = hf_logits(hf, batch)
    m = real(batch)
    torch.testing.assert_close(ours[m], ref[m], atol=1e-4, rtol=0)
    assert float((plain[m] - ref[m]).abs().max()) > 1e-2  # the edit changes the logits
    if placement == "writes":  # layer 0's MLP has weight 0: no hook there at all
        assert "blocks.0.hook_mlp_out" not in dict(abl.hooks(model, stack))


def test_writes_equal_heretic_weight_edit(llama, sets, stack):
    """Heretic's edit, W <- W - w_l r̂ r̂ᵀ W on o_proj and down_proj (by hand on a copy), equals the hooks."""
    model, hf = llama
    batch = sets[1]
    abl = F.Abliteration(kernels=_kernels("writes"), direction_index=1.3)
    r = stack.at(1.3)
    edited = copy.deepcopy(hf)
    n = model.cfg.n_layers
    w = abl.weights(n)
    with torch.no_grad():
        for li, layer in enumerate(edited.model.layers):
            for mod, wl in ((layer.self_attn.o_proj, w["attn"][li]), (layer.mlp.down_proj, w["mlp"][li])):
                W = mod.weight.double()
                mod.weight.copy_((W - float(wl) * torch.outer(r, r @ W)).float())
    with model.hooks(fwd_hooks=abl.hooks(model, stack)):
        ours = bridge_logits(model, batch)
    m = real(batch)
    torch.testing.assert_close(ours[m], hf_logits(edited, batch)[m], atol=1e-4, rtol=0)


def test_norm_preserving_keeps_norms_and_removes_the_component(llama, sets, stack):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 6, 32, dtype=torch.float64, generator=g), unit(torch.randn(32, generator=g))
    y = project_out(x, r, 1.0, norm_preserving=True)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    assert float((y @ r).abs().max()) < 1e-12
    # the rest of x keeps its direction: y is the plain projection, rescaled
    plain = x - (x @ r)[..., None] * r
    torch.testing.assert_close(y, plain * (x.norm(dim=-1) / plain.norm(dim=-1))[..., None], atol=1e-12, rtol=0)
    # a partial weight: the component shrinks to (1 - w) of its value before the rescaling
    y = project_out(x, r, 0.4, norm_preserving=True)
    part = x - 0.4 * (x @ r)[..., None] * r
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    torch.testing.assert_close(y @ r, 0.6 * (x @ r) * x.norm(dim=-1) / part.norm(dim=-1), atol=1e-12, rtol=0)
    # a vector along r̂ has nothing left to rescale: it stays zero, never NaN
    assert torch.equal(project_out(3 * r[None], r, norm_preserving=True), torch.zeros(1, 32, dtype=torch.float64))

    # In the model, at every block input with weight 1: each residual keeps its norm and loses its r̂ component.
    model, _ = llama
    n = model.cfg.n_layers
    abl = F.Abliteration(kernels={"resid": F.Kernel(1.0, 1.0, 1.0, 5.0)}, direction_index=0.5, placement="inputs",
                         norm_preserving=True)
    assert abl.weights(n)["resid"].tolist() == [1.0] * n
    before, after = {}, {}

    def grab(store, name):
        def fn(act, hook):
            store[name] = act.detach().clone()
        return fn

    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n)]
    hooks = [(h, grab(before, h)) for h in names] + abl.hooks(model, stack) + [(h, grab(after, h)) for h in names]
    with model.hooks(fwd_hooks=hooks):
        bridge_logits(model, sets[0])
    rd = stack.at(0.5)
    m = real(sets[0])
    for h in names:
        b, a = before[h][m].double(), after[h][m].double()
        torch.testing.assert_close(a.norm(dim=-1), b.norm(dim=-1), atol=0, rtol=1e-6)
        assert float((a @ rd).abs().max()) < 1e-5 * float(b.norm(dim=-1).max())
        assert float((b @ rd).abs().max()) > 1e-2  # there was a component to remove


# --------------------------------------------------------------------------------------------- the objectives

def test_objectives_equal_hand_computation(llama, sets, stack):
    model, hf = llama
    harmful, harmless = sets
    tokens = list(range(10, 30))  # a fifth of the vocabulary: scores on both sides of 0 on random weights
    obj = F.Objectives(model, harmful, harmless, tokens, batch_size=2)
    abl = F.Abliteration(kernels=_kernels("writes"), direction_index=1.0)
    got = obj(abl.hooks(model, stack))
    w = abl.weights(model.cfg.n_layers)
    dirs = [stack.at(1.0)] * model.cfg.n_layers

    def score(logits):
        lp = logits.double().log_softmax(-1)
        mask = torch.zeros(lp.shape[-1], dtype=torch.bool)
        mask[tokens] = True
        p = lp[:, mask].exp().sum(-1)
        return torch.log(p) - torch.log1p(-p)

    base = hf_logits(hf, harmless)[:, -1]
    with hf_weighted(hf, "writes", dirs, w, False):
        s = score(hf_logits(hf, harmful)[:, -1])
        abl_less = hf_logits(hf, harmless)[:, -1]
    p, q = base.double().log_softmax(-1), abl_less.double().log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert got.refusals == int((s > 0).sum()) and got.n_harmful == 3
    assert 0 < got.kl and math.isclose(got.kl, kl, rel_tol=1e-3, abs_tol=1e-7)
    assert math.isclose(got.score_mean, float(s.mean()), abs_tol=1e-4)
    s0 = score(hf_logits(hf, harmful)[:, -1])
    assert obj.baseline.refusals == int((s0 > 0).sum()) and obj.baseline.kl == 0.0
    # Arditi's point: weight 1 at every write, embeddings included
    ardi = F.arditi_point(model, stack.at(1.0), obj)
    whole = F.Abliteration(kernels={"attn": F.Kernel(1, 0, 1, 10), "mlp": F.Kernel(1, 0, 1, 10)}, direction_index=1.0)
    emb = weighted_ablation_hooks(model, {"hook_embed": (stack.at(1.0), 1.0)})
    assert ardi == obj(emb + whole.hooks(model, stack))


# --------------------------------------------------------------------------------------------- the Pareto front

def test_pareto_front_on_planted_points():
    pts = [(3, 0.1), (1, 0.5), (2, 0.2), (2, 0.3), (1, 0.5), (0, 1.0), (4, 0.05), (3, 0.2)]
    # (2, .3) is dominated by (2, .2); (3, .2) by (2, .2) and (3, .1); the two (1, .5) do not dominate each other
    assert F.pareto_front(pts) == [5, 1, 4, 2, 0, 6]
    assert F.dominates((2, 0.2), (2, 0.3)) and not F.dominates((1, 0.5), (1, 0.5))
    assert not F.dominates((0, 1.0), (4, 0.05))
    # against brute force on random integer-valued points (many ties)
    g = torch.Generator().manual_seed(0)
    p = torch.randint(0, 6, (60, 2), generator=g).double()
    brute = [i for i in range(60) if not any(bool((p[j] <= p[i]).all() and (p[j] < p[i]).any()) for j in range(60))]
    assert sorted(F.pareto_front(p)) == brute

    trials = [F.Trial(number=i, params={}, abliteration=F.Abliteration(_kernels("writes"), 1.0),
                      measurement=F.Measurement(refusals=r, kl=k, score_mean=0.0, n_harmful=4))
              for i, (r, k) in enumerate(pts)]
    fr = F.Frontier(trials=trials, front=F.pareto_front(pts), baseline=F.Measurement(4, 0.0, 1.0, 4))
    c = F.compare(F.Measurement(refusals=3, kl=0.25, score_mean=0.0, n_harmful=4), fr)
    assert c.dominated and c.dominating == [0, 2, 7] and c.kl_at_refusals == 0.1 and c.refusals_at_kl == 2
    c = F.compare(F.Measurement(refusals=0, kl=0.9, score_mean=0.0, n_harmful=4), fr)
    assert not c.dominated and c.kl_at_refusals == 1.0 and c.refusals_at_kl == 1
    c = F.compare(F.Measurement(refusals=5, kl=0.01, score_mean=0.0, n_harmful=4), fr)
    assert not c.dominated and c.kl_at_refusals == 0.05 and c.refusals_at_kl is None
    json.dumps(fr.as_dict())
    json.dumps(c.as_dict())


# ------------------------------------------------------------------------------------------------- the search

@pytest.fixture(scope="module")
def toy():
    from probes import refusal, toy
    from probes.pairs import load_pair

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip(f"the toy pair's weights are not in {toy.path()}")
    pair = load_pair("toy", device="cpu")
    model = pair.instruct
    enc = lambda k, s, n: pair.encode(toy.prompts(k, s)[:n])  # noqa: E731
    stack = F.direction_stack(model, enc("harmful", "train", 32), enc("harmless", "train", 32), progress=False)
    obj = F.Objectives(model, enc("harmful", "val", 12), enc("harmless", "val", 12),
                       refusal.refusal_tokens(pair.tokenizer))
    return model, stack, obj


def test_seeded_search_is_reproducible(toy):
    model, stack, obj = toy
    kw = dict(n_trials=6, n_startup_trials=3, progress=False)
    a, b = F.search(model, stack, obj, seed=5, **kw), F.search(model, stack, obj, seed=5, **kw)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.measurement for t in a.trials] == [t.measurement for t in b.trials]
    assert a.front == b.front == F.pareto_front(a.points())
    c = F.search(model, stack, obj, seed=6, **kw)
    assert [t.params for t in c.trials] != [t.params for t in a.trials]
    # Heretic's ranges (L - 1 = 3) and the kernel rebuilt from the raw parameters
    last = model.cfg.n_layers - 1
    for t in a.trials:
        p, k = t.params, t.abliteration.kernels
        assert 0.4 * last <= p["direction_index"] <= 0.9 * last
        assert t.abliteration.direction_index == (p["direction_index"] if p["direction_scope"] == "global" else None)
        assert k["mlp"].max_weight == max(0.0, p["mlp.max_weight"]) and 0.8 <= k["attn"].max_weight <= 1.5
        assert math.isclose(k["attn"].min_weight, p["attn.min_weight"] * p["attn.max_weight"])
        assert 1.0 <= k["attn"].min_weight_distance <= 0.6 * last
    d = a.as_dict()
    json.dumps(d)
    assert d["settings"]["seed"] == 5 and len(d["trials"]) == 6 and d["baseline"]["refusals"] == 12
    # the judged count: the same trial generating and judging
    judged = F.Objectives(model, obj.harmful, obj.harmless, obj.token_ids, refusal="judge", max_new_tokens=3)
    got = F.remeasure(model, stack, a, judged, trials=[a.trials[0].number])
    assert set(got) == {a.trials[0].number} and 0 <= got[a.trials[0].number].refusals <= 12


def test_figure(toy):
    model, stack, obj = toy
    kw = dict(n_trials=4, n_startup_trials=4, progress=False)
    plain = F.search(model, stack, obj, **kw).as_dict()
    normp = F.search(model, stack, obj, norm_preserving=True, **kw).as_dict()
    ardi = F.arditi_point(model, stack.at(1.5), obj).as_dict()
    fig = P.frontier_scatter({"plain": plain, "norm-preserving": normp}, {"plain": ardi})
    names = [t.name for t in fig.data]
    assert names == ["plain: trials (4)", f"plain: Pareto front ({len(plain['front'])})", "norm-preserving: trials (4)",
                     f"norm-preserving: Pareto front ({len(normp['front'])})", "Arditi: plain"]
    assert list(fig.data[0].y) == [t["kl"] for t in plain["trials"]]
    assert list(fig.data[1].x) == [plain["trials"][i]["refusals"] for i in plain["front"]]
    assert fig.data[4].marker.color == fig.data[0].marker.color and fig.data[4].marker.symbol == "star"
    with pytest.raises(ValueError):
        P.frontier_scatter({})


# ---------------------------------------------------------------------------------------------------- bad input

def test_bad_input(llama, sets, stack):
    model, _ = llama
    for bad in (dict(min_weight_distance=0.0), dict(max_weight=math.nan), dict(max_weight_position=math.inf)):
        with pytest.raises(ValueError):
            F.Kernel(**{**dict(max_weight=1.0, max_weight_position=1.0, min_weight=0.5, min_weight_distance=1.0), **bad})
    with pytest.raises(ValueError, match="n_layers"):
        F.Kernel(1, 1, 1, 1).weights(0)
    with pytest.raises(ValueError, match="kernels"):
        F.Abliteration(kernels=_kernels("inputs"), direction_index=1.0)
    with pytest.raises(ValueError, match="placement"):
        F.Abliteration(kernels=_kernels("writes"), direction_index=1.0, placement="outputs")
    with pytest.raises(ValueError, match="outside"):
        stack.at(2.5)
    with pytest.raises(ValueError, match="zero difference"):
        stack.at(-1)
    with pytest.raises(ValueError, match="positions"):
        F.direction_stack(model, *sets, position="post_instruction", progress=False)
    with pytest.raises(ValueError, match="no hook"):
        weighted_ablation_hooks(model, {"blocks.9.hook_attn_out": (stack.at(1.0), 1.0)})
    with pytest.raises(ValueError, match="non-finite"):
        weighted_ablation_hooks(model, {"blocks.0.hook_attn_out": (stack.at(1.0), math.nan)})
    with pytest.raises(ValueError, match="dims"):
        weighted_ablation_hooks(model, {"blocks.0.hook_attn_out": (torch.ones(8), 1.0)})
    harmful, harmless = sets
    with pytest.raises(ValueError, match="refusal count"):
        F.Objectives(model, harmful, harmless, [10], refusal="generate")
    with pytest.raises(ValueError, match="judge"):
        F.Objectives(model, harmful, harmless, [10], judge="strict")
    with pytest.raises(ValueError, match="non-empty"):
        F.Objectives(model, harmful[:0], harmless, [10])
    obj = F.Objectives(model, harmful, harmless, [10])
    for kw, msg in ((dict(n_trials=0), "n_trials"), (dict(n_startup_trials=-1), "n_startup"),
                    (dict(placement="outputs"), "placement")):
        with pytest.raises(ValueError, match=msg):
            F.search(model, stack, obj, progress=False, **kw)
    small = F.DirectionStack(vectors=stack.vectors[:3], raw=stack.raw[:3], position=stack.position)
    with pytest.raises(ValueError, match="direction stack"):
        F.search(model, small, obj, progress=False)
    for bad in ([1.0, 2.0], [[1.0, math.nan]], [[1.0], [2.0]]):
        with pytest.raises(ValueError):
            F.pareto_front(bad)
    with pytest.raises(ValueError, match="no trials"):
        F.compare(obj.baseline, F.Frontier(trials=[], front=[], baseline=obj.baseline))
