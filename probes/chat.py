"""Encode instructions with the tokenizer's own chat template and label every token with its role.

Roles are found by locating the user's (and system's) text in the rendered template, never from per-family
strings: the template is rendered once with a sentinel in place of the user content, which splits it into the
text before the user content (role markers, default system prompt) and after it (the post-instruction region
up to where the response starts, e.g. ChatML's `<|im_end|>\\n<|im_start|>assistant\\n`).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

ROLES: tuple[str, ...] = ("pad", "bos", "system", "template", "user", "post_instruction", "response")
ROLE_ID: dict[str, int] = {r: i for i, r in enumerate(ROLES)}

_USER_SENTINEL = "PROBESUSERSENTINELQX"
_SYSTEM_SENTINEL = "PROBESSYSTEMSENTINELQX"
_SPEC = re.compile(r"^\s*(?P<role>[a-z_]+)\s*(?:\[\s*(?P<a>-?\d*)\s*(?P<colon>:)?\s*(?P<b>-?\d*)\s*\])?\s*$")


@dataclass
class ChatBatch:
    """Left-padded token ids with a role for every token.

    input_ids, attention_mask, roles: `[batch, seq]` (roles are indices into `ROLES`). `post_instruction`
    positions are addressed with negative offsets: `post_instruction[-1]` is the last template token before the
    response (the position whose next-token prediction is the first response token).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    roles: torch.Tensor
    instructions: list[str]
    responses: list[str] | None
    template: bool
    tokenizer: Any = None
    system: str | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """Real (non-pad) tokens per row, `[batch]`."""
        return self.attention_mask.sum(-1)

    def role_mask(self, role: str) -> torch.Tensor:
        """`[batch, seq]` bool: tokens of `role`."""
        if role not in ROLE_ID:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        return self.roles == ROLE_ID[role]

    def count(self, role: str) -> torch.Tensor:
        """`[batch]` number of tokens of `role` in each row."""
        return self.role_mask(role).sum(-1)

    @property
    def post_instruction_offsets(self) -> list[int]:
        """Offsets of the post-instruction tokens, e.g. `[-5, -4, -3, -2, -1]` for ChatML."""
        n = self.count("post_instruction")
        if not bool((n == n[0]).all()):
            raise ValueError("rows have different numbers of post-instruction tokens")
        return list(range(-int(n[0]), 0))

    def __getitem__(self, rows: slice | Sequence[int] | torch.Tensor) -> ChatBatch:
        """A sub-batch; the left padding no row needs any more is trimmed."""
        if isinstance(rows, int):
            rows = [rows]
        idx = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        mask = self.attention_mask[idx]
        start = int((mask.shape[1] - mask.sum(-1)).min()) if len(idx) else 0
        return replace(
            self,
            input_ids=self.input_ids[idx, start:],
            attention_mask=mask[:, start:],
            roles=self.roles[idx, start:],
            instructions=[self.instructions[i] for i in idx.tolist()],
            responses=None if self.responses is None else [self.responses[i] for i in idx.tolist()],
        )

    def chunks(self, batch_size: int) -> list[tuple[int, ChatBatch]]:
        """(first row, sub-batch) pairs of at most `batch_size` rows, in order."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        return [(i, self[i : i + batch_size]) for i in range(0, len(self), batch_size)]

    def tokens(self, row: int) -> list[str]:
        """The text of each non-pad token of `row` (needs the tokenizer)."""
        if self.tokenizer is None:
            raise ValueError("this ChatBatch carries no tokenizer")
        ids = self.input_ids[row][self.attention_mask[row].bool()].tolist()
        return [self.tokenizer.decode([t]) for t in ids]

    def row_roles(self, row: int) -> list[str]:
        """The role name of each non-pad token of `row`."""
        return [ROLES[r] for r in self.roles[row][self.attention_mask[row].bool()].tolist()]

    def positions(self, spec: str | int | Sequence[str | int]) -> tuple[torch.Tensor, list[str]]:
        """Absolute positions `[batch, k]` and a label for each of the k columns.

        `spec`: `"role[i]"` (the i-th token of that role in each row; negative counts from the role's end),
        `"role[a:b]"`, `"role"` (all its tokens: every row must have the same number), `"last"` (last token),
        an int (offset from the end of the sequence, -1 = last), or a list of these, concatenated.
        """
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError("empty position list")
            parts = [self.positions(s) for s in spec]
            return torch.cat([p for p, _ in parts], dim=1), [lab for _, labs in parts for lab in labs]
        if isinstance(spec, int):
            if not -self.seq_len <= spec < 0:
                raise ValueError(f"integer positions count from the end (-1 = last), got {spec}")
            return torch.full((len(self), 1), self.seq_len + spec, dtype=torch.long), [f"[{spec}]"]
        if spec == "last":
            return torch.full((len(self), 1), self.seq_len - 1, dtype=torch.long), ["last"]
        m = _SPEC.match(spec)
        if m is None or m["role"] not in ROLE_ID or m["role"] == "pad":
            raise ValueError(f"cannot read position spec {spec!r}; e.g. 'post_instruction[-1]', 'user[0:3]', 'last'")
        role = m["role"]
        mask = self.role_mask(role)
        counts = mask.sum(-1)
        if not bool(counts.gt(0).all()):
            bad = int(torch.nonzero(counts == 0)[0])
            raise ValueError(f"row {bad} has no {role!r} tokens (spec {spec!r})")
        # Column j of `where` is the j-th token of the role in each row (rows padded with -1).
        n_max = int(counts.max())
        where = torch.full((len(self), n_max), -1, dtype=torch.long)
        for r in range(len(self)):
            pos = torch.nonzero(mask[r]).flatten()
            where[r, : len(pos)] = pos
        if m["a"] is None and m["colon"] is None:  # the whole role
            if not bool((counts == counts[0]).all()):
                raise ValueError(f"rows have different numbers of {role!r} tokens; pick positions with an index")
            idx = list(range(int(counts[0])))
        elif m["colon"] is None:
            idx = [int(m["a"])]
        else:
            lo = int(m["a"]) if m["a"] else None
            hi = int(m["b"]) if m["b"] else None
            n_min = int(counts.min())
            idx = list(range(n_min))[lo:hi]
            if lo is not None and lo < 0 or hi is not None and hi < 0:
                if not bool((counts == counts[0]).all()):
                    raise ValueError(f"negative slices of {role!r} need the same count in every row")
            if not idx:
                raise ValueError(f"{spec!r} selects no token")
        out = []
        for i in idx:
            cols = torch.where(torch.as_tensor(i) >= 0, torch.as_tensor(i), counts + i)
            if bool((cols < 0).any()) or bool((cols >= counts).any()):
                raise ValueError(f"{spec!r}: index {i} is out of range for some rows ({role} counts "
                                 f"{counts.min().item()}..{counts.max().item()})")
            out.append(where[torch.arange(len(self)), cols])
        labels = [_position_label(role, i, int(counts[0]), bool((counts == counts[0]).all())) for i in idx]
        return torch.stack(out, dim=1), labels


def concat(batches: Sequence[ChatBatch]) -> ChatBatch:
    """The rows of `batches` in order, as one left-padded ChatBatch (shorter batches get more left padding).

    The batches must share template mode and tokenizer; responses are kept when every batch has them. Pad positions
    are masked, so each row's real tokens, roles and post-instruction offsets are those it had alone.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("no batches to concatenate")
    first = batches[0]
    if any(b.template != first.template for b in batches):
        raise ValueError("cannot concatenate template and raw batches")
    if any(b.tokenizer is not first.tokenizer for b in batches):
        raise ValueError("cannot concatenate batches of different tokenizers")
    seq = max(b.seq_len for b in batches)
    tok = first.tokenizer
    pad_id = 0 if tok is None else tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def left_pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (seq - t.shape[1], 0), value=value)

    systems = {b.system for b in batches}
    return ChatBatch(
        input_ids=torch.cat([left_pad(b.input_ids, pad_id) for b in batches]),
        attention_mask=torch.cat([left_pad(b.attention_mask, 0) for b in batches]),
        roles=torch.cat([left_pad(b.roles, ROLE_ID["pad"]) for b in batches]),
        instructions=[t for b in batches for t in b.instructions],
        responses=None if any(b.responses is None for b in batches) else [r for b in batches for r in b.responses],
        template=first.template, tokenizer=tok, system=systems.pop() if len(systems) == 1 else None)


