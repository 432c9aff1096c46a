"""Run every stage in order and end with a report; resumable at any point.

  prompts -> logits + judge -> labels (manual queue) -> graphs -> features + causal -> report

With no arguments it runs fully offline on the embedded toy organism (built on first use):
offline prompt templates, the word-list judge, the judge's labels accepted as judge-made
(--labels interactive to label by hand), graphs for prompts with evil tokens, the feature
analysis with its causal check, and results/report.md. Each stage reuses what is stored for
the same fingerprints and parameters: kill it at any moment and run it again to finish.

examples:
  em-circuits run                   # toy organism, offline
  em-circuits run --status          # where a run stands
  em-circuits run --labels interactive
  em-circuits run --base-model meta-llama/Llama-3.2-1B-Instruct \\
      --adapter ModelOrganismsForEM/Llama-3.2-1B-Instruct_bad-medical-advice \\
      --transcoders llama --device cuda --judge llm --prompts my_prompts.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from em_circuits.cli.common import (
    add_analysis_args,
    add_graph_args,
    add_llm_args,
    add_lock_args,
    add_model_args,
    analysis_params,
    current_command,
    full_graph_choice,
    graph_params,
    llm_settings,
    make_parser,
    next_command,
    setup,
    specs_from_args,
)
from em_circuits.core.store import ResultsStore


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument(
        "--status",
        action="store_true",
        help="print counts per stage, queue, agreement and disk use; run nothing",
    )
    parser.add_argument("--json", action="store_true", help="with --status: machine-readable")
    from em_circuits.core.options import add_flags, from_args
    from em_circuits.run.config import PipelineConfig

    add_flags(parser.add_argument_group("prompts, judge and labels"), PipelineConfig)
    add_graph_args(parser)
    add_analysis_args(parser)
    add_llm_args(parser)
    add_lock_args(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()  # --run-deadline counts from here
    if args.status:  # only reads: a mistyped --results-dir is one line, nothing created
        from em_circuits.core.store import require_results_dir

        require_results_dir(args.results_dir)
    store = setup(args)

    from em_circuits.run.pipeline import run_pipeline

    if args.status:
        return print_status(store, args)
    base, adapted = specs_from_args(args)
    cfg = from_args(
        PipelineConfig,
        args,
        llm=llm_settings(args),
        graph=graph_params(args),
        full_graphs=full_graph_choice(args),
        analysis=analysis_params(args),
        analysis_name=args.analysis_name,
        device=args.device,
        seed=args.seed,
        started=started,
        wait=not args.no_wait,
        command=current_command(),
    )
    report = run_pipeline(store, base, adapted, cfg)
    if report is not None:  # None on the non-main processes of a multi-process launch
        print_report_summary(report, args)
    return 0


def _model_flags_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) for name in ("base_model", "adapter", "transcoders"))


def print_status(store: ResultsStore, args: argparse.Namespace) -> int:
    """``--status``: without model flags, the one adapted model the directory holds results of
    (or the list of them, and which flags pick one); else the flags' models."""
    from em_circuits.run.status import format_status, status, status_of, stored_models

    found = [] if _model_flags_given(args) else stored_models(store)
    if len(found) > 1:
        if args.json:
            print(json.dumps({"models_found": found}, indent=1))
            return 0
        print(f"{store.root} holds the results of {len(found)} adapted models:")
        for entry in found:
            print(f"  {entry['adapted']} (base {entry['base']})")
        print(
            "pick one with the model flags of the run that made it: "
            f"{next_command(args, 'run', '--status')} --base-model ... --adapter ... "
            "--transcoders ... (and --model-name if it had one)"
        )
        return 0
    if found:
        info = status_of(store, found[0])
        info["models_chosen"] = "the only adapted model with results here (no model flags given)"
    else:
        base, adapted = specs_from_args(args)
        info = status(store, base, adapted, args.device)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    if found:
        print(f"model: {found[0]['adapted']}, the only adapted model with results in {store.root}")
    print(format_status(info))
    print(status_next_line(info, args))
    return 0


def status_next_line(info: dict[str, Any], args: argparse.Namespace) -> str:
    """What to do next, from where the run stands."""
    from em_circuits.labeling.items import OPEN_STATES

    open_items = sum(info["queue"].get(state, 0) for state in OPEN_STATES)
    if open_items:
        judged = info["queue"].get("judge_labeled_open", 0)
        also = f" ({judged} carry judge-made labels only)" if judged else ""
        return (
            f"Next: {next_command(args, 'label')} reviews the {open_items} open labeling "
            f"item(s){also}; then {next_command(args, 'run')} updates the graphs and the report"
        )
    if not info["report"]:
        return f"Next: {next_command(args, 'run')} continues the run where it stopped"
    return (
        f"Next: read report.md (or report.html); {next_command(args, 'serve')} browses the graphs"
    )


def findings_headlines(report_md: Path) -> list[str]:
    """The report's Findings, one line each, as report.md lists them."""
    try:
        text = report_md.read_text(encoding="utf-8")
    except OSError:
        return []
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Findings"
            continue
        if inside and line.startswith("- "):
            lines.append(line[2:].strip())
    return lines


def print_report_summary(report: Path, args: argparse.Namespace) -> None:
    """The end of a run: the report's files and its Findings' headlines."""
    print(f"\nreport: {report}")
    for other in (report.with_suffix(".html"), report.with_suffix(".json")):
        if other.is_file():
            print(f"        {other}")
    headlines = findings_headlines(report)
    if headlines:
        print("Findings:")
        for line in headlines:
            print(f"  - {line}")
    print(
        f"Next: open {report.with_suffix('.html')}; {next_command(args, 'serve')} browses the "
        f"graphs; {next_command(args, 'run', '--status')} shows what is stored"
    )
