"""Library notices that say nothing to a user of this tool, dropped at their source."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    """Drops log records whose message mentions any of ``words``."""

    def __init__(self, *words: str):
        super().__init__()
        self.words = words

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(word in text for word in self.words)


#: transformers' notice that a ``compile_config`` cannot be honoured: this tool never compiles
#: (the models generate once, in eager mode), so the notice only alarms a user.
_COMPILE_NOTICE = _DropMessages("compile_config")


def quiet_library_notices() -> None:
    """Silence library notices that say nothing to a user of this tool (only those)."""
    for name in ("transformers.generation.utils", "transformers.generation.configuration_utils"):
        logger = logging.getLogger(name)
        if _COMPILE_NOTICE not in logger.filters:
            logger.addFilter(_COMPILE_NOTICE)
    warnings.filterwarnings("ignore", message=r".*compile_config.*")
