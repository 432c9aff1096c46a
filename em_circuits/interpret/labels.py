"""One-line feature labels from an OpenAI-compatible model, given a card's evidence.

The model sees the feature's top activating contexts (the activating token marked) and its
logit lens, and answers with a short label. Labels are cached by model and evidence: the
same feature with the same contexts is never asked twice, and a changed index asks again.
Without an endpoint there is no labeller and cards carry no label; nothing is invented.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from em_circuits.core.cache import RecordCache

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
        self.cache = RecordCache(Path(cache_dir), "feature_label")
        self.id = f"llm:{client.model}"

    def label(self, card: dict[str, Any]) -> str | None:
        evidence = evidence_text(card)
        if not card["adapted"]["contexts"]:
            return None  # never active in the corpus: nothing to label from
        inputs = {"labeller": self.id, "evidence": evidence}
        cached = self.cache.read(inputs)
        if cached is not None:
            return cached["label"]
        reply = self.client.chat(
            [{"role": "user", "content": PROMPT.format(evidence=evidence)}],
            what=f"labelling feature {card['name']}",
        )
        label = " ".join(reply.text.strip().strip('"').split())[:120] or None
        self.cache.write(
            inputs,
            {"labeller": self.id, "feature": card["name"], "evidence": evidence, "label": label},
        )
        return label


def labeller_for(judge: Any, cache_dir: Path) -> FeatureLabeller | None:
    """With an LLM judge for the EM rate, its model (and client) labels the feature cards,
    cached in ``cache_dir`` (``ResultsStore.feature_labels_cache_dir``); otherwise there is
    no labeller."""
    from em_circuits.analysis.em_rate import LLMEMJudge  # noqa: PLC0415  # heavy: loads torch

    if isinstance(judge, LLMEMJudge):
        return FeatureLabeller(judge.client, cache_dir)
    return None
