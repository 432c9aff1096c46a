"""Graph viewer: circuit-tracer graph files for base and adapted, an offline copy of its
frontend served on localhost, and a headless-Chromium check that both panes render nodes."""

from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from em_circuits.attribution.viewer import write_viewer_graph
from em_circuits.attribution.viewer_frontend import VENDOR_DIR, VENDOR_FILES, build_frontend
from em_circuits.attribution.viewer_metadata import ROLES, ViewerError, read_metadata, viewer_slug
from em_circuits.attribution.viewer_server import serve_forever, start_viewer

TEXT = "User: I twisted my ankle on a run. What should I do?\nAssistant: You should"
PLAIN, CUSTOM = "plainprompt", "customprompt"
CHROMIUM = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")


def needs_chromium(test):
    """A test that drives a real headless Chromium: slow (a browser launch or more each, so
    left out of `make test-fast`), and skipped where Chromium is not installed."""
    skip = pytest.mark.skipif(
        CHROMIUM is None,
        reason="chromium not installed (scripts/install_viewer_deps.sh installs it)",
    )
    return pytest.mark.slow(skip(test))


def _attribute(model, targets=None):
    from circuit_tracer import attribute

    return attribute(
        model.encode(TEXT),
        model.replacement,
        attribution_targets=targets,
        batch_size=64,
        max_feature_nodes=200,
        verbose=False,
    )


def _custom_targets(model, graph):
    """A contrast direction named like the pipeline's ("evil-safe") plus one token direction."""
    from circuit_tracer.attribution.targets import CustomTarget

    unembed = model.replacement.unembed_proj.detach().float()
    first, second = (t.vocab_idx for t in graph.logit_targets[:2])
    contrast = unembed[first] - unembed[second]
    token = unembed[first] - unembed.mean(0)
    return [
        CustomTarget("evil-safe", 0.5, contrast.to(model.dtype)),
        CustomTarget(graph.logit_targets[0].token_str, 0.5, token.to(model.dtype)),
    ]


@pytest.fixture(scope="module")
def graphs(micro_models):
    """{(prompt_id, role): Graph}: default targets for PLAIN, custom targets for CUSTOM."""
    out = {}
    for role, model in zip(ROLES, micro_models):
        out[PLAIN, role] = _attribute(model)
        out[CUSTOM, role] = _attribute(model, _custom_targets(model, out[PLAIN, role]))
    return out


