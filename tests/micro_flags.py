"""The model flags that point a command at the micro organism (see conftest.micro_organism)."""

from __future__ import annotations


def model_args(organism) -> list[str]:
    return [
        "--base-model",
        str(organism.base_dir),
        "--adapter",
        str(organism.adapter_dir),
        "--transcoders",
        str(organism.transcoder_config),
        "--model-name",
        "micro",
        "--device",
        "cpu",
    ]


#: The analysis flags of the reference run (tests/test_pipeline): small, fast, and every step.
REFERENCE_ANALYSIS_ARGS = [
    "--causal-top-k",
    "2",
    "--scales",
    "0",
    "1",
    "2",
    "--n-random",
    "1",
    "--causal-candidates",
    "4",
    "--include-flagged",  # the micro organism has no divergent prompt
    "--em-samples",
    "3",
    "--em-max-new-tokens",
    "12",
    "--corpus-docs",
    "48",
]


def analyze_micro(results, micro_specs, params, **options):
    """`run_analysis` from Python on a copy of the reference run: the micro organism under the
    name its model flags give ("micro") and the offline EM judge, as `em-circuits run` had."""
    import dataclasses

    from em_circuits.analysis.em_rate import make_em_judge
    from em_circuits.core.store import ResultsStore
    from em_circuits.run.analysis import run_analysis

    adapted = dataclasses.replace(micro_specs[1], name="micro")
    store = ResultsStore(results)
    judge = make_em_judge("offline", store, adapted)
    return run_analysis(
        store,
        adapted.base_only(),
        adapted,
        params,
        "cpu",
        progress=False,
        em_judge=judge,
        **options,
    )
