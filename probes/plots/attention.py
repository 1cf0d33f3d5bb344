"""Figures for attention on chat-template regions (pure builders: arrays in, plotly Figure out)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.plots import DIVERGING, SEQUENTIAL, _arr, heatmap, token_text

# One colour per role, shared by bars and token labels.
ROLE_COLOURS: dict[str, str] = {
    "pad": "#bbbbbb", "bos": "#7f7f7f", "system": "#9467bd", "template": "#1f77b4", "user": "#2ca02c",
    "post_instruction": "#d62728", "response": "#ff7f0e",
}


def _check_2d(name: str, a: np.ndarray) -> None:
    if a.ndim != 2:
        raise ValueError(f"{name} must be [layer, head], got shape {a.shape}")


def mass_heatmaps(base, instruct, *, region: str, layers: Sequence[int] | None = None, data: str = "",
                  query: str = "post_instruction[-1]") -> go.Figure:
    """Base and instruct `[layer, head]` attention mass on `region` (one shared scale) and instruct - base."""
    b, i = _arr(base), _arr(instruct)
    _check_2d("base", b)
    if b.shape != i.shape:
        raise ValueError(f"base {b.shape} and instruct {i.shape} differ in shape")
    y = [str(layer) for layer in (layers if layers is not None else range(b.shape[0]))]
    x = [f"H{h}" for h in range(b.shape[1])]
    d = i - b
    m = float(np.abs(d).max()) or 1.0
    hi = max(float(b.max()), float(i.max()), 1e-9)
    # Wide gaps: the shared scale's colour bar sits between the instruct and difference panels.
    fig = make_subplots(rows=1, cols=3, shared_yaxes=True, horizontal_spacing=0.12,
                        subplot_titles=["base", "instruct", "instruct − base"])
    for col, (z, kw) in enumerate([(b, dict(colorscale=SEQUENTIAL, zmin=0, zmax=hi, showscale=False)),
                                   (i, dict(colorscale=SEQUENTIAL, zmin=0, zmax=hi,
                                            colorbar=dict(title="mass", x=0.655, len=0.9, thickness=14))),
                                   (d, dict(colorscale=DIVERGING, zmin=-m, zmax=m, zmid=0,
                                            colorbar=dict(title="Δ mass", x=1.0, len=0.9, thickness=14)))], start=1):
        fig.add_trace(go.Heatmap(z=z, x=x, y=y, hovertemplate="layer %{y} %{x}: %{z:.3f}<extra></extra>", **kw),
                      row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
    fig.update_yaxes(dtick=1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=f"Attention mass from {query} onto the {region} region, {data} prompts "
                            "(mean over prompts)")
    return fig


def shift_heatmap(delta, *, title: str, layers: Sequence[int] | None = None, sem=None) -> go.Figure:
    """A `[layer, head]` difference (e.g. harmful − harmless) on a diverging scale centred on 0."""
    d = _arr(delta)
    _check_2d("delta", d)
    y = [str(layer) for layer in (layers if layers is not None else range(d.shape[0]))]
    x = [f"H{h}" for h in range(d.shape[1])]
    hover = None
    if sem is not None:
        s = _arr(sem)
        if s.shape != d.shape:
            raise ValueError(f"sem {s.shape} and delta {d.shape} differ in shape")
        hover = [[f"Δ {d[r, c]:+.4f} ± {s[r, c]:.4f} (s.e.)" for c in range(d.shape[1])] for r in range(d.shape[0])]
    return heatmap(d, x=x, y=y, title=title, diverging=True, hover=hover, xaxis="head", colorbar="Δ mass")


def region_bars(per_layer: Mapping[str, object], regions: Sequence[str], *, layers: Sequence[int] | None = None,
                title: str = "") -> go.Figure:
    """Stacked bars per layer of where the query token looks, one panel per `{name: [layer, region]}` entry."""
    if not per_layer:
        raise ValueError("nothing to plot")
    arrays = {k: _arr(v) for k, v in per_layer.items()}
    for k, a in arrays.items():
        if a.ndim != 2 or a.shape[1] != len(regions):
            raise ValueError(f"{k}: expected [layer, {len(regions)}] array, got {a.shape}")
    fig = make_subplots(rows=1, cols=len(arrays), shared_yaxes=True, subplot_titles=list(arrays))
    for col, (name, a) in enumerate(arrays.items(), start=1):
        x = [str(layer) for layer in (layers if layers is not None else range(a.shape[0]))]
        for r, region in enumerate(regions):
            fig.add_trace(go.Bar(x=x, y=a[:, r], name=region, legendgroup=region, showlegend=col == 1,
                                 marker_color=ROLE_COLOURS.get(region),
                                 hovertemplate=f"{name}<br>layer %{{x}}<br>{region}: %{{y:.3f}}<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text="attention mass (head mean)", range=[0, 1.0001], row=1, col=1)
    fig.update_layout(barmode="stack", title=title)
    return fig


def patching_bars(effects: Mapping[str, float], *, title: str, errors: Mapping[str, float] | None = None,
                  control: Sequence[str] = (),
                  control_note: str = "grey hatched: control heads (smallest attention shift)") -> go.Figure:
    """Bars of mean score changes, e.g. `{"top heads": -3.1, "L2H1": -1.2, "control heads": 0.1}`, with ± one
    standard error over prompts (`errors`, same keys) and the `control` bars hatched grey and named as such."""
    if not effects:
        raise ValueError("nothing to plot")
    names, vals = list(effects), [float(v) for v in effects.values()]
    missing = [n for n in control if n not in effects]
    if missing:
        raise ValueError(f"control bars {missing} are not among the effects")
    is_control = [n in set(control) for n in names]
    colours = ["#9e9e9e" if c else "#d62728" if v < 0 else "#1f77b4" for v, c in zip(vals, is_control)]
    err = None
    if errors is not None:
        err = dict(type="data", array=[float(errors.get(n, 0.0)) for n in names], visible=True, color="#333",
                   thickness=1.5, width=6)
    labels = [f"{n}<br><i>(control)</i>" if c else n for n, c in zip(names, is_control)]
    fig = go.Figure(go.Bar(x=labels, y=vals, marker_color=colours, error_y=err,
                           marker_pattern_shape=["/" if c else "" for c in is_control],
                           customdata=[float(errors.get(n, 0.0)) if errors else 0.0 for n in names],
                           hovertemplate="%{x}: %{y:+.3f} ± %{customdata:.3f} (s.e.)<extra></extra>"))
    fig.add_hline(y=0, line_color="#555", line_width=1)
    note = "error bars: ± 1 standard error over prompts" if errors is not None else ""
    if control:
        note += ("; " if note else "") + control_note
    fig.update_layout(title=dict(text=title + (f"<br><sup>{note}</sup>" if note else "")), margin=dict(t=100),
                      yaxis_title="Δ refusal score (patched − clean)", xaxis_title="patched heads")
    return fig


def head_score_heatmaps(panels: Mapping[str, object], *, title: str,
                        colorbar: str = "Δ refusal score") -> go.Figure:
    """`[layer, head]` scores side by side on one diverging scale centred on 0 (e.g. attribution beside true
    patching, or base beside instruct); the hover names the panel, the head and its rank within the panel."""
    if not panels:
        raise ValueError("nothing to plot")
    arrays = {k: _arr(v) for k, v in panels.items()}
    shapes = {a.shape for a in arrays.values()}
    for k, a in arrays.items():
        _check_2d(k, a)
    if len(shapes) != 1:
        raise ValueError(f"panels differ in shape: {sorted(shapes)}")
    m = max(float(np.abs(a).max()) for a in arrays.values()) or 1.0
    fig = make_subplots(rows=1, cols=len(arrays), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=list(arrays))
    for col, (name, a) in enumerate(arrays.items(), start=1):
        order = np.argsort(a.flatten(), kind="stable")  # most negative (carries the most refusal) first
        rank = np.empty(a.size, dtype=int)
        rank[order] = np.arange(1, a.size + 1)
        hover = rank.reshape(a.shape)
        fig.add_trace(go.Heatmap(
            z=a, x=[f"H{h}" for h in range(a.shape[1])], y=[str(layer) for layer in range(a.shape[0])],
            customdata=hover, colorscale=DIVERGING, zmin=-m, zmax=m, zmid=0, showscale=col == len(arrays),
            colorbar=dict(title=colorbar, thickness=14),
            hovertemplate=f"{name}<br>layer %{{y}} %{{x}}: %{{z:+.3f}} (rank %{{customdata}})<extra></extra>"),
            row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
    fig.update_yaxes(dtick=1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=dict(text=title + "<br><sup>negative: the head carries refusal (patched − clean); "
                                              "one colour scale for all panels</sup>"), margin=dict(t=100))
    return fig


def ablation_bars(entries: Sequence[Mapping[str, object]], *, title: str, clean_rate: float | None = None) -> go.Figure:
    """Head ablations in two panels: the mean change in refusal score (± one standard error over prompts) and the
    judged refusal rate. entries: `{name, effect, sem, rate, control}` each; control bars are hatched grey."""
    if not entries:
        raise ValueError("nothing to plot")
    names = [str(e["name"]) for e in entries]
    ctrl = [bool(e.get("control", False)) for e in entries]
    eff = [float(e["effect"]) for e in entries]
    colours = ["#9e9e9e" if c else "#d62728" if v < 0 else "#1f77b4" for v, c in zip(eff, ctrl)]
    pattern = ["/" if c else "" for c in ctrl]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["Δ refusal score (ablated − clean)",
                                                        "judged refusal rate under ablation"])
    fig.add_trace(go.Bar(x=names, y=eff, marker_color=colours, marker_pattern_shape=pattern, showlegend=False,
                         error_y=dict(type="data", array=[float(e.get("sem", 0.0)) for e in entries], visible=True,
                                      color="#333", thickness=1.5, width=6),
                         hovertemplate="%{x}: %{y:+.3f}<extra></extra>"), row=1, col=1)
    rates = [e.get("rate") for e in entries]
    fig.add_trace(go.Bar(x=names, y=[float(r) if r is not None else None for r in rates], marker_color=colours,
                         marker_pattern_shape=pattern, showlegend=False, textposition="outside",
                         text=[f"{float(r):.0%}" if r is not None else "" for r in rates],
                         hovertemplate="%{x}: %{y:.0%} refused<extra></extra>"), row=1, col=2)
    if clean_rate is not None:
        fig.add_hline(y=clean_rate, line_dash="dash", line_color="#555", row=1, col=2,
                      annotation_text=f"no ablation: {clean_rate:.0%}", annotation_position="top left")
    fig.add_hline(y=0, line_color="#555", line_width=1, row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], tickformat=".0%", row=1, col=2)
    fig.update_xaxes(tickangle=-40)
    fig.update_layout(title=dict(text=title + "<br><sup>error bars: ± 1 standard error over prompts; grey hatched: "
                                              "random control heads</sup>"), margin=dict(t=110, b=120))
    return fig


def _token_label(i: int, token: str, role: str) -> str:
    colour = ROLE_COLOURS.get(role, "#000000")
    return f"<span style='color:{colour}'>{i}:{token_text(token, max_len=14)}</span>"


# Pixels per token row / column of the viewer: the figure grows with the prompt, never squeezes it.
CELL_PX = 20


def attention_viewer(patterns: Mapping[tuple[int, int], object], tokens: Sequence[str], roles: Sequence[str], *,
                     title: str = "") -> go.Figure:
    """Query × key heatmap of one prompt for several heads, with a dropdown over `(layer, head)`.

    patterns: `{(layer, head): [query, key]}`; tokens, roles: one per (non-pad) token. Axis labels are the
    tokens coloured by role (special and whitespace tokens shown visibly); the hover shows both tokens, their
    roles and the weight. The figure is sized from the number of tokens and the longest label.
    """
    if not patterns:
        raise ValueError("no patterns to show")
    n = len(tokens)
    if len(roles) != n:
        raise ValueError(f"{len(tokens)} tokens but {len(roles)} roles")
    labels = [_token_label(i, t, r) for i, (t, r) in enumerate(zip(tokens, roles))]
    shown = [token_text(t, max_len=40) for t in tokens]
    hover = [[f"query {q}: {shown[q]} ({roles[q]})<br>key {k}: {shown[k]} ({roles[k]})"
              for k in range(n)] for q in range(n)]
    fig = go.Figure()
    keys = list(patterns)
    for j, key in enumerate(keys):
        a = _arr(patterns[key])
        if a.shape != (n, n):
            raise ValueError(f"pattern {key} has shape {a.shape}, expected ({n}, {n})")
        fig.add_trace(go.Heatmap(z=a, x=list(range(n)), y=list(range(n)), customdata=hover, colorscale=SEQUENTIAL,
                                 zmin=0, zmax=1, visible=j == 0, colorbar=dict(title="weight", thickness=14),
                                 hovertemplate="%{customdata}<br>weight %{z:.3f}<extra></extra>"))
    buttons = [dict(label=f"layer {layer} head {head}", method="update",
                    args=[{"visible": [i == j for i in range(len(keys))]},
                          {"title.text": f"{title} — layer {layer}, head {head}"}])
               for j, (layer, head) in enumerate(keys)]
    legend = "  ".join(f"<span style='color:{c}'>■ {r}</span>" for r, c in ROLE_COLOURS.items() if r in set(roles))
    # Label room: ~7 px a character of the longest "i:token" label (rotated labels need it vertically too).
    longest = max(len(f"{i}:{token_text(t, max_len=14)}") for i, t in enumerate(tokens))
    label_px = 7 * min(longest, 20) + 20
    side = max(300, CELL_PX * n)
    fig.update_layout(
        # The toolbar's row (top), the title below it, the menu and the role legend on their own row, then the
        # plot: nothing overlaps however narrow the figure.
        margin=dict(t=150, l=label_px + 60, b=label_px + 50, r=120),
        title=dict(text=f"{title} — layer {keys[0][0]}, head {keys[0][1]}", x=0, xref="paper", y=1, yref="container",
                   yanchor="top", pad=dict(t=44)),
        updatemenus=[dict(buttons=buttons, direction="down", x=0.0, xanchor="left", y=1.0, yanchor="bottom",
                          pad=dict(b=8))],
        xaxis=dict(title="key", tickangle=-60, tickmode="array", tickvals=list(range(n)), ticktext=labels,
                   constrain="domain", automargin=True),
        yaxis=dict(title="query", autorange="reversed", tickmode="array", tickvals=list(range(n)), ticktext=labels,
                   scaleanchor="x", automargin=True),
        annotations=[dict(text=legend, xref="paper", yref="paper", x=1.0, y=1.0, showarrow=False,
                          xanchor="right", yanchor="bottom", yshift=12)],
        width=side + label_px + 240, height=side + label_px + 230,
    )
    return fig
