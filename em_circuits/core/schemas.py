"""Typed records of every artifact kind.

Every JSON file that :func:`em_circuits.core.artifacts.write_artifact` writes is one *record*
below: the envelope (``schema``, ``schema_version``, ``created``) plus its kind's payload. The
keys of a record's ``_...Keys`` base are required: ``write_artifact`` refuses a payload without
them, and ``read_artifact`` a file that lacks one or holds a value of the wrong basic type
(:func:`em_circuits.core.record_checks.record_problems`). Other keys are optional, as older
files and small test fixtures leave them out. The records only describe the JSON on disk; they
add nothing to it.
"""
# No ``from __future__ import annotations``: the checks read the annotations as real types.

import typing
from typing import Any, Literal, TypedDict, get_args

# The label vocabulary (``LABELS`` in the comments below) and the verdict rule are in
# em_circuits.core.verdicts; the checks that a file is a record in em_circuits.core.record_checks.

# -- closed vocabularies of the records ----------------------------------------------------
PromptFormat = Literal["raw", "chat", "cot"]
PROMPT_FORMATS: tuple[str, ...] = get_args(PromptFormat)

QueueState = Literal["pending", "in_progress", "done", "skipped", "rejected"]
QUEUE_STATES: tuple[str, ...] = get_args(QueueState)

LabeledBy = Literal["human", "judge"]


# -- nested shapes -------------------------------------------------------------------------------
class Envelope(TypedDict):
    schema: str
    schema_version: int
    created: str


class TopKEntry(TypedDict):
    rank: int
    token: str
    token_id: int
    logit: float
    prob: float


class Support(TypedDict):
    token_ids: list[int]
    logprobs: list[float]


class LabelledEntry(TopKEntry, total=False):
    """A top-k entry in a verdict, with its display index (B1.., T1..) and the judge's label."""

    index: str
    label: str | None  # one of LABELS
    judged_by: str


class ListVerdicts(TypedDict):
    base: str  # verdict_of of the list: one of LABELS
    adapted: str


class JudgeInfo(TypedDict, total=False):
    kind: str
    model: str | None
    rubric_version: str
    date: str
    raw_reply: str | None
    cache_key: str | None
    summary: str


class HistoryEntry(TypedDict, total=False):
    state: QueueState
    at: str
    event: str
    by: str  # the labeling session that made the change ("user@host pid N")


class LabelsToken(TypedDict, total=False):
    index: str
    rank: int | None
    token: str
    token_id: int
    logit: float | None
    prob: float | None
    label: str | None  # None: no label (a rejected prompt)
    judge_label: str | None  # None: the judge gave no usable label


class Disagreement(TypedDict, total=False):
    list: str  # "base" or "adapted"
    index: str
    token: str
    token_id: int
    judge_label: str
    human_label: str
    explanation: str | None


class GraphTarget(TypedDict):
    name: str
    kind: str
    label: str | None
    token_id: int
    value: float
    logit: float
    prob: float


class _GraphFilesKeys(TypedDict):
    compact: str
    compact_bytes: int
    full: str | None
    full_bytes: int | None


class GraphFiles(_GraphFilesKeys, total=False):
    compact_sha256: str  # checked with compact_bytes before a graph is reused or loaded


# -- the artifact records ------------------------------------------------------------------------
class _PromptKeys(Envelope):
    prompt_id: str
    text: str
    format: PromptFormat


class PromptRecord(_PromptKeys, total=False):
    """``prompts/<prompt_id>.json``: a pivotal prompt (id = hash of text and format)."""

    name: str
    origin: dict[str, Any]
    chat_template_applied: bool
    metadata: dict[str, Any]
    domain: str


class _LogitsKeys(Envelope):
    prompt_id: str
    model_fingerprint: str
    top_k: list[TopKEntry]


class LogitsRecord(_LogitsKeys, total=False):
    """``logits/<model_slug>/<prompt_id>.json``: one model's top-k next tokens of a prompt."""

    model_slug: str
    model_spec: dict[str, Any]
    prompt_text: str
    format: PromptFormat
    input_format: str  # "chat-template:<sha16>" or "plain": how the model read the prompt
    k: int
    support: Support


class _VerdictKeys(Envelope):
    prompt_id: str
    model_fingerprint: str
    base_fingerprint: str
    labels: dict[str, list[LabelledEntry]]
    verdict: ListVerdicts


class VerdictRecord(_VerdictKeys, total=False):
    """``verdicts/<adapted_slug>/<prompt_id>.json``: judge labels of both lists, verdicts."""

    model_slug: str
    base_slug: str
    prompt_text: str
    format: PromptFormat
    divergence: dict[str, Any]
    divergent: bool  # by probability mass (is_divergent)
    divergent_by_rank: bool  # the weaker criterion (is_divergent_by_rank)
    evil_mass: dict[str, float]  # evil_masses: base, base_upper, adapted
    divergence_rule: dict[str, float]
    adapted_top1: dict[str, Any] | None
    flagged: bool
    judge: JudgeInfo
    inputs_key: str


class _JudgeCallKeys(Envelope):
    key: str
    reply: str


