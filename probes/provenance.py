"""What a run ran on: model sources and hashes, prompt files and hashes, code and package versions, device.

Every hash is a sha256 of file bytes. Hashing a multi-GB weight file takes seconds, so file hashes are cached in
`$PROBES_CACHE` (default `~/.cache/probes/sha256.json`), keyed by absolute path, size and modification time: a
changed file is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from probes.files import atomic_path

PACKAGES = ("probes", "torch", "transformers", "transformer-lens", "tokenizers", "safetensors", "numpy", "plotly",
            "huggingface-hub")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


def cache_dir() -> Path:
    """The toolkit's cache (file hashes, converted GGUF models): `$PROBES_CACHE`, else `~/.cache/probes`."""
    return Path(os.environ.get("PROBES_CACHE") or Path.home() / ".cache" / "probes").expanduser()


def sha256_bytes(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed; cached by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_dir() / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    try:  # the cache is a convenience: an unwritable home never fails a run
        index.parent.mkdir(parents=True, exist_ok=True)
        known[key] = digest
        with atomic_path(index) as tmp:
            tmp.write_text(json.dumps(known))
    except OSError:
        pass
    return digest


def _hub_revision(path: Path) -> str | None:
    """The commit of a hub-cache snapshot folder (`.../snapshots/<commit>/`), else None."""
    parts = path.resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots":
        return parts[-1]
    return None


def model_files(folder: Path) -> dict[str, list[str]]:
    """{"config": [...], "weights": [...], "tokenizer": [...]} file names of a model folder."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return {"config": [n for n in names if n in ("config.json", "generation_config.json")],
            "weights": [n for n in names if n.endswith(_WEIGHT_SUFFIXES)],
            "tokenizer": [n for n in names if n in _TOKENIZER_FILES]}


def model_source(source: str, resolved: str, *, revision: str | None = None,
                 registry_key: str | None = None) -> dict[str, Any]:
    """Where one model came from and the sha256 of its config, weight and tokenizer files.

    source: what the user named (registry row entry, hub id, folder); resolved: what was loaded (a folder, or a
    hub id that transformers resolved from the cache or the hub).
    """
    out: dict[str, Any] = {"source": source}
    if registry_key:
        out["registry_key"] = registry_key
    folder = Path(resolved)
    if not folder.is_dir():
        folder = _cached_snapshot(resolved, revision)
        out["kind"] = "hub"
        out["hub_id"] = resolved
    else:
        out["kind"] = "toy" if source.startswith("toy:") else "folder"
    if folder is None:
        out["files"] = "not found in the hub cache: hashes unavailable"
        out["revision"] = revision
        return out
    out["folder"] = str(folder.resolve())
    out["revision"] = revision or _hub_revision(folder)
    files = model_files(folder)
    out["sha256"] = {kind: {n: file_sha256(folder / n) for n in names} for kind, names in files.items()}
    out["weight_files"] = files["weights"]
    return out


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer actually used: class, name, vocabulary hash and chat template hash."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {"class": type(tokenizer).__name__, "name_or_path": getattr(tokenizer, "name_or_path", None),
            "vocab_size": len(tokenizer), "vocab_sha256": sha256_bytes(vocab),
            "chat_template_sha256": sha256_bytes(template) if template else None,
            "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()}}


def prompt_file(path: str | os.PathLike, n_used: int | None = None) -> dict[str, Any]:
    """A prompt file's path, sha256 and how many of its prompts the run used."""
    p = Path(path)
    out = {"path": str(p.resolve()), "sha256": file_sha256(p), "bytes": p.stat().st_size}
    if n_used is not None:
        out["n_used"] = n_used
    return out


def git_commit(start: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The checkout's commit and whether tracked files differ from it, when the package runs from a checkout."""
    root = Path(start) if start is not None else Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide the numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda": torch.cuda.is_available(),
                            "threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


def environment() -> dict[str, Any]:
    """Command line, code version, package versions and host: the part of provenance that needs no model."""
    return {"argv": list(sys.argv), "cwd": os.getcwd(), "git": git_commit(), "versions": versions(),
            "device": device_info()}


def pair_sources(pair: Any, registry_key: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """Provenance of both models of a loaded `ModelPair` and of the tokenizer both are fed."""
    resolved = getattr(pair, "resolved", {}) or {}
    out: dict[str, Any] = {"name": pair.name, "registry_key": registry_key}
    for which in ("base", "instruct"):
        src = pair.sources.get(which, "")
        out[which] = model_source(src, resolved.get(which, src), revision=revision, registry_key=registry_key)
    out["tokenizer"] = tokenizer_info(pair.tokenizer)
    out["dtype"] = str(pair.dtype)
    out["device"] = str(pair.device)
    return out
