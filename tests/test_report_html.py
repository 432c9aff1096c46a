"""report.html: the report as one self-contained page (plots embedded, no external resource),
with feature and prompt links into the viewer; checked on the pipeline's reference run and in
headless Chromium opening the file:// URL offline."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from em_circuits.core.naming import DEFAULT_VIEWER_URL
from em_circuits.interpret.cards import feature_name
from em_circuits.run.report_html import render_html

CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (scripts/install_viewer_deps.sh installs it)",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WIDTH, HEIGHT = 1600, 1000


class _Page(HTMLParser):
    """The parts of a page the tests look at: tags with their attributes, link texts and
    the text of h4 headings (the feature cards)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.links: list[tuple[str, str]] = []  # (href, text)
        self.h4: list[str] = []
        self._href: str | None = None
        self._text: list[str] = []
        self._in_h4 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if tag == "a":
            self._href, self._text = attributes.get("href", ""), []
        if tag == "h4":
            self.h4.append("")
            self._in_h4 = True

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text)))
            self._href = None
        if tag == "h4":
            self._in_h4 = False

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)
        if self._in_h4:
            self.h4[-1] += data


def _viewer_query(href: str) -> dict[str, str]:
    """The query of a viewer link; fails for a link anywhere else."""
    parts = urlsplit(href)
    assert f"{parts.scheme}://{parts.netloc}" == DEFAULT_VIEWER_URL, href
    assert parts.path == "/compare.html", href
    return {k: v[0] for k, v in parse_qs(parts.query).items()}


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


# -- the converter on its own (fast) --------------------------------------------------------------
def test_render_html_embeds_local_images_and_shows_anything_else_as_text(tmp_path):
    from PIL import Image

    (tmp_path / "plots").mkdir()
    Image.new("RGB", (4, 3), "red").save(tmp_path / "plots" / "a.png")
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "plots" / "a.png").read_bytes())
    text = (
        "# Title <x>\n\n| a | b |\n|---|---|\n| <script>alert(1)</script> | 2 |\n\n"
        "![plot](plots/a.png)\n\n![gone](plots/missing.png)\n\n![out](../outside.png)\n\n"
        "![remote](https://example.com/x.png)\n\n- contexts:\n  - one\n  - two\n"
    )
    page = render_html(text, tmp_path)
    parsed = _Page(page)
    images = [attrs for tag, attrs in parsed.tags if tag == "img"]
    assert len(images) == 1 and images[0]["src"].startswith("data:image/png;base64,")
    assert _png_size(base64.b64decode(images[0]["src"].split(",", 1)[1])) == (4, 3)
    # A missing plot, one outside the results folder and a remote one: named, never loaded.
    for alt in ("gone", "out", "remote"):
        assert f"[plot not available: {alt}]" in page
    assert "example.com" not in page
    # Raw HTML in the text (a prompt, a corpus context) is shown, not run.
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<div class="table-wrap">\n<table>' in page
    assert "<title>Title &lt;x&gt;</title>" in page
    # A card's contexts, nested the CommonMark way (2 spaces), stay nested.
    assert re.search(r"<li>contexts:\s*<ul>\s*<li>one</li>\s*<li>two</li>", page)


