"""Step: is the ranking of features stable across splits and resamples of clusters?

The ranking (adapted model, total effect on the contrast, mean over discovery clusters) is
recomputed on the discovery side of other split seeds (the same prompts, each seed's held-out
split) and on bootstrap resamples of the main split's discovery clusters (drawn with
replacement). Each is compared with the main ranking by the Jaccard index of the top
``stability_top`` features and the Spearman rank correlation of the means over the features
both rank. With ``--compare-run`` (the results directory of another finished run, e.g. a toy
organism trained with another seed), stability.json also gets an ``organisms`` section: does
the same mechanism appear there (:mod:`em_circuits.analysis.organisms`)? Writes
``stability.json``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from em_circuits.analysis.organisms import RunFiles, compare_runs
from em_circuits.analysis.split import LEFT_OUT_PHRASING, held_out_split
from em_circuits.analysis.steps.base import ReportInputs, Step, StepResult
from em_circuits.core.markdown import fmt, md_table
from em_circuits.core.naming import feature_name
from em_circuits.core.options import option
from em_circuits.core.report_data import Report, ReportPart, StoredJson
from em_circuits.core.store import read_json, write_artifact
from em_circuits.models.spec import resolve_model_dir

if TYPE_CHECKING:
    from em_circuits.analysis.steps.context import AnalysisContext

#: Mean top-k Jaccard from which the Findings call a ranking stable.
STABLE_JACCARD = 0.5


def _finished_run(value: str) -> str:
    if not (Path(value) / "report.json").is_file():
        raise ValueError(
            f"{value} has no report.json: give the results directory of a finished "
            "`em-circuits run` (its --results-dir)"
        )
    return str(Path(value).resolve())


@dataclass(frozen=True)
class StabilityParams:
    stability_seeds: int = option(5, "other split seeds the ranking is recomputed on (0 = none)")
    stability_boot: int = option(
        20, "bootstrap resamples of the discovery clusters the ranking is recomputed on"
    )
    stability_top: int = option(10, "top features compared (Jaccard index)")
    compare_run: str | None = option(
        None,
        "results directory of another finished run (e.g. a toy organism trained with another "
        "seed): does the same mechanism appear there? (stability.json's organisms section)",
        metavar="RESULTS_DIR",
        parse=_finished_run,
    )


def cluster_means(
    frames: Mapping[str, pd.DataFrame],
    clusters: Mapping[str, str],
    absent: str = "zero",
    min_support: int = 2,
) -> pd.DataFrame:
    """Features x clusters: each cluster's mean total effect on the contrast (as the ranking
    averages: prompts of a cluster first; an absent feature 0, or left out)."""
    columns = {}
    for pid, frame in frames.items():
        rows = frame[frame["metric"] == "total"]
        keys = [c for c in ("layer", "feature", "position") if c in rows.columns]
        columns[pid] = rows.set_index(keys)["contrast"].astype(float)
    if not columns:
        return pd.DataFrame()
    matrix = pd.concat(columns, axis=1, sort=True)
    matrix = matrix[matrix.notna().sum(axis=1) >= min_support]
    if absent == "zero":
        matrix = matrix.fillna(0.0)
    return matrix.T.groupby([clusters[p] for p in matrix.columns]).mean().T


def compare(main: pd.Series, other: pd.Series, top: int) -> dict[str, float]:
    """Top-``top`` Jaccard and Spearman correlation (over the features both rank)."""
    a = set(main.sort_values(ascending=False).index[:top])
    b = set(other.dropna().sort_values(ascending=False).index[:top])
    both = main.index.intersection(other.dropna().index)
    rho = float(main[both].rank().corr(other[both].rank())) if len(both) >= 3 else float("nan")
    return {"jaccard": len(a & b) / len(a | b) if a | b else float("nan"), "spearman": rho}


def _spread(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(np.mean(finite)),
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


def _decoder(spec: Mapping[str, Any]) -> Any:
    from transformers import AutoTokenizer

    where = resolve_model_dir(spec["base"], spec.get("base_revision"), "base model")
    return AutoTokenizer.from_pretrained(str(where)).decode


def _compare(ctx: AnalysisContext, params: StabilityParams) -> dict[str, Any]:
    """stability.json's ``organisms`` section: this run against ``params.compare_run``."""
    assert params.compare_run is not None
    spec = ctx.specs["adapted"]
    index = ctx.store.features_index_dir(ctx.slugs["adapted"]) / "index.npz"
    if not index.is_file():
        raise ValueError(
            f"--compare-run needs this run's activation index ({index}): keep --card-features "
            "above 0 so the feature cards build it"
        )
    ours = RunFiles("this run", ctx.directory, index, _decoder(dataclasses.asdict(spec)))
    theirs = RunFiles.of_results(Path(params.compare_run), _decoder)
    return compare_runs(ours, theirs, params.stability_top, seed=ctx.shared.seed)


