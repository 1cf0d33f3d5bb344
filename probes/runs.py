"""Run folders: every experiment writes config, results, tensors and figures to one folder, atomically.

A run writes into `.<name>.partial/` beside its target folder and moves it into place only when it is complete, with
`run.json` (status, times, the sha256 of every file) as the completion marker; an interrupted run leaves the previous
complete run untouched. A target that already holds a run is refused unless `mode="overwrite"` (the new run replaces
it whole, once complete) or `mode="resume"` (an interrupted run continues, reusing its finished chunks: see
`probes.checkpoints`). A lock file beside the target refuses a second writer.

Under torchrun only rank 0 writes the run folder; the other ranks' `Run` writes into a private scratch folder that
it deletes when the run ends (`probes.distributed`).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from probes import distributed, provenance
from probes.checkpoints import ChunkStore
from probes.files import atomic_path

FIGURES_ROOT = Path("figures")
MARKER = "run.json"
MODES = ("new", "overwrite", "resume")
# Figure files: the toolbar's PNG export at twice the size (sharp in slides); scroll-zoom off so a page scrolls.
FIGURE_CONFIG = {"toImageButtonOptions": {"format": "png", "scale": 2}, "scrollZoom": False,
                 "displaylogo": False}


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked (it holds a run, another run writes to it, it is no run folder)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
    if isinstance(x, slice):  # --layers 0:12, recorded as written
        text = f"{'' if x.start is None else x.start}:{'' if x.stop is None else x.stop}"
        return text + (f":{x.step}" if x.step is not None else "")
    if isinstance(x, torch.dtype):
        return str(x)
    return x


def write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically (temp file + rename)."""
    text = json.dumps(_jsonable(data), indent=2)  # serialise first: a refused value leaves the old file as it was
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The `run.json` of `folder`, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(folder: Path) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("status") == "complete"


