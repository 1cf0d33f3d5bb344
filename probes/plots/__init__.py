"""Pure figure builders: data in, `plotly.graph_objects.Figure` out. One module per analysis.

Conventions: layers on y, tokens or heads on x, token text shown; diverging colour scale centred on 0 for
differences; base and instruct side by side on one shared scale, or as a difference; titles name the model,
the data and the metric.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"


def _arr(z) -> np.ndarray:
    return np.asarray(z.detach().cpu() if hasattr(z, "detach") else z, dtype=float)


def heatmap(
    z, *, x: Sequence | None = None, y: Sequence | None = None, title: str = "", diverging: bool = False,
    text: Sequence[Sequence[str]] | None = None, hover: Sequence[Sequence[str]] | None = None,
    xaxis: str = "", yaxis: str = "layer", colorbar: str = "", zmin: float | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """One heatmap; `diverging` centres the colour scale on 0 (for differences)."""
    fig = go.Figure(heatmap_trace(z, x=x, y=y, diverging=diverging, text=text, hover=hover, colorbar=colorbar,
                                  zmin=zmin, zmax=zmax))
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title=yaxis)
    if y is None:  # row indices are layers: whole-number ticks only
        fig.update_yaxes(dtick=1)
    return fig


def heatmap_trace(z, *, x=None, y=None, diverging=False, text=None, hover=None, colorbar="", zmin=None, zmax=None,
                  showscale=True) -> go.Heatmap:
    a = _arr(z)
    if diverging and zmin is None and zmax is None:
        m = float(np.nanmax(np.abs(a))) if a.size else 1.0
        zmin, zmax = -(m or 1.0), (m or 1.0)
    kw = dict(z=a, x=list(x) if x is not None else None, y=list(y) if y is not None else None,
              colorscale=DIVERGING if diverging else SEQUENTIAL, zmin=zmin, zmax=zmax, showscale=showscale,
              colorbar=dict(title=colorbar), zmid=0 if diverging else None)
    if text is not None:
        kw |= dict(text=text, texttemplate="%{text}", textfont=dict(size=9))
    if hover is not None:
        kw |= dict(customdata=hover, hovertemplate="%{y} / %{x}<br>%{customdata}<extra></extra>")
    return go.Heatmap(**kw)


def side_by_side(zs: dict[str, object], *, x=None, y=None, title: str = "", diverging: bool = False,
                 xaxis: str = "", yaxis: str = "layer", colorbar: str = "") -> go.Figure:
    """Heatmaps of several models (e.g. base, instruct) on ONE shared colour scale."""
    arrays = {k: _arr(v) for k, v in zs.items()}
    lo = min(float(np.nanmin(a)) for a in arrays.values())
    hi = max(float(np.nanmax(a)) for a in arrays.values())
    if diverging:
        m = max(abs(lo), abs(hi)) or 1.0
        lo, hi = -m, m
    fig = make_subplots(rows=1, cols=len(arrays), subplot_titles=list(arrays), shared_yaxes=True)
    for i, a in enumerate(arrays.values()):
        fig.add_trace(heatmap_trace(a, x=x, y=y, diverging=diverging, zmin=lo, zmax=hi, colorbar=colorbar,
                                    showscale=i == len(arrays) - 1), row=1, col=i + 1)
        fig.update_xaxes(title_text=xaxis, row=1, col=i + 1)
    if y is None:
        fig.update_yaxes(dtick=1)
    fig.update_yaxes(title_text=yaxis, row=1, col=1)
    fig.update_layout(title=title)
    return fig
