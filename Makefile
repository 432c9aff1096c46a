# make demo : set everything up and run the whole pipeline on the embedded toy organism
# make test : set everything up and run the test suite
PY := .venv/bin/python

.PHONY: setup demo test lint organism viewer-deps

setup:
	@bash scripts/setup.sh

# A failed Chromium install (mirror down) only skips the browser test, with its reason shown.
viewer-deps:
	@bash scripts/install_viewer_deps.sh || echo "warning: viewer test dependencies not installed"

organism: setup
	$(PY) build_organism.py

demo: setup
	$(PY) create_graph_labeling_pipeline.py

test: setup viewer-deps
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check .
