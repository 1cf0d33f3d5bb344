"""The toy base/instruct pair: a tiny Llama trained here on CPU, with a real refusal mechanism.

``path()`` is the folder holding ``base/`` and ``instruct/`` (HF ``save_pretrained`` folders: safetensors, config,
tokenizer with a chat template). ``prompts(kind, split)`` gives the user requests the pair was built around: the
``test`` objects never appear in fine-tuning. Retrain with ``python -m probes.toy.train``, measure with
``python -m probes.toy.check``; see ``docs/toy.md``.

Importing this package is cheap: no torch, no transformers.
"""

from __future__ import annotations

from pathlib import Path

from probes.toy.corpus import REFUSAL_PREFIX, SPLITS, objects, prompts

__all__ = ["REFUSAL_PREFIX", "SPLITS", "objects", "path", "prompts", "POST_INSTRUCTION"]

# The chat template's tokens between the user's instruction and the response (position -1 is "assistant").
POST_INSTRUCTION = ["<|im_end|>", "<|im_start|>", "assistant"]


def path() -> Path:
    """The shipped pair: a folder with ``base/`` and ``instruct/``."""
    return Path(__file__).resolve().parent / "pair"
