"""Load a matched base/instruct pair as two TransformerBridge models that see the same token ids.

Numeric convention: the bridges run in plain mode (no `enable_compatibility_mode()`, no LayerNorm folding), so
`blocks.{l}.hook_resid_pre` equals the HF model's `hidden_states[l]` exactly. Both models of a pair use the
instruct tokenizer.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from probes import registry


class PairingError(ValueError):
    """The two models are not a matched pair; `field` names what differs."""

    def __init__(self, field: str, base: Any, instruct: Any):
        self.field, self.base_value, self.instruct_value = field, base, instruct
        super().__init__(f"not a matched pair: {field} differs (base {base!r}, instruct {instruct!r})")


class ModelNotAvailableError(OSError):
    """A hub id that is neither a local folder nor in the hub cache, and cannot be downloaded."""


_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "n_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_heads": ("num_attention_heads", "n_head"),
    "d_vocab": ("vocab_size",),
}


def config_fields(hf_config: Any) -> dict[str, Any]:
    """The fields that must agree between a base and an instruct model, read from an HF config."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    out: dict[str, Any] = {"architecture": (getattr(hf_config, "architectures", None) or [None])[0]}
    for name, candidates in _CONFIG_FIELDS.items():
        out[name] = next((getattr(text, c) for c in candidates if getattr(text, c, None) is not None), None)
    return out


def check_pair(base_config: Any, instruct_config: Any) -> None:
    """Raise `PairingError` naming the first field where the two HF configs differ."""
    base, instruct = config_fields(base_config), config_fields(instruct_config)
    for name in ("architecture", "n_layers", "d_model", "n_heads", "d_vocab"):
        if base[name] != instruct[name]:
            raise PairingError(name, base[name], instruct[name])


def compare_tokenizers(base_tok: Any, instruct_tok: Any) -> list[str]:
    """Differences between two tokenizers other than special / added tokens (empty when they agree)."""

    def ordinary(tok: Any) -> dict[str, int]:
        special = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()}
        return {t: i for t, i in tok.get_vocab().items() if t not in special}

    b, i = ordinary(base_tok), ordinary(instruct_tok)
    diffs = [f"{t!r}: base {b.get(t)} vs instruct {i.get(t)}" for t in sorted(set(b) | set(i)) if b.get(t) != i.get(t)]
    return diffs


def resolve_source(source: str | os.PathLike) -> str:
    """A loadable path or hub id for `source`: the toy pair's folders, a local folder, a GGUF file or
    `pkg:<module>[/<file>]` (converted once to a cached folder: `probes.gguf`), a PEFT adapter folder or
    `organism:<name>` (merged once into its base: `probes.adapters`), or a hub id.

    Hub ids are checked against the local cache when offline, with a plain error if absent.
    """
    src = str(source)
    if src.startswith("toy:"):
        from probes import toy

        return str(toy.path() / src.split(":", 1)[1])
    if src.startswith("pkg:") or Path(src).expanduser().is_file():
        from probes import gguf

        path = gguf.package_file(src) if src.startswith("pkg:") else Path(src).expanduser()
        if not gguf.is_gguf_file(path):
            raise FileNotFoundError(f"{src!r} is a file but not a GGUF file: give a model folder or a .gguf file")
        return str(gguf.hf_folder(path))
    if src.startswith("organism:"):  # an adapter shipped in the package, merged into its base
        from probes import organism

        src = str(organism.shipped(src.split(":", 1)[1]))
    if Path(src).expanduser().is_dir() and (Path(src).expanduser() / "adapter_config.json").is_file():
        from probes.adapters import merged_folder

        return str(merged_folder(src))
    if Path(src).expanduser().is_dir():
        folder = Path(src).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{src!r} is a folder without config.json: not a model folder")
        return str(folder)
    if Path(src).expanduser().exists() or src.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{src!r} is not a model folder (expected a directory with config.json)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline and not _in_hub_cache(src):
        raise ModelNotAvailableError(
            f"{src!r} is not in the local hub cache and HF_HUB_OFFLINE is set: download it where there is a "
            f"network (`hf download {src}`) or pass a local folder"
        )
    return src


def _same_source(a: str, b: str) -> bool:
    """Whether two resolved sources are one model (the same folder, or the same hub id)."""
    pa, pb = Path(a), Path(b)
    return pa.resolve() == pb.resolve() if pa.exists() and pb.exists() else a == b


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # a malformed id is simply not cached
        return False


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.exceptions.ConnectionError)
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.HTTPError)
    return tuple(errors)


def load_config(source: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The HF config of `source` (path or hub id), with a clear error when it cannot be had."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except _hub_errors() as exc:
        raise ModelNotAvailableError(
            f"could not load the config of {source!r}: it is not a local folder, not in the hub cache, and the "
            f"hub could not be reached ({type(exc).__name__}: {exc})"
        ) from exc


def load_tokenizer(source: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The tokenizer of `source`, untouched (the bridge gets its own copy)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except _hub_errors() as exc:
        raise ModelNotAvailableError(f"could not load the tokenizer of {source!r}: {exc}") from exc


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bridge_tokenizer(tokenizer: Any) -> Any:
    """A copy of `tokenizer` that TransformerBridge may mutate.

    The bridge rewrites `bos_token` (to eos when absent) and `pad_token`, and for a tokenizer without
    `add_bos_token` it reloads one from `name_or_path` — which crashes for an in-memory tokenizer. We keep the
    caller's tokenizer intact and give the bridge a copy that already claims `add_bos_token`; probes never
    tokenises through the bridge (ChatBatch owns tokenisation), so the claim only skips that reload.
    """
    tok = copy.deepcopy(tokenizer)
    if tok.bos_token is not None and not tok.init_kwargs.get("add_bos_token"):
        tok.init_kwargs["add_bos_token"] = True
    return tok


def load_model(
    source: str | os.PathLike,
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    hf_model: Any = None,
    copy_hf_model: bool = True,
) -> Any:
    """Load one model (hub id, local folder or `toy:base`/`toy:instruct`) as a frozen TransformerBridge.

    Parameters are frozen (`requires_grad=False`) because the bridge's forward and `run_with_cache` do not
    disable autograd; frozen weights keep every forward graph-free. `device_map` is passed through for
    multi-GPU dispatch and excludes `device`. An already-loaded `hf_model` (e.g. quantised) is wrapped as it is;
    the bridge rewires it in place (eager attention, replaced submodules), so a copy is wrapped unless
    `copy_hf_model=False` (saves the memory of a second copy, at the cost of the caller's model).
    """
    from transformer_lens.model_bridge import TransformerBridge

    path = resolve_source(source)
    if hf_model is not None:
        hf_model = copy.deepcopy(hf_model) if copy_hf_model else hf_model
    if tokenizer is None:
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, revision=revision)
    kwargs: dict[str, Any] = dict(
        dtype=dtype or torch.float32,
        tokenizer=_bridge_tokenizer(tokenizer),
        trust_remote_code=trust_remote_code,
        revision=revision,
    )
    if hf_model is not None:
        kwargs["hf_model"] = hf_model
        kwargs["device"] = str(device) if device is not None else str(next(hf_model.parameters()).device)
    elif device_map is not None:
        if device is not None:
            raise ValueError("pass either device or device_map, not both")
        kwargs["device_map"] = device_map
    else:
        kwargs["device"] = str(device or default_device())
    try:
        model = TransformerBridge.boot_transformers(path, **kwargs)
    except _hub_errors() as exc:
        raise ModelNotAvailableError(f"could not load {str(source)!r}: {exc}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass
class ModelPair:
    """A base model and its instruct sibling, both hooked, sharing the instruct tokenizer.

    `offload=True` keeps both models on the CPU and moves one at a time to `device` inside `on_device`,
    for pairs that do not fit on the device together.
    """

    base: Any
    instruct: Any
    tokenizer: Any
    name: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    offload: bool = False
    base_tokenizer: Any = None
    sources: dict[str, str] = field(default_factory=dict)
    resolved: dict[str, str] = field(default_factory=dict)  # what was loaded: a folder, or a hub id

    @property
    def cfg(self) -> Any:
        return self.instruct.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def models(self) -> dict[str, Any]:
        return {"base": self.base, "instruct": self.instruct}

    def __getitem__(self, which: str) -> Any:
        if which not in ("base", "instruct"):
            raise KeyError(f"a pair has 'base' and 'instruct', not {which!r}")
        return self.models[which]

    @contextlib.contextmanager
    def on_device(self, which: str) -> Iterator[Any]:
        """Yield model `which` on the pair's device; with `offload`, move it back to the CPU afterwards."""
        model = self[which]
        if not self.offload:
            yield model
            return
        model.to(self.device)
        try:
            yield model
        finally:
            model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def run_with_cache(self, batch: Any, which: str | None = None, **kwargs: Any) -> Any:
        """`probes.activations.run_with_cache` (attention mask passed) on model `which`, or on both:
        {"base": (logits, cache), "instruct": (logits, cache)}. With `offload`, each model's cache stays on the
        device it ran on."""
        from probes.activations import run_with_cache

        if which is not None:
            with self.on_device(which) as model:
                return run_with_cache(model, batch, **kwargs)
        out = {}
        for w in ("base", "instruct"):
            with self.on_device(w) as model:
                out[w] = run_with_cache(model, batch, **kwargs)
        return out

    def encode(
        self,
        instructions: Sequence[str],
        *,
        system: str | None = None,
        responses: Sequence[str] | None = None,
        template: bool = True,
        **template_kwargs: Any,
    ) -> Any:
        """`probes.chat.encode` with this pair's tokenizer and context length."""
        from probes.chat import encode

        return encode(self.tokenizer, instructions, system=system, responses=responses, template=template,
                      max_length=self.n_ctx, **template_kwargs)


def load_pair(
    name_or_base: str | os.PathLike,
    instruct: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    offload: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
    name: str | None = None,
    chat_template: str | os.PathLike | None = None,
) -> ModelPair:
    """Load a registered pair by key, or two hub ids / local folders, and check that they are a pair.

    The configs are compared before any weights load (architecture, layers, d_model, heads, vocabulary:
    `PairingError` names the field). A base tokenizer that differs from the instruct one in anything but
    special tokens gives a warning: both models are fed the instruct tokenizer's ids. `chat_template` (a `.jinja`
    file, a tokenizer_config.json or the text) replaces the instruct tokenizer's template.
    """
    if instruct is None:
        spec = registry.get(str(name_or_base))
        base_src, instruct_src, name = spec.base, spec.instruct, name or spec.key
    else:
        base_src, instruct_src = str(name_or_base), str(instruct)
        name = name or f"{Path(base_src).name}__{Path(instruct_src).name}"
    base_path, instruct_path = resolve_source(base_src), resolve_source(instruct_src)
    check_pair(
        load_config(base_path, trust_remote_code=trust_remote_code, revision=revision),
        load_config(instruct_path, trust_remote_code=trust_remote_code, revision=revision),
    )
    tokenizer = load_tokenizer(instruct_path, trust_remote_code=trust_remote_code, revision=revision)
    if chat_template is not None:  # e.g. a base model paired with itself: its files carry no template
        from probes.chat import read_chat_template

        tokenizer.chat_template = read_chat_template(chat_template)
    try:
        base_tokenizer = load_tokenizer(base_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError):  # some base repos ship no tokenizer; the instruct one is used anyway
        base_tokenizer = None
    if base_tokenizer is not None:
        diffs = compare_tokenizers(base_tokenizer, tokenizer)
        if diffs:
            warnings.warn(
                f"base and instruct tokenizers differ in {len(diffs)} ordinary tokens (e.g. {diffs[0]}); "
                "both models are fed the instruct tokenizer's ids",
                stacklevel=2,
            )
    device = str(device or default_device()) if device_map is None else "auto"
    load_device = "cpu" if offload else (None if device_map is not None else device)
    common = dict(tokenizer=tokenizer, device=load_device, dtype=dtype, device_map=device_map,
                  trust_remote_code=trust_remote_code, revision=revision)
    if _same_source(base_path, instruct_path):
        # One model in both roles (a smoke test, a single-model analysis): loaded once, never two copies.
        warnings.warn(f"base and instruct are the same model ({base_src!r}): loaded once and used for both, so "
                      "every base/instruct difference is zero", stacklevel=2)
        shared = load_model(base_path, **common)
        models = {"base": shared, "instruct": shared}
    else:
        models = {which: load_model(path, **common) for which, path in (("base", base_path),
                                                                        ("instruct", instruct_path))}
    return ModelPair(
        base=models["base"], instruct=models["instruct"], tokenizer=tokenizer, name=name, device=device,
        dtype=dtype or torch.float32, offload=offload, base_tokenizer=base_tokenizer,
        sources={"base": base_src, "instruct": instruct_src},
        resolved={"base": base_path, "instruct": instruct_path},
    )
