"""Figures of sparse dictionaries over a base / instruct pair (crosscoders, Latent Scaling, latent
interpretation): pure builders, plain tensors / lists / dicts in, `plotly.graph_objects.Figure` out."""
from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from probes.chat import ROLES
from probes.dictionaries import KINDS
from probes.plots import _arr, token_text
from probes.plots.attention import ROLE_COLOURS

# One colour per latent class (`probes.dictionaries.classify`), shared by every figure here.
KIND_COLOURS: dict[str, str] = {"shared": "#1f77b4", "chat-only": "#d62728", "base-only": "#2ca02c",
                                "other": "#9e9e9e"}
# Marker of each flag of `nu_scatter` (drawn as a ring around the latent's point).
FLAG_SYMBOLS = ("circle-open", "diamond-open", "square-open", "star-open")
EXAMPLE_KEYS = ("value", "set", "prompt_id", "position", "role", "text", "context")


def _vector(name: str, v, n: int | None = None) -> np.ndarray:
    a = _arr(v)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one value per latent ([L]), got shape {a.shape}")
    if n is not None and len(a) != n:
        raise ValueError(f"{name} has {len(a)} values for {n} latents")
    return a


def _check_kinds(kinds: Sequence[str], n: int) -> list[str]:
    kinds = list(kinds)
    if len(kinds) != n:
        raise ValueError(f"{len(kinds)} kinds for {n} latents")
    bad = sorted({k for k in kinds if k not in KIND_COLOURS})
    if bad:
        raise ValueError(f"unknown latent classes {bad}; classes are {KINDS}")
    return kinds


def _ids(latent_ids, n: int) -> list[int]:
    if latent_ids is None:
        return list(range(n))
    ids = [int(i) for i in _vector("latent_ids", latent_ids, n)]
    if len(set(ids)) != len(ids):
        raise ValueError("latent_ids repeat a latent")
    return ids


