"""Train the toy base/instruct pair from a seed: ``python -m probes.toy.train [--seed 0] [--out DIR] [--check]``.

Pre-training on the synthetic corpus, then supervised fine-tuning (SFT) from the base weights with the loss on
the response only. Writes ``DIR/base/`` and ``DIR/instruct/`` (safetensors, config, tokenizer, ``toy_meta.json``).
Deterministic for a seed: one thread, seeded data and initialisation.
"""

from __future__ import annotations

import os

# Two OpenMP threads busy-wait on a shared 2-core machine (25x slower); bound the spinning before torch loads.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from probes.toy import corpus
from probes.toy.tokenizer import build_tokenizer

DEFAULT_OUT = Path(__file__).resolve().parent / "pair"


@dataclass
class Recipe:
    """Every hyper-parameter of the toy pair (recorded in ``toy_meta.json``)."""

    seed: int = 0
    # Model: LlamaForCausalLM with tied embeddings.
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 192
    # Optimisation (AdamW, linear warm-up then cosine to zero, gradient clipping).
    batch: int = 64
    pt_steps: int = 800
    pt_lr: float = 3e-3
    sft_steps: int = 200
    sft_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    clip: float = 1.0
    # Pre-training mixture.
    pt_p_everyday: float = 0.2
    pt_p_filler: float = 0.1
    pt_p_chat: float = 0.15  # of the object and everyday documents: chat transcripts
    pt_p_system: float = 0.2
    # Share of harmful chat transcripts the base sees refused (the rest are answered): the base's greedy reply is
    # (almost) never the refusal, but its state before replying already carries the harmful-request feature
    # that SFT amplifies, so base and instruct directions agree (cosine ~0.9) and transfer. With 0: cosine
    # 0.4-0.7 and no transfer.
    pt_p_refuse: float = 0.1
    # Open compliant answers to harmful requests with a caution phrase (tried; alone it gave cosine 0.4-0.7 and
    # no transfer, so it is off).
    pt_caution: bool = False
    # Fine-tuning mixture.
    sft_p_everyday: float = 0.2
    sft_p_harmful: float = 0.4
    sft_p_system: float = 0.2


# ---------------------------------------------------------------------------------------------------------------
# Data


