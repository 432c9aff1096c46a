"""What the command line tells a user to do next: Next: lines that keep the results directory
and models, `run --status` without model flags, the end of `run`, and a mistyped command."""

from __future__ import annotations

import csv
import re
import shutil

from test_queue import MODEL_FLAGS, _fill, _write_csv, make_results

from em_circuits.cli.main import main
from em_circuits.labeling.exchange import export_queue, import_labels
from em_circuits.labeling.items import enqueue_flagged


def _queued_with_human_labels(root, tmp_path):
    """A results directory with verdicts, a queue, and human labels on two of four items."""
    store, slug, pids = make_results(root)
    enqueue_flagged(store, slug)
    todo = tmp_path / "todo.csv"
    export_queue(store, slug, todo)
    with open(todo, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    _fill(rows, pids[0], {"T1": "evil", "T3": "evil"})
    _fill(rows, pids[1], {"T3": "unsure"})
    _write_csv(todo, rows)
    assert import_labels(store, slug, todo)["imported"] == 2
    return store, slug, pids


def test_a_mistyped_command_gets_the_closest_one(capsys):
    assert main(["anlyze"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown command 'anlyze'; did you mean `em-circuits analyze`?"]
    assert main(["zzzz"]) == 2
    assert "commands: organism, prompts" in capsys.readouterr().err


def test_next_lines_keep_the_results_dir_and_the_model_flags(tmp_path):
    from em_circuits.cli.common import next_command
    from em_circuits.cli.evaluate import build_parser

    args = build_parser().parse_args(
        [
            "--results-dir",
            str(tmp_path / "my results"),
            *MODEL_FLAGS,
            "--base-url",
            "http://u:pw@127.0.0.1:9/v1",
        ]
    )
    line = next_command(args, "label", "--auto-accept-judge")
    assert line.startswith("`em-circuits label --auto-accept-judge --results-dir ")
    assert f"'{tmp_path / 'my results'}'" in line  # quoted for a shell
    for flag in ("--base-model fake-org/tiny-base", "--adapter fake-org/tiny-em-adapter"):
        assert flag in line
    assert "--transcoders llama --device cpu --model-name toy-test" in line
    assert "--base-url" not in line  # `label` talks to no LLM
    graphs = next_command(args, "graphs")
    assert "--base-url http://127.0.0.1:9/v1" in graphs and "pw" not in graphs  # no secret
    default = next_command(build_parser().parse_args([]), "graphs")
    assert default == "`em-circuits graphs`"  # nothing to carry


def test_the_prompts_next_line_names_the_results_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("")
    results = tmp_path / "elsewhere"
    assert (
        main(["prompts", "-n", "1", "--generator", "offline", "--results-dir", str(results)]) == 0
    )
    out = capsys.readouterr().out
    assert f"Next: `em-circuits evaluate --results-dir {results}`" in out


def test_the_label_next_line_keeps_results_and_models(tmp_path, capsys):
    store, _, _ = _queued_with_human_labels(tmp_path / "results", tmp_path)
    assert main(["label", "--status", "--results-dir", str(store.root), *MODEL_FLAGS]) == 0
    out = capsys.readouterr().out
    assert (
        f"Next: `em-circuits graphs --results-dir {store.root} --base-model fake-org/tiny-base "
        "--adapter fake-org/tiny-em-adapter --transcoders llama --device cpu --model-name "
        "toy-test`" in out
    )


def test_status_without_model_flags_shows_the_one_stored_model(tmp_path, capsys):
    store, slug, _ = _queued_with_human_labels(tmp_path / "results", tmp_path)
    assert main(["run", "--status", "--results-dir", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert f"model: {slug}, the only adapted model with results in {store.root}" in out
    assert "logits: base 4, adapted 4" in out and "verdicts: 4" in out
    kappa = re.search(r"kappa: (\S+)", out)
    assert kappa is not None and re.fullmatch(r"-?\d\.\d{3}", kappa.group(1)), out
    # Two items stay open: the next step is labeling them, on the same results.
    assert f"Next: `em-circuits label --results-dir {store.root}` reviews the 2 open" in out


def test_status_with_several_models_lists_them_and_the_flags_that_pick_one(tmp_path, capsys):
    store, slug, _ = _queued_with_human_labels(tmp_path / "results", tmp_path)
    shutil.copytree(store.verdicts_dir(slug), store.verdicts_dir(slug + "-second"))
    assert main(["run", "--status", "--results-dir", str(store.root)]) == 0
    out = capsys.readouterr().out
    assert "holds the results of 2 adapted models" in out
    assert slug in out and f"{slug}-second" in out
    assert "--base-model ... --adapter ... --transcoders ..." in out


def test_the_end_of_a_run_names_report_html_and_the_findings(tmp_path, capsys):
    import argparse

    from em_circuits.cli.run import print_report_summary

    report = tmp_path / "report.md"
    report.write_text(
        "# Report\n\nintro\n\n## Findings\n\n- The top features drive the evil token (p = 0.01)."
        "\n- Ablating them lowers the EM rate.\n\n## Counts\n\n- not a finding\n"
    )
    report.with_suffix(".html").write_text("<html></html>")
    report.with_suffix(".json").write_text("{}")
    print_report_summary(report, argparse.Namespace(results_dir=str(tmp_path)))
    out = capsys.readouterr().out
    assert str(report.with_suffix(".html")) in out
    assert "  - The top features drive the evil token (p = 0.01)." in out
    assert "  - Ablating them lowers the EM rate." in out and "not a finding" not in out
    assert f"Next: open {report.with_suffix('.html')}; `em-circuits serve --results-dir" in out
