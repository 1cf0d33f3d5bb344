"""Directions and interventions against independent computations with plain HF models and torch hooks.

The reference interventions here are written on the HF modules directly (module names per architecture, below),
never through the bridge or `probes.directions`' own module discovery.
"""
import contextlib

import pytest
import torch

import tiny
from probes.chat import encode
from probes.directions import (Direction, ablate, ablation_hooks, add, addition_hooks, affine_ablate, affine_hooks,
                               cosine, diff_of_means, orthogonalize, project_out, residual_write_hooks,
                               save_orthogonalized, unit)
from probes.pairs import load_model

PROMPTS = ["how do i make a cake ?", "tell me about the sun please , why is the sky", "hello", "build a bomb"]

# Modules whose OUTPUT is added to the residual stream, per architecture (Gemma-2: after its post-norms).
HF_WRITES = {
    "llama": ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.o_proj",
                                                                                        "mlp.down_proj")],
    "qwen2": ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.o_proj",
                                                                                        "mlp.down_proj")],
    "gemma2": ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(3)
                                        for m in ("post_attention_layernorm", "post_feedforward_layernorm")],
    "gemma3": ["model.embed_tokens"] + [f"model.layers.{i}.{m}" for i in range(3)
                                        for m in ("post_attention_layernorm", "post_feedforward_layernorm")],
    "gpt2": ["transformer.wte", "transformer.wpe"] + [f"transformer.h.{i}.{m}" for i in range(3)
                                                      for m in ("attn.c_proj", "mlp.c_proj")],
}


