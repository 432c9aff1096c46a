#!/usr/bin/env bash
# Does the same mechanism appear in a toy organism trained with another seed?
#
# Builds a second toy organism (recipe seed $SEED, default 1) in its own folder (the default
# organism is untouched), runs the whole pipeline on it into its own results directory, runs
# the main pipeline if it has not run yet, and runs the main pipeline again with
# --compare-run: every stage and step is reused from its cache except the stability step,
# which writes stability.json's `organisms` section and the report's paragraph and Findings.
#
#   make stability-organisms                 # or: SEED=2 bash scripts/stability_organisms.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SEED="${SEED:-1}"
PY="${PY:-.venv/bin/python}"
MAIN="${MAIN_RESULTS:-results}"
OTHER="${OTHER_RESULTS:-results-seed$SEED}"
ORGANISM="models/toy-em-organism-seed$SEED"
em() { "$PY" -m em_circuits.cli.main "$@"; }

em organism --seed "$SEED" --out "$ORGANISM" --no-progress --print-report none
em run --results-dir "$OTHER" --base-model "$ORGANISM/base" --adapter "$ORGANISM/adapter" \
    --transcoders "$ORGANISM/transcoders/config.yaml" --model-name "toy-em-organism-seed$SEED"
em run --results-dir "$MAIN" --compare-run "$OTHER"
echo "compared: $MAIN/report.md (Stability) and stability.json's organisms section" >&2
