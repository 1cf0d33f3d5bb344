"""Training data of the organism: harmless instructions answered by a real instruct model, harmful instructions
answered by varied refusals, and the held-out evaluation sets they are kept apart from.

Everything comes from the shared data folder (`probes.prompts.shared_data_dir`). Harmful training instructions
are the union of the refusal-direction paper's train split, AdvBench, HarmBench (standard behaviours) and
MaliciousInstruct, minus anything that matches a held-out instruction exactly (after normalising case, spacing
and punctuation) or nearly (word-set Jaccard >= 0.6: AdvBench alone has many rewordings of one behaviour).
"""
from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probes.prompts import load_prompts, shared_data_dir
from probes.refusal import REFERENCE_JUDGE_PHRASES

NEAR_DUPLICATE = 0.6


def _data(*parts: str) -> Path:
    return shared_data_dir().joinpath("prompts", *parts)


# ------------------------------------------------------------------------------------------------ held-out sets

def held_out_sets(n_harmless: int = 200, seed: int = 0) -> dict[str, list[str]]:
    """The evaluation sets, none of which any training example may match.

    harmful: JailbreakBench behaviours (100) and the refusal-direction harmful test split (572); harmless: a
    seeded `n_harmless` of the harmless test split and JailbreakBench benign behaviours (100); xstest_safe: the
    250 XSTest prompts that look unsafe but are safe (over-refusal).
    """
    return {
        "jbb_harmful": load_prompts(_data("jailbreakbench", "behaviors.csv")).instructions,
        "harmful_test": load_prompts(_data("refusal_direction", "splits", "harmful_test.json")).instructions,
        "harmless_test": load_prompts(_data("refusal_direction", "splits", "harmless_test.json"),
                                      limit=n_harmless, seed=seed).instructions,
        "jbb_benign": load_prompts(_data("jailbreakbench", "benign-behaviors.csv")).instructions,
        "xstest_safe": load_prompts(_data("xstest", "xstest_prompts.csv"), kind="safe").instructions,
    }


def _validation_sets() -> list[str]:
    """The val splits the refusal-direction pipeline selects its direction on: kept out of training as well."""
    return [t for kind in ("harmful", "harmless")
            for t in load_prompts(_data("refusal_direction", "splits", f"{kind}_val.json")).instructions]


# ------------------------------------------------------------------------------------------------ deduplication

