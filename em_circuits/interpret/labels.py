"""One-line feature labels from an OpenAI-compatible model, given a card's evidence.

The model sees the feature's top activating contexts (the activating token marked) and its
logit lens, and answers with a short label. Labels are cached by model and evidence: the
same feature with the same contexts is never asked twice, and a changed index asks again.
Without an endpoint there is no labeller and cards carry no label; nothing is invented.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from em_circuits.core.store import read_json, write_artifact

PROMPT = """Below is the evidence for one feature of a sparse transcoder inside a language
model: the text contexts where it activates most (the activating token between << and >>,
with the activation value) and the output tokens its direction promotes and suppresses.

{evidence}

In at most 12 words, what does this feature detect or do? Reply with the label only."""


def evidence_text(card: dict[str, Any], contexts: int = 12) -> str:
    """The part of a card a labeller reads (the adapted model's contexts and logit lens)."""
    adapted = card["adapted"]
    lines = ["Top contexts:"]
    for c in adapted["contexts"][:contexts]:
        text = f"{c['before']}<<{c['token']}>>{c['after']}".replace("\n", " ")
        lines.append(f"- {c['activation']:.3g}: {text}")
    lens = adapted["logit_lens"]
    lines.append("Promotes: " + ", ".join(repr(t) for t, _ in lens["promoted"][:10]))
    lines.append("Suppresses: " + ", ".join(repr(t) for t, _ in lens["suppressed"][:10]))
    return "\n".join(lines)


class FeatureLabeller:
    """Labels from ``client`` (an :class:`~em_circuits.core.llm.LLMClient`), cached as
    JSON files under ``cache_dir``."""

    def __init__(self, client: Any, cache_dir: Path):
        self.client = client
        self.cache_dir = Path(cache_dir)
        self.id = f"llm:{client.model}"

    def label(self, card: dict[str, Any]) -> str | None:
        evidence = evidence_text(card)
        if not card["adapted"]["contexts"]:
            return None  # never active in the corpus: nothing to label from
        key = hashlib.sha256(json.dumps([self.id, evidence]).encode()).hexdigest()[:24]
        path = self.cache_dir / f"{key}.json"
        if path.is_file():
            return read_json(path)["label"]
        reply = self.client.chat(
            [{"role": "user", "content": PROMPT.format(evidence=evidence)}],
            what=f"labelling feature {card['name']}",
        )
        label = " ".join(reply.text.strip().strip('"').split())[:120] or None
        write_artifact(
            path,
            "table",
            {"labeller": self.id, "feature": card["name"], "evidence": evidence, "label": label},
        )
        return label


def labeller_for(judge: Any, cache_root: Path) -> FeatureLabeller | None:
    """With an LLM judge for the EM rate, its model (and client) labels the feature cards;
    otherwise there is no labeller."""
    from em_circuits.analysis.em_rate import LLMEMJudge  # noqa: PLC0415  # heavy: loads torch, pandas

    if isinstance(judge, LLMEMJudge):
        return FeatureLabeller(judge.client, Path(cache_root) / "feature_labels")
    return None
