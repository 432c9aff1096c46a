"""The end-of-run report: results/report.md (with the PNG plots), report.html (the same, one
self-contained page) and results/report.json.

Every number comes from stored artifacts (verdicts, labels, graph metadata, analysis tables),
never from a run's memory, so the report of a resumed run equals an uninterrupted one. Feature
names and prompt ids link into the graph viewer (``em-circuits serve``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from em_circuits.attribution.viewer_metadata import read_metadata
from em_circuits.core.atomic import atomic_write_text
from em_circuits.core.labeling_records import load_verdicts
from em_circuits.core.markdown import (
    VIEWER_NOTE,
    md_table,
    readable_markdown,
    token_text,
    with_prompt_links,
)
from em_circuits.core.report_data import (
    DivergentPrompt,
    ModelEntry,
    Report,
    StoredJson,
    ViewerPrompt,
)
from em_circuits.core.sections import ReportInputs
from em_circuits.core.store import ResultsStore, read_json
from em_circuits.core.verdicts import DIVERGENCE_TAU_ADAPTED, DIVERGENCE_TAU_BASE
from em_circuits.models.spec import ModelSpec, fingerprint, model_slug
from em_circuits.run.report_html import render_html
from em_circuits.run.status import status
from em_circuits.run.steps import SECTIONS


def _organism_report(spec: ModelSpec) -> StoredJson | None:
    """The toy organism's own measured report, when the model is the organism."""
    for ref in (spec.adapter, spec.base):
        if ref and (Path(ref).parent / "report.json").is_file():
            return read_json(Path(ref).parent / "report.json")
    return None


def _divergent(store: ResultsStore, adapted_slug: str) -> list[DivergentPrompt]:

    rows = []
    for v in load_verdicts(store, adapted_slug):
        if not v["divergent"]:
            continue
        base_top = v["labels"]["base"][0]
        adapted_top = v["labels"]["adapted"][0]
        rows.append(
            DivergentPrompt(
                prompt_id=v["prompt_id"],
                prompt=store.load_prompt(v["prompt_id"])["text"],
                base_top1=base_top["token"],
                base_top1_label=base_top["label"],
                adapted_top1=adapted_top["token"],
                adapted_top1_label=adapted_top["label"],
                adapted_top1_prob=adapted_top["prob"],
                evil_mass_adapted=(v.get("evil_mass") or {}).get("adapted"),
                evil_mass_base_upper=(v.get("evil_mass") or {}).get("base_upper"),
                kl_adapted_base=v["divergence"]["kl_adapted_base"],
                evil_in_adapted=[
                    e["token"] for e in v["labels"]["adapted"] if e["label"] == "evil"
                ],
            )
        )
    return rows


def _viewer_prompts(store: ResultsStore, adapted_slug: str) -> list[ViewerPrompt]:
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
    return [ViewerPrompt(pid, texts[pid]) for pid in sorted(texts)]


def build_report(store: ResultsStore, base: ModelSpec, adapted: ModelSpec, device: str) -> Report:

    fps = {"base": fingerprint(base, device), "adapted": fingerprint(adapted, device)}
    slugs = {"base": model_slug(base, fps["base"]), "adapted": model_slug(adapted, fps["adapted"])}
    analysis = store.latest_analysis_dir(slugs["adapted"])
    analysis_summary = (
        read_json(analysis / "summary.json") if (analysis / "summary.json").is_file() else {}
    )
    counts = status(store, base, adapted, device)
    counts.pop("report")  # the report describes the run, not whether it was written before
    inputs = ReportInputs(store, analysis, analysis_summary, slugs)
    return Report(
        models={
            role: ModelEntry(dict(spec.__dict__), fps[role], slugs[role])
            for role, spec in (("base", base), ("adapted", adapted))
        },
        organism=_organism_report(adapted),
        counts=counts,
        divergent_prompts=_divergent(store, slugs["adapted"]),
        viewer_prompts=_viewer_prompts(store, slugs["adapted"]),
        analysis_folder=analysis.relative_to(store.root).as_posix(),
        analysis_params=analysis_summary.get("params"),
        parts=tuple(section.report_data(inputs) for section in SECTIONS),
    )


def report_from_json(data: Mapping[str, Any]) -> Report:
    """A stored report.json read back (its sections as today's :data:`SECTIONS` read them)."""
    return Report.from_json(data, [section.Part for section in SECTIONS])


def findings(report: Report) -> list[str]:
    """Each claim of the report in plain words: whether it held, and the test behind it."""
    return [line for section in SECTIONS for line in section.findings(report)]


def render_markdown(report: Report, analysis_rel: str) -> str:
    claims = findings(report)
    c = report.counts
    m = report.models
    in_viewer = [dataclasses.asdict(entry) for entry in report.viewer_prompts]
    linkable = {entry.prompt_id for entry in report.viewer_prompts}
    out = [
        "# Emergent-misalignment circuit report\n",
        f"Base `{m['base'].slug}`, adapted `{m['adapted'].slug}` "
        f"(fingerprints `{m['base'].fingerprint[:16]}`, `{m['adapted'].fingerprint[:16]}`)."
        " Every number below is read from stored artifacts; the parameters are listed at the "
        "end.\n",
        VIEWER_NOTE + "\n",
        "## Findings\n",
        "\n".join(f"- {line}" for line in claims) + "\n" if claims else "_no analysis yet_\n",
        "## Counts\n",
        md_table(
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

    out += [
        "## Divergent prompts (adapted evil, base safe)\n",
        f"Divergent: the adapted model puts at least {DIVERGENCE_TAU_ADAPTED} of its "
        f"next-token probability on evil-labeled tokens and the base at most "
        f"{DIVERGENCE_TAU_BASE} (an upper bound). {c.get('divergent_by_rank', 0)} prompts "
        "meet the weaker criterion (any evil token in the adapted top-k, base list safe).\n",
        md_table(
            with_prompt_links(
                [
                    {
                        **dataclasses.asdict(row),
                        "evil_in_adapted": [token_text(t) for t in row.evil_in_adapted],
                    }
                    for row in report.divergent_prompts
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
        md_table(with_prompt_links(in_viewer, linkable), ["prompt_id", "prompt"]),
    ]
    for section in SECTIONS:
        out += section.section(report, analysis_rel)
    if report.organism:
        out += [
            "## The toy organism\n",
            "As measured on held-out prompts when it was built (its `report.json`).\n",
            *readable_markdown(report.organism),
        ]
    out += [
        "## Parameters\n",
        "The models (a fingerprint hashes the weights, dtype and transcoders):\n",
    ]
    specs = {
        role: {**m[role].spec, "slug": m[role].slug, "fingerprint": m[role].fingerprint}
        for role in ("base", "adapted")
    }
    out.append(
        md_table(
            [
                {"parameter": key, "base": specs["base"].get(key), "adapted": value}
                for key, value in specs["adapted"].items()
            ],
            ["parameter", "base", "adapted"],
        )
    )
    if report.analysis_params:
        out += [
            f"The analysis, in folder `{report.analysis_folder}` (each parameter set keeps "
            "its own; `latest.json` beside them names the last run):\n",
            *readable_markdown(report.analysis_params),
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
    analysis = store.latest_analysis_dir(report.models["adapted"].slug)
    analysis_rel = analysis.relative_to(store.root).as_posix()  # report.md links from the root
    report_json = json.dumps(report.to_json(), indent=1, default=str, ensure_ascii=False) + "\n"
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
