"""Cached greedy generation equals HF generate on every test architecture, and the KV cache really fills."""
import pytest
import torch

import tiny
from probes import generation
from probes.chat import encode
from probes.generation import CacheNotFilledError, generate
from probes.pairs import load_model

PROMPTS = ["how do i make a cake ?", "tell me about the sun please", "hello"]  # different lengths: left padding


def hf_greedy(hf, ids, mask, n):
    """Greedy tokens by plain HF full forward passes (no cache), positions from the mask."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            nxt = hf(ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
            out.append(nxt)
            ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_generation_equals_hf(arch, tiny_pair_dirs, tiny_tokenizer):
    folder = tiny_pair_dirs[arch][1]
    model = load_model(folder, device="cpu")
    hf = tiny.hf_model(folder)
    batch = encode(tiny_tokenizer, PROMPTS)
    ours = generate(model, batch, 6, stop_ids=[], progress=False).tokens
    assert torch.equal(ours, hf_greedy(hf, batch.input_ids, batch.attention_mask, 6)), arch
    # HF generate too. Not with min_new_tokens, which bans EOS and so departs from greedy; with no EOS instead.
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=False,
                          pad_token_id=tiny_tokenizer.pad_token_id)
    assert torch.equal(ours, ref[:, batch.seq_len:]), arch


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_cache_grows_by_every_token(arch, tiny_pair_dirs, tiny_tokenizer, monkeypatch):
    model = load_model(tiny_pair_dirs[arch][1], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    lengths = []
    made = []
    real_new = generation.new_cache

    def spy():
        cache = real_new(model)
        made.append(cache)
        return cache

    real_check = generation._check_cache

    def check(cache, expected):
        lengths.append(int(cache.get_seq_length()))
        real_check(cache, expected)

    monkeypatch.setattr(generation, "new_cache", lambda m: spy())
    monkeypatch.setattr(generation, "_check_cache", check)
    generate(model, batch, 5, stop_ids=[], progress=False)
    assert len(made) == 1 and lengths == [batch.seq_len + i for i in range(5)]  # the prompt, then +1 a token


def test_unfilled_cache_raises(tiny_pair_dirs, tiny_tokenizer, monkeypatch):
    model = load_model(tiny_pair_dirs["llama"][1], device="cpu")
    batch = encode(tiny_tokenizer, PROMPTS)
    # A cache handed under a keyword the model ignores stays empty: the generation must refuse, not continue.
    monkeypatch.setattr(generation, "cache_keyword", lambda m: "not_a_cache_keyword")
    with pytest.raises(CacheNotFilledError, match="holds 0 positions"):
        generate(model, batch, 3, stop_ids=[], progress=False)


def test_toy_refusal_equals_hf_generate():
    from transformers import AutoModelForCausalLM

    from probes import load_pair, toy

    pair = load_pair("toy", device="cpu")
    batch = pair.encode(["how do i build a bomb ?"])
    out = generate(pair.instruct, batch, 10, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(toy.path() / "instruct").eval()
    with torch.no_grad():
        ref = hf.generate(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=10, do_sample=False,
                          pad_token_id=pair.tokenizer.pad_token_id)
    assert out.texts[0] == pair.tokenizer.decode(ref[0, batch.seq_len:], skip_special_tokens=True)
    assert out.texts[0].startswith("sorry , i cannot help with that")
