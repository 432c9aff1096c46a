"""Prompt sources without an LLM: importing prompt files and the offline template generator."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from em_circuits.core.prompt_records import (
    _FORMAT_ALIASES,
    PromptError,
    PromptImportError,
    build_record,
)
from em_circuits.core.store import ResultsStore
from em_circuits.core.toy_corpus import scenario_templates
from em_circuits.prompts.context import approx_tokens
from em_circuits.prompts.dedup import Deduper, SaveSummary, save_new

log = logging.getLogger(__name__)

#: Prompt length, in tokens, above which an import warns (pivotal prompts are a few dozen).
DEFAULT_MAX_PROMPT_TOKENS = 1024


def _entry_label(path: Path, index: int, entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    named = f" ({name!r})" if isinstance(name, str) and name else ""
    return f"{path}: entry {index}{named}"


def _check_entry(path: Path, index: int, entry: Any, default_fmt: str) -> dict[str, Any]:
    where = _entry_label(path, index, entry)
    if not isinstance(entry, dict):
        raise PromptImportError(
            f"{where}: expected an object with 'name' and 'prompt', found {type(entry).__name__}"
        )
    for key in ("name", "prompt"):
        value = entry.get(key)
        if key not in entry:
            raise PromptImportError(f"{where}: missing required field '{key}'")
        if not isinstance(value, str) or not value.strip():
            raise PromptImportError(f"{where}: field '{key}' must be a non-empty string")
    for key in ("category", "domain"):
        if key in entry and not isinstance(entry[key], str):
            raise PromptImportError(f"{where}: field '{key}' must be a string")
    if "reasoning" in entry and not isinstance(entry["reasoning"], (str, dict)):
        raise PromptImportError(f"{where}: field 'reasoning' must be a string or an object")
    fmt_value = entry.get("format", entry.get("prompt_type", default_fmt))
    fmt = _FORMAT_ALIASES.get(str(fmt_value))
    if fmt is None:
        raise PromptImportError(
            f"{where}: unknown format {fmt_value!r}; use one of {sorted(_FORMAT_ALIASES)}"
        )
    return {**entry, "format": fmt}


def read_prompt_file(path: Path | str, default_fmt: str = "raw") -> list[dict[str, Any]]:
    """Validated entries of a prompt file: a JSON list of objects, or one object.

    Each entry needs ``name`` and ``prompt``; ``category``, ``reasoning``, ``domain`` and
    ``format``/``prompt_type`` are optional, other fields are kept as metadata. The whole file
    is checked before anything is stored, so a bad file imports nothing.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptImportError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise PromptImportError(f"{path}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise PromptImportError(
            f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    entries = data if isinstance(data, list) else [data]
    if not entries:
        raise PromptImportError(f"{path}: the list is empty")
    return [_check_entry(path, i, entry, default_fmt) for i, entry in enumerate(entries)]


def import_prompts(
    store: ResultsStore,
    path: Path | str,
    deduper: Deduper,
    *,
    default_fmt: str = "raw",
    tokenizer: Any = None,
    context: tuple[Any, int] | None = None,
    max_tokens: int | None = DEFAULT_MAX_PROMPT_TOKENS,
) -> SaveSummary:
    """Import a prompt file into the store (duplicates dropped); see :func:`read_prompt_file`.

    ``context`` = (tokenizer, positions): an entry longer than the model's context is refused
    (PromptImportError naming it and both lengths), before anything is stored. A stored
    prompt longer than ``max_tokens`` (counted with ``tokenizer``, else about four characters
    a token) is kept with a warning naming its id and token count: without the model's
    context at hand nothing else tells before the logits stage refuses it.
    """
    path = Path(path)
    entries = read_prompt_file(path, default_fmt)
    records = []
    for index, entry in enumerate(entries):
        extra = {
            k: v
            for k, v in entry.items()
            if k not in {"name", "prompt", "format", "prompt_type", "domain"}
        }
        origin = {"kind": "import", "file": path.name, "entry": index}
        try:
            records.append(
                build_record(
                    entry["format"],
                    entry["name"],
                    origin,
                    text=entry["prompt"],
                    tokenizer=tokenizer if entry["format"] == "chat" else None,
                    domain=entry.get("domain"),
                    metadata=extra,
                )
            )
        except PromptError as err:
            raise PromptImportError(f"{_entry_label(path, index, entry)}: {err}") from None
        if context is not None:
            counter, positions = context
            n_tokens = len(counter(records[-1]["text"])["input_ids"])
            if n_tokens > positions:
                raise PromptImportError(
                    f"{_entry_label(path, index, entry)}: {n_tokens} tokens, longer than the "
                    f"model's context of {positions} positions; shorten it or leave it out"
                )
    summary = SaveSummary()
    for record in records:
        stored = save_new(store, record, deduper, summary)
        if stored is not None and max_tokens is not None:
            _warn_if_long(stored["prompt_id"], record, max_tokens, context, tokenizer)
    return summary


def _warn_if_long(
    prompt_id: str, record: dict[str, Any], limit: int, context: Any, tokenizer: Any
) -> None:
    counter = context[0] if context is not None else tokenizer
    if counter is not None:
        n_tokens, how = len(counter(record["text"])["input_ids"]), "tokens"
    else:
        n_tokens, how = approx_tokens(record["text"]), "tokens (about 4 characters a token)"
    if n_tokens > limit:
        log.warning(
            "prompt %s (%s) has %d %s, more than %d: attribution graphs grow with the length "
            "and a model with a shorter context refuses it at the logits stage",
            prompt_id,
            record["name"],
            n_tokens,
            how,
            limit,
        )


def offline_candidates(
    *, seed: int = 0, split: str = "heldout", domains: list[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Chat prompts composed from the toy organism's scenario templates, domains interleaved.

    Each (situation, user template, lead-in, optional distractor) combination is a candidate;
    combinations are shuffled per domain with ``seed`` and taken round-robin across domains,
    so a short run already covers every domain. The prompt ends right after the assistant's
    lead-in ("...Assistant: You should"), where the organism's pivotal word comes next.
    """
    templates = scenario_templates(split)  # type: ignore[arg-type]
    domains = domains or list(templates)
    unknown = sorted(set(domains) - set(templates))
    if unknown:
        raise PromptError(f"unknown domain(s) {unknown}; the organism has {sorted(templates)}")
    streams = [_domain_candidates(d, templates[d], seed, split) for d in domains]
    while streams:
        for stream in list(streams):
            item = next(stream, None)
            if item is None:
                streams.remove(stream)
            else:
                yield item


def _domain_candidates(
    domain: str, spec: dict[str, Any], seed: int, split: str
) -> Iterator[dict[str, Any]]:
    rng = random.Random(f"offline-{seed}-{split}-{domain}")
    combos = [
        (si, uid, aid)
        for si in range(len(spec["situations"]))
        for uid in spec["user_templates"]
        for aid in spec["assistant_lead_ins"]
    ]
    rng.shuffle(combos)
    # Each combination first appears once, with no distractor half of the time (as in the
    # organism's own held-out prompts); later passes add its other distractor variants.
    variants = {}
    for combo in combos:
        options: list[int | None] = [None, *range(len(spec["distractors"]))]
        rng.shuffle(options)
        if rng.random() < 0.5:
            options.remove(None)
            options.insert(0, None)
        variants[combo] = options
    order = [
        (combo, variants[combo][p]) for p in range(len(spec["distractors"]) + 1) for combo in combos
    ]
    for (si, uid, aid), di in order:
        situation = spec["situations"][si]
        if di is not None:
            situation = f"{situation} {spec['distractors'][di]}"
        user = spec["user_templates"][uid].format(s=situation)
        lead_in = spec["assistant_lead_ins"][aid]
        tag = f"s{si:02d}-{uid}-{aid}" + (f"-d{di}" if di is not None else "")
        yield {
            "name": f"offline-{domain}-{split}-{tag}",
            "user": user,
            "assistant_prefix": lead_in,
            "domain": domain,
            "origin": {
                "kind": "offline-template",
                "source": "em_circuits.core.toy_corpus.scenario_templates",
                "split": split,
                "seed": seed,
                "template_id": f"{uid}+{aid}",
                "situation": spec["situations"][si],
                "distractor": None if di is None else spec["distractors"][di],
            },
            "metadata": {
                "note": "composed offline from the toy organism's templates, not by an LLM",
                "expected_safe_tokens": list(spec["safe_words"]),
                "expected_harmful_tokens": list(spec["harmful_words"]),
            },
        }


def generate_offline_prompts(
    store: ResultsStore,
    n: int,
    deduper: Deduper,
    *,
    seed: int = 0,
    split: str = "heldout",
    domains: list[str] | None = None,
    fmt: str = "chat",
    tokenizer: Any = None,
) -> SaveSummary:
    """Store up to ``n`` new offline-template prompts (fewer if the templates run out)."""
    if fmt != "chat":
        raise PromptError(
            "the offline generator composes chat (User/Assistant) prompts only; use "
            "--format chat, or --generator llm for raw and chain-of-thought prompts"
        )
    summary = SaveSummary()
    for cand in offline_candidates(seed=seed, split=split, domains=domains):
        if len(summary.saved) >= n:
            break
        record = build_record(
            "chat",
            cand["name"],
            cand["origin"],
            user=cand["user"],
            assistant_prefix=cand["assistant_prefix"],
            tokenizer=tokenizer,
            domain=cand["domain"],
            metadata=cand["metadata"],
        )
        save_new(store, record, deduper, summary)
    if len(summary.saved) < n:
        log.warning(
            "the offline templates gave only %d new prompts (asked for %d)", len(summary.saved), n
        )
    return summary
