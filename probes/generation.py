"""Greedy generation under hooks, KV-cached, batched over left-padded prompts.

The loop makes its own HF `DynamicCache`, hands it to the model under the keyword the installed transformers reads
(`cache` from transformers 5.2x on, `past_key_values` before), and checks after every step that the cache really
grew. Transformers renamed the keyword while TransformerBridge's attention still reads only `past_key_values`: a
cache that stays empty makes every new token attend to itself alone and the text silently wrong, so
`install_cache_shim` hands the bridge's attention the cache under both names, and a cache that does not grow raises.

A hand-written loop rather than HF `generate`: the bridge's forward derives each row's position ids from the
attention mask (left padding) and fires the hooks on every new token, and the loop is tested token for token
against HF `generate` and against uncached recomputation.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.activations import model_device
from probes.chat import ChatBatch

Hooks = Sequence[tuple[str, Any]]


class CacheNotFilledError(RuntimeError):
    """The KV cache did not grow by the tokens just processed: cached generation would be wrong."""


def _hf(model: Any) -> Any:
    return getattr(model, "original_model", model)


def cache_keyword(model: Any) -> str:
    """`"cache"` or `"past_key_values"`: the name under which the installed transformers' model takes its KV cache."""
    params = inspect.signature(_hf(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _copy_cache_kwarg(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
        kwargs["past_key_values"] = kwargs["cache"]
    return args, kwargs


def install_cache_shim(model: Any) -> int:
    """Let every bridge attention component see the KV cache whatever its keyword; returns how many it patched.

    Idempotent. A forward pre-hook with kwargs, on the attention components only, so nothing else changes.
    """
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # not a bridge version with this component: nothing to patch
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, AttentionBridge) and not getattr(module, "_probes_cache_shim", False):
            module.register_forward_pre_hook(_copy_cache_kwarg, with_kwargs=True)
            module._probes_cache_shim = True
            n += 1
    return n


def new_cache(model: Any) -> Any:
    """An empty HF `DynamicCache` for `model` (the constructor takes the config from transformers 4.56 on)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=_hf(model).config)
    except TypeError:
        return DynamicCache()


@dataclass
class Generation:
    """Greedy continuations: `tokens` `[batch, max_new_tokens]` (pad after a stop token), `texts` decoded without
    special tokens."""

    tokens: torch.Tensor
    texts: list[str]


def _stop_ids(tokenizer: Any, model: Any) -> set[int]:
    """EOS of the tokenizer and of the generation config, and the chat template's end-of-turn token (Gemma's
    `<end_of_turn>` is not its `<eos>`)."""
    from probes.chat import end_of_turn_ids

    ids = {tokenizer.eos_token_id} if tokenizer is not None and tokenizer.eos_token_id is not None else set()
    ids |= set(end_of_turn_ids(tokenizer)) if tokenizer is not None else set()
    gen = getattr(_hf(model), "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()
    return {int(i) for i in ids}


def _check_cache(cache: Any, expected: int) -> None:
    got = int(cache.get_seq_length())
    if got != expected:
        raise CacheNotFilledError(
            f"the KV cache holds {got} positions after {expected} tokens: the installed transformers / "
            "transformer-lens do not fill it, so cached generation would ignore the context (use_cache=False works)")


@torch.no_grad()
def generate(model: Any, batch: ChatBatch, max_new_tokens: int = 16, hooks: Hooks = (), *, batch_size: int = 16,
             use_cache: bool = True, stop_ids: Sequence[int] | None = None, progress: bool = True) -> Generation:
    """Greedy generation under `hooks`, batched over left-padded prompts.

    With `use_cache`, the prompt is run once and each new token is fed alone with the KV cache (the full attention
    mask, positions derived from it by the bridge); the hooks fire on every new token as it is processed.
    `use_cache=False` recomputes the whole sequence at every step (the reference the tests compare against). A row
    stops at a stop id (default: the tokenizer's EOS and the model's generation-config EOS ids); later tokens are
    pad. Raises `CacheNotFilledError` if the cache does not grow with the tokens.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if len(batch) == 0:
        raise ValueError("empty batch")
    tok = batch.tokenizer
    stops = set(stop_ids) if stop_ids is not None else _stop_ids(tok, model)
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and batch.seq_len + max_new_tokens > n_ctx:
        raise ValueError(f"{batch.seq_len} prompt + {max_new_tokens} new tokens exceed the context of {n_ctx}")
    device = model_device(model)
    if use_cache:
        install_cache_shim(model)
        keyword = cache_keyword(model)
    out = []
    with model.hooks(fwd_hooks=list(hooks)):
        for _, sub in tqdm(batch.chunks(batch_size), desc="generate", disable=not progress or len(batch) <= batch_size,
                           leave=False):
            ids, mask = sub.input_ids.to(device), sub.attention_mask.to(device)
            new = torch.full((len(sub), max_new_tokens), pad, dtype=torch.long)
            done = torch.zeros(len(sub), dtype=torch.bool)
            cache = new_cache(model) if use_cache else None

            def step_logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                if not use_cache:
                    return model(ids, attention_mask=mask, return_type="logits")
                fed = ids if cache.get_seq_length() == 0 else ids[:, -1:]
                logits = model(fed, attention_mask=mask, return_type="logits", use_cache=True, **{keyword: cache})
                _check_cache(cache, ids.shape[1])
                return logits

            logits = step_logits(ids, mask)
            for step in range(max_new_tokens):
                nxt = logits[:, -1].argmax(-1).cpu()
                new[:, step] = torch.where(done, torch.full_like(nxt, pad), nxt)
                done |= torch.tensor([int(t) in stops for t in nxt.tolist()])
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                ids = torch.cat([ids, nxt[:, None].to(device)], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logits = step_logits(ids, mask)
            out.append(new)
    tokens = torch.cat(out)
    texts = [tok.decode(row.tolist(), skip_special_tokens=True) for row in tokens] if tok is not None else []
    return Generation(tokens=tokens, texts=texts)
