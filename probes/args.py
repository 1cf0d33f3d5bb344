"""The arguments every experiment shares, checked before any model loads, and the run folder they open.

Order inside an experiment: parse → read and check every input (prompt files, model sources, device, out folder,
lock) → open the run → load the pair and record its provenance → compute. A bad input therefore fails in a second
with a plain message, and never touches an earlier run.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from probes import provenance
from probes.runs import Run, RunFolderError


class Parser(argparse.ArgumentParser):
    """An experiment's parser: a usage error is one line naming the command, with where to find its options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class _BothRoles(argparse.Action):
    """--model X: the same source as --base and --instruct (load_pair loads it once)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        namespace.model = namespace.base = namespace.instruct = values


def add_common_args(parser: argparse.ArgumentParser, default_pair: str = "toy") -> argparse.ArgumentParser:
    """Every experiment's flags: the pair, the run folder, the prompts (`add_prompt_args`), layers, positions,
    system prompt / raw mode, device, dtype, seed, batch size, offload, trust_remote_code, debug."""
    parser.add_argument("--pair", default=default_pair, help="registry key (see `probes pairs`)")
    parser.add_argument("--base", default=None, help="base model hub id or folder (with --instruct, instead of --pair)")
    parser.add_argument("--instruct", default=None, help="instruct model hub id or folder")
    parser.add_argument("--model", default=None, action=_BothRoles,
                        help="one model (hub id, folder, GGUF) in both roles, loaded once: single-model analyses of "
                             "an instruct-only release; every base/instruct difference is then zero")
    parser.add_argument("--out", default=None, help="run folder (default figures/<experiment>/<pair>)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="replace an existing run folder whole (once the new run is complete)")
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted run, reusing its finished chunks")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive, default=16)
    parser.add_argument("--offload", action="store_true", help="keep one model on the device at a time")
    parser.add_argument("--trust-remote-code", action="store_true")
    add_prompt_args(parser)
    parser.add_argument("--layers", type=layer_spec, default=None,
                        help="layers to analyse: 0,4,8 or 0:12 (end excluded) or -1 (negative counts from the last); "
                             "default all")
    parser.add_argument("--positions", default=None,
                        help="token positions (ChatBatch.positions specs, comma-separated): post_instruction[-1], "
                             "post_instruction, user[0:3], last; default the experiment's own")
    parser.add_argument("--system", default=None, help="a system prompt for every prompt (chat template)")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="the chat template to use (.jinja, or a tokenizer_config.json): for a model whose files "
                             "carry none, such as a base model paired with itself")
    parser.add_argument("--raw", action="store_true",
                        help="no chat template: the prompts as plain text, as a base model sees them")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def add_prompt_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--harmful/--harmless (the refusal pair of sets), --prompts (any groups), --column/--key, --limit."""
    g = parser.add_argument_group("prompts")
    g.add_argument("--harmful", default=None, help="harmful prompt file (.csv, .json, .jsonl, .txt)")
    g.add_argument("--harmless", default=None, help="harmless prompt file")
    g.add_argument("--prompts", nargs="+", default=None, metavar="FILE",
                   help="prompt files, one group each (named by file stem; by folder/stem where stems repeat)")
    g.add_argument("--column", default=None, help="the text column of CSV prompt files (default: detected)")
    g.add_argument("--key", default=None, help="the text field of JSON / JSONL prompt files (default: detected)")
    g.add_argument("--limit", type=positive, default=None, help="at most this many prompts per set / group")
    return parser


def layer_spec(text: str) -> list[int] | slice:
    """`--layers` text: "0,4,8" -> [0, 4, 8]; "0:12" -> slice(0, 12); "-1" -> [-1]. Resolved per model by
    `probes.activations.resolve_layers`."""
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (2, 3):
                raise ValueError
            return slice(*(int(x) if x.strip() else None for x in parts))
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read layers {text!r}: use 0,4,8 or 0:12 or -1") from None
    if not out:
        raise argparse.ArgumentTypeError("no layers given")
    return out


