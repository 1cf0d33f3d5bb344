"""Real tokenizers for tests, built offline from `../shared/data/tokenizers/` (a helper module, not a test file).

Every builder returns a fresh `transformers.PreTrainedTokenizerFast` (Qwen's are its subclass `Qwen2Tokenizer`), a
deep copy of a cached build so that one test cannot change another's tokenizer, with the family's real chat template
and bos / eos / pad tokens:

| builder | built from | BOS on plain `tok(text)` |
| --- | --- | --- |
| `smollm2_instruct()` | SmolLM2-135M-Instruct `tokenizer.json` + the reconstructed ChatML template | no |
| `qwen25_instruct()`, `qwen25_base()` | `AutoTokenizer` on vocab.json + merges.txt + tokenizer_config.json | no |
| `llama32_instruct()`, `llama32_base()` | GPT-2-format BPE + 256 specials and settings of each tokenizer_config | yes |
| `gemma2_template_tokenizer()` | SmolLM2 BPE without its specials + Gemma's specials + gemma-2-2b-it template | yes |
| `qwen3_template_tokenizer()` | Qwen2.5 tokenizer + Qwen3's 4 extra tokens (Qwen3's ids) + Qwen3-0.6B template | no |

The Gemma-2 and Qwen3 tokenizer files could not be had: those two builders carry the real template and special
tokens on a stand-in vocabulary, so token ids of ordinary text are not the real ones (Qwen3 shares Qwen2.5's BPE,
so there only the missing tokens beyond `</think>` differ; Gemma's SentencePiece vocabulary is not reproduced).

Quirks kept on purpose because the real tokenizers have them:
- Llama-3.2 Instruct renders "Today Date: <today>" unless `date_string=` is passed to `apply_chat_template`.
- Llama-3.2 base has no chat template; its pad token is None. The Instruct `tokenizer_config.json` here is a
  transformers 4.47 re-save that added pad = eos = `<|eot_id|>` (the hub original has no pad); kept as found.
- `tok.add_bos_token` is False for Llama even though BOS is prepended (it comes from the post-processor, as with
  the hub `tokenizer.json`): check by encoding, not by that attribute.
- The Llama and Gemma templates write the BOS themselves: `tok(rendered_text)` then starts with two BOS tokens;
  encode rendered chat text with `add_special_tokens=False`. (In transformers 5, `apply_chat_template(...,
  tokenize=True)` returns a BatchEncoding unless `return_dict=False`.)

Tests call `require_shared()` first: it skips with a reason when the shared folder is absent, and fails instead
when `PROBES_REQUIRE_SHARED=1` (CI), so a missing folder can never turn the suite silently green.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from probes.prompts import shared_data_dir

if TYPE_CHECKING:  # transformers is imported on first build: test files that only need require_shared stay quick
    from transformers import PreTrainedTokenizerFast

REQUIRE_ENV = "PROBES_REQUIRE_SHARED"

# The Llama-3 pre-tokenizer split (tiktoken's cl100k pattern), as in the hub tokenizer.json. Digits go in runs of
# at most 3, unlike Qwen2 (single digits).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------------------------------------------- availability

def tokenizers_dir() -> pathlib.Path:
    """`<shared data>/tokenizers`; FileNotFoundError with the reason if the shared folder is absent."""
    path = shared_data_dir() / "tokenizers"
    if not path.is_dir():
        raise FileNotFoundError(f"no tokenizers/ folder in the shared data folder {path.parent}")
    return path


def shared_available() -> bool:
    """Whether the shared tokenizer folder is there."""
    try:
        tokenizers_dir()
    except FileNotFoundError:
        return False
    return True


def shared_required() -> bool:
    """Whether `$PROBES_REQUIRE_SHARED` asks for the shared folder to be present (CI sets it)."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def require_shared() -> pathlib.Path:
    """The shared data folder, or skip the calling test (module) with the reason; fail instead under CI.

    Usable inside a test, a fixture, or at module level.
    """
    try:
        tokenizers_dir()
        return shared_data_dir()
    except FileNotFoundError as e:
        reason = f"shared test data absent: {e}"
        if shared_required():
            pytest.fail(f"{reason} (and ${REQUIRE_ENV} is set, so this is an error)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def _file(*parts: str) -> pathlib.Path:
    path = tokenizers_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"shared tokenizer file missing: {path}")
    return path


def _read_json(*parts: str) -> dict:
    return json.loads(_file(*parts).read_text(encoding="utf-8"))


def _template(*parts: str) -> str:
    return _file(*parts).read_text(encoding="utf-8")


