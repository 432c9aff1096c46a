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

import json
import time
from pathlib import Path

from em_circuits.cli.common import (
    add_analysis_args,
    add_graph_args,
    add_llm_args,
    add_model_args,
    analysis_params,
    full_graph_choice,
    graph_params,
    llm_settings,
    make_parser,
    setup,
    specs_from_args,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument(
        "--status",
        action="store_true",
        help="print counts per stage, queue, agreement and disk use; run nothing",
    )
    parser.add_argument("--json", action="store_true", help="with --status: machine-readable")
    g = parser.add_argument_group("prompts and judge")
    g.add_argument(
        "--n-prompts", type=int, default=40, help="generate prompts until this many are stored"
    )
    g.add_argument(
        "--prompts",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="import a prompt file (prior-art format: list or object with name, "
        "prompt); repeatable",
    )
    g.add_argument(
        "--generator",
        choices=["auto", "offline", "llm"],
        default="auto",
        help="auto = llm if OPENAI_API_KEY is set (env or .env), else offline",
    )
    g.add_argument(
        "--judge",
        choices=["auto", "offline", "llm"],
        default="auto",
        help="auto = llm if OPENAI_API_KEY is set, else the organism's word lists",
    )
    g.add_argument(
        "--labels",
        choices=["auto", "interactive", "import"],
        default="auto",
        help="auto: accept the judge's labels, recorded as judge-made; interactive: "
        "label in the terminal; import: read --labels-file",
    )
    g.add_argument("--labels-file", type=Path, help="CSV/JSONL labels for --labels import")
    g.add_argument(
        "--all-labeled",
        action="store_true",
        help="graph every labeled prompt, not only those with evil tokens",
    )
    parser.add_argument(
        "--words",
        type=Path,
        help="offline judge word lists (JSON with 'harmful' and 'safe' lists; needed for "
        "models other than the toy organism unless the LLM judge is used)",
    )
    add_graph_args(parser)
    add_analysis_args(parser)
    add_llm_args(parser)
    args = parser.parse_args(argv)
    started = time.monotonic()  # --run-deadline counts from here
    if args.status:  # only reads: a mistyped --results-dir is one line, nothing created
        from em_circuits.core.store import require_results_dir

        require_results_dir(args.results_dir)
    store = setup(args)

    from em_circuits.run.pipeline import PipelineConfig, run_pipeline
    from em_circuits.run.status import format_status, status

    base, adapted = specs_from_args(args)
    if args.status:
        info = status(store, base, adapted, args.device)
        print(json.dumps(info, indent=1) if args.json else format_status(info))
        return 0
    cfg = PipelineConfig(
        n_prompts=args.n_prompts,
        prompt_files=args.prompts,
        generator=args.generator,
        judge=args.judge,
        llm=llm_settings(args),
        labels=args.labels,
        labels_file=args.labels_file,
        only_evil=not args.all_labeled,
        graph=graph_params(args),
        full_graphs=full_graph_choice(args),
        words=args.words,
        analysis=analysis_params(args),
        analysis_name=args.analysis_name,
        device=args.device,
        seed=args.seed,
        started=started,
    )
    report = run_pipeline(store, base, adapted, cfg)
    if report is not None:  # None on the non-main processes of a multi-process launch
        print(f"\nreport: {report}\n        {report.with_suffix('.json')}")
        print(
            "Next: read the report; `em-circuits serve` browses the graphs; "
            "`em-circuits run --status` shows what is stored"
        )
    return 0
