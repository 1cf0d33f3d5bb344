"""Overflowed or degenerate numbers raise an error naming where, instead of becoming results."""
import pytest
import torch

from probes.activations import last_logits, record
from probes.lens import logit_lens
from probes.pairs import load_model

import tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_overflowed_weights_raise_naming_the_prompt(tiny_pair_dirs, tiny_tokenizer, dtype):
    model = load_model(tiny_pair_dirs["llama"][1], device="cpu", dtype=dtype)
    with torch.no_grad():
        for name, p in model.original_model.named_parameters():
            if "norm" not in name:
                p.mul_(1e38 if dtype != torch.float16 else 6e4)
    from probes.chat import encode

    batch = encode(tiny_tokenizer, ["how do i make a cake ?", "hello"])
    with pytest.raises(FloatingPointError, match="prompt 0: 'how do i make a cake"):
        last_logits(model, batch)
    with pytest.raises(FloatingPointError):
        logit_lens(model, batch, progress=False)


def test_non_finite_activation_names_hook_layer_and_prompt(tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs["llama"][1], device="cpu")
    from probes.chat import encode

    batch = encode(tiny_tokenizer, ["hello", "how do i make a cake ?"])

    def poison(act, hook):
        act[1] = float("nan")
        return act

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison)]):
        with pytest.raises(FloatingPointError, match=r"blocks\.1\.hook_resid_post \(layer 1\) for prompt 1: 'how do"):
            record(model, batch, "resid_post", [0, 1], progress=False)


def test_zeroed_unembedding_is_degenerate(tiny_pair_dirs, tiny_tokenizer):
    model = load_model(tiny_pair_dirs["qwen2"][1], device="cpu")
    with torch.no_grad():
        model.original_model.lm_head.weight.zero_()
    from probes.chat import encode

    batch = encode(tiny_tokenizer, ["hello"])
    with pytest.raises(FloatingPointError, match="degenerate"):
        last_logits(model, batch)
    with pytest.raises(FloatingPointError, match="degenerate"):
        logit_lens(model, batch, progress=False)


def test_last_logits_never_unembeds_the_whole_sequence(tiny_pair_dirs, tiny_tokenizer):
    from probes.chat import encode

    model = load_model(tiny_pair_dirs["llama"][1], device="cpu")
    hf = tiny.hf_model(tiny_pair_dirs["llama"][1])
    batch = encode(tiny_tokenizer, ["how do i make a cake ?", "hello"])
    shapes = []
    handle = model.original_model.lm_head.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    try:
        logits = last_logits(model, batch)
    finally:
        handle.remove()
    assert shapes == [(2, 1, 64)]  # only the chosen position of each row, never [batch, seq, d_model]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
