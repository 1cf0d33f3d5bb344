"""probes: measure how an instruct model differs from its base model, layer by layer.

Errors are one line; --debug (anywhere on the line) or PROBES_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

# OpenMP threads otherwise spin-wait between the small kernels of CPU forward passes.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from probes.args import Parser  # noqa: E402
from probes.experiments import EXPERIMENTS  # noqa: E402


def _listing() -> str:
    width = max(map(len, EXPERIMENTS))
    lines = [f"  {name.ljust(width)}  {summary}" for name, summary in EXPERIMENTS.items()]
    return ("experiments (probes run NAME --help for each one's options; 'all' runs every one):\n"
            + "\n".join(lines))


def cmd_pairs() -> int:
    from probes.registry import table

    rows = table()
    keys = ("key", "family", "base", "instruct", "params", "notes")
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in keys}
    print("  ".join(k.ljust(w) for k, w in widths.items()).rstrip())
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in widths.items()).rstrip())
    return 0


def _parse_all(rest: list[str]) -> dict[str, argparse.Namespace]:
    """Every experiment's arguments for `run all`: the shared flags go to all, an experiment's own flags (say the
    refusal direction's `--n-val`) to the experiments that have them; a flag none of them knows is an error."""
    from probes import experiments

    parsed, unknown = {}, []
    for n in EXPERIMENTS:
        parsed[n], extra = experiments.load(n).parser(prog=f"probes run {n}").parse_known_args(rest)
        unknown.append(extra)
    nobody = [t for t in unknown[0] if all(t in u for u in unknown[1:])]
    if nobody:
        Parser(prog="probes run all").error(f"no experiment takes {' '.join(nobody)}")
    return parsed


def cmd_run(name: str, rest: list[str]) -> int:
    """Run one experiment, or all: every experiment's arguments and inputs are checked before the first runs."""
    from probes import experiments

    names = list(EXPERIMENTS) if name == "all" else [name]
    prepared = []
    parsed = _parse_all(rest) if name == "all" else None
    for n in names:
        module = experiments.load(n)
        args = parsed[n] if parsed else module.parser(prog=f"probes run {n}").parse_args(rest)
        if name == "all" and args.out is not None:
            args.out = str(Path(args.out) / n)  # every experiment its own folder, never one shared
        prepared.append((n, module, args, module.prepare(args)))
    for n, module, args, inputs in prepared:
        if len(names) > 1:
            print(f"== {n}", flush=True)
        run = module.run(args, inputs)
        print(module.report(run), flush=True)
    return 0


def cmd_train_toy(rest: list[str]) -> int:
    from probes.toy import train

    sys.argv = ["probes train-toy", *rest]
    train.main()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="probes", description=__doc__, epilog=_listing())
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("pairs", help="list the registered base/instruct pairs")
    run = sub.add_parser("run", help="run an experiment, or all of them", add_help=False,
                         description=_listing(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("experiment", nargs="?", metavar="NAME")
    sub.add_parser("train-toy", help="retrain the toy pair (probes train-toy --help)", add_help=False)
    sub.add_parser("organism", help="build, train and evaluate the organism (probes organism --help)",
                   add_help=False)
    gallery = sub.add_parser("gallery", help="screenshot every figure of run folders (headless Chromium) as PNG")
    gallery.add_argument("runs", nargs="+", help="run folders (or folders of run folders)")
    gallery.add_argument("--out", required=True, help="folder for the PNG files")
    return parser


def _dispatch(argv: list[str]) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "pairs":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return cmd_pairs()
    if args.command == "train-toy":
        return cmd_train_toy(rest)
    if args.command == "organism":
        from probes import organism

        return organism.main(rest)
    if args.command == "gallery":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from probes.browser import gallery

        for png in gallery(args.runs, args.out):
            print(png)
        return 0
    name = args.experiment
    if name is None or name in ("-h", "--help"):
        asked = name is not None or bool({"-h", "--help"} & set(rest))
        print(f"usage: probes run NAME [options]\n\n{_listing()}", file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    if name != "all" and name not in EXPERIMENTS:
        parser.exit(2, f"probes run: unknown experiment {name!r}\n\n{_listing()}\n")
    return cmd_run(name, rest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PROBES_DEBUG") == "1"
    try:
        return _dispatch(argv)
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):  # argparse's own exits (help, usage errors)
            raise
        if debug:
            traceback.print_exc()
        print(f"probes: error: {exc.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("probes: interrupted (an unfinished run resumes with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- one line for the user; --debug for the traceback
        if debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"probes: error: {type(exc).__name__}: {msg} (--debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
