"""Figures of harmfulness vs refusal directions: pure builders, `probes.harmfulness` `as_dict()` results in."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.plots import layer_ticks


def geometry(dirs: Mapping[str, Mapping[str, Any]], separability: Mapping[str, Mapping[str, Any]] | None = None, *,
             title: str = "") -> go.Figure:
    """Per layer, for each model (`{"base": Directions.as_dict(), "instruct": ...}`): the cosine of the
    harmfulness (t_inst) and refusal (t_post-inst) directions, their norms, and with `separability`
    (`{model: Separability.as_dict()}`) the held-out balanced separation along each."""
    if not dirs:
        raise ValueError("no directions to plot")
    cols = 3 if separability else 2
    names = ["cosine(harmfulness, refusal)", "raw norm", "held-out balanced separation"][:cols]
    fig = make_subplots(rows=1, cols=cols, subplot_titles=names, horizontal_spacing=0.08)
    for model, d in dirs.items():
        layers = d["layers"]
        fig.add_trace(go.Scatter(x=layers, y=d["cosine"], mode="lines+markers", name=f"{model}: cosine",
                                 legendgroup=model), row=1, col=1)
        for kind, dash in (("harmfulness", "solid"), ("refusal", "dash")):
            fig.add_trace(go.Scatter(x=layers, y=d[f"norm_{kind}"], mode="lines+markers", line_dash=dash,
                                     name=f"{model}: {kind} norm", legendgroup=model), row=1, col=2)
        if separability and model in separability:
            s = separability[model]
            for kind, dash in (("harmfulness", "solid"), ("refusal", "dash")):
                fig.add_trace(go.Scatter(x=s["layers"], y=s[kind]["balanced"], mode="lines+markers", line_dash=dash,
                                         name=f"{model}: {kind} separation", legendgroup=model), row=1, col=3)
    fig.update_yaxes(range=[-1.05, 1.05], title_text="cosine", row=1, col=1)
    fig.update_yaxes(title_text="norm of harmful - harmless mean", row=1, col=2)
    if cols == 3:
        fig.update_yaxes(range=[0, 1.05], title_text="fraction on the right side", row=1, col=3)
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text="layer (resid_pre)", row=1, col=c)
        layer_ticks(fig, list(next(iter(dirs.values()))["layers"]), row=1, col=c)
    fig.update_layout(title=title or "harmfulness (t_inst) vs refusal (t_post-inst) directions")
    return fig


def steering_effects(steer: Mapping[str, Mapping[str, Any]], *, title: str = "") -> go.Figure:
    """Mean refusal-score change vs coefficient, one line per direction and model (`{model: Steering.as_dict()}`);
    coefficients are multiples of the refusal direction's raw norm at the steered layer."""
    if not steer:
        raise ValueError("no steering results to plot")
    fig = go.Figure()
    for model, s in steer.items():
        for kind, dash in (("harmfulness", "solid"), ("refusal", "dash")):
            fig.add_trace(go.Scatter(x=s["coeffs"], y=s["mean_change"][kind], mode="lines+markers", line_dash=dash,
                                     name=f"{model}: {kind} (layer {s['layer']}, {s['positions']})"))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title or "steering along harmfulness vs refusal directions at the same norm",
                      xaxis_title="coefficient (x refusal direction's raw norm)",
                      yaxis_title="mean change in refusal score (log-odds)")
    return fig
