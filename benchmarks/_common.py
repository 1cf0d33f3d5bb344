"""Helpers shared by the benchmarks: random models of real sizes, timing, and the docs/benchmarks.md table."""
from __future__ import annotations

import os
import platform
import re
import statistics
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import torch  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

# SmolLM2-135M's shape (config in ../shared/data/tokenizers/SmolLM2-135M), random weights.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def random_llama(folder: Path, seed: int = 0, **overrides) -> Path:
    """Save a random LlamaForCausalLM of SmolLM2-135M's shape (or `overrides`) with the tiny tokenizer."""
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import tiny

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_135M, **overrides})).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny.make_tokenizer().save_pretrained(folder)
    return folder


def median_time(fn, reps: int = 5, warmup: int = 1) -> tuple[float, float]:
    """(median wall seconds, median CPU seconds) of `fn`. With one thread CPU time is the work done, which
    another busy process on the machine inflates far less than wall time."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"{torch.get_num_threads()} thread(s)"


def write_section(title: str, body: str) -> None:
    """Create or replace the `## title` section of docs/benchmarks.md, leaving the others alone."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n\nWritten by the scripts in `benchmarks/`.\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOCS.write_text(text)