def nu_scatter(nu_error, nu_recon, kinds: Sequence[str], *, latent_ids=None, delta_norm=None,
               flags: Mapping[str, Any] | None = None, title: str = "") -> go.Figure:
    """Latent Scaling: ν_ε (x) against ν_r (y) of each latent, one colour per class, with the flagged latents
    ringed.

    nu_error, nu_recon: `[L]` (`LatentScaling.nu_error` / `.nu_recon`); kinds: `L` classes out of `KINDS`;
    latent_ids: `[L]` dictionary indices for the hover (default 0..L-1); delta_norm: `[L]` Δ_norm, shown in the
    hover; flags: `{name: [L] bool}`, e.g. `{"complete shrinkage": ls.complete_shrinkage, "latent decoupling":
    ls.latent_decoupling}`, each drawn as rings of its own shape. A latent whose ν is not finite (never active,
    or β_chat = 0) has no point; their number is in the title's note. Dotted lines at ν = 0 (the base model holds
    none of the chat direction) and ν = 1 (as much as the chat model).
    """
    e = _vector("nu_error", nu_error)
    n = len(e)
    r = _vector("nu_recon", nu_recon, n)
    kinds = _check_kinds(kinds, n)
    ids = _ids(latent_ids, n)
    dn = None if delta_norm is None else _vector("delta_norm", delta_norm, n)
    masks = {}
    for name, m in (flags or {}).items():
        a = _vector(f"flag {name!r}", m, n)
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"flag {name!r} must be booleans")
        masks[name] = a.astype(bool)
    if len(masks) > len(FLAG_SYMBOLS):
        raise ValueError(f"at most {len(FLAG_SYMBOLS)} flags, got {len(masks)}")
    shown = np.isfinite(e) & np.isfinite(r)
    if not shown.any():
        raise ValueError("no latent has a finite ν_ε and ν_r (none was active)")

    def hover(i: int) -> str:
        parts = [f"latent {ids[i]} ({kinds[i]})", f"ν_ε {e[i]:.3f}", f"ν_r {r[i]:.3f}"]
        if dn is not None:
            parts.append(f"Δ_norm {dn[i]:.3f}")
        parts += [name for name, m in masks.items() if m[i]]
        return "<br>".join(parts)

    fig = go.Figure()
    for kind in KINDS:
        idx = [i for i in range(n) if shown[i] and kinds[i] == kind]
        if idx:
            fig.add_trace(go.Scatter(x=e[idx], y=r[idx], mode="markers", name=f"{kind} ({len(idx)})",
                                     marker=dict(color=KIND_COLOURS[kind], size=7, opacity=0.75),
                                     customdata=[hover(i) for i in idx],
                                     hovertemplate="%{customdata}<extra></extra>"))
    for symbol, (name, m) in zip(FLAG_SYMBOLS, masks.items()):
        idx = [i for i in range(n) if shown[i] and m[i]]
        if idx:
            fig.add_trace(go.Scatter(x=e[idx], y=r[idx], mode="markers", name=f"{name} ({len(idx)})",
                                     marker=dict(symbol=symbol, size=15, color="black", line=dict(width=1.5)),
                                     customdata=[hover(i) for i in idx],
                                     hovertemplate="%{customdata}<extra></extra>"))
    for v in (0.0, 1.0):
        fig.add_vline(x=v, line_dash="dot", line_color="grey")
        fig.add_hline(y=v, line_dash="dot", line_color="grey")
    hidden = int((~shown).sum())
    notes = [f"{hidden} latent{'s' if hidden != 1 else ''} with no finite ν (never active) not shown"] if hidden else []
    # A latent that barely fires can have a huge ν (a ratio of two tiny β): the axes span the central 98% (and
    # at least -0.25..1.25) so the bulk stays readable; the points outside are counted, and still in the data.
    ranges = []
    for v in (e[shown], r[shown]):
        lo, hi = np.quantile(v, [0.01, 0.99]) if len(v) >= 20 else (v.min(), v.max())
        lo, hi = min(lo, -0.25), max(hi, 1.25)
        pad = 0.05 * (hi - lo)
        ranges.append((lo - pad, hi + pad))
    outside = int(sum(1 for x, y in zip(e[shown], r[shown]) if not (ranges[0][0] <= x <= ranges[0][1]
                                                                     and ranges[1][0] <= y <= ranges[1][1])))
    if outside:
        notes.append(f"{outside} outside the axes' range (zoom out to see them)")
    note = "; ".join(notes)
    fig.update_xaxes(range=list(ranges[0]))
    fig.update_yaxes(range=list(ranges[1]))
    fig.update_layout(
        title=dict(text=(title or f"Latent Scaling of {int(shown.sum())} latents: ν_ε vs ν_r")
                   + (f"<br><sup>{note}</sup>" if note else "")), margin=dict(t=100),
        xaxis_title="ν_ε = β_base / β_chat on the error (high: complete shrinkage)",
        yaxis_title="ν_r = β_base / β_chat on the reconstruction (high: latent decoupling)",
        legend=dict(itemsizing="constant"))
    return fig


def _shares(by_role: np.ndarray) -> np.ndarray:
    total = by_role.sum(1, keepdims=True)
    return np.divide(by_role, total, out=np.zeros_like(by_role), where=total > 0)


