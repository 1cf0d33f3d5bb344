"""PEFT adapter folders (LoRA) as model sources: merged once into their base, into a cached plain folder.

A folder with `adapter_config.json` loads like a model folder: its `base_model_name_or_path` is resolved as any
source (hub id, folder, GGUF file, `pkg:`), the adapter is merged into the float32 base with peft, and the result
is saved under `$PROBES_CACHE/adapters` (default `~/.cache/probes/adapters`), named by the adapter's folder name
and the sha256 of the adapter and base files, so it is merged once and a changed adapter never reuses a stale
merge. A `chat_template.jinja` in the adapter folder becomes the merged tokenizer's template (a base model has
none; the adapter was trained in one).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from probes.files import cached_folder
from probes.provenance import cache_dir, file_sha256

CONFIG = "adapter_config.json"
MARKER = "probes-adapter.json"
FORMAT = 1


class AdapterError(ValueError):
    """An adapter folder that cannot be merged (peft missing, no base named, weights that do not fit the base)."""


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / CONFIG).is_file()


def _digest(adapter: Path, base_folder: Path | str) -> str:
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    for f in sorted(p for p in adapter.iterdir() if p.is_file()):
        h.update(f"{f.name} {file_sha256(f)}\n".encode())
    base = Path(base_folder)
    if base.is_dir():
        for f in sorted(p for p in base.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".jinja")):
            h.update(f"base {f.name} {file_sha256(f)}\n".encode())
    else:  # a hub id: its name stands for it
        h.update(f"base {base_folder}\n".encode())
    return h.hexdigest()


def merged_folder(adapter: str | os.PathLike) -> Path:
    """The cached folder of the base with `adapter` merged in (merged now if absent)."""
    from probes.pairs import resolve_source

    adapter = Path(adapter).expanduser().resolve()
    config = json.loads((adapter / CONFIG).read_text())
    base_src = config.get("base_model_name_or_path")
    if not base_src:
        raise AdapterError(f"{adapter / CONFIG}: no base_model_name_or_path: which model does it adapt?")
    base_folder = resolve_source(base_src)
    digest = _digest(adapter, base_folder)
    folder = cache_dir() / "adapters" / f"{adapter.name}-{digest[:16]}-v{FORMAT}"
    return cached_folder(folder, MARKER, lambda tmp: _merge(adapter, base_folder, tmp),
                         {"adapter": str(adapter), "base": base_src, "sha256": digest, "format": FORMAT})


def _merge(adapter: Path, base_folder: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from peft import PeftModel
    except ImportError as exc:
        raise AdapterError(f"{adapter}: merging an adapter needs peft (pip install peft): {exc}") from exc
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(base, adapter, torch_device="cpu").merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as exc:
        raise AdapterError(f"{adapter}: does not fit {base_folder}: {exc}") from exc
    merged = merged.to(torch.float32)
    merged.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    template = adapter / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    tokenizer.save_pretrained(out)