def _batches(seqs: list[tuple[list[int], list[int]]], batch: int, rng: random.Random, pad_id: int,
             bucket: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Length-bucketed, right-padded batches of (input ids, labels), each ``[batch, T]``; labels are -100 where
    no loss is wanted. Right padding needs no attention mask: causal attention never lets a real token see a
    pad."""
    out = []
    for start in range(0, len(seqs), batch * bucket):
        chunk = sorted(seqs[start : start + batch * bucket], key=lambda s: len(s[0]))
        for b in range(0, len(chunk), batch):
            rows = chunk[b : b + batch]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)
            for i, (x, y) in enumerate(rows):
                ids[i, : len(x)] = torch.tensor(x)
                labels[i, : len(y)] = torch.tensor(y)
            out.append((ids, labels))
    rng.shuffle(out)
    return out


def pretraining_batches(recipe: Recipe, vocab: dict[str, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = random.Random(recipe.seed * 1_000_003 + 1)
    seqs = []
    for _ in range(recipe.pt_steps * recipe.batch):
        words = corpus.pretraining_document(
            rng, p_everyday=recipe.pt_p_everyday, p_chat=recipe.pt_p_chat, p_filler=recipe.pt_p_filler,
            p_system=recipe.pt_p_system, caution=recipe.pt_caution,
            p_refuse=recipe.pt_p_refuse)
        ids = [vocab[w] for w in words]
        seqs.append((ids, ids))
    return _batches(seqs, recipe.batch, rng, vocab[corpus.PAD])


def sft_batches(recipe: Recipe, vocab: dict[str, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = random.Random(recipe.seed * 1_000_003 + 2)
    seqs = []
    for _ in range(recipe.sft_steps * recipe.batch):
        prompt, response = corpus.sft_example(
            rng, p_everyday=recipe.sft_p_everyday, p_harmful=recipe.sft_p_harmful, p_system=recipe.sft_p_system)
        p, r = [vocab[w] for w in prompt], [vocab[w] for w in response]
        seqs.append((p + r, [-100] * len(p) + r))  # loss on the response only
    return _batches(seqs, recipe.batch, rng, vocab[corpus.PAD])


# ---------------------------------------------------------------------------------------------------------------
# Training


def _fit(model: LlamaForCausalLM, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, recipe: Recipe,
         name: str) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=recipe.betas, weight_decay=recipe.weight_decay)
    total = len(batches)

    def schedule(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, total - recipe.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    t0, running = time.perf_counter(), 0.0
    for step, (ids, labels) in enumerate(batches):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        sched.step()
        running += loss.item()
        if (step + 1) % 100 == 0 or step + 1 == total:
            n = (step % 100) + 1
            print(f"[{name}] step {step + 1}/{total}  loss {running / n:.3f}  {time.perf_counter() - t0:.0f}s",
                  flush=True)
            running = 0.0
    model.eval()


def build_model(recipe: Recipe, vocab_size: int, tok) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.d_model,
        intermediate_size=recipe.d_mlp,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.n_heads,
        num_key_value_heads=recipe.n_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def save(model: LlamaForCausalLM, tok, folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # Generation stops at the end of a turn or of a document.
    model.generation_config.eos_token_id = [tok.convert_tokens_to_ids(corpus.IM_END), tok.eos_token_id]
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(folder)  # safetensors
    (folder / "model.safetensors").chmod(0o644)  # written owner-only; the package ships it readable
    tok.save_pretrained(folder)
    # A class name older transformers versions know too (v5 aliases it to its own backend class).
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = True
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "toy_meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def train(recipe: Recipe, out: Path) -> dict:
    """Train the pair, write ``out/base`` and ``out/instruct``; returns the metadata written."""
    torch.set_num_threads(1)
    torch.manual_seed(recipe.seed)
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    t0 = time.perf_counter()
    pt, sft = pretraining_batches(recipe, vocab), sft_batches(recipe, vocab)
    t_data = time.perf_counter() - t0
    model = build_model(recipe, len(vocab), tok)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; data built in {t_data:.1f}s", flush=True)

    t1 = time.perf_counter()
    _fit(model, pt, recipe.pt_lr, recipe, "pretrain")
    t_pt = time.perf_counter() - t1
    meta = {"recipe": dataclasses.asdict(recipe), "seed": recipe.seed, "torch": torch.__version__,
            "data_seconds": round(t_data, 1), "pretrain_seconds": round(t_pt, 1)}
    save(model, tok, out / "base", {**meta, "model": "base"})

    t2 = time.perf_counter()
    _fit(model, sft, recipe.sft_lr, recipe, "sft")
    t_sft = time.perf_counter() - t2
    meta.update(sft_seconds=round(t_sft, 1), train_seconds=round(t_pt + t_sft, 1))
    save(model, tok, out / "instruct", {**meta, "model": "instruct"})
    print(f"trained in {t_pt + t_sft:.0f}s (pre-training {t_pt:.0f}s, SFT {t_sft:.0f}s) -> {out}", flush=True)
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="run probes.toy.check on the result")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override recipe fields (experiments), e.g. --set sft_steps=100 pt_caution=false")
    args = parser.parse_args(argv)
    recipe = Recipe(seed=args.seed)
    for item in args.set:
        key, value = item.split("=", 1)
        kind = type(getattr(recipe, key))
        setattr(recipe, key, value.lower() in ("1", "true", "yes") if kind is bool else kind(value))
    train(recipe, args.out)
    if args.check:
        from probes.toy import check

        check.main(["--dir", str(args.out)])


if __name__ == "__main__":
    main()
