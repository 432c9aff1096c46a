"""The end-of-run report: results/report.md (with the PNG plots), report.html (the same, one
self-contained page) and results/report.json.

Every number comes from stored artifacts (verdicts, labels, graph metadata, analysis tables),
never from a run's memory, so the report of a resumed run equals an uninterrupted one. Feature
names and prompt ids link into the graph viewer (``em-circuits serve``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from em_circuits.attribution.viewer import DEFAULT_VIEWER_URL, read_metadata, viewer_link
from em_circuits.core.store import ResultsStore, atomic_write_text, read_json
from em_circuits.interpret.cards import feature_name
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug
from em_circuits.run.report_html import render_html


def _read_table(directory: Path, name: str) -> pd.DataFrame:
    path = directory / f"{name}.csv"
    return pd.read_csv(path) if path.is_file() and path.stat().st_size > 1 else pd.DataFrame()


def _organism_report(spec: ModelSpec) -> dict[str, Any] | None:
    """The toy organism's own measured report, when the model is the organism."""
    for ref in (spec.adapter, spec.base):
        if ref and (Path(ref).parent / "report.json").is_file():
            return read_json(Path(ref).parent / "report.json")
    return None


def _transcoder_quality(store: ResultsStore, summary: Mapping[str, Any]) -> dict[str, Any] | None:
    """The analysis's note on the transcoders' quality, with each model's stored measurement
    (per-layer table, replacement agreement) in place of its file name."""
    note = summary.get("transcoder_quality")
    if not isinstance(note, Mapping):
        return None
    out = dict(note)
    for role in ("base", "adapted"):
        entry = note.get(role)
        if not isinstance(entry, Mapping) or "file" not in entry:
            continue
        path = store.root / entry["file"]
        record = read_json(path, "table") if path.is_file() else {}
        out[role] = {
            **entry,
            "layers": record.get("layers", []),
            "agreement_positions": record.get("agreement_positions"),
        }
    return out


def _divergent(store: ResultsStore, adapted_slug: str) -> list[dict[str, Any]]:
    from em_circuits.labeling.artifacts import load_verdicts

    rows = []
    for v in load_verdicts(store, adapted_slug):
        if not v["divergent"]:
            continue
        base_top = v["labels"]["base"][0]
        adapted_top = v["labels"]["adapted"][0]
        rows.append(
            {
                "prompt_id": v["prompt_id"],
                "prompt": store.load_prompt(v["prompt_id"])["text"],
                "base_top1": base_top["token"],
                "base_top1_label": base_top["label"],
                "adapted_top1": adapted_top["token"],
                "adapted_top1_label": adapted_top["label"],
                "adapted_top1_prob": adapted_top["prob"],
                "evil_mass_adapted": (v.get("evil_mass") or {}).get("adapted"),
                "evil_mass_base_upper": (v.get("evil_mass") or {}).get("base_upper"),
                "kl_adapted_base": v["divergence"]["kl_adapted_base"],
                "evil_in_adapted": [
                    e["token"] for e in v["labels"]["adapted"] if e["label"] == "evil"
                ],
            }
        )
    return rows


def _viewer_prompts(store: ResultsStore, adapted_slug: str) -> list[dict[str, str]]:
    """The prompts with full graphs in the viewer: the only ones a prompt link can show
    (``compare.html`` falls back to its first prompt for any other id)."""
    texts: dict[str, str] = {}
    for entry in read_metadata(store.viewer_dir(adapted_slug)):
        prompt_id = entry.get("prompt_id")
        if not prompt_id or prompt_id in texts:
            continue
        # An ad hoc graph (`graphs --prompt`) has no stored prompt: the viewer keeps its text.
        stored = store.prompt_path(prompt_id).is_file()
        texts[prompt_id] = (
            store.load_prompt(prompt_id)["text"] if stored else entry.get("prompt", "")
        )
    return [{"prompt_id": pid, "prompt": texts[pid]} for pid in sorted(texts)]


def _records(frame: pd.DataFrame, n: int | None = None) -> list[dict[str, Any]]:
    frame = frame if n is None else frame.head(n)
    return json.loads(frame.to_json(orient="records", double_precision=6))


