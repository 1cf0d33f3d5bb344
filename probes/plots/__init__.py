"""Pure figure builders: data in, `plotly.graph_objects.Figure` out. One module per analysis.

Conventions: layers on y, tokens or heads on x, token text shown; diverging colour scale centred on 0 for
differences; base and instruct side by side on one shared scale, or as a difference; titles name the model,
the data and the metric.
"""
from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

DIVERGING = "RdBu_r"
SEQUENTIAL = "Viridis"


# Control characters as their Unicode "control pictures" (\n -> ␊), so whitespace tokens are visible.
_CONTROL = {chr(c): chr(0x2400 + c) for c in range(32)} | {"\x7f": "\u2421"}
_SPECIAL = re.compile(r"^<\|?([^<>|]{1,40})\|?>$")


def token_text(token: str, *, special: bool | None = None, max_len: int | None = None) -> str:
    """A token as a figure shows it, safe inside plotly's HTML-like labels: special tokens as ⟨name⟩
    (`<|im_start|>` -> ⟨im_start⟩, `<bos>` -> ⟨bos⟩), control characters as control pictures (␊, ␉), spaces
    as ·, an empty token as ∅, cut to `max_len` characters with …, and HTML-escaped.

    special: whether it is a special token (None: guess from the `<...>` / `<|...|>` shape).
    """
    m = _SPECIAL.match(token)
    if m and special is not False:
        text = f"⟨{m[1]}⟩"
    else:
        text = "".join(_CONTROL.get(c, c) for c in token).replace(" ", "·") or "∅"
    if max_len is not None and len(text) > max_len:
        text = text[: max_len - 1] + "…"
    return html.escape(text, quote=False)


def layer_ticks(fig: go.Figure, layers: Sequence[int], *, axis: str = "x", **selector) -> None:
    """Whole-number ticks on a numeric layer axis (never 0.5), every layer when there are few."""
    n = len(layers)
    step = 1 if n <= 16 else max(1, round(n / 12))
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    update(tickmode="linear", tick0=min(layers) if n else 0, dtick=step, **selector)


def log_ticks(vmax: float) -> list[float]:
    """Tick values 1, 2, 5, 10, 20, 50, ... up to `vmax` for a log axis (plotly's own minor labels read '2'
    for 20)."""
    out, base = [], 1.0
    while base <= max(vmax, 1.0) * 10:
        out += [base, 2 * base, 5 * base]
        base *= 10
    return [v for v in out if v <= max(vmax, 1.0) * 2]


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
    _integer_ticks(fig, x, y, _arr(z).shape)
    return fig


def _integer_ticks(fig: go.Figure, x: Sequence | None, y: Sequence | None, shape: tuple[int, ...]) -> None:
    """Whole-number ticks on axes whose values are integers (layers, positions): never a tick at 0.5."""
    for axis, values, n in (("x", x, shape[-1]), ("y", y, shape[0])):
        vals = list(range(n)) if values is None else list(values)
        if vals and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
            layer_ticks(fig, [int(v) for v in vals], axis=axis)


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
        kw |= dict(text=text, texttemplate="%{text}", textfont=dict(size=10))
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
    _integer_ticks(fig, x, y, next(iter(arrays.values())).shape)
    fig.update_yaxes(title_text=yaxis, row=1, col=1)
    fig.update_layout(title=title)
    return fig
