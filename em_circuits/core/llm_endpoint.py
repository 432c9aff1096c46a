"""Where the LLM is and how to get in: the API key and the endpoint, from the environment or a
``.env`` file, and the endpoint as it may be shown.

* The endpoint is the official OpenAI API by default; ``--base-url`` or ``OPENAI_BASE_URL``
  points it at vLLM, Ollama, LiteLLM or any proxy that speaks ``/v1/chat/completions``.
* The key comes from ``OPENAI_API_KEY`` in the environment or in a ``.env`` file. It is kept
  in memory only: it never appears in a repr, a log line, an error message or an artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from em_circuits.core.llm_errors import LLMError

KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"


def _dotenv_values(env_file: Path | str | None) -> dict[str, str]:
    """Values of a .env file (the given one, else the nearest one from the working directory).

    The file is read, not loaded into ``os.environ``, so the key does not leak into child
    processes this pipeline starts.
    """
    from dotenv import dotenv_values, find_dotenv

    path = str(env_file) if env_file else find_dotenv(usecwd=True)
    if not path:
        return {}
    if env_file and not Path(env_file).is_file():
        raise LLMError(f"env file {env_file} does not exist")
    return {k: v for k, v in dotenv_values(path).items() if v}


def find_api_key(env_file: Path | str | None = None) -> str | None:
    """``OPENAI_API_KEY`` from the environment, else from a .env file; None when neither has it."""
    return os.environ.get(KEY_ENV) or _dotenv_values(env_file).get(KEY_ENV) or None


def find_base_url(explicit: str | None = None, env_file: Path | str | None = None) -> str | None:
    """The endpoint: the flag, else ``OPENAI_BASE_URL`` (environment, then .env), else None."""
    return (
        explicit
        or os.environ.get(BASE_URL_ENV)
        or _dotenv_values(env_file).get(BASE_URL_ENV)
        or None
    )


def public_url(url: str | None) -> str | None:
    """The endpoint without any ``user:password@`` part, safe to store and log."""
    if not url:
        return url

    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
