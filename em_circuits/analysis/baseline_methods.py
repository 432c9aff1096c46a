"""What the baselines step compares and the columns of its ``baselines.csv`` (no torch: the
report reads them too)."""

#: The edits compared, in table order (the issue's names).
METHODS = (
    "tested_features",
    "mean_diff_subspace",
    "misalignment_direction",
    "activation_diff_features",
    "linearised_top_features",
    "measured_top_features",
    "random_features",
)
#: The columns of baselines.csv, before the p-value's method.
COLUMNS = [
    "method",
    "k",
    "contrast_change",
    "ci_low",
    "ci_high",
    "n_clusters",
    "p_value",
    "em_rate",
    "em_rate_change",
]
