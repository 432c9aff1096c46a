"""Where a results directory stands: counts per stage, queue states, disk use."""

from __future__ import annotations

import json
import logging
import shutil
from typing import Any

from em_circuits.core.labeling_records import load_labels, load_verdicts
from em_circuits.core.store import ResultsStore
from em_circuits.labeling.calibration import calibration
from em_circuits.labeling.items import status_counts
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug, resolve_device

log = logging.getLogger("pipeline")


def status(
    store: ResultsStore, base: ModelSpec, adapted: ModelSpec, device: str | None = None
) -> dict[str, Any]:
    """Counts per stage, queue depth, judge-human agreement, flagged/divergent, disk use."""
    device = str(resolve_device(device))
    slugs = {
        role: model_slug(spec, fingerprint(spec, device))
        for role, spec in (("base", base), ("adapted", adapted))
    }
    return status_of(store, slugs)


def stored_models(store: ResultsStore) -> list[dict[str, str]]:
    """The models the results directory holds verdicts of: {"adapted": slug, "base": slug}
    each (the base's slug as the verdicts record it), so ``run --status`` can show a run
    without its model flags."""
    found = []
    for adapted_slug in store.verdict_slugs():
        base_slug = ""
        for path in store.verdict_paths(adapted_slug)[:1]:
            try:
                base_slug = str(json.loads(path.read_text(encoding="utf-8")).get("base_slug", ""))
            except (OSError, ValueError, AttributeError):
                base_slug = ""
        if base_slug:
            found.append({"adapted": adapted_slug, "base": base_slug})
    return found


def status_of(store: ResultsStore, slugs: dict[str, str]) -> dict[str, Any]:
    """:func:`status` for the models with these results folder names (``base``, ``adapted``)."""
    from em_circuits.attribution.stored_graphs import find_graph_metas  # noqa: PLC0415  # heavy: loads torch

    verdicts = load_verdicts(store, slugs["adapted"])
    labels = load_labels(store, slugs["adapted"])
    calib = calibration(store, slugs["adapted"], save=False)
    return {
        "models": slugs,
        "prompts": len(store.prompt_ids()),
        "logits": {role: len(store.logits_paths(slug)) for role, slug in slugs.items()},
        "verdicts": len(verdicts),
        "flagged": sum(v["flagged"] for v in verdicts),
        "divergent": sum(v["divergent"] for v in verdicts),
        "divergent_by_rank": sum(bool(v.get("divergent_by_rank")) for v in verdicts),
        "queue": status_counts(store, slugs["adapted"]),
        "labels": {
            "human": sum(lab["labeled_by"] == "human" for lab in labels),
            "judge": sum(lab["labeled_by"] == "judge" for lab in labels),
            "rejected": sum(bool(lab.get("rejected")) for lab in labels),
        },
        "judge_human_tokens": calib.get("n_tokens"),
        "judge_human_agreement": calib.get("agreement"),
        "judge_human_kappa": calib.get("kappa"),
        "graphs": {role: len(find_graph_metas(store, slug)) for role, slug in slugs.items()},
        "analysis": [p.name for p in store.analysis_files(slugs["adapted"])],
        "report": store.report_md_path.is_file(),
        "disk_bytes": store.disk_usage(),
        "disk_free_bytes": shutil.disk_usage(store.root).free,
    }


def format_status(info: dict[str, Any]) -> str:
    def mib(n: int) -> str:
        return f"{n / 2**20:.1f} MiB"

    def three_digits(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, (int, float)) else str(value)

    lines = [
        f"models: base {info['models']['base']}, adapted {info['models']['adapted']}",
        f"prompts: {info['prompts']}",
        f"logits: base {info['logits']['base']}, adapted {info['logits']['adapted']}",
        f"verdicts: {info['verdicts']} (flagged {info['flagged']}, divergent {info['divergent']})",
        "queue: " + ", ".join(f"{k} {v}" for k, v in info["queue"].items()),
        "labels: " + ", ".join(f"{k} {v}" for k, v in info["labels"].items()),
        f"judge-human agreement: {three_digits(info['judge_human_agreement'])}  kappa: "
        f"{three_digits(info['judge_human_kappa'])}  ({info['judge_human_tokens']} "
        "human-labeled tokens)",
        f"graphs: base {info['graphs']['base']}, adapted {info['graphs']['adapted']}",
        f"analysis files: {len(info['analysis'])}",
        f"report: {'written' if info['report'] else 'not yet'}",
        "disk: "
        + ", ".join(f"{k} {mib(v)}" for k, v in info["disk_bytes"].items())
        + f" (free {info['disk_free_bytes'] / 2**30:.1f} GiB)",
    ]
    return "\n".join(lines)
