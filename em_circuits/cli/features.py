"""Feature cards on demand: what any (layer, feature) of the transcoders means.

Builds (once, cached under results/features_index/) each model's activation index of the
corpus and prints the card of every feature named: its top activating contexts with the
token in bold, activation statistics, logit lens, and where it fires across the pivotal
prompts (when graphs exist), for the base and the adapted model. Features are named as
everywhere in this tool, ``L3 #1234``, and given here as LAYER:FEATURE.

--viewer also writes the viewer's feature records for every feature its graphs draw (after
adding graphs with `em-circuits graphs --full-graphs`, say).

examples:
  em-circuits features 2:101 3:57                 # two cards of the toy organism
  em-circuits features 2:101 --json > card.json
  em-circuits features --viewer                   # refresh the viewer's feature panel
  em-circuits features 5:1200 --base-model ... --adapter ... --transcoders ... --corpus data.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from em_circuits.cli.common import add_model_args, make_parser, setup, specs_from_args
from em_circuits.core.store import require_results_dir

_FEATURE = re.compile(r"^(\d+):(\d+)$")


def _feature(text: str) -> tuple[int, int]:
    import argparse

    match = _FEATURE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: give a feature as LAYER:FEATURE, e.g. 3:1234")
    return int(match.group(1)), int(match.group(2))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument("features", nargs="*", type=_feature, help="LAYER:FEATURE, any number")
    parser.add_argument("--corpus", help="text (blank-line separated) or JSONL file ('text')")
    parser.add_argument("--corpus-docs", type=int, default=400, help="documents read")
    parser.add_argument("--contexts", type=int, default=8, help="contexts shown per card")
    parser.add_argument("--json", action="store_true", help="print the cards as JSON")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the cards as Markdown (default: plain text for the terminal)",
    )
    parser.add_argument(
        "--viewer", action="store_true", help="write the viewer's feature records too"
    )
    args = parser.parse_args(argv)
    if not args.features and not args.viewer:
        parser.error("name at least one feature (LAYER:FEATURE) or give --viewer")
    require_results_dir(args.results_dir)  # reads stored results: a mistyped folder is an error
    store = setup(args)

    from em_circuits.interpret.cards import card_markdown
    from em_circuits.interpret.stage import cards_on_demand
    from em_circuits.models.spec import resolve_device

    base, adapted = specs_from_args(args)
    device = str(resolve_device(args.device))
    try:
        cards = cards_on_demand(
            store,
            {"base": base, "adapted": adapted},
            args.features,
            args.corpus,
            args.corpus_docs,
            device,
            viewer=args.viewer,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(cards, indent=1))
        return 0
    from em_circuits.core.naming import viewer_link
    from em_circuits.interpret.terminal import markdown_for_terminal, use_colour

    out: list[Any] = []
    for card in cards:
        link = viewer_link(feature=(card["layer"], card["feature"]), diff=True)
        text = card_markdown(card, contexts=args.contexts)
        text += f"- in the graph viewer (`em-circuits serve`): {link}\n"
        out.append(text if args.markdown else markdown_for_terminal(text, use_colour()))
    print("\n".join(out))
    return 0
