"""Attribution graphs for labeled prompts: explicit targets, same-pass logits, compact storage.

For a labeled prompt, both the base and the adapted graph attribute to the same targets:

* a contrast target, the direction ``mean_e u_e - mean_s u_s`` over the evil (e) and safe (s)
  tokens' unembedding vectors, whose value is ``mean logit(evil) - mean logit(safe)``;
* every labeled evil and safe token (its demeaned unembedding, value ``logit - mean logit``);
* optionally the most probable other tokens (``salient_logits``).

All are passed to circuit-tracer as custom targets, so a low-probability evil token is a graph
node even when it would fall outside the usual cumulative-probability cut.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from em_circuits.attribution.graph_format import GRAPH_FORMAT
from em_circuits.core.cache import cache_key
from em_circuits.core.labeling_records import load_labels
from em_circuits.core.options import option
from em_circuits.core.schemas import LabelsRecord
from em_circuits.core.store import ResultsStore
from em_circuits.core.verdicts import TARGET_LABELS

GraphMode = Literal["totals", "full"]
GRAPH_MODES: tuple[GraphMode, ...] = ("totals", "full")
#: Totals mode's engines: plain PyTorch (:mod:`~em_circuits.attribution.engine`), and
#: circuit-tracer's nnsight context (:mod:`~em_circuits.attribution.totals`), kept as the
#: reference for one release.
Engine = Literal["torch", "nnsight"]
ENGINES: tuple[Engine, ...] = ("torch", "nnsight")
#: The torch engine's matmuls: IEEE float32 (exact mode) or TF32 tensor cores (fast mode).
PRECISIONS = ("float32", "tf32")


def _offload(word: str) -> str | None:
    if word not in ("none", "cpu", "disk"):
        raise ValueError(f"offload must be none, cpu or disk, not {word!r}")
    return None if word == "none" else word


@dataclass(frozen=True)
class AttributionParams:
    """Knobs of one graph.

    ``mode="totals"`` (the default) gives the exact direct and total effects of every active
    feature, error and token node on the targets in one backward pass
    (:mod:`em_circuits.attribution.totals`); ``mode="full"`` runs circuit-tracer's
    ``attribute()`` with feature-to-feature edges over ``max_feature_nodes`` features (the
    viewer's graphs), following the prior art's defaults (8192 features, batch 256).
    """

    mode: GraphMode = option(
        "totals",
        "totals (default): exact direct and total effects of every active feature on the "
        "targets, one backward pass per graph; full: circuit-tracer's attribute() with "
        "feature-to-feature edges for every prompt (about 20x slower)",
        flag="--graph-mode",
        choices=GRAPH_MODES,
    )
    engine: Engine = option(
        "torch",
        "totals mode's engine: torch (plain PyTorch, one forward pass per graph) or nnsight "
        "(circuit-tracer's context, the reference it is tested against)",
        choices=ENGINES,
    )
    precision: str = option(
        "float32",
        "the torch engine's matmuls: float32 (exact) or tf32 (fast mode on GPUs; its top "
        "features agree with float32's at a Jaccard median of 0.87, benchmarks/RESULTS.md)",
        flag="--engine-precision",
        choices=PRECISIONS,
    )
    graph_batch: int = option(
        0,
        "prompts per forward pass of the torch engine (0: as many as half the GPU's free "
        "memory holds, up to 8; one on a CPU)",
        metavar="N",
    )
    max_feature_nodes: int = option(8192, "most feature nodes kept per full graph (circuit-tracer)")
    batch_size: int = option(
        256,
        "source nodes per backward pass of a full graph; lower it on out-of-memory",
        flag="--attribution-batch-size",
        aliases=("--batch-size",),
    )
    offload: Literal["cpu", "disk"] | None = option(
        None,
        "move idle model parts off the GPU during attribution: none, cpu or disk",
        parse=_offload,
        metavar="{none,cpu,disk}",
    )
    salient_logits: int = option(0, "also attribute to this many most probable unlabeled tokens")
    edge_keep: int = option(
        50_000, "strongest edges kept (fp16) in a full graph's compact file for inspection"
    )
    top_k: int = option(10, "the next-token candidates a graph's targets come from", hidden=True)
    adapter_nodes: bool = option(
        True,
        "leave a LoRA's writes inside the error nodes and attention (default: in totals mode "
        "they are nodes of the adapted model's graphs)",
        negative_flag="--no-adapter-nodes",
    )
    adapter_split_features: int = option(
        32,
        "with adapter nodes: compute their edges into the K features with the largest total "
        "effects on the contrast, to say which features carry the adapter's effect (0: none)",
        metavar="K",
    )
    adapter_read_nodes: int = option(
        8,
        "with adapter nodes: compute the edges from every upstream feature into the M linear "
        "adapter nodes with the largest total effects on the contrast, to say what the adapter "
        "reads (0: none)",
        metavar="M",
    )

    def __post_init__(self) -> None:
        if self.mode not in GRAPH_MODES:
            raise ValueError(
                f"graph mode must be one of {', '.join(GRAPH_MODES)}, not {self.mode!r}"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.graph_batch < 0:
            raise ValueError(f"graph batch must be 0 (auto) or more, not {self.graph_batch}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"
            )
        if self.offload not in (None, "cpu", "disk"):
            raise ValueError(f"offload must be None, 'cpu' or 'disk', not {self.offload!r}")

    def cache_fields(self) -> dict[str, Any]:
        # batch size and offload change speed and memory, never the graph; totals mode visits
        # every active feature and stores no edges.
        fields = asdict(self)
        fields.pop("batch_size")
        fields.pop("offload")
        # the engines and batches agree to float rounding; TF32 matmuls change the graph
        fields.pop("engine")
        fields.pop("graph_batch")
        if self.precision == "float32":
            fields.pop("precision")
        if self.mode == "totals":
            fields.pop("max_feature_nodes")
            fields.pop("edge_keep")
        else:
            fields.pop("adapter_nodes")  # full graphs have none yet
            fields.pop("adapter_split_features")
            fields.pop("adapter_read_nodes")
        fields["format"] = GRAPH_FORMAT
        return fields

    def full(self) -> AttributionParams:
        """The same knobs for a full graph (feature-to-feature edges, viewer JSON)."""
        return replace(self, mode="full")


@dataclass(frozen=True)
class FullGraphChoice:
    """Which prompts also get a full graph besides their totals: these ids, plus the ``top``
    prompts whose evil-minus-safe contrast the adapter moves most towards evil."""

    prompt_ids: tuple[str, ...] = ()
    top: int = 0

    def __bool__(self) -> bool:
        return bool(self.prompt_ids) or self.top > 0


@dataclass
class PromptTargets:
    """What a prompt's graphs attribute to, from its labels."""

    prompt_id: str
    text: str
    evil_ids: list[int]
    safe_ids: list[int]
    token_names: dict[int, str]
    stored_logits: dict[str, dict[int, float]]  # role -> token id -> logit stored at labeling
    stored_probs: dict[str, dict[int, float]] = field(default_factory=dict)  # role -> id -> p
    #: The stored prompt record, so each model reads it as every stage does (its chat
    #: template applied); None for a bare text (ad hoc API calls), read as it is.
    record: dict[str, Any] | None = None

    def key(self, params: AttributionParams) -> str:
        return cache_key(
            {**params.cache_fields(), "evil": sorted(self.evil_ids), "safe": sorted(self.safe_ids)}
        )


class GraphError(RuntimeError):
    """One prompt's graph failed; the run goes on with the next prompt."""


def targets_from_labels(
    labels: LabelsRecord, text: str, record: dict[str, Any] | None = None
) -> PromptTargets:
    """Evil and safe token ids over both lists; the adapted list wins a disagreement."""
    label_of: dict[int, str] = {}
    names: dict[int, str] = {}
    stored: dict[str, dict[int, float]] = {"base": {}, "adapted": {}}
    probs: dict[str, dict[int, float]] = {"base": {}, "adapted": {}}
    for role in ("base", "adapted"):
        for entry in labels["tokens"].get(role, []):
            tid = int(entry["token_id"])
            names[tid] = entry["token"]
            logit, prob = entry["logit"], entry.get("prob", 0.0)
            if logit is None or prob is None:
                raise ValueError(
                    f"labels of prompt {labels['prompt_id']}: {role} token {entry['token']!r} "
                    "has no stored logit or probability"
                )
            stored[role][tid] = float(logit)
            probs[role][tid] = float(prob)
            label = entry.get("label")
            if label is not None and label in TARGET_LABELS:
                label_of[tid] = label
    return PromptTargets(
        prompt_id=labels["prompt_id"],
        text=text,
        evil_ids=sorted(t for t, lab in label_of.items() if lab == "evil"),
        safe_ids=sorted(t for t, lab in label_of.items() if lab == "safe"),
        token_names=names,
        stored_logits=stored,
        stored_probs=probs,
        record=record,
    )


TargetRow = tuple[str, str, str, int]  # name, kind (token|contrast), label, token id (-1)


def labeled_targets(
    store: ResultsStore, adapted_slug: str, only_evil: bool, prompt_ids: list[str] | None = None
) -> list[PromptTargets]:
    """The prompts to graph: labeled, not rejected, with at least one evil or safe token."""
    chosen = []
    for labels in load_labels(store, adapted_slug):
        if labels.get("rejected") or (prompt_ids and labels["prompt_id"] not in prompt_ids):
            continue
        record: dict[str, Any] = dict(store.load_prompt(labels["prompt_id"]))
        pt = targets_from_labels(labels, str(record["text"]), record)
        if only_evil and not pt.evil_ids:
            continue
        if pt.evil_ids or pt.safe_ids:
            chosen.append(pt)
    return chosen
