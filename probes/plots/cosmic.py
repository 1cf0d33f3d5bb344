"""Figures of COSMIC's output-free direction selection: pure builders, data in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from probes.plots import _arr, heatmap_trace

# Marker per choice: symbol, colour, legend name.
_MARKS = {"cosmic": ("star", "#ff7f0e", "COSMIC's choice"), "arditi": ("x-thin-open", "#000000", "Arditi et al.'s choice")}


def score_heatmap(scores, *, layers: Sequence[int], offsets: Sequence[int], cosmic: tuple[int, int] | None = None,
                  arditi: tuple[int, int] | None = None, ablate=None, add=None, kl=None, passed=None,
                  title: str = "") -> go.Figure:
    """COSMIC's score (ablate + add cosine) of every candidate, `[layer, position]`: layers on y, post-instruction
    offsets on x, each cell's value written in it, with COSMIC's choice (a star) and Arditi et al.'s (a cross)
    marked, `(layer, offset)` each.

    ablate, add, kl: the two terms and the first-token KL `[layer, position]`, shown in the hover; passed:
    `[layer, position]` bool: the values of failing cells (layer cut-off, KL, last-position peak rule) are
    written in brackets.
    Layers with no candidate at all (resid_pre of block 0 under a chat template) are left out and named in a note.
    The colour scale is sequential: a score is a sum of two cosines, not a difference.
    """
    z = _arr(scores)
    if z.shape != (len(layers), len(offsets)):
        raise ValueError(f"scores of shape {z.shape} for {len(layers)} layers x {len(offsets)} offsets")
    keep = [i for i in range(len(layers)) if np.isfinite(z[i]).any()]
    dropped = [layers[i] for i in range(len(layers)) if i not in keep]
    ok = np.ones_like(z, dtype=bool) if passed is None else _arr(passed).astype(bool)
    x = [str(o) for o in offsets]
    y = [str(layers[i]) for i in keep]
    text = [[(f"{z[i, j]:.3f}" if ok[i, j] else f"({z[i, j]:.3f})") if np.isfinite(z[i, j]) else "n/a"
             for j in range(len(offsets))] for i in keep]
    parts = {name: _arr(a) for name, a in (("ablate", ablate), ("add", add), ("KL", kl)) if a is not None}
    hover = [[f"score {z[i, j]:.4f}" + "".join(f"<br>{n} {a[i, j]:.4f}" for n, a in parts.items())
              + ("" if ok[i, j] else "<br>filtered out") for j in range(len(offsets))] for i in keep]
    fig = go.Figure(heatmap_trace(z[keep], x=x, y=y, text=text, hover=hover, colorbar="ablate + add"))
    notes = []
    for name, choice in (("cosmic", cosmic), ("arditi", arditi)):
        if choice is None:
            continue
        layer, offset = choice
        if str(layer) not in y or str(offset) not in x:
            raise ValueError(f"{name} choice {choice} is not a scored candidate (layers {y}, offsets {x})")
        symbol, colour, label = _MARKS[name]
        fig.add_trace(go.Scatter(x=[str(offset)], y=[str(layer)], mode="markers", name=label,
                                 marker=dict(symbol=symbol, size=22, color=colour, line=dict(width=2, color=colour)),
                                 hovertemplate=f"{label}: layer {layer}, offset {offset}<extra></extra>"))
        notes.append(f"{label}: layer {layer}, offset {offset}")
    if passed is not None:
        notes.append("(in brackets): filtered out")
    if dropped:
        notes.append(f"layer{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))}: no candidate")
    fig.update_xaxes(title_text="post-instruction offset of the candidate", type="category")
    fig.update_yaxes(title_text="layer of the candidate (resid_pre)", type="category")
    fig.update_layout(title=dict(text=(title or "COSMIC score: cos(ablated harmful, harmless) + cos(added harmless, "
                                       "harmful), val sets") + (f"<br><sup>{'; '.join(notes)}</sup>" if notes else "")),
                      margin=dict(t=110), height=max(420, 70 * len(keep) + 220),
                      legend=dict(orientation="h", y=-0.2))
    return fig
