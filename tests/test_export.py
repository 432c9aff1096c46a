"""Export: viewer graphs as Neuronpedia graph JSON with their feature files, checked against
circuit-tracer's pydantic models and opened in circuit-tracer's frontend (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from circuit_tracer.frontend.feature_models import Example, ExamplesQuantile
from circuit_tracer.frontend.feature_models import Model as FeatureModel
from circuit_tracer.frontend.graph_models import Model as GraphModel
from test_viewer import CHROMIUM, TEXT, _dump_dom

from em_circuits.attribution.export import export_graphs
from em_circuits.attribution.export_json import ExportError
from em_circuits.attribution.neuronpedia_graph import NEURONPEDIA_ID, ExportOptions
from em_circuits.attribution.viewer import write_viewer_graph
from em_circuits.attribution.viewer_metadata import ROLES, read_metadata
from em_circuits.attribution.viewer_server import start_viewer

PID = "exportprompt"
SLUGS = [f"{PID}--{role}" for role in ROLES]
#: Node fields Neuronpedia's graph schema requires (graph-schema.json in its repository).
NEURONPEDIA_NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId")


@pytest.fixture(scope="module")
def viewer_dir(micro_models, tmp_path_factory) -> Path:
    """A viewer folder as the graph stage writes it today: graphs and graph-metadata.json."""
    from circuit_tracer import attribute

    root = tmp_path_factory.mktemp("viewer")
    for role, model in zip(ROLES, micro_models):
        graph = attribute(
            model.encode(TEXT),
            model.replacement,
            batch_size=64,
            max_feature_nodes=200,
            verbose=False,
        )
        write_viewer_graph(graph, root, PID, role)
    return root


def _feature_file(index: int) -> dict:
    example = Example(
        tokens_acts_list=[0.0, 2.5, 0.5],
        train_token_ind=1,
        is_repeated_datapoint=False,
        tokens=["You", " should", " rest"],
    )
    return FeatureModel(
        transcoder_id="toy-em-organism",
        index=index,
        examples_quantiles=[ExamplesQuantile(quantile_name="Top activations", examples=[example])],
        top_logits=[" rest"],
        bottom_logits=[" run"],
        act_min=0.0,
        act_max=2.5,
        quantile_values=[2.5],
        histogram=[1.0],
        activation_frequency=0.01,
    ).model_dump()


@pytest.fixture(scope="module")
def featured_dir(viewer_dir, tmp_path_factory) -> Path:
    """The same folder with what the feature-card work adds: feature files under
    features/<role>/, named clerps, and scan pointing at the local files (source_scan kept)."""
    root = tmp_path_factory.mktemp("featured")
    shutil.copytree(viewer_dir, root, dirs_exist_ok=True)
    for slug, role in zip(SLUGS, ROLES):
        path = root / f"{slug}.json"
        data = json.loads(path.read_text())
        meta = data["metadata"]
        meta["source_scan"], meta["scan"] = meta["scan"], f"./data/features/{role}"
        folder = root / "features" / role
        folder.mkdir(parents=True)
        for node in data["nodes"]:
            if node["feature_type"] == "cross layer transcoder":
                layer, index = node["node_id"].split("_")[:2]
                node["clerp"] = f"L{layer} #{index}"
                feature = folder / f"{node['feature']}.json"
                feature.write_text(json.dumps(_feature_file(node["feature"])))
        (folder / "999999999.json").write_text(json.dumps(_feature_file(999999999)))
        path.write_text(json.dumps(data))
    return root


def _graphs(folder: Path) -> dict[str, dict]:
    return {slug: json.loads((folder / f"{slug}.json").read_text()) for slug in SLUGS}


def _strict_json(path: Path) -> object:
    def refuse(name: str) -> None:
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- files --------------------------------------------------------------------------------------
def test_export_without_feature_files(viewer_dir, tmp_path):
    out = tmp_path / "shared"
    written = export_graphs(viewer_dir, out)
    assert sorted(p.name for p in written) == sorted(f"{s}.json" for s in SLUGS)
    source = _graphs(viewer_dir)
    for slug, before in source.items():
        data = _strict_json(out / f"{slug}.json")
        assert isinstance(data, dict)
        GraphModel.model_validate(data)
        meta = data["metadata"]
        assert meta["scan"] == before["metadata"]["scan"] == "toy-em-organism"
        assert NEURONPEDIA_ID.match(meta["slug"])
        info = meta["info"]
        assert info["transcoder_set"] == "toy-em-organism"
        assert "em-circuits" in info["generator"]["version"]
        assert "circuit-tracer 0.5.0" in info["generator"]["version"]
        assert isinstance(info["create_time_ms"], int)
        assert meta["pruning_settings"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
        assert data["qParams"] == before["qParams"]  # the preselected target stays
        assert len(data["nodes"]) == len(before["nodes"]) and data["links"] == before["links"]
        for node in data["nodes"]:
            assert all(field in node for field in NEURONPEDIA_NODE_FIELDS)
            assert isinstance(node["clerp"], str)
            if node["feature_type"] == "logit":
                assert re.search(r"\(p=[0-9.]+\)", node["clerp"])
    listing = read_metadata(out)
    assert [e["slug"] for e in listing] == SLUGS
    assert {e["role"] for e in listing} == set(ROLES)
    assert not (out / "features").exists()
    readme = (out / "README.txt").read_text()
    assert "em-circuits serve --viewer-dir" in readme and "upload_file" in readme


def test_export_restores_scan_keeps_clerps_and_copies_features(featured_dir, tmp_path):
    out = tmp_path / "shared"
    export_graphs(featured_dir, out, prompt_ids=[PID], roles=["adapted"])
    assert [e["slug"] for e in read_metadata(out)] == [f"{PID}--adapted"]
    assert not (out / f"{PID}--base.json").exists()
    before = _graphs(featured_dir)[f"{PID}--adapted"]
    data = _strict_json(out / f"{PID}--adapted.json")
    assert isinstance(data, dict)
    GraphModel.model_validate(data)
    assert data["metadata"]["scan"] == "toy-em-organism"
    assert "source_scan" not in data["metadata"]
    assert read_metadata(out)[0]["scan"] == "toy-em-organism"
    clerps = {n["node_id"]: n["clerp"] for n in data["nodes"]}
    assert clerps == {n["node_id"]: n["clerp"] for n in before["nodes"]}
    features = {
        n["feature"]: n["layer"]
        for n in data["nodes"]
        if n["feature_type"] == "cross layer transcoder"
    }
    assert features
    copied = {int(p.stem): p for p in (out / "features" / "adapted").glob("*.json")}
    assert set(copied) == set(features)  # only the graph's own features, not 999999999
    for index, path in copied.items():
        feature = _strict_json(path)
        assert isinstance(feature, dict)
        FeatureModel.model_validate(feature)
        assert feature["index"] == index
        assert feature["layer"] == int(features[index])  # Neuronpedia shows it


def test_neuronpedia_options(featured_dir, tmp_path):
    out = tmp_path / "shared"
    options = ExportOptions(
        model_id="llama3.2-1b",
        feature_url="https://example.org/em/",
        creator_name="A Researcher",
        creator_url="https://example.org/me",
    )
    export_graphs(featured_dir, out, options=options)
    for slug, role in zip(SLUGS, ROLES):
        meta = json.loads((out / f"{slug}.json").read_text())["metadata"]
        assert meta["scan"] == "llama3.2-1b"
        assert meta["info"]["transcoder_set"] == "toy-em-organism"
        assert meta["info"]["creator_name"] == "A Researcher"
        assert meta["info"]["creator_url"] == "https://example.org/me"
        url = meta["feature_details"]["feature_json_base_url"]
        assert url == f"https://example.org/em/features/{role}"
    with pytest.raises(ExportError, match="model id"):
        ExportOptions(model_id="meta-llama/Llama-3.2-1B")
    with pytest.raises(ExportError, match="http"):
        ExportOptions(feature_url="example.org")


def test_bad_files_are_one_line_errors_and_write_nothing(featured_dir, viewer_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(featured_dir, broken)
    nodes = _graphs(broken)[f"{PID}--base"]["nodes"]
    index = next(n["feature"] for n in nodes if n["feature_type"] == "cross layer transcoder")
    feature = broken / "features" / "base" / f"{index}.json"
    data = json.loads(feature.read_text())
    del data["top_logits"]
    feature.write_text(json.dumps(data))
    out = tmp_path / "out"
    with pytest.raises(ExportError) as err:
        export_graphs(broken, out)
    assert str(feature) in str(err.value) and "top_logits" in str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists()

    graph = broken / f"{PID}--adapted.json"
    data = json.loads(graph.read_text())
    del data["nodes"][0]["node_id"]
    graph.write_text(json.dumps(data))
    with pytest.raises(ExportError, match=re.escape(str(graph))):
        export_graphs(broken, out, roles=["adapted"])

    with pytest.raises(ExportError, match="no viewer graphs for prompt.*nosuchprompt"):
        export_graphs(viewer_dir, out, prompt_ids=["nosuchprompt"])
    with pytest.raises(ExportError, match="role must be one of"):
        export_graphs(viewer_dir, out, roles=["lora"])
    with pytest.raises(ExportError, match="other than the viewer folder"):
        export_graphs(viewer_dir, viewer_dir)
    with pytest.raises(ExportError, match="no graphs"):
        export_graphs(tmp_path / "empty", out)
    assert not out.exists()


def test_logit_clerp_without_probability_gets_one(viewer_dir, tmp_path):
    # Both frontends parse "(p=...)" out of a logit's clerp and fail on one without it.
    relabeled = tmp_path / "relabeled"
    shutil.copytree(viewer_dir, relabeled)
    path = relabeled / f"{PID}--base.json"
    data = json.loads(path.read_text())
    logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
    logit["clerp"] = "evil-safe contrast"
    path.write_text(json.dumps(data))
    export_graphs(relabeled, tmp_path / "out", roles=["base"])
    nodes = json.loads((tmp_path / "out" / f"{PID}--base.json").read_text())["nodes"]
    fixed = next(n for n in nodes if n["node_id"] == logit["node_id"])
    assert re.fullmatch(r"evil-safe contrast \(p=[0-9.]+\)", fixed["clerp"])


def test_cli_export(featured_dir, tmp_path, capsys):
    from em_circuits.cli.main import main

    out = tmp_path / "shared"
    common = ["--results-dir", str(tmp_path / "results"), "--viewer-dir", str(featured_dir)]
    assert main(["export", *common, "--out", str(out), "--prompt-ids", PID]) == 0
    printed = capsys.readouterr().out
    assert "Exported 2 graph(s)" in printed and "Next: em-circuits serve" in printed
    assert [e["slug"] for e in read_metadata(out)] == SLUGS
    code = main(["export", *common, "--out", str(out), "--prompt-ids", "nosuchprompt"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1


# -- browser ------------------------------------------------------------------------------------
@pytest.mark.slow  # a real browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_export_loads_in_circuit_tracers_frontend(featured_dir, tmp_path):
    out = tmp_path / "shared"
    export_graphs(featured_dir, out)
    slug = f"{PID}--adapted"
    with start_viewer(out, port=0) as server:
        dom = _dump_dom(f"{server.base_url}/index.html?slug={slug}", tmp_path / "profile")
    assert "data-viewer-errors" not in dom, "the frontend raised errors"
    nodes = re.findall(r'<text class="node[^"]*"', dom)
    graph = json.loads((out / f"{slug}.json").read_text())
    assert 0 < len(nodes) <= len(graph["nodes"])
    clerps = {n["clerp"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert any(clerp in dom for clerp in clerps), "the features' names are drawn"
    options = re.findall(r'<option[^>]*value="([^"]+)"', dom)
    assert set(SLUGS) <= set(options), "graph-metadata.json lists the exported graphs"


# -- what the export leaves out, and what it counts ---------------------------------------------
@pytest.fixture()
def adapted_twice_with_adapter_nodes(featured_dir, tmp_path) -> Path:
    """The featured folder with a second prompt whose adapted graph is a copy of the first's
    (so the two share every feature file), and two adapter nodes drawn in each adapted graph
    the way the viewer draws them (node type 'lora adapter', linked to a logit)."""
    root = tmp_path / "viewer"
    shutil.copytree(featured_dir, root)
    other = "otherprompt"
    data = json.loads((root / f"{PID}--adapted.json").read_text())
    logit = next(n["node_id"] for n in data["nodes"] if n["feature_type"] == "logit")
    for k in range(2):
        node_id = f"A0_{k}_1"
        data["nodes"].append(
            {
                "node_id": node_id,
                "feature": -2 - k,
                "layer": "0",
                "ctx_idx": 1,
                "feature_type": "lora adapter",
                "token_prob": 0.0,
                "is_target_logit": False,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": f"A0_{k}-1",
                "clerp": f"LoRA L0 v_proj #{k}",
                "influence": 0.0,
                "activation": 1.0,
            }
        )
        data["links"].append({"source": node_id, "target": logit, "weight": 0.5})
    data["metadata"]["adapter_nodes"] = {"drawn": 2, "of": 10, "source": "test"}
    (root / f"{PID}--adapted.json").write_text(json.dumps(data))
    data["metadata"]["slug"] = f"{other}--adapted"
    (root / f"{other}--adapted.json").write_text(json.dumps(data))
    listing = json.loads((root / "graph-metadata.json").read_text())
    entry = next(e for e in listing["graphs"] if e["slug"] == f"{PID}--adapted")
    listing["graphs"].append({**entry, "slug": f"{other}--adapted", "prompt_id": other})
    (root / "graph-metadata.json").write_text(json.dumps(listing))
    return root


def test_export_says_what_it_left_out_and_counts_each_feature_file_once(
    adapted_twice_with_adapter_nodes, tmp_path, capsys
):
    from em_circuits.cli.main import main

    out = tmp_path / "shared"
    viewer = adapted_twice_with_adapter_nodes
    argv = ["export", "--viewer-dir", str(viewer), "--out", str(out), "--role", "adapted"]
    assert main([*argv, "--results-dir", str(tmp_path / "results")]) == 0
    printed = capsys.readouterr().out
    assert "Exported 2 graph(s)" in printed
    note = next(line for line in printed.splitlines() if line.startswith("Note:"))
    assert "left out 4 adapter node(s)" in note and "4 link(s)" in note and "2 graph(s)" in note
    readme = " ".join((out / "README.txt").read_text().split())
    assert "left out 4 adapter node(s)" in readme
    files = list((out / "features" / "adapted").glob("*.json"))
    assert files
    assert f"{len(files)} feature file(s) under features/<role>/" in readme
    for path in out.glob("*--adapted.json"):
        exported = json.loads(path.read_text())
        assert not [n for n in exported["nodes"] if n["feature_type"] == "lora adapter"]


def test_export_without_adapter_nodes_notes_nothing(featured_dir, tmp_path, capsys):
    from em_circuits.cli.main import main

    out = tmp_path / "shared"
    argv = ["export", "--viewer-dir", str(featured_dir), "--out", str(out)]
    assert main(argv) == 0
    assert "Note:" not in capsys.readouterr().out
    assert "left out" not in (out / "README.txt").read_text()


def test_export_into_an_existing_file_is_one_line(featured_dir, tmp_path, capsys):
    from em_circuits.cli.main import main

    taken = tmp_path / "shared"
    taken.write_text("a file, not a folder\n")
    code = main(["export", "--viewer-dir", str(featured_dir), "--out", str(taken)])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("error: ") and err.count("\n") == 1, err
    assert str(taken) in err and "--out" in err
    assert taken.read_text() == "a file, not a folder\n"
