"""report.html: the sections of search.report.sections as one self-contained page.

Self-contained: the CSS is inline, the plots are inline SVG drawn by matplotlib (search.report.plots,
search.report.figures) and there is no script, font or stylesheet to fetch, so the file opens offline,
from an artifact store or an e-mail. Every text that comes from the spec or the trials is escaped
(html.escape, or matplotlib inside a plot) before it reaches the page.
"""
from __future__ import annotations

import os
import re
from html import escape
from typing import List, Sequence

from search.numbers import is_number
from search.report.blocks import Block, Bullets, Code, Figure, Section, Table, cell, write_text
from search.report.sections import ReportInput, sections

REPORT_HTML = "report.html"

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 20px 40px; color: #1d1d1f; }
h1 { font-size: 1.6em; margin-top: 1em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 2em; }
nav { font-size: 0.9em; } nav a { margin-right: 1em; }
code, pre { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #f4f4f6; }
code { padding: 1px 4px; border-radius: 3px; }
pre { padding: 10px 12px; overflow-x: auto; border-radius: 4px; } pre code { padding: 0; background: none; }
.table-wrap { overflow-x: auto; margin: 0.8em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f6; position: sticky; top: 0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.state-PRUNED td { color: #666; } tr.state-FAIL td { background: #fff4f4; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 560px; }
svg.chart { background: #fff; border: 1px solid #eee; max-width: 100%; height: auto; }
"""

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def inline(text: str) -> str:
    """Escaped text with the `code` and **bold** marks of the report's paragraphs as tags. Escaping comes
    first, so user data inside the marks stays text."""
    return _BOLD.sub(r"<strong>\1</strong>", _CODE.sub(r"<code>\1</code>", escape(text)))


def table(block: Table) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in block.columns)
    body = []
    for row in block.rows:
        cells = "".join(f'<td class="num">{escape(cell(row.get(c)))}</td>' if is_number(row.get(c))
                        else f"<td>{inline(cell(row.get(c)))}</td>" for c in block.columns)
        state = row.get("state")
        klass = f' class="state-{escape(str(state))}"' if state in ("PRUNED", "FAIL") else ""
        body.append(f"<tr{klass}>{cells}</tr>")
    return f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def block_html(block: Block) -> str:
    if isinstance(block, str):
        return f"<p>{inline(block)}</p>"
    if isinstance(block, Table):
        return table(block)
    if isinstance(block, Code):
        return f"<pre><code>{escape(block.text)}</code></pre>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Figure):  # matplotlib escaped the SVG's texts (search.report.plots.svg)
        caption = f"<figcaption>{inline(block.caption)}</figcaption>" if block.caption else ""
        return f"<figure>{block.svg}{caption}</figure>"
    raise TypeError(f"not a report block: {type(block).__name__}")


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def to_html(parts: Sequence[Section]) -> str:
    title = parts[0].title if parts else "peft-search report"
    links = " ".join(f'<a href="#{_anchor(s.title)}">{escape(s.title)}</a>' for s in parts if s.level == 2)
    body: List[str] = []
    for section in parts:
        level = section.level
        anchor = f' id="{_anchor(section.title)}"' if level == 2 else ""
        body.append(f"<section{anchor}><h{level}>{escape(section.title)}</h{level}>")
        body += [block_html(block) for block in section.blocks]
        body.append("</section>")
        if level == 1:
            body.append(f"<nav>{links}</nav>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def build_html(data: ReportInput) -> str:
    return to_html(sections(data))


def write_html(run_dir: str, text: str) -> str:
    return write_text(os.path.join(run_dir, REPORT_HTML), text)
