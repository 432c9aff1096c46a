"""Labeling: the logits + judge stage, judges, the manual queue, labels, feedback, calibration."""

#: Next-token candidates stored and judged per model and prompt.
DEFAULT_TOP_K = 10
#: Prompts per forward pass in the logits stage.
DEFAULT_LOGITS_BATCH_SIZE = 16
