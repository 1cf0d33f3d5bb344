"""The arguments every experiment shares, checked before any model loads, and the run folder they open.

Order inside an experiment: parse → read and check every input (prompt files, model sources, device, out folder,
lock) → open the run → load the pair and record its provenance → compute. A bad input therefore fails in a second
with a plain message, and never touches an earlier run.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from probes import provenance
from probes.runs import Run, RunFolderError


def add_common_args(parser: argparse.ArgumentParser, default_pair: str = "toy") -> argparse.ArgumentParser:
    """pair or base/instruct, out, overwrite/resume, device, dtype, seed, batch size, offload, trust_remote_code."""
    parser.add_argument("--pair", default=default_pair, help="registry key (see `probes pairs`)")
    parser.add_argument("--base", default=None, help="base model hub id or folder (with --instruct, instead of --pair)")
    parser.add_argument("--instruct", default=None, help="instruct model hub id or folder")
    parser.add_argument("--out", default=None, help="run folder (default figures/<experiment>/<pair>)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace an existing run folder whole (once the new run is complete)")
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run, reusing its finished chunks")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=_positive, default=16)
    parser.add_argument("--offload", action="store_true", help="keep one model on the device at a time")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def is_toy(args: Any) -> bool:
    """Whether the arguments name the shipped toy pair."""
    return args.pair == "toy" and not (args.base or args.instruct)


def registry_key(args: Any) -> str | None:
    return None if (args.base or args.instruct) else str(args.pair).lower()


def pair_name(args: Any) -> str:
    """The name `load_pair` will give the pair: its registry key, or `<base folder>__<instruct folder>`."""
    if args.base or args.instruct:
        return f"{Path(args.base).name}__{Path(args.instruct).name}"
    return str(args.pair).lower()


def check_sources(args: Any) -> dict[str, str]:
    """{"base", "instruct"}: the sources named by the arguments, each checked as far as possible without loading.

    A registry key must exist; folders must hold a config.json; a hub id must be cached when offline; a CUDA
    device must exist. Raises SystemExit with one plain line.
    """
    from probes import registry
    from probes.pairs import ModelNotAvailableError, resolve_source

    if args.base or args.instruct:
        if not (args.base and args.instruct):
            raise SystemExit("--base and --instruct go together")
        sources = {"base": str(args.base), "instruct": str(args.instruct)}
    else:
        try:
            spec = registry.get(str(args.pair))
        except KeyError as exc:
            raise SystemExit(exc.args[0]) from None
        sources = {"base": spec.base, "instruct": spec.instruct}
    for which, src in sources.items():
        try:
            resolve_source(src)
        except (FileNotFoundError, ModelNotAvailableError) as exc:
            raise SystemExit(f"{which} model: {exc}") from None
    device = args.device or ""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device is available on this machine")
    return sources


def config_from_args(args: Any) -> dict[str, Any]:
    """The arguments as run, with `pair` the registry key only when one was used (None for --base/--instruct)."""
    config = dict(vars(args))
    config["pair"] = registry_key(args)
    return config


def open_run(experiment: str, args: Any, *, prompt_files: dict[str, Any] | None = None,
             prompts: dict[str, list[str]] | None = None, inputs: dict[str, Any] | None = None) -> Run:
    """Check the model sources and open the run folder (refusing an existing run unless --overwrite / --resume).

    prompt_files: {label: (path, n_used)} of the prompt files read, hashed into config.json; inputs: other input
    facts to record; prompts: {group: instructions} as used, each recorded with its count and sha256 (so runs on
    the built-in sets, which have no file of their own, are pinned too).
    """
    sources = check_sources(args)
    mode = "overwrite" if getattr(args, "overwrite", False) else "resume" if getattr(args, "resume", False) else "new"
    files = {label: provenance.prompt_file(path, n) for label, (path, n) in (prompt_files or {}).items()}
    used = {g: {"n": len(v), "sha256": provenance.sha256_bytes("\n".join(v))} for g, v in (prompts or {}).items()}
    config = config_from_args(args) | {"sources": sources,
                                       "inputs": {"prompt_files": files, "prompts": used, **(inputs or {})}}
    try:
        return Run(experiment, pair_name(args), config, out=args.out, mode=mode)
    except RunFolderError as exc:
        raise SystemExit(str(exc)) from None


def load_pair_for(run: Run, args: Any) -> Any:
    """Load the pair the arguments name (seed set) and record both models' provenance in the run's config."""
    from probes.pairs import load_pair

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    common = dict(device=args.device, dtype=dtype, offload=args.offload, trust_remote_code=args.trust_remote_code)
    if args.base or args.instruct:
        pair = load_pair(args.base, args.instruct, **common)
    else:
        pair = load_pair(args.pair, **common)
    run.update_config(models=provenance.pair_sources(pair, registry_key(args)), dtype=args.dtype,
                      device=str(pair.device))
    return pair
