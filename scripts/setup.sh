#!/usr/bin/env bash
# Create .venv with pinned dependencies and the em_circuits package (editable, with the
# em-circuits command). Idempotent: does nothing when requirements and pyproject are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
here=$(pwd -P)

# A .venv copied from another checkout still points there: its scripts' #! lines, its
# activate files and its editable install name the old folder. Rewrite the paths, then
# reinstall the package below so `import em_circuits` means this checkout.
if [ -f .venv/bin/activate ]; then
  old=$(sed -n "s/^ *VIRTUAL_ENV=['\"]\{0,1\}\([^'\"]*\)['\"]\{0,1\}$/\1/p" .venv/bin/activate | head -n1)
  if [ -n "$old" ] && [ "$old" != "$here/.venv" ]; then
    echo "setup: .venv was made in ${old%/.venv}; repairing it for $here"
    grep -rlF --null "$old" .venv/bin 2>/dev/null | xargs -0 -r sed -i "s|$old|$here/.venv|g"
    rm -f .venv/.requirements.sha256
  fi
fi

stamp=.venv/.requirements.sha256
want=$(cat requirements.txt requirements-train.txt requirements-dev.txt pyproject.toml \
  | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && .venv/bin/python -c "import em_circuits, sys; sys.exit(not em_circuits.__file__.startswith('$here/'))" 2>/dev/null; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and exactly pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt | cut -d' ' -f1)" 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import circuit_tracer, em_circuits, peft, openai, sparsify, datasets" \
  || { echo "setup failed: see pip output above" >&2; exit 1; }
[ -x .venv/bin/em-circuits ] || { echo "setup failed: no .venv/bin/em-circuits" >&2; exit 1; }
echo "$want" > "$stamp"
