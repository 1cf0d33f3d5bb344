"""Figures of the refusal-KL frontier search: pure builders, data in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import plotly.graph_objects as go

# One colour per variant, in order (plain ablation first, norm-preserving second by convention).
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def _hover(t: Mapping[str, Any]) -> str:
    a = t.get("abliteration", {})
    idx = a.get("direction_index")
    parts = [f"trial {t.get('number')}", f"refusals {t['refusals']}", f"KL {t['kl']:.4g}",
             f"scope {a.get('scope')}" + (f", index {idx:.2f}" if idx is not None else "")]
    for comp, k in a.get("kernels", {}).items():
        parts.append(f"{comp}: max {k['max_weight']:.2f} @ {k['max_weight_position']:.2f}, min {k['min_weight']:.2f}, "
                     f"dist {k['min_weight_distance']:.2f}")
    return "<br>".join(parts)


def frontier_scatter(variants: Mapping[str, Mapping[str, Any]], arditi: Mapping[str, Mapping[str, Any]] | None = None,
                     *, title: str = "", log_kl: bool = True) -> go.Figure:
    """Every trial as a point (refusals on harmful val, mean first-token KL on harmless val), each variant's Pareto
    front as a staircase through its front points, and the Arditi points as stars.

    variants: `{label: Frontier.as_dict()}` (e.g. "plain", "norm-preserving"), one colour each; arditi:
    `{label: Measurement.as_dict()}`, coloured as the variant of the same label (black otherwise). Each variant's
    un-ablated refusal count is a dotted vertical line. KL is on a log axis when every KL shown is > 0.
    """
    if not variants:
        raise ValueError("no search results to plot")
    arditi = dict(arditi or {})
    fig = go.Figure()
    kls: list[float] = []
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(variants)}
    n_harmful = None
    for label, res in variants.items():
        trials = res["trials"]
        kls += [t["kl"] for t in trials]
        n_harmful = n_harmful or (trials[0]["n_harmful"] if trials else None)
        fig.add_trace(go.Scatter(x=[t["refusals"] for t in trials], y=[t["kl"] for t in trials], mode="markers",
                                 name=f"{label}: trials ({len(trials)})", text=[_hover(t) for t in trials],
                                 hoverinfo="text", marker=dict(color=colour[label], size=7, opacity=0.45)))
        front = [trials[i] for i in res["front"]]
        fig.add_trace(go.Scatter(x=[t["refusals"] for t in front], y=[t["kl"] for t in front], mode="lines+markers",
                                 line_shape="hv", name=f"{label}: Pareto front ({len(front)})",
                                 text=[_hover(t) for t in front], hoverinfo="text",
                                 line=dict(color=colour[label], width=2),
                                 marker=dict(color=colour[label], size=9, line=dict(color="black", width=1))))
        base = res.get("baseline")
        if base is not None:
            fig.add_vline(x=base["refusals"], line_dash="dot", line_color=colour[label], opacity=0.6)
    for label, p in arditi.items():
        kls.append(p["kl"])
        fig.add_trace(go.Scatter(x=[p["refusals"]], y=[p["kl"]], mode="markers", name=f"Arditi: {label}",
                                 text=[f"Arditi direction, weight 1 at every write ({label})<br>refusals "
                                       f"{p['refusals']}, KL {p['kl']:.4g}"], hoverinfo="text",
                                 marker=dict(symbol="star", size=16, color=colour.get(label, "black"),
                                             line=dict(color="black", width=1.5))))
    log = log_kl and bool(kls) and min(kls) > 0
    of = f" of {n_harmful}" if n_harmful else ""
    fig.update_layout(title=title or "refusal vs KL: abliteration trials, Pareto fronts and the Arditi direction",
                      xaxis_title=f"refusals on harmful val{of} (dotted: un-ablated)",
                      yaxis_title="mean first-token KL on harmless val (nats)", legend=dict(itemsizing="constant"))
    fig.update_yaxes(type="log" if log else "linear")
    return fig
