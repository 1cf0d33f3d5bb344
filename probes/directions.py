"""Directions in the residual stream: difference of means, and the Direction type with its provenance.

The refusal method (ablation / addition hooks, weight orthogonalisation) builds on these.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from probes.activations import Activations


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
        from safetensors.torch import save_file

        path = Path(path)
        save_file({f"{key}/vector": self.vector.contiguous(), f"{key}/raw": self.raw.contiguous()}, str(path),
                  metadata={key: json.dumps(self.provenance())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, key: str = "direction") -> Direction:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[key])
            return cls(vector=f.get_tensor(f"{key}/vector"), raw=f.get_tensor(f"{key}/raw"), **meta)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension, in float64."""
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