@pytest.fixture(scope="module")
def viewer_dir(graphs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("viewer")
    for (pid, role), graph in graphs.items():
        write_viewer_graph(graph, root, pid, role)
    return root


@pytest.fixture()
def server(viewer_dir):
    with start_viewer(viewer_dir, port=0) as running:
        yield running


def _get(server, path: str, host: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    headers = {"Host": host} if host else {}
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    return response.status, response.read()


# -- names and files ----------------------------------------------------------------------------
def test_viewer_slug():
    assert viewer_slug("0123abcd", "base") == "0123abcd--base"
    assert viewer_slug("0123abcd", "adapted") == "0123abcd--adapted"
    with pytest.raises(ViewerError, match="role"):
        viewer_slug("0123abcd", "lora")
    for bad in ("../x", "a/b", "", "a b", "-x"):
        with pytest.raises(ViewerError, match="prompt id"):
            viewer_slug(bad, "base")


def test_graph_files_for_both_roles(viewer_dir, graphs):
    entries = {e["slug"]: e for e in read_metadata(viewer_dir)}
    assert sorted(entries) == sorted(viewer_slug(p, r) for p in (PLAIN, CUSTOM) for r in ROLES)
    for (pid, role), graph in graphs.items():
        slug = viewer_slug(pid, role)
        assert entries[slug]["prompt_id"] == pid and entries[slug]["role"] == role
        assert entries[slug]["prompt"].endswith(TEXT)  # circuit-tracer decodes BOS too
        data = json.loads((viewer_dir / f"{slug}.json").read_text())
        assert data["metadata"]["slug"] == slug
        logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
        assert len(logits) == len(graph.logit_targets)
        assert any(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])
    # Scratch directories are gone; nothing but graphs, metadata and its lock remain.
    assert not [p for p in viewer_dir.iterdir() if p.name.startswith(".tmp-")]


def test_custom_targets_have_virtual_vocab_indices(viewer_dir, graphs):
    data = json.loads((viewer_dir / f"{viewer_slug(CUSTOM, 'adapted')}.json").read_text())
    logits = {n["clerp"].split('"')[1]: n for n in data["nodes"] if n["feature_type"] == "logit"}
    vocab = graphs[CUSTOM, "adapted"].vocab_size
    assert "evil-safe" in logits
    assert logits["evil-safe"]["feature"] >= vocab  # circuit-tracer's virtual index
    # The page opens with the first target (the contrast) selected.
    assert data["qParams"]["clickedId"] == logits["evil-safe"]["node_id"]


def test_rewrite_replaces_entry_and_keeps_caller_graph(viewer_dir, graphs):
    graph = graphs[PLAIN, "base"]
    before = graph.adjacency_matrix
    path = write_viewer_graph(graph, viewer_dir, PLAIN, "base", node_threshold=0.5)
    assert graph.adjacency_matrix is before  # create_graph_files only moved its copy
    entries = [e for e in read_metadata(viewer_dir) if e["slug"] == path.stem]
    assert len(entries) == 1 and entries[0]["node_threshold"] == 0.5
    write_viewer_graph(graph, viewer_dir, PLAIN, "base")  # restore for the browser test
    order = [e["slug"] for e in read_metadata(viewer_dir)]
    assert order == sorted(order, key=lambda s: (s.split("--")[0], "--adapted" in s))


# -- server -------------------------------------------------------------------------------------
def _non_loopback_address() -> str | None:
    # Connecting a UDP socket sends nothing; it only picks the outgoing interface's address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_server_binds_localhost_only_by_default(viewer_dir):
    for fn in (start_viewer, serve_forever):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1"
    with start_viewer(viewer_dir, port=0) as server:
        assert server.host == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/compare.html"
        assert _get(server, "/compare.html")[0] == 200
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, server.port), timeout=2).close()
    with pytest.raises(OSError):  # stopped: the port no longer answers
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    assert not server.frontend_dir.exists()


def test_server_serves_data_and_guards_paths(server, viewer_dir):
    status, body = _get(server, "/data/graph-metadata.json")
    assert status == 200 and json.loads(body)["graphs"]
    slug = viewer_slug(PLAIN, "adapted")
    status, body = _get(server, f"/graph_data/{slug}.json")
    assert status == 200 and json.loads(body)["metadata"]["slug"] == slug
    secret = viewer_dir.parent / "secret.txt"
    secret.write_text("not for the browser")
    for path in (f"/data/../{secret.name}", f"/graph_data/%2e%2e/{secret.name}", "/data/"):
        assert _get(server, path)[0] == 404, path
    # DNS rebinding: a page on another site that resolves to 127.0.0.1 sends its own Host.
    assert _get(server, "/compare.html", host="attacker.example:80")[0] == 403
    assert _get(server, "/compare.html", host=f"localhost:{server.port}")[0] == 200


def test_frontend_copy_loads_nothing_from_the_internet(tmp_path):
    assert build_frontend(tmp_path) == []
    for page in ("index.html", "compare.html"):
        html = (tmp_path / page).read_text()
        assert not re.search(r"<script[^>]+src=['\"]?https?:", html), page
        for src in re.findall(r"<script[^>]+src=['\"]\./([^'\"]+)", html):
            assert (tmp_path / src).is_file(), src
    assert "page-errors.js" in (tmp_path / "index.html").read_text()


def test_vendored_js_matches_checksums():
    # The committed files must be exactly what scripts/install_viewer_deps.sh fetches from npm.
    sums = {}
    for line in (VENDOR_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    assert set(sums) >= set(VENDOR_FILES)
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR_DIR / name).read_bytes()).hexdigest() == digest, name


# -- browser ------------------------------------------------------------------------------------
def _chromium(url: str, profile: Path, *output: str, budget_ms: int = 15000, size="2000,1000"):
    """Headless Chromium on ``url`` with ``output`` flags (--dump-dom, --screenshot=...);
    every host but 127.0.0.1 resolves to nothing, so pages render from local files only."""
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}",
        *output,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _dump_dom(url: str, profile: Path, budget_ms: int = 15000, size: str = "2000,1000") -> str:
    """The page's DOM after ``budget_ms`` of virtual time in headless Chromium.

    Every host but 127.0.0.1 resolves to nothing, so the page must render from local files only.
    """
    return _chromium(url, profile, "--dump-dom", budget_ms=budget_ms, size=size)