def _cached(build: Callable[[], PreTrainedTokenizerFast]) -> Callable[[], PreTrainedTokenizerFast]:
    """Build once, hand out deep copies (a test that adds a token or a template must not leak into the next)."""
    once = functools.lru_cache(maxsize=1)(build)

    @functools.wraps(build)
    def fresh() -> PreTrainedTokenizerFast:
        return copy.deepcopy(once())

    fresh.cache_clear = once.cache_clear  # type: ignore[attr-defined]
    return fresh


# ---------------------------------------------------------------------------------------------------- SmolLM2

@_cached
def smollm2_instruct() -> PreTrainedTokenizerFast:
    """SmolLM2-135M-Instruct: ChatML with the default system prompt; bos `<|im_start|>` (1), eos = pad `<|im_end|>` (2).

    Ids follow the Instruct config.json (bos_token_id 1, eos 2, pad 2). The tokenizer.json has no post-processor,
    so plain encoding adds no BOS (the hub tokenizer behaves the same).
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(_file("SmolLM2-135M", "SmolLM2-135M-Instruct", "tokenizer.json")))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=_template("SmolLM2-135M", "SmolLM2-Instruct.chat_template.RECONSTRUCTED.jinja"),
        model_max_length=8192, clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------------- Qwen2.5

def _qwen25(folder: str) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    # Qwen2Tokenizer builds its fast backend from vocab.json + merges.txt; local_files_only: never reach for the hub.
    # The base merges.txt lacks the "#version: 0.2" first line; the loader does not need it (the vectors test checks).
    return AutoTokenizer.from_pretrained(str(tokenizers_dir() / folder), local_files_only=True)


@_cached
def qwen25_instruct() -> PreTrainedTokenizerFast:
    """Qwen2.5-0.5B-Instruct: template with the "You are Qwen, created by Alibaba Cloud..." default system prompt;
    no bos; eos `<|im_end|>`, pad `<|endoftext|>`."""
    return _qwen25("Qwen2.5-0.5B-Instruct")


@_cached
def qwen25_base() -> PreTrainedTokenizerFast:
    """Qwen2.5-0.5B base: the same vocabulary; its template defaults to "You are a helpful assistant."; no bos;
    eos = pad `<|endoftext|>`."""
    return _qwen25("Qwen2.5-0.5B")


# ---------------------------------------------------------------------------------------------------- Llama-3.2

@functools.lru_cache(maxsize=1)
def _llama_vocab_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads(_file("Llama-3.2", "ollama_gpt2_format", "encoder.json").read_text(encoding="utf-8"))
    merges = []
    with _file("Llama-3.2", "ollama_gpt2_format", "vocab.bpe").open(encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line and not line.startswith("#version"):
                left, right = line.split(" ")
                merges.append((left, right))
    return vocab, merges


def _llama32(folder: str) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    config = _read_json("Llama-3.2", folder, "tokenizer_config.json")
    vocab, merges = _llama_vocab_merges()
    # ignore_merges=True as in the hub tokenizer.json: a pre-token already in the vocabulary is one token, as in
    # tiktoken. Without it "Cửa Việt" in llama.cpp's test vectors splits differently.
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), ignore_merges=True, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    decoder = config["added_tokens_decoder"]
    added = [AddedToken(d["content"], special=d["special"], normalized=d["normalized"], lstrip=d["lstrip"],
                        rstrip=d["rstrip"], single_word=d["single_word"])
             for _, d in sorted(decoder.items(), key=lambda kv: int(kv[0]))]
    tok.add_special_tokens(added)
    for idx, d in decoder.items():  # the ids are appended after the 128,000 BPE entries: they must land in place
        if tok.token_to_id(d["content"]) != int(idx):
            raise RuntimeError(f"{d['content']} got id {tok.token_to_id(d['content'])}, expected {idx}")
    bos = config["bos_token"]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos, eos_token=config["eos_token"], pad_token=config.get("pad_token"),
        chat_template=config.get("chat_template"),
        model_max_length=config["model_max_length"], model_input_names=config["model_input_names"],
        # The configs say True, which transformers 5 ignores for BPE tokenizers (with a warning): False is what
        # actually happens, without the noise.
        clean_up_tokenization_spaces=False,
    )


@_cached
def llama32_instruct() -> PreTrainedTokenizerFast:
    """Llama-3.2-1B-Instruct: bos `<|begin_of_text|>` prepended on plain encoding; eos `<|eot_id|>`; pad
    `<|eot_id|>` (added by the re-save this config comes from); the header/eot chat template."""
    return _llama32("Llama-3.2-1B-Instruct")


@_cached
def llama32_base() -> PreTrainedTokenizerFast:
    """Llama-3.2-1B base: bos `<|begin_of_text|>` prepended; eos `<|end_of_text|>`; no pad; no chat template."""
    return _llama32("Llama-3.2-1B")


# ---------------------------------------------------------------------------------------------- template stand-ins

GEMMA2_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # ids 151665..151668 in Qwen3


@_cached
def gemma2_template_tokenizer() -> PreTrainedTokenizerFast:
    """The gemma-2-2b-it template and special tokens on SmolLM2's BPE (Gemma's own tokenizer file is not available).

    SmolLM2's special tokens are removed first so that only Gemma's are special. Gemma's specials are appended
    after the 49,152 BPE entries in Gemma's order (pad, eos, bos, unk, start/end_of_turn): ids differ from the real
    0/1/2/3/106/107. `add_bos_token=True` as in Gemma's tokenizer_config: plain encoding prepends `<bos>`.
    """
    from transformers import PreTrainedTokenizerFast

    raw = json.loads(_file("SmolLM2-135M", "SmolLM2-135M-Instruct", "tokenizer.json").read_text(encoding="utf-8"))
    raw["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(raw))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA2_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        add_bos_token=True, add_eos_token=False,
        chat_template=_template("gemma-2-2b-it_chat_template", "google-gemma-2-2b-it.jinja"),
        model_max_length=8192, clean_up_tokenization_spaces=False,
    )


@_cached
def qwen3_template_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen3-0.6B template on the Qwen2.5 tokenizer plus Qwen3's four extra tokens, at Qwen3's ids.

    Qwen3 reuses Qwen2.5's vocabulary and added tokens up to 151664 and adds `<tool_response>`,
    `</tool_response>`, `<think>`, `</think>` (151665-151668) as added tokens that are single ids but not
    "special" (so `skip_special_tokens` keeps them), as in Qwen3's tokenizer_config. No bos, eos `<|im_end|>`, pad
    `<|endoftext|>`, no default system prompt; `enable_thinking=False` appends an empty think block.
    """
    tok = _qwen25("Qwen2.5-0.5B-Instruct")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_EXTRA_TOKENS])
    for offset, t in enumerate(QWEN3_EXTRA_TOKENS):
        if tok.convert_tokens_to_ids(t) != 151665 + offset:
            raise RuntimeError(f"{t} got id {tok.convert_tokens_to_ids(t)}, expected {151665 + offset}")
    tok.chat_template = _template("Qwen3-0.6B_chat_template", "Qwen-Qwen3-0.6B.jinja")
    return tok