def role_mass_bars(by_role, latent_ids: Sequence[int], roles: Sequence[str], *, title: str = "") -> go.Figure:
    """Stacked horizontal bars: each latent's share of its activation mass on each chat-template role.

    by_role: `[n, n_roles]` activation mass (Σ f_j over the tokens of each role), normalised here per latent;
    latent_ids: the `n` latents, drawn top to bottom in this order; roles: the `n_roles` column names, roles of
    `probes.chat.ROLES`, each in its role colour. A latent with no mass at all has an empty bar, named in the note.
    """
    a = _arr(by_role)
    roles = list(roles)
    if a.ndim != 2 or a.shape[1] != len(roles):
        raise ValueError(f"by_role must be [n, {len(roles)} roles], got shape {a.shape}")
    ids = [int(i) for i in latent_ids]
    if len(ids) != a.shape[0] or not ids:
        raise ValueError(f"{len(ids)} latent ids for {a.shape[0]} rows of by_role")
    if len(set(ids)) != len(ids):
        raise ValueError("latent_ids repeat a latent")
    bad = [r for r in roles if r not in ROLES]
    if bad or len(set(roles)) != len(roles):
        raise ValueError(f"roles must be distinct roles of {ROLES}, got {roles}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise ValueError("activation mass must be finite and >= 0")
    share = _shares(a)
    y = [f"latent {i}" for i in ids]
    fig = go.Figure()
    for k, role in enumerate(roles):
        fig.add_trace(go.Bar(y=y, x=share[:, k], orientation="h", name=role, marker_color=ROLE_COLOURS[role],
                             customdata=a[:, k],
                             hovertemplate=f"%{{y}}<br>{role}: %{{x:.1%}} of its mass (%{{customdata:.3g}})"
                                           "<extra></extra>"))
    empty = [ids[i] for i in range(len(ids)) if a[i].sum() <= 0]
    note = f"no activation mass: latent{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}" if empty else ""
    fig.update_layout(barmode="stack", height=max(360, 26 * len(ids) + 200), margin=dict(t=100),
                      title=dict(text=(title or "where each latent fires: share of its activation mass per role")
                                 + (f"<br><sup>{note}</sup>" if note else "")),
                      xaxis=dict(title="share of the latent's activation mass", range=[0, 1.0001], tickformat=".0%"),
                      yaxis=dict(title="latent", autorange="reversed", type="category"),
                      legend=dict(title="role", traceorder="normal"))
    return fig


# top_tokens: characters a cell may hold, and pixels per character of the monospace cell font.
CONTEXT_CHARS = 48
TOKEN_CHARS = 20
CHAR_PX = 8
ROW_PX = 24


def _text_of(piece, token_text_of: Callable[[Any], str] | None) -> str:
    if isinstance(piece, str):
        return piece
    if token_text_of is None:
        raise ValueError(f"example token {piece!r} is not a string: pass token_text_of to turn it into text")
    out = token_text_of(piece)
    if not isinstance(out, str):
        raise ValueError(f"token_text_of({piece!r}) gave {type(out).__name__}, not a string")
    return out


def _context_text(context, token_text_of, max_len: int) -> str:
    """The tokens before the example, each shown as `token_text` shows it, cut at the front (the end, next to
    the token, is what matters) to `max_len` characters."""
    if isinstance(context, str):
        pieces = [context]
    elif isinstance(context, Sequence):
        pieces = [_text_of(p, token_text_of) for p in context]
    else:
        raise ValueError(f"example context must be a string or a sequence of tokens, got {type(context).__name__}")
    text = "".join(token_text(p) for p in pieces)
    # Cut on the unescaped text so an HTML entity is never split, then escape again.
    raw = html.unescape(text)
    if len(raw) > max_len:
        raw = "…" + raw[-(max_len - 1):]
    return html.escape(raw, quote=False)


def top_tokens(examples: Mapping[int, Sequence[Mapping[str, Any]]], token_text_of: Callable[[Any], str] | None = None,
               *, title: str = "") -> go.Figure:
    """A table of each latent's top-activating tokens: one row per example, columns latent, activation, context
    (the tokens before, right-aligned against the token), the token, its role, and where it is (prompt set,
    prompt, position); the token cell is in its role's colour.

    examples: `{latent: [{value, set, prompt_id, position, role, text, context}, ...]}`, rows in the given order
    (latents in dict order, examples as listed); `text` is the token and `context` the tokens before it, each a
    string already, or token ids / tokens that `token_text_of` turns into text (e.g.
    `lambda i: tokenizer.decode([i])`). Tokens are shown as `token_text` shows them (⟨special⟩, ␊, ·), cut to
    `TOKEN_CHARS` / `CONTEXT_CHARS` characters; the hover repeats the row's fields in one place. Drawn as a
    heatmap with cells sized to their text (a browser check sees its data, and no text runs into the next cell).
    """
    if not examples:
        raise ValueError("no latents to show")
    rows: list[tuple[int, Mapping[str, Any]]] = []
    empty = []
    for latent, exs in examples.items():
        if not exs:
            empty.append(int(latent))
        for ex in exs:
            missing = [k for k in EXAMPLE_KEYS if k not in ex]
            if missing:
                raise ValueError(f"latent {latent}: an example lacks {missing}; examples need {EXAMPLE_KEYS}")
            if ex["role"] not in ROLES:
                raise ValueError(f"latent {latent}: unknown role {ex['role']!r}; roles are {ROLES}")
            if not math.isfinite(float(ex["value"])):
                raise ValueError(f"latent {latent}: activation {ex['value']!r} is not finite")
            rows.append((int(latent), ex))
    if not rows:
        raise ValueError("no latent has an example")
    header = ["latent", "activation", "context", "token", "role", "set · prompt · position"]
    cells, hovers, z = [], [], []
    group, last = 0, None
    neutral = len(ROLES)  # z of a plain cell: len(ROLES) and len(ROLES) + 1 alternate by latent
    for latent, ex in rows:
        if last is not None and latent != last:
            group ^= 1
        last = latent
        token = token_text(_text_of(ex["text"], token_text_of), max_len=TOKEN_CHARS)
        context = _context_text(ex["context"], token_text_of, CONTEXT_CHARS)
        where = f"{ex['set']} · {ex['prompt_id']} · {ex['position']}"
        cells.append([str(latent), f"{float(ex['value']):.3g}", context, token, ex["role"], where])
        hovers.append(f"latent {latent}: activation {float(ex['value']):.4g}<br>{context}<b>{token}</b><br>"
                      f"role {ex['role']}, set {ex['set']}, prompt {ex['prompt_id']}, position {ex['position']}")
        plain = neutral + group
        z.append([plain, plain, plain, ROLES.index(ex["role"]), plain, plain])
    # Contexts end at the token: right-aligned by no-break spaces in front (the cell font is monospace).
    longest = max(len(html.unescape(row[2])) for row in cells)
    for row in cells:
        row[2] = "\u00a0" * (longest - len(html.unescape(row[2]))) + row[2]
    # Columns as wide as their longest text (in characters) plus a margin: x holds the cell edges.
    widths = [max(len(html.unescape(c)) for c in [h] + [row[j] for row in cells]) + 2 for j, h in enumerate(header)]
    edges = np.concatenate([[0], np.cumsum(widths)]).astype(float)
    centres = (edges[:-1] + edges[1:]) / 2
    # Discrete colour scale: one band per role (lightened, so black text reads on it), then the two plain shades.
    colours = [_lighten(ROLE_COLOURS[r]) for r in ROLES] + ["#ffffff", "#eef1f5"]
    nb = len(colours)
    scale = []
    for k, c in enumerate(colours):
        scale += [[k / nb, c], [(k + 1) / nb, c]]
    n = len(rows)
    fig = go.Figure(go.Heatmap(
        z=z, x=edges, y=list(range(n)), text=cells, texttemplate="%{text}", zmin=-0.5, zmax=nb - 0.5,
        colorscale=scale, showscale=False, xgap=1, ygap=1,
        textfont=dict(family="monospace", size=12, color="#111"),
        customdata=[[h] * len(header) for h in hovers], hovertemplate="%{customdata}<extra></extra>"))
    used = [r for r in ROLES if any(ex["role"] == r for _, ex in rows)]
    legend = "  ".join(f"<span style='color:{ROLE_COLOURS[r]}'>■ {r}</span>" for r in used)
    notes = [f"token cell colour = role: {legend}"]
    if empty:
        notes.append(f"no example: latent{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}")
    width_px = int(CHAR_PX * edges[-1]) + 120
    fig.update_layout(
        title=dict(text=(title or f"top-activating tokens of {len(examples)} latents")
                   + "".join(f"<br><sup>{n_}</sup>" for n_ in notes), x=0, xref="paper", y=1, yref="container",
                   yanchor="top", pad=dict(t=44)),
        margin=dict(t=96 + 18 * len(notes), l=40, r=40, b=40),
        width=max(width_px, 700), height=ROW_PX * n + 150 + 18 * len(notes),
        xaxis=dict(side="top", tickmode="array", tickvals=centres.tolist(), ticktext=header, showgrid=False,
                   zeroline=False, range=[0, float(edges[-1])], fixedrange=True, title=None),
        yaxis=dict(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False, fixedrange=True,
                   title=None))
    return fig


def _lighten(hex_colour: str, amount: float = 0.55) -> str:
    """`hex_colour` mixed with white (`amount` of white)."""
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


def kl_recovery_bars(recovery: Mapping[str, float], control: Sequence[float] | None = None, *,
                     gap: float | None = None, title: str = "") -> go.Figure:
    """Bars of the share of the KL gap that each latent set recovers, beside the random-latent control.

    recovery: `{set name: fraction of the gap recovered}` (e.g. `{"chat-only": 0.6, "shared": 0.2, "all latents":
    0.9}`), bars in dict order, a set named after a latent class in its class colour; control: the recovery of
    each random latent set (a box with every point, its mean dashed across the figure); gap: the KL gap itself
    (nats), named in the title. 0 (nothing recovered) and 100 % (the whole gap) are drawn as lines.
    """
    if not recovery:
        raise ValueError("no latent sets to plot")
    names, vals = [str(k) for k in recovery], [float(v) for v in recovery.values()]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"recovery values must be finite, got {dict(zip(names, vals))}")
    fig = go.Figure(go.Bar(x=names, y=vals, name="latent sets", showlegend=False,
                           marker_color=[KIND_COLOURS.get(n, "#8c564b") for n in names],
                           text=[f"{v:.0%}" for v in vals], textposition="outside",
                           hovertemplate="%{x}: %{y:.1%} of the KL gap recovered<extra></extra>"))
    values = list(vals)
    note = ""
    if control is not None:
        c = [float(v) for v in control]
        if not c or not all(math.isfinite(v) for v in c):
            raise ValueError("control must be a non-empty list of finite recoveries")
        label = f"random latents (n={len(c)})"
        mean = float(np.mean(c))
        fig.add_trace(go.Box(x=[label] * len(c), y=c, name=label, boxpoints="all", jitter=0.4, pointpos=0,
                             marker_color="#7f7f7f", boxmean=True, showlegend=False,
                             hovertemplate="random set: %{y:.1%}<extra></extra>"))
        fig.add_hline(y=mean, line_dash="dash", line_color="#7f7f7f")
        note = f"grey: {len(c)} random latent sets, mean {mean:.1%} (dashed)"
        values += c
    fig.add_hline(y=0, line_color="#555", line_width=1)
    fig.add_hline(y=1, line_dash="dot", line_color="#555")
    lo, hi = min(0.0, min(values)), max(1.0, max(values))
    pad = 0.12 * (hi - lo)
    head = title or "KL gap recovered by each latent set"
    if gap is not None:
        head += f" (gap {float(gap):.4g} nats)"
    fig.update_layout(title=dict(text=head + (f"<br><sup>{note}</sup>" if note else "")), margin=dict(t=100),
                      xaxis=dict(title="latent set", type="category"),
                      yaxis=dict(title="share of the KL gap recovered", tickformat=".0%", range=[lo - pad, hi + pad]))
    return fig