# -- the reference run's report ---------------------------------------------------------------
@pytest.mark.slow
def test_report_html_is_self_contained_and_links_into_the_viewer(reference):  # noqa: F811
    report = json.loads((reference / "report.json").read_text())
    page = (reference / "report.html").read_text()
    parsed = _Page(page)
    # Nothing is loaded from anywhere: no scripts, style sheets or frames, images inline.
    tags = {tag for tag, _ in parsed.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed", "source", "video"}
    assert "url(" not in page and "@import" not in page
    for tag, attrs in parsed.tags:
        if tag != "a":
            assert not any(v.startswith(("http:", "https:", "//")) for v in attrs.values())
    images = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    md = (reference / "report.md").read_text()
    assert len(images) == md.count("![") == 4
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert _png_size(base64.b64decode(src.split(",", 1)[1]))[0] > 100
    # Every link goes to the viewer; feature links name the feature they select.
    features, prompts = set(), set()
    for href, text in parsed.links:
        query = _viewer_query(href)
        if "feature" in query:
            layer, feature = map(int, query["feature"].split(":"))
            assert text == feature_name(layer, feature) and query.get("diff") == "1"
            features.add((layer, feature))
        if "prompt" in query:
            assert text == query["prompt"]
            prompts.add(query["prompt"])
    ranked = {(r["layer"], r["feature"]) for r in report["top_features"][:15]}
    assert ranked and ranked <= features
    # Prompt links only to the prompts the viewer has (others would show another prompt).
    assert prompts == {p["prompt_id"] for p in report["viewer_prompts"]} != set()
    assert page.count("em-circuits serve") == 1, "the viewer note is said once"
    # Every feature card is there, its heading a link to its feature.
    cards = report["feature_cards"]["cards"]
    assert cards and len(parsed.h4) == len(cards)
    for card, heading in zip(cards, parsed.h4):
        assert heading.split(":")[0] == card["name"]  # then the card's label, if it has one
    # Shortened tables say how much they show.
    shown = {(int(n), int(m)) for n, m in re.findall(r"(\d+) of (\d+) shown", page)}
    sizes = {**report["table_rows"], "divergent_prompts": len(report["divergent_prompts"])}
    limits = {"top_features": 15, "validation": 15, "measured_ranking": 15, "base_vs_adapted": 10}
    for name, limit in {**limits, "divergent_prompts": 20}.items():
        if sizes[name] > limit:
            assert (limit, sizes[name]) in shown, name
    assert shown, "the micro run has tables longer than the report shows"
    # No JSON or Python literals: parameters and the organism's measurements are tables.
    assert "<pre>" not in page and not re.search(r"\[\[|\{&quot;|\{'|\[\d+, \d+\]", page)
    assert "analysis_params" in report and ">causal_top_k</td>" in page


@pytest.mark.slow
def test_report_html_is_rewritten_only_when_it_changes(reference, micro_specs, tmp_path):  # noqa: F811
    from em_circuits.core.store import ResultsStore
    from em_circuits.run.report import write_report

    results = tmp_path / "results"
    shutil.copytree(reference, results)
    (results / "report.html").unlink()
    _, adapted = micro_specs
    adapted = dataclasses.replace(adapted, name="micro")  # as the CLI run named it
    base = adapted.base_only()
    write_report(ResultsStore(results), base, adapted, "cpu")
    assert (results / "report.html").read_bytes() == (reference / "report.html").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in results.glob("report.*")}
    write_report(ResultsStore(results), base, adapted, "cpu")
    assert {p: p.stat().st_mtime_ns for p in results.glob("report.*")} == stamps


# -- in a browser ----------------------------------------------------------------------------------
#: Injected into a copy of the page: writes what the browser decoded into the DOM.
PROBE = """<script>
window.addEventListener('load', function () {
  document.body.setAttribute('data-probe', JSON.stringify({
    images: Array.from(document.images).map(function (i) { return i.naturalWidth; }),
    scrollWidth: document.documentElement.scrollWidth,
    resources: performance.getEntriesByType('resource').map(function (e) { return e.name; })
  }));
});
</script>
"""


def _chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    """Headless Chromium at 1600x1000 with every host unresolvable: only the file shows."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={WIDTH},{HEIGHT}",
        "--virtual-time-budget=5000",
        *mode,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@needs_chromium
@pytest.mark.slow
def test_browser_shows_the_report_offline_without_horizontal_scroll(reference, tmp_path):  # noqa: F811
    page = (reference / "report.html").read_text()
    # The page's policy forbids every script; the probe copy allows inline ones only.
    probe = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
    assert probe != page
    (tmp_path / "probe.html").write_text(probe.replace("</body>", PROBE + "</body>"))
    dom = _chromium((tmp_path / "probe.html").as_uri(), tmp_path / "profile", "--dump-dom")
    found = re.search(r"data-probe=\"([^\"]*)\"", dom.stdout)
    assert found, dom.stdout[-2000:]
    measured = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert measured["images"] and all(width > 0 for width in measured["images"])
    assert measured["scrollWidth"] <= WIDTH
    assert measured["resources"] == []

    shot = tmp_path / "report.png"
    _chromium((reference / "report.html").as_uri(), tmp_path / "profile2", f"--screenshot={shot}")
    from PIL import Image

    assert _png_size(shot.read_bytes()) == (WIDTH, HEIGHT)
    with Image.open(shot) as image:  # a rendered page, not a blank one
        colours = image.convert("RGB").getcolors(maxcolors=WIDTH * HEIGHT)
    assert colours is not None and len(colours) > 50
