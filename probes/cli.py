"""`probes` command line: list pairs, run the experiments (thin wrappers over experiments/*.py)."""
from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

EXPERIMENTS = ("refusal_direction", "logit_lens", "activation_diff", "template_attention")


def _experiments_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "experiments"


def cmd_pairs(_: argparse.Namespace) -> int:
    from probes.registry import table

    rows = table()
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in ("key", "family", "base", "instruct", "params")}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for r in rows:
        print("  ".join(r[k].ljust(w) for k, w in widths.items()))
    return 0


def _with_out(rest: list[str], out: str) -> list[str]:
    """`rest` with its `--out` value replaced by `out`."""
    args, i = [], 0
    while i < len(rest):
        if rest[i] == "--out":
            i += 2
            continue
        if not rest[i].startswith("--out="):
            args.append(rest[i])
        i += 1
    return [*args, "--out", out]


def _out_value(rest: list[str]) -> str | None:
    for i, a in enumerate(rest):
        if a == "--out" and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


def cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    names = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    out = _out_value(rest)
    for name in names:
        script = _experiments_dir() / f"{name}.py"
        if not script.exists():
            raise SystemExit(f"experiment script {script} not found (run from a source checkout)")
        print(f"== {name}", flush=True)
        saved = sys.argv
        # `all` with one --out: every experiment gets its own subfolder, never one shared folder.
        argv = _with_out(rest, str(Path(out) / name)) if out is not None and len(names) > 1 else rest
        sys.argv = [str(script), *argv]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = saved
    return 0


def cmd_train_toy(rest: list[str]) -> int:
    from probes.toy import train

    sys.argv = ["probes.toy.train", *rest]
    train.main()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pairs", help="list the registered base/instruct pairs")
    run = sub.add_parser("run", help="run an experiment (or 'all'); other arguments go to the script")
    run.add_argument("experiment", choices=(*EXPERIMENTS, "all"))
    sub.add_parser("train-toy", help="retrain the toy pair (arguments go to probes.toy.train)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "pairs":
        return cmd_pairs(args)
    if args.command == "run":
        return cmd_run(args, rest)
    return cmd_train_toy(rest)


if __name__ == "__main__":
    sys.exit(main())
