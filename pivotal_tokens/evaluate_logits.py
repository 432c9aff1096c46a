#!/usr/bin/env python
"""Same as ``em-circuits evaluate``;
kept so that existing commands work (code: em_circuits/cli/evaluate.py)."""

import sys

from em_circuits.cli.common import run_command
from em_circuits.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(run_command(main))
