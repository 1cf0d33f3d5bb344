"""The real tokenizers of `real_tokenizers.py`: encoding, special tokens, chat templates, llama.cpp test vectors."""
from __future__ import annotations

import pathlib

import pytest
from transformers import PreTrainedTokenizerFast

import real_tokenizers as rt

USER_HI = [{"role": "user", "content": "Hi"}]
LLAMA_DATE = "26 Jul 2024"  # pinned: the Llama template otherwise writes today's date

# name -> (builder, bos, eos, pad, ids of "Hello world" (with BOS where the tokenizer adds one), chat text for USER_HI,
#          template tokens that must each be one id)
CASES: dict[str, tuple] = {
    "smollm2": (rt.smollm2_instruct, "<|im_start|>", "<|im_end|>", "<|im_end|>", [19556, 905],
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen2.5": (rt.qwen25_instruct, None, "<|im_end|>", "<|endoftext|>", [9707, 1879],
                "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen2.5-base": (rt.qwen25_base, None, "<|endoftext|>", "<|endoftext|>", [9707, 1879],
                     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
                     ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "llama3.2": (rt.llama32_instruct, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", [128000, 9906, 1917],
                 "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                 f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA_DATE}\n\n<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]),
    "llama3.2-base": (rt.llama32_base, "<|begin_of_text|>", "<|end_of_text|>", None, [128000, 9906, 1917], None,
                      ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]),
    "gemma2": (rt.gemma2_template_tokenizer, "<bos>", "<eos>", "<pad>", [49154, 19556, 905],
               "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
               ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]),
    "qwen3": (rt.qwen3_template_tokenizer, None, "<|im_end|>", "<|endoftext|>", [9707, 1879],
              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
              ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]),
}


@pytest.fixture
def shared() -> pathlib.Path:
    """The shared data folder; skips (or, under CI, fails) the test where it is absent."""
    return rt.require_shared()


@pytest.fixture(scope="module")
def built() -> dict[str, PreTrainedTokenizerFast]:
    """One copy per builder shared by this module's read-only tests (each copy of a 150k vocabulary costs ~0.5 s).

    Tests that change a tokenizer call the builder themselves.
    """
    return {}


def _get(built: dict[str, PreTrainedTokenizerFast], name: str) -> PreTrainedTokenizerFast:
    if name not in built:
        built[name] = CASES[name][0]()
    return built[name]


def test_tables_cover_every_builder() -> None:
    assert set(rt.ALL) == {"smollm2", "qwen2.5", "llama3.2", "gemma2", "qwen3"}
    assert {b.__name__ for b in [*rt.ALL.values(), *rt.BASES.values()]} == {c[0].__name__ for c in CASES.values()}


@pytest.mark.parametrize("name", list(CASES))
def test_builder(name: str, shared: pathlib.Path, built: dict, capfd: pytest.CaptureFixture[str]) -> None:
    _, bos, eos, pad, hello_ids, chat, template_tokens = CASES[name]
    tok = _get(built, name)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)

    assert tok("Hello world")["input_ids"] == hello_ids
    assert tok.decode(tok("Hello world", add_special_tokens=False)["input_ids"]) == "Hello world"
    starts_with_bos = tok("a")["input_ids"][0] == tok.bos_token_id
    assert starts_with_bos == (name in {"llama3.2", "llama3.2-base", "gemma2"})

    for token in {*template_tokens, *tok.all_special_tokens}:
        token_id = tok.convert_tokens_to_ids(token)
        assert token_id is not None and (token == tok.unk_token or token_id != tok.unk_token_id), token
        assert tok.encode(token, add_special_tokens=False) == [token_id], token
        assert token_id in tok.encode(f"x{token}y", add_special_tokens=False), token

    if chat is None:
        assert tok.chat_template is None
    else:
        kwargs = {"date_string": LLAMA_DATE} if name == "llama3.2" else {}
        text = tok.apply_chat_template(USER_HI, tokenize=False, add_generation_prompt=True, **kwargs)
        assert text == chat
        ids = tok.apply_chat_template(USER_HI, add_generation_prompt=True, return_dict=False, **kwargs)
        # The template writes the BOS itself; rendering then encoding must not add a second one.
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        if bos is not None and starts_with_bos:
            assert ids.count(tok.bos_token_id) == 1
            assert tok(text)["input_ids"][:2] == [tok.bos_token_id] * 2  # the trap: default encoding doubles it
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


