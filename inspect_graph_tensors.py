#!/usr/bin/env python
"""Same as ``em-circuits inspect``;
kept so that existing commands work (code: em_circuits/cli/inspect_graph.py)."""

import sys

from em_circuits.cli.common import run_command
from em_circuits.cli.inspect_graph import main

if __name__ == "__main__":
    sys.exit(run_command(main))
