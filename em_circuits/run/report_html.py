"""report.html: the report's Markdown as one page that opens offline from a file:// URL.

Everything the page shows is inside the file: plots are embedded as base64 data URIs, the
style sheet is inline, and a Content-Security-Policy forbids loading anything else (no CDN, no
web fonts), so a copy mailed or moved off the cluster still shows every table and plot. Links
into the graph viewer stay ordinary anchors: following them needs ``em-circuits serve``.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import re
import xml.etree.ElementTree as etree
from pathlib import Path

import markdown
from markdown.extensions import Extension
from markdown.preprocessors import Preprocessor
from markdown.treeprocessors import Treeprocessor

#: Readable on a laptop and a wide monitor alike: a capped text column, tables that scroll
#: inside their own box instead of widening the page, system fonts only (no downloads).
CSS = """
:root { color-scheme: light; }
* { box-sizing: border-box; }
body {
  margin: 0 auto; padding: 1.5rem 1.25rem 4rem; max-width: 72rem;
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    sans-serif;
  color: #1f2328; background: #fff; overflow-wrap: anywhere;
}
h1, h2, h3, h4 { line-height: 1.25; margin: 1.8em 0 0.6em; }
h1 { font-size: 1.8rem; margin-top: 0.5em; }
h2 { font-size: 1.35rem; padding-bottom: 0.25em; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.15rem; }
h4 { font-size: 1rem; }
a { color: #0969da; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: 0.9em; }
code { background: #f3f4f6; padding: 0.1em 0.3em; border-radius: 4px; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; }
blockquote { margin: 1em 0; padding: 0.2em 1em; color: #57606a;
  border-left: 4px solid #d0d7de; }
img { display: block; max-width: 100%; height: auto; margin: 1em 0; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 0.3em 0.6em; vertical-align: top;
  overflow-wrap: normal; }
th { background: #eef1f4; text-align: left; }
tbody tr:nth-child(even) { background: #f6f8fa; }
.missing { color: #9a6700; font-style: italic; }
"""

#: The browser itself refuses any resource not in the file (images only as data: URIs).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _data_uri(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _local_file(src: str, root: Path) -> Path | None:
    """The file a relative link names under ``root``; None for URLs, absolute paths, links
    that leave ``root`` and files that do not exist (a plot the analysis did not make)."""
    if not src or "://" in src or src.startswith(("/", "data:", "#")):
        return None
    path = (root / src).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return None
    return path


#: A list item indented by 2 or 3 spaces: nested under a "- " item in CommonMark (GitHub, the
#: way report.md is written, e.g. a feature card's contexts), top level in Python-Markdown.
_NESTED_ITEM = re.compile(r"^ {2,3}(?=(?:[-*+]|\d+\.) )")


class _CommonMarkNesting(Preprocessor):
    """Indents such items by 4 spaces, so both renderers nest them."""

    def run(self, lines: list[str]) -> list[str]:
        return [_NESTED_ITEM.sub("    ", line) for line in lines]


class _SelfContained(Treeprocessor):
    """Embeds every image and wraps every table in its own horizontal scroller."""

    def __init__(self, md: markdown.Markdown, root: Path) -> None:
        super().__init__(md)
        self.root = root

    def run(self, root: etree.Element) -> None:
        for parent in list(root.iter()):
            for index, child in enumerate(list(parent)):
                if child.tag == "img":
                    parent[index] = self._image(child)
                elif child.tag == "table":
                    wrap = etree.Element("div", {"class": "table-wrap"})
                    wrap.append(child)
                    wrap.tail, child.tail = child.tail, None
                    parent[index] = wrap

    def _image(self, img: etree.Element) -> etree.Element:
        src = img.get("src", "")
        path = _local_file(src, self.root)
        if path is not None:
            img.set("src", _data_uri(path))
            return img
        # Never a dangling or remote reference: say what is missing instead.
        note = etree.Element("span", {"class": "missing"})
        note.text = f"[plot not available: {img.get('alt') or src}]"
        note.tail = img.tail
        return note


class _SelfContainedExtension(Extension):
    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # noqa: N802 (markdown's API)
        # Raw HTML in the Markdown (a prompt or corpus text containing "<script>") is shown
        # as text, never interpreted: the report writes no HTML of its own.
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")
        md.preprocessors.register(_CommonMarkNesting(md), "commonmark_nesting", 20)
        # After "inline" (20), which creates the <img> elements; before "prettify" (10).
        md.treeprocessors.register(_SelfContained(md, self.root), "self_contained", 15)


def _title(markdown_text: str) -> str:
    for line in markdown_text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return "report"


def render_html(markdown_text: str, root: Path) -> str:
    """The Markdown as a self-contained HTML page; relative image links resolve from ``root``
    (the folder of report.md)."""
    converter = markdown.Markdown(
        extensions=["tables", "fenced_code", _SelfContainedExtension(Path(root))],
        output_format="html",
    )
    body = converter.convert(markdown_text)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(_title(markdown_text))}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
