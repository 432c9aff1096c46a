"""The baselines step's report section and Findings line."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from em_circuits.analysis.baseline_methods import COLUMNS
from em_circuits.core.markdown import feature_link, fmt, md_table
from em_circuits.core.report_data import Report, ReportPart, StoredJson, TableRecord

#: baselines.csv's columns, with the p-value's method beside the p-value.
TABLE_COLUMNS = [
    *COLUMNS[: COLUMNS.index("p_value") + 1],
    "p_method",
    *COLUMNS[COLUMNS.index("p_value") + 1 :],
]


def _site(site: Any) -> str:
    return "none" if site is None else f"residual site {site} (the stream entering layer {site})"


@dataclass(frozen=True)
class Baselines:
    """The report's entry on the baselines (report.json ``baselines``)."""

    #: baselines_summary.json (None when the step did not run)
    summary: StoredJson | None = None
    #: every row of baselines.csv and of baselines_overlap.csv
    table: list[TableRecord] = field(default_factory=list)
    overlap: list[TableRecord] = field(default_factory=list)


@dataclass(frozen=True)
class BaselinesReport(ReportPart):
    baselines: Baselines = field(default_factory=Baselines)


def baselines_markdown(report: Report, analysis_rel: str) -> list[str]:
    out = ["## Baselines\n"]
    data = report.part(BaselinesReport).baselines
    summary = data.summary
    if not summary:
        return [*out, "_not run (no tested features)_\n"]
    grouping = summary.get("misalignment_grouping") or {}
    em = summary.get("em")
    out += [
        f"Is ablating the {summary['k']} tested features more than removing a direction? On the "
        f"causal step's {summary['prompts']['validation']} validation prompts, each edit of the "
        "**adapted** model, run in the real model (nothing frozen); change of the contrast "
        "(mean evil - mean safe logit, last position), mean over clusters of prompts, 95% t "
        "interval, one-sided sign-flip p (does it lower the contrast?). Methods: "
        "`tested_features` (the causal step's features, zeroed at every position but BOS); "
        f"`mean_diff_subspace` (the top-k right singular vectors of adapted-minus-base "
        f"residuals at the last position of the {summary['prompts']['discovery']} discovery "
        f"prompts, projected out at every position but BOS at {_site(summary['subspace_site'])}"
        ", the site that lowers the contrast most on the discovery prompts); "
        "`misalignment_direction` (the adapted model's mean last-position residual on evil "
        f"prompts minus safe prompts, grouped by {grouping.get('grouped_by', 'n/a')}: "
        f"{grouping.get('n_evil')} vs {grouping.get('n_safe')} discovery prompts; projected out "
        f"at {_site(summary['direction_site'])}, chosen the same way); "
        "`activation_diff_features` (model diffing without attribution: the features whose "
        "mean activation rises most from base to adapted over "
        f"{summary.get('activation_diff_corpus_docs', 'no')} corpus documents); "
        "`linearised_top_features` and `measured_top_features` (the top k by linearised "
        "total effect and by measured single ablation on the discovery prompts); "
        "`random_features` (activation-matched features of the same layers, never one of the "
        f"top {summary.get('excluded_from_random')} of the ranking, averaged over "
        f"{len(summary['features'].get('random_draws', []))} draws).\n",
        md_table(data.table, TABLE_COLUMNS),
        f"Full table: `{analysis_rel}/baselines.csv`. "
        + (
            f"EM rates: judge {em['judge']}, {em['n_questions']} questions x "
            f"{em['samples_per_question']} answers per method; the adapted model unedited: "
            f"{fmt(em['adapted_em_rate'])}.\n"
            if isinstance(em, dict)
            else f"EM rates {em}.\n"
        ),
        *_features_added(summary, data.overlap),
    ]
    return out


def _features_added(summary: Mapping[str, Any], overlap: list[TableRecord]) -> list[str]:
    """What the features add over the subspace: shares, cosines, crossed projections, sizes."""
    if not overlap:
        return []
    feature_rows = [
        {
            "feature": feature_link(r["layer"], r["feature"]),
            "share_in_subspace": r["share_in_subspace"],
            "cosines_with_subspace": ", ".join(fmt(c) for c in r["cosines_with_subspace"]),
            "cosine_with_misalignment_direction": r["cosine_with_misalignment_direction"],
        }
        for r in summary.get("feature_overlap", [])
    ]
    sizes = [{"method": m, **v} for m, v in (summary.get("sizes") or {}).items()]
    return [
        "### What the features add over the subspace\n",
        "Decoder vectors of the tested features against the mean-diff subspace (squared "
        "cosines summed = the share of the decoder inside it):\n",
        md_table(
            feature_rows,
            [
                "feature",
                "share_in_subspace",
                "cosines_with_subspace",
                "cosine_with_misalignment_direction",
            ],
        ),
        f"The subspace's share inside the features' decoder span: "
        f"{fmt(summary.get('subspace_share_in_feature_span'))}; share of the subspace's "
        "effect that its part in the decoder span carries (1 - change without the span / "
        "change of the whole subspace): "
        f"{fmt(summary.get('subspace_effect_share_of_feature_span'))}"
        ". Projections at the subspace's site, each span with the other projected out of it:\n",
        md_table(
            overlap,
            [
                "edit",
                "site",
                "dims",
                "contrast_change",
                "ci_low",
                "ci_high",
                "n_clusters",
                "p_value",
            ],
        ),
        "Sparsity: positions each edit touches per validation prompt (BOS excluded), and the "
        "mean norm of what it removes there:\n",
        md_table(
            sizes,
            ["method", "positions_edited", "positions_total", "share_edited", "mean_edit_norm"],
        ),
    ]


def baselines_finding(report: Report) -> list[str]:
    data = report.part(BaselinesReport).baselines
    summary = data.summary or {}
    rows = {r["method"]: r for r in data.table}
    tested = rows.get("tested_features")
    if not summary or not tested:
        return []
    verdicts = summary.get("verdicts") or {}
    parts = []
    for name in ("mean_diff_subspace", "misalignment_direction"):
        row = rows.get(name) or {}
        parts.append(
            f"they {verdicts.get(name, 'undetermined')} the {name.replace('_', ' ')} "
            f"({fmt(row.get('contrast_change'))}, 95% CI {fmt(row.get('ci_low'))} to "
            f"{fmt(row.get('ci_high'))})"
        )
    headline = ", ".join(
        f"{verdicts.get(name, 'undetermined')} the {short}"
        for name, short in (
            ("mean_diff_subspace", "subspace"),
            ("misalignment_direction", "direction"),
        )
    )
    return [
        f"**Baselines (tested features {headline}):** ablating the "
        f"{summary['k']} tested features changes the contrast by "
        f"{fmt(tested.get('contrast_change'))} (95% CI {fmt(tested.get('ci_low'))} to "
        f"{fmt(tested.get('ci_high'))}, {tested.get('n_clusters')} clusters); "
        + "; ".join(parts)
        + " (beat/lose: intervals apart; match: they overlap)."
    ]
