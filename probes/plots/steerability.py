"""Figures of per-prompt steerability: pure builders, `Steerability.as_dict()` results in, Figure out."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

ABLATE = "ablate"


def _label(c: float) -> str:
    return f"{c:+g}"


def change_distributions(sets: Mapping[str, Mapping[str, Any]], *, title: str = "") -> go.Figure:
    """Violins of every prompt's refusal-score change, one violin per coefficient (and one for ablation), one
    trace per prompt set (`{name: Steerability.as_dict()}`, e.g. `RefusalSteerability.as_dict()`), grouped.

    Coefficients are multiples of the direction's raw norm, on a categorical axis in increasing order with the
    ablation first; each trace's hover shows its wrong-way fraction per category.
    """
    if not sets:
        raise ValueError("no prompt sets to plot")
    coeffs = sorted({float(c) for s in sets.values() for c in s["coeffs"]})
    order = ([ABLATE] if any(s.get("ablation") is not None for s in sets.values()) else []) + [_label(c) for c in coeffs]
    fig = go.Figure()
    for name, s in sets.items():
        xs, ys, wrong = [], [], []
        if s.get("ablation") is not None:
            xs += [ABLATE] * len(s["ablation"])
            ys += list(s["ablation"])
            wrong += [s["wrong_way"]["ablated"]] * len(s["ablation"])
        for c, row, w in zip(s["coeffs"], s["changes"], s["wrong_way"]["added"]):
            xs += [_label(float(c))] * len(row)
            ys += list(row)
            wrong += [w] * len(row)
        fig.add_trace(go.Violin(x=xs, y=ys, name=f"{name} (n={s['n']})", box_visible=True, meanline_visible=True,
                                points="all", pointpos=0, jitter=0.3, scalemode="width", customdata=wrong,
                                hovertemplate="%{x}: change %{y:.2f}<br>wrong way in this group: %{customdata:.0%}"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    first = next(iter(sets.values()))
    fig.update_layout(
        violinmode="group",
        title=title or f"per-prompt refusal-score change, {first.get('model', '')} layer {first.get('layer', '')}",
        xaxis=dict(title="coefficient (x raw difference) / ablation", type="category", categoryorder="array",
                   categoryarray=order),
        yaxis_title="change in refusal score (log-odds)")
    return fig


def slope_distributions(sets: Mapping[str, Mapping[str, Any]], *, title: str = "") -> go.Figure:
    """Tan et al.'s per-prompt steerability: a violin of slopes per prompt set, the anti-steerable fraction (slope
    < 0) in each trace's name."""
    if not sets:
        raise ValueError("no prompt sets to plot")
    fig = go.Figure()
    for name, s in sets.items():
        fig.add_trace(go.Violin(y=list(s["slopes"]), name=f"{name}: {s['wrong_way']['slope']:.0%} anti-steerable",
                                box_visible=True, meanline_visible=True, points="all"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title or "per-prompt steerability (slope of refusal score vs coefficient)",
                      yaxis_title="slope (log-odds per raw difference)", showlegend=False)
    return fig
