"""Directions in the residual stream: difference of means, the Direction type with its provenance, and the
interventions along a direction (ablation, addition, affine ablation, weight orthogonalisation).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from probes.activations import Activations
from probes.files import atomic_path


def diff_of_means(a: Activations | torch.Tensor, b: Activations | torch.Tensor, hook: str | None = None) -> torch.Tensor:
    """mean(a) - mean(b) in float64.

    Activations give `[layer, position, d_model]` from their streamed float64 sums; raw tensors
    `[n, ...]` are averaged over their first dimension. Both sides must have the same labels.
    """
    if isinstance(a, Activations) and isinstance(b, Activations):
        if (a.layers, a.positions) != (b.layers, b.positions):
            raise ValueError("the two sets were recorded at different layers or positions")
        if a.count == 0 or b.count == 0:
            raise ValueError("difference of means of an empty set")
        return a.mean(hook) - b.mean(hook)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.shape[0] == 0 or b.shape[0] == 0:
            raise ValueError("difference of means of an empty set")
        return a.double().mean(0) - b.double().mean(0)
    raise TypeError("pass two Activations or two tensors")


@dataclass
class Direction:
    """A unit vector `[d_model]` (float32) with the raw mean difference it came from (float64) and provenance."""

    vector: torch.Tensor
    raw: torch.Tensor
    model: str = ""
    hook: str = "resid_pre"
    layer: int = 0
    position: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_raw(cls, raw: torch.Tensor, **provenance: Any) -> Direction:
        raw = raw.double()
        norm = raw.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("cannot make a direction from a zero or non-finite vector")
        return cls(vector=(raw / norm).float(), raw=raw, **provenance)

    @property
    def norm(self) -> float:
        return float(self.raw.norm())

    def provenance(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("vector"), d.pop("raw")
        return d

    def save(self, path: str | os.PathLike, key: str = "direction") -> Path:
        """One safetensors file: `key` (the unit vector), `key/raw` and the provenance as metadata `key`."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_path(path) as tmp:
            save_file({key: self.vector.contiguous(), f"{key}/raw": self.raw.contiguous()}, str(tmp),
                      metadata={key: json.dumps(self.provenance())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, key: str | None = None) -> Direction:
        """Read a direction written by `save` or by the refusal experiment (`directions.safetensors`: `chosen`,
        `base/chosen`), checking it: a finite unit vector `[d_model]`, parallel to its raw difference.

        key: default `"direction"` or `"chosen"`, whichever the file holds. Errors name the file (`InvalidFileError`).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise InvalidFileError(f"{path}: no such direction file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, names = f.metadata() or {}, set(f.keys())
                if key is None:
                    key = next((k for k in ("direction", "chosen") if k in names), None)
                    if key is None:
                        raise InvalidFileError(f"{path}: no 'direction' or 'chosen' in the file; name one of its "
                                               f"directions with key= (tensors: {sorted(names)})")
                vec_name = key if key in names else f"{key}/vector"  # `key/vector`: files of earlier versions
                if vec_name not in names or f"{key}/raw" not in names or key not in meta:
                    raise InvalidFileError(f"{path}: no direction {key!r} (needs tensors {key!r} and {key + '/raw'!r} "
                                           f"and metadata {key!r}; tensors: {sorted(names)})")
                vector, raw, prov = f.get_tensor(vec_name), f.get_tensor(f"{key}/raw"), json.loads(meta[key])
        except SafetensorError as exc:
            raise InvalidFileError(f"{path}: not a safetensors file ({exc})") from None
        if vector.ndim != 1 or raw.shape != vector.shape:
            raise InvalidFileError(f"{path}: {key!r} has shape {tuple(vector.shape)}, raw {tuple(raw.shape)}: expected "
                                   "two equal 1-D vectors")
        if not (bool(torch.isfinite(vector).all()) and bool(torch.isfinite(raw).all())):
            raise InvalidFileError(f"{path}: {key!r} has non-finite entries")
        if abs(float(vector.double().norm()) - 1) > 1e-4:
            raise InvalidFileError(f"{path}: {key!r} is not a unit vector (norm {float(vector.norm()):.6g})")
        if float(raw.norm()) == 0 or float(cosine(vector, raw)) < 1 - 1e-6:
            raise InvalidFileError(f"{path}: {key!r} is not the direction of its raw difference")
        if not isinstance(prov.get("layer"), int) or prov["layer"] < 0:
            raise InvalidFileError(f"{path}: {key!r} has no valid layer in its provenance ({prov.get('layer')!r})")
        return cls(vector=vector, raw=raw, **{k: prov[k] for k in ("model", "hook", "layer", "position", "data")
                                             if k in prov})


class InvalidFileError(ValueError):
    """A saved file whose contents disagree with its metadata (or are not what the loader reads); names the file."""


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension, in float64."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


# ------------------------------------------------------------------------------------------------------------------
# Interventions along a direction (Arditi et al. 2024; affine variant after Marshall et al. 2024).
#
# Every intervention is a list of `(hook_name, fn)` pairs for `model.hooks(fwd_hooks=...)`, with a context manager
# around it. Hook functions act at every position they see, so under KV-cached generation they also act on each
# generated token as it is processed.

Hook = tuple[str, Any]


def unit(direction: Direction | torch.Tensor) -> torch.Tensor:
    """The unit vector `[d_model]` (float64) of a Direction or a raw tensor; ValueError on zero / NaN / wrong rank."""
    v = direction.raw if isinstance(direction, Direction) else direction
    if not isinstance(v, torch.Tensor) or v.ndim != 1:
        raise ValueError("a direction is a Direction or a 1-D tensor [d_model]")
    v = v.detach().double().cpu()
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("cannot use a zero or non-finite direction")
    return v / norm


def project_out(x: torch.Tensor, r_hat: torch.Tensor, weight: float = 1.0, *,
                norm_preserving: bool = False) -> torch.Tensor:
    """`x - w (x . r̂) r̂` along the last dimension (w = `weight`, 1: the whole component); `r_hat` must be unit.
    Computed in float32 at least.

    norm_preserving: each vector is then rescaled to its norm before the edit, `||x||`, so only its direction
    changes (with w = 1 it stays orthogonal to r̂). A vector the edit leaves at zero, or at rounding level (under
    64 eps ||x||: x parallel to r̂ with w = 1, a zero pad embedding), becomes zero: its remainder is rounding noise,
    whose direction rescaling would blow up to full norm.
    """
    dt = torch.promote_types(x.dtype, torch.float32)
    r = r_hat.to(device=x.device, dtype=dt)
    xf = x.to(dt)
    y = xf - float(weight) * (xf @ r)[..., None] * r
    if norm_preserving:
        old, new = xf.norm(dim=-1, keepdim=True), y.norm(dim=-1, keepdim=True)
        keep = new > 64 * torch.finfo(dt).eps * old
        y = torch.where(keep, y * (old / new.clamp_min(torch.finfo(dt).tiny)), torch.zeros_like(y))
    return y.to(x.dtype)


def residual_write_hooks(model: Any) -> list[str]:
    """Names of the hooks whose outputs are ADDED to the residual stream: the embedding (and a learned positional
    embedding where the model has one), and every block's attention and MLP output.

    For Gemma-2-style blocks the bridge's `hook_attn_out` / `hook_mlp_out` are after the post-norms, i.e. exactly
    what is added to the residual; `tests/test_directions.py` checks on every test architecture that ablating these
    writes leaves nothing along r̂ in any residual.
    """
    names = ["hook_embed"]
    if getattr(model.cfg, "positional_embedding_type", None) == "standard":
        names.append("hook_pos_embed")
    for layer in range(int(model.cfg.n_layers)):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"the model has no hooks {missing[:3]}...: cannot find its residual writes")
    return names


def ablation_hooks(model: Any, direction: Direction | torch.Tensor, *, norm_preserving: bool = False) -> list[Hook]:
    """Directional ablation: remove the component along r̂ from every residual write, at every position.

    Equivalent to projecting r̂ out of every `resid_pre`, `resid_mid` and `resid_post`, and to `orthogonalize`-d
    weights (for architectures whose writes are linear maps, see there). norm_preserving: each write keeps its
    norm (`project_out`); the residuals then no longer are projections of the unedited ones.
    """
    return weighted_ablation_hooks(model, {name: (direction, 1.0) for name in residual_write_hooks(model)},
                                   norm_preserving=norm_preserving)


def weighted_ablation_hooks(model: Any, edits: Mapping[str, tuple[Direction | torch.Tensor, float]], *,
                            norm_preserving: bool = False) -> list[Hook]:
    """Weighted directional ablation at chosen hooks: `x <- x - w (x . r̂) r̂` at every position of each hook named
    in `edits` (`{hook name: (direction, weight)}`, each hook its own direction and weight; w = 1 removes the
    component, 0 leaves the hook alone and is dropped). norm_preserving: see `project_out`.

    Raises ValueError before building anything on an unknown hook name, a non-finite weight or a direction that
    is not `[d_model]`.
    """
    d_model = int(model.cfg.d_model)
    hooks: list[Hook] = []
    for name, (direction, weight) in edits.items():
        if name not in model.hook_dict:
            raise ValueError(f"the model has no hook {name!r}")
        weight = float(weight)
        if not torch.isfinite(torch.tensor(weight)):
            raise ValueError(f"non-finite ablation weight {weight} at {name}")
        r_hat = unit(direction)
        if r_hat.shape[0] != d_model:
            raise ValueError(f"direction at {name} has {r_hat.shape[0]} dims, the model {d_model}")
        if weight == 0:
            continue

        def fn(act: torch.Tensor, hook: Any, r_hat: torch.Tensor = r_hat, weight: float = weight) -> torch.Tensor:
            return project_out(act, r_hat, weight, norm_preserving=norm_preserving)

        hooks.append((name, fn))
    return hooks


def _check_layer(model: Any, layer: int) -> None:
    n = int(model.cfg.n_layers)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} out of range for a {n}-layer model")


def addition_hooks(model: Any, vector: Direction | torch.Tensor, layer: int, coeff: float = 1.0) -> list[Hook]:
    """Activation addition: `resid_pre[layer] += coeff * vector` at every position.

    A Direction adds its raw (un-normalised) mean difference; a tensor is added as given, `[d_model]`.
    """
    _check_layer(model, layer)
    v = vector.raw if isinstance(vector, Direction) else vector
    if not isinstance(v, torch.Tensor) or v.shape != (int(model.cfg.d_model),):
        raise ValueError(f"the added vector must be [d_model={model.cfg.d_model}]")
    if not bool(torch.isfinite(v).all()):
        raise ValueError("the added vector has NaN or infinite entries")
    v = v.detach().double().cpu() * float(coeff)

    def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return act + v.to(device=act.device, dtype=act.dtype)

    return [(f"blocks.{layer}.hook_resid_pre", fn)]


def affine_hooks(model: Any, direction: Direction | torch.Tensor, reference: float | Sequence[float] | torch.Tensor,
                 layers: int | Sequence[int] | None = None) -> list[Hook]:
    """Affine ablation (Marshall et al. 2024, affine concept editing): at `resid_pre` of each of `layers` (default:
    all), set the projection on r̂ to a reference value instead of zero: `x - (x . r̂ - c_l) r̂`.

    reference: the projection `c_l` to impose — one float for all layers, one per layer in `layers`, or a
    `[len(layers), d_model]` tensor of reference activations (e.g. the harmless means), whose projections are used.
    """
    r_hat = unit(direction)
    n = int(model.cfg.n_layers)
    layers = list(range(n)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    for layer in layers:
        _check_layer(model, layer)
    ref = torch.as_tensor(reference, dtype=torch.float64)
    if ref.ndim == 2:
        if ref.shape != (len(layers), r_hat.shape[0]):
            raise ValueError(f"reference activations must be [{len(layers)}, {r_hat.shape[0]}], got {tuple(ref.shape)}")
        ref = ref @ r_hat
    elif ref.ndim == 0:
        ref = ref.expand(len(layers))
    elif ref.shape != (len(layers),):
        raise ValueError(f"one reference projection per layer ({len(layers)}), got {tuple(ref.shape)}")
    if not bool(torch.isfinite(ref).all()):
        raise ValueError("non-finite reference projection")

    def make(c: float):
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            return (project_out(act, r_hat).to(torch.promote_types(act.dtype, torch.float32))
                    + c * r_hat.to(device=act.device, dtype=torch.promote_types(act.dtype, torch.float32))).to(act.dtype)
        return fn

    return [(f"blocks.{layer}.hook_resid_pre", make(float(c))) for layer, c in zip(layers, ref.tolist())]


def recorded_ablation_hooks(model: Any, direction: Direction) -> list[Hook]:
    """The ablation a saved direction was chosen under (`direction.data["ablation"]`, written by the refusal
    experiment): directional (the default, also for directions saved without it) or affine, with the layers and
    reference projections it was selected with."""
    spec = direction.data.get("ablation") or {"method": "directional"}
    if spec.get("method") == "directional":
        return ablation_hooks(model, direction)
    if spec.get("method") == "affine":
        return affine_hooks(model, direction, spec["reference"], spec["layers"])
    raise ValueError(f"direction has an unknown ablation method {spec.get('method')!r}")


@contextlib.contextmanager
def intervene(model: Any, hooks: Sequence[Hook]) -> Iterator[Any]:
    """Run `model` with the hook list active (an empty list is a no-op)."""
    with model.hooks(fwd_hooks=list(hooks)):
        yield model


def ablate(model: Any, direction: Direction | torch.Tensor) -> contextlib.AbstractContextManager:
    """`with ablate(model, r):` — directional ablation of r̂ from every residual write."""
    return intervene(model, ablation_hooks(model, direction))


def add(model: Any, vector: Direction | torch.Tensor, layer: int, coeff: float = 1.0) -> contextlib.AbstractContextManager:
    """`with add(model, v, layer, coeff):` — activation addition at `resid_pre` of `layer`."""
    return intervene(model, addition_hooks(model, vector, layer, coeff))


def affine_ablate(model: Any, direction: Direction | torch.Tensor, reference: Any,
                  layers: int | Sequence[int] | None = None) -> contextlib.AbstractContextManager:
    """`with affine_ablate(model, r, reference, layers):` — see `affine_hooks`."""
    return intervene(model, affine_hooks(model, direction, reference, layers))


# ------------------------------------------------------------------------------------------------------------------
# Weight orthogonalisation: the same ablation written into the weights (a model that needs no hooks).

def _hf(model: Any) -> Any:
    return getattr(model, "original_model", model)


def _inner(module: Any) -> Any:
    """The HF module inside a bridge wrapper (TransformerBridge wraps HF submodules in place)."""
    while hasattr(module, "_original_component"):
        module = module._original_component
    return module


def _hf_modules(hf_model: Any) -> dict[str, Any]:
    """HF module names -> the HF modules, with bridge wrappers (`._original_component`) seen through."""
    named: dict[str, Any] = {}
    for name, mod in hf_model.named_modules():  # pre-order: a wrapper comes before its original, which wins
        named[name.replace("._original_component", "").replace("_original_component.", "")] = mod
    return named


def residual_writers(hf_model: Any) -> list[tuple[str, Any, str]]:
    """`(name, module, kind)` of every module whose output is added to the residual stream of an HF causal LM.

    kind: `"embedding"` (weight `[vocab, d]`), `"linear"` (`nn.Linear`, weight `[d, in]`), `"conv1d"` (GPT-2 `Conv1D`,
    weight `[in, d]`). Supported: Llama-style decoders (`self_attn.o_proj`, `mlp.down_proj`: Llama, Qwen2, Mistral,
    Gemma-1, ...) and GPT-2. Raises NotImplementedError for blocks with normalisation AFTER the attention / MLP
    output (Gemma-2/3, OLMo-2: `post_feedforward_layernorm`): a norm of an orthogonalised output is not orthogonal
    to r̂, so no weight edit equals the hook ablation there — use `ablate` (hooks) on those models.
    """
    hf_model = _hf(hf_model)
    named = _hf_modules(hf_model)
    layers_name = next((n for n in ("model.layers", "transformer.h") if n in named), None)
    if layers_name is None:
        raise NotImplementedError(f"{type(hf_model).__name__}: cannot find the decoder layers to orthogonalise")
    emb_name = next((n for n in ("model.embed_tokens", "transformer.wte") if n in named), None)
    if emb_name is None:
        raise NotImplementedError(f"{type(hf_model).__name__}: cannot find the token embedding")
    out: list[tuple[str, Any, str]] = [(emb_name, named[emb_name], "embedding")]
    if "transformer.wpe" in named:  # GPT-2's learned positions are a residual write too
        out.append(("transformer.wpe", named["transformer.wpe"], "embedding"))
    n_layers = sum(1 for n in named if n.startswith(layers_name + ".") and n[len(layers_name) + 1:].isdigit())
    for i in range(n_layers):
        if hasattr(named[f"{layers_name}.{i}"], "post_feedforward_layernorm"):
            raise NotImplementedError(
                f"{type(hf_model).__name__} normalises the attention / MLP outputs before adding them to the residual "
                "(post-norms): weight orthogonalisation cannot equal directional ablation there; use hooks (ablate)")
        for part, cands in (("attention output", ("self_attn.o_proj", "attn.c_proj")),
                            ("MLP output", ("mlp.down_proj", "mlp.c_proj"))):
            name = next((f"{layers_name}.{i}.{c}" for c in cands if f"{layers_name}.{i}.{c}" in named), None)
            if name is None:
                raise NotImplementedError(f"{type(hf_model).__name__}: no {part} projection found in layer {i}")
            mod = named[name]
            kind = "linear" if isinstance(mod, torch.nn.Linear) else "conv1d" if type(mod).__name__ == "Conv1D" else None
            if kind is None:
                raise NotImplementedError(f"{name} is a {type(mod).__name__}, not a Linear or Conv1D")
            out.append((name, mod, kind))
    return out


def untie_embeddings(hf_model: Any) -> bool:
    """Give the unembedding its own copy of the weights if it shares them with the embedding; True if it did."""
    hf_model = _hf(hf_model)
    out_emb, in_emb = _inner(hf_model.get_output_embeddings()), _inner(hf_model.get_input_embeddings())
    if out_emb is None or out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
        return False
    out_emb.weight = torch.nn.Parameter(out_emb.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (hf_model.config, getattr(hf_model.config, "get_text_config", lambda: None)())
                if c is not None}.values():
        cfg.tie_word_embeddings = False
    if hasattr(hf_model, "_tied_weights_keys"):
        hf_model._tied_weights_keys = {} if isinstance(hf_model._tied_weights_keys, dict) else []
    return True


@torch.no_grad()
def orthogonalize(model: Any, direction: Direction | torch.Tensor) -> Any:
    """Edit the weights in place so that no residual write has a component along r̂ (Arditi et al. 2024, eq. 5).

    `model`: an HF causal LM or a bridge (its `original_model` is edited, so the bridge sees the edit). Embedding
    rows, `W_O` of attention and `W_out` of the MLP (and their biases) lose their r̂ component; tied embeddings are
    untied first so the unembedding keeps the original weights. Equal to `ablate` with hooks for the architectures
    `residual_writers` supports (tested on Llama, Qwen2, GPT-2); raises NotImplementedError elsewhere. Returns the HF
    model.
    """
    hf_model = _hf(model)
    writers = residual_writers(hf_model)  # raises before any edit for unsupported architectures
    r_hat = unit(direction)
    if r_hat.shape[0] != writers[0][1].weight.shape[1]:
        raise ValueError(f"direction has {r_hat.shape[0]} dims, the model {writers[0][1].weight.shape[1]}")
    untie_embeddings(hf_model)
    for _, mod, kind in writers:
        w = mod.weight
        r = r_hat.to(device=w.device)
        wd = w.double()
        if kind == "linear":  # [d, in]: project the output side
            new = wd - torch.outer(r, r @ wd)
        else:  # embedding [vocab, d] and Conv1D [in, d]: the model dimension is last
            new = wd - torch.outer(wd @ r, r)
        w.copy_(new.to(w.dtype))
        bias = getattr(mod, "bias", None)
        if kind != "embedding" and bias is not None:
            bd = bias.double()
            bias.copy_((bd - (bd @ r) * r).to(bias.dtype))
    return hf_model


def _unwrap(module: Any) -> Any:
    """Replace every bridge wrapper below `module` by the HF module it wraps (on a copy: this is destructive)."""
    for name, child in list(module.named_children()):
        inner = _inner(child)
        if inner is not child:
            setattr(module, name, inner)
        _unwrap(inner)
    return module


def save_orthogonalized(model: Any, direction: Direction | torch.Tensor, out: str | os.PathLike,
                        tokenizer: Any = None, *, gguf: str | None = None) -> Path:
    """Orthogonalise a COPY of `model` (HF model or bridge) and `save_pretrained` it (plus `tokenizer`) to `out`.

    The folder loads in plain transformers (`AutoModelForCausalLM.from_pretrained(out)`), untied if it was tied.
    A bridge's HF model is copied and stripped of its wrappers first (memory: one extra copy of the weights).
    gguf: also write `<out>.gguf` (beside the folder: transformers reading a GGUF from a folder that holds
    tokenizer files loses its chat template) for llama.cpp / Ollama in this dtype ("f32", "f16", "q8_0"; see
    `probes.gguf.write_gguf`, which raises GGUFError for architectures or tokenizers it cannot write).
    """
    import copy

    hf_model = _unwrap(copy.deepcopy(_hf(model)))
    orthogonalize(hf_model, direction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if gguf is not None:
        from probes.gguf import write_gguf

        write_gguf(hf_model, tokenizer, out.with_name(out.name + ".gguf"), dtype=gguf)
    return out
