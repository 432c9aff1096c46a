"""One way to cache: a key from a dict of inputs, one hash length, one record kind per cache.

Every cache of the pipeline names an entry by :func:`cache_key` of everything the entry is
computed from, in a folder the :class:`~em_circuits.core.store.ResultsStore` names (the
layout: results/README.md); each holds records of one kind:

* attribution graphs: ``graphs/<model_slug>/<prompt_id>/<key>.*`` (``graph_meta``);
* per-prompt feature effects: ``features/<model_slug>/<prompt_id>/<key>.json``
  (``feature_effects``);
* transcoder quality: ``transcoder_quality/<model_slug>/<key>.json`` (``table``);
* analysis steps: the key of each step in the analysis folder's ``steps.json``, and the
  ``prompts-<key>/`` folder of an analysis of some prompts;
* the judge's verdicts: a verdict's ``inputs_key`` (``verdict``: redone when it differs);
* LLM judge of the labels: ``judge_cache/<key>.json`` (``judge_call``);
* EM judge scores: ``cache/em_judge/<key>.json`` (``em_judge_score``);
* feature card labels: ``cache/feature_labels/<key>.json`` (``feature_label``);
* the toy organism's build, outside the results: ``recipe.json``'s hash beside the organism.

Two caches are keyed by what they belong to, not by a hash: the merged adapter
(``cache/merged/<adapted_slug>/``: the slug holds the model's fingerprint) and the activation
index (``features_index/<model_slug>/``: one per model, rebuilt when its recorded inputs
differ). Hashes that identify content (a weights file's sha256, the prompt id, a corpus hash,
the split's cluster ids, seeds drawn from hashes) are not cache keys and do not use this.

A key is short (:data:`KEY_HEX` hex digits); :class:`RecordCache` also stores the full digest
of the inputs in each record and treats an entry of other inputs (an older key scheme, another
record kind, a collision) as a miss, never as a hit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from em_circuits.core.artifacts import ArtifactError, read_artifact, write_artifact
from em_circuits.core.identifiers import json_default

log = logging.getLogger(__name__)

#: Hex digits of a cache key (48 bits: file names stay short; RecordCache checks the full
#: digest, so two inputs of one key only evict each other).
KEY_HEX = 12

#: The field of a :class:`RecordCache` record holding the full digest of its inputs.
INPUTS_FIELD = "inputs_sha256"


def inputs_digest(inputs: Mapping[str, object]) -> str:
    """The full sha256 of ``inputs`` as canonical JSON (keys sorted, arrays as lists)."""
    blob = json.dumps(inputs, sort_keys=True, default=json_default).encode()
    return hashlib.sha256(blob).hexdigest()


def cache_key(inputs: Mapping[str, object]) -> str:
    """The key of a cache entry computed from ``inputs``: the same inputs give the same key in
    any key order, on any machine; any changed input gives another."""
    return inputs_digest(inputs)[:KEY_HEX]


@dataclass(frozen=True)
class RecordCache:
    """A cache of one JSON record per entry: ``folder/<key>.json``, all of one ``kind``."""

    folder: Path
    kind: str

    def path(self, inputs: Mapping[str, object]) -> Path:
        return self.folder / f"{cache_key(inputs)}.json"

    def read(self, inputs: Mapping[str, object]) -> Any:
        """The record of ``inputs``, or None: absent, unreadable, or of other inputs."""
        path = self.path(inputs)
        if not path.is_file():
            return None
        try:
            record = read_artifact(path, self.kind)
        except ArtifactError as err:  # an entry of an older scheme or a damaged file
            log.warning("ignoring cache entry %s: %s", path, err)
            return None
        return record if record.get(INPUTS_FIELD) == inputs_digest(inputs) else None

    def write(self, inputs: Mapping[str, object], payload: Mapping[str, Any]) -> Any:
        """Store ``payload`` as the record of ``inputs``; returns the record as written."""
        return write_artifact(
            self.path(inputs), self.kind, {**payload, INPUTS_FIELD: inputs_digest(inputs)}
        )
