"""Figures of the refusal-direction method: pure builders, data in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.plots import _arr, heatmap_trace


def sweep_heatmaps(bypass, induce, kl, *, layers: Sequence[int], offsets: Sequence[int],
                   chosen: tuple[int, int] | None = None, title: str = "") -> go.Figure:
    """Layer x post-instruction position heatmaps of bypass score, induce score and first-token KL (`[layer, pos]`).

    Scores are refusal log-odds (diverging, centred on 0); KL is sequential. `chosen` = (layer, offset) is circled.
    """
    x = [str(o) for o in offsets]
    y = [str(layer) for layer in layers]
    fig = make_subplots(rows=1, cols=3, subplot_titles=["bypass score (harmful val, ablated)",
                                                        "induce score (harmless val, added)",
                                                        "KL first token (harmless val, ablated)"],
                        shared_yaxes=True, horizontal_spacing=0.08)
    for col, (z, div) in enumerate(((bypass, True), (induce, True), (kl, False)), start=1):
        a = _arr(z)
        text = [[f"{v:.2f}" if np.isfinite(v) else "" for v in row] for row in a]
        trace = heatmap_trace(a, x=x, y=y, diverging=div, text=text, showscale=False)
        fig.add_trace(trace, row=1, col=col)
        if chosen is not None:
            fig.add_trace(go.Scatter(x=[str(chosen[1])], y=[str(chosen[0])], mode="markers", showlegend=False,
                                     marker=dict(symbol="circle-open", size=22, color="black", line=dict(width=3)),
                                     hoverinfo="skip"), row=1, col=col)
        fig.update_xaxes(title_text="post-instruction offset", type="category", row=1, col=col)
    fig.update_yaxes(title_text="layer (resid_pre)", type="category", row=1, col=1)
    fig.update_layout(title=title or "refusal direction candidates")
    return fig


def cosine_per_layer(cosines: dict[str, object], *, layers: Sequence[int], title: str = "") -> go.Figure:
    """Cosine similarity per layer, one line per series (e.g. base vs instruct direction at each position)."""
    fig = go.Figure()
    for name, values in cosines.items():
        fig.add_trace(go.Scatter(x=list(layers), y=_arr(values).tolist(), mode="lines+markers", name=name))
    fig.update_layout(title=title or "cosine of the base and instruct refusal directions", xaxis_title="layer",
                      yaxis_title="cosine", yaxis_range=[-1.05, 1.05])
    return fig


def score_distributions(groups: dict[str, object], *, title: str = "") -> go.Figure:
    """Violins of refusal scores (log-odds), one per named group (e.g. "harmful baseline", "harmful ablated")."""
    fig = go.Figure()
    for name, values in groups.items():
        fig.add_trace(go.Violin(y=_arr(values).ravel().tolist(), name=name, box_visible=True, points="all",
                                meanline_visible=True))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title or "refusal score before / after intervention",
                      yaxis_title="refusal score: log P(refusal) - log(1 - P(refusal))", showlegend=False)
    return fig


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projection of rows of `x` `[n, d]` on their top-2 principal components: (`[n, 2]` coords, explained ratio)."""
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError("PCA needs a [n >= 2, d] array")
    c = x - x.mean(0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    var = s ** 2
    return c @ vt[:2].T, var[:2] / max(var.sum(), 1e-300)


def pca_projection(activations: dict[str, tuple[object, object]], *, title: str = "") -> go.Figure:
    """2-D PCA of harmful vs harmless activations, one panel per model: {model: (harmful [n, d], harmless [m, d])}.

    Each model's PCA is fitted on its own harmful + harmless rows.
    """
    names = list(activations)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
    for col, name in enumerate(names, start=1):
        harm, less = (_arr(a) for a in activations[name])
        coords, ratio = pca_2d(np.concatenate([harm, less]))
        for label, pts, colour in (("harmful", coords[: len(harm)], "#d62728"),
                                   ("harmless", coords[len(harm):], "#1f77b4")):
            fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="markers", name=label, legendgroup=label,
                                     showlegend=col == 1, marker=dict(color=colour, size=6, opacity=0.7)),
                          row=1, col=col)
        fig.update_xaxes(title_text=f"PC1 ({ratio[0]:.0%})", row=1, col=col)
        fig.update_yaxes(title_text=f"PC2 ({ratio[1]:.0%})", row=1, col=col)
    fig.update_layout(title=title or "harmful vs harmless activations, top-2 principal components")
    return fig
