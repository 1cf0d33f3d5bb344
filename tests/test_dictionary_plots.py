"""Figures of sparse dictionaries (`probes.plots.dictionaries`) from small synthetic inputs: the data each figure
carries (points per class, shares per role, table cells, bars), bad input, and (where Chromium + Playwright are
present, required when PROBES_REQUIRE_BROWSER=1) each figure written as `Run.save_figure` writes it and rendered
with no problem."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probes.plots.attention import ROLE_COLOURS
from probes.plots.dictionaries import (CONTEXT_CHARS, KIND_COLOURS, TOKEN_CHARS, kl_recovery_bars, nu_scatter,
                                       role_mass_bars, top_tokens)

NAN = float("nan")


def _nu_case():
    nu_e = torch.tensor([0.1, 0.9, NAN, 0.5, 1.1, 0.0, 0.7])
    nu_r = torch.tensor([0.2, 0.3, NAN, 0.6, 1.0, NAN, 0.8])
    kinds = ["chat-only", "chat-only", "chat-only", "shared", "base-only", "other", "chat-only"]
    ids = [10, 11, 12, 13, 14, 15, 16]
    dn = torch.tensor([0.95, 0.97, 0.99, 0.5, 0.05, 0.3, 0.92])
    flags = {"complete shrinkage": torch.tensor([False, True, False, False, False, False, True]),
             "latent decoupling": torch.tensor([False, False, False, False, False, False, True])}
    return nu_e, nu_r, kinds, ids, dn, flags


def _nu_figure():
    nu_e, nu_r, kinds, ids, dn, flags = _nu_case()
    return nu_scatter(nu_e, nu_r, kinds, latent_ids=ids, delta_norm=dn, flags=flags)


def test_nu_scatter_points_by_class_flags_and_left_out_latents():
    fig = _nu_figure()
    by_name = {t.name: t for t in fig.data}
    # Latent 12 (both ν NaN) and 15 (ν_r NaN) have no point; the rest fall in their class.
    assert set(by_name) == {"chat-only (3)", "shared (1)", "base-only (1)", "complete shrinkage (2)",
                            "latent decoupling (1)"}
    chat = by_name["chat-only (3)"]
    assert list(chat.x) == pytest.approx([0.1, 0.9, 0.7]) and list(chat.y) == pytest.approx([0.2, 0.3, 0.8])
    assert chat.marker.color == KIND_COLOURS["chat-only"] and by_name["shared (1)"].marker.color == "#1f77b4"
    assert by_name["base-only (1)"].marker.color == KIND_COLOURS["base-only"]
    assert list(by_name["base-only (1)"].x) == pytest.approx([1.1])
    shrink = by_name["complete shrinkage (2)"]
    assert list(shrink.x) == pytest.approx([0.9, 0.7]) and shrink.marker.symbol == "circle-open"
    assert by_name["latent decoupling (1)"].marker.symbol == "diamond-open"
    # The hover names the latent id, its class, Δ_norm and its flags.
    assert chat.customdata[1] == "latent 11 (chat-only)<br>ν_ε 0.900<br>ν_r 0.300<br>Δ_norm 0.970<br>complete shrinkage"
    assert "latent decoupling" in chat.customdata[2] and "complete shrinkage" in chat.customdata[2]
    assert all(t.hovertemplate == "%{customdata}<extra></extra>" for t in fig.data)
    assert "2 latents with no finite ν (never active) not shown" in fig.layout.title.text
    assert fig.layout.xaxis.title.text.startswith("ν_ε") and fig.layout.yaxis.title.text.startswith("ν_r")


def test_nu_scatter_defaults_and_bad_input():
    fig = nu_scatter([0.2, 0.4], [0.1, 0.3], ["shared", "shared"])
    (trace,) = fig.data
    assert trace.customdata[0] == "latent 0 (shared)<br>ν_ε 0.200<br>ν_r 0.100" and "not shown" not in fig.layout.title.text
    with pytest.raises(ValueError, match="2 values for 3"):
        nu_scatter([0.1, 0.2, 0.3], [0.1, 0.2], ["shared"] * 3)
    with pytest.raises(ValueError, match="unknown latent classes"):
        nu_scatter([0.1], [0.2], ["chat_only"])
    with pytest.raises(ValueError, match="kinds for"):
        nu_scatter([0.1, 0.2], [0.2, 0.3], ["shared"])
    with pytest.raises(ValueError, match="latent_ids"):
        nu_scatter([0.1, 0.2], [0.2, 0.3], ["shared"] * 2, latent_ids=[1])
    with pytest.raises(ValueError, match="delta_norm"):
        nu_scatter([0.1, 0.2], [0.2, 0.3], ["shared"] * 2, delta_norm=[0.5])
    with pytest.raises(ValueError, match="flag"):
        nu_scatter([0.1, 0.2], [0.2, 0.3], ["shared"] * 2, flags={"x": [True]})
    with pytest.raises(ValueError, match="none was active"):
        nu_scatter([NAN], [NAN], ["chat-only"])


ROLES_SHOWN = ["system", "template", "user", "post_instruction"]


def _mass():
    return torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 4.5]])


def test_role_mass_bars_shares_colours_and_order():
    fig = role_mass_bars(_mass(), [7, 3, 9, 1], ROLES_SHOWN)
    assert [t.name for t in fig.data] == ROLES_SHOWN and fig.layout.barmode == "stack"
    assert [t.marker.color for t in fig.data] == [ROLE_COLOURS[r] for r in ROLES_SHOWN]
    shares = np.array([list(t.x) for t in fig.data]).T  # [latent, role]
    expected = np.array([[0, 0.25, 0.75, 0], [0.25] * 4, [0, 0, 0, 0], [0, 0, 0.1, 0.9]])
    np.testing.assert_allclose(shares, expected, rtol=0, atol=1e-12)
    assert list(fig.data[0].y) == ["latent 7", "latent 3", "latent 9", "latent 1"]
    assert fig.layout.yaxis.autorange == "reversed"  # the first latent on top
    assert list(fig.data[3].customdata) == pytest.approx([0.0, 2.0, 0.0, 4.5])  # raw mass in the hover
    assert "post_instruction: %{x:.1%}" in fig.data[3].hovertemplate
    assert "no activation mass: latent 9" in fig.layout.title.text


def test_role_mass_bars_bad_input():
    with pytest.raises(ValueError, match="by_role must be"):
        role_mass_bars(_mass(), [7, 3, 9, 1], ROLES_SHOWN[:3])
    with pytest.raises(ValueError, match="3 latent ids for 4"):
        role_mass_bars(_mass(), [7, 3, 9], ROLES_SHOWN)
    with pytest.raises(ValueError, match="roles must be"):
        role_mass_bars(_mass(), [7, 3, 9, 1], ["system", "template", "user", "assistant"])
    with pytest.raises(ValueError, match=">= 0"):
        role_mass_bars(-_mass(), [7, 3, 9, 1], ROLES_SHOWN)


def _examples():
    long_context = ["<|im_start|>", "user", "\n"] + ["word "] * 30
    return {
        5: [dict(value=3.25, set="harmful", prompt_id=2, position=17, role="post_instruction", text="<|im_end|>",
                 context=["How", " do", " I"]),
            dict(value=2.5, set="harmless", prompt_id=0, position=4, role="user", text=" bake",
                 context=long_context)],
        8: [dict(value=1.125, set="harmful", prompt_id=1, position=3, role="template", text=101,
                 context=[100, 102])],
        9: [],
    }


def _vocab(i: int) -> str:
    return {100: "<bos>", 101: "\n", 102: "user"}[i]


def test_top_tokens_cells_roles_and_truncation():
    fig = top_tokens(_examples(), _vocab)
    (hm,) = fig.data
    cells = [list(r) for r in hm.text]
    pad = "\u00a0"  # contexts are right-aligned to the longest one (CONTEXT_CHARS here)
    assert cells[0] == ["5", "3.25", pad * (CONTEXT_CHARS - 8) + "How·do·I", "⟨im_end⟩", "post_instruction",
                        "harmful · 2 · 17"]
    assert cells[2] == ["8", "1.12", pad * (CONTEXT_CHARS - 9) + "⟨bos⟩user", "␊", "template", "harmful · 1 · 3"]
    # The long context keeps its end (next to the token), cut to CONTEXT_CHARS with a leading ellipsis.
    ctx = cells[1][2]
    assert len(ctx) == CONTEXT_CHARS and ctx.startswith("…") and ctx.endswith("word·" * 3)
    assert cells[1][3] == "·bake"
    # Token cells take their role's band of the discrete colour scale; the others a plain shade.
    from probes.chat import ROLES
    z = np.array(hm.z)
    assert [int(v) for v in z[:, 3]] == [ROLES.index("post_instruction"), ROLES.index("user"), ROLES.index("template")]
    plain = set(z[:, [0, 1, 2, 4, 5]].ravel().tolist())
    assert plain <= {len(ROLES), len(ROLES) + 1} and z[0, 0] == z[1, 0] != z[2, 0]  # shade alternates by latent
    # Every column is wider than its longest text, so no text runs into the next cell.
    edges = np.array(hm.x)
    widths = np.diff(edges)
    import html
    for j in range(6):
        assert widths[j] >= max(len(html.unescape(r[j])) for r in cells) + 1
    assert "no example: latent 9" in fig.layout.title.text and "top-activating tokens of 3 latents" in fig.layout.title.text
    assert "latent 5: activation 3.25" in hm.customdata[0][0] and hm.hovertemplate == "%{customdata}<extra></extra>"


def test_top_tokens_long_token_is_cut_and_bad_input():
    ex = {1: [dict(value=1.0, set="s", prompt_id=0, position=0, role="response", text="x" * 60, context="abc")]}
    fig = top_tokens(ex)
    assert fig.data[0].text[0][3] == "x" * (TOKEN_CHARS - 1) + "…"
    assert fig.data[0].text[0][2] == "abc"  # the only context: no padding
    with pytest.raises(ValueError, match="token_text_of"):
        top_tokens({1: [dict(ex[1][0], text=5)]})
    with pytest.raises(ValueError, match="unknown role"):
        top_tokens({1: [dict(ex[1][0], role="assistant")]})
    with pytest.raises(ValueError, match="lacks"):
        top_tokens({1: [{k: v for k, v in ex[1][0].items() if k != "position"}]})
    with pytest.raises(ValueError, match="no latent has an example"):
        top_tokens({1: []})
    with pytest.raises(ValueError, match="no latents"):
        top_tokens({})


RECOVERY = {"chat-only": 0.62, "shared": 0.18, "all latents": 0.91}
CONTROL = [0.05, 0.1, -0.02, 0.07]


def test_kl_recovery_bars_values_control_and_gap():
    fig = kl_recovery_bars(RECOVERY, CONTROL, gap=0.0123)
    bar, box = fig.data
    assert list(bar.x) == list(RECOVERY) and list(bar.y) == pytest.approx(list(RECOVERY.values()))
    assert list(bar.marker.color)[:2] == [KIND_COLOURS["chat-only"], KIND_COLOURS["shared"]]
    assert list(bar.text) == ["62%", "18%", "91%"]
    assert list(box.y) == pytest.approx(CONTROL) and set(box.x) == {"random latents (n=4)"} and box.boxpoints == "all"
    mean = sum(CONTROL) / len(CONTROL)
    dashed = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(dashed) == 1 and dashed[0].y0 == pytest.approx(mean)
    assert "gap 0.0123 nats" in fig.layout.title.text and f"mean {mean:.1%}" in fig.layout.title.text
    lo, hi = fig.layout.yaxis.range
    assert lo < -0.02 and hi > 1.0
    assert "%{y:.1%}" in bar.hovertemplate and "%{y:.1%}" in box.hovertemplate


def test_kl_recovery_bars_without_control_and_bad_input():
    fig = kl_recovery_bars({"chat-only": 0.4})
    assert len(fig.data) == 1 and "nats" not in fig.layout.title.text
    with pytest.raises(ValueError, match="no latent sets"):
        kl_recovery_bars({})
    with pytest.raises(ValueError, match="finite"):
        kl_recovery_bars({"chat-only": math.nan})
    with pytest.raises(ValueError, match="control"):
        kl_recovery_bars(RECOVERY, [])




def test_every_dictionary_figure_renders(tmp_path, browser):
    from probes.browser import render
    from probes.runs import FIGURE_CONFIG

    many = {i: [dict(e, value=e["value"] / (k + 1)) for k, e in enumerate(_examples()[5] * 4)] for i in range(6)}
    figures = {
        "nu_scatter": _nu_figure(),
        "role_mass": role_mass_bars(_mass(), [7, 3, 9, 1], ROLES_SHOWN),
        "role_mass_many": role_mass_bars(torch.rand(60, 7), list(range(100, 160)),
                                         ["pad", "bos", "system", "template", "user", "post_instruction", "response"]),
        "top_tokens": top_tokens(_examples(), _vocab),
        "top_tokens_many": top_tokens(many),
        "kl_recovery": kl_recovery_bars(RECOVERY, CONTROL, gap=0.0123),
        "kl_recovery_no_control": kl_recovery_bars({"chat-only": 1.3, "shared": -0.2}),
    }
    paths = []
    for name, fig in figures.items():
        paths.append(tmp_path / f"{name}.html")
        fig.write_html(str(paths[-1]), include_plotlyjs=True, full_html=True, config=FIGURE_CONFIG)
    results = render(paths)
    bad = {r.path.name: r.problems for r in results if r.problems}
    assert not bad, bad
    assert all(r.plots[0]["with_data"] >= 1 for r in results)