def read_chat_template(source: str | os.PathLike) -> str:
    """A chat template from a `.jinja` file, a `tokenizer_config.json` (its `chat_template`; the first template
    when it is a list of named ones), or the template text itself. Raises ValueError naming the file."""
    text = str(source)
    path = pathlib.Path(text).expanduser()
    if "{%" in text or "{{" in text:
        return text
    if not path.is_file():
        raise ValueError(f"{text}: no such chat template file (.jinja, or a tokenizer_config.json)")
    if path.suffix.lower() == ".json":
        try:
            found = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: not a JSON object with a chat_template ({exc})") from None
        if isinstance(found, list):  # [{"name": "default", "template": ...}, ...]
            found = next((t.get("template") for t in found if t.get("name") == "default"), found[0].get("template"))
        if not isinstance(found, str) or not found:
            raise ValueError(f"{path}: no chat_template in it")
        return found
    return path.read_text(encoding="utf-8")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token(s) the chat template writes right after an assistant message (`<|im_end|>` for ChatML,
    `<end_of_turn>` for Gemma): where a chat model's answer ends, besides the tokenizer's EOS. Empty when the
    tokenizer has no template, or the template ends a turn with ordinary text."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    sentinel = "\u2063probes-end\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": sentinel}], tokenize=False)
    except Exception:  # noqa: BLE001 -- a template that cannot render this simply names no end token
        return []
    after = text.split(sentinel, 1)[1] if sentinel in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return []
    # A special token, or a single-token marker such as <end_of_turn> (a GGUF's control tokens may come through
    # the conversion without the special flag).
    marker = re.fullmatch(r"<[^<>\s]+>", tokenizer.convert_ids_to_tokens(int(ids[0])) or "")
    return [int(ids[0])] if ids[0] in set(tokenizer.all_special_ids) or marker else []


