"""The `index.html` of a run folder: what was run, its headline numbers and every figure, on one page that opens
offline (plain HTML and CSS, no script of its own; each figure is its own self-contained file, shown in a frame).
"""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Results entries whose JSON is at most this long are headline numbers; longer ones (per-layer tables, example
# texts) stay in results.json, linked from the page.
HEADLINE_CHARS = 240
CONFIG_KEYS = ("experiment", "pair", "sources", "dtype", "device", "seed", "started", "argv")
FRAME_HEIGHT = 720

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1400px;
       padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border-bottom: 1px solid #ddd; padding: 4px 10px;
       text-align: left; vertical-align: top; } th { color: #555; font-weight: 600; white-space: nowrap; }
code { font: 13px ui-monospace, Menlo, Consolas, monospace; background: #f4f4f4; padding: 1px 4px; }
iframe { width: 100%; border: 1px solid #ddd; border-radius: 4px; }
.fig { margin: 18px 0 30px; } .status-complete { color: #1a7f37; } .status-other { color: #b35900; }
nav a { margin-right: 14px; }
"""


def _value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
    if isinstance(v, float):
        text = f"{v:.4g}"
    elif isinstance(v, list) and v and all(isinstance(x, float) for x in v):
        text = "[" + ", ".join(f"{x:.3g}" for x in v) + "]"
    return f"<code>{html.escape(text)}</code>"


def headline(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """The results entries short enough to read at a glance, in their order."""
    return [(k, v) for k, v in results.items()
            if len(json.dumps(v, ensure_ascii=False, default=str)) <= HEADLINE_CHARS]


def _figure_height(path: Path) -> int:
    """The figure's own layout height (plotly writes it into the file), plus room for the toolbar."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return FRAME_HEIGHT
    i = text.find('"height":')
    if i < 0:
        return FRAME_HEIGHT
    digits = "".join(c for c in text[i + 9 : i + 20].strip() if c.isdigit() or c == ".").split(".")[0]
    return int(digits) + 40 if digits else FRAME_HEIGHT


def index_html(folder: Path, config: dict[str, Any], results: dict[str, Any], figures: Sequence[str],
               status: str) -> str:
    """The page for a run folder holding `figures` (file names, in the order written)."""
    title = f"{config.get('experiment', 'run')} — {config.get('pair') or folder.name}"
    cfg_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_value(config[k])}</td></tr>"
                       for k in CONFIG_KEYS if config.get(k) not in (None, "", [], {}))
    res_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_value(v)}</td></tr>" for k, v in headline(results))
    nav = "".join(f'<a href="#{html.escape(Path(f).stem)}">{html.escape(Path(f).stem)}</a>' for f in figures)
    figs = "".join(
        f'<div class="fig" id="{html.escape(Path(f).stem)}"><h3>{html.escape(Path(f).stem)} '
        f'<small>(<a href="{html.escape(f)}">open alone</a>)</small></h3>'
        f'<iframe src="{html.escape(f)}" loading="lazy" height="{_figure_height(folder / f)}" '
        f'title="{html.escape(Path(f).stem)}"></iframe></div>' for f in figures)
    cls = "status-complete" if status == "complete" else "status-other"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="{cls}">status: {html.escape(status)} · files: <a href="config.json">config.json</a>,
<a href="results.json">results.json</a> (all results), <a href="run.json">run.json</a> (checksums)</p>
<h2>Run</h2><table>{cfg_rows}</table>
<h2>Headline numbers</h2><table>{res_rows or '<tr><td>no results</td></tr>'}</table>
<h2>Figures</h2><nav>{nav or 'none'}</nav>
{figs}
</body></html>
"""
