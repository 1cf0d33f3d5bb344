"""Figures of the refusal-direction method: pure builders, data in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.plots import _arr, heatmap_trace, layer_ticks


def sweep_heatmaps(bypass, induce, kl, *, layers: Sequence[int], offsets: Sequence[int],
                   chosen: tuple[int, int] | None = None, title: str = "") -> go.Figure:
    """Layer x post-instruction position heatmaps of bypass score, induce score and first-token KL (`[layer, pos]`),
    each with its own colour bar and every cell's value written in it.

    Scores are refusal log-odds (diverging, centred on 0); KL is sequential. `chosen` = (layer, offset) is framed,
    so its number stays readable. Layers with no scored candidate at all (all NaN: resid_pre of block 0, the embedding,
    whose harmful - harmless mean is not a direction of the model's own; layers a sweep left unscored past the
    layer cut-off) are left out and named in a note.
    """
    arrays = [_arr(z) for z in (bypass, induce, kl)]
    keep = [i for i in range(len(layers)) if any(np.isfinite(a[i]).any() for a in arrays)]
    dropped = [layers[i] for i in range(len(layers)) if i not in keep]
    x = [str(o) for o in offsets]
    y = [str(layers[i]) for i in keep]
    panels = ["bypass score (harmful val, ablated)", "induce score (harmless val, added)",
              "KL first token (harmless val, ablated)"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=panels, shared_yaxes=True, horizontal_spacing=0.1)
    bars = ["refusal score", "refusal score", "KL (nats)"]
    for col, (a, div) in enumerate(zip(arrays, (True, True, False)), start=1):
        a = a[keep]
        text = [[f"{v:.2f}" if np.isfinite(v) else "n/a" for v in row] for row in a]
        trace = heatmap_trace(a, x=x, y=y, diverging=div, text=text, colorbar=bars[col - 1])
        domain = fig.layout[f"xaxis{col if col > 1 else ''}"].domain
        trace.colorbar.update(x=domain[1] + 0.005, xanchor="left", len=0.9, thickness=12)
        fig.add_trace(trace, row=1, col=col)
        if chosen is not None and str(chosen[0]) in y and str(chosen[1]) in x:
            xi, yi = x.index(str(chosen[1])), y.index(str(chosen[0]))
            for colour, width in (("black", 5), ("white", 2)):  # visible on dark and light cells alike
                fig.add_shape(type="rect", x0=xi - 0.5, x1=xi + 0.5, y0=yi - 0.5, y1=yi + 0.5, row=1, col=col,
                              line=dict(color=colour, width=width), fillcolor="rgba(0,0,0,0)")
        fig.update_xaxes(title_text="post-instruction offset", type="category", row=1, col=col)
    fig.update_yaxes(title_text="layer (resid_pre)", type="category", row=1, col=1)
    notes = []
    if chosen is not None:
        notes.append(f"framed: the chosen direction (layer {chosen[0]}, offset {chosen[1]})")
    if dropped:
        why = " (resid_pre of block 0 is the token embedding)" if dropped == [0] else ""
        notes.append(f"layer{'s' if len(dropped) > 1 else ''} {', '.join(map(str, dropped))}: no candidate scored{why}")
    if any(not np.isfinite(a[keep]).all() for a in arrays):
        notes.append("n/a: not scored (left out by a screened sweep, or no direction)")
    fig.update_layout(title=dict(text=(title or "refusal direction candidates")
                                 + (f"<br><sup>{'; '.join(notes)}</sup>" if notes else "")),
                      margin=dict(t=110), height=max(420, 70 * len(keep) + 220))
    return fig


def cosine_per_layer(cosines: dict[str, object], *, layers: Sequence[int], title: str = "") -> go.Figure:
    """Cosine similarity per layer, one line per series (e.g. base vs instruct direction at each position)."""
    fig = go.Figure()
    for name, values in cosines.items():
        fig.add_trace(go.Scatter(x=list(layers), y=_arr(values).tolist(), mode="lines+markers", name=name))
    fig.update_layout(title=title or "cosine of the base and instruct refusal directions", xaxis_title="layer",
                      yaxis_title="cosine", yaxis_range=[-1.05, 1.05])
    layer_ticks(fig, list(layers))
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