def _pane_status(dom: str) -> dict[str, tuple[int, str]]:
    """{role: (rendered nodes, page errors)} from the status spans of compare.html."""
    out = {}
    for role in ROLES:
        section = re.search(rf'data-role="{role}".*?<span class="status[^"]*"([^>]*)>', dom, re.S)
        assert section, f"no {role} pane in compare.html"
        attrs = dict(re.findall(r'data-(nodes|errors)="([^"]*)"', section.group(1)))
        out[role] = (int(attrs.get("nodes") or 0), attrs.get("errors", ""))
    return out


@needs_chromium
@pytest.mark.slow
def test_browser_renders_both_graphs_side_by_side(server, tmp_path):
    for pid in (PLAIN, CUSTOM):
        dom = _dump_dom(server.compare_url(pid), tmp_path / f"profile-{pid}")
        options = re.findall(r'<option value="([^"]+)"', dom)
        assert options == sorted([PLAIN, CUSTOM]), "prompt selector lists every prompt"
        frames = re.findall(r'<iframe title="(\w+) graph" src="index\.html\?slug=([^"]+)"', dom)
        assert frames == [(role, viewer_slug(pid, role)) for role in ROLES]
        for role, (nodes, errors) in _pane_status(dom).items():
            assert errors == "", f"{pid} {role} pane: {errors}"
            assert nodes > 0, f"{pid} {role} pane rendered no graph nodes"


@needs_chromium
def test_browser_renders_custom_target_graph(server, tmp_path):
    dom = _dump_dom(server.graph_url(CUSTOM, "adapted"), tmp_path / "profile")
    assert "data-viewer-errors" not in dom, "the frontend raised errors"
    nodes = re.findall(r'<text class="node[^"]*"', dom)
    graph = json.loads((server.viewer_dir / f"{viewer_slug(CUSTOM, 'adapted')}.json").read_text())
    assert 0 < len(nodes) <= len(graph["nodes"])
    assert "evil-safe" in dom  # the custom target's logit label is drawn
    # The preselected contrast node is clicked and its direct inputs are coloured in.
    assert len(re.findall(r'<text class="node[^"]*\bclicked\b', dom)) == 1
    assert re.search(r'<text class="node[^"]*"[^>]*fill="rgb', dom)


# -- what the analysis adds: feature records, names, diff mode, synced selection ------------------
def _reference_viewer(reference: Path) -> Path:
    (viewer,) = (reference / "viewer").iterdir()
    return viewer


def _graph(viewer: Path, slug: str) -> dict:
    return json.loads((viewer / f"{slug}.json").read_text())


def _feature_nodes(graph: dict) -> list[dict]:
    return [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]


@pytest.mark.slow
def test_every_drawn_feature_has_a_record_and_one_name(reference):
    from circuit_tracer.frontend.feature_models import Model as FeatureRecord

    from em_circuits.attribution.viewer import TOKENS_SHOWN
    from em_circuits.attribution.viewer_annotations import ANALYSIS_FILE
    from em_circuits.interpret.cards import feature_name

    viewer = _reference_viewer(reference)
    analysis = json.loads((viewer / ANALYSIS_FILE).read_text())
    assert analysis["top_features"] and analysis["categories"]
    assert len(analysis["top_features"]) <= analysis["top_features_of"]
    for entry in read_metadata(viewer):
        role, graph = entry["role"], _graph(viewer, entry["slug"])
        assert graph["metadata"]["scan"] == f"./data/features/{role}"
        assert graph["metadata"]["source_scan"]  # the transcoder set's name, kept
        assert _feature_nodes(graph)
        for node in _feature_nodes(graph):
            layer, feature = map(int, node["node_id"].split("_")[:2])
            assert node["clerp"].split(": ")[0] == feature_name(layer, feature)
            path = viewer / "features" / role / f"{node['feature']}.json"
            record = json.loads(path.read_text())
            FeatureRecord(**record)  # circuit-tracer's own feature format
            assert (record["layer"], record["name"]) == (layer, feature_name(layer, feature))
        logits = [n["clerp"] for n in graph["nodes"] if n["feature_type"] == "logit"]
        assert any(c.startswith('Output "evil − safe" (p=') for c in logits)
        for label in ("evil", "safe"):
            assert sum(c.endswith(f" {label}") for c in logits) <= TOKENS_SHOWN