@dataclass(frozen=True)
class StabilityReport(ReportPart):
    #: stability.json (None when the step did not run)
    stability: StoredJson | None = None


class StabilityStep(Step):
    name = "stability"
    Params = StabilityParams
    Part = StabilityReport
    shared = ("min_support", "absent", "seed")
    # the other steps' files are what a comparison with another run reads
    reads = ("split", "ranking", "decomposition", "causal", "baselines", "feature_cards")
    uses = frozenset({"graphs"})
    version = 2  # the comparison with another run

    def run(self, ctx: AnalysisContext, params: StabilityParams) -> StepResult:
        split = ctx.split()
        effects = ctx.effects("adapted").effects
        shared = ctx.shared

        def ranking(prompts: Sequence[str], clusters: Mapping[str, str]) -> pd.Series:
            frames = {p: effects[p] for p in prompts if p in effects}
            means = cluster_means(frames, clusters, shared.absent, shared.min_support)
            return means.mean(axis=1) if len(means) else pd.Series(dtype=float)

        main = ranking(split.discovery, split.clusters)
        if main.empty:
            return StepResult()
        seeds = []
        excluded = {p: why for p, why in split.left_out.items() if why != LEFT_OUT_PHRASING}
        records = [ctx.store.load_prompt(p) for p in sorted(split.clusters)]
        for seed in range(shared.seed + 1, shared.seed + 1 + params.stability_seeds):
            other = held_out_split(records, split.validation_fraction, seed, excluded)
            entry = compare(main, ranking(other.discovery, other.clusters), params.stability_top)
            seeds.append(
                {"seed": seed, **entry, "discovery_clusters": other.n_clusters("discovery")}
            )
        per_cluster = cluster_means(
            {p: effects[p] for p in split.discovery if p in effects},
            split.clusters,
            shared.absent,
            shared.min_support,
        )
        rng = np.random.default_rng(shared.seed)
        boots = []
        for _ in range(params.stability_boot):
            drawn = rng.integers(per_cluster.shape[1], size=per_cluster.shape[1])
            boots.append(
                compare(main, per_cluster.iloc[:, drawn].mean(axis=1), params.stability_top)
            )
        record = {
            "top": params.stability_top,
            "main_discovery_clusters": split.n_clusters("discovery"),
            "split_seeds": seeds,
            "bootstrap": {
                "n": len(boots),
                "jaccard": _spread([b["jaccard"] for b in boots]),
                "spearman": _spread([b["spearman"] for b in boots]),
            },
            "seeds": {
                "jaccard": _spread([s["jaccard"] for s in seeds]),
                "spearman": _spread([s["spearman"] for s in seeds]),
            },
        }
        if params.compare_run:
            record["organisms"] = _compare(ctx, params)
        write_artifact(ctx.directory / "stability.json", "table", record)
        ctx.wrote("stability.json")
        # another run's files may change under the same path: compared again every time
        return StepResult(
            summary={"stability": read_json(ctx.directory / "stability.json")},
            reusable=not params.compare_run,
        )

    def report_data(self, inputs: ReportInputs) -> StabilityReport:
        return StabilityReport(stability=inputs.json("stability.json"))

    def section(self, report: Report, analysis_rel: str) -> list[str]:
        out = ["## Stability\n"]
        stability = report.part(StabilityReport).stability
        if not stability:
            return [*out, "_not run (no ranking)_\n"]
        rows = [
            {
                "recomputed on": what,
                "n": part["jaccard"]["n"],
                "jaccard_mean": part["jaccard"]["mean"],
                "jaccard_min": part["jaccard"]["min"],
                "spearman_mean": part["spearman"]["mean"],
                "spearman_min": part["spearman"]["min"],
            }
            for what, part in (
                ("other split seeds (discovery side)", stability["seeds"]),
                ("bootstrap of the discovery clusters", stability["bootstrap"]),
            )
        ]
        return [
            *out,
            f"The ranking recomputed on other splits and resamples, against the main ranking "
            f"({stability['main_discovery_clusters']} discovery clusters): Jaccard index of "
            f"the top {stability['top']} features, and Spearman rank correlation of the mean "
            f"effects over the features both rank.\n",
            md_table(
                rows,
                [
                    "recomputed on",
                    "n",
                    "jaccard_mean",
                    "jaccard_min",
                    "spearman_mean",
                    "spearman_min",
                ],
            ),
            f"Full numbers: `{analysis_rel}/stability.json`.\n",
            *organisms_paragraph(stability.get("organisms")),
        ]

    def findings(self, report: Report) -> list[str]:
        stability = report.part(StabilityReport).stability
        if not stability:
            return []
        parts = [stability["seeds"]["jaccard"]["mean"], stability["bootstrap"]["jaccard"]["mean"]]
        known = [p for p in parts if p is not None]
        stable = bool(known) and min(known) >= STABLE_JACCARD
        return [
            f"**Stability ({'stable' if stable else 'not stable'}):** the top "
            f"{stability['top']} features overlap the main ranking's by Jaccard "
            f"{fmt(parts[0])} on average across {stability['seeds']['jaccard']['n']} other "
            f"split seeds and {fmt(parts[1])} across {stability['bootstrap']['n']} bootstrap "
            f"resamples of the discovery clusters (Spearman "
            f"{fmt(stability['seeds']['spearman']['mean'])} and "
            f"{fmt(stability['bootstrap']['spearman']['mean'])}); "
            f"a mean Jaccard of at least {STABLE_JACCARD:g} on both counts as stable.",
            *organisms_finding(stability.get("organisms")),
        ]