def position_specs(text: str | None) -> list[str | int] | None:
    """`--positions` text as `ChatBatch.positions` specs: "post_instruction[-1],user[0:3]" -> two specs; a bare
    integer counts from the end of the sequence."""
    if text is None:
        return None
    specs: list[str | int] = []
    for part in (p.strip() for p in re.split(r",(?![^\[]*\])", text)):
        if not part:
            raise SystemExit(f"--positions {text!r}: empty position")
        specs.append(int(part) if re.fullmatch(r"-\d+", part) else part)
    return specs


def nonnegative(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive(text: str) -> int:
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

    if getattr(args, "model", None) and not (args.base == args.instruct == args.model):
        raise SystemExit("--model names one model for both roles: not with --base or --instruct")
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
    common = dict(device=args.device, dtype=dtype, offload=args.offload, trust_remote_code=args.trust_remote_code,
                  chat_template=args.chat_template)
    if args.base or args.instruct:
        pair = load_pair(args.base, args.instruct, **common)
    else:
        pair = load_pair(args.pair, **common)
    run.update_config(models=provenance.pair_sources(pair, registry_key(args)), dtype=args.dtype,
                      device=str(pair.device))
    return pair


def _read_file(args: Any, path: str) -> Any:
    """One prompt file with --column (CSV) or --key (JSON / JSONL) applied and --limit taken from its head."""
    from probes.prompts import PromptFileError, load_prompts

    suffix = Path(path).suffix.lower()
    column = args.column if suffix == ".csv" else args.key if suffix in (".json", ".jsonl") else None
    try:
        return load_prompts(path, column=column, limit=args.limit)
    except PromptFileError as exc:
        raise SystemExit(str(exc)) from None


def group_names(paths: list[str]) -> list[str]:
    """A group name per file: its stem, or as many trailing folders as make repeated stems distinct
    (`a/harmful.csv`, `b/harmful.csv` -> `a/harmful`, `b/harmful`)."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    if len({Path(p).resolve() for p in paths}) < len(paths):
        raise SystemExit(f"the same prompt file is given twice: {paths}")
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(Path(p)) for p in paths]  # the same relative path under different roots


def _check_file_fields(args: Any, files: list[str]) -> None:
    suffixes = {Path(f).suffix.lower() for f in files}
    if args.column is not None and ".csv" not in suffixes:
        raise SystemExit("--column names a CSV column, but no prompt file is a CSV (use --key for JSON fields)")
    if args.key is not None and not suffixes & {".json", ".jsonl"}:
        raise SystemExit("--key names a JSON field, but no prompt file is .json or .jsonl (use --column for CSV)")


def refusal_sets(args: Any, experiment: str) -> dict[str, Any]:
    """{"harmful": PromptSet, "harmless": PromptSet} from --harmful/--harmless, or None for each set not given
    (the experiment's default). --prompts does not apply: these experiments contrast exactly the two sets."""
    if args.prompts:
        raise SystemExit(f"{experiment} contrasts harmful with harmless prompts: give --harmful and --harmless "
                         "(--prompts is for experiments over any groups)")
    if (args.harmful is None) != (args.harmless is None):
        raise SystemExit("--harmful and --harmless go together")
    files = [f for f in (args.harmful, args.harmless) if f]
    _check_file_fields(args, files)
    return {kind: _read_file(args, getattr(args, kind)) if getattr(args, kind) else None
            for kind in ("harmful", "harmless")}


def prompt_groups(args: Any) -> tuple[dict[str, list[str]], dict[str, tuple[str, int]]]:
    """({group: instructions}, {group: (file, n used)}) from --harmful/--harmless and --prompts, or the default
    sets (the toy pair's test split; the built-in demo sets for other pairs) when no file is given."""
    if (args.harmful is None) != (args.harmless is None):
        raise SystemExit("--harmful and --harmless go together")
    named = [(k, getattr(args, k)) for k in ("harmful", "harmless") if getattr(args, k)]
    extra = list(args.prompts or ())
    files = [f for _, f in named] + extra
    _check_file_fields(args, files)
    groups: dict[str, list[str]] = {}
    sources: dict[str, tuple[str, int]] = {}
    names = [k for k, _ in named] + group_names(extra) if extra else [k for k, _ in named]
    if len(set(names)) < len(names):
        names = [k for k, _ in named] + [f"prompts:{n}" for n in group_names(extra)]
    for name, path in zip(names, files):
        ps = _read_file(args, path)
        groups[name], sources[name] = ps.instructions, (path, len(ps))
    if not files:
        from probes.prompts import default_sets

        groups = {k: (v[: args.limit] if args.limit else v) for k, v in default_sets(is_toy(args)).items()}
    empty = [k for k, v in groups.items() if not v]
    if empty:
        raise SystemExit(f"no prompts in {empty}")
    return groups, sources


def check_positions(args: Any) -> None:
    """--positions checked for syntax before any model loads (rows are checked once the prompts are encoded)."""
    from probes.chat import check_position_spec

    for spec in position_specs(args.positions) or ():
        try:
            check_position_spec(spec)
        except ValueError as exc:
            raise SystemExit(f"--positions: {exc}") from None


def check_layers(args: Any, n_layers: int) -> list[int] | None:
    """--layers resolved against the model's depth, or None (all layers)."""
    from probes.activations import resolve_layers

    if args.layers is None:
        return None
    try:
        return resolve_layers(args.layers, n_layers)
    except ValueError as exc:
        raise SystemExit(f"--layers: {exc}") from None


def encode_kwargs(args: Any) -> dict[str, Any]:
    """`pair.encode` arguments from --system / --raw."""
    if args.raw and args.system is not None:
        raise SystemExit("--system needs the chat template; --raw has none")
    return {"system": args.system, "template": not args.raw}


def unknown_fraction(tokenizer: Any, texts: list[str]) -> float | None:
    """Fraction of the prompts' tokens that are the unknown token (None when the tokenizer has none)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return None
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    n = sum(len(x) for x in ids)
    return sum(t == unk for x in ids for t in x) / n if n else None


UNKNOWN_WARN = 0.10


def warn_unknown(tokenizer: Any, groups: dict[str, list[str]]) -> dict[str, float | None]:
    """{group: unknown-token fraction}; a warning for each group over 10% (a vocabulary that does not cover the
    prompts: the model sees mostly `<unk>`, and every number on it says little)."""
    import warnings

    out = {g: unknown_fraction(tokenizer, v) for g, v in groups.items()}
    for g, f in out.items():
        if f is not None and f > UNKNOWN_WARN:
            warnings.warn(f"prompt set {g!r}: {f:.0%} of its tokens are the unknown token "
                          f"{tokenizer.unk_token!r}: this vocabulary does not cover these prompts", stacklevel=2)
    return out


def reject(args: Any, experiment: str, why: str, *flags: str) -> None:
    """SystemExit when any of `flags` (dest names) is set: the experiment cannot honour it."""
    given = [f for f in flags if getattr(args, f, None) not in (None, False)]
    if given:
        raise SystemExit(f"{experiment}: {', '.join('--' + f.replace('_', '-') for f in given)} does not apply: {why}")


def check_inputs(args: Any) -> dict[str, str]:
    """Everything about the arguments that can be checked before weights load: the model sources, --positions,
    --system / --raw, and --layers against the instruct model's config. Returns the sources."""
    from probes.pairs import config_fields, load_config, resolve_source

    sources = check_sources(args)
    if args.chat_template is not None:
        from probes.chat import read_chat_template

        try:
            read_chat_template(args.chat_template)
        except ValueError as exc:
            raise SystemExit(f"--chat-template: {exc}") from None
    check_positions(args)
    encode_kwargs(args)
    if args.layers is not None:
        cfg = load_config(resolve_source(sources["instruct"]), trust_remote_code=args.trust_remote_code)
        check_layers(args, int(config_fields(cfg)["n_layers"]))
    return sources
