#!/usr/bin/env python
"""Same as ``em-circuits prompts`` (kept so existing commands work); see em_circuits/cli/prompts.py."""

import sys

from em_circuits.cli.common import run_command
from em_circuits.cli.prompts import main

if __name__ == "__main__":
    sys.exit(run_command(main))
