"""Human feedback, read in one place for the prompt generator and the judge's few-shot examples."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from em_circuits.core.store import ArtifactError, ResultsStore, read_artifact
from em_circuits.labeling.artifacts import load_labels

log = logging.getLogger(__name__)


def feedback_examples(store: ResultsStore, adapted_slug: str) -> dict[str, Any]:
    """Human feedback as few-shot material (judge-made labels are left out).

    Keys: ``disagreements`` (token, judge label, human label, explanation), ``rejected``
    (prompt and reason), ``agreed`` (prompts labeled without any disagreement), ``working``
    (prompts whose adapted list a human found evil; ``divergent`` when base was safe).
    """
    out: dict[str, list[dict[str, Any]]] = {
        "disagreements": [],
        "rejected": [],
        "agreed": [],
        "working": [],
    }
    for labels in load_labels(store, adapted_slug):
        if labels["labeled_by"] != "human":
            continue
        base = {"prompt_id": labels["prompt_id"], "prompt_text": labels.get("prompt_text")}
        if labels.get("rejected"):
            out["rejected"].append(
                {**base, "reason": labels.get("reject_reason"), "note": labels.get("note")}
            )
            continue
        for d in labels.get("disagreements", []):
            out["disagreements"].append({**base, **d})
        summary = {
            **base,
            "human_verdict": labels.get("human_verdict"),
            "evil_tokens": _tokens_with(labels, "evil"),
            "unsure_tokens": _tokens_with(labels, "unsure"),
            "note": labels.get("note"),
        }
        if not labels.get("disagreements"):
            out["agreed"].append(summary)
        verdicts = labels.get("human_verdict") or {}
        if verdicts.get("adapted") == "evil":
            out["working"].append({**summary, "divergent": verdicts.get("base") == "safe"})
    return {"adapted_slug": adapted_slug, **out}


def _tokens_with(labels: dict[str, Any], label: str) -> list[dict[str, Any]]:
    return [
        {"list": name, "index": t["index"], "token": t["token"], "token_id": t["token_id"]}
        for name, toks in labels["tokens"].items()
        for t in toks
        if t.get("label") == label
    ]






def _read_all(store: ResultsStore, sub: str, kind: str) -> Iterator[dict[str, Any]]:
    for path in sorted((store.root / sub).glob("*/*.json")):
        if path.name == "calibration.json":  # shares labels/<slug>/ but is a summary table
            continue
        try:
            yield read_artifact(path, kind)
        except ArtifactError as err:  # one broken file must not stop generation; say which
            log.warning("skipping %s", err)


def iter_labels(store: ResultsStore) -> Iterator[dict[str, Any]]:
    """Every labels artifact of every adapted model (broken files are skipped with a warning)."""
    yield from _read_all(store, "labels", "labels")


def iter_verdicts(store: ResultsStore) -> Iterator[dict[str, Any]]:
    yield from _read_all(store, "verdicts", "verdict")


def prompt_text_of(
    store: ResultsStore, artifact: dict[str, Any], cache: dict[str, str]
) -> str | None:
    """The prompt's text from its record, else the copy a labels/verdict artifact carries."""
    pid = artifact["prompt_id"]
    if pid not in cache:
        path = store.prompt_path(pid)
        try:
            cache[pid] = read_artifact(path, "prompt")["text"] if path.exists() else ""
        except ArtifactError as err:
            log.warning("skipping %s", err)
            cache[pid] = ""
    return cache[pid] or artifact.get("prompt_text") or None
