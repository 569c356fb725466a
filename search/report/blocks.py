"""The document blocks both reports are built of (search/report/sections.py builds them; this module
renders markdown, search/report/html.py HTML): paragraphs, tables, code, bullet lists and plots."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Union

from search.numbers import show_number


@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Mapping[str, object]]


@dataclass(frozen=True)
class Code:
    text: str
    lang: str = ""


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Figure:
    """An inline SVG plot (search.report.plots) for report.html; report.md has no plots."""
    svg: str
    caption: str = ""


# A str block is a paragraph; `code` and **bold** marks in it are rendered in both files.
Block = Union[str, Table, Code, Bullets, Figure]


@dataclass(frozen=True)
class Section:
    title: str
    blocks: Sequence[Block]
    level: int = 2


def cell(value) -> str:
    if value is None or value == "":
        return ""
    return show_number(value)


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    def md(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md(cell(row.get(c))) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _markdown_block(block: Block) -> Optional[str]:
    if isinstance(block, str):
        return block
    if isinstance(block, Table):
        return markdown_table(block.rows, block.columns)
    if isinstance(block, Code):
        return f"```{block.lang}\n{block.text}\n```"
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    return None  # a Figure


def to_markdown(sections: Sequence[Section]) -> str:
    out: List[str] = []
    for section in sections:
        out += ["#" * section.level + " " + section.title, ""]
        out += [text + "\n" for text in map(_markdown_block, section.blocks) if text is not None]
    return "\n".join(out).rstrip("\n") + "\n"


def write_text(path: str, text: str) -> str:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)  # a reader (a browser refreshing, `cat`) never sees half a file
    return path
