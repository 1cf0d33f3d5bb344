"""Wall time of the refusal-direction sweep (candidates + bypass / induce / KL per candidate + selection).

    python benchmarks/refusal_sweep.py [--threads 1] [--no-write]

Pairs: the toy pair (its train / val splits, if its weights are there) and a SmolLM2-135M-sized random Llama (30
layers, d_model 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152) built from a config in a temp folder, with the
SmolLM2 tokenizer from the shared folder when present (else the tests' tiny tokenizer), 16+16 train and 8+8 val
short prompts. Prints a table and writes it under `## Refusal sweep` in docs/benchmarks.md (that section only).
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


def timed(model, tok, harm_tr, less_tr, harm_va, less_va, batch_size: int) -> dict:
    from probes.chat import encode

    ids = refusal.refusal_tokens(tok)
    enc = {k: encode(tok, v) for k, v in dict(ht=harm_tr, lt=less_tr, hv=harm_va, lv=less_va).items()}
    t0 = time.perf_counter()
    cands = refusal.candidates(model, enc["ht"], enc["lt"], batch_size=batch_size, progress=False)
    t1 = time.perf_counter()
    scores = refusal.sweep(model, cands, enc["hv"], enc["lv"], ids, batch_size=batch_size, progress=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sel = refusal.select(scores, int(model.cfg.n_layers), fallback=True)
            chosen = f"{sel.layer}/{sel.offset}{' (fallback)' if sel.fallback else ''}"
        except refusal.NoDirectionFound:  # a random model: nothing within the KL bound, which the timing ignores
            chosen = "none within KL"
    t2 = time.perf_counter()
    return dict(layers=len(cands.layers), positions=len(cands.offsets), candidates=len(cands.layers) * len(cands.offsets),
                train=f"{len(harm_tr)}+{len(less_tr)}", val=f"{len(harm_va)}+{len(less_va)}",
                seq=max(b.seq_len for b in enc.values()), t_cand=t1 - t0, t_sweep=t2 - t1, total=t2 - t0,
                chosen=chosen)


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

    head = ("| pair | layers x positions | train | val | max seq | candidates (s) | sweep + select (s) | total (s) | "
            "chosen layer/pos |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {name} | {r['layers']} x {r['positions']} = {r['candidates']} | {r['train']} | {r['val']} | "
                   f"{r['seq']} | {r['t_cand']:.2f} | {r['t_sweep']:.1f} | {r['total']:.1f} | {r['chosen']} |\n"
                   for name, r in rows)
    env = (f"\nCPU, {args.threads} thread(s), batch size {args.batch_size}, torch {torch.__version__}, "
           f"{platform.processor() or platform.machine()}; `python benchmarks/refusal_sweep.py`. The sweep runs three "
           "forward passes on the val sets per candidate (bypass, KL, induce); a random model's chosen candidate is "
           "a fallback (nothing passes the filters) and means nothing.\n")
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
