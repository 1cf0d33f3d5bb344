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
import re
from pathlib import Path
from typing import Any

from probes.files import atomic_path, cached_folder
from probes.provenance import cache_dir, file_sha256

MAGIC = b"GGUF"
MARKER = "probes-gguf.json"
# Bumped when the conversion changes, so a folder converted by an older probes is never reused.
FORMAT = 2


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
    return cached_folder(folder, MARKER, lambda tmp: _convert(src, tmp),
                         {"gguf": str(src), "sha256": digest, "size": src.stat().st_size, "format": FORMAT})


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
    config = loaded.config
    if hasattr(config, "quantization_config"):  # plain float weights now: a gguf quantizer would block saving
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if plain.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise GGUFError(f"{src}: converted weights do not match the config (missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]})")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ------------------------------------------------------------------------------------------------------ writing

# llama.cpp architecture name and whether its converter permutes q/k rows (llama.cpp's LLaMA rotary layout).
_WRITABLE = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_DTYPES = ("f32", "f16", "q8_0")


def write_gguf(model: Any, tokenizer: Any, out: str | os.PathLike, *, dtype: str = "f16",
               name: str | None = None) -> Path:
    """Write an HF causal LM (or a bridge's HF model) as a GGUF file that llama.cpp, Ollama and transformers load.

    dtype: "f32", "f16" or "q8_0" for the matrices (norms and biases stay f32, as llama.cpp writes them).
    Supported: Llama-family (Llama, SmolLM2, Mistral: q/k rows permuted as llama.cpp's converter does) and Qwen2;
    other architectures raise GGUFError before anything is written. The tokenizer: copied field for field from the
    GGUF the model was converted from, if it was (`hf_folder`); else built from a byte-level BPE `tokenizer.json`
    (tokens, merges, token types, special ids, pre-tokenizer named from its split regex). The chat template is
    `tokenizer.chat_template`. Written to a temporary name and renamed, so `out` is complete or absent.
    """
    import gguf as gg
    import numpy as np
    import torch

    hf = getattr(model, "original_model", model)
    cfg = hf.config
    if cfg.model_type not in _WRITABLE:
        raise GGUFError(f"writing GGUF supports {sorted(_WRITABLE)} models, not {cfg.model_type!r}")
    if dtype not in _DTYPES:
        raise GGUFError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    arch, permute = _WRITABLE[cfg.model_type]
    tok_fields = _tokenizer_fields(hf, tokenizer)  # raises for tokenizers GGUF cannot hold, before writing
    out = Path(out)
    n_layers, n_head = cfg.num_hidden_layers, cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    arch_enum = next(k for k, v in gg.MODEL_ARCH_NAMES.items() if v == arch)
    names = gg.get_tensor_name_map(arch_enum, n_layers)
    ftype = {"f32": gg.LlamaFileType.ALL_F32, "f16": gg.LlamaFileType.MOSTLY_F16,
             "q8_0": gg.LlamaFileType.MOSTLY_Q8_0}[dtype]

    with atomic_path(out) as tmp:
        w = gg.GGUFWriter(str(tmp), arch)
        w.add_name(name or Path(str(getattr(cfg, "_name_or_path", "") or "model")).name)
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(n_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(n_head))
        w.add_head_count_kv(int(n_kv))
        w.add_rope_dimension_count(int(head_dim))
        w.add_rope_freq_base(float(_rope_theta(cfg)))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_vocab_size(int(cfg.vocab_size))
        w.add_file_type(int(ftype))
        w.add_quantization_version(gg.GGML_QUANT_VERSION)
        for key, (value, vtype, sub) in tok_fields.items():
            w.add_key_value(key, value, vtype, sub_type=sub)
        state = hf.state_dict()
        if getattr(cfg, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # llama.cpp ties output to token_embd when output.weight is absent
        for hf_name, tensor in state.items():
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is None:
                if "rotary_emb" in hf_name:
                    continue  # derived buffers, recomputed from rope_theta
                raise GGUFError(f"no GGUF name for tensor {hf_name!r}")
            data = tensor.detach().to("cpu", torch.float32)
            if permute and base.endswith(("self_attn.q_proj", "self_attn.k_proj")) and suffix == "weight":
                heads = n_head if base.endswith("q_proj") else n_kv
                data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]) \
                    .swapaxes(1, 2).reshape(data.shape)
            arr = data.numpy()
            if not np.isfinite(arr).all():
                raise GGUFError(f"tensor {hf_name!r} has non-finite values")
            if arr.ndim == 1 or dtype == "f32":
                w.add_tensor(f"{gguf_name}.{suffix}", arr.astype(np.float32))
            elif dtype == "f16":
                w.add_tensor(f"{gguf_name}.{suffix}", arr.astype(np.float16))
            else:
                q = gg.quants.quantize(arr, gg.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"{gguf_name}.{suffix}", q, raw_shape=q.shape, raw_dtype=gg.GGMLQuantizationType.Q8_0)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta")
    if theta is None:
        raise GGUFError("the config has no rope_theta")
    return theta


