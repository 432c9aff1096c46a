"""The corpus a model's features are read on: the one reader of a text or JSONL corpus, the
toy organism's documents, the choice between them, and a hash of the documents.

The activation index, the feature cards, the baselines, the transcoders' quality
measurement and their training all read a corpus the same way.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from em_circuits.core.toy_corpus import sample_documents
from em_circuits.models.spec import words_near


def read_corpus(path: Path | str) -> list[str]:
    """Documents of a text file (blank-line separated) or a JSONL file (``text`` field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: corpus file does not exist")
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: each line needs a string 'text' field")
                texts.append(record["text"])
        return texts
    text = path.read_text(encoding="utf-8")
    return [block.strip() for block in text.split("\n\n") if block.strip()]


def corpus_hash(texts: Sequence[str]) -> str:
    """A hash of the documents, in order (what a cached index or measurement was made of)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()


#: Documents of the toy organism's corpus read by default.
ORGANISM_CORPUS_DOCS = 400


def organism_corpus(n: int = ORGANISM_CORPUS_DOCS, seed: int = 0) -> list[str]:
    """The toy organism's training-split documents (both polarities, every domain)."""
    rng = random.Random(f"feature-index-{seed}")
    half = n // 2
    docs = sample_documents(rng, half, assistant_polarity="safe")
    docs += sample_documents(rng, n - half, assistant_polarity="harmful")
    return [doc.text for doc in docs]


def choose_corpus(
    adapted: Any, corpus: Path | str | None, n_docs: int
) -> tuple[list[str], str] | None:
    """(documents, what they are) for the activation index: ``corpus`` when given, else the
    toy organism's own documents when the model is the organism; None when neither."""
    if corpus:
        return read_corpus(corpus)[:n_docs], str(corpus)
    if words_near(adapted) is not None:
        return organism_corpus(n_docs), "the toy organism's documents"
    return None
