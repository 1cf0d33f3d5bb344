"""GGUF model files (llama.cpp, Ollama) as model sources: converted once into a plain Hugging Face folder.

transformers reads a GGUF file (with the `gguf` package) and dequantizes its weights to float, but a model loaded
that way refuses `save_pretrained` ("quantized with gguf and is not serializable"); the weights are plain tensors by
then, so they are copied into a fresh model of the same config and saved with the GGUF's tokenizer and chat
template. The folder lives in the cache (`$PROBES_CACHE/gguf`, default `~/.cache/probes/gguf`), named by the file's
stem and sha256, so later loads take seconds and a changed file never reuses a stale folder. Everything downstream
(pairing checks, the bridge, provenance) sees an ordinary folder.

Sources: a path to a `.gguf` file, any file that starts with the GGUF magic (an Ollama blob,
`~/.ollama/models/blobs/sha256-...`), or `pkg:<module>[/<file>]` for a GGUF shipped inside an installed Python
package (located without importing it; a package with an `assemble()` function, whose file comes in chunks, is
assembled into the cache first).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from probes.files import atomic_path
from probes.provenance import cache_dir, file_sha256

MAGIC = b"GGUF"
MARKER = "probes-gguf.json"
# Bumped when the conversion changes, so a folder converted by an older probes is never reused.
FORMAT = 1


class GGUFError(ValueError):
    """A GGUF source that cannot be used (missing package or file, not a GGUF file, conversion failed)."""


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic bytes (whatever its name)."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    with p.open("rb") as f:
        return f.read(4) == MAGIC


def package_file(source: str) -> Path:
    """The GGUF file of a `pkg:<module>[/<file>]` source."""
    spec_text = source.removeprefix("pkg:")
    module, _, name = spec_text.partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"{source!r}: the Python package {module!r} is not installed (pip install "
                        f"{module.replace('_', '-')})")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if name:
        path = folder / name
        if not path.is_file():
            raise GGUFError(f"{source!r}: no file {name!r} in {folder}")
        return path
    found = sorted(folder.glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    if found:
        raise GGUFError(f"{source!r}: several GGUF files in {folder}; name one ({[f.name for f in found]})")
    # A package that ships its file in chunks and assembles it (checking the sha256) on request.
    mod = importlib.import_module(module)
    assemble = getattr(mod, "assemble", None)
    if assemble is None:
        raise GGUFError(f"{source!r}: no .gguf file in {folder} and no assemble() in {module}")
    target = cache_dir() / "packages" / module / getattr(mod, "MODEL_NAME", f"{module}.gguf")
    return Path(assemble(target))


def hf_folder(gguf: str | os.PathLike) -> Path:
    """The cached Hugging Face folder converted from GGUF file `gguf` (converted now if absent): config, float32
    safetensors weights, tokenizer with the GGUF's chat template, and `probes-gguf.json` naming the source file
    and its sha256."""
    src = Path(gguf).expanduser().resolve()
    if not is_gguf_file(src):
        raise GGUFError(f"{gguf}: not a GGUF file (it does not start with {MAGIC!r})")
    digest = file_sha256(src)
    folder = cache_dir() / "gguf" / f"{src.stem}-{digest[:16]}-v{FORMAT}"
    if (folder / MARKER).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(src, tmp)
        with atomic_path(tmp / MARKER) as m:
            m.write_text(json.dumps({"gguf": str(src), "sha256": digest, "size": src.stat().st_size,
                                     "format": FORMAT}, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted it first: theirs is as good
            if not (folder / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert(src: Path, out: Path) -> None:
    """Dequantize `src` with transformers and save it as a plain folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except ImportError as exc:  # the gguf package is missing
        raise GGUFError(f"{src}: reading GGUF needs the gguf package (pip install gguf): {exc}") from exc
    # A GGUF-loaded model refuses save_pretrained; its weights are already float: copy them into a plain model.
    plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if plain.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise GGUFError(f"{src}: converted weights do not match the config (missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]})")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
