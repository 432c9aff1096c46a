"""A command prefix that makes a child process obey file permissions even as root."""

from __future__ import annotations

import os
import shutil

import pytest


def unprivileged() -> list[str]:
    """A prefix that makes the command obey file permissions even when the tests run as root
    (root ignores them unless it gives up CAP_DAC_OVERRIDE); skips the test where that
    cannot be done."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a directory read-only")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--"]
