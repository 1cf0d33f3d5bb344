"""Run folders: every experiment writes config, results, tensors and figures to one folder.

Results are written atomically after every update, so an interrupted run keeps what it had finished.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

FIGURES_ROOT = Path("figures")


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for name in ("probes", "torch", "transformers", "transformer_lens", "numpy", "plotly"):
        try:
            from importlib.metadata import version

            out[name] = version(name.replace("_", "-"))
        except Exception:
            out[name] = "unknown"
    return out


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["platform"] = platform.platform()
    return info


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy arrays and scalars
        return _jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        raise ValueError(f"refusing to write a non-finite number ({x}) to results")
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.dtype):
        return str(x)
    return x


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2))
    os.replace(tmp, path)
    return path


class Run:
    """A run folder: `<root>/<experiment>/<pair>/` unless `out` is given.

    Holds `config.json` (arguments, seed, package versions, device, command line), `results.json` (updated
    as results arrive), tensors as safetensors, and figures as HTML with one shared `plotly.min.js` beside them
    so they open offline.
    """

    def __init__(self, experiment: str, pair: str, config: dict[str, Any], out: str | os.PathLike | None = None):
        self.dir = Path(out) if out is not None else FIGURES_ROOT / experiment / pair.replace("/", "_")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {}
        self.config = {
            "experiment": experiment, "pair": pair, **config,
            "versions": versions(), "device": device_info(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        write_json(self.dir / "config.json", self.config)

    def path(self, name: str) -> Path:
        return self.dir / name

    def update(self, **results: Any) -> None:
        """Add results and rewrite `results.json` at once."""
        self.results.update(_jsonable(results))
        write_json(self.dir / "results.json", self.results)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
        """`name`.safetensors (no pickle); metadata is stored as JSON strings."""
        from safetensors.torch import save_file

        path = self.dir / f"{name}.safetensors"
        tmp = path.with_suffix(".safetensors.tmp")
        meta = {k: json.dumps(_jsonable(v)) for k, v in (metadata or {}).items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
        return path

    def save_figure(self, name: str, fig: Any) -> Path:
        """`name`.html next to a single `plotly.min.js` (written once per folder)."""
        path = self.dir / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs="directory", full_html=True)
        return path


def add_common_args(parser: Any, default_pair: str = "toy") -> Any:
    """The arguments every experiment takes: pair, out, device, dtype, seed, batch size, offload."""
    parser.add_argument("--pair", default=default_pair, help="registry key (see `probes pairs`)")
    parser.add_argument("--base", default=None, help="base model hub id or folder (with --instruct, instead of --pair)")
    parser.add_argument("--instruct", default=None, help="instruct model hub id or folder")
    parser.add_argument("--out", default=None, help="run folder (default figures/<experiment>/<pair>)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--offload", action="store_true", help="keep one model on the device at a time")
    parser.add_argument("--trust-remote-code", action="store_true")
    return parser


def pair_from_args(args: Any) -> Any:
    """Load the pair named by `add_common_args` arguments, with the seed set."""
    from probes.pairs import load_pair

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    common = dict(device=args.device, dtype=dtype, offload=args.offload, trust_remote_code=args.trust_remote_code)
    if args.base or args.instruct:
        if not (args.base and args.instruct):
            raise SystemExit("--base and --instruct go together")
        return load_pair(args.base, args.instruct, **common)
    return load_pair(args.pair, **common)


def is_toy(args: Any) -> bool:
    """Whether `add_common_args` arguments name the shipped toy pair."""
    return args.pair == "toy" and not (args.base or args.instruct)


def config_from_args(args: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items()}
