"""The analysis steps: one module a step (see :mod:`em_circuits.analysis.steps.base`)."""
