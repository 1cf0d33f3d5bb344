"""Figures of the logit lens: layer x token heatmaps of the top token, KL between the models, per-layer lines.

Pure builders: `LensResult` / `PairedLens` (and a tokenizer for token text) in, `plotly.graph_objects.Figure` out.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from probes.chat import ROLES
from probes.lens import LensResult, PairedLens
from probes.plots import heatmap_trace, layer_ticks, log_ticks, token_text

ROLE_SHORT = {"pad": "pad", "bos": "bos", "system": "sys", "template": "tmpl", "user": "user",
              "post_instruction": "post", "response": "resp"}


# Pixels per token column and per layer row: long prompts widen the figure (the page scrolls) instead of
# squeezing labels on top of each other.
COLUMN_PX, ROW_PX = 58, 34


def _decode(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each id's text; a piece that is not valid text on its own (a partial UTF-8 byte) as the raw vocabulary
    entry, so no cell shows an empty box."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        out.append(tokenizer.convert_ids_to_tokens(int(i)) if "\ufffd" in text else text)
    return out


def _special(tokenizer: Any, ids: Sequence[int]) -> list[bool]:
    special = set(getattr(tokenizer, "all_special_ids", None) or ()) if tokenizer is not None else set()
    return [int(i) in special for i in ids]


def _labels(tokenizer: Any, ids: Sequence[int], max_len: int) -> list[str]:
    return [token_text(t, special=s or None, max_len=max_len) for t, s in zip(_decode(tokenizer, ids),
                                                                              _special(tokenizer, ids))]


def _x_axis(result: LensResult, row: int, tokenizer: Any) -> tuple[list[int], list[str]]:
    """Tick positions and labels `token<br>role`: positions are indices, so repeated tokens stay separate."""
    toks = _labels(tokenizer, result.token_ids[row].tolist(), 12)
    roles = [ROLE_SHORT[ROLES[r]] for r in result.roles[row].tolist()]
    return list(range(len(toks))), [f"{t}<br><sub>{r}</sub>" for t, r in zip(toks, roles)]


def _size(n_tokens: int, n_layers: int, panels: int = 1) -> dict[str, int]:
    return dict(width=max(900, COLUMN_PX * n_tokens + 220),
                height=max(420, panels * (ROW_PX * n_layers + 60) + 260))


def _cells(result: LensResult, row: int, tokenizer: Any, n_hover: int = 5) -> tuple[np.ndarray, list, list]:
    """(`[layer, k]` top-token probability, top-token text, hover with the top-n and their probabilities)."""
    ids = result.topk_ids[row]  # [layer, k, top_k]
    probs = result.topk_logprobs[row].exp()
    n = min(n_hover, ids.shape[-1])
    text, hover = [], []
    for li in range(ids.shape[0]):
        trow, hrow = [], []
        for p in range(ids.shape[1]):
            top = ids[li, p, :n].tolist()
            trow.append(_labels(tokenizer, top[:1], 9)[0])
            hrow.append("<br>".join(f"{t} {float(q):.3f}" for t, q in zip(_labels(tokenizer, top, 30),
                                                                          probs[li, p, :n])))
        text.append(trow)
        hover.append(hrow)
    return probs[..., 0].numpy(), text, hover


def lens_heatmap(result: LensResult, row: int = 0, tokenizer: Any = None, *, title: str | None = None) -> go.Figure:
    """Layer x token heatmap of one prompt: the lens's top token written in each cell, its probability as colour,
    the top-5 with probabilities in the hover, tokens on x with their roles."""
    z, text, hover = _cells(result, row, tokenizer)
    x, ticks = _x_axis(result, row, tokenizer)
    fig = go.Figure(heatmap_trace(z, x=x, y=result.layers, text=text, hover=hover, colorbar="p(top)", zmin=0,
                                  zmax=1))
    fig.update_layout(title=title or f"logit lens of {result.model} ({result.hook}): top token and its probability",
                      xaxis=dict(tickvals=x, ticktext=ticks, title="token", tickangle=-90),
                      yaxis=dict(title=f"layer ({result.hook})", dtick=1), **_size(len(x), len(result.layers)))
    return fig


def paired_lens_heatmap(paired: PairedLens, row: int = 0, tokenizer: Any = None, *, title: str | None = None) -> go.Figure:
    """Base above instruct, lens heatmaps of one prompt on one probability scale (0..1) and one token axis; the
    figure widens with the prompt (58 px a token) so every cell keeps its text."""
    fig = make_subplots(rows=2, cols=1, subplot_titles=["base", "instruct"], shared_xaxes=True,
                        vertical_spacing=0.07)
    for r, res in enumerate((paired.base, paired.instruct), start=1):
        z, text, hover = _cells(res, row, tokenizer)
        x, ticks = _x_axis(res, row, tokenizer)
        fig.add_trace(heatmap_trace(z, x=x, y=res.layers, text=text, hover=hover, colorbar="p(top)", zmin=0, zmax=1,
                                    showscale=r == 1), row=r, col=1)
        fig.update_xaxes(tickvals=x, ticktext=ticks, tickangle=-90, row=r, col=1)  # labels under the lower panel
        fig.update_yaxes(title_text=f"layer ({paired.base.hook})", dtick=1, row=r, col=1)
    fig.update_xaxes(title_text="token", row=2, col=1)
    fig.update_layout(title=title or f"logit lens, base vs instruct ({paired.base.hook}): top token and probability",
                      **_size(len(x), len(paired.base.layers), panels=2))
    return fig


def kl_heatmap(paired: PairedLens, row: int = 0, tokenizer: Any = None, *, reverse: bool = False,
               title: str | None = None) -> go.Figure:
    """Layer x token KL(instruct ‖ base) of one prompt (KL(base ‖ instruct) with `reverse`), nats; hover shows both
    models' top tokens."""
    z = (paired.kl_base_instruct if reverse else paired.kl_instruct_base)[row].numpy()
    x, ticks = _x_axis(paired.base, row, tokenizer)
    hover = [[f"base {b} / instruct {i}" for b, i in zip(_labels(tokenizer, bl, 30), _labels(tokenizer, il, 30))]
             for bl, il in zip(paired.base.top1[row].tolist(), paired.instruct.top1[row].tolist())]
    name = "KL(base ‖ instruct)" if reverse else "KL(instruct ‖ base)"
    text = [[f"{v:.2f}" for v in r] for r in z.tolist()]
    fig = go.Figure(heatmap_trace(z, x=x, y=paired.layers, hover=hover, text=text, colorbar="nats", zmin=0))
    fig.update_layout(title=title or f"{name} of the logit lens per layer and token ({paired.base.hook})",
                      xaxis=dict(tickvals=x, ticktext=ticks, title="token", tickangle=-90),
                      yaxis=dict(title=f"layer ({paired.base.hook})", dtick=1), **_size(len(x), len(paired.layers)))
    return fig


