"""Figures as a reader sees them: every HTML figure opened in headless Chromium, offline, with its console errors,
whether each plot drew anything, and a PNG screenshot.

Uses Playwright (Python) to drive a Chromium already on the machine (Debian's `chromium`, or `$PROBES_CHROMIUM`);
Playwright's own browser download is never needed. The network is off: any request that leaves the file is
aborted and reported, so a figure that needs the internet (a CDN plotly.js) fails here as it would offline.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Flags for a root, network-less machine: no sandbox (root), no GPU, no background connections to Google.
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")

# Run in the page (or a frame) once plotly has drawn: per plot, its traces with data, the size of its drawing, the
# labels (ticks, titles, annotations) drawn outside the figure (cut off), and whether the title runs under the
# toolbar.
_INSPECT = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => {
  const traces = (gd._fullData || []);
  const sized = v => v != null && (v.length === undefined ? true : v.length > 0);
  const withData = traces.filter(t => t.visible !== false && ['x', 'y', 'z', 'values', 'r']
      .some(k => sized(t[k]))).length;
  const svg = gd.querySelector('.main-svg');
  const box = svg ? svg.getBoundingClientRect() : {left: 0, top: 0, right: 0, bottom: 0, width: 0, height: 0};
  const outside = [];
  gd.querySelectorAll('.xtick text, .ytick text, .g-gtitle text, .g-xtitle text, .g-ytitle text, .annotation-text')
    .forEach(el => {
      const r = el.getBoundingClientRect();
      if (r.width === 0) return;
      if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
        outside.push((el.textContent || '').slice(0, 40));
    });
  const title = gd.querySelector('.g-gtitle text');
  const bar = gd.querySelector('.modebar');
  let underToolbar = false;
  if (title && bar) {
    const a = title.getBoundingClientRect(), b = bar.getBoundingClientRect();
    underToolbar = b.width > 0 && a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom;
  }
  return {traces: traces.length, with_data: withData, width: box.width, height: box.height,
          title: (gd.layout && gd.layout.title && gd.layout.title.text) || '', outside: outside,
          title_under_toolbar: underToolbar};
})"""


class BrowserUnavailable(RuntimeError):
    """No Chromium or no Playwright on this machine."""


@dataclass
class Rendered:
    """What a browser saw of one HTML file."""

    path: Path
    console_errors: list[str] = field(default_factory=list)
    blocked_requests: list[str] = field(default_factory=list)
    plots: list[dict] = field(default_factory=list)
    frames: list[list[dict]] = field(default_factory=list)  # the plots of each iframe (a run's index page)
    screenshot: Path | None = None

    @property
    def problems(self) -> list[str]:
        """Everything wrong with the page; empty when it rendered fully and cleanly."""
        out = [f"console: {e}" for e in self.console_errors]
        out += [f"network request (offline): {u}" for u in self.blocked_requests]
        if not self.plots and not self.frames:
            out.append("no plot on the page")
        for where, plots in [("", self.plots)] + [(f"frame {i}: ", f) for i, f in enumerate(self.frames)]:
            if where and not plots:
                out.append(f"{where}no plot")
            for i, p in enumerate(plots):
                name = f"{where}plot {i} ({p['title'][:50]!r})"
                if not p["with_data"]:
                    out.append(f"{name} has no trace with data")
                if p["width"] < 50 or p["height"] < 50:
                    out.append(f"{name} drew nothing ({p['width']:.0f}x{p['height']:.0f})")
                if p["outside"]:
                    out.append(f"{name}: labels cut off at the figure's edge: {p['outside'][:5]}")
                if p["title_under_toolbar"]:
                    out.append(f"{name}: the title runs under the toolbar")
        return out


def find_chromium() -> str:
    """The Chromium executable: `$PROBES_CHROMIUM`, else the first of chromium / chromium-browser / google-chrome."""
    env = os.environ.get("PROBES_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise BrowserUnavailable("no Chromium found (Debian: apt-get install chromium; or set PROBES_CHROMIUM)")


def render(paths: Sequence[str | os.PathLike], *, screenshots: Sequence[str | os.PathLike] | None = None,
           width: int = 1280, height: int = 800, settle_ms: int = 300) -> list[Rendered]:
    """Open each HTML file offline in headless Chromium (one browser for all); with `screenshots` (one PNG path
    per file), write a screenshot of the full page there."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BrowserUnavailable("Playwright is not installed (pip install playwright)") from exc
    executable = find_chromium()
    if screenshots is not None and len(screenshots) != len(paths):
        raise ValueError(f"{len(screenshots)} screenshot paths for {len(paths)} files")
    out = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True)
        try:
            for i, p in enumerate(paths):
                path = Path(p).resolve()
                res = Rendered(path)
                context = browser.new_context(viewport={"width": width, "height": height})

                def route(r, res=res):
                    if r.request.url.startswith("file://"):
                        r.continue_()
                    else:
                        res.blocked_requests.append(r.request.url)
                        r.abort()

                context.route("**/*", route)
                page = context.new_page()
                page.on("console", lambda m, res=res: res.console_errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e, res=res: res.console_errors.append(str(e)))
                page.goto(path.as_uri(), wait_until="load")
                page.wait_for_timeout(settle_ms)
                res.plots = page.evaluate(_INSPECT)
                frames = page.locator("iframe")
                for j in range(frames.count()):  # lazy frames load once scrolled to
                    frames.nth(j).scroll_into_view_if_needed()
                    handle = frames.nth(j).element_handle()
                    frame = handle.content_frame() if handle is not None else None
                    if frame is None:
                        res.frames.append([])
                        continue
                    frame.wait_for_load_state("load")
                    frame.wait_for_timeout(settle_ms)
                    res.frames.append(frame.evaluate(_INSPECT))
                if screenshots is not None:
                    res.screenshot = Path(screenshots[i])
                    res.screenshot.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(res.screenshot), full_page=True)
                context.close()
                out.append(res)
        finally:
            browser.close()
    return out


def figure_files(runs: Iterable[str | os.PathLike], *, index: bool = False) -> list[Path]:
    """Every figure HTML file of run folders (or of folders holding run folders); with `index`, their index pages
    instead."""
    files: list[Path] = []
    for r in runs:
        r = Path(r)
        found = sorted(r.rglob("*.html")) if r.is_dir() else [r]
        files += [f for f in found if (f.name == "index.html") == index and not f.name.startswith(".")]
    return files


def gallery(runs: Iterable[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """PNG screenshots of every figure of `runs` in `out`, named `<experiment>__<figure>.png`. Raises
    RuntimeError naming each figure that did not render cleanly."""
    files = figure_files(runs)
    if not files:
        raise ValueError(f"no figures (*.html) under {list(map(str, runs))}")
    out = Path(out)
    pngs = [out / f"{f.parent.name}__{f.stem}.png" for f in files]
    rendered = render(files, screenshots=pngs)
    bad = [f"{r.path}: {'; '.join(r.problems)}" for r in rendered if r.problems]
    if bad:
        raise RuntimeError("figures that did not render cleanly:\n" + "\n".join(bad))
    return pngs