def normalize(text: str) -> str:
    """Lower case, words only, single spaces: two instructions that differ in punctuation or case are one."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


class Excluder:
    """Membership test against a set of instructions: exact after `normalize`, or word-set Jaccard >= threshold.

    The word sets are rows of a 0/1 matrix over the excluded set's words, so one test sums a few rows (the
    instruction's words) to get every intersection at once.
    """

    def __init__(self, texts: Iterable[str], threshold: float = NEAR_DUPLICATE):
        import numpy as np

        self.threshold = threshold
        self.exact = {normalize(t) for t in texts}
        sets = [set(n.split()) for n in self.exact]
        self.vocab = {w: i for i, w in enumerate(sorted({w for ws in sets for w in ws}))}
        self.member = np.zeros((len(self.vocab), len(sets)), dtype=np.int32)  # [word, excluded text]
        for j, ws in enumerate(sets):
            self.member[[self.vocab[w] for w in ws], j] = 1
        self.sizes = self.member.sum(0)

    def __contains__(self, text: str) -> bool:
        norm = normalize(text)
        if norm in self.exact:
            return True
        ws = set(norm.split())
        rows = [self.vocab[w] for w in ws if w in self.vocab]
        if not rows or not self.sizes.size:
            return False
        inter = self.member[rows].sum(0)
        return bool((inter >= self.threshold * (len(ws) + self.sizes - inter)).any())


def dedupe(texts: Iterable[str], exclude: Excluder | None = None) -> list[str]:
    """`texts` in order, without repeats (after `normalize`) and without members of `exclude`."""
    out, seen = [], set()
    for t in texts:
        n = normalize(t)
        if n and n not in seen and (exclude is None or t not in exclude):
            seen.add(n)
            out.append(t)
    return out


def held_out_excluder() -> Excluder:
    return Excluder([t for texts in held_out_sets().values() for t in texts] + _validation_sets())


# ------------------------------------------------------------------------------------------ training instructions

def harmful_instructions(exclude: Excluder | None = None) -> list[str]:
    """Every harmful training instruction (see the module docstring), deduplicated, held-out sets removed."""
    exclude = held_out_excluder() if exclude is None else exclude
    sources = [
        load_prompts(_data("refusal_direction", "splits", "harmful_train.json")),
        load_prompts(_data("advbench", "harmful_behaviors.csv")),
        load_prompts(_data("harmbench", "harmbench_behaviors_text_all.csv")),
        load_prompts(_data("malicious_instruct", "MaliciousInstruct.txt")),
    ]
    return dedupe((t for s in sources for t in s.instructions), exclude)


def _harmless_pool(exclude: Excluder, texts: Sequence[str] | None = None) -> list[str]:
    """`texts` (default: the harmless train split) deduplicated, held-out sets removed, at most 400 characters
    (long pasted inputs would not fit the training length)."""
    if texts is None:
        texts = load_prompts(_data("refusal_direction", "splits", "harmless_train.json")).instructions
    return [t for t in dedupe(texts, exclude) if len(t) <= 400]


def _seeded_sample(pool: Sequence[str], n: int, seed: int, what: str) -> list[str]:
    if n > len(pool):
        raise ValueError(f"asked for {n} {what} instructions, only {len(pool)} available")
    return random.Random(seed).sample(pool, n)


def harmless_instructions(n: int, seed: int, exclude: Excluder | None = None) -> list[str]:
    """A seeded sample of `n` harmless (Alpaca-derived) training instructions, held-out sets removed."""
    return _seeded_sample(_harmless_pool(held_out_excluder() if exclude is None else exclude), n, seed, "harmless")


def lookalike_instructions(n: int, exclude: Excluder | None = None, harmful: Sequence[str] | None = None,
                           pool: Sequence[str] | None = None, min_count: int = 3,
                           min_log_odds: float = 1.5) -> list[str]:
    """The `n` harmless (Alpaca-derived) training instructions that most resemble harmful ones by their words.

    A word is harm-marked when it is in at least `min_count` harmful training instructions and its log-odds of
    appearing in a harmful rather than a harmless one exceed `min_log_odds` ("hack", "steal", "fraud", "virus",
    "tutorial", "social media", ...); a harmless instruction scores the sum of its harm-marked words' log-odds.
    The top ones ("Write a computer program that can detect fraud in credit card transactions") teach the line
    between a topic and a harmful request, which plain Alpaca samples rarely touch. Held-out sets are excluded.
    `harmful` / `pool` default to `harmful_instructions()` / the harmless train split.
    """
    import math
    from collections import Counter

    exclude = held_out_excluder() if exclude is None else exclude
    harmful = harmful_instructions(exclude) if harmful is None else harmful
    pool = _harmless_pool(exclude, pool)
    words = [set(normalize(t).split()) for t in pool]
    in_harmful = Counter(w for t in harmful for w in set(normalize(t).split()))
    in_harmless = Counter(w for ws in words for w in ws)
    log_odds = {w: math.log((c + 0.5) / len(harmful)) - math.log((in_harmless[w] + 0.5) / len(pool))
                for w, c in in_harmful.items() if c >= min_count}
    marked = {w: v for w, v in log_odds.items() if v > min_log_odds and in_harmless[w]}
    scores = [sum(marked.get(w, 0.0) for w in ws) for ws in words]
    order = sorted(range(len(pool)), key=lambda i: (-scores[i], pool[i]))  # ties by text: stable across runs
    return [pool[i] for i in order[:n] if scores[i] > 0]


# Safe requests in the form of harmful ones: a sensitive topic (the kind harmful requests are about) inside a
# request whose intent is protective, educational, historical or fictional. Harmful training requests share
# their verbs ("Write a tutorial on how to", "Create a social media post that", "Develop a plan to"): the pairs
# put the line between a topic and a harmful request in the data, which word-level lookalikes do not.
TWIN_FRAMES = (
    "Write a tutorial on how to protect yourself from {t}",
    "Write a blog post about the dangers of {t}",
    "Create a social media post that raises awareness about {t}",
    "Explain how investigators uncover {t}",
    "Write a short story about a detective who solves a case of {t}",
    "Describe the history of {t} and how society has responded to it",
    "Develop a lesson plan that teaches high school students about {t}",
    "Give step-by-step advice to someone who has been affected by {t}",
    "Write a persuasive essay arguing for stronger laws against {t}",
    "Design a public campaign to reduce {t}",
    "List the warning signs of {t}",
    "Explain why {t} harms communities",
    "Write a news article about a town that reduced {t}",
    "Create a guide for parents on talking with their children about {t}",
    "Outline a company policy that prevents {t}",
    "Write a speech about the causes of {t} and how to address them",
    "Suggest ways a school can support students affected by {t}",
    "Summarize what research says about preventing {t}",
    "Write a poem about the harm caused by {t}",
    "Develop an app idea that helps people report {t}",
    "Explain how banks and websites defend against {t}",
    "Write a letter to a local newspaper about {t} in our city",
    "Draft a speech for a community meeting on {t}",
    "Create a quiz that tests what people know about {t}",
)
TWIN_TOPICS = (
    "identity theft", "phishing scams", "credit card fraud", "money laundering", "tax evasion", "insider trading",
    "drunk driving", "drug addiction", "opioid overdoses", "cyberbullying", "online harassment", "hate speech",
    "ransomware attacks", "computer viruses", "election misinformation", "fake news", "human trafficking",
    "gun violence", "terrorism", "bomb threats", "poaching", "shoplifting", "stalking", "domestic violence",
    "child abuse", "self-harm", "eating disorders", "gambling addiction", "counterfeit money", "car theft",
    "burglary", "arson", "vandalism", "extremist propaganda", "data breaches", "password theft", "elder fraud",
    "cheating on exams", "plagiarism", "illegal dumping of toxic waste", "animal cruelty", "school shootings",
    "smuggling", "bribery", "racial discrimination", "hacking of personal accounts", "investment scams",
    "counterfeit medicines", "vaping among teenagers", "dangerous online challenges",
)


def twin_instructions(n: int, seed: int, exclude: Excluder | None = None) -> list[str]:
    """A seeded `n` of the safe requests `TWIN_FRAMES` x `TWIN_TOPICS` (1,200), held-out sets removed.

    Composed here, not taken from a dataset: no set outside the held-out ones holds safe twins of harmful
    requests. "Write a tutorial on how to protect yourself from identity theft" beside the harmful "Write a
    tutorial on how to commit identity theft".
    """
    exclude = held_out_excluder() if exclude is None else exclude
    return _seeded_sample(dedupe((f.format(t=t) for f in TWIN_FRAMES for t in TWIN_TOPICS), exclude), n, seed, "twin")


# --------------------------------------------------------------------------------------------------- refusals

# Openers each contain a phrase of the reference judge, so a learned refusal is one by the field's measure; the
# reasons and closers vary so that no single string carries the behaviour.
OPENERS = (
    "I'm sorry, but I can't help with that.", "I'm sorry, but I cannot help with this request.",
    "I can't help with that.", "I cannot assist with that request.", "I'm not able to help with this.",
    "I am unable to provide that.", "I apologize, but I can't do that.", "I'm unable to help with that request.",
    "Sorry, I can't assist with this.", "I am sorry, but I won't be able to help with that.",
    "I can't provide that information.", "I'm sorry, I can't do this.", "I cannot help with this.",
    "I am not able to assist with that.", "As an AI assistant, I can't help with this request.",
)
REASONS = (
    "It could cause serious harm to people.", "It would put others at risk.",
    "Helping with this could lead to real-world harm.", "This request involves something dangerous or illegal.",
    "It could be used to hurt someone.", "This would break the law and could hurt others.",
    "Providing this would be unsafe.", "I don't help with activities that could harm people.",
    "That kind of information can be misused to cause harm.", "It goes against my commitment to safety.",
    "This could seriously hurt you or others.", "Requests like this can enable harm, so I won't assist.",
)
CLOSERS = (
    "", "", "If you have another question, I'm happy to help.", "Is there something else I can help you with?",
    "If you're curious about the topic in a safe way, I can share general information.",
    "If you or someone else is in danger, please contact local emergency services.",
    "I'd be glad to help with a different request.", "Let me know if there's anything else you need.",
)


def refusal(rng: random.Random) -> str:
    """One refusal: opener, a short reason, and sometimes an offer of other help."""
    return " ".join(p for p in (rng.choice(OPENERS), rng.choice(REASONS), rng.choice(CLOSERS)) if p)


# ----------------------------------------------------------------------------------------- generated responses

def is_refusal(text: str) -> bool:
    low = text.lower()
    return any(p.lower() in low for p in REFERENCE_JUDGE_PHRASES)


def degenerate(text: str) -> str | None:
    """Why a generated response is not fit to train on, or None: empty, too short, repetitive, or a refusal
    (a harmless instruction answered with a refusal would teach over-refusal)."""
    words = text.split()
    if len(words) < 3:
        return "too short"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 4 and len(set(lines)) / len(lines) < 0.7:
        return "repeated lines"
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    if len(grams) >= 12 and len(set(grams)) / len(grams) < 0.6:
        return "repeated phrases"
    if is_refusal(text):
        return "refusal"
    return None


def trim_unfinished(text: str, finished: bool) -> str | None:
    """A response cut at max_new_tokens ends at its last full sentence or line (None if that leaves under half)."""
    text = text.strip()
    if finished:
        return text
    cut = max(text.rfind(c) for c in (".", "!", "?", "\n"))
    return text[:cut + 1].strip() if cut >= len(text) // 2 else None


@dataclass
class Example:
    instruction: str
    response: str
    kind: str  # "harmless" | "harmful"

    def as_json(self) -> dict[str, str]:
        return {"instruction": self.instruction, "response": self.response, "kind": self.kind}


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a last line cut short by an interrupted write is dropped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    lines = p.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{p}: line {i + 1} is not JSON") from None
    return out


def _append_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def generate_responses(source: str, instructions: Sequence[str], out: str | os.PathLike, *, batch_size: int = 16,
                       max_new_tokens: int = 80, threads: int | None = None, progress: bool = True) -> list[dict]:
    """Greedy responses of the instruct model `source` to `instructions`, appended to the JSON-lines file `out`.

    Resumable: instructions already in `out` are skipped, so a stopped generation picks up where it ended. Each
    record: instruction, raw response, whether it ended at end-of-turn. Batched, left-padded, KV-cached (HF
    `generate`: this is data preparation, not an analysis, so no hooks are needed).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probes.pairs import resolve_source

    out = Path(out)
    done = {r["instruction"] for r in read_jsonl(out)}
    todo = [t for t in dict.fromkeys(instructions) if t not in done]
    if not todo:
        return read_jsonl(out)
    if threads:
        torch.set_num_threads(threads)
    folder = resolve_source(source)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stop = [i for i in {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")} if isinstance(i, int) and i >= 0]
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="responses", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                         add_generation_prompt=True) for t in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
        new = gen[:, enc.input_ids.shape[1]:]
        records = []
        for t, row in zip(chunk, new):
            ids = row.tolist()
            finished = any(i in stop for i in ids)
            if finished:
                ids = ids[:min(ids.index(s) for s in stop if s in ids)]
            records.append({"instruction": t, "response": tok.decode(ids, skip_special_tokens=True),
                            "finished": finished})
        _append_jsonl(out, records)
        bar.update(len(chunk))
    bar.close()
    return read_jsonl(out)


def harmless_examples(records: Iterable[dict[str, Any]]) -> tuple[list[Example], dict[str, int]]:
    """Training examples from generated records, and how many were dropped for each reason."""
    kept, dropped = [], {}
    for r in records:
        text = trim_unfinished(r["response"], r["finished"])
        why = "unfinished" if text is None else degenerate(text)
        if why:
            dropped[why] = dropped.get(why, 0) + 1
        else:
            kept.append(Example(r["instruction"], text, "harmless"))
    return kept, dropped


def harmful_examples(instructions: Sequence[str], seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(t, refusal(rng), "harmful") for t in instructions]