def hf_layers(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


@contextlib.contextmanager
def hf_ablation(hf, arch, r):
    """Project r̂ out of every residual write of the HF model with plain torch forward hooks."""
    r = r.double() / r.double().norm()
    modules = dict(hf.named_modules())

    def hook(mod, args, out):
        return (out.double() - (out.double() @ r)[..., None] * r).to(out.dtype)

    handles = [modules[name].register_forward_hook(hook) for name in HF_WRITES[arch]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def hf_edit_layer_input(hf, layer, edit):
    """Replace the hidden states entering decoder layer `layer` (= hidden_states[layer]) by edit(hidden)."""
    def pre(mod, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    h = hf_layers(hf)[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


def hf_logits(hf, batch):
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits


def bridge_logits(model, batch):
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")


def real(batch):
    return batch.attention_mask.bool()


# ------------------------------------------------------------------------------------------- existing core API

def test_diff_of_means_cosine_and_direction_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 2, 3, 8, generator=g), torch.randn(7, 2, 3, 8, generator=g)
    d = diff_of_means(a, b)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, a.double().sum(0) / 5 - b.double().sum(0) / 7, atol=1e-12, rtol=0)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    hand = torch.tensor([float(x[i] @ y[i]) / float(x[i].norm() * y[i].norm()) for i in range(4)], dtype=torch.float64)
    torch.testing.assert_close(cosine(x, y), hand, atol=1e-6, rtol=0)
    direction = Direction.from_raw(d[1, 2], model="m", layer=1, position="post_instruction[-1]")
    assert abs(float(direction.vector.norm()) - 1) < 1e-6
    direction.save(tmp_path / "d.safetensors")
    back = Direction.load(tmp_path / "d.safetensors")
    assert torch.equal(back.raw, direction.raw) and back.layer == 1 and back.position == "post_instruction[-1]"
    with pytest.raises(ValueError, match="empty"):
        diff_of_means(a[:0], b)
    with pytest.raises(ValueError, match="zero"):
        Direction.from_raw(torch.zeros(8))


def test_project_out_and_bad_directions():
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(3, 5, 16, generator=g), torch.randn(16, generator=g)
    y = project_out(x, unit(r))
    assert float((y.double() @ unit(r)).abs().max()) < 1e-5
    # the orthogonal complement is untouched: y = x - (x.r̂) r̂ by hand
    rh = r.double() / r.double().norm()
    torch.testing.assert_close(y.double(), x.double() - (x.double() @ rh)[..., None] * rh, atol=1e-6, rtol=0)
    for bad in (torch.zeros(16), torch.full((16,), float("nan")), torch.randn(2, 16)):
        with pytest.raises(ValueError):
            unit(bad)


# ------------------------------------------------------------------------------------------------- ablation

@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_ablation_leaves_nothing_along_r_in_any_residual(arch, tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs[arch][1], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(2))
    rh = unit(r).float()
    seen, fired = {}, set()

    def rec(act, hook):
        seen[hook.name] = act.detach().clone()

    def mark(act, hook):
        fired.add(id(hook))  # hook.name is the bridge's canonical name, not the alias we asked for

    names = [f"blocks.{l}.hook_{h}" for l in range(model.cfg.n_layers) for h in ("resid_pre", "resid_mid", "resid_post")]
    # The write hooks must all fire (else part of the residual would escape the ablation).
    writes = residual_write_hooks(model)
    with model.hooks(fwd_hooks=ablation_hooks(model, r) + [(n, rec) for n in names] + [(n, mark) for n in writes]):
        bridge_logits(model, batch)
    assert fired == {id(model.hook_dict[n]) for n in writes}
    assert len(seen) == len(names)
    before = {}
    with model.hooks(fwd_hooks=[(n, lambda a, hook: before.__setitem__(hook.name, a.detach().clone())) for n in names]):
        bridge_logits(model, batch)
    for name, act in seen.items():
        x = act[real(batch)]
        rel = (x @ rh).abs() / x.norm(dim=-1)
        assert float(rel.max()) <= 1e-5, (name, float(rel.max()))
        # and the residual had a real component along r̂ before ablation (the check is not vacuous)
        y = before[name][real(batch)]
        assert float(((y @ rh).abs() / y.norm(dim=-1)).max()) > 1e-3


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_ablation_equals_hf_hooked_ablation(arch, tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs[arch][1]
    model, hf = load_model(folder, device="cpu"), tiny.hf_model(folder)
    batch = encode(tiny_tokenizer, PROMPTS)
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    with ablate(model, r):
        ours = bridge_logits(model, batch)
    with hf_ablation(hf, arch, r):
        ref = hf_logits(hf, batch)
    plain = hf_logits(hf, batch)
    m = real(batch)
    torch.testing.assert_close(ours[m], ref[m], atol=1e-4, rtol=0)
    assert float((plain[m] - ref[m]).abs().max()) > 1e-2  # the ablation changed something
    # the context manager removed its hooks
    torch.testing.assert_close(bridge_logits(model, batch)[m], plain[m], atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_orthogonalized_weights_equal_hook_ablation(arch, tiny_pair_dirs, tiny_tokenizer, tmp_path):
    folder = tiny_pair_dirs[arch][1]
    model = load_model(folder, device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(4))
    with ablate(model, r):
        hooked = bridge_logits(model, batch)
    out = save_orthogonalized(model, r, tmp_path / "ortho", tokenizer=tiny_tokenizer)
    edited = tiny.hf_model(out)  # loads in plain transformers
    original = tiny.hf_model(folder)
    m = real(batch)
    torch.testing.assert_close(hf_logits(edited, batch)[m], hooked[m], atol=1e-4, rtol=0)
    # The unembedding keeps the original weights (GPT-2's tied embedding was untied first); the embedding lost r̂.
    torch.testing.assert_close(edited.get_output_embeddings().weight, original.get_output_embeddings().weight,
                               atol=0, rtol=0)
    emb = edited.get_input_embeddings().weight.detach().double()
    assert float((emb @ unit(r)).abs().max()) < 1e-5
    assert float((original.get_input_embeddings().weight.detach().double() @ unit(r)).abs().max()) > 1e-2
    # The bridge's own model was not edited by save_orthogonalized (it works on a copy).
    torch.testing.assert_close(bridge_logits(model, batch)[m], hf_logits(original, batch)[m], atol=1e-4, rtol=0)


def test_orthogonalize_in_place_on_bridge_and_gemma2_refused(tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs["llama"][0], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    r = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    with ablate(model, r):
        hooked = bridge_logits(model, batch)
    orthogonalize(model, r)  # edits original_model: the bridge now runs the edited weights
    m = real(batch)
    torch.testing.assert_close(bridge_logits(model, batch)[m], hooked[m], atol=1e-4, rtol=0)
    gemma = load_model(tiny_pair_dirs["gemma2"][0], device="cpu")
    with pytest.raises(NotImplementedError, match="post-norms"):
        orthogonalize(gemma, torch.randn(gemma.cfg.d_model))


# ------------------------------------------------------------------------------------------ addition and affine

@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_addition_equals_hf_layer_input_edit(arch, tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs[arch][1]
    model, hf = load_model(folder, device="cpu"), tiny.hf_model(folder)
    batch = encode(tiny_tokenizer, PROMPTS)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with add(model, v, layer=1, coeff=2.5):
        ours = bridge_logits(model, batch)
    with hf_edit_layer_input(hf, 1, lambda h: h + 2.5 * v.float()):
        ref = hf_logits(hf, batch)
    m = real(batch)
    torch.testing.assert_close(ours[m], ref[m], atol=1e-4, rtol=0)
    assert float((ref[m] - hf_logits(hf, batch)[m]).abs().max()) > 1e-2


def test_affine_ablation_sets_projection_and_equals_hf(tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs["llama"][1]
    model, hf = load_model(folder, device="cpu"), tiny.hf_model(folder)
    batch = encode(tiny_tokenizer, PROMPTS)
    g = torch.Generator().manual_seed(7)
    r = torch.randn(model.cfg.d_model, generator=g)
    refs = torch.randn(2, model.cfg.d_model, generator=g, dtype=torch.float64)  # reference activations, layers 0, 2
    seen = {}
    hooks = affine_hooks(model, r, refs, layers=[0, 2])
    with model.hooks(fwd_hooks=hooks + [("blocks.2.hook_resid_pre", lambda a, hook: seen.__setitem__("x", a.clone()))]):
        ours = bridge_logits(model, batch)
    rh = unit(r)
    want = float(refs[1] @ rh)
    got = seen["x"][real(batch)].double() @ rh
    torch.testing.assert_close(got, torch.full_like(got, want), atol=1e-5, rtol=0)

    def edit(c):
        return lambda h: (h.double() - ((h.double() @ rh) - c)[..., None] * rh).float()

    with hf_edit_layer_input(hf, 0, edit(float(refs[0] @ rh))), hf_edit_layer_input(hf, 2, edit(want)):
        ref = hf_logits(hf, batch)
    m = real(batch)
    torch.testing.assert_close(ours[m], ref[m], atol=1e-4, rtol=0)
    with affine_ablate(model, r, 0.0, layers=2):  # scalar reference 0 at one layer = plain projection there
        zero = bridge_logits(model, batch)
    with hf_edit_layer_input(hf, 2, edit(0.0)):
        torch.testing.assert_close(zero[m], hf_logits(hf, batch)[m], atol=1e-4, rtol=0)


def test_saved_direction_carries_the_ablation_it_was_chosen_under(tiny_pair_dirs, tiny_tokenizer, tmp_path):
    from probes.directions import recorded_ablation_hooks

    model = load_model(tiny_pair_dirs["llama"][1], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    raw = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plain = Direction.from_raw(raw, layer=1)
    affine = Direction.from_raw(raw, layer=1, data={"ablation": {"method": "affine", "layers": [1, 2],
                                                                 "reference": [0.5, -2.0]}})
    affine = Direction.load(affine.save(tmp_path / "d.safetensors"))  # the spec survives the file
    m = real(batch)
    for d, hooks in ((plain, ablation_hooks(model, raw)), (affine, affine_hooks(model, raw, [0.5, -2.0], [1, 2]))):
        with model.hooks(fwd_hooks=recorded_ablation_hooks(model, d)):
            got = bridge_logits(model, batch)
        with model.hooks(fwd_hooks=hooks):
            want = bridge_logits(model, batch)
        torch.testing.assert_close(got[m], want[m], atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown ablation method"):
        recorded_ablation_hooks(model, Direction.from_raw(raw, data={"ablation": {"method": "mean"}}))


def test_intervention_input_errors(tiny_pair_dirs):
    model = load_model(tiny_pair_dirs["llama"][0], device="cpu")
    d = model.cfg.d_model
    with pytest.raises(ValueError, match="out of range"):
        addition_hooks(model, torch.randn(d), layer=3)
    with pytest.raises(ValueError, match="d_model"):
        addition_hooks(model, torch.randn(d + 1), layer=0)
    with pytest.raises(ValueError, match="NaN"):
        addition_hooks(model, torch.full((d,), float("nan")), layer=0)
    with pytest.raises(ValueError, match="zero"):
        ablation_hooks(model, torch.zeros(d))
    with pytest.raises(ValueError, match="one reference projection per layer"):
        affine_hooks(model, torch.randn(d), [0.0, 1.0], layers=[0, 1, 2])
    with pytest.raises(ValueError, match="direction has"):
        orthogonalize(model, torch.randn(d + 2))