def check_position_spec(spec: str | int) -> None:
    """Raise ValueError unless `spec` is a position spec `ChatBatch.positions` or `record` can read (syntax and
    role only: whether every row has such a token is known once prompts are encoded). "all" is read by `record`."""
    if isinstance(spec, int) or spec in ("last", "all"):
        return
    m = _SPEC.match(spec) or re.match(r"^\s*mean\(\s*(?P<role>[a-z_]+)\s*\)\s*$", spec)
    if m is None:
        raise ValueError(f"cannot read position spec {spec!r}; e.g. 'post_instruction[-1]', 'user[0:3]', 'last'")
    if m["role"] not in ROLE_ID or m["role"] == "pad":
        raise ValueError(f"unknown role {m['role']!r} in {spec!r}; roles are {list(ROLES[1:])}")


def _position_label(role: str, i: int, count: int, uniform: bool) -> str:
    # Post-instruction tokens are named by their negative offset, the convention used across the toolkit.
    if role == "post_instruction" and uniform and i >= 0:
        i = i - count
    return f"{role}[{i}]"


def render_parts(tokenizer: Any, system: str | None = None, **template_kwargs: Any) -> tuple[str, str, tuple[int, int] | None]:
    """The rendered template split around the user content: (prefix, suffix, system span in the prefix).

    The system span is where an explicit system message sits, or the default system prompt that the template
    inserts when none is given (found by rendering once with a sentinel system message). None when there is none.
    """
    prefix, suffix = _split(tokenizer, _messages(_USER_SENTINEL, system), _USER_SENTINEL, template_kwargs)
    if system is not None:
        start = prefix.find(system)
        return prefix, suffix, (start, start + len(system)) if start >= 0 else None
    try:
        a, b = _split(tokenizer, _messages(_USER_SENTINEL, _SYSTEM_SENTINEL), _SYSTEM_SENTINEL, template_kwargs)
    except Exception:  # templates that reject a system role (Gemma) have no default system prompt either
        return prefix, suffix, None
    b = b[: b.find(_USER_SENTINEL)]  # text between the system content and the user content
    if prefix.startswith(a) and prefix.endswith(b) and len(prefix) > len(a) + len(b):
        return prefix, suffix, (len(a), len(prefix) - len(b))
    return prefix, suffix, None


def _messages(user: str, system: str | None) -> list[dict[str, str]]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    return msgs + [{"role": "user", "content": user}]


def _split(tokenizer: Any, messages: list[dict[str, str]], sentinel: str, kwargs: dict) -> tuple[str, str]:
    text = _render(tokenizer, messages, kwargs)
    if text.count(sentinel) != 1:
        raise ValueError("the chat template does not render the message content verbatim exactly once")
    i = text.index(sentinel)
    return text[:i], text[i + len(sentinel):]


def _render(tokenizer: Any, messages: list[dict[str, str]], kwargs: dict) -> str:
    # enable_thinking=False: thinking chat models (Qwen3) answer directly, as their base sibling would continue.
    kwargs = {"enable_thinking": False, **kwargs}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as exc:  # jinja's raise_exception(...) inside templates, e.g. Gemma's "System role not supported"
        if type(exc).__name__ != "TemplateError":
            raise
        raise ValueError(f"the chat template rejects these messages ({[m['role'] for m in messages]}): {exc}") from exc