def layer_lines(paired: PairedLens, position: int = 0, *, target: int = 0, target_name: str | None = None,
                rows: Sequence[int] | None = None, title: str | None = None) -> go.Figure:
    """Per-layer lines at one decoded position, mean over prompts (or `rows`): KL(instruct ‖ base) and each
    model's KL to its final layer; entropy; median rank of target `target` (log scale)."""
    idx = list(range(paired.kl_instruct_base.shape[0])) if rows is None else list(rows)
    if not idx:
        raise ValueError("no prompts to average")
    layers = paired.layers
    panels = ["KL (nats)", "entropy (nats)", f"median rank of {target_name or 'target'} (1 = top)"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=panels, horizontal_spacing=0.08)
    max_rank = 1.0
    fig.add_trace(go.Scatter(x=layers, y=paired.kl_instruct_base[idx, :, position].mean(0).tolist(),
                             name="KL(instruct ‖ base)", line=dict(color="black")), row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=paired.kl_base_instruct[idx, :, position].mean(0).tolist(),
                             name="KL(base ‖ instruct)", line=dict(color="gray", dash="dot")), row=1, col=1)
    for res, colour in ((paired.base, "#1f77b4"), (paired.instruct, "#d62728")):
        which = res.model.rsplit("/", 1)[-1]
        fig.add_trace(go.Scatter(x=layers, y=res.kl_to_final[idx, :, position].mean(0).tolist(),
                                 name=f"{which}: KL(final ‖ layer)", line=dict(color=colour, dash="dash")), row=1, col=1)
        fig.add_trace(go.Scatter(x=layers, y=res.entropy[idx, :, position].mean(0).tolist(), name=f"{which} entropy",
                                 line=dict(color=colour)), row=1, col=2)
        if res.target_rank is not None:
            rank = res.target_rank[idx, :, position, target].double().median(0).values + 1  # 0-based -> 1 = top
            max_rank = max(max_rank, float(rank.max()))
            fig.add_trace(go.Scatter(x=layers, y=rank.tolist(), name=f"{which} median rank",
                                     line=dict(color=colour)), row=1, col=3)
    fig.update_yaxes(type="log", tickmode="array", tickvals=log_ticks(max_rank), title_text="rank (log)", row=1, col=3)
    fig.update_yaxes(title_text="nats", row=1, col=1)
    fig.update_yaxes(title_text="nats", row=1, col=2)
    for c in (1, 2, 3):
        fig.update_xaxes(title_text=f"layer ({paired.base.hook})", row=1, col=c)
        layer_ticks(fig, list(layers), row=1, col=c)
    fig.update_layout(title=title or f"logit lens per layer at {paired.positions[position]}, mean over {len(idx)} prompts")
    return fig


__all__ = ["lens_heatmap", "paired_lens_heatmap", "kl_heatmap", "layer_lines"]
