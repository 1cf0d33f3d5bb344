"""Chat encoding and token roles on the tiny word-level ChatML tokenizer (real tokenizers: test_chat_real.py)."""
import pytest
import torch

from probes.chat import ROLES, encode


def roles_of(batch, row=0):
    return list(zip(batch.tokens(row), batch.row_roles(row)))


def test_roles_follow_the_rendered_template(tiny_tokenizer):
    b = encode(tiny_tokenizer, ["how do i bake bread ?"])
    assert roles_of(b) == [
        ("<bos>", "bos"), ("<|im_start|>", "template"), ("user", "template"),
        ("how", "user"), ("do", "user"), ("i", "user"), ("bake", "user"), ("bread", "user"), ("?", "user"),
        ("<|im_end|>", "post_instruction"), ("<|im_start|>", "post_instruction"), ("assistant", "post_instruction"),
    ]
    assert b.post_instruction_offsets == [-3, -2, -1]
    # Exactly one BOS although the template renders it and the tokenizer adds one to plain text.
    assert int((b.input_ids == tiny_tokenizer.bos_token_id).sum()) == 1


def test_system_and_response_roles(tiny_tokenizer):
    b = encode(tiny_tokenizer, ["tell me a story"], system="please help", responses=["sure . the sun"])
    assert roles_of(b)[:9] == [
        ("<bos>", "bos"), ("<|im_start|>", "template"), ("system", "template"), ("please", "system"),
        ("help", "system"), ("<|im_end|>", "template"), ("<|im_start|>", "template"), ("user", "template"),
        ("tell", "user"),
    ]
    assert roles_of(b)[-7:] == [
        ("<|im_end|>", "post_instruction"), ("<|im_start|>", "post_instruction"), ("assistant", "post_instruction"),
        ("sure", "response"), (".", "response"), ("the", "response"), ("sun", "response"),
    ]
    # The prompt's ids are the same with and without a response appended.
    plain = encode(tiny_tokenizer, ["tell me a story"], system="please help")
    assert b.input_ids[0, : plain.seq_len].tolist() == plain.input_ids[0].tolist()


def test_left_padding_and_positions(tiny_tokenizer):
    b = encode(tiny_tokenizer, ["hello", "how do i make a cake for the sun ?"])
    assert b.attention_mask[0, 0] == 0 and b.attention_mask[1].all()
    assert b.roles[0, 0] == ROLES.index("pad")
    last, labels = b.positions("post_instruction[-1]")
    assert labels == ["post_instruction[-1]"] and last.tolist() == [[b.seq_len - 1]] * 2
    allp, labels = b.positions("post_instruction")
    assert labels == ["post_instruction[-3]", "post_instruction[-2]", "post_instruction[-1]"]
    assert allp.tolist() == [list(range(b.seq_len - 3, b.seq_len))] * 2
    first_user, _ = b.positions("user[0]")
    assert [b.input_ids[r, first_user[r, 0]].item() for r in range(2)] == \
        tiny_tokenizer.convert_tokens_to_ids(["hello", "how"])
    both, labels = b.positions(["user[-1]", "last"])
    assert both.shape == (2, 2) and labels == ["user[-1]", "last"]
    with pytest.raises(ValueError, match="different numbers"):
        b.positions("user")
    with pytest.raises(ValueError, match="out of range"):
        b.positions("user[3]")
    with pytest.raises(ValueError, match="cannot read"):
        b.positions("nonsense[")


def test_slicing_trims_padding(tiny_tokenizer):
    b = encode(tiny_tokenizer, ["hello", "how do i make a cake ?"])
    sub = b[0:1]
    alone = encode(tiny_tokenizer, ["hello"])
    assert torch.equal(sub.input_ids, alone.input_ids) and torch.equal(sub.roles, alone.roles)
    assert [len(c) for _, c in b.chunks(1)] == [1, 1]


def test_raw_mode(tiny_tokenizer):
    b = encode(tiny_tokenizer, ["the sun"], template=False, responses=["is the sky"])
    assert roles_of(b) == [("<bos>", "bos"), ("the", "user"), ("sun", "user"), ("is", "response"),
                           ("the", "response"), ("sky", "response")]


def test_bad_input_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        encode(tiny_tokenizer, [])
    with pytest.raises(ValueError, match="over the model's context of 8"):
        encode(tiny_tokenizer, ["how do i make a cake for the sun ?"], max_length=8)
    with pytest.raises(ValueError, match="responses for"):
        encode(tiny_tokenizer, ["a", "b"], responses=["x"])
    no_template = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no chat template"):
        encode(no_template, ["hello"])
