#!/usr/bin/env python
"""Same as ``em-circuits run``;
kept so that existing commands work (code: em_circuits/cli/run.py)."""

import sys

from em_circuits.cli.common import run_command
from em_circuits.cli.run import main

if __name__ == "__main__":
    sys.exit(run_command(main))
