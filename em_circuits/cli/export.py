"""Export viewer graphs and their feature files in Neuronpedia's graph JSON format, to share or
upload.

Reads the viewer folder the graph stage writes (results/viewer/<adapted model>/) and writes a
folder that `em-circuits serve --viewer-dir` and circuit-tracer's own server can show, with a
README.txt saying how to upload it to Neuronpedia.

examples:
  em-circuits export --out shared/                          # every graph of the toy organism
  em-circuits export --out shared/ --prompt-ids 0123abcd --role adapted
  em-circuits export --out shared/ --neuronpedia-model llama3.2-1b \\
      --feature-url https://example.org/em-graphs           # ready to upload
"""

from __future__ import annotations

import sys
from pathlib import Path

from em_circuits.cli.common import add_model_args, make_parser, setup


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument(
        "--prompt-ids",
        nargs="+",
        metavar="ID",
        help="only these prompts' graphs (default: every graph in the viewer folder)",
    )
    parser.add_argument(
        "--viewer-dir",
        type=Path,
        help="a folder holding graph-metadata.json (default: the adapted "
        "model's folder under results/viewer/)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument(
        "--role",
        action="append",
        choices=("base", "adapted"),
        help="only this model's graphs (repeatable; default: both)",
    )
    parser.add_argument(
        "--neuronpedia-model",
        metavar="ID",
        help="set each graph's scan to this Neuronpedia model id (an upload is filed under "
        "it; default: the transcoder set's name)",
    )
    parser.add_argument(
        "--feature-url",
        metavar="URL",
        help="where the export's folder will be served from (public, CORS), so Neuronpedia "
        "loads the feature files from URL/features/<role>/",
    )
    parser.add_argument("--creator", help="your name, in each graph's metadata.info")
    parser.add_argument("--creator-url", help="your URL, in each graph's metadata.info")
    args = parser.parse_args(argv)
    viewer_dir = args.viewer_dir
    if viewer_dir is None:  # with --viewer-dir no results directory is read
        from em_circuits.cli.common import adapted_slug_from_args
        from em_circuits.core.store import require_results_dir

        require_results_dir(args.results_dir)
        viewer_dir = setup(args).viewer_dir(adapted_slug_from_args(args))
    from em_circuits.attribution.export import README_FILE, export_graphs
    from em_circuits.attribution.export_json import ExportError
    from em_circuits.attribution.neuronpedia_graph import DEFAULT_CREATOR, ExportOptions

    try:
        options = ExportOptions(
            model_id=args.neuronpedia_model,
            feature_url=args.feature_url,
            creator_name=args.creator or DEFAULT_CREATOR,
            creator_url=args.creator_url,
        )
        written = export_graphs(
            viewer_dir, args.out, args.prompt_ids, args.role or ("base", "adapted"), options
        )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Exported {len(written)} graph(s) from {viewer_dir} to {args.out}")
    for line in written.left_out:
        print(f"Note: {line}")
    print(
        f"Next: em-circuits serve --viewer-dir {args.out}   "
        f"(uploading to Neuronpedia: {args.out / README_FILE})"
    )
    return 0
