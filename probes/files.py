"""Files and folders written whole or not at all: a crash mid-write never leaves a truncated file (or a half-built
folder) under the real name."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without an error, removed
    when it raises. Beside it, so the rename stays on one file system (atomic); with the process id, so two
    writers of the same file never share a temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached_folder(folder: str | os.PathLike, marker: str, build: Callable[[Path], None],
                  record: dict[str, Any]) -> Path:
    """`folder`, built once: if its `marker` file is absent, `build(tmp)` fills a temporary folder beside it,
    `record` is written as the marker (last, so a folder with a marker is complete) and the folder is renamed into
    place. Two processes building the same folder both succeed; the first rename wins."""
    folder = Path(folder)
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        with atomic_path(tmp / marker) as m:
            m.write_text(json.dumps(record, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process built it first: theirs is as good
            if not (folder / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
