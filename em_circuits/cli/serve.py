"""Serve stored attribution graphs in circuit-tracer's viewer, base and adapted side by side.

The graph stage writes viewer files to results/viewer/<adapted model>/; this serves them on
127.0.0.1 until Ctrl-C (use ssh -L to look from another machine).

examples:
  em-circuits serve                                   # the toy organism's graphs
  em-circuits serve --viewer-dir results/viewer/toy-em-organism--0123456789ab
"""

from __future__ import annotations

import sys
from pathlib import Path

from em_circuits.cli.common import add_model_args, make_parser, setup


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument(
        "--viewer-dir",
        type=Path,
        help="a folder holding graph-metadata.json (default: the adapted "
        "model's folder under results/viewer/)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (0.0.0.0 exposes the graphs to your network)",
    )
    parser.add_argument("--port", type=int, default=8041, help="port")
    args = parser.parse_args(argv)
    viewer_dir = args.viewer_dir
    if viewer_dir is None:  # an exported folder (--viewer-dir) needs no results directory
        from em_circuits.cli.common import adapted_slug_from_args
        from em_circuits.core.store import require_results_dir

        require_results_dir(args.results_dir)
        viewer_dir = setup(args).viewer_dir(adapted_slug_from_args(args))
    if not (viewer_dir / "graph-metadata.json").is_file():
        print(
            f"error: no graphs to show in {viewer_dir} (graph-metadata.json is missing); "
            "run `em-circuits graphs` first",
            file=sys.stderr,
        )
        return 1
    from em_circuits.attribution.viewer_metadata import ViewerError
    from em_circuits.attribution.viewer_server import serve_forever

    try:
        serve_forever(viewer_dir, args.host, args.port)
    except ViewerError as err:  # a busy port, a bad --host or --port: the flag to change
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
