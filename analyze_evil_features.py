#!/usr/bin/env python
"""Same as ``em-circuits analyze``;
kept so that existing commands work (code: em_circuits/cli/analyze.py)."""

import sys

from em_circuits.cli.analyze import main
from em_circuits.cli.common import run_command

if __name__ == "__main__":
    sys.exit(run_command(main))
