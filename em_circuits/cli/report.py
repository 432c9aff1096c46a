"""Write results/report.md and report.json from what the stages have stored.

Reads the prompts, verdicts, labels, graphs and the analysis tables of one adapted model and
its base; computes nothing new, so it is quick and can be re-run after any stage.

examples:
  em-circuits report
  em-circuits report --results-dir results-llama --base-model ... --adapter ... --transcoders llama
"""

from __future__ import annotations

from em_circuits.cli.common import (
    add_lock_args,
    add_model_args,
    make_parser,
    next_command,
    setup,
    specs_from_args,
    stage_lock_for,
)
from em_circuits.core.store import require_results_dir


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    add_lock_args(parser)
    args = parser.parse_args(argv)
    require_results_dir(args.results_dir)  # reads only: a mistyped folder is an error
    store = setup(args)

    from em_circuits.models.spec import resolve_device
    from em_circuits.run.report import write_report

    base, adapted = specs_from_args(args)
    with stage_lock_for(args, store.root, "report"):
        path = write_report(store, base, adapted, str(resolve_device(args.device)))
    print(f"report: {path}\n        {path.with_suffix('.json')}")
    print(f"Next: open {path}, or browse the graphs with {next_command(args, 'serve')}")
    return 0
