# make demo      : set everything up and run the whole pipeline on the embedded toy organism
# make test      : set everything up and run the whole test suite (what CI runs)
# make test-fast : the quick tests only (no whole-pipeline runs, no installs): under 90 s
PY := .venv/bin/python

.PHONY: setup demo test test-fast lint format typecheck organism viewer-deps stability-organisms

setup:
	@bash scripts/setup.sh

# A failed Chromium install (mirror down) only skips the browser test, with its reason shown.
viewer-deps:
	@bash scripts/install_viewer_deps.sh || echo "warning: viewer test dependencies not installed"

organism: setup
	.venv/bin/em-circuits organism

demo: setup
	.venv/bin/em-circuits run

# A second toy organism (recipe seed 1), its pipeline, and the main run compared with it.
stability-organisms: setup
	bash scripts/stability_organisms.sh

test: setup viewer-deps
	$(PY) -m pytest

# Fails past 120 s (EM_CIRCUITS_TEST_BUDGET_S, checked in tests/conftest.py).
test-fast: setup
	EM_CIRCUITS_TEST_BUDGET_S=120 $(PY) -m pytest -m "not slow" --durations=10

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

typecheck: setup
	.venv/bin/mypy