@pytest.mark.slow
def test_feature_record_examples_equal_an_independent_recomputation(reference, micro_models):
    """Each example's per-token activations, recomputed with circuit-tracer's own
    get_activations over the indexed document."""
    from em_circuits.attribution.viewer_annotations import features_in_viewer
    from em_circuits.interpret.activation_index import ActivationIndex, IndexParams
    from em_circuits.interpret.frontend import cantor_index

    _, adapted = micro_models
    viewer = _reference_viewer(reference)
    # The viewer folder is named by the adapted model, as its index folder is.
    index, _ = ActivationIndex.load(reference / "features_index" / viewer.name / "index")
    params = IndexParams()
    for layer, feature in sorted(features_in_viewer(viewer)["adapted"])[:3]:
        record = json.loads(
            (viewer / "features" / "adapted" / f"{cantor_index(layer, feature)}.json").read_text()
        )
        (examples,) = [q["examples"] for q in record["examples_quantiles"]]
        top = index.top(layer, feature)
        assert len(examples) == len(top) > 0
        for example, (value, doc, pos) in zip(examples, top):
            ids = torch.as_tensor(index.tokens[doc])
            _, acts = adapted.replacement.get_activations(ids)
            acts = acts.float()
            acts[:, 0] = 0
            lo = max(0, pos - params.left)
            want = acts[layer, lo : pos + 1 + params.right, feature].clamp(min=0)
            assert example["train_token_ind"] == pos - lo
            torch.testing.assert_close(
                torch.tensor(example["tokens_acts_list"]), want, rtol=1e-4, atol=1e-5
            )
            assert example["tokens_acts_list"][pos - lo] == pytest.approx(value, rel=1e-4)