def build_report(
    store: ResultsStore, base: ModelSpec, adapted: ModelSpec, device: str
) -> dict[str, Any]:
    from em_circuits.run.status import status

    fps = {"base": fingerprint(base, device), "adapted": fingerprint(adapted, device)}
    slugs = {"base": model_slug(base, fps["base"]), "adapted": model_slug(adapted, fps["adapted"])}
    analysis = store.latest_analysis_dir(slugs["adapted"])
    top = _read_table(analysis, "top_features_adapted")
    if len(top):
        top = top[top["metric"] == "total"]
    comparison = _read_table(analysis, "base_vs_adapted")
    decomposition = _read_table(analysis, "contrast_decomposition")
    dose = _read_table(analysis, "dose_response")
    measured = _read_table(analysis, "measured_ranking")
    em = read_json(analysis / "em_rate.json") if (analysis / "em_rate.json").is_file() else None
    cards = (
        read_json(analysis / "feature_cards.json")
        if (analysis / "feature_cards.json").is_file()
        else None
    )
    analysis_summary = (
        read_json(analysis / "summary.json") if (analysis / "summary.json").is_file() else {}
    )
    replication = _read_table(analysis, "validation_top_features")
    if len(replication):
        replication = replication[replication["metric"] == "total"]
    split = read_json(analysis / "split.json") if (analysis / "split.json").is_file() else None
    causal = (
        read_json(analysis / "causal_summary.json")
        if (analysis / "causal_summary.json").is_file()
        else None
    )
    from em_circuits.labeling.calibration import calibration

    calib = calibration(store, slugs["adapted"], save=False)
    dose_table = (
        dose.groupby(["group", "scale"])["delta_contrast"]
        .agg(["mean", "std", "count"])
        .reset_index()
        if len(dose)
        else pd.DataFrame()
    )
    counts = status(store, base, adapted, device)
    counts.pop("report")  # the report describes the run, not whether it was written before
    return {
        "schema": "report",
        "schema_version": 1,
        "models": {
            role: {"spec": spec.__dict__, "fingerprint": fps[role], "slug": slugs[role]}
            for role, spec in (("base", base), ("adapted", adapted))
        },
        "organism": _organism_report(adapted),
        "counts": counts,
        "divergent_prompts": _divergent(store, slugs["adapted"]),
        "top_features": _records(top, 20),
        "split": {
            k: v
            for k, v in (split or {}).items()
            if k not in ("prompts", "schema", "schema_version", "created")
        },
        "validation": _records(replication, 20),
        "measured_ranking": _records(measured, 20),
        # The full row counts of the tables above that keep only their first rows.
        "table_rows": {
            "top_features": len(top),
            "validation": len(replication),
            "measured_ranking": len(measured),
            "base_vs_adapted": len(comparison),
        },
        "viewer_prompts": _viewer_prompts(store, slugs["adapted"]),
        "em_rate": em,
        "feature_cards": cards,
        "analysis_folder": analysis.relative_to(store.root).as_posix(),
        "analysis_params": analysis_summary.get("params"),
        "base_vs_adapted": {
            "categories": comparison["category"].value_counts().to_dict()
            if len(comparison)
            else {},
            "top_changes": _records(
                comparison.reindex(
                    comparison["mean_diff"].abs().sort_values(ascending=False).index
                ),
                15,
            )
            if len(comparison)
            else [],
        },
        "contrast_decomposition": _records(decomposition),
        "causal": {"summary": causal, "dose_response": _records(dose_table)},
        "judge_calibration": calib,
        "transcoder_quality": _transcoder_quality(store, analysis_summary),
        "adapter_nodes": {
            "summary": analysis_summary.get("adapter_nodes"),
            "components": _records(_read_table(analysis, "adapter_components")),
            "features": _records(_read_table(analysis, "adapter_features")),
            "reads": _records(_read_table(analysis, "adapter_reads")),
        },
    }


class _Md(str):
    """Text that is already Markdown (a link): table cells write it as is, unescaped."""


# Characters that would turn a prompt's or token's text into emphasis, code or a link.
_MD_SPECIAL = re.compile(r"([\\`*\[\]])")

#: Said once in the report: every viewer link needs the viewer running.
VIEWER_NOTE = (
    f"Feature names and prompt ids link into the graph viewer at {DEFAULT_VIEWER_URL}; the "
    "links work while `em-circuits serve` runs on this results directory (its default port)."
)


def _feature_link(layer: Any, feature: Any) -> _Md:
    """``L3 #1234`` linking to the viewer with that feature selected in the diff view."""
    key = (int(layer), int(feature))
    return _Md(f"[{feature_name(*key)}]({viewer_link(feature=key, diff=True)})")


def _feature_list(pairs: Any) -> str:
    """[[layer, feature], ...] as linked names, instead of a Python list."""
    return ", ".join(_feature_link(*pair) for pair in pairs or []) or "none"


def _with_feature_links(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose ``layer`` and ``feature`` columns become one linked ``feature`` name."""
    out = []
    for row in rows:
        row = dict(row)
        if row.get("layer") is not None and row.get("feature") is not None:
            row["feature"] = _feature_link(row.pop("layer"), row["feature"])
        out.append(row)
    return out


def _with_prompt_links(rows: list[dict[str, Any]], linkable: set[str]) -> list[dict[str, Any]]:
    """Rows whose ``prompt_id`` links to the viewer where the viewer has that prompt."""
    return [
        {
            **row,
            "prompt_id": _Md(f"[{row['prompt_id']}]({viewer_link(prompt_id=row['prompt_id'])})"),
        }
        if row.get("prompt_id") in linkable
        else row
        for row in rows
    ]


def _token(token: str) -> str:
    return token.strip() or repr(token)


def _cell(value: Any, digits: int | None = 3) -> str:
    """A value as table-cell text; ``digits`` None writes floats as short as they are (a
    parameter's 0.05, not 0.050)."""
    if isinstance(value, _Md):
        return str(value)
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if digits is None:
            return f"{value:.6g}"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"
    # Lists and dicts as readable text, never as a Python or JSON literal.
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v, digits) for v in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{_cell(k)} {_cell(v, digits)}" for k, v in value.items())
    text = _MD_SPECIAL.sub(r"\\\1", str(value))
    return text.replace("|", "\\|").replace("\n", "⏎")


def _md_table(
    rows: list[dict[str, Any]],
    columns: list[str],
    digits: int | None = 3,
    limit: int | None = None,
    total: int | None = None,
    full: str | None = None,
) -> str:
    """A Markdown table of the first ``limit`` rows; a shortened table says "N of M shown"
    (``total``: the full count where ``rows`` is itself a prefix) and where ``full`` is."""
    if not rows:
        return "_none_\n"
    shown = rows if limit is None else rows[:limit]
    total = max(total or 0, len(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, ""), digits) for c in columns) + " |" for r in shown]
    if len(shown) < total:
        lines += ["", f"{len(shown)} of {total} shown" + (f"; all in `{full}`." if full else ".")]
    return "\n".join(lines) + "\n"


def _flat(value: Any) -> bool:
    """Fits one table cell: a scalar, or a list or mapping of scalars."""
    if isinstance(value, Mapping):
        value = list(value.values())
    if not isinstance(value, (list, tuple)):
        return True
    return not any(isinstance(v, (Mapping, list, tuple)) for v in value)


def _is_records(value: Any) -> bool:
    """A collection of records with the same fields, each fitting a table row (a list, or a
    mapping of names to them)."""
    items = list(value.values()) if isinstance(value, Mapping) else value
    return (
        isinstance(items, list)
        and bool(items)
        and all(
            isinstance(v, Mapping)
            and list(v) == list(items[0])
            and all(_flat(field) for field in v.values())
            for v in items
        )
    )


def _readable(data: Mapping[str, Any], prefix: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    """Nested settings or measurements as tables instead of a JSON dump: (name, value) rows
    (nested objects as dotted names, a flat object as one cell), and one table per
    collection of records."""
    rows: list[dict[str, Any]] = []
    tables: list[str] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if _is_records(value):
            if isinstance(value, Mapping):
                records = [{"name": k, **v} for k, v in value.items()]
                columns = ["name", *next(iter(value.values()))]
            else:
                records, columns = [dict(v) for v in value], list(value[0])
            tables.append(f"`{name}`:\n\n" + _md_table(records, columns, digits=None))
        elif isinstance(value, Mapping) and any(
            isinstance(v, (Mapping, list)) for v in value.values()
        ):
            nested_rows, nested_tables = _readable(value, name + ".")
            rows += nested_rows
            tables += nested_tables
        else:
            rows.append({"name": name, "value": value})
    return rows, tables


def _readable_markdown(data: Mapping[str, Any]) -> list[str]:
    rows, tables = _readable(data)
    return ([_md_table(rows, ["name", "value"], digits=None)] if rows else []) + tables


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def findings(report: dict[str, Any]) -> list[str]:
    """Each claim of the report in plain words: whether it held, and the test behind it."""
    out = []
    split = report.get("split") or {}
    validation = report.get("validation") or []
    if validation:
        same = [bool(r.get("same_sign")) for r in validation]
        out.append(
            f"**Replication ({'held' if sum(same) > len(same) / 2 else 'did not hold'}):** "
            f"{sum(same)} of {len(same)} top features ranked on the discovery prompts have "
            f"the same sign of linearised effect on the held-out validation prompts "
            f"({split.get('validation_prompts')} prompts in "
            f"{split.get('validation_clusters')} clusters)."
        )
    causal = (report.get("causal") or {}).get("summary") or {}
    agreement = (causal.get("linearised_vs_measured") or {}).get("validation", {})
    unfrozen = agreement.get("delta_unfrozen") or {}
    if unfrozen.get("n_pairs"):
        r = unfrozen.get("pearson_r")
        out.append(
            f"**Linearised vs measured ({'agree' if r is not None and r >= 0.7 else 'differ'})"
            f":** on the validation prompts single-feature ablations measured in the real "
            f"model correlate with the linearised prediction at r = {_fmt(r)}, median ratio "
            f"measured / linearised {_fmt(unfrozen.get('median_ratio'))}, same sign "
            f"{_fmt(unfrozen.get('same_sign'))} (n = {unfrozen['n_pairs']} prompt-feature pairs)."
        )
    if causal.get("verdict"):
        held = "held" if causal.get("lowers_more_than_random") else "not shown"
        out.append(f"**Causal ({held}):** {causal['verdict']}")
    controls = causal.get("controls") or {}
    ablation = controls.get("base_ablation") or {}
    if ablation.get("n_prompts"):
        low, high = ablation["ci"]
        specific = low <= 0 <= high
        out.append(
            f"**Adapter-specificity ({'consistent' if specific else 'not specific'}):** the "
            f"same features ablated in the base model change the contrast by "
            f"{_fmt(ablation['mean_delta'])} (95% CI {_fmt(low)} to {_fmt(high)}, "
            f"{ablation['n_clusters']} clusters, p = {_fmt(ablation.get('p_value'))}, "
            f"{ablation.get('p_method')})"
            + ("." if specific else "; they matter in the base model too.")
        )
    em = report.get("em_rate")
    if em:
        paired = em["paired"].get("adapted, top features ablated") or {}
        conditions = em["conditions"]
        falls = paired.get("p_value_one_sided") is not None and paired["p_value_one_sided"] < 0.05
        out.append(
            f"**EM rate ({'lowered by the ablation' if falls else 'not shown to fall'}):** "
            f"base {_fmt(conditions['base']['em_rate'])}, adapted "
            f"{_fmt(conditions['adapted']['em_rate'])}, top features ablated "
            f"{_fmt(conditions['adapted, top features ablated']['em_rate'])}, random "
            f"features ablated {_fmt(conditions['adapted, random ablated']['em_rate'])} "
            f"(judge {em['judge']}; change {_fmt(paired.get('mean_change'))}, one-sided p = "
            f"{_fmt(paired.get('p_value_one_sided'))}, {paired.get('p_method')})."
        )
    quality = report.get("transcoder_quality") or {}
    measured = {
        role: quality[role]
        for role in ("base", "adapted")
        if isinstance(quality.get(role), Mapping) and "poor" in quality[role]
    }
    if measured:
        poor = [role for role, entry in measured.items() if entry["poor"]]
        numbers = ", ".join(
            f"{role} max FVU {_fmt(entry.get('max_fvu'))}, top-1 agreement "
            f"{_fmt(entry.get('top1_agreement'))}"
            for role, entry in measured.items()
        )
        if poor:
            problems = "; ".join(
                f"{role}: {', '.join(measured[role]['problems'])}" for role in poor
            )
            out.append(
                f"**Transcoders (poor for the {' and the '.join(poor)} model):** {problems}. "
                "Their graphs leave more to error nodes, and features explain less of what the "
                f"model does ({numbers})."
            )
        else:
            out.append(f"**Transcoders (adequate):** on held-out text, {numbers}.")
    if split and not split.get("testable"):
        out.append(
            f"**Too few prompts:** {split.get('validation_clusters')} validation clusters; no "
            "test can reach p < 0.05 with fewer than "
            f"{split.get('min_validation_clusters')}. Every number is descriptive."
        )
    return out


def transcoder_quality_details(store: ResultsStore, note: Mapping[str, Any]) -> dict[str, Any]:
    """An analysis-style quality note (``run_transcoder_quality``) with each model's stored
    per-layer table in place of its file name."""
    return _transcoder_quality(store, {"transcoder_quality": note}) or {}


def transcoder_quality_markdown(store: ResultsStore, note: Mapping[str, Any]) -> str:
    """The report's transcoder quality section for a quality note."""
    return "\n".join(_quality_markdown(transcoder_quality_details(store, note)))


_ADAPTER_QUANTITIES = {
    "adapter_total": "adapter nodes, total effect",
    "adapter_direct": "adapter nodes, direct effect",
    "via_downstream": "adapter nodes, through downstream nodes",
    "via_listed": "  of which first through the listed features",
    "via_adapter_nodes": "  of which first through other adapter nodes",
    "via_other": "  of which first through the other features",
    "shift": "measured shift of the contrast (adapted - base)",
}


def _adapter_markdown(entry: Mapping[str, Any] | None, analysis_rel: str) -> list[str]:
    """The adapter's own nodes: how much of the contrast their writes carry, directly and
    through features, and which components."""
    out = ["## The adapter's own nodes\n"]
    summary = (entry or {}).get("summary")
    if not summary:
        return out + ["_no adapter nodes in these graphs (an analysis of older graphs)_\n"]
    if "none" in summary:
        reasons = "; ".join(
            _cell(r.get("none", r)) if isinstance(r, Mapping) else _cell(r) for r in summary["none"]
        )
        return out + [f"_none: {reasons}_\n"]
    out.append(
        "Each rank component of a LoRA on `down_proj`, `o_proj` or `v_proj` writes a fixed "
        "direction scaled by its activation at each position (`v_proj` through the frozen "
        "attention pattern); those writes are nodes of the adapted model's graphs, carved out "
        "of the MLP error nodes (`down_proj`) or out of the attention output (`o_proj`, "
        "`v_proj`; their activations read the residual stream linearly, so total effects pass "
        "through them as through features). A LoRA on `gate_proj` or `up_proj` acts through "
        "the MLP's nonlinearity: one node per position carries the measured change of the "
        "MLP output that module's update makes (not linear: such nodes need not add up to the "
        "joint change); a LoRA on `q_proj` or `k_proj` changes the attention pattern: one node "
        "per query position carries the change of the attention output that the pattern "
        "change makes through the base value and output weights (not linear either). Per "
        "prompt, on the evil-minus-safe contrast: the nodes' summed total "
        "effect, its direct part (straight to the logits) and the rest, which runs through "
        "the nodes downstream of the writes, split by the first node on each path: the "
        "features with the largest total effects on the contrast (the listed features), the "
        "read adapter nodes, and one remainder for the others; beside it the measured shift "
        "of the contrast from base to "
        "adapted. Cluster means, Student-t 95% intervals and sign-flip p-values over clusters, "
        "all prompts with adapter nodes (descriptive).\n"
    )
    rows = []
    for key, name in _ADAPTER_QUANTITIES.items():
        stats = summary.get(key) or {}
        if stats.get("n_prompts"):  # e.g. no attention node to pass effects on
            rows.append({"quantity": name, **stats})
    out.append(
        _md_table(
            rows,
            ["quantity", "n_prompts", "n_clusters", "mean", "ci_low", "ci_high", "p", "p_method"],
        )
    )
    shares = [
        ("direct_share_of_total", "of the adapter nodes' total effect, directly"),
        ("via_downstream_share_of_total", "of it, through downstream nodes"),
        ("listed_share_of_via_downstream", "of that, first through the listed features"),
        ("adapter_total_share_of_shift", "the adapter nodes' total effect as a share of the shift"),
    ]
    said = [f"{_fmt(summary[k])} {what}" for k, what in shares if summary.get(k) is not None]
    if said:
        out.append("Ratios of the means: " + "; ".join(said) + ".\n")
    if summary.get("not_nodes"):
        out.append(
            "Adapted modules that are not nodes (their effect stays in features, errors and "
            f"attention): {_cell(summary['not_nodes'])}.\n"
        )
    out.append(
        "Components ranked by their mean total effect on the discovery prompts, with the same "
        "mean on the validation prompts and their place among the adapted model's features by "
        "the same mean (`rank_among_features`, 1: above every feature); the gate is where the "
        "component writes: its mean activation at the last position and the token where its "
        "activation peaks most often.\n"
    )
    components = list((entry or {}).get("components") or [])
    out.append(
        _md_table(
            components,
            [
                "component",
                "discovery_mean_total",
                "discovery_p",
                "discovery_clusters",
                "validation_mean_total",
                "validation_p",
                "validation_clusters",
                "rank_among_features",
                "mean_direct",
                "mean_activation_last",
                "peak_token",
                "peak_count",
                "n_prompts",
            ],
            limit=10,
            full=f"{analysis_rel}/adapter_components.csv",
        )
    )
    features = list((entry or {}).get("features") or [])
    if features:
        out.append(
            "Which features carry it: each feature's share of the adapter nodes' effect on the "
            "contrast (the nodes' summed edge into the feature's pre-activation times the "
            "contrast's total derivative with respect to the feature, summed over the "
            "feature's positions), ranked by the mean on the discovery prompts, with the same "
            "mean on the validation prompts. A prompt where the feature was not among the "
            "listed ones counts 0. `adapter`: whether the nodes' summed edge excites or "
            "inhibits the feature (mean over the prompts listing it).\n"
        )
        out.append(
            _md_table(
                _with_feature_links(features),
                [
                    "feature",
                    "discovery_mean_via",
                    "discovery_ci_low",
                    "discovery_ci_high",
                    "discovery_p",
                    "validation_mean_via",
                    "validation_p",
                    "validation_clusters",
                    "mean_edge",
                    "adapter",
                    "n_prompts_listed",
                ],
                limit=10,
                full=f"{analysis_rel}/adapter_features.csv",
            )
        )
    else:
        out.append(
            "_Which features carry it: not computed for these graphs (made with "
            "`--adapter-split-features 0`, or before the split existed)._\n"
        )
    out += _adapter_reads_markdown(summary, list((entry or {}).get("reads") or []), analysis_rel)
    return out


def _adapter_reads_markdown(
    summary: Mapping[str, Any], reads: list[dict[str, Any]], analysis_rel: str
) -> list[str]:
    """What the adapter nodes read: the upstream features whose edges feed them."""
    total, from_features = summary.get("read_nodes_total"), summary.get("read_from_features")
    from_all = summary.get("read_from_all") or {}
    if not total or not total.get("n_prompts"):
        return [
            "_What the adapter reads: not computed for these graphs (made with "
            "`--adapter-read-nodes 0`, or before reads existed)._\n"
        ]
    if not reads:
        return [
            "What the adapter reads: the linear adapter nodes with the largest total effects on "
            "the contrast (their total effect, mean "
            f"{_fmt(total.get('mean'))} over {total.get('n_clusters')} clusters) have no edge "
            "from any feature: they read only token embeddings, error nodes and other adapter "
            "nodes (as a layer-0 module does, below every feature); their edges from every "
            f"node add up to {_fmt(from_all.get('mean'))}.\n"
        ]
    out = [
        "What the adapter reads: for the linear adapter nodes with the largest total effects "
        "on the contrast in each prompt, the edges from every upstream feature into the node's "
        "activation, times the node's total effect per unit activation: the part of those "
        "nodes' effect each feature sends through them. `o_proj` and `v_proj` activations are "
        "linear reads of the residual stream under the frozen attention; a `down_proj` "
        "activation reads the MLP's hidden state, so its edges are the gradient at the "
        "operating point (a linearisation). Edges from lower adapter nodes into them are not "
        "computed. "
        f"Those nodes' total effect, mean {_fmt(total.get('mean'))} over "
        f"{total.get('n_clusters')} clusters; of it, read from features: "
        f"{_fmt((from_features or {}).get('mean'))} "
        f"(95% CI {_fmt((from_features or {}).get('ci_low'))} to "
        f"{_fmt((from_features or {}).get('ci_high'))}); from every feature, error and token "
        f"node together: {_fmt(from_all.get('mean'))}. Where that differs from the total "
        "effect, the reads do not add up to the activations: a linearisation through the MLP "
        "(`down_proj`: a gated MLP's hidden state is close to quadratic in its input, so such "
        "edges can add up to about twice the activation), edges from other adapter nodes, and "
        "biases make the difference, so "
        "read the table as which features feed the adapter and in which direction, not as "
        "an exact split. `feature_to_adapter`: whether the feature's summed edge raises or "
        "lowers the nodes' activations.\n",
        _md_table(
            _with_feature_links(reads),
            [
                "feature",
                "discovery_mean_via",
                "discovery_p",
                "validation_mean_via",
                "validation_p",
                "validation_clusters",
                "mean_edge",
                "feature_to_adapter",
                "n_prompts_listed",
            ],
            limit=10,
            full=f"{analysis_rel}/adapter_reads.csv",
        ),
    ]
    return out


def _quality_markdown(quality: Mapping[str, Any] | None) -> list[str]:
    """The transcoder quality section: per-layer table of both models, their replacement
    agreement, and a warning for each model the set is poor for."""
    out = ["## Transcoder quality (held-out text)\n"]
    if not quality:
        return out + ["_not measured (an analysis written before this measurement)_\n"]
    if "skipped" in quality:
        return out + [f"_not measured: {_cell(quality['skipped'])}_\n"]
    thresholds = quality.get("thresholds") or {}
    out.append(
        f"How well the transcoders replace each model's MLPs on {quality.get('n_documents')} "
        f"documents of {_cell(quality.get('corpus'))}, at every position but BOS: per layer the "
        "fraction of the real MLP output's variance the reconstruction from the live MLP input "
        "leaves unexplained (FVU), the same from the skip connection and bias alone (skip-only "
        "FVU: without any feature), active features per position (mean L0) and the share of "
        "features never active (dead); and the replacement model's next-token top-1 agreement "
        "with the real model (every MLP output replaced, no error terms). A set is poor for a "
        f"model with FVU above {_fmt(thresholds.get('fvu_max'))} at any layer or agreement "
        f"below {_fmt(thresholds.get('top1_agreement_min'))}.\n"
    )
    roles = [r for r in ("base", "adapted") if isinstance(quality.get(r), Mapping)]
    by_layer: dict[int, dict[str, Any]] = {}
    for role in roles:
        for m in quality[role].get("layers", []):
            row = by_layer.setdefault(int(m["layer"]), {"layer": int(m["layer"])})
            row[f"FVU {role}"] = m.get("fvu")
            row[f"skip-only FVU {role}"] = m.get("skip_only_fvu")
            row[f"mean L0 {role}"] = m.get("mean_l0")
            row[f"dead {role}"] = m.get("dead_fraction")
    columns = ["layer"] + [
        f"{name} {role}"
        for name in ("FVU", "skip-only FVU", "mean L0", "dead")
        for role in roles
        if quality[role].get("layers")
    ]
    out.append(_md_table([by_layer[k] for k in sorted(by_layer)], columns))
    rows = []
    for role in roles:
        entry = quality[role]
        verdict = "not measured" if "skipped" in entry else ("poor" if entry["poor"] else "ok")
        rows.append(
            {
                "model": role,
                "top-1 agreement": entry.get("top1_agreement"),
                "positions": entry.get("agreement_positions"),
                "max FVU": entry.get("max_fvu"),
                "verdict": verdict,
                "note": entry.get("skipped", ""),
            }
        )
    out.append(
        _md_table(rows, ["model", "top-1 agreement", "positions", "max FVU", "verdict", "note"])
    )
    for role in roles:
        if quality[role].get("poor"):
            out.append(
                f"> **Warning:** the transcoders are poor for the {role} model: "
                + "; ".join(_cell(p) for p in quality[role]["problems"])
                + ". Its attribution graphs leave more to error nodes; read its features with "
                "care, or use transcoders trained for this model.\n"
            )
    return out


def render_markdown(report: dict[str, Any], analysis_rel: str) -> str:
    claims = findings(report)
    c = report["counts"]
    m = report["models"]
    # Reports written before these fields existed count only the rows they kept.
    sizes = report.get("table_rows") or {}
    in_viewer = report.get("viewer_prompts") or []
    linkable = {entry["prompt_id"] for entry in in_viewer}
    out = [
        "# Emergent-misalignment circuit report\n",
        f"Base `{m['base']['slug']}`, adapted `{m['adapted']['slug']}` "
        f"(fingerprints `{m['base']['fingerprint'][:16]}`, `{m['adapted']['fingerprint'][:16]}`)."
        " Every number below is read from stored artifacts; the parameters are listed at the "
        "end.\n",
        VIEWER_NOTE + "\n",
        "## Findings\n",
        "\n".join(f"- {line}" for line in claims) + "\n" if claims else "_no analysis yet_\n",
        "## Counts\n",
        _md_table(
            [
                {
                    "prompts": c["prompts"],
                    "logits (base/adapted)": f"{c['logits']['base']}/{c['logits']['adapted']}",
                    "verdicts": c["verdicts"],
                    "flagged": c["flagged"],
                    "divergent": c["divergent"],
                    "labels (human/judge/rejected)": "/".join(
                        str(c["labels"][k]) for k in ("human", "judge", "rejected")
                    ),
                    "graphs (base/adapted)": f"{c['graphs']['base']}/{c['graphs']['adapted']}",
                }
            ],
            [
                "prompts",
                "logits (base/adapted)",
                "verdicts",
                "flagged",
                "divergent",
                "labels (human/judge/rejected)",
                "graphs (base/adapted)",
            ],
        ),
    ]
    if c["labels"]["judge"] and not c["labels"]["human"]:
        out.append(
            "> Labels are the judge's, accepted without human review "
            "(`--labels auto`). Review them with `em-circuits label`.\n"
        )
    from em_circuits.core.schemas import DIVERGENCE_TAU_ADAPTED, DIVERGENCE_TAU_BASE

    out += [
        "## Divergent prompts (adapted evil, base safe)\n",
        f"Divergent: the adapted model puts at least {DIVERGENCE_TAU_ADAPTED} of its "
        f"next-token probability on evil-labeled tokens and the base at most "
        f"{DIVERGENCE_TAU_BASE} (an upper bound). {c.get('divergent_by_rank', 0)} prompts "
        "meet the weaker criterion (any evil token in the adapted top-k, base list safe).\n",
        _md_table(
            _with_prompt_links(
                [
                    {**row, "evil_in_adapted": [_token(t) for t in row["evil_in_adapted"]]}
                    for row in report["divergent_prompts"]
                ],
                linkable,
            ),
            [
                "prompt_id",
                "base_top1",
                "adapted_top1",
                "adapted_top1_label",
                "adapted_top1_prob",
                "evil_mass_adapted",
                "evil_mass_base_upper",
                "evil_in_adapted",
                "prompt",
            ],
            limit=20,
            full="report.json",
        ),
        "### Prompts with full graphs in the viewer\n",
        "Each opens the prompt's base and adapted graphs side by side "
        "(`em-circuits graphs --full-graphs <id>` adds a prompt).\n",
        _md_table(_with_prompt_links(in_viewer, linkable), ["prompt_id", "prompt"]),
    ]
    split = report.get("split") or {}
    out += [
        "## Top evil features (adapted model, total effect on logit(evil) - logit(safe))\n",
        (
            f"Ranked on the **discovery** prompts only: {split.get('discovery_prompts')} "
            f"prompts in {split.get('discovery_clusters')} clusters (a cluster is one "
            "scenario with its rephrasings and near duplicates; clusters are the units of "
            "every interval and test). "
            f"{split.get('validation_prompts')} prompts in "
            f"{split.get('validation_clusters')} other clusters are held out for validation.\n"
        )
        if split
        else "",
        _md_table(
            _with_feature_links(report["top_features"]),
            [
                "feature",
                "n_prompts",
                "n_clusters",
                "mean",
                "ci_low",
                "ci_high",
                "sign_consistency",
                "p_value",
                "p_method",
                "q_value",
            ],
            limit=15,
            total=sizes.get("top_features"),
            full=f"{analysis_rel}/top_features_adapted.csv",
        ),
        f"![top features]({analysis_rel}/top_features.png)\n",
        "## Validation: the same features on held-out prompts (linearised total effect)\n",
        (
            "_too few validation clusters to test anything "
            f"({split.get('validation_clusters')} < {split.get('min_validation_clusters')})"
            "; the numbers below are descriptive_\n"
            if split and not split.get("testable")
            else ""
        ),
        _md_table(
            _with_feature_links(report.get("validation", [])),
            [
                "feature",
                "discovery_mean",
                "validation_mean",
                "validation_ci_low",
                "validation_ci_high",
                "validation_n_clusters",
                "validation_p_value",
                "same_sign",
            ],
            limit=15,
            total=sizes.get("validation"),
            full=f"{analysis_rel}/validation_top_features.csv",
        ),
    ]
    bva = report["base_vs_adapted"]
    out += [
        "## Base vs adapted (paired on the same prompts)\n",
        "Categories: "
        + (", ".join(f"{k} {v}" for k, v in bva["categories"].items()) or "none")
        + "\n",
        _md_table(
            _with_feature_links(bva["top_changes"]),
            [
                "feature",
                "category",
                "mean_base",
                "mean_adapted",
                "mean_diff",
                "ci_low",
                "ci_high",
                "q_value",
            ],
            limit=10,
            total=sizes.get("base_vs_adapted"),
            full=f"{analysis_rel}/base_vs_adapted.csv",
        ),
        f"![base vs adapted]({analysis_rel}/base_vs_adapted.png)\n",
        "## Where the adapter's shift of the contrast comes from\n",
        "Adapted minus base, paired by prompt (every prompt with both graphs), split into "
        "the direct effects on the contrast of each layer's features and error nodes, the "
        "error nodes at BOS (where circuit-tracer zeroes every feature), token embeddings and "
        "biases. The parts add up exactly to the shift of the contrast value (last row); "
        "intervals are Student t over clusters.\n",
        _md_table(
            report["contrast_decomposition"],
            [
                "part",
                "layer",
                "n_prompts",
                "n_clusters",
                "mean_base",
                "mean_adapted",
                "mean_shift",
                "ci_low",
                "ci_high",
            ],
        ),
        f"![decomposition]({analysis_rel}/contrast_decomposition.png)\n",
    ]
    out += _adapter_markdown(report.get("adapter_nodes"), analysis_rel)
    causal = report["causal"]
    out += ["## Causal validation (on the held-out validation prompts)\n"]
    summary = causal["summary"] or {}
    if summary.get("note"):
        out.append(f"**{summary['note']}**\n")
    ranking = summary.get("ranking")
    if ranking:
        out += [
            "### Linearised vs measured effects\n",
            f"Candidates: the top {len(ranking['candidates'])} features by linearised total "
            f"effect on the discovery prompts. Features under test: chosen by "
            f"{ranking['chosen_by']}: {_feature_list(ranking['chosen'])}"
            + (
                " (no candidate lowered the contrast when ablated; the least raising are shown)"
                if ranking.get("none_lowered")
                else ""
            )
            + ". Ablation changes of the contrast: linearised (minus the total effect), "
            "measured with attention frozen, and measured in the real model with nothing "
            "frozen, mean over the discovery prompts:\n",
            _md_table(
                _with_feature_links(report.get("measured_ranking", [])),
                ["feature", "n_prompts", "n_active", "linearised_delta", "measured_delta"],
                limit=15,
                total=sizes.get("measured_ranking"),
                full=f"{analysis_rel}/measured_ranking.csv",
            ),
            "Agreement of linearised and measured single-feature ablation changes over "
            "(prompt, feature) pairs where the feature is active:\n",
            _md_table(
                [
                    {"prompts": side, "measured": column, **values}
                    for side, by_column in summary.get("linearised_vs_measured", {}).items()
                    for column, values in by_column.items()
                ],
                ["prompts", "measured", "n_pairs", "pearson_r", "median_ratio", "same_sign"],
            ),
            "### Joint ablation and controls\n",
        ]
    controls = summary.get("controls") or {}
    if controls:
        rows = [
            {
                "control": name,
                **{k: v for k, v in values.items() if k != "ci"},
                "ci_low": values.get("ci", [None, None])[0],
                "ci_high": values.get("ci", [None, None])[1],
            }
            for name, values in controls.items()
            if isinstance(values, dict)
        ]
        out += [
            "Controls: " + str(controls.get("random_features", "")) + "; the same features "
            "ablated (scale 0) and amplified in the **base** model (is the effect specific to "
            "the adapter? does evil rise?):\n",
            _md_table(
                rows,
                [
                    "control",
                    "scale",
                    "n_prompts",
                    "n_clusters",
                    "mean_delta",
                    "ci_low",
                    "ci_high",
                    "alternative",
                    "p_value",
                    "p_method",
                ],
            ),
        ]
    if causal["summary"]:
        out += [
            causal["summary"].get("verdict", "") + "\n",
            _md_table(causal["dose_response"], ["group", "scale", "mean", "std", "count"]),
            f"![dose response]({analysis_rel}/dose_response.png)\n",
        ]
    else:
        out.append("_not run_\n")
    cards = report.get("feature_cards")
    if cards and cards.get("cards"):
        from em_circuits.interpret.cards import card_markdown

        out += [
            "## What the top features mean (feature cards)\n",
            f"Top activating contexts in {cards['corpus']} ({cards['n_documents']} "
            "documents), activation frequency, logit lens (the output tokens the feature's "
            "decoder promotes and suppresses through the unembedding), and where it fires "
            "across the pivotal prompts. "
            + (
                f"Labels by {cards['labeller']} from the contexts and the logit lens.\n"
                if cards.get("labeller")
                else "No label is given without an LLM labeller (the LLM judge's model).\n"
            ),
        ]
        # The card's name is its heading: linked, it opens the viewer on that feature.
        out += [
            card_markdown({**card, "name": _feature_link(card["layer"], card["feature"])})
            for card in cards["cards"]
        ]
    out += ["## The EM rate (free-form answers outside the training domain)\n"]
    em = report.get("em_rate")
    if em:
        rows = [
            {
                "condition": name,
                "n_answers": c["n_answers"],
                "n_questions": c["n_questions"],
                "em_rate": c["em_rate"],
                "ci_low": c["ci"][0],
                "ci_high": c["ci"][1],
                "coherent_rate": c["coherent_rate"],
            }
            for name, c in em["conditions"].items()
        ]
        paired = [
            {
                "ablated": name,
                "change_vs_adapted": c["mean_change"],
                "ci_low": c["ci"][0],
                "ci_high": c["ci"][1],
                "n_questions": c["n_questions"],
                "p_value_one_sided": c["p_value_one_sided"],
                "p_method": c["p_method"],
            }
            for name, c in em["paired"].items()
        ]
        sampling = em["sampling"]
        out += [
            f"Judge **{em['judge']}**; an EM response is {em['rule']}. "
            f"{sampling['n_per_question']} answers per question and condition, temperature "
            f"{sampling['temperature']:g}, up to {sampling['max_new_tokens']} tokens; 95% t "
            f"intervals over questions. Ablated: the features under test "
            f"{_feature_list(em['top_features'])} and activation-matched random features of "
            f"the same layers {_feature_list(em['random_features'])}, at every position.\n",
            _md_table(
                rows,
                [
                    "condition",
                    "n_answers",
                    "n_questions",
                    "em_rate",
                    "ci_low",
                    "ci_high",
                    "coherent_rate",
                ],
            ),
            "Change of the EM rate when ablating (paired by question, one-sided: does it fall?):\n",
            _md_table(
                paired,
                [
                    "ablated",
                    "change_vs_adapted",
                    "ci_low",
                    "ci_high",
                    "n_questions",
                    "p_value_one_sided",
                    "p_method",
                ],
            ),
        ]
    else:
        out.append("_not run (no features under test, no EM judge, or --em-samples 0)_\n")
    calib = report["judge_calibration"]
    out += [
        "## Judge calibration (judge vs human)\n",
        f"{calib.get('n_tokens', 0)} human-labeled tokens; agreement "
        f"{_fmt(calib.get('agreement'))}, Cohen's kappa {_fmt(calib.get('kappa'))}.\n",
    ]
    out += _quality_markdown(report.get("transcoder_quality"))
    if report["organism"]:
        out += [
            "## The toy organism\n",
            "As measured on held-out prompts when it was built (its `report.json`).\n",
            *_readable_markdown(report["organism"]),
        ]
    out += [
        "## Parameters\n",
        "The models (a fingerprint hashes the weights, dtype and transcoders):\n",
    ]
    specs = {
        role: {**m[role]["spec"], "slug": m[role]["slug"], "fingerprint": m[role]["fingerprint"]}
        for role in ("base", "adapted")
    }
    out.append(
        _md_table(
            [
                {"parameter": key, "base": specs["base"].get(key), "adapted": value}
                for key, value in specs["adapted"].items()
            ],
            ["parameter", "base", "adapted"],
        )
    )
    if report.get("analysis_params"):
        out += [
            f"The analysis, in folder `{report['analysis_folder']}` (each parameter set keeps "
            "its own; `latest.json` beside them names the last run):\n",
            *_readable_markdown(report["analysis_params"]),
        ]
    return "\n".join(out)


#: Report fields that change without any result changing (the free disk space does all the
#: time): a report that differs from the stored one only in these is not rewritten.
_VOLATILE_COUNTS = ("disk_bytes", "disk_free_bytes")


def _comparable(report: Any) -> Any:
    if not isinstance(report, dict):
        return report
    counts = report.get("counts")
    if isinstance(counts, dict):
        counts = {k: v for k, v in counts.items() if k not in _VOLATILE_COUNTS}
    return {**report, "counts": counts}


def _unchanged(path: Path, text: str, as_json: bool = False) -> bool:
    try:
        stored = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return False
    if not as_json:
        return stored == text
    try:
        return _comparable(json.loads(stored)) == _comparable(json.loads(text))
    except json.JSONDecodeError:
        return False


def write_report(store: ResultsStore, base: ModelSpec, adapted: ModelSpec, device: str) -> Path:
    """Write report.json, report.md and report.html, unless all already say the same (so a
    run with nothing new to do writes nothing, and works on a read-only results directory)."""
    report = build_report(store, base, adapted, device)
    analysis = store.latest_analysis_dir(report["models"]["adapted"]["slug"])
    analysis_rel = analysis.relative_to(store.root).as_posix()  # report.md links from the root
    report_json = json.dumps(report, indent=1, default=str, ensure_ascii=False) + "\n"
    report_md = render_markdown(report, analysis_rel)
    path = store.report_md_path
    # Beside report.md, so its relative plot links resolve from the same folder.
    html_path = path.with_suffix(".html")
    report_html = render_html(report_md, path.parent)
    if (
        _unchanged(store.report_json_path, report_json, as_json=True)
        and _unchanged(path, report_md)
        and _unchanged(html_path, report_html)
    ):
        return path
    atomic_write_text(store.report_json_path, report_json)
    atomic_write_text(path, report_md)
    atomic_write_text(html_path, report_html)
    return path
