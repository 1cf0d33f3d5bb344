"""Held-out evaluation of a base/instruct pair as chat models: greedy responses inside the chat template on every
held-out set, judged by both refusal judges (`probes.refusal.JUDGES`), plus examples.

Generation is HF `generate` (greedy, left-padded, KV-cached) on the plain HF models: evaluation is of the models
themselves, with no hooks.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from probes.files import atomic_path
from probes.refusal import JUDGES, judge

EXAMPLE_SETS = ("jbb_harmful", "jbb_benign")  # six examples of each model on each


def generate(model: Any, tokenizer: Any, instructions: Sequence[str], *, max_new_tokens: int = 64,
             batch_size: int = 32, desc: str = "generate") -> list[str]:
    """Greedy responses to `instructions` in the tokenizer's chat template, cut at end-of-turn or EOS."""
    from probes.chat import end_of_turn_ids

    tokenizer.padding_side = "left"
    stop = sorted({*end_of_turn_ids(tokenizer), tokenizer.eos_token_id} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    out: list[str] = []
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(instructions), batch_size), desc=desc):
        chunk = instructions[start:start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=pad)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out


def evaluate(models: dict[str, Any], tokenizer: Any, sets: dict[str, list[str]], out: str | os.PathLike, *,
             max_new_tokens: int = 64, batch_size: int = 32) -> dict[str, Any]:
    """Responses of every model on every set, saved to `out/responses.json` as they finish (a rerun skips the
    finished ones), and the refusal rate of each by each judge in `out/eval.json`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "responses.json"
    responses: dict[str, dict[str, list[str]]] = json.loads(store.read_text()) if store.is_file() else {}
    seconds: dict[str, float] = {}
    for which, model in models.items():
        for name, prompts in sets.items():
            done = responses.get(which, {}).get(name)
            if done is not None and len(done) == len(prompts):
                continue
            t0 = time.perf_counter()
            texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             desc=f"{which}/{name}")
            seconds[f"{which}/{name}"] = time.perf_counter() - t0
            responses.setdefault(which, {})[name] = texts
            with atomic_path(store) as p:
                p.write_text(json.dumps(responses, ensure_ascii=False, indent=0))
    table = {which: {name: {j: sum(judge(texts, j)) / len(texts) for j in JUDGES} | {"n": len(texts)}
                     for name, texts in by_set.items()}
             for which, by_set in responses.items()}
    report = {"refusal_rate": table, "max_new_tokens": max_new_tokens, "seconds": seconds,
              "examples": {which: {name: [{"instruction": p, "response": r} for p, r in zip(sets[name], texts)][:6]
                                   for name, texts in by_set.items() if name in EXAMPLE_SETS}
                           for which, by_set in responses.items()}}
    with atomic_path(out / "eval.json") as p:
        p.write_text(json.dumps(report, ensure_ascii=False, indent=1))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The refusal rates as a markdown table: one row per set, reference / extended judge per model."""
    table = report["refusal_rate"]
    models = list(table)
    lines = ["| set | n | " + " | ".join(f"{m} (reference / extended)" for m in models) + " |",
             "| --- | --- | " + " | ".join("---" for _ in models) + " |"]
    for name in next(iter(table.values())):
        cells = [f"{100 * table[m][name]['reference']:.0f}% / {100 * table[m][name]['extended']:.0f}%"
                 for m in models]
        lines.append(f"| {name} | {table[models[0]][name]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
