"""Recorded activations equal raw HF forward passes on tiny random models of real architectures."""
import pytest
import torch

import tiny
from probes.activations import Activations, record, record_pair
from probes.chat import encode
from probes.pairs import load_model, load_pair

PROMPTS = ["how do i make a cake ?", "tell me about the sun please , why is the sky", "hello"]
# The module whose input is resid_mid (the residual after attention, before the MLP's norm).
MID_NORM = {"llama": "post_attention_layernorm", "qwen2": "post_attention_layernorm",
            "gemma2": "pre_feedforward_layernorm", "gemma3": "pre_feedforward_layernorm", "gpt2": "ln_2"}


def hf_reference(folder, batch, arch):
    """hidden_states and resid_mid per layer from plain transformers, positions derived from the mask."""
    hf = tiny.hf_model(folder)
    blocks = hf.transformer.h if arch == "gpt2" else hf.model.layers
    mids = []
    handles = [getattr(block, MID_NORM[arch]).register_forward_pre_hook(lambda m, args: mids.append(args[0]))
               for block in blocks]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos, output_hidden_states=True)
    for h in handles:
        h.remove()
    return out.hidden_states, mids


def gather(x, idx):
    return x[torch.arange(x.shape[0])[:, None], idx]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_residuals_equal_hf_hidden_states(arch, tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs[arch][1]
    model = load_model(folder, device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    acts = record(model, batch, hooks=["resid_pre", "resid_mid", "resid_post"], positions="post_instruction",
                  batch_size=2, progress=False)
    hidden, mids = hf_reference(folder, batch, arch)
    idx, _ = batch.positions("post_instruction")
    n = model.cfg.n_layers
    for layer in range(n):
        torch.testing.assert_close(acts.tensors["resid_pre"][:, layer], gather(hidden[layer], idx), atol=1e-5, rtol=0)
        torch.testing.assert_close(acts.tensors["resid_mid"][:, layer], gather(mids[layer], idx), atol=1e-5, rtol=0)
        if layer < n - 1:  # hidden_states[-1] is after the final norm
            torch.testing.assert_close(acts.tensors["resid_post"][:, layer], gather(hidden[layer + 1], idx),
                                       atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_role_mean_and_layer_subset(arch, tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs[arch][0]
    model = load_model(folder, device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    # Only layer 1: the forward stops early, which must not change what is recorded.
    acts = record(model, batch, hooks="resid_pre", layers=[1], positions=["mean(user)", "user[0]", -1],
                  progress=False)
    hidden, _ = hf_reference(folder, batch, arch)
    user = batch.role_mask("user").float()
    expected_mean = (hidden[1] * user[..., None]).sum(1) / user.sum(1, keepdim=True)
    assert acts.positions == ["mean(user)", "user[0]", "[-1]"]
    torch.testing.assert_close(acts.tensor[:, 0, 0], expected_mean, atol=1e-5, rtol=0)
    first = batch.positions("user[0]")[0]
    torch.testing.assert_close(acts.tensor[:, 0, 1], gather(hidden[1], first)[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(acts.tensor[:, 0, 2], hidden[1][:, -1], atol=1e-5, rtol=0)


def test_padding_invariance(tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs["qwen2"][1], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    together = record(model, batch, positions="post_instruction", progress=False).tensor
    for row, prompt in enumerate(PROMPTS):
        alone = record(model, encode(tiny_tokenizer, [prompt]), positions="post_instruction", progress=False).tensor
        torch.testing.assert_close(together[row], alone[0], atol=1e-5, rtol=0)


def test_streaming_mean_save_and_load(tmp_path, tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs["llama"][1], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS * 3)
    full = record(model, batch, hooks=["resid_post", "mlp_out"], batch_size=4, progress=False)
    streamed = record(model, batch, hooks=["resid_post", "mlp_out"], batch_size=2, keep="mean", progress=False)
    assert streamed.tensors is None and streamed.count == 9
    for hook in ("resid_post", "mlp_out"):
        assert streamed.mean(hook).dtype == torch.float64
        torch.testing.assert_close(streamed.mean(hook), full.tensors[hook].double().mean(0), atol=1e-6, rtol=0)
    path = full.save(tmp_path / "acts.safetensors")
    back = Activations.load(path)
    assert back.hooks == full.hooks and back.positions == full.positions and back.prompts == full.prompts
    assert torch.equal(back.tensors["mlp_out"], full.tensors["mlp_out"])


def test_record_pair_uses_the_same_tokens(tiny_pair_dirs):
    pair = load_pair(*tiny_pair_dirs["llama"], device="cpu")
    batch = pair.encode(PROMPTS)
    acts = record_pair(pair, batch, layers=[0], progress=False)
    assert set(acts) == {"base", "instruct"}
    assert acts["base"].tensor.shape == acts["instruct"].tensor.shape == (3, 1, 1, 64)
    assert not torch.allclose(acts["base"].tensor, acts["instruct"].tensor)


def test_bad_input_errors(tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs["llama"][1], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="out of range"):
        record(model, batch, layers=[7], progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        record(model, batch, hooks="resid_sideways", progress=False)
    with pytest.raises(ValueError, match="context"):
        record(model, encode(tiny_tokenizer, [" ".join(["cake"] * 130)]), progress=False)
    with pytest.raises(ValueError, match="no 'response' tokens"):
        record(model, batch, positions="response[0]", progress=False)
    broken = load_model(tiny_pair_dirs["llama"][0], device="cpu")
    broken.original_model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        record(broken, batch, hooks="resid_post", progress=False)


def test_run_with_cache_passes_the_mask(tiny_pair_dirs, tiny_tokenizer):
    """A left-padded row's logits and cached residuals equal HF's on that prompt alone; without the mask they
    would not (the check below shows the gap is real, so the equality is not vacuous)."""
    from probes import run_with_cache

    folder = tiny_pair_dirs["qwen2"][1]
    model = load_model(folder, device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    row = 2  # "hello": the shortest, most padded row
    n = int(batch.attention_mask[row].sum())
    logits, cache = run_with_cache(model, batch, names_filter=lambda name: name.endswith("hook_resid_post"))
    hf = tiny.hf_model(folder)
    alone = batch[row : row + 1]
    alone_ids = alone.input_ids[:, -n:]
    with torch.no_grad():
        ref = hf(alone_ids, output_hidden_states=True)
    torch.testing.assert_close(logits[row, -n:], ref.logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"][row, -n:], ref.hidden_states[1][0], atol=1e-5, rtol=0)
    with torch.no_grad():
        unmasked = model(batch.input_ids)
    assert (unmasked[row, -n:] - ref.logits[0]).abs().max() > 1e-2
    pair = load_pair(*tiny_pair_dirs["qwen2"], device="cpu")
    both = pair.run_with_cache(batch)
    torch.testing.assert_close(both["instruct"][0], logits, atol=1e-5, rtol=0)
    assert not torch.allclose(both["base"][0], logits)
    with pytest.raises(TypeError, match="ChatBatch"):
        run_with_cache(model, batch.input_ids)


def test_record_all_positions_negative_layers_and_head_axis(tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs["llama"][1]
    model = load_model(folder, device="cpu")
    one = encode(tiny_tokenizer, PROMPTS[:1])
    hidden, _ = hf_reference(folder, one, "llama")
    acts = record(model, one, hooks="resid_pre", layers=-1, positions="all", progress=False)
    n = model.cfg.n_layers
    assert acts.layers == [n - 1] and acts.positions == [str(i) for i in range(one.seq_len)]
    torch.testing.assert_close(acts.tensor[0, 0], hidden[n - 1][0], atol=1e-5, rtol=0)
    assert record(model, one, layers=slice(-2, None), progress=False).layers == [n - 2, n - 1]
    with pytest.raises(ValueError, match="unpadded"):
        record(model, encode(tiny_tokenizer, PROMPTS), positions="all", progress=False)
    with pytest.raises(ValueError, match="twice"):
        record(model, one, layers=[1, -2], progress=False)

    # attn.hook_z keeps its head axis: [prompt, layer, position, head, d_head], equal to HF's o_proj input.
    batch = encode(tiny_tokenizer, PROMPTS)
    z = record(model, batch, hooks="blocks.{layer}.attn.hook_z", positions=["post_instruction", "mean(user)"],
               progress=False)
    hf = tiny.hf_model(folder)
    seen = []
    handles = [b.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for b in hf.model.layers]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos)
    for h in handles:
        h.remove()
    heads, d_head = model.cfg.n_heads, model.cfg.d_head
    assert z.tensor.shape == (3, n, len(batch.post_instruction_offsets) + 1, heads, d_head)
    idx, _ = batch.positions("post_instruction")
    user = batch.role_mask("user").float()
    for layer in range(n):
        ref = seen[layer].reshape(3, batch.seq_len, heads, d_head)
        torch.testing.assert_close(z.tensor[:, layer, :-1], gather(ref, idx), atol=1e-5, rtol=0)
        mean_user = (ref * user[..., None, None]).sum(1) / user.sum(1)[:, None, None]
        torch.testing.assert_close(z.tensor[:, layer, -1], mean_user, atol=1e-5, rtol=0)
    torch.testing.assert_close(z.mean(), z.tensor.double().mean(0), atol=1e-9, rtol=0)
    text = repr(z)
    assert len(text) < 400 and "hook_z" in text and str(list(z.tensor.shape)) in text


def test_activations_repr_is_short(tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs["llama"][1], device="cpu")
    acts = record(model, encode(tiny_tokenizer, PROMPTS), hooks="resid_post", progress=False)
    text = repr(acts)
    assert text.startswith("Activations(") and "prompts=3" in text and "[3, 3, 1, 64]" in text and len(text) < 300


def test_falcon_residuals_equal_hf(tmp_path, tiny_tokenizer):
    """Falcon (multi-query, parallel attention + MLP, as falcon-7b) through the bridge: resid_pre equals HF."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    hf = FalconForCausalLM(FalconConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, multi_query=True, parallel_attn=True, bias=False,
                                        new_decoder_architecture=False, bos_token_id=1, eos_token_id=2)).eval()
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    acts = record(model, batch, "resid_pre", positions="post_instruction", progress=False)
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos,
                    output_hidden_states=True).hidden_states
    idx, _ = batch.positions("post_instruction")
    for layer in range(2):
        torch.testing.assert_close(acts.tensor[:, layer], gather(hidden[layer], idx), atol=1e-5, rtol=0)
