#!/usr/bin/env python
"""Which transcoder features drive the evil tokens: across prompts, base vs adapted, causally.

Reads the stored graphs of both models (generate_graphs.py), and writes to
results/analysis/<adapted model>/:
  top_features_adapted.csv/.json   per (layer, feature): support, mean contrast effect with a
  top_features_base.csv/.json      bootstrap CI, sign consistency, permutation p and FDR q
  base_vs_adapted.csv/.json        paired on shared prompts: gained/lost/strengthened/weakened
  error_share.csv/.json            share of the contrast carried by error nodes per layer
  dose_response.csv/.json          zeroing/scaling the top evil features vs matched random ones
  causal_summary.json, summary.json, and PNG plots of each.
Effects are direct (one edge) and total (every path through features), on the contrast
target logit(evil) - logit(safe); formulas in README.md. Per-prompt effects are cached.

examples:
  python analyze_evil_features.py
  python analyze_evil_features.py --position last --min-support 3
  python analyze_evil_features.py --causal-top-k 0       # skip the interventions
"""

from __future__ import annotations

import sys

from em_circuits.cli import add_model_args, make_parser, setup, specs_from_args


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    add_model_args(parser)
    parser.add_argument("--position", default="any",
                        help="feature identity: any (summed over positions), last, or rel:-k "
                        "(k-th position from the end); features are never matched by graph index")
    parser.add_argument("--min-support", type=int, default=2,
                        help="prompts a feature must appear in to be ranked")
    parser.add_argument("--absent", choices=["zero", "missing"], default="zero",
                        help="a feature absent from a prompt's graph counts as 0, or is left out")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for CIs")
    parser.add_argument("--n-perm", type=int, default=9999,
                        help="sign-flip permutations (exact up to 12 prompts)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="|adapted - base| mean contrast effect that counts as a change")
    parser.add_argument("--causal-top-k", type=int, default=5,
                        help="top evil features to intervene on (0 = no causal check)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 0.5, 1, 1.5, 2, 3],
                        help="activation multipliers of the dose-response (0 = ablation)")
    parser.add_argument("--n-random", type=int, default=3,
                        help="random matched-activation control draws per prompt")
    parser.add_argument("--causal-prompts", type=int, default=20,
                        help="prompts (by id order) the interventions run on")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap, permutations, controls")
    args = parser.parse_args(argv)
    store = setup(args)

    from em_circuits.analysis import AnalysisParams, run_analysis
    from em_circuits.models import default_device

    base, adapted = specs_from_args(args)
    params = AnalysisParams(
        position=args.position, min_support=args.min_support, absent=args.absent,
        n_boot=args.n_boot, n_perm=args.n_perm, compare_threshold=args.threshold,
        causal_top_k=args.causal_top_k, scales=tuple(args.scales), n_random=args.n_random,
        causal_prompts=args.causal_prompts, seed=args.seed,
    )
    summary = run_analysis(store, base, adapted, params, str(args.device or default_device()))
    counts = summary["prompts"]
    print(f"prompts with graphs: base {counts['base']}, adapted {counts['adapted']}, "
          f"paired {counts['paired']}")
    if "causal" in summary:
        print(summary["causal"].get("verdict", ""))
    print(f"tables and plots: {store.analysis_dir / summary['models']['adapted']}")
    return 0 if counts["adapted"] else 1


if __name__ == "__main__":
    sys.exit(main())
