#!/usr/bin/env bash
# Create .venv with pinned dependencies and the em_circuits package (editable). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and exactly pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt | cut -d' ' -f1)" 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import circuit_tracer, em_circuits, peft, openai" \
  || { echo "setup failed: see pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