@pytest.mark.parametrize(("family", "name"), [("llama-bpe", "llama3.2-base"), ("qwen2", "qwen2.5-base")])
def test_llama_cpp_vectors(family: str, name: str, shared: pathlib.Path, built: dict) -> None:
    vectors = rt.llama_cpp_vectors(family)
    assert len(vectors) == 46 and ("", []) in vectors
    tok = _get(built, name)
    wrong = [(text, tok.encode(text, add_special_tokens=False), ids) for text, ids in vectors
             if tok.encode(text, add_special_tokens=False) != ids]
    assert wrong == []
    assert all(tok.decode(ids) == text for text, ids in vectors)


def test_llama_ids_and_template_details(shared: pathlib.Path, built: dict) -> None:
    tok = _get(built, "llama3.2")
    assert len(tok) == 128256
    assert tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>",
                                      "<|reserved_special_token_247|>"]) == [128000, 128001, 128009, 128004, 128255]
    assert tok("a", "b")["input_ids"] == [128000, 64, 128000, 65]
    text = tok.apply_chat_template(USER_HI, tokenize=False, add_generation_prompt=True)
    assert "Today Date: " in text  # today's date unless pinned: callers that need stable ids pass date_string
    system = [{"role": "system", "content": "Be brief."}, *USER_HI]
    assert "\n\nBe brief.<|eot_id|>" in tok.apply_chat_template(system, tokenize=False, date_string=LLAMA_DATE)


def test_gemma_and_qwen3_template_details(shared: pathlib.Path, built: dict) -> None:
    gemma = _get(built, "gemma2")
    assert gemma.add_bos_token is True
    assert len(gemma.encode("<|im_start|>", add_special_tokens=False)) > 1  # SmolLM2's specials are not special here
    with pytest.raises(Exception, match="System role not supported"):
        gemma.apply_chat_template([{"role": "system", "content": "x"}, *USER_HI], tokenize=False)
    convo = [*USER_HI, {"role": "assistant", "content": "Hello!"}]
    assert gemma.apply_chat_template(convo, tokenize=False) == \
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"

    qwen3 = _get(built, "qwen3")
    assert qwen3.convert_tokens_to_ids(list(rt.QWEN3_EXTRA_TOKENS)) == [151665, 151666, 151667, 151668]
    assert qwen3.apply_chat_template(USER_HI, tokenize=False, add_generation_prompt=True, enable_thinking=False) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # As in Qwen3: single ids, yet not "special", so decoding with skip_special_tokens keeps them.
    ids = qwen3.encode("<think>x</think>", add_special_tokens=False)
    assert qwen3.decode(ids, skip_special_tokens=True) == "<think>x</think>"


def test_copies_are_independent(shared: pathlib.Path, built: dict) -> None:
    _get(built, "smollm2")  # built and cached already: the two calls below are copies of one cached object
    first = rt.smollm2_instruct()
    first.add_special_tokens({"additional_special_tokens": ["<mine>"]})
    first.chat_template = "changed"
    second = rt.smollm2_instruct()
    assert "<mine>" not in second.get_vocab() and second.chat_template != "changed"
    assert len(second) == 49152


def test_require_shared_skips_or_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("PROBES_SHARED_DATA", str(tmp_path / "absent"))
    assert not rt.shared_available()
    with pytest.raises(FileNotFoundError, match="PROBES_SHARED_DATA"):
        rt.llama_cpp_vectors()
    monkeypatch.delenv(rt.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="shared test data absent"):
        rt.require_shared()
    monkeypatch.setenv(rt.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=rt.REQUIRE_ENV):
        rt.require_shared()
    # A shared folder without tokenizers/ counts as absent too.
    monkeypatch.setenv("PROBES_SHARED_DATA", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="no tokenizers/ folder"):
        rt.require_shared()
