"""Figures of base vs instruct comparisons: mean-difference norm by layer and role, its cosine across layers, and
per-token KL along the response. Pure builders: results in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.compare import MeanDiff, TokenKL
from probes.plots import heatmap


def mean_diff_norm_figure(md: MeanDiff, *, title: str | None = None) -> go.Figure:
    """Layer x group heatmap of ‖mean(instruct) − mean(base)‖ / mean ‖base activation‖, value in each cell;
    absolute norms and token counts in the hover."""
    z = md.relative_norm.T.numpy()  # [layer, group]
    text = [[f"{v:.2f}" for v in row] for row in z]
    hover = [[f"‖diff‖ {float(md.diff_norm[g, li]):.3g}, mean ‖base‖ {float(md.norm_base[g, li]):.3g}, "
              f"{int(md.counts[g])} tokens" for g in range(len(md.groups))] for li in range(len(md.layers))]
    return heatmap(z, x=md.groups, y=md.layers, text=text, hover=hover, colorbar="relative norm", zmin=0,
                   xaxis="token group", yaxis=f"layer ({md.hook})",
                   title=title or f"mean activation difference instruct − base: norm relative to the base activation "
                                  f"norm, by layer and token role ({md.hook})")


def layer_cosine_figure(md: MeanDiff, group: str = "post_instruction[-1]", *, title: str | None = None) -> go.Figure:
    """Layer x layer cosine of the group's mean difference (diverging, centred on 0)."""
    c = md.layer_cosine(group).numpy()
    return heatmap(c, x=md.layers, y=md.layers, diverging=True, zmin=-1, zmax=1, colorbar="cosine",
                   xaxis=f"layer ({md.hook})", yaxis=f"layer ({md.hook})",
                   text=[[f"{v:.2f}" for v in row] for row in c],
                   title=title or f"cosine between layers of the mean difference instruct − base at {group}")


def per_token_kl_figure(tk: TokenKL, groups: dict[str, Sequence[int]] | None = None, *, title: str | None = None,
                        labels: Sequence[str] | None = None) -> go.Figure:
    """Mean KL(instruct ‖ base) (solid) and KL(base ‖ instruct) (dotted) per response position, one pair of lines
    per group of prompts (e.g. harmful / harmless); prompt counts per position in the hover. `labels` names the
    x positions (default 0..n-1)."""
    groups = groups or {"all": list(range(tk.valid.shape[0]))}
    fig = make_subplots(rows=1, cols=1)
    n = tk.valid.shape[1]
    x = list(labels) if labels is not None else list(range(n))
    for k, (name, rows) in enumerate(groups.items()):
        rows = list(rows)
        if not rows:
            continue
        sub = TokenKL(**{f: getattr(tk, f)[rows] for f in ("kl_instruct_base", "kl_base_instruct", "logprob_base",
                                                           "logprob_instruct", "response_ids", "valid")})
        keep = [j for j in range(n) if int(sub.counts[j]) > 0]
        colour = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"][k % 4]
        hover = [f"{int(sub.counts[j])} prompts" for j in keep]
        fig.add_trace(go.Scatter(x=[x[j] for j in keep], y=sub.mean()[keep].tolist(), name=f"{name}: KL(instruct ‖ base)",
                                 line=dict(color=colour), text=hover))
        fig.add_trace(go.Scatter(x=[x[j] for j in keep], y=sub.mean("kl_base_instruct")[keep].tolist(),
                                 name=f"{name}: KL(base ‖ instruct)", line=dict(color=colour, dash="dot"), text=hover))
    fig.update_layout(title=title or "per-token KL between instruct and base along the teacher-forced response",
                      xaxis_title="response position (token predicted)", yaxis_title="KL (nats), mean over prompts")
    return fig
