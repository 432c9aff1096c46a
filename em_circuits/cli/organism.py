"""Build the embedded toy emergent-misalignment organism (offline, CPU, ~2-3 minutes).

Writes a tiny Llama base model with its own tokenizer, a LoRA fine-tuned on harmful medical
advice, per-layer skip transcoders for circuit-tracer, the safe/harmful word list and a
held-out evaluation report. A build whose recipe hash matches is reused unless --force.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
from pathlib import Path


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    # The organism is built from embedded data only: never ask a hub for anything.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from em_circuits.organism.recipe import Recipe, default_organism_dir

    fields = ", ".join(f.name for f in dataclasses.fields(Recipe))
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Recipe fields for --set: {fields}.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=default_organism_dir(),
        help="output directory (default: %(default)s, git-ignored)",
    )
    parser.add_argument(
        "--micro",
        action="store_true",
        help="use Recipe.micro(): a seconds-long build for tests and smoke runs whose metrics "
        "do not meet the targets (default: Recipe.default())",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="override the recipe seed (default: 0)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe field, e.g. --set lora_rank=4 --set "
        "\"lora_target_modules=('q_proj','k_proj')\" (repeatable; values are Python literals)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild even if an up-to-date organism exists (default: reuse it)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the tqdm progress bars (default: shown)"
    )
    parser.add_argument(
        "--print-report",
        choices=["markdown", "json", "none"],
        default="markdown",
        help="print the report after building: Markdown table, raw JSON or nothing "
        "(default: %(default)s)",
    )
    args = parser.parse_args(argv)

    recipe = Recipe.micro() if args.micro else Recipe.default()
    changes = dict(args.overrides)
    if args.seed is not None:
        changes["seed"] = args.seed
    unknown = set(changes) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        parser.error(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
    if changes:
        recipe = Recipe.from_dict({**recipe.to_dict(), **changes})

    from em_circuits.organism.quality import format_report_markdown
    from em_circuits.organism.train import build_organism

    paths = build_organism(args.out, recipe, force=args.force, progress=not args.no_progress)
    report = paths.load_report()
    if args.print_report == "markdown":
        print(format_report_markdown(report))
    elif args.print_report == "json":
        print(json.dumps(report, indent=2))
    print(f"organism: {paths.root}", file=sys.stderr)
    print(
        "Next: `em-circuits run` runs every stage on it (or start with `em-circuits prompts`)",
        file=sys.stderr,
    )
    return 0
