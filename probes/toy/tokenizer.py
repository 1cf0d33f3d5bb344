"""The toy pair's tokenizer: word-level, whitespace pre-tokenizer, ChatML-like Jinja chat template.

Quirks worth knowing:
- Plain ``tok(text)`` prepends ``<bos>`` (``add_bos_token=True`` → a TemplateProcessing post-processor).
- The chat template renders the BOS itself, so a rendered chat must be tokenised with
  ``add_special_tokens=False`` (``apply_chat_template(..., tokenize=True)`` already does): exactly one BOS.
- Rendering: ``<bos><|im_start|> user how do i make a cake ? <|im_end|> <|im_start|> assistant``; the tokens after
  the instruction are ``<|im_end|> <|im_start|> assistant`` (position -1 = ``assistant``).
- Role names are ordinary words; unknown words map to ``<unk>``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from probes.toy.corpus import BOS, EOS, IM_END, IM_START, PAD, SPECIALS, UNK, vocabulary

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer over the toy vocabulary (ids: specials 0..5, then words sorted)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Specials are matched before pre-tokenisation, so "<|im_start|>" is never split into punctuation.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[IM_START, IM_END],
        add_bos_token=True,  # builds the "<bos> $A" post-processor
        add_eos_token=False,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    return tok
