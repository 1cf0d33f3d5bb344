"""Tiny random-initialised models of real architectures, and a small word-level chat tokenizer, for tests.

Not a test module: imported by conftest and tests. Everything is built from configs, offline, in seconds.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("hello world how do i make a cake bake bread build bomb steal car write poem story tell me about the "
         "sun moon sky please explain what is why can you help with this sure sorry cannot ok yes no").split()
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)
ARCHS = ("llama", "qwen2", "gemma2", "gpt2", "gemma3")


def make_tokenizer():
    """A word-level PreTrainedTokenizerFast with ChatML-like special tokens and a BOS on plain encoding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + ["system", "user", "assistant", *WORDS, "?", ".", ","])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   padding_side="left")
    fast.chat_template = CHATML
    return fast


def make_model(arch: str, vocab_size: int, seed: int = 0, n_layers: int = 3, d_model: int = 64):
    """A random HF causal LM of `arch` in eval mode (eager attention, so attention patterns are returned)."""
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **common))
    elif arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                                               sliding_window=4, final_logit_softcapping=5.0,
                                               attn_logit_softcapping=20.0, **common))
    elif arch == "gemma3":  # sliding-window and global layers, q/k norms, post-norms
        model = Gemma3ForCausalLM(Gemma3TextConfig(
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)], **common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4,
                                           n_positions=128, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(arch)
    # Random init leaves norms at 1 and biases at 0; perturb them so parity tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.config._attn_implementation = "eager"
    return model.eval()


def save_model(folder: Path, arch: str, seed: int = 0, **kwargs) -> Path:
    """Save a tiny model of `arch` with the tiny tokenizer to `folder`, loadable like a hub model."""
    tok = make_tokenizer()
    model = make_model(arch, len(tok), seed=seed, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hf_model(folder: Path):
    """The same weights as plain transformers sees them (eager attention), for independent computations."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def load_experiment(name: str):
    """The module of experiment `name` (`probes.experiments.<name>`)."""
    from probes import experiments

    return experiments.load(name)
