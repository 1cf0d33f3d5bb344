"""Figures of refusal cones and representational independence: pure builders, data in, `go.Figure` out."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.plots import layer_ticks


def effect_strips(groups: Mapping[str, Sequence[Mapping[str, float]]], *, baseline: Mapping[str, float],
                  title: str = "") -> go.Figure:
    """Per-direction refusal scores, one box (with every point) per group of directions (e.g. "cone k=2", "cone
    k=3", "random"): harmful prompts with the direction ablated, harmless prompts with it added.

    groups: `{name: [direction_effects result, ...]}`; baseline: `{harmful_score, harmless_score}` of the
    un-intervened model, drawn as dashed lines; 0 (the refusal / compliance boundary) dotted.
    """
    if not groups or any(not v for v in groups.values()):
        raise ValueError("no groups of directions to plot (or an empty group)")
    panels = (("ablated_score", "harmful, direction ablated", "harmful_score"),
              ("added_score", "harmless, direction added", "harmless_score"))
    fig = make_subplots(rows=1, cols=2, subplot_titles=[p[1] for p in panels], shared_yaxes=True)
    colours = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for col, (key, _, base) in enumerate(panels, start=1):
        for i, (name, effects) in enumerate(groups.items()):
            fig.add_trace(go.Box(y=[float(e[key]) for e in effects], name=name, boxpoints="all", jitter=0.4,
                                 marker_color=colours[i % len(colours)], showlegend=col == 1, legendgroup=name),
                          row=1, col=col)
        if base in baseline:
            fig.add_hline(y=float(baseline[base]), line_dash="dash", line_color="black", row=1, col=col,
                          annotation_text="no intervention", annotation_position="top left")
        fig.add_hline(y=0, line_dash="dot", line_color="grey", row=1, col=col)
    fig.update_yaxes(title_text="mean refusal score (log-odds of a refusal first token)", row=1, col=1)
    fig.update_layout(title=title or "refusal scores under each sampled direction vs random directions",
                      boxmode="group")
    return fig


def repind_curves(rep: Any, *, title: str = "") -> go.Figure:
    """Representational independence of two directions a, b: per layer, the mean cos(resid_pre, b) without and
    with a ablated (left), and cos(resid_pre, a) without and with b ablated (right).

    rep: a `probes.cones.RepInd` or its `as_dict()`.
    """
    d = rep.as_dict() if hasattr(rep, "as_dict") else dict(rep)
    a, b = d["names"]
    layers = list(d["layers"])
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True,
                        subplot_titles=[f"cos(x, {b}) with {a} ablated", f"cos(x, {a}) with {b} ablated"])
    for col, (measured, ablated) in enumerate(((b, a), (a, b)), start=1):
        fig.add_trace(go.Scatter(x=layers, y=d[f"cos_{measured}"], mode="lines+markers", name=f"{measured}",
                                 line=dict(color="#1f77b4")), row=1, col=col)
        fig.add_trace(go.Scatter(x=layers, y=d[f"cos_{measured}_ablate_{ablated}"], mode="lines+markers",
                                 name=f"{measured}, {ablated} ablated", line=dict(color="#d62728", dash="dash")),
                      row=1, col=col)
        fig.update_xaxes(title_text="layer (resid_pre)", row=1, col=col)
        layer_ticks(fig, layers, row=1, col=col)
    fig.update_yaxes(title_text="mean cosine, last prompt token", row=1, col=1)
    fig.update_layout(title=title or (f"representational independence of {a} and {b}: cos({a}, {b}) = "
                                      f"{d['cosine']:.3f}, RepInd loss {d['repind_loss']:.3g}"))
    return fig


def loss_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], *, title: str = "") -> go.Figure:
    """Training loss per step, one line per fit (`ConeFit.history`)."""
    if not histories:
        raise ValueError("no training histories")
    fig = go.Figure()
    for name, hist in histories.items():
        fig.add_trace(go.Scatter(x=list(range(len(hist))), y=[float(h["loss"]) for h in hist], mode="lines",
                                 name=name))
    fig.update_layout(title=title or "RDO / cone training loss", xaxis_title="step", yaxis_title="loss")
    return fig
