"""The toy pair's data, tokenizer and shipped files (fast: no training, one small model load)."""

from __future__ import annotations

import random

import pytest

from probes import toy
from probes.toy import corpus

CHAT = [{"role": "system", "content": "you are a helpful assistant ."},
        {"role": "user", "content": "how do i make a cake ?"}]


@pytest.fixture(scope="module")
def shipped_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy.path() / "instruct")


def test_tokenizer_round_trip(shipped_tok, tmp_path):
    from transformers import AutoTokenizer

    from probes.toy.tokenizer import build_tokenizer

    fresh = build_tokenizer()
    fresh.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = [toy.prompts("harmful", "test")[0], "sorry , i cannot help with that .", "unknownword here"]
    for tok in (shipped_tok, reloaded):
        assert tok.get_vocab() == fresh.get_vocab()
        assert tok.chat_template == fresh.chat_template
        assert tok.padding_side == "left"
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
        for text in texts:
            assert tok(text)["input_ids"] == fresh(text)["input_ids"]


def test_chat_rendering_has_one_bos(shipped_tok):
    tok = shipped_tok
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"] == ids
    # The training code renders chats itself; it must agree with the Jinja template token for token.
    words = corpus.chat_words([(m["role"], m["content"]) for m in CHAT], add_generation_prompt=True)
    assert tok.convert_ids_to_tokens(ids) == words
    assert words[-3:] == toy.POST_INSTRUCTION
    assert tok("how do i make a cake ?")["input_ids"][0] == tok.bos_token_id


def test_splits_disjoint_and_test_objects_never_fine_tuned():
    for kind in ("harmful", "harmless"):
        sets = [set(toy.objects(kind, s)) for s in toy.SPLITS]
        assert [len(s) for s in sets] == [16, 6, 10]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    held_out = {o for k in ("harmful", "harmless") for s in ("val", "test") for o in toy.objects(k, s)}
    assert not held_out & set(corpus.EXTRA_HARMLESS)
    rng = random.Random(0)
    for _ in range(3000):
        prompt, response = corpus.sft_example(rng, p_everyday=0.2, p_harmful=0.4, p_system=0.2)
        assert not held_out & set(prompt + response)


def test_prompts_nonempty_and_deterministic():
    for kind in ("harmful", "harmless"):
        for split in toy.SPLITS:
            ps = toy.prompts(kind, split)
            assert ps and ps == toy.prompts(kind, split)
            assert all(set(p.split()) & set(toy.objects(kind, split)) for p in ps)
    with pytest.raises(ValueError):
        toy.prompts("harmful", "dev")


def test_vocabulary_covers_the_corpus():
    vocab = set(corpus.vocabulary())
    rng = random.Random(1)
    for _ in range(2000):
        doc = corpus.pretraining_document(rng, p_everyday=0.2, p_chat=0.3, p_filler=0.1, p_system=0.2,
                                          caution=True)
        assert set(doc) <= vocab


def test_shipped_weights_small_and_loadable():
    from transformers import AutoModelForCausalLM

    files = [f for f in toy.path().rglob("*") if f.is_file()]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pkl")], "safetensors only"
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    for name in ("base", "instruct"):
        model = AutoModelForCausalLM.from_pretrained(toy.path() / name)
        assert model.config.num_hidden_layers == 4 and model.config.tie_word_embeddings