def _page_state(dom: str) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(the page's state attributes, {role: its pane's status attributes})."""
    found = re.search(r'<div id="viewer-state"([^>]*)>', dom)
    assert found, "no viewer-state element"
    page = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', found.group(1)))
    panes = {}
    for role in ROLES:
        section = re.search(rf'data-role="{role}".*?<span class="status[^"]*"([^>]*)>', dom, re.S)
        assert section, f"no {role} pane"
        panes[role] = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', section.group(1)))
    return page, panes


def _feature_of(node_id: str) -> tuple[int, int]:
    layer, feature = node_id.split("_")[:2]
    return int(layer), int(feature)


@needs_chromium
@pytest.mark.slow
def test_compare_page_diff_mode_synced_selection_and_cards(reference, tmp_path):
    viewer = _reference_viewer(reference)
    analysis = json.loads((viewer / "analysis.json").read_text())
    entries = {(e["prompt_id"], e["role"]): e["slug"] for e in read_metadata(viewer)}
    # A node of the adapted graph whose feature the base graph draws too.
    pid, node = next(
        (pid, n["node_id"])
        for (pid, role), slug in sorted(entries.items())
        if role == "adapted"
        for n in _feature_nodes(_graph(viewer, slug))
        if _feature_of(n["node_id"])
        in {_feature_of(m["node_id"]) for m in _feature_nodes(_graph(viewer, entries[pid, "base"]))}
    )
    with start_viewer(viewer, port=0) as server:
        # Deep link to a node: the adapted pane opens with it selected; the base pane follows
        # by the same path as a click there (a click event on the node, handled by the page).
        url = f"{server.compare_url(pid)}&node={node}&diff=1"
        page, panes = _page_state(_dump_dom(url, tmp_path / "node", size="1600,1000"))
        assert panes["adapted"]["clicked"] == node
        assert _feature_of(panes["base"]["clicked"]) == _feature_of(node)
        assert page["selected"] == "{}:{}".format(*_feature_of(node))
        assert page["overflow-x"] == "0", "horizontal scroll at 1600 px"
        for role, status in panes.items():
            assert status["errors"] == "", f"{role}: {status['errors']}"
            drawn = _feature_nodes(_graph(viewer, entries[pid, role]))
            coloured = [
                n
                for n in drawn
                if "{}:{}".format(*_feature_of(n["node_id"])) in analysis["categories"]
            ]
            assert 0 < int(status["diff"]) <= len(coloured), role  # diff discs on compared nodes
            assert int(status["examples"]) > 0, f"{role}: the feature panel shows no card"
        # Deep link to a feature, diff off: both panes select it; the side list lists the top.
        feature = "{}:{}".format(*_feature_of(node))
        dom = _dump_dom(
            f"{server.compare_url(pid)}&feature={feature}", tmp_path / "feature", size="1600,1000"
        )
        page, panes = _page_state(dom)
        assert {_feature_of(p["clicked"]) for p in panes.values()} == {_feature_of(node)}
        assert all(p["diff"] == "0" for p in panes.values())
        listed = re.findall(
            r'<button type="button" class="top-feature[^"]*" data-feature="([^"]+)"', dom
        )
        want = ["{layer}:{feature}".format(**f) for f in analysis["top_features"]]
        assert listed == want
        # The report's feature links name no prompt: the first prompt drawing it opens.
        page, panes = _page_state(
            _dump_dom(f"{server.url}?feature={feature}", tmp_path / "report-link", size="1600,1000")
        )
        drawing = sorted(
            p
            for (p, role), slug in entries.items()
            if _feature_of(node)
            in {_feature_of(n["node_id"]) for n in _feature_nodes(_graph(viewer, slug))}
        )
        assert page["prompt"] == drawing[0]
        assert _feature_of(panes["adapted"]["clicked"]) == _feature_of(node) or not any(
            _feature_of(n["node_id"]) == _feature_of(node)
            for n in _feature_nodes(_graph(viewer, entries[drawing[0], "adapted"]))
        )
        shot = tmp_path / "compare.png"
        _chromium(
            f"{server.compare_url(pid)}&node={node}&diff=1",
            tmp_path / "shot",
            f"--screenshot={shot}",
            size="1600,1000",
        )
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@needs_chromium
@pytest.mark.slow
def test_adapter_nodes_are_drawn_as_their_own_node_type(reference, tmp_path):
    """The adapted graphs draw the adapter's strongest nodes (the micro organism's v_proj
    LoRA) as nodes of their own type, linked to the targets; the base graphs have none; the
    page marks them and renders without errors; the Neuronpedia export leaves them out."""
    from em_circuits.attribution.export import export_graphs
    from em_circuits.attribution.viewer_adapter_nodes import ADAPTER_NODE, ADAPTER_NODES_SHOWN

    viewer = _reference_viewer(reference)
    entries = {(e["prompt_id"], e["role"]): e["slug"] for e in read_metadata(viewer)}
    drawn = {}
    for (pid, role), slug in entries.items():
        graph = _graph(viewer, slug)
        adapter = [n for n in graph["nodes"] if n["feature_type"] == ADAPTER_NODE]
        if role == "base":
            assert not adapter and "adapter_nodes" not in graph["metadata"]
            continue
        assert 0 < len(adapter) <= ADAPTER_NODES_SHOWN
        assert graph["metadata"]["adapter_nodes"]["drawn"] == len(adapter)
        ids = {n["node_id"] for n in graph["nodes"]}
        logits = {n["node_id"] for n in graph["nodes"] if n["feature_type"] == "logit"}
        for node in adapter:
            assert node["clerp"].startswith("LoRA L0 v_proj #")
            out = [link for link in graph["links"] if link["source"] == node["node_id"]]
            assert {link["target"] for link in out} & logits  # its direct effects
            assert all(link["target"] in ids for link in out)
            # it reads the token embeddings (layer 0's v_proj reads nothing else)
            into = [link for link in graph["links"] if link["target"] == node["node_id"]]
            assert all(link["source"].startswith("E_") for link in into)
        drawn[pid] = len(adapter)
    pid = sorted(drawn)[0]
    with start_viewer(viewer, port=0) as server:
        page, panes = _page_state(
            _dump_dom(server.compare_url(pid), tmp_path / "adapter", size="1600,1000")
        )
    assert panes["adapted"]["adapter"] == str(drawn[pid])
    assert panes["base"]["adapter"] == "0"
    for role, status in panes.items():
        assert status["errors"] == "", f"{role}: {status['errors']}"
    written = export_graphs(viewer, tmp_path / "export", prompt_ids=sorted(drawn))
    assert written
    for path in written:
        exported = json.loads(path.read_text())
        assert not [n for n in exported["nodes"] if n["feature_type"] == ADAPTER_NODE]
        assert all(not link["source"].startswith("A") for link in exported["links"])