def source_gguf(hf_model: Any) -> Path | None:
    """The GGUF file a model was converted from (`hf_folder`), if it was and the file is still there unchanged."""
    folder = Path(str(getattr(hf_model.config, "_name_or_path", "") or ""))
    marker = folder / MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    src = Path(info["gguf"])
    if not src.is_file() or src.stat().st_size != info["size"]:
        return None
    return src


def _tokenizer_fields(hf_model: Any, tokenizer: Any) -> dict[str, tuple[Any, Any, Any]]:
    """`{key: (value, value type, array item type)}` of the `tokenizer.*` GGUF fields."""
    import gguf as gg

    src = source_gguf(hf_model)
    if src is not None:
        reader = gg.GGUFReader(src)
        fields = {}
        for key, f in reader.fields.items():
            if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
                sub = f.types[1] if f.types[0] == gg.GGUFValueType.ARRAY else None
                fields[key] = (f.contents(), f.types[0], sub)
    else:
        fields = _bpe_fields(hf_model, tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        fields["tokenizer.chat_template"] = (template, gg.GGUFValueType.STRING, None)
    return fields


def _bpe_fields(hf_model: Any, tokenizer: Any) -> dict[str, tuple[Any, Any, Any]]:
    """GGUF `gpt2` tokenizer fields from a fast tokenizer whose model is byte-level BPE."""
    import gguf as gg

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise GGUFError("writing GGUF needs the tokenizer of a GGUF source or a byte-level BPE tokenizer.json; "
                        f"this one is {model.get('type') or type(tokenizer).__name__}")
    n_vocab = int(hf_model.config.vocab_size)
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i].content)
            types.append(gg.TokenType.CONTROL if added[i].special else gg.TokenType.USER_DEFINED)
        elif i in id_to_token:
            tokens.append(id_to_token[i])
            types.append(gg.TokenType.NORMAL)
        else:  # rows of a padded embedding that no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gg.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    S, A = gg.GGUFValueType.STRING, gg.GGUFValueType.ARRAY
    fields: dict[str, tuple[Any, Any, Any]] = {
        "tokenizer.ggml.model": ("gpt2", S, None),
        "tokenizer.ggml.pre": (_pre_tokenizer_name(spec), S, None),
        "tokenizer.ggml.tokens": (tokens, A, S),
        "tokenizer.ggml.token_type": ([int(t) for t in types], A, gg.GGUFValueType.INT32),
        "tokenizer.ggml.merges": (merges, A, S),
    }
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"),
                      ("padding", "pad_token_id")):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            fields[f"tokenizer.ggml.{key}_token_id"] = (value, gg.GGUFValueType.UINT32, None)
    fields["tokenizer.ggml.add_bos_token"] = (bool(getattr(tokenizer, "add_bos_token", False)),
                                              gg.GGUFValueType.BOOL, None)
    return fields


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the tokenizer's split regex (its readers choose the split by this name)."""
    patterns = re.findall(r'"Regex": "((?:[^"\\]|\\.)*)"', json.dumps(spec.get("pre_tokenizer")))
    if not patterns:
        return "gpt2"  # ByteLevel with its built-in GPT-2 regex
    pattern = json.loads(f'"{patterns[0]}"')
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        GGUF_PRE_TOKENIZER_SPLITS = {}
    preferred = ("llama-bpe", "qwen2", "qwen35", "gpt-4o", "tekken")
    names = sorted((n for n, p in GGUF_PRE_TOKENIZER_SPLITS.items() if p == pattern),
                   key=lambda n: (n not in preferred, preferred.index(n) if n in preferred else 0))
    return names[0] if names else "default"
