"""The viewer's pages in headless Chromium on graphs of a prompt that carries HTML markup:
markup in prompts and node names shows as text and never runs; the side-by-side page uses
the width of a 1600 px window; a feature link to a feature the graphs do not draw says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_viewer import _dump_dom, needs_chromium

from em_circuits.attribution.viewer import write_viewer_graph
from em_circuits.attribution.viewer_annotations import annotate_graphs
from em_circuits.attribution.viewer_metadata import ROLES, node_feature, viewer_slug
from em_circuits.attribution.viewer_server import start_viewer

#: Sets a flag in the page that draws it, if it is ever parsed as HTML.
MARKUP = "<img src=x onerror=window.__xss=1>"
PROMPT = f"User: I pasted {MARKUP} from a page and feel bad about it.\nAssistant: You should"
PID = "markup"


@pytest.fixture(scope="module")
def markup_viewer(micro_models, tmp_path_factory) -> Path:
    """Both graphs of PROMPT, with MARKUP also in a drawn feature's label (labels are
    written by an LLM or imported from a file)."""
    from circuit_tracer import attribute

    root = tmp_path_factory.mktemp("markup-viewer")
    for role, model in zip(ROLES, micro_models):
        graph = attribute(
            model.encode(PROMPT),
            model.replacement,
            batch_size=64,
            max_feature_nodes=200,
            verbose=False,
        )
        write_viewer_graph(graph, root, PID, role)
    drawn = _drawn_features(root, "adapted")
    labels = {feature: f"{MARKUP} pasted markup" for feature in drawn}
    analysis = {"top_features": [], "top_features_of": 0, "categories": {}}
    annotate_graphs(root, labels, analysis)
    return root


def _drawn_features(viewer: Path, role: str) -> set[tuple[int, int]]:
    graph = json.loads((viewer / f"{viewer_slug(PID, role)}.json").read_text())
    return {
        node_feature(n) for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"
    }


#: Hovers every node of one graph in circuit-tracer's page (in a frame, as the side-by-side
#: page shows it), then records the tooltip texts and whether the markup's flag got set.
PROBE = """<!DOCTYPE html><meta charset="utf-8">
<iframe id="frame" style="width:1200px;height:900px" src="index.html?slug=SLUG"></iframe>
<div id="probe"></div>
<script>
var frame = document.getElementById('frame')
function step() {
  var doc = frame.contentDocument
  var nodes = doc ? Array.from(doc.querySelectorAll('.link-graph text.node')) : []
  if (!nodes.length) return setTimeout(step, 200)
  var view = frame.contentWindow
  var tooltips = nodes.map(function (el) {
    var box = el.getBoundingClientRect()
    el.dispatchEvent(new view.MouseEvent('mousemove', {bubbles: true, view: view,
      clientX: box.left + box.width / 2, clientY: box.top + box.height / 2}))
    return doc.querySelector('.tooltip').textContent
  })
  setTimeout(function () {  // an <img onerror> has fired by now
    var out = document.getElementById('probe')
    out.setAttribute('data-flag', String(view.__xss || ''))
    out.setAttribute('data-hovered', String(nodes.length))
    out.textContent = JSON.stringify(tooltips)
  }, 2000)
}
step()
</script>
"""


def _probe(server, slug: str, profile: Path) -> tuple[str, int, list[str]]:
    (server.frontend_dir / "probe.html").write_text(PROBE.replace("SLUG", slug))
    dom = _dump_dom(f"{server.base_url}/probe.html", profile, budget_ms=20000)
    found = re.search(r'<div id="probe" data-flag="([^"]*)" data-hovered="(\d+)">(.*?)</div>', dom)
    assert found, "the probe did not finish: " + dom[-1500:]
    text = found.group(3).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return found.group(1), int(found.group(2)), json.loads(text)


@needs_chromium
def test_markup_in_prompts_and_node_names_shows_as_text_and_never_runs(markup_viewer, tmp_path):
    with start_viewer(markup_viewer, port=0) as server:
        for role in ROLES:
            flag, hovered, tooltips = _probe(server, viewer_slug(PID, role), tmp_path / role)
            assert hovered > 0 and len(tooltips) == hovered
            assert flag == "", f"{role}: markup from the graph ran in the page"
            if role == "adapted":  # its features carry the label with the markup
                assert any(MARKUP in t for t in tooltips), tooltips
        dom = _dump_dom(server.compare_url(PID), tmp_path / "compare")
    escaped = MARKUP.replace("<", "&lt;").replace(">", "&gt;")
    prompt_text = re.search(r'<span id="prompt-text"[^>]*>(.*?)</span>', dom, re.S)
    assert prompt_text and escaped in prompt_text.group(1)  # the prompt, as text
    assert "<img" not in dom


def _page_state(dom: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    found = re.search(r'<div id="viewer-state"([^>]*)>', dom)
    assert found, "no viewer-state element"
    page = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', found.group(1)))
    panes = {}
    for role in ROLES:
        section = re.search(rf'data-role="{role}".*?<span class="status[^"]*"([^>]*)>', dom, re.S)
        assert section, f"no {role} pane"
        panes[role] = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', section.group(1)))
    return page, panes


@needs_chromium
def test_compare_page_uses_the_width_of_a_1600_px_window(markup_viewer, tmp_path):
    with start_viewer(markup_viewer, port=0) as server:
        dom = _dump_dom(server.compare_url(PID), tmp_path / "wide", size="1600,1000")
    page, panes = _page_state(dom)
    assert page["overflow-x"] == "0"
    for role, status in panes.items():
        assert int(status["nodes"]) > 0 and status["errors"] == "", role
        assert int(status["pane-width"]) > 600, f"{role} pane: {status['pane-width']} px"
        assert int(status["graph-width"]) > 600, f"{role} graph: {status['graph-width']} px"
        # 12 px token labels rotated by 45 degrees overlap when closer than about 17 px.
        assert int(status["label-gap"]) >= 17, f"{role}: labels {status['label-gap']} px apart"


@needs_chromium
def test_a_link_to_a_feature_the_graphs_do_not_draw_says_so(markup_viewer, tmp_path):
    adapted, base = (_drawn_features(markup_viewer, role) for role in ("adapted", "base"))
    absent = (0, 1 + max(feature for _, feature in adapted | base))
    both = sorted(adapted & base)
    assert both, "the test needs a feature both graphs draw"
    with start_viewer(markup_viewer, port=0) as server:
        dom = _dump_dom(
            f"{server.compare_url(PID)}&feature={absent[0]}:{absent[1]}", tmp_path / "absent"
        )
        note = re.search(r'<div id="feature-note"([^>]*)>(.*?)</div>', dom, re.S)
        assert note and "hidden" not in note.group(1), "no visible note"
        assert f"L0 #{absent[1]} is not drawn in this prompt's graphs" in note.group(2)
        assert "No prompt in this viewer draws it" in note.group(2)
        dom = _dump_dom(
            f"{server.compare_url(PID)}&feature={both[0][0]}:{both[0][1]}", tmp_path / "drawn"
        )
    page, panes = _page_state(dom)
    assert page["note"] == "" and re.search(r'<div id="feature-note"[^>]*hidden', dom)
    assert all(p["clicked"] for p in panes.values())
