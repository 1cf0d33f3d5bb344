"""Token roles on the real tokenizers and chat templates in ../shared/data/tokenizers (exact tokens per family)."""
import pytest

import real_tokenizers as rt
from probes.chat import encode

rt.require_shared()

# The post-instruction region of each family: every template token after the user's text up to the response.
POST_INSTRUCTION = {
    "smollm2": ["<|im_end|>", "\n", "<|im_start|>", "ass", "istant", "\n"],
    "qwen2.5": ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"],
    "llama3.2": ["<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"],
    "gemma2": ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"],
    "qwen3": ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n", "<think>", "\n\n", "</think>", "\n\n"],
}
# Default system prompts the templates insert when none is given (labelled `system`, not `template`).
DEFAULT_SYSTEM = {
    "smollm2": "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
}
QUESTION = "How do I bake bread?"


def parts(batch, row=0):
    toks, roles = batch.tokens(row), batch.row_roles(row)
    return {role: [t for t, r in zip(toks, roles) if r == role] for role in set(roles)}


@pytest.mark.parametrize("family", list(POST_INSTRUCTION))
def test_exact_roles_per_family(family):
    tok = rt.ALL[family]()
    batch = encode(tok, [QUESTION, "Hi"])
    p = parts(batch)
    assert p["post_instruction"] == POST_INSTRUCTION[family]
    assert "".join(p["user"]) == QUESTION
    assert "".join(p.get("system", [])) == DEFAULT_SYSTEM.get(family, "")
    assert batch.post_instruction_offsets == list(range(-len(POST_INSTRUCTION[family]), 0))
    # Never a double BOS: the template renders its own and nothing is added on top.
    # (SmolLM2's BOS is <|im_start|>, which recurs as a role marker, so count only the leading run.)
    ids = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
    assert not (tok.bos_token_id is not None and ids[0] == ids[1] == tok.bos_token_id)
    # The ids are exactly what the tokenizer's own apply_chat_template produces.
    ref = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                  tokenize=True, enable_thinking=False, return_dict=False)
    assert batch.input_ids[0][batch.attention_mask[0].bool()].tolist() == list(ref)


@pytest.mark.parametrize("family", ["smollm2", "qwen2.5", "llama3.2", "qwen3"])
def test_explicit_system_prompt(family):
    batch = encode(rt.ALL[family](), [QUESTION], system="Be brief.")
    p = parts(batch)
    assert "".join(p["system"]) == "Be brief."
    assert p["post_instruction"] == POST_INSTRUCTION[family]


def test_llama_bos_is_first_and_single():
    tok = rt.llama32_instruct()
    batch = encode(tok, [QUESTION])
    assert batch.tokens(0)[0] == "<|begin_of_text|>" and batch.row_roles(0)[0] == "bos"
    assert batch.tokens(0).count("<|begin_of_text|>") == 1
    raw = encode(tok, [QUESTION], template=False)
    assert raw.row_roles(0) == ["bos"] + ["user"] * 6


def test_gemma_rejects_a_system_prompt_clearly():
    with pytest.raises(ValueError, match="System role not supported"):
        encode(rt.gemma2_template_tokenizer(), [QUESTION], system="Be brief.")


@pytest.mark.parametrize("build,expected", [("gemma2_template_tokenizer", "<end_of_turn>"),
                                            ("qwen25_instruct", "<|im_end|>"), ("llama32_instruct", "<|eot_id|>"),
                                            ("smollm2_instruct", "<|im_end|>")])
def test_end_of_turn_token_from_the_template(build, expected):
    """Where an answer ends: Gemma's <end_of_turn> is not its <eos>, so generation must stop at it too."""
    from probes.chat import end_of_turn_ids
    from probes.generation import _stop_ids

    tok = getattr(rt, build)()
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == [expected]
    assert set(end_of_turn_ids(tok)) <= _stop_ids(tok, None)


def test_mistral_inst_template_on_a_stand_in_tokenizer():
    """Mistral's `[INST] … [/INST]` template (no system role, no generation prompt) on the Llama-3.2 tokenizer as a
    stand-in (the Mistral tokenizer is not available): the post-instruction tokens are exactly ` [/INST]`, the user
    text is the instruction, and a system prompt is refused with the template's own reason."""
    import copy

    tok = copy.deepcopy(rt.llama32_instruct())
    tok.chat_template = (rt.tokenizers_dir() / "Mistral-7B-Instruct-v0.1_chat_template" / "chat_template.jinja"
                         ).read_text()
    b = encode(tok, ["How do I bake bread?", "Name a colour."])
    for row, text in enumerate(b.instructions):
        toks, roles = b.tokens(row), b.row_roles(row)
        assert "".join(t for t, r in zip(toks, roles) if r == "post_instruction") == " [/INST]"
        assert "".join(t for t, r in zip(toks, roles) if r == "user").strip() == text
        assert roles[0] == "bos" and roles.count("bos") == 1 and roles[-1] == "post_instruction"
    with pytest.raises(ValueError, match="roles must alternate"):
        encode(tok, ["hi"], system="be brief")
