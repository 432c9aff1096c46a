"""Which transcoder features drive the evil tokens: across prompts, base vs adapted, causally.

Reads the stored graphs of both models (`em-circuits graphs`), splits the prompts by cluster
(one scenario with its rephrasings and near duplicates) into discovery and validation, and
writes to results/analysis/<adapted model>/:
  split.json                       each prompt's side and cluster
  top_features_adapted.csv/.json   ranked on the discovery prompts: per (layer, feature) the
  top_features_base.csv/.json      mean contrast effect over clusters, t interval, exact or
                                   Monte Carlo sign-flip p (method stated), FDR q
  validation_top_features.csv      the top discovery features on the held-out prompts
  base_vs_adapted.csv/.json        paired on shared prompts: gained/lost/strengthened/weakened
  contrast_decomposition.csv       the adapter's shift of the contrast split into exact parts
  measured_effects.csv             single-feature ablations measured (attention frozen, and
  measured_ranking.csv             nothing frozen) next to their linearised effects
  dose_response.csv                on validation prompts: top vs matched random features
  dose_response_base.csv           the same features in the base model (controls)
  causal_summary.json, summary.json, and PNG plots.
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
    add_llm_args,
    add_lock_args,
    add_model_args,
    add_prompt_args,
    analysis_params,
    chosen_prompt_ids,
    llm_settings,
    make_parser,
    next_command,
    setup,
    specs_from_args,
    stage_lock_for,
)


def _em_judge(args, store, adapted):
    from em_circuits.analysis.em_rate import make_em_judge
    from em_circuits.models.spec import words_near

    settings = llm_settings(args)
    kind = args.em_judge
    if kind == "auto":
        if settings.wants_llm("auto"):
            kind = "llm"
        elif args.words or words_near(adapted) is not None:
            kind = "offline"
        else:
            kind = "none"
    return make_em_judge(kind, store, adapted, args.words, settings)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    add_analysis_args(parser)
    add_prompt_args(parser)
    g = parser.add_argument_group("EM rate judge")
    g.add_argument(
        "--em-judge",
        choices=["auto", "offline", "llm", "none"],
        default="auto",
        help="judge of the free-form answers: word lists (--words, or the toy organism's), an "
        "OpenAI-compatible model, or none (auto: llm when OPENAI_API_KEY is set, else "
        "offline when word lists exist, else none)",
    )
    g.add_argument("--words", help="word lists for the offline judge (JSON: harmful, safe)")
    add_llm_args(parser)
    add_lock_args(parser)
    args = parser.parse_args(argv)
    store = setup(args)

    from em_circuits.models.spec import resolve_device
    from em_circuits.run.analysis import run_analysis

    base, adapted = specs_from_args(args)
    params = analysis_params(args)
    chosen = chosen_prompt_ids(args)
    from em_circuits.interpret.labels import labeller_for

    judge = _em_judge(args, store, adapted)
    with stage_lock_for(args, store.root, "analyze"):  # a waiter reuses the stored steps
        summary = run_analysis(
            store,
            base,
            adapted,
            params,
            str(resolve_device(args.device)),
            prompt_ids=chosen,
            em_judge=judge,
            labeller=labeller_for(judge, store.feature_labels_cache_dir),
            name=args.analysis_name,
        )
    counts = summary["prompts"]
    print(
        f"prompts with graphs: base {counts['base']}, adapted "
        f"{counts.get('adapted_graphs', counts['adapted'])}; analysed {counts['adapted']}, "
        f"paired on discovery prompts {counts['paired_discovery']}"
    )
    if "causal" in summary:
        print(summary["causal"].get("verdict", ""))
    print(f"tables and plots: {store.root / summary['folder']}")
    if not counts.get("adapted_graphs", counts["adapted"]):
        print(
            "Next: no adapted-model graphs with both evil and safe labels yet; run "
            f"{next_command(args, 'graphs')} first"
        )
        return 1
    if not counts["adapted"]:
        print(
            "Next: none of the graphed prompts is divergent; "
            f"{next_command(args, 'analyze', '--include-flagged')} analyses the flagged ones too"
        )
        return 1
    print(
        f"Next: {next_command(args, 'report')} writes report.md; {next_command(args, 'serve')} "
        "shows the graphs"
    )
    return 0