HOW_TO_COMPARE = (
    "_Across organisms: not compared._ Does the same mechanism appear in a toy organism "
    "trained with another seed? `make stability-organisms` builds one (recipe seed 1), runs "
    "the pipeline on it and compares; or give `em-circuits analyze --compare-run RESULTS_DIR` "
    "the results directory of any other finished run.\n"
)


def organisms_paragraph(organisms: Mapping[str, Any] | None) -> list[str]:
    """The stability section's paragraph on another run (or how to make one)."""
    if not organisms:
        return [HOW_TO_COMPARE]
    meaning, where = organisms["meaning"], organisms.get("decomposition")
    causal, profile = organisms["causal"], organisms["layer_profile"]
    rows = [
        {
            "our feature": feature_name(*m["feature"]),
            "fires on": ", ".join(m["words"]),
            "their best match": feature_name(*m["match"]) if m["match"] else None,
            "fires on ": ", ".join(m["match_words"]),
            "overlap": m["overlap"],
        }
        for m in meaning["matches"]
    ]
    beats = [c["beats_random"] if c else None for c in (causal["ours"], causal["theirs"])]
    return [
        f"**Across organisms** (this run against `{organisms['other_run']}`; features cannot "
        "be matched by index, so by meaning and by mechanism): **same mechanism: "
        f"{organisms['same_mechanism']}.** Meaning: each of our top {organisms['top']} "
        "features matched to their top features by the words both fire on in their top "
        f"corpus contexts, mean best overlap {fmt(meaning['observed'])} (weighted Jaccard) "
        f"against {fmt(meaning['chance_mean'])} for random active features of theirs of the "
        f"same layers (95th percentile {fmt(meaning['chance_p95'])}, p = "
        f"{fmt(meaning['p_value'])} over {meaning['draws']} draws). Where the adapter's "
        "shift of the contrast sits: correlation of the two decompositions by part and layer "
        + (
            f"r = {fmt(where['pearson_r'])} over {where['rows_compared']} rows, largest part "
            f"{where['largest_part'][0]} here and {where['largest_part'][1]} there"
            if where
            else "not available"
        )
        + f". Layer profile of the top features: overlap {fmt(profile['overlap'])} (1 = "
        f"identical). Top features beat matched random ones when ablated on held-out "
        f"prompts: here {beats[0]}, there {beats[1]}.\n",
        md_table(rows, ["our feature", "fires on", "their best match", "fires on ", "overlap"]),
    ]


def organisms_finding(organisms: Mapping[str, Any] | None) -> list[str]:
    if not organisms:
        return []
    checks = organisms["checks"]
    meaning = organisms["meaning"]
    return [
        f"**Across organisms (same mechanism: {organisms['same_mechanism']}):** against "
        f"`{organisms['other_run']}`, the top features' meanings match "
        f"{'above' if checks['meaning_above_chance'] else 'not above'} chance (word overlap "
        f"{fmt(meaning['observed'])} vs {fmt(meaning['chance_mean'])} for random features, "
        f"p = {fmt(meaning['p_value'])}); both runs' top features beat random ones causally: "
        f"{checks['both_beat_random']}; the adapter's shift sits in the same place: "
        f"{checks['shift_in_same_place']}."
    ]


STEP = StabilityStep()
