"""Every figure of the main job, as a reader sees it: rendered in headless Chromium with the network off, no console
error, no empty plot, no label cut off at the edge, no title under the toolbar; each run's index page shows every
figure; a figure copied away alone still draws; a long real-tokenizer prompt stays readable.

Needs Debian's `chromium` and Playwright (`.ci/run` installs both); skipped where they are absent, failing instead
when PROBES_REQUIRE_BROWSER=1 (as in CI).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import tiny
from probes.browser import figure_files, render
from probes.plots import token_text

MAIN_JOB_FIGURES = {
    "refusal_direction": {"sweep", "cosine", "scores", "pca"},
    "logit_lens": {"layer_lines", "layer_lines_harmful", "layer_lines_harmless", "kl_post_instruction",
                   "lens_harmful_0", "lens_harmless_80", "kl_harmful_0", "kl_harmless_80"},
    "activation_diff": {"mean_diff_norm", "mean_diff_layer_cosine", "per_token_kl"},
    "template_attention": {"mass_post_instruction_harmful", "mass_post_instruction_harmless",
                           "shift_harmful_minus_harmless_base", "shift_harmful_minus_harmless_instruct",
                           "region_bars", "patching", "attention_viewer"},
    "refusal_geometry": {"harmfulness_vs_refusal", "harmfulness_steering", "cosmic_scores", "steerability",
                         "steerability_slopes", "frontier", "cone_effects", "repind", "cone_training"},
    "model_diff": {"nu_scatter", "role_mass", "top_tokens", "kl_recovery"},
}




@pytest.fixture(scope="module")
def main_job(tmp_path_factory, browser):
    """`probes run all` on the toy pair, as the README runs it."""
    from probes import cli

    out = tmp_path_factory.mktemp("main_job")
    assert cli.main(["run", "all", "--out", str(out)]) == 0
    return out


def test_token_text_shows_special_and_whitespace_tokens():
    assert token_text("<|im_start|>") == "⟨im_start⟩" and token_text("<bos>") == "⟨bos⟩"
    assert token_text("\n") == "␊" and token_text("\t\n") == "␉␊" and token_text(" how") == "·how"
    assert token_text("") == "∅" and token_text("<b>", special=False) == "&lt;b&gt;"
    assert token_text("a&b") == "a&amp;b" and token_text("abcdefghij", max_len=5) == "abcd…"


def test_every_figure_of_the_main_job_renders(main_job):
    files = figure_files([main_job])
    found = {(f.parent.name, f.stem) for f in files}
    expected = {(e, f) for e, figs in MAIN_JOB_FIGURES.items() for f in figs}
    assert expected <= found, f"missing figures: {sorted(expected - found)}"
    bad = {f"{r.path.parent.name}/{r.path.name}": r.problems for r in render(files) if r.problems}
    assert not bad, json.dumps(bad, indent=1)


def test_index_pages_show_config_headline_and_every_figure(main_job):
    pages = figure_files([main_job], index=True)
    assert sorted(p.parent.name for p in pages) == sorted(MAIN_JOB_FIGURES)
    for page, res in zip(pages, render(pages)):
        figures = [f for f in figure_files([page.parent])]
        assert len(res.frames) == len(figures), page
        assert not res.problems, (page, res.problems)
        text = page.read_text()
        assert "Headline numbers" in text and '"toy"' in text or "<code>toy</code>" in text
    refusal = (main_job / "refusal_direction" / "index.html").read_text()
    assert "kl_harmless_ablation" in refusal and "refusal_rate" in refusal


def test_a_figure_copied_away_alone_still_draws(main_job, tmp_path):
    alone = tmp_path / "elsewhere" / "sweep.html"
    alone.parent.mkdir()
    shutil.copy(main_job / "refusal_direction" / "sweep.html", alone)
    (res,) = render([alone])
    assert not res.problems and res.plots[0]["with_data"] == 3  # bypass, induce, KL


def test_long_real_prompt_stays_readable(tmp_path, browser):
    """A 50-token Qwen2.5 prompt (real tokenizer, ChatML specials, a newline): the lens heatmap widens with the
    tokens and the attention viewer sizes itself; no label is cut off and special tokens read ⟨im_start⟩."""
    import real_tokenizers as rt

    rt.require_shared()
    from probes.lens import paired_lens
    from probes.pairs import load_pair
    from probes.plots.attention import attention_viewer
    from probes.plots.lens import COLUMN_PX, paired_lens_heatmap

    tok = rt.qwen25_instruct()
    folders = []
    for which, seed in (("base", 0), ("instruct", 1)):
        model = tiny.make_model("qwen2", len(tok), seed=seed, n_layers=2, d_model=32)
        folder = tmp_path / which
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(folder)
    pair = load_pair(*folders, device="cpu")
    prompt = ("Write a short poem about the sea.\nIt should rhyme, mention the moon twice, and end with a question "
              "about why waves never rest.")
    batch = pair.encode([prompt])
    n = batch.seq_len
    assert n >= 50
    lens = paired_lens(pair, batch, positions="all", progress=False)
    fig = paired_lens_heatmap(lens, 0, pair.tokenizer, title="long prompt")
    assert fig.layout.width >= COLUMN_PX * n
    ticks = list(fig.layout.xaxis2.ticktext)
    assert any("⟨im_start⟩" in t for t in ticks) and any("␊" in t for t in ticks)
    gen = torch.Generator().manual_seed(0)
    patterns = {(0, h): torch.softmax(torch.randn(n, n, generator=gen).tril() * 3, -1).tril() for h in range(2)}
    viewer = attention_viewer(patterns, batch.tokens(0), batch.row_roles(0), title="Qwen2.5 prompt")
    paths = []
    for name, f in (("lens", fig), ("viewer", viewer)):
        paths.append(tmp_path / f"{name}.html")
        f.write_html(str(paths[-1]), include_plotlyjs=True)
    for res in render(paths):
        assert not res.problems, (res.path.name, res.problems)
