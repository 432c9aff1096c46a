"""Which transcoder features drive the evil tokens: across prompts, base vs adapted, causally.

Reads the stored graphs of both models (`em-circuits graphs`), and writes to
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
  em-circuits analyze
  em-circuits analyze --position last --min-support 3
  em-circuits analyze --causal-top-k 0       # skip the interventions
"""

from __future__ import annotations

from em_circuits.cli.common import (
    add_analysis_args,
    add_model_args,
    add_prompt_args,
    analysis_params,
    chosen_prompt_ids,
    make_parser,
    setup,
    specs_from_args,
)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    add_analysis_args(parser)
    add_prompt_args(parser)
    args = parser.parse_args(argv)
    store = setup(args)

    from em_circuits.analysis.stage import run_analysis
    from em_circuits.models.spec import resolve_device

    base, adapted = specs_from_args(args)
    params = analysis_params(args)
    chosen = chosen_prompt_ids(args)
    summary = run_analysis(
        store, base, adapted, params, str(resolve_device(args.device)), prompt_ids=chosen
    )
    counts = summary["prompts"]
    print(
        f"prompts with graphs: base {counts['base']}, adapted {counts['adapted']}, "
        f"paired {counts['paired']}"
    )
    if "causal" in summary:
        print(summary["causal"].get("verdict", ""))
    print(f"tables and plots: {store.root / summary['folder']}")
    if not counts["adapted"]:
        print(
            "Next: no adapted-model graphs with both evil and safe labels yet; run "
            "`em-circuits graphs` first"
        )
        return 1
    print("Next: `em-circuits report` writes report.md; `em-circuits serve` shows the graphs")
    return 0