# ---------------------------------------------------------------------------------------------------- tables

# One chat tokenizer per family (the instruct one where a family has both).
ALL: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "smollm2": smollm2_instruct,
    "qwen2.5": qwen25_instruct,
    "llama3.2": llama32_instruct,
    "gemma2": gemma2_template_tokenizer,
    "qwen3": qwen3_template_tokenizer,
}

# Base-model tokenizers that differ from their instruct sibling (eos, template, pad).
BASES: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "qwen2.5": qwen25_base,
    "llama3.2": llama32_base,
}


def llama_cpp_vectors(family: str = "llama-bpe") -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors: (text, expected ids without BOS) for "llama-bpe" or "qwen2".

    `.inp` holds the texts, each followed by a `\\n__ggml_vocab_test__\\n` line; `.out` one line of space-separated
    ids per text (an empty line for the empty text).
    """
    folder = {"llama-bpe": ("Llama-3.2", "llama.cpp_tokenizer_test_vectors"),
              "qwen2": ("Qwen2.5-0.5B", "llama.cpp_tokenizer_test_vectors")}[family]
    texts = _file(*folder, f"ggml-vocab-{family}.gguf.inp").read_text(encoding="utf-8")
    ids = _file(*folder, f"ggml-vocab-{family}.gguf.out").read_text(encoding="utf-8")
    inputs = texts.split("\n__ggml_vocab_test__\n")
    outputs = ids.split("\n")
    if inputs[-1] != "" or outputs[-1] != "" or len(inputs) != len(outputs):
        raise ValueError(f"unexpected layout of the {family} test vectors: "
                         f"{len(inputs)} inputs, {len(outputs)} outputs")
    return [(text, [int(x) for x in line.split()]) for text, line in zip(inputs[:-1], outputs[:-1], strict=True)]
