"""The effect formulas, written once: the README's maths section is checked against this text."""

from __future__ import annotations

FORMULAS = r"""
### Formulas

Notation for one prompt and one model: `A[t, s]` is the direct effect of source node `s`
(feature, error node or token) on target `t` in the linearised model, `a_f` the activation of
feature `f`, `B = A[:, F] diag(1/a_F)`; targets are labeled token logits (evil set `E`,
safe set `S`) and the contrast direction `c = mean_{e in E} logit(e) - mean_{s in S} logit(s)`.

* **Direct effect** `direct[t, s] = A[t, s]`.
* **Total effect** `total[t, s] = A[t, s] + sum_{f in F} (B_TF (I - B_FF)^-1)[t, f] A[f, s]`:
  the sum over every path `s -> f_1 -> ... -> f_k -> t` through features of the product of
  its edge weights, each divided by the activation of the feature it leaves. Error nodes and
  tokens are inputs; a feature's total effect is the linearised change of `t` when the
  feature is zeroed.
* **How they are computed.** By default (`--graph-mode totals`) `F` is every active feature
  and both rows come from one backward pass from the targets: at each layer, after the
  features writing there are scored, every feature `f` reading there adds
  `(total[t, f] / a_f) W_enc[f]` at its position to the gradient below, so the pass sums every
  path; the same pass without that re-injection gives `direct`. A full graph
  (`--graph-mode full`, and the prompts `--full-graphs` chooses) keeps circuit-tracer's
  `max_feature_nodes` most influential features with their edges and solves the formula
  above over them. With every feature kept the two agree to float rounding.
* **Feature key.** Effects of all graph nodes with the same (layer, transcoder feature id) are
  summed: over all positions (`position="any"`), only the last (`"last"` = `"rel:-1"`), the
  k-th from the end (`"rel:-k"`), or each relative position separately (`"each"`). Summing is
  exact for zeroing: two nodes of one layer never lie on a common path.
* **Per prompt**, for metric `m` in {direct, total} and feature key `k`:
  `evil_mean = mean_{e in E} m[e, k]`, `safe_mean = mean_{s in S} m[s, k]`,
  `evil_minus_safe = evil_mean - safe_mean`, and `contrast = m[c, k]` (the contrast target's
  row). Every row of `total` is linear in the target's row of `A`, so
  `contrast == evil_minus_safe` for both metrics whenever `c` is built from the same sets.
  `within_prompt_welch_t = evil_minus_safe / sqrt(var_E/|E| + var_S/|S|)` (needs |E|, |S| >= 2):
  its units are the target *tokens of one prompt*, it is a descriptive statistic, not a test
  across prompts.
* **Across prompts** (prompt = unit; `x_p` = the per-prompt value, default `contrast`):
  `support` = number of prompts in which the key is a graph node (every active feature in
  totals mode; a full graph may prune an active feature: absent means "not among the graph's
  nodes"). With
  `absent="zero"` an absent key contributes `x_p = 0` (n = all prompts); with
  `absent="missing"` it is left out (n = support). Prompts whose value is undefined (no
  evil or no safe target) are left out entirely. `mean = (1/n) sum_p x_p`;
  `[ci_low, ci_high]` = percentile bootstrap interval of the mean (prompts resampled with
  replacement, seeded); `sign_consistency` = share of the supporting prompts whose `x_p`
  has the sign of the mean; `p_value` = two-sided sign-flip permutation test of H0 "x_p is
  symmetric around 0" with statistic `|sum_p x_p|` (exact over all 2^n sign patterns for
  n <= 12, else Monte Carlo with `(1 + hits) / (1 + draws)`); `q_value` =
  Benjamini-Hochberg adjusted p over all keys with `support >= min_support`, separately per
  metric. With n prompts no p-value can be below 2 / 2^n: few prompts, no discoveries.
* **Base vs adapted** (paired on prompts present in both): `d_p = x_p(adapted) - x_p(base)`
  with absent = 0; `mean_diff`, paired bootstrap CI and sign-flip p of `d_p`. Category:
  `gained` (never in a base graph, in >= 1 adapted graph), `lost` (the reverse), else
  `strengthened` / `weakened` (|mean_adapted| above / below |mean_base|) when
  `|mean_diff| > threshold` and, if at least `ci_min_n` prompts have the key in either model,
  the CI excludes 0; else `unchanged`. `shift` says the sign of `mean_diff` (toward evil > 0).
* **Who carries the contrast** (per prompt): direct: `value(c) = sum_f A[c, f] +
  sum_{errors} A[c, e] + sum_{tokens} A[c, x] + bias`, an exact partition; total: `value(c)
  = sum_{errors} total[c, e] + sum_{tokens} total[c, x] + remainder`, also a partition
  (errors and tokens are the roots; the remainder holds the biases, propagated through the
  features, and the effect of any active feature not kept in the graph).
  `error share of layer l = sum_{e in layer l} total[c, e] / value(c)`. The features' summed
  total effect is reported too, but it is a flow through intermediate nodes and overlaps the
  roots' shares; it is not additive.
"""
