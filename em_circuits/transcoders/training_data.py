"""The text a transcoder set is trained on: a local text or JSONL file, a ``save_to_disk``
folder or a hub dataset, packed into ``ctx_len``-token rows, and each process's share of them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from em_circuits.models.corpus import read_corpus
from em_circuits.transcoders.training_run import TrainingError, TrainingParams


# -- the text -----------------------------------------------------------------------------
def _text_dataset(dataset: str, split: str, text_column: str) -> Any:
    """The untokenised dataset ``dataset`` names, as a ``datasets.Dataset``."""
    import datasets

    path = Path(dataset).expanduser()
    if path.is_file():
        try:
            texts = read_corpus(path)
        except (ValueError, UnicodeDecodeError) as err:
            raise TrainingError(f"{path}: {err}") from None
        if not texts:
            raise TrainingError(f"{path}: no documents (blank-line separated text or JSONL)")
        return datasets.Dataset.from_dict({text_column: texts})
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(
                f"{path}: not a dataset folder written by datasets' save_to_disk ({err})"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise TrainingError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    if dataset.startswith((".", "/", "~")):
        raise TrainingError(f"{dataset}: no such file or folder")
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as err:  # offline, unknown id, no such split: all one line for the user
        raise TrainingError(
            f"cannot load dataset {dataset!r} split {split!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); give a local file or folder, or "
            "download it once with internet access (same HF_HOME)"
        ) from None


def tokenized_rows(
    dataset: str | Any,
    tokenizer: Any,
    ctx_len: int,
    *,
    split: str = "train",
    text_column: str = "text",
    num_proc: int | None = None,
) -> Any:
    """``dataset`` (a name as :func:`_text_dataset` reads, or a ``datasets.Dataset``) as rows
    of ``ctx_len`` token ids (column ``input_ids``), documents packed and EOS-separated."""
    from sparsify.data import chunk_and_tokenize

    data = _text_dataset(dataset, split, text_column) if isinstance(dataset, str) else dataset
    if "input_ids" in data.column_names:
        return data.with_format("torch", columns=["input_ids"])
    if text_column not in data.column_names:
        raise TrainingError(
            f"dataset {dataset!r} has no column {text_column!r} (columns: "
            f"{', '.join(data.column_names)}); name the text column with --text-column"
        )
    # Worker processes pay off only for large datasets; small ones tokenise faster inline.
    procs = num_proc or (max(1, (os.cpu_count() or 2) // 2) if len(data) > 20_000 else 1)
    try:
        rows = chunk_and_tokenize(
            data,
            tokenizer,
            max_seq_len=ctx_len,
            num_proc=procs,
            text_key=text_column,
            load_from_cache_file=False,
        )
    except ValueError as err:
        if "Not enough data" not in str(err):
            raise
        rows = []
    if len(rows) == 0:
        raise TrainingError(
            f"dataset {dataset!r} holds fewer than {ctx_len} tokens: give more text or a "
            "smaller --ctx-len"
        )
    return rows


def rows_for_run(rows: Any, params: TrainingParams, world_size: int, rank: int) -> Any:
    """The rows this process trains on: repeated ``epochs`` times, cut to ``max_tokens``, a
    multiple of the process count, and this process's shard."""
    import datasets

    if params.epochs > 1:
        rows = datasets.concatenate_datasets([rows] * params.epochs)
    if params.max_tokens is not None:
        rows = rows.select(range(min(len(rows), max(1, params.max_tokens // params.ctx_len))))
    if world_size > 1:
        rows = rows.select(range(len(rows) - len(rows) % world_size))
        rows = rows.shard(world_size, rank, contiguous=True)
    if len(rows) < params.batch_size:
        raise TrainingError(
            f"{len(rows)} rows of {params.ctx_len} tokens per process is less than one batch "
            f"({params.batch_size} rows): give more text, or a smaller --batch-size or --ctx-len"
        )
    return rows.with_format("torch", columns=["input_ids"])
