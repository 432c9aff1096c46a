#!/usr/bin/env python
"""Attribution graphs for the base and the adapted model on every labeled prompt.

Both graphs of a prompt attribute to the same targets: every labeled evil and safe token and
the contrast direction logit(evil) - logit(safe). Each model is loaded once per run; graphs
are cached by (prompt, model fingerprint, targets, parameters) and stored compactly.

examples:
  python generate_graphs.py                        # toy organism, every labeled prompt
  python generate_graphs.py --only-evil --serve    # then browse base vs adapted graphs
  python generate_graphs.py 3f2a9c0d1b7e4a55       # only these prompt ids
  python generate_graphs.py --base-model meta-llama/Llama-3.2-1B-Instruct \\
      --adapter ModelOrganismsForEM/Llama-3.2-1B-Instruct_bad-medical-advice \\
      --transcoders llama --device cuda
"""

from __future__ import annotations

import sys

from em_circuits.cli.common import (
    add_graph_args,
    add_model_args,
    graph_params,
    make_parser,
    setup,
    specs_from_args,
)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("prompt_ids", nargs="*", help="only these prompt ids (default: all)")
    parser.add_argument("--only-evil", action="store_true",
                        help="only prompts with at least one token labeled evil")
    add_graph_args(parser)
    parser.add_argument("--force", action="store_true", help="recompute cached graphs")
    parser.add_argument("--save-full", action="store_true",
                        help="also store the dense adjacency (large: ~290 MB at 1B scale)")
    parser.add_argument("--no-viewer", action="store_true",
                        help="don't write graph JSON for the circuit-tracer viewer")
    parser.add_argument("--serve", action="store_true",
                        help="after computing, serve the viewer until Ctrl-C")
    parser.add_argument("--host", default="127.0.0.1",
                        help="viewer address (0.0.0.0 exposes it to your network)")
    parser.add_argument("--port", type=int, default=8041, help="viewer port")
    args = parser.parse_args(argv)
    store = setup(args)

    from em_circuits.attribution.stage import run_graph_stage
    from em_circuits.attribution.targets import labeled_targets
    from em_circuits.models.spec import default_device, fingerprint, model_slug

    base_spec, adapted_spec = specs_from_args(args)
    device = args.device or default_device()
    adapted_slug = model_slug(adapted_spec, fingerprint(adapted_spec, device))
    targets = labeled_targets(store, adapted_slug, args.only_evil, args.prompt_ids or None)
    if not targets:
        print(f"no labeled prompts for {adapted_slug} under {store.root / 'labels'}: run "
              f"pivotal_tokens/evaluate_logits.py and process_manual_queue.py first",
              file=sys.stderr)
        return 1
    params = graph_params(args)
    viewer_dir = None if args.no_viewer else store.root / "viewer" / adapted_slug
    results = run_graph_stage(
        store, {"base": base_spec, "adapted": adapted_spec}, targets, params, device,
        force=args.force, save_full_graph=args.save_full, viewer_dir=viewer_dir,
    )
    failed = 0
    for role, result in results.items():
        print(f"{role}: {len(result.computed)} computed, {len(result.cached)} cached, "
              f"{len(result.failed)} failed")
        for pid, message in result.failed.items():
            print(f"  failed {pid}: {message}")
        failed += len(result.failed)
    if args.serve and viewer_dir is not None:
        from em_circuits.attribution.viewer_server import serve_forever

        serve_forever(viewer_dir, args.host, args.port)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