class _Lock:
    """An exclusive `flock` on `<parent>/.<name>.lock`, held for the life of the run (released by the OS on exit)."""

    def __init__(self, path: Path, target: Path):
        import fcntl

        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunFolderError(f"another run is writing to {target} (lock {path} held by "
                                 f"pid {holder}): wait for it, or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class Run:
    """A run folder: `<root>/<experiment>/<pair>/` unless `out` is given.

    Holds `config.json` (arguments, provenance: see `probes.provenance`), `results.json` (rewritten as results
    arrive), tensors as safetensors, figures as self-contained HTML (plotly.js inside: they open offline),
    `index.html` (config, headline numbers, every figure) and `run.json` once complete. While running, `dir` is
    the partial folder; after `finish()`, the target.

    Use it as a context manager: a clean exit finishes the run, an exception (or SIGINT / SIGTERM) marks the partial
    folder interrupted and leaves the target as it was.
    """

    def __init__(self, experiment: str, pair: str, config: dict[str, Any], out: str | os.PathLike | None = None,
                 *, mode: str = "new"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.target = Path(out) if out is not None else FIGURES_ROOT / experiment / pair.replace("/", "_")
        self.main = distributed.is_main()
        if not self.main:
            self._scratch(experiment, pair, config, mode)
            return
        if self.target.exists() and not self.target.is_dir():
            raise RunFolderError(f"{self.target} is a file, not a run folder")
        parent = self.target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create the run folder's parent {parent}: {exc}") from None
        if not os.access(parent, os.W_OK):
            raise RunFolderError(f"{parent} is not writable")
        self.partial = parent / f".{self.target.name}.partial"
        self.mode = mode
        self._lock = _Lock(parent / f".{self.target.name}.lock", self.target)
        try:
            self._check_target(mode)
        except BaseException:
            self._lock.release()
            raise
        self.resumed = mode == "resume" and self.partial.is_dir()
        if not self.resumed:
            shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(exist_ok=True)
        self.dir = self.partial
        self.chunks = ChunkStore(self.partial / "chunks")
        self.results: dict[str, Any] = {}
        self._figures: list[str] = []
        self.finished = False
        self._signals: dict[int, Any] = {}
        self.config = {"experiment": experiment, "pair": pair, **config, "mode": mode, "resumed": self.resumed,
                       "started": _now(), **provenance.environment()}
        if distributed.world_size() > 1:  # written by rank 0 of this many processes
            self.config["world_size"] = distributed.world_size()
        write_json(self.partial / "config.json", self.config)
        self._marker("running")

    def _scratch(self, experiment: str, pair: str, config: dict[str, Any], mode: str) -> None:
        """A rank other than 0 of a multi-process run: everything goes to a private folder, deleted at the end.

        The run's calls work as on rank 0 (results, tensors, figures, direct writes into `dir`), so one script
        runs on every rank, but nothing reaches the target, no lock is taken and no chunk store is kept.
        """
        import tempfile

        self.mode, self.resumed, self.finished = mode, False, False
        self.partial = self.dir = Path(tempfile.mkdtemp(prefix=f"probes-rank{distributed.rank()}-"))
        self.chunks = None
        self._lock = None
        self.results, self._figures, self._signals = {}, [], {}
        self.config = {"experiment": experiment, "pair": pair, **config, "mode": mode, "resumed": False,
                       "started": _now(), "rank": distributed.rank(), "world_size": distributed.world_size()}

    def _check_target(self, mode: str) -> None:
        t, partial = self.target, self.partial
        self._recover_swap()
        holds_files = t.is_dir() and any(t.iterdir())
        if holds_files and read_marker(t) is None:
            raise RunFolderError(f"{t} holds files but no {MARKER}: it is not a run folder; choose another --out")
        if mode == "new":
            if partial.exists():
                raise RunFolderError(f"an interrupted run is at {partial}: pass --resume to continue it (finished "
                                     "chunks are reused) or --overwrite to discard it")
            if holds_files:
                raise RunFolderError(f"{t} already holds a run ({read_marker(t).get('status')}): pass --overwrite to "
                                     "replace it whole once the new run completes, or choose another --out")
        if mode == "resume" and not partial.exists() and holds_files:
            raise RunFolderError(f"{t} is complete and there is no interrupted run to resume: pass --overwrite "
                                 "to recompute it")

    def _recover_swap(self) -> None:
        """Undo a swap that was cut between its two renames (target moved aside, partial not yet in place)."""
        if self.target.exists():
            return
        for old in sorted(self.target.parent.glob(f".{self.target.name}.old-*")):
            if is_complete(old):
                os.replace(old, self.target)
                return

    def _marker(self, status: str, **extra: Any) -> None:
        if not self.main:
            return
        write_json(self.dir / MARKER, {"status": status, "experiment": self.config["experiment"],
                                       "started": self.config["started"], "updated": _now(), **extra})

    # ------------------------------------------------------------------------------------------------ contents
    def path(self, name: str) -> Path:
        return self.dir / name

    def update_config(self, **entries: Any) -> None:
        """Add provenance or resolved inputs to `config.json` (e.g. model hashes once the pair has loaded)."""
        self.config.update(_jsonable(entries))
        write_json(self.dir / "config.json", self.config)

    def update(self, **results: Any) -> None:
        """Add results and rewrite `results.json` at once."""
        new = _jsonable(results)  # raises on NaN before anything changes
        self.results.update(new)
        write_json(self.dir / "results.json", self.results)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> Path:
        """`name`.safetensors (no pickle); metadata is stored as JSON strings."""
        from safetensors.torch import save_file

        path = self.dir / f"{name}.safetensors"
        meta = {k: json.dumps(_jsonable(v)) for k, v in (metadata or {}).items()}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return path

    def save_figure(self, name: str, fig: Any) -> Path:
        """`name`.html, self-contained: plotly.js is inside the file, so it opens offline wherever it is copied."""
        if name == "index":
            raise ValueError("'index' is the run's own page; name the figure otherwise")
        path = self.dir / f"{name}.html"
        if not self.main:  # rank > 0 of a multi-process run: rank 0 writes the same figure
            return path
        with atomic_path(path) as tmp:
            fig.write_html(str(tmp), include_plotlyjs=True, full_html=True, config=FIGURE_CONFIG)
        if path.name not in self._figures:
            self._figures.append(path.name)
        return path

    def write_index(self, status: str = "complete") -> Path:
        """`index.html`: the run's config, headline numbers and every figure on one page (opens offline)."""
        from probes.run_index import index_html

        names = self._figures + sorted(p.name for p in self.dir.glob("*.html")
                                       if p.name not in self._figures and p.name != "index.html")
        path = self.dir / "index.html"
        with atomic_path(path) as tmp:
            tmp.write_text(index_html(self.dir, self.config, self.results, names, status), encoding="utf-8")
        return path

    # ----------------------------------------------------------------------------------------------- lifecycle
    def finish(self) -> Path:
        """Mark the run complete and move it into place (replacing the target whole when overwriting)."""
        if self.finished:
            return self.dir
        if not self.main:  # rank > 0: its scratch goes; the target is rank 0's
            shutil.rmtree(self.partial, ignore_errors=True)
            self.dir, self.finished = self.target, True
            return self.target
        shutil.rmtree(self.partial / "chunks", ignore_errors=True)  # resume scratch: the results hold it all
        self.write_index()
        files = {p.name: provenance.file_sha256(p) for p in sorted(self.partial.iterdir())
                 if p.is_file() and p.name != MARKER}
        self._marker("complete", finished=_now(), files=files)
        t = self.target
        if t.exists():
            old = t.parent / f".{t.name}.old-{os.getpid()}"
            os.replace(t, old)
            os.replace(self.partial, t)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, t)
        self.dir = t
        self.finished = True
        self._lock.release()
        return t

    def abort(self, status: str = "interrupted", error: str | None = None) -> None:
        """Leave the partial folder for `--resume`, marked with why it stopped; the target is untouched."""
        if self.finished:
            return
        if not self.main:
            shutil.rmtree(self.partial, ignore_errors=True)
            return
        with contextlib.suppress(OSError):
            self._marker(status, **({"error": error} if error else {}))
        self._lock.release()

    def __enter__(self) -> Run:
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a scheduler's kill) unwinds like Ctrl-C, so the partial folder is marked interrupted.
            self._signals[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupt)
        self._activation = self.chunks.activate() if self.chunks is not None else contextlib.nullcontext()
        self._activation.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._activation.__exit__(exc_type, exc, tb)
        for sig, handler in self._signals.items():
            signal.signal(sig, handler)
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.abort("interrupted")
        else:
            self.abort("failed", f"{exc_type.__name__}: {exc}")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def load_run(folder: str | os.PathLike) -> dict[str, Any]:
    """`{"config", "results", "marker"}` of a complete run folder, after checking every file's sha256.

    Raises `RunFolderError` naming the folder or file when the run is incomplete or a file changed.
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        raise RunFolderError(f"{folder}: no {MARKER}: not a run folder")
    if marker.get("status") != "complete":
        raise RunFolderError(f"{folder}: the run is {marker.get('status')!r}, not complete")
    for name, digest in marker.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise RunFolderError(f"{p}: listed in {MARKER} but missing")
        if provenance.file_sha256(p) != digest:
            raise RunFolderError(f"{p}: sha256 differs from {MARKER}: the file changed after the run")
    return {"marker": marker, "config": json.loads((folder / "config.json").read_text()),
            "results": json.loads((folder / "results.json").read_text()) if (folder / "results.json").exists() else {}}
