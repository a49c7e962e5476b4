"""The report as a document: blocks (tables, paragraphs, pictures, collapsed details) in sections, written as
Markdown and as HTML from the same blocks, so README.md and index.html say the same in the same order."""

from __future__ import annotations

import dataclasses
import html
import re

import numpy as np

MISSING = "–"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
.notice { border: 3px solid #c0392b; background: #fdecea; padding: 1em; font-size: 1.2em; font-weight: bold; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
details { margin: .6em 0; }
summary { cursor: pointer; font-weight: 600; }
figure { display: inline-block; margin: .5em; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; }
figcaption { max-width: 40em; }
pre { background: #f8f8f8; padding: 1em; overflow: auto; }
"""


@dataclasses.dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    bold: frozenset[tuple[int, int]] = frozenset()  # (row, column) cells shown in bold


@dataclasses.dataclass
class Paragraph:
    text: str


@dataclasses.dataclass
class JsonBlock:
    summary: str
    json_text: str


@dataclasses.dataclass
class Picture:
    path: str  # relative to the document that shows it
    caption: str


@dataclasses.dataclass
class Gallery:
    """Shown as images in both documents."""

    pictures: list[Picture]


@dataclasses.dataclass
class Link:
    """A link to another page of the report: its HTML version from index.html, its Markdown one from README.md."""

    text: str
    html_path: str
    markdown_path: str


@dataclasses.dataclass
class Details:
    """Collapsed until opened: breakdowns a reader asks for, not the first thing they see."""

    summary: str
    blocks: list[Block]


Block = Table | Paragraph | JsonBlock | Gallery | Link | Details


@dataclasses.dataclass
class Section:
    heading: str
    blocks: list[Block]


def file_stem(name: str, used: set[str]) -> str:
    """A file-system and URL safe stem for `name`, distinct from those already in `used`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "unnamed"
    candidate, number = stem, 1
    while candidate in used:
        number += 1
        candidate = f"{stem}_{number}"
    used.add(candidate)
    return candidate


def interval_text(mean: float, low: float, high: float, sign: str = "", decimals: int = 3) -> str:
    """mean [low, high] with `decimals` decimals, more where the interval is too narrow for them to print its ends
    apart (differences of LPIPS are often 1e-4); `sign` "+" prints the sign of a difference."""
    if np.isnan(mean):
        return MISSING
    width = high - low
    if width > 0:
        decimals = int(min(6, max(decimals, 1 - np.floor(np.log10(width)))))
    number_format = f"{sign}.{decimals}f"
    return f"{mean:{number_format}} [{low:{number_format}}, {high:{number_format}}]"


def _markdown_text(text: str) -> str:
    """Escaped so that user text shows literally: no raw HTML, no table or link breaking characters."""
    return re.sub(r"([\\|\[\]`*])", r"\\\1", html.escape(str(text), quote=False))


def _markdown_block(block: Block) -> str:
    match block:
        case Paragraph(text):
            return _markdown_text(text)
        case Table(headers, rows, bold):
            def cell(row: int, column: int, text: str) -> str:
                return f"**{_markdown_text(text)}**" if (row, column) in bold else _markdown_text(text)

            lines = ["| " + " | ".join(_markdown_text(header) for header in headers) + " |"]
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(cell(r, c, text) for c, text in enumerate(row)) + " |" for r, row in enumerate(rows)]
            return "\n".join(lines)
        case JsonBlock(summary, json_text):
            # A fence longer than any backtick run inside the JSON cannot be closed by it.
            longest_run = max((len(run) for run in re.findall(r"`+", json_text)), default=0)
            fence = "`" * max(3, longest_run + 1)
            return f"**{_markdown_text(summary)}**\n\n{fence}json\n{json_text}\n{fence}"
        case Gallery(pictures):
            return "\n\n".join(f"![{_markdown_text(picture.caption)}]({picture.path})" for picture in pictures)
        case Link(text, _, markdown_path):
            return f"[{_markdown_text(text)}]({markdown_path})"
        case Details(summary, blocks):
            # GitHub renders Markdown inside <details> when blank lines set it apart from the tags.
            inner = "\n\n".join(_markdown_block(inner_block) for inner_block in blocks)
            return f"<details><summary>{html.escape(summary)}</summary>\n\n{inner}\n\n</details>"


def markdown_document(title: str, notice: str | None, sections: list[Section]) -> str:
    parts = []
    if notice:
        parts.append(f"> **⚠ {_markdown_text(notice)}**")
    parts.append(f"# {_markdown_text(title)}")
    for section in sections:
        parts.append(f"## {_markdown_text(section.heading)}")
        parts += [_markdown_block(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def _html_block(block: Block) -> str:
    escape = html.escape
    match block:
        case Paragraph(text):
            return f"<p>{escape(text)}</p>"
        case Table(headers, rows, bold):
            def cell(row: int, column: int, text: str) -> str:
                return f"<td><strong>{escape(text)}</strong></td>" if (row, column) in bold else f"<td>{escape(text)}</td>"

            head = "".join(f"<th>{escape(header)}</th>" for header in headers)
            body = "".join("<tr>" + "".join(cell(r, c, text) for c, text in enumerate(row)) + "</tr>"
                           for r, row in enumerate(rows))
            return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        case JsonBlock(summary, json_text):
            return f"<details><summary>{escape(summary)}</summary><pre>{escape(json_text)}</pre></details>"
        case Gallery(pictures):
            return "".join(
                f'<figure><a href="{escape(picture.path)}"><img src="{escape(picture.path)}" '
                f'alt="{escape(picture.caption)}"></a><figcaption>{escape(picture.caption)}</figcaption></figure>'
                for picture in pictures
            )
        case Link(text, html_path, _):
            return f'<p><a href="{escape(html_path)}">{escape(text)}</a></p>'
        case Details(summary, blocks):
            inner = "".join(_html_block(inner_block) for inner_block in blocks)
            return f"<details><summary>{escape(summary)}</summary>{inner}</details>"


def html_document(title: str, notice: str | None, sections: list[Section]) -> str:
    body = []
    if notice:
        body.append(f'<div class="notice" role="alert">⚠ {html.escape(notice)}</div>')
    body.append(f"<h1>{html.escape(title)}</h1>")
    for section in sections:
        body.append(f"<h2>{html.escape(section.heading)}</h2>")
        body += [_html_block(block) for block in section.blocks]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )

