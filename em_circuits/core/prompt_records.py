"""Pivotal prompts: records, import, offline and LLM generation, deduplication, feedback context.

A *pivotal prompt* stops right before the word that decides whether the continuation is safe
or harmful. Prompts come from four places, recorded in ``origin.kind``:

* ``offline-template``: composed from the toy organism's held-out scenario templates (no LLM);
* ``llm``: written by an LLM through :mod:`em_circuits.core.llm`;
* ``import``: read from a user's JSON file (the prior art's format is accepted);
* ``human``: typed by a person (other tools).

Every prompt goes through :func:`save_new`, which drops exact and near duplicates of anything
already stored and writes the record with ``ResultsStore.save_prompt`` (id = hash of text and
format), one file per prompt, so work finished before an error is never lost.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from em_circuits.core.identifiers import prompt_id
from em_circuits.core.schemas import PROMPT_FORMATS

FORMATS = PROMPT_FORMATS


_FORMAT_ALIASES = {
    "raw": "raw",
    "raw_completion": "raw",
    "chat": "chat",
    "chat_user_assistant": "chat",
    "cot": "cot",
    "chain_of_thought": "cot",
}


_CHAT_PATTERN = re.compile(r"^\s*User:\s*(?P<user>.*?)\n\s*Assistant:\s?(?P<prefix>.*)$", re.DOTALL)


class PromptError(ValueError):
    """A prompt cannot be built as asked (bad format, missing chat template, ...)."""


class PromptImportError(PromptError):
    """A prompt file is unreadable or an entry in it is invalid; the message names both."""


def make_record(
    text: str,
    fmt: str,
    name: str,
    origin: dict[str, Any],
    *,
    domain: str | None = None,
    metadata: dict[str, Any] | None = None,
    chat_template_applied: bool = False,
) -> dict[str, Any]:
    """A prompt record in the store's format (the id is added by ``save_prompt``)."""
    if fmt not in FORMATS:
        raise PromptError(f"unknown prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    record: dict[str, Any] = {
        "text": text,
        "format": fmt,
        "name": name,
        "origin": origin,
        "chat_template_applied": chat_template_applied,
        "metadata": metadata or {},
    }
    if domain:
        record["domain"] = domain
    return record


def chat_text(
    user: str, assistant_prefix: str, tokenizer: Any = None
) -> tuple[str, dict[str, Any] | None]:
    """The model input for a chat prompt, and how it was built.

    Without a tokenizer this is the plain ``User: ...\\nAssistant: ...`` transcript (the toy
    organism's own format). With one, the tokenizer's chat template renders the user turn and
    the assistant header, and the assistant's opening words follow, so the next token is the
    decision inside the assistant's reply.
    """
    if tokenizer is None:
        return f"User: {user}\nAssistant: {assistant_prefix}", None
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "the tokenizer")
        raise PromptError(
            f"{name} has no chat template; drop --chat-template (prompts then use the plain "
            "'User: ...\\nAssistant: ...' transcript) or give an instruct model's tokenizer"
        )
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    info = {
        "tokenizer": getattr(tokenizer, "name_or_path", None),
        "template_sha256": hashlib.sha256(tokenizer.chat_template.encode()).hexdigest()[:16],
    }
    return head + assistant_prefix, info


def chat_parts(record: dict[str, Any]) -> tuple[str, str] | None:
    """(user turn, assistant prefix) of a chat prompt record, else None."""
    if record.get("format") != "chat":
        return None
    messages = (record.get("metadata") or {}).get("messages")
    if isinstance(messages, dict) and "user" in messages:
        return str(messages["user"]), str(messages.get("assistant_prefix", ""))
    return split_chat(record["text"])


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def model_input(record: dict[str, Any], tokenizer: Any, use_template: bool = True) -> str:
    """The text a model reads for a stored prompt.

    A chat prompt is rendered with the tokenizer's chat template when it has one and
    ``use_template`` is on (the template's own BOS and markers; circuit-tracer adds no second
    BOS before a special token); anything else is the stored text. A prompt stored already
    rendered (``chat_template_applied``) is used as stored.
    """
    parts = chat_parts(record)
    if (
        parts is None
        or record.get("chat_template_applied")
        or not use_template
        or not has_chat_template(tokenizer)
    ):
        return record["text"]
    return chat_text(parts[0], parts[1].rstrip(), tokenizer)[0]


def user_visible(record: dict[str, Any]) -> str:
    """What a person (or the judge, or the prompt generator) should read: the plain
    ``User: ...\nAssistant: ...`` transcript of a chat prompt, never template markup."""
    parts = chat_parts(record)
    if parts is None or not record.get("chat_template_applied"):
        return record["text"]
    return f"User: {parts[0]}\nAssistant: {parts[1]}"


def split_chat(text: str) -> tuple[str, str] | None:
    """(user, assistant prefix) of a ``User: ...\\nAssistant: ...`` transcript, else None."""
    match = _CHAT_PATTERN.match(text)
    return (match["user"].strip(), match["prefix"]) if match else None


def build_record(
    fmt: str,
    name: str,
    origin: dict[str, Any],
    *,
    text: str | None = None,
    user: str | None = None,
    assistant_prefix: str | None = None,
    tokenizer: Any = None,
    domain: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A record from either a plain text or (chat) a user turn plus the assistant's opening.

    ``tokenizer`` applies its chat template to chat prompts; the record then says so
    (``chat_template_applied``) and keeps the parts in ``metadata.messages``.
    """
    metadata = dict(metadata or {})
    if fmt != "chat":
        if tokenizer is not None:
            raise PromptError("--chat-template applies to chat prompts only (--format chat)")
        if text is None:
            raise PromptError(f"a {fmt} prompt needs its text")
        return make_record(text.rstrip(), fmt, name, origin, domain=domain, metadata=metadata)
    if user is None:
        parts = split_chat(text or "")
        if parts is None:
            if tokenizer is not None:
                raise PromptError(
                    "a chat prompt needs the form 'User: ...\\nAssistant: ...' to apply a chat "
                    "template"
                )
            return make_record(
                (text or "").rstrip(), fmt, name, origin, domain=domain, metadata=metadata
            )
        user, assistant_prefix = parts
    # Trailing spaces would make the decision word's usual " word" token impossible.
    assistant_prefix = (assistant_prefix or "").rstrip()
    full, template = chat_text(user, assistant_prefix, tokenizer)
    metadata["messages"] = {"user": user, "assistant_prefix": assistant_prefix}
    if template is not None:
        metadata["chat_template"] = template
    return make_record(
        full,
        fmt,
        name,
        origin,
        domain=domain,
        metadata=metadata,
        chat_template_applied=template is not None,
    )


def decode_escapes(text: str) -> str:
    """A prompt typed on the command line with the two-character escapes ``\\n`` and ``\\t``
    as a newline and a tab: a shell passes ``"User: ...\\nAssistant: ..."`` on literally."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def adhoc_record(text: str) -> dict[str, Any]:
    """The record of a prompt typed on the command line (``--prompt``, its ``\\n`` and ``\\t``
    escapes decoded): a ``User: ...\n Assistant: ...`` transcript is a chat prompt (read through
    each model's chat template), anything else a raw completion."""
    text = decode_escapes(text)
    fmt = "chat" if split_chat(text) else "raw"
    return build_record(fmt, "adhoc", {"kind": "adhoc", "source": "--prompt"}, text=text)


def adhoc_prompt_id(text: str) -> str:
    record = adhoc_record(text)
    return prompt_id(record["text"], record["format"])
