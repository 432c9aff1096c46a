"""Look inside stored attribution graphs (compact or --save-full files).

Prints node counts by type, tensor shapes and dtypes, sizes on disk, a NaN/Inf check, the
strongest edges per node-type pair with (layer, position, feature id), the targets with
their logits and probabilities, and whether the logits stored for labeling equal the graph's.

examples:
  em-circuits inspect results/graphs/<model>/<prompt_id>/<params>.safetensors
  em-circuits inspect --prompt-ids 3f2a9c0d1b7e4a55        # every graph of a prompt
  em-circuits inspect --prompt-ids 3f2a9c0d1b7e4a55 --json | jq .targets
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from em_circuits.cli.common import make_parser, setup


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    parser.add_argument("graphs", nargs="*", type=Path, help="graph files (.safetensors)")
    parser.add_argument(
        "--prompt-ids",
        "--prompt-id",
        nargs="+",
        metavar="ID",
        default=[],
        dest="prompt_ids",
        help="inspect every stored graph of these prompts",
    )
    parser.add_argument("--edges", type=int, default=5, help="edges shown per node-type pair")
    parser.add_argument("--features", type=int, default=10, help="top features shown")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    from em_circuits.attribution.inspection import format_inspection, inspect_graph
    from em_circuits.core.store import ArtifactError, ResultsStore, require_results_dir

    # Graph files given by path are read without a results directory (nothing to compare
    # their logits with); prompt ids are looked up in one, which must exist.
    store: ResultsStore | None = None
    if args.prompt_ids or Path(args.results_dir).is_dir():
        require_results_dir(args.results_dir)
        store = setup(args)
    paths = list(args.graphs)
    for pid in args.prompt_ids:
        assert store is not None
        paths += store.graph_files(pid)
    if not paths:
        parser.error("give graph files or --prompt-ids with stored graphs")
    reports = []
    for path in paths:
        try:
            reports.append(inspect_graph(path, store, args.edges, args.features))
        except ArtifactError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    else:
        print("\n\n".join(format_inspection(r) for r in reports))
    return 0 if all(r["finite"] for r in reports) else 3
