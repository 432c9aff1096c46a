"""Label the judge-flagged prompts of one adapted model by hand (stage 4 of the pipeline)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from em_circuits.cli.common import (
    add_model_args,
    make_parser,
    next_command,
    setup,
    specs_from_args,
)
from em_circuits.core.labeling_records import QueueError
from em_circuits.core.store import ArtifactError, ResultsStore, require_results_dir
from em_circuits.labeling.calibration import calibration, calibration_path, format_calibration
from em_circuits.labeling.exchange import export_queue, import_labels
from em_circuits.labeling.items import STATES, QueueFilter, enqueue_flagged, status_counts
from em_circuits.labeling.labels import auto_accept_judge
from em_circuits.labeling.leases import describe_holder, live_leases
from em_circuits.labeling.tui import HELP, run_session

DESCRIPTION = """\
Label the judge-flagged prompts of one adapted model, in the terminal or through a file.

Every verdict flagged by the judge (any evil/unsure token in the adapted model's top-k) gets
a queue item, keyed by prompt id and model fingerprint. Without a mode flag, the items are
shown one by one: the prompt, the base list B1..B10 and the adapted list T1..T10 with logits,
probabilities, rank changes and the judge's tags; type ? on screen for the commands.

Every answer is saved at once: Ctrl-C or a closed terminal loses nothing already answered,
and the next run resumes with the interrupted item. Skipped items come back after the
pending ones. Labels go to labels/<adapted_slug>/<prompt_id>.json.

Several sessions may label one results directory at once: each leases the item it shows and
is offered items no other live session holds; an answer given on an item that another
session (or --import) saved meanwhile is refused with a message, never written over it.

examples:
  em-circuits label                                  label the toy organism's queue
  em-circuits label --status
  em-circuits label --export todo.csv                fill the 'label' column, then:
  em-circuits label --import todo.csv
  em-circuits label --calibration                    judge vs human agreement
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = make_parser(DESCRIPTION, prog)
    parser.epilog = "interactive screen:\n" + HELP
    add_model_args(parser)
    pick = parser.add_argument_group(
        "which items",
        "filters apply to interactive labeling, --status, --export and --auto-accept-judge",
    )
    pick.add_argument(
        "--adapted-slug",
        metavar="SLUG",
        help="use this results folder name (e.g. toy-em-organism--0123456789ab) instead of "
        "deriving it from the model flags; no model files are read",
    )
    pick.add_argument(
        "--only-evil",
        action="store_true",
        help="only prompts whose judge verdict on the adapted list is exactly 'evil'",
    )
    pick.add_argument(
        "--only-divergent",
        action="store_true",
        help="only divergent prompts (adapted list evil while the base list is safe)",
    )
    modes = parser.add_argument_group(
        "modes", "at most one; without any, label interactively in the terminal"
    )
    mode = modes.add_mutually_exclusive_group()
    mode.add_argument("--status", action="store_true", help="print item counts by state")
    mode.add_argument(
        "--export",
        metavar="FILE",
        type=Path,
        help="write one row per token (.csv or .jsonl) with an empty 'label' column to fill "
        "with evil/safe/unsure; already labeled prompts carry their human labels",
    )
    mode.add_argument(
        "--import",
        dest="import_file",
        metavar="FILE",
        type=Path,
        help="read labels from a filled export (.csv or .jsonl); every row is checked first "
        "and nothing is written unless all are valid; a prompt is labeled only when all its "
        "tokens are; optional 'explanation' column for disagreements with the judge",
    )
    mode.add_argument(
        "--auto-accept-judge",
        action="store_true",
        help="unattended: record the judge's labels (labeled_by=judge, never human) for open "
        "items without labels; the items stay open for a human to review",
    )
    mode.add_argument(
        "--calibration",
        action="store_true",
        help="print the judge-vs-human confusion matrix and Cohen's kappa over human-labeled "
        "tokens, and save it to labels/<adapted_slug>/calibration.json",
    )
    return parser


def resolve_slug(args: argparse.Namespace) -> str:
    """The adapted model's results folder name; reads fingerprints only, never loads weights."""
    if args.adapted_slug:
        return args.adapted_slug
    from em_circuits.models.spec import fingerprint, model_slug

    _, adapted = specs_from_args(args)
    return model_slug(adapted, fingerprint(adapted, args.device))


def check_known(store: ResultsStore, slug: str) -> str | None:
    """An error message when no stage has written anything for this model yet."""
    if store.verdicts_dir(slug).is_dir() or store.queue_dir(slug).is_dir():
        return None
    found = store.verdict_slugs()
    hint = (
        "models with verdicts: " + ", ".join(found) + " (pick one with --adapted-slug)"
        if found
        else "run `em-circuits evaluate` first"
    )
    return f"no verdicts or queue for model {slug} under {store.root}; {hint}"


def print_status(store: ResultsStore, slug: str, flt: QueueFilter) -> None:
    counts = status_counts(store, slug, flt)
    shown = [
        name
        for name, on in (("only evil", flt.only_evil), ("only divergent", flt.only_divergent))
        if on
    ]
    print(f"Queue of {slug}" + (f" ({', '.join(shown)})" if shown else ""))
    for state in STATES:
        print(f"  {state:<12}{counts[state]:>6}")
    print(f"  {'total':<12}{counts['total']:>6}")
    if counts["judge_labeled_open"]:
        print(f"  ({counts['judge_labeled_open']} open item(s) carry judge-made labels only)")
    for pid, lease in sorted(live_leases(store, slug).items()):
        print(f"  prompt {pid} is open in a labeling session ({describe_holder(lease)})")


def run_mode(args: argparse.Namespace, store: ResultsStore, slug: str) -> int:
    flt = QueueFilter(only_evil=args.only_evil, only_divergent=args.only_divergent)
    if args.status:
        print_status(store, slug, flt)
    elif args.export:
        rows = export_queue(store, slug, args.export, flt)
        print(f"Wrote {rows} row(s) to {args.export}; fill 'label', then --import it.")
    elif args.import_file:
        result = import_labels(store, slug, args.import_file)
        print(
            f"Imported labels for {result['imported']} prompt(s) from {args.import_file} "
            f"({result['unchanged']} unchanged)."
        )
        if result["held"]:
            print(
                f"Skipped {result['held']} prompt(s) open in a labeling session (see the "
                "warnings); import the file again once that session has moved on."
            )
    elif args.auto_accept_judge:
        count = auto_accept_judge(store, slug, flt)
        print(f"Recorded judge labels (labeled_by=judge) for {count} prompt(s).")
    elif args.calibration:
        print(format_calibration(calibration(store, slug)))
        print(f"Saved to {calibration_path(store, slug)}")
    else:
        run_session(store, slug, flt)
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.status or args.export:  # they only read: a mistyped folder is an error
        require_results_dir(args.results_dir)
    store = setup(args)
    slug = resolve_slug(args)
    problem = check_known(store, slug)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        added = enqueue_flagged(store, slug)
        if added:
            print(f"Queued {added} newly flagged prompt(s).")
        code = run_mode(args, store, slug)
        if code == 0:
            print(
                f"Next: {next_command(args, 'graphs')} computes the graphs of the labeled prompts"
            )
        return code
    except (QueueError, ArtifactError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted. Every answer given is saved; this item comes back first next run.")
        return 130
