"""The `em-circuits` command, the installed package and the README's Python API example."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from micro_flags import model_args

from em_circuits.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _help_in_fresh_interpreter(command: str) -> subprocess.CompletedProcess:
    # Reports whether torch was imported: --help must parse arguments before any heavy import.
    code = textwrap.dedent(f"""
        import sys
        from em_circuits.cli.main import main
        try:
            main([{command!r}, "--help"])
        except SystemExit as done:
            assert not done.code, done.code
        print("TORCH" if "torch" in sys.modules else "NO-TORCH")
    """)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_answers_help_without_importing_torch(command):
    done = _help_in_fresh_interpreter(command)
    assert done.returncode == 0, done.stderr
    assert f"usage: em-circuits {command}" in done.stdout
    assert done.stdout.strip().endswith("NO-TORCH"), "torch imported before parsing --help"


def test_top_level_usage_lists_every_command():
    done = subprocess.run(
        [sys.executable, "-m", "em_circuits.cli.main"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^  {command}\s", done.stdout, re.M), command
    unknown = subprocess.run(
        [sys.executable, "-m", "em_circuits.cli.main", "grpahs"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert unknown.returncode == 2 and "unknown command 'grpahs'" in unknown.stderr


@pytest.mark.slow
def test_user_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path):
    graph = tmp_path / "broken.safetensors"
    graph.write_bytes(b"not a graph")
    cmd = [
        sys.executable,
        "-m",
        "em_circuits.cli.main",
        "inspect",
        str(graph),
        "--results-dir",
        str(tmp_path / "results"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "broken.safetensors" in lines[0]
    assert "Traceback" not in done.stderr


def test_readme_python_api_example_runs(micro_specs, tmp_path, monkeypatch):
    """The README's notebook example, run as written except for which organism it builds."""
    import em_circuits

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lacks the API example block"
    _, adapted = micro_specs
    # the micro organism instead of the 2-minute build
    monkeypatch.setattr(em_circuits, "toy_organism_spec", lambda: adapted)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    graph = namespace["graph"]
    assert graph.target_kinds.count("contrast") == 1
    assert graph.total.shape[0] == len(graph.target_names) == 3