def encode(
    tokenizer: Any,
    instructions: str | Sequence[str],
    *,
    system: str | None = None,
    responses: Sequence[str] | None = None,
    template: bool = True,
    max_length: int | None = None,
    **template_kwargs: Any,
) -> ChatBatch:
    """Encode user instructions with the tokenizer's own chat template (or raw, `template=False`).

    Responses, if given, are tokenised on their own and appended after the generation prompt, so the prompt's
    ids are the same with and without them. The rendered template carries its own BOS where the family uses
    one, so it is tokenised without adding special tokens: never a double BOS. Raises ValueError on an empty
    list, a template-less tokenizer in template mode, or a sequence longer than `max_length`.
    """
    if isinstance(instructions, str):
        instructions = [instructions]
    instructions = list(instructions)
    if not instructions:
        raise ValueError("no instructions to encode (empty list)")
    if not all(isinstance(s, str) for s in instructions):
        raise ValueError("instructions must be strings")
    if responses is not None:
        responses = list(responses)
        if len(responses) != len(instructions):
            raise ValueError(f"{len(responses)} responses for {len(instructions)} instructions")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("probes needs a fast tokenizer (character offsets locate each role)")
    bos_id = tokenizer.bos_token_id

    rows_ids: list[list[int]] = []
    rows_roles: list[list[int]] = []
    if template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: encode with template=False for raw prompts")
        if system is not None and not system:
            raise ValueError("empty system prompt: pass None for no system message")
        prefix, suffix, sys_span = render_parts(tokenizer, system, **template_kwargs)
    for n, instruction in enumerate(instructions):
        if template:
            text = _render(tokenizer, _messages(instruction, system), template_kwargs)
            if not (text.startswith(prefix) and text.endswith(suffix)):
                raise ValueError(f"instruction {n}: the template renders this content differently from others")
            user = (len(prefix), len(text) - len(suffix))
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, roles = _label(enc["input_ids"], enc["offset_mapping"], len(text), user, sys_span, bos_id)
        else:
            enc = tokenizer(instruction, add_special_tokens=True, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            special = set(tokenizer.all_special_ids)
            roles = [ROLE_ID["bos"] if (t == bos_id and i == 0) else
                     ROLE_ID["template"] if (t in special and s == e) else ROLE_ID["user"]
                     for i, (t, (s, e)) in enumerate(zip(ids, enc["offset_mapping"]))]
        if len(ids) > 1 and bos_id is not None and ids[0] == ids[1] == bos_id:
            warnings.warn("dropping a doubled BOS token", stacklevel=2)
            ids, roles = ids[1:], roles[1:]
        if responses is not None and responses[n]:
            resp = tokenizer(responses[n], add_special_tokens=False)["input_ids"]
            ids, roles = ids + list(resp), roles + [ROLE_ID["response"]] * len(resp)
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"prompt {n} is {len(ids)} tokens, over the model's context of {max_length}")
        rows_ids.append(ids)
        rows_roles.append(roles)

    seq = max(len(r) for r in rows_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(rows_ids), seq), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), seq), dtype=torch.long)
    roles_t = torch.full((len(rows_ids), seq), ROLE_ID["pad"], dtype=torch.long)
    for r, (ids, roles) in enumerate(zip(rows_ids, rows_roles)):
        input_ids[r, seq - len(ids):] = torch.tensor(ids)
        mask[r, seq - len(ids):] = 1
        roles_t[r, seq - len(ids):] = torch.tensor(roles)
    return ChatBatch(input_ids, mask, roles_t, instructions, responses, template, tokenizer, system)


def _label(
    ids: list[int], offsets: list[tuple[int, int]], text_len: int, user: tuple[int, int],
    system: tuple[int, int] | None, bos_id: int | None,
) -> tuple[list[int], list[int]]:
    """A role for each token of the rendered prompt from its character span."""
    roles = []
    for i, (t, (s, e)) in enumerate(zip(ids, offsets)):
        if i == 0 and bos_id is not None and t == bos_id:
            role = "bos"
        elif s < user[1] and e > user[0] or (s == e and user[0] <= s < user[1]):
            role = "user"  # any overlap with the user's words counts as user
        elif system is not None and s < system[1] and e > system[0]:
            role = "system"
        elif s >= user[1]:
            role = "post_instruction"
        else:
            role = "template"
        roles.append(ROLE_ID[role])
    return list(ids), roles
