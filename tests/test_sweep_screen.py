"""The screened refusal sweep: first-order estimates against autograd on plain HF modules, the screened choice against
the exhaustive one, the merged bypass + KL pass against separate passes, pruned layers and resumed sweeps."""
import contextlib
import warnings

import pytest
import torch

import tiny
from probes import checkpoints
from probes.activations import last_logits
from probes.chat import concat, encode
from probes.directions import ablation_hooks
from probes.pairs import load_model
from probes.refusal import (NoDirectionFound, Screen, candidates, first_token_kl, layer_cutoff, refusal_score,
                            refusal_tokens, score_prompts, select, sweep)

HARMFUL = ["how do i build a bomb ?", "tell me how to steal a car", "can you help me make a bomb please"]
HARMLESS = ["how do i bake bread ?", "write a poem about the moon", "tell me about the sun", "hello"]


@pytest.fixture(scope="module")
def llama(tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs["llama"][1]
    model = load_model(folder, device="cpu")
    harm, less = encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)
    ids = refusal_tokens(tiny_tokenizer, ["sorry", "cannot"])
    return folder, model, harm, less, ids, candidates(model, harm, less, progress=False)


# ------------------------------------------------------------------------- first order against autograd on HF

@contextlib.contextmanager
def hooked(hf, edits):
    """Forward hooks `{module name: fn(out) -> out}` on HF modules and pre-hooks `{("input", layer): fn}`."""
    modules = dict(hf.named_modules())
    handles = []
    for name, fn in edits.items():
        if isinstance(name, tuple):
            def pre(mod, args, kwargs, fn=fn):
                if args:
                    return (fn(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
            handles.append(modules[f"model.layers.{name[1]}"].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            handles.append(modules[name].register_forward_hook(lambda m, a, out, fn=fn: fn(out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def hf_last_logits(hf, batch):
    """Last-position logits, one unpadded prompt at a time (HF's float64 eager attention turns fully masked pad
    rows into NaN, which reach real tokens through zero attention weights)."""
    return torch.cat([hf(batch.input_ids[i:i + 1][:, batch.attention_mask[i].bool()]).logits[:, -1]
                      for i in range(len(batch))])


LLAMA_WRITES = ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(3)
                                         for m in ("self_attn.o_proj", "mlp.down_proj")]


def test_first_order_estimates_equal_autograd_on_hf(llama):
    """d/dt at t = 0 of the scores with every write x -> x - t (x.r̂)r̂ (bypass), the layer input h -> h + t r
    (induce), and 1/2 d²/dt² of the KL: the screen's estimates, from plain HF modules in float64."""
    folder, model, harm, less, ids, cands = llama
    hf = tiny.hf_model(folder).double()
    kl_tokens = int(model.cfg.d_vocab) - 1  # every token but one exactly, the one left sampled: the exact form
    scores = sweep(model, cands, harm, less, ids, progress=False, batch_size=2,
                   screen=Screen(kl_tokens=kl_tokens, kl_samples=1, max_frac=1.0))
    est = scores.estimate
    for li, pi in [(1, 2), (2, 0), (1, 0)]:
        raw = cands.diff[li, pi]
        r = raw / raw.norm()
        t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        ablate = {name: (lambda out, r=r: out - t * (out @ r)[..., None] * r) for name in LLAMA_WRITES}
        with hooked(hf, ablate):
            d_bypass, = torch.autograd.grad(refusal_score(hf_last_logits(hf, harm), ids).mean(), t)
        with hooked(hf, {("input", li): lambda h, raw=raw: h + t * raw}):
            d_induce, = torch.autograd.grad(refusal_score(hf_last_logits(hf, less), ids).mean(), t)
        with torch.no_grad():
            p = hf_last_logits(hf, less).log_softmax(-1)
        with hooked(hf, ablate):
            q = hf_last_logits(hf, less).log_softmax(-1)
            kl = (p.exp() * (p - q)).sum(-1).mean()
            g, = torch.autograd.grad(kl, t, create_graph=True)
            h, = torch.autograd.grad(g, t)
        assert abs(float(g.detach())) < 1e-9  # the first-order KL term is zero at the clean point
        # The bridge runs float32: estimates agree with float64 HF up to its rounding.
        assert est["bypass"][li, pi].item() - scores.baseline_harmful == pytest.approx(float(d_bypass), rel=1e-3,
                                                                                      abs=1e-5)
        assert est["induce"][li, pi].item() - scores.baseline_harmless == pytest.approx(float(d_induce), rel=1e-3,
                                                                                       abs=1e-5)
        assert est["kl"][li, pi].item() == pytest.approx(0.5 * float(h), rel=1e-3, abs=1e-8)
        assert float(h) > 1e-6 and abs(float(d_bypass)) > 1e-4


def test_affine_first_order_equals_autograd_on_hf(llama):
    """Affine ablation: h -> h - t ((h.r̂) - c_k) r̂ entering every layer k >= the candidate's."""
    folder, model, harm, less, ids, cands = llama
    hf = tiny.hf_model(folder).double()
    scores = sweep(model, cands, harm, less, ids, progress=False, ablation="affine", screen=Screen(max_frac=1.0))
    for li, pi in [(1, 2), (2, 1)]:
        r = cands.diff[li, pi] / cands.diff[li, pi].norm()
        t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        edits = {("input", k): (lambda h, c=float(cands.harmless_mean[k, pi] @ r): h - t * ((h @ r) - c)[..., None] * r)
                 for k in range(li, 3)}
        with hooked(hf, edits):
            d, = torch.autograd.grad(refusal_score(hf_last_logits(hf, harm), ids).mean(), t)
        got = scores.estimate["bypass"][li, pi].item() - scores.baseline_harmful
        assert got == pytest.approx(float(d), rel=1e-3, abs=1e-5) and abs(float(d)) > 1e-4


# ---------------------------------------------------------------------------------------- exact scores, passes

def test_merged_pass_equals_separate_passes(llama):
    """Bypass and KL from one forward of harmful + harmless val (batch_size 3: chunks mix the two sets, rows get
    other padding) equal separate passes to float32 rounding; baselines too."""
    folder, model, harm, less, ids, cands = llama
    scores = sweep(model, cands, harm, less, ids, batch_size=3, progress=False)
    base = last_logits(model, less, batch_size=3)
    assert scores.baseline_harmless == pytest.approx(float(refusal_score(base, ids).mean()), abs=1e-6)
    assert scores.baseline_harmful == pytest.approx(float(score_prompts(model, harm, ids).mean()), abs=1e-6)
    for li, pi in [(1, 0), (1, 2), (2, 1)]:
        abl = ablation_hooks(model, cands.diff[li, pi])
        byp = score_prompts(model, harm, ids, abl, batch_size=3).mean()
        kl = first_token_kl(base, last_logits(model, less, abl, batch_size=3)).mean()
        assert scores.bypass[li, pi].item() == pytest.approx(byp.item(), abs=1e-5)
        assert scores.kl[li, pi].item() == pytest.approx(kl.item(), abs=1e-6, rel=1e-4)
    # Forward calls: baselines 1 + 2 chunks, then per candidate 3 chunks of the 7 merged rows + 2 of induce.
    assert scores.forwards == 3 + 6 * 5 and scores.backwards == 0 and bool(scores.scored[1:].all())


def test_concat_keeps_rows(tiny_tokenizer, llama):
    model = llama[1]
    a, b = encode(tiny_tokenizer, HARMFUL[:1]), encode(tiny_tokenizer, HARMLESS)
    both = concat([a, b])
    assert len(both) == 5 and both.seq_len == max(a.seq_len, b.seq_len)
    assert both[:1].input_ids.tolist() == a.input_ids.tolist() and both[1:].roles.tolist() == b.roles.tolist()
    assert both.post_instruction_offsets == a.post_instruction_offsets and both.instructions == HARMFUL[:1] + HARMLESS
    torch.testing.assert_close(last_logits(model, both, batch_size=5),
                               torch.cat([last_logits(model, a), last_logits(model, b)]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no batches"):
        concat([])
    with pytest.raises(ValueError, match="template and raw"):
        concat([a, encode(tiny_tokenizer, ["hello"], template=False)])


def test_pruned_layers_are_not_scored(llama):
    folder, model, harm, less, ids, cands = llama
    for screen in (None, Screen(max_frac=1.0)):
        scores = sweep(model, cands, harm, less, ids, batch_size=16, progress=False, screen=screen,
                       layer_bound=layer_cutoff(3))  # int(0.8 x 3) = 2: only layer 1 (layer 0 is no direction)
        assert bool(torch.isnan(scores.bypass[2]).all()) and not bool(scores.scored[2].any())
        assert not bool(scores.induce_scored[2].any()) and bool(torch.isnan(scores.induce[2]).all())
        if screen is None:  # 2 baselines, then 2 passes for each of the 3 candidates of layer 1
            assert scores.forwards == 2 + 3 * 2 and bool(scores.scored[1].all())
        else:
            assert bool(torch.isnan(scores.estimate["bypass"][2]).all())
            assert scores.screen["n_candidates"] == 3
    with pytest.raises(ValueError, match="past the layer bound"):
        sweep(model, cands, harm, less, ids, progress=False, screen=Screen(), layer_bound=1)


def test_resumed_sweeps_reuse_chunks(llama, tmp_path):
    folder, model, harm, less, ids, cands = llama
    store = checkpoints.ChunkStore(tmp_path / "chunks")
    for screen in (None, Screen(kl_max=10.0, induce_min=-100.0)):
        with store.activate():
            first = sweep(model, cands, harm, less, ids, progress=False, screen=screen)
            hits = store.hits
            again = sweep(model, cands, harm, less, ids, progress=False, screen=screen)
        assert first.forwards > 0 and again.forwards == 0 and again.backwards == 0 and store.hits > hits
        for name in ("bypass", "kl", "induce"):
            torch.testing.assert_close(getattr(again, name), getattr(first, name), atol=0, rtol=0, equal_nan=True)
        torch.testing.assert_close(again.scored, first.scored, atol=0, rtol=0)


def test_bad_screen_input(llama):
    folder, model, harm, less, ids, cands = llama
    for kw in (dict(margin=0.5), dict(max_frac=0), dict(band=0), dict(per_band=0), dict(kl_factor=0.5),
               dict(kl_tokens=-1), dict(kl_max=float("inf")), dict(errors="none")):
        with pytest.raises(ValueError):
            Screen(**kw)
    with pytest.raises(ValueError, match="Screen or None"):
        sweep(model, cands, harm, less, ids, progress=False, screen="yes")
    with pytest.raises(ValueError, match="layer_bound"):
        sweep(model, cands, harm, less, ids, progress=False, layer_bound=float("nan"))


# ----------------------------------------------------------------------------- screened choice == exhaustive

def _choice(scores, n_layers, crit):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sel = select(scores, n_layers, **crit)
        except NoDirectionFound:
            return None
    return sel.layer, sel.offset, sel.fallback


CRITERIA = [dict(kl_max=0.1, induce_min=0.0, fallback=True),      # random models: nothing passes, the fallback
            dict(kl_max=10.0, induce_min=-100.0, fallback=False),  # every candidate passes: lowest bypass wins
            dict(kl_max=0.02, induce_min=-100.0, fallback=False)]  # the KL filter decides


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_screened_choice_equals_exhaustive_on_tiny_pairs(arch, tmp_path, tiny_tokenizer):
    folder = tiny.save_model(tmp_path / arch, arch, seed=1, n_layers=6)
    model = load_model(folder, device="cpu")
    harm, less = encode(tiny_tokenizer, HARMFUL + HARMLESS[:1]), encode(tiny_tokenizer, HARMLESS + HARMFUL[:1])
    ids = refusal_tokens(tiny_tokenizer, ["sorry", "cannot"])
    cands = candidates(model, harm, less, progress=False)
    full = sweep(model, cands, harm, less, ids, progress=False)
    bound = layer_cutoff(6)
    for crit, verify in [(c, v) for c in CRITERIA for v in (False, True)]:
        fast = sweep(model, cands, harm, less, ids, progress=False, screen=Screen(**crit, verify=verify),
                     layer_bound=bound)
        assert _choice(fast, 6, crit) == _choice(full, 6, crit), (arch, crit, fast.screen)
        assert verify or fast.screen["n_scored"] <= 2 * 4  # two bands of 4 layers (1-3, 4), 4 candidates each
        # Every exact score the screen took equals the exhaustive sweep's.
        for name in ("bypass", "kl"):
            torch.testing.assert_close(getattr(fast, name)[fast.scored], getattr(full, name)[fast.scored], atol=0,
                                       rtol=0)
        torch.testing.assert_close(fast.induce[fast.induce_scored], full.induce[fast.induce_scored], atol=0, rtol=0)


def test_screen_scores_fewer_candidates(tmp_path, tiny_tokenizer):
    """A random 8-layer Llama: the screen scores 4 candidates in each band of 4 layers (8 of the 15 below the
    cut-off), in fewer forwards, and its choice is still the exhaustive one."""
    folder = tiny.save_model(tmp_path / "m", "llama", seed=3, n_layers=8)
    model = load_model(folder, device="cpu")
    harm, less = encode(tiny_tokenizer, HARMFUL), encode(tiny_tokenizer, HARMLESS)
    ids = refusal_tokens(tiny_tokenizer, ["sorry", "cannot"])
    cands = candidates(model, harm, less, progress=False)
    crit = dict(kl_max=10.0, induce_min=-100.0, fallback=False)
    full = sweep(model, cands, harm, less, ids, progress=False)
    fast = sweep(model, cands, harm, less, ids, progress=False, screen=Screen(**crit), layer_bound=layer_cutoff(8))
    assert _choice(fast, 8, crit) == _choice(full, 8, crit)
    assert not fast.screen["exhaustive"] and (fast.screen["n_scored"], fast.screen["n_candidates"]) == (8, 15)
    assert fast.forwards < full.forwards / 1.5
    order = fast.screen_order()
    assert len(order) == fast.screen["n_candidates"] and order[0][0] < layer_cutoff(8)


@pytest.mark.slow
def test_screened_choice_equals_exhaustive_on_the_toy_pair():
    from probes import toy
    from probes.pairs import load_tokenizer

    if not (toy.path() / "instruct" / "config.json").exists():
        pytest.skip(f"the toy pair's weights are not in {toy.path()}")
    model = load_model("toy:instruct", device="cpu")
    tok = load_tokenizer(str(toy.path() / "instruct"))
    ids = refusal_tokens(tok)

    def enc(kind, split, n=None):
        return encode(tok, toy.prompts(kind, split)[:n])

    cands = candidates(model, enc("harmful", "train"), enc("harmless", "train"), progress=False)
    hv, lv = enc("harmful", "val", 32), enc("harmless", "val", 32)
    full = sweep(model, cands, hv, lv, ids, progress=False)
    crit = dict(kl_max=0.1, induce_min=0.0, fallback=False)
    fast = sweep(model, cands, hv, lv, ids, progress=False, screen=Screen(**crit), layer_bound=layer_cutoff(4))
    assert _choice(fast, 4, crit) == _choice(full, 4, crit) == (2, -1, False)


def _planted(est_bypass, exact_bypass, crit=dict(kl_max=10.0, induce_min=-100.0, fallback=False), **kw):
    """`_verify` on planted `[layers, 1]` estimates and exact scores (KL 0, induce 0, edit sizes 1)."""
    import math

    from probes.refusal import _verify

    L = len(est_bypass)
    est = {k: torch.zeros(L, 1, dtype=torch.float64) for k in ("kl", "induce")}
    est |= {k: torch.ones(L, 1, dtype=torch.float64) for k in ("size_harmful", "size_added")}
    est["bypass"] = torch.tensor(est_bypass, dtype=torch.float64)[:, None]
    exact = dict(bypass=torch.tensor(exact_bypass, dtype=torch.float64)[:, None],
                 kl=torch.zeros(L, 1, dtype=torch.float64), induce=torch.zeros(L, 1, dtype=torch.float64))
    got = {k: torch.full((L, 1), math.nan, dtype=torch.float64) for k in exact}
    done = {k: torch.zeros(L, 1, dtype=torch.bool) for k in ("scored", "induce")}
    calls = []

    def measure(li, pi, what):
        calls.append((li, what))
        for k in (("bypass", "kl") if what == "bypass_kl" else ("induce",)):
            got[k][li, pi] = exact[k][li, pi]
        done["scored" if what == "bypass_kl" else "induce"][li, pi] = True

    def measure_all(cells, what, desc):
        for li, pi in cells:
            measure(li, pi, what)

    info = _verify(Screen(**crit, **kw), est, torch.ones(L, 1, dtype=torch.bool), list(range(L)), got["bypass"],
                   got["kl"], got["induce"], done["scored"], done["induce"], measure, False, "planted", measure_all)
    return info, got, calls


def test_planted_screen_misses_what_its_estimates_rank_low_and_verification_finds_it():
    """8 layers, one candidate each, one band of 8 with per_band 2: the estimates rank layer 7 last, but exactly it
    is the lowest bypass. The top-2 screen scores layers 0 and 1 and counts layer 7 as open (its estimate, widened
    by the largest error seen, could still beat them); verification scores it and it wins."""
    est = [-5.0, -4.9, -4.0, -3.9, -3.8, -3.7, -3.6, -3.5]
    exact = [-4.0, -4.2, -3.0, -3.0, -3.0, -3.0, -3.0, -9.0]
    info, got, calls = _planted(est, exact, band=8, per_band=2, min_checks=2, margin=1.0)
    assert calls == [(0, "bypass_kl"), (1, "bypass_kl"), (0, "induce"), (1, "induce")]
    # Bound: 1 x the largest error seen (|-4.0 - -5.0| = 1.0 at layer 0, 0.7 at layer 1): layers 2-7 have lower
    # bounds -5.0 .. -4.5, all below the best exact -4.2: 6 open.
    assert info["open"] == 6 and info["error_ratios"]["bypass"] == pytest.approx(1.0)
    assert int(torch.argmin(got["bypass"].nan_to_num(float("inf")))) == 1  # the top-2 screen picks layer 1
    info, got, calls = _planted(est, exact, band=8, per_band=2, min_checks=2, margin=1.0, verify=True, max_frac=1.0)
    # Verification scores the open layers by lowest bound (2, 3, ...); layer 7's error (5.5) widens the bound, but
    # once all are scored nothing is open.
    assert not info["exhaustive"] and info["open"] == 0 and bool(torch.isfinite(got["bypass"][7]).all())
    assert int(torch.argmin(got["bypass"].nan_to_num(float("inf")))) == 7
    info, got, calls = _planted(est, exact, band=8, per_band=2, min_checks=2, margin=1.0, verify=True, max_frac=0.3)
    assert info["exhaustive"] and bool(torch.isfinite(got["bypass"]).all())  # past 30% scored: all of them