class JudgeCallRecord(_JudgeCallKeys, total=False):
    """``judge_cache/<key>.json``: one LLM judge call, keyed by everything that decides it."""

    model: str
    rubric_version: str
    date: str
    prompt_id: str | None
    messages: list[dict[str, str]]
    reasks: list[dict[str, str]]


class _QueueItemKeys(Envelope):
    prompt_id: str
    model_fingerprint: str
    state: QueueState


class QueueItemRecord(_QueueItemKeys, total=False):
    """``queue/<adapted_slug>/<prompt_id>.json``: a manual labeling item and its history."""

    adapted_slug: str
    reason: str | None
    queued_at: str
    history: list[HistoryEntry]
    draft: dict[str, Any]
    version: int  # +1 on every write; a write made from an older version is refused


class _LabelsKeys(Envelope):
    prompt_id: str
    model_fingerprint: str
    tokens: dict[str, list[LabelsToken]]
    labeled_by: LabeledBy


class LabelsRecord(_LabelsKeys, total=False):
    """``labels/<adapted_slug>/<prompt_id>.json``: final labels, by a human or the judge."""

    base_fingerprint: str | None
    adapted_slug: str
    base_slug: str | None
    prompt_text: str | None
    judge: JudgeInfo | None
    judge_verdict: ListVerdicts | None
    human_verdict: ListVerdicts | None
    disagreements: list[Disagreement]
    rejected: bool
    reject_reason: str | None
    note: str | None
    labeled_at: str
    source: str
    version: int  # 1 for the first labels of the prompt, +1 for each relabeling
    history: list[dict[str, Any]]  # the earlier versions: who, when, and their labels


class _GraphMetaKeys(Envelope):
    prompt_id: str
    model_fingerprint: str
    params_key: str
    targets: list[GraphTarget]


class GraphMetaRecord(_GraphMetaKeys, total=False):
    """``graphs/<model_slug>/<prompt_id>/<params_key>.json``: written last, marks a complete
    graph."""

    role: str
    model_slug: str
    model_spec: dict[str, Any]
    params: dict[str, Any]
    top_logits: list[dict[str, Any]]
    label_check: dict[str, Any]
    files: GraphFiles
    graph_fingerprint: str
    n_features_active: int
    n_features_selected: int
    adapter_nodes: dict[str, Any]  # {"n": .., "not_nodes": [..]} or {"none": reason}
    input_format: str
    n_pos: int
    n_layers: int
    seconds: float


class EffectsTableFile(TypedDict):
    file: str  # beside the envelope
    sha256: str


class _FeatureEffectsKeys(Envelope):
    prompt_id: str
    model_fingerprint: str
    graph_fingerprint: str
    table: EffectsTableFile


class FeatureEffectsRecord(_FeatureEffectsKeys, total=False):
    """``features/<model_slug>/<prompt_id>/<params_key>.json``: the envelope of one prompt's
    feature-effects table, whose columns (in the order of ``columns``) are in the safetensors
    file ``table`` names; text columns are integer codes into ``categories`` (-1: missing)."""

    params: dict[str, Any]
    params_key: str
    columns: list[str]
    categories: dict[str, list[Any]]
    rows: int


class EMJudgeScoreRecord(Envelope):
    """``cache/em_judge/<key>.json``: one score of the LLM EM judge, keyed by judge, rubric
    and prompt."""

    judge: str
    rubric: str
    score: float | None
    top_logprobs: Any
    inputs_sha256: str


class FeatureLabelRecord(Envelope):
    """``cache/feature_labels/<key>.json``: one feature card's LLM label, keyed by labeller
    and evidence."""

    labeller: str
    feature: str
    evidence: str
    label: str | None
    inputs_sha256: str


class TableRecord(Envelope):
    """Summary tables and reports: free-form beyond the envelope."""


#: Every artifact kind and its record.
RECORDS: dict[str, type] = {
    "prompt": PromptRecord,
    "logits": LogitsRecord,
    "verdict": VerdictRecord,
    "judge_call": JudgeCallRecord,
    "queue_item": QueueItemRecord,
    "labels": LabelsRecord,
    "graph_meta": GraphMetaRecord,
    "feature_effects": FeatureEffectsRecord,
    "em_judge_score": EMJudgeScoreRecord,
    "feature_label": FeatureLabelRecord,
    "table": TableRecord,
    "report": TableRecord,
    "organism_report": TableRecord,
}

ENVELOPE_KEYS: tuple[str, ...] = tuple(Envelope.__annotations__)


def _required_keys(record: Any) -> tuple[str, ...]:
    # Declaration order (not the frozenset's) keeps error messages stable.
    return tuple(k for k in typing.get_type_hints(record) if k in record.__required_keys__)


#: The keys each kind must carry, the envelope's first, in the records' declaration order.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    kind: _required_keys(record) for kind, record in RECORDS.items()
}

#: The keys each kind must carry besides the envelope (derived from the records).
ARTIFACT_KEYS: dict[str, tuple[str, ...]] = {
    kind: tuple(k for k in required if k not in ENVELOPE_KEYS)
    for kind, required in REQUIRED_KEYS.items()
}
