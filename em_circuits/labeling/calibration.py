"""Judge calibration against human labels: confusion matrices and Cohen's kappa."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from em_circuits.core.labeling_records import LIST_PREFIX, load_labels
from em_circuits.core.schemas import LabelsRecord
from em_circuits.core.store import ResultsStore, write_artifact
from em_circuits.core.verdicts import LABELS


def calibration_path(store: ResultsStore, adapted_slug: str) -> Path:
    """Where :func:`calibration` saves its table (the store decides; kept for callers)."""
    return store.calibration_path(adapted_slug)


def confusion_and_kappa(
    pairs: Iterable[tuple[str, str]],
) -> tuple[list[list[int]], float | None, float | None]:
    """(3x3 matrix rows=judge, cols=human in LABELS order, observed agreement, Cohen's kappa).

    Kappa is None when it is undefined: no pairs, or both raters always used one same label.
    """
    pos = {label: i for i, label in enumerate(LABELS)}
    matrix = [[0] * len(LABELS) for _ in LABELS]
    for judge, human in pairs:
        matrix[pos[judge]][pos[human]] += 1
    n = sum(map(sum, matrix))
    if n == 0:
        return matrix, None, None
    observed = sum(matrix[i][i] for i in range(len(LABELS))) / n
    rows = [sum(r) for r in matrix]
    cols = [sum(matrix[i][j] for i in range(len(LABELS))) for j in range(len(LABELS))]
    expected = sum(r * c for r, c in zip(rows, cols)) / (n * n)
    kappa = None if expected >= 1.0 else (observed - expected) / (1.0 - expected)
    return matrix, observed, kappa


def _pairs(labels_list: list[LabelsRecord], which: str | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for labels in labels_list:
        if labels["labeled_by"] != "human" or labels.get("rejected"):
            continue
        for name, toks in labels["tokens"].items():
            if which and name != which:
                continue
            for t in toks:
                judge, human = t.get("judge_label"), t.get("label")
                if judge in LABELS and human in LABELS:
                    pairs.append((judge, human))
    return pairs


def _block(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    matrix, observed, kappa = confusion_and_kappa(pairs)
    return {
        "n_tokens": len(pairs),
        "matrix": {j: dict(zip(LABELS, row)) for j, row in zip(LABELS, matrix)},
        "matrix_rows": matrix,
        "agreement": observed,
        "kappa": kappa,
    }


def calibration(store: ResultsStore, adapted_slug: str, *, save: bool = True) -> dict[str, Any]:
    """Judge vs human over every human-labeled token (rejected prompts left out).

    Saved (unless ``save=False``) to ``labels/<adapted_slug>/calibration.json`` as a "table".
    """
    labels_list = load_labels(store, adapted_slug)
    human = [lab for lab in labels_list if lab["labeled_by"] == "human" and not lab["rejected"]]
    result = {
        "table": "judge_calibration",
        "adapted_slug": adapted_slug,
        "labels_order": list(LABELS),
        "matrix_axes": "rows = judge label, columns = human label",
        "n_prompts": len(human),
        "judges": sorted(Counter(_judge_name(lab) for lab in human)),
        **_block(_pairs(labels_list, None)),
        "per_list": {name: _block(_pairs(labels_list, name)) for name in LIST_PREFIX},
    }
    if save:
        write_artifact(store.calibration_path(adapted_slug), "table", result)
    return result


def _judge_name(labels: LabelsRecord) -> str:
    judge = labels.get("judge") or {}
    return f"{judge.get('kind', '?')}:{judge.get('model') or '-'}"


def format_calibration(result: dict[str, Any]) -> str:
    """The calibration as a small text table for the terminal."""
    lines = [
        f"Judge calibration for {result['adapted_slug']}: {result['n_tokens']} human-labeled "
        f"token(s) over {result['n_prompts']} prompt(s)",
        "rows = judge, columns = human",
        "            " + "".join(f"{h:>8}" for h in LABELS),
    ]
    for judge in LABELS:
        cells = "".join(f"{result['matrix'][judge][h]:>8}" for h in LABELS)
        lines.append(f"  {judge:<10}{cells}")
    agreement, kappa = result["agreement"], result["kappa"]
    lines.append(
        "agreement "
        + ("n/a" if agreement is None else f"{agreement:.3f}")
        + "   Cohen's kappa "
        + ("n/a (undefined)" if kappa is None else f"{kappa:.3f}")
    )
    for name, block in result["per_list"].items():
        k = "n/a" if block["kappa"] is None else f"{block['kappa']:.3f}"
        lines.append(f"  {name} list: {block['n_tokens']} token(s), kappa {k}")
    return "\n".join(lines)