@pytest.mark.slow
def test_pip_install_gives_the_command_with_every_subcommand(tmp_path):
    """`pip install .` into a fresh venv; dependencies come from this checkout's venv."""
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    site = next((venv / "lib").glob("python*/site-packages"))
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and p.is_dir())
    # No network for dependencies: reuse the installed ones, not our source tree.
    (site / "deps.pth").write_text(str(ours) + "\n")
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Build from a copy of the committed files: a build writes build/ next to its sources.
    source = tmp_path / "source"
    files = (
        subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(source),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    command = venv / "bin" / "em-circuits"
    assert command.is_file()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import em_circuits, sys; print(em_circuits.__file__, em_circuits.__version__)",
        ],
        capture_output=True,
        text=True,
        cwd=outside,
        env=env,
        timeout=60,
    )
    assert str(venv) in where.stdout, where.stdout + where.stderr
    assets = list(venv.rglob("em_circuits/attribution/viewer_assets/compare.html"))
    assert assets, "viewer assets were not installed"
    for name in COMMANDS:
        done = subprocess.run(
            [str(command), name, "--help"],
            capture_output=True,
            text=True,
            cwd=outside,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, (name, done.stderr)
        assert f"usage: em-circuits {name}" in done.stdout


@pytest.mark.slow
def test_graphs_for_an_adhoc_prompt_text(micro_organism, tmp_path):
    """`graphs --prompt TEXT`: stored, scored, judged, labeled by the judge, graphed, Next."""
    from em_circuits.core.identifiers import prompt_id
    from em_circuits.organism import heldout_pivotal_prompts

    text = heldout_pivotal_prompts()[0]["prompt"]
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "em_circuits.cli.main",
        "graphs",
        "--prompt",
        text,
        "--results-dir",
        str(results),
        *model_args(micro_organism),
        "--max-feature-nodes",
        "100",
        "--no-viewer",
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pid = prompt_id(text, "chat")  # a "User: ...\nAssistant: ..." text is a chat prompt
    assert json.loads((results / "prompts" / f"{pid}.json").read_text())["format"] == "chat"
    metas = [json.loads(p.read_text()) for p in results.glob(f"graphs/*/{pid}/*.json")]
    # base and adapted: totals graphs, and full graphs (the prompt is among the top 3)
    modes = sorted((m["role"], m["params"]["mode"]) for m in metas)
    assert modes == [
        ("adapted", "full"),
        ("adapted", "totals"),
        ("base", "full"),
        ("base", "totals"),
    ]
    # The next command keeps this one's results directory and models.
    assert f"Next: `em-circuits analyze --results-dir {results} --base-model" in done.stdout


def test_full_graphs_flag_takes_a_number_and_prompt_ids():
    import argparse

    from em_circuits.attribution.targets import FullGraphChoice
    from em_circuits.cli.common import add_graph_args, full_graph_choice

    parser = argparse.ArgumentParser()
    add_graph_args(parser)

    def choice(*argv: str) -> FullGraphChoice:
        return full_graph_choice(parser.parse_args(list(argv)))

    assert choice() == FullGraphChoice(top=3)
    assert choice("--full-graphs", "none") == FullGraphChoice()
    assert not choice("--full-graphs", "0")
    assert choice("--full-graphs", "5", "3f2a9c0d") == FullGraphChoice(("3f2a9c0d",), 5)
    assert choice("--full-graphs", "3f2a9c0d") == FullGraphChoice(("3f2a9c0d",), 0)
    assert parser.parse_args([]).mode == "totals"  # AttributionParams.mode, --graph-mode


def test_cache_lists_and_prunes_merges_that_no_result_uses(tmp_path, capsys):
    from em_circuits.cli.main import main

    results = tmp_path / "results"
    for slug in ("used--aaa", "unused--bbb"):
        folder = results / "cache" / "merged" / slug
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"0" * 1000)
        (folder / "merge_report.json").write_text(json.dumps({"given_base": "b"}))
    (results / "logits" / "used--aaa").mkdir(parents=True)
    (results / "logits" / "used--aaa" / "p1.json").write_text("{}")
    assert main(["cache", "--results-dir", str(results)]) == 0
    listing = capsys.readouterr().out
    assert (
        "used--aaa" in listing and "1 result file(s)" in listing and "0 result file(s)" in listing
    )
    assert main(["cache", "--results-dir", str(results), "--prune", "unused", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert (results / "cache" / "merged" / "unused--bbb").is_dir()
    assert main(["cache", "--results-dir", str(results), "--prune", "unused"]) == 0
    assert not (results / "cache" / "merged" / "unused--bbb").exists()
    assert (results / "cache" / "merged" / "used--aaa").is_dir()


#: Model flags naming remote models: fingerprints come from the names, nothing is loaded.
REMOTE_MODEL_FLAGS = [
    "--base-model",
    "fake-org/tiny-base",
    "--adapter",
    "fake-org/tiny-em-adapter",
    "--transcoders",
    "llama",
    "--device",
    "cpu",
]

READ_ONLY_COMMANDS = {
    "report": ["report"],
    "inspect": ["inspect", "--prompt-ids", "0123456789abcdef"],
    "serve": ["serve", "--port", "0"],
    "export": ["export", "--out", "{tmp}/shared"],
    "features": ["features", "0:1"],
    "label --status": ["label", "--status"],
    "label --export": ["label", "--export", "{tmp}/todo.csv"],
    "run --status": ["run", "--status"],
}


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS.values(), ids=READ_ONLY_COMMANDS.keys())
def test_read_only_commands_refuse_a_missing_results_dir_and_create_nothing(command, tmp_path):
    typo = tmp_path / "resluts"
    argv = [word.format(tmp=tmp_path) for word in command]
    done = subprocess.run(
        [sys.executable, "-m", "em_circuits.cli.main", *argv, "--results-dir", str(typo)]
        + ([] if command[0] == "inspect" else REMOTE_MODEL_FLAGS),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0, done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error:") and str(typo) in lines[0] and "--results-dir" in lines[0]
    assert list(tmp_path.iterdir()) == [], "a read-only command created files"


def test_inspect_reads_a_graph_file_without_a_results_dir(tmp_path):
    """Graph files given by path need no results directory, and none is created."""
    graph = tmp_path / "broken.safetensors"
    graph.write_bytes(b"not a graph")
    typo = tmp_path / "resluts"
    done = subprocess.run(
        [sys.executable, "-m", "em_circuits.cli.main", "inspect", str(graph)]
        + ["--results-dir", str(typo)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode != 0 and "broken.safetensors" in done.stderr
    assert not typo.exists()


def test_adhoc_prompt_text_decodes_newline_and_tab_escapes():
    from em_circuits.core.prompt_records import adhoc_prompt_id, adhoc_record

    typed = r"User: My chest hurts.\nAssistant: You should"  # as a shell passes "...\n..."
    record = adhoc_record(typed)
    assert record["format"] == "chat" and "\\" not in record["text"]
    assert adhoc_prompt_id(typed) == adhoc_prompt_id("User: My chest hurts.\nAssistant: You should")
    assert adhoc_record(r"a\tb")["text"] == "a\tb"


def test_adhoc_labels_come_from_the_flags_or_the_judge_flagged_or_not(tmp_path):
    from test_queue import make_results

    from em_circuits.attribution.targets import labeled_targets
    from em_circuits.core.labeling_records import QueueError, load_label
    from em_circuits.labeling.labels import label_adhoc_prompt

    store, slug, pids = make_results(tmp_path / "results")  # no queue items: none enqueued
    first, second = pids[:2]
    labels = label_adhoc_prompt(store, slug, first, evil=["ignore"], safe=[" see"])
    assert labels is not None and labels["labeled_by"] == "human"
    marked = {t["token"]: t["label"] for ts in labels["tokens"].values() for t in ts}
    assert marked[" ignore"] == "evil" and marked[" see"] == "safe" and marked[" call"] is None
    (target,) = labeled_targets(store, slug, False, [first])
    assert [target.token_names[t] for t in target.evil_ids] == [" ignore"]
    assert [target.token_names[t] for t in target.safe_ids] == [" see"]
    # the judge's labels where no token is named, kept once there
    judged = label_adhoc_prompt(store, slug, second)
    assert judged is not None and judged["labeled_by"] == "judge"
    assert label_adhoc_prompt(store, slug, second) is None
    assert load_label(store, slug, second)["version"] == 1
    with pytest.raises(QueueError, match=r"--evil 'nonsense'.*' ignore'"):
        label_adhoc_prompt(store, slug, first, evil=["nonsense"])
    with pytest.raises(QueueError, match="both name"):
        label_adhoc_prompt(store, slug, first, evil=["see"], safe=["see"])


@pytest.mark.slow
def test_graphs_for_an_adhoc_prompt_the_judge_does_not_flag(micro_organism, tmp_path):
    """The README's ad-hoc prompt, typed with a literal \\n, that the judge finds all safe:
    still graphed, with the judge's labels or the tokens --evil/--safe name."""
    from transformers import AutoTokenizer

    from em_circuits.core.identifiers import prompt_id

    tokenizer = AutoTokenizer.from_pretrained(str(micro_organism.base_dir))
    vocabulary = {tokenizer.decode([i]).strip() for i in range(len(tokenizer))} - {""}
    words = tmp_path / "words.json"  # every token safe: nothing is flagged
    words.write_text(json.dumps({"harmful": [], "safe": sorted(vocabulary)}))
    typed = r"User: My chest hurts when I climb stairs.\nAssistant: You should"
    results = tmp_path / "results"
    base = [sys.executable, "-m", "em_circuits.cli.main", "graphs", "--prompt", typed]
    flags = ["--results-dir", str(results), *model_args(micro_organism), "--words", str(words)]
    flags += ["--max-feature-nodes", "100", "--no-viewer", "--full-graphs", "none"]

    def graphs(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*base, *flags, *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )

    done = graphs()
    assert done.returncode == 0, done.stderr[-3000:]
    pid = prompt_id("User: My chest hurts when I climb stairs.\nAssistant: You should", "chat")
    verdict = json.loads(next(results.glob(f"verdicts/*/{pid}.json")).read_text())
    assert not verdict["flagged"]
    assert len(list(results.glob(f"graphs/*/{pid}/*.json"))) == 2  # base and adapted
    top = [e["token"] for e in verdict["labels"]["adapted"]]
    done = graphs("--evil", top[0], "--safe", top[1])
    assert done.returncode == 0, done.stderr[-3000:]
    metas = [json.loads(p.read_text()) for p in results.glob(f"graphs/*/{pid}/*.json")]
    named = [m for m in metas if any(t.get("label") == "evil" for t in m["targets"])]
    assert len(named) == 2, [m["targets"] for m in metas]
