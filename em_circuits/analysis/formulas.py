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
  path; the same pass without that re-injection gives `direct`. With attention patterns,
  normalisation scales and the MLPs frozen the replacement model is linear, so the backward
  is carried down by hand from one forward pass (no autograd, no copy of the forward pass per
  target row). A full graph
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
* **Across prompts** (cluster = unit; `x_p` = the per-prompt value, default `contrast`):
  prompts are grouped into clusters (one scenario with its rephrasings: the `scenario` or
  `situation` of the prompt's origin, merged with near duplicates, character 3-gram Jaccard
  >= 0.6) and the clusters, never single prompts, are split into discovery (features are
  ranked there) and validation (every causal test runs there). `support` = number of
  prompts in which the key is a graph node (every active feature in totals mode; a full
  graph may prune an active feature). With `absent="zero"` an absent key contributes
  `x_p = 0`; with `absent="missing"` it is left out. Prompts whose value is undefined (no
  evil or no safe target) are left out entirely. Per cluster `g`: `x_g` = mean of its
  prompts' `x_p`; `mean = (1/G) sum_g x_g` over the G clusters; `[ci_low, ci_high]` =
  Student t interval `mean +- t(0.975, G-1) sd(x_g) / sqrt(G)`; `sign_consistency` = share of
  the supporting prompts whose `x_p` has the sign of the mean; `p_value` = two-sided
  sign-flip test of H0 "x_g is symmetric around 0" with statistic `|sum_g x_g|`, exact when
  every sign agrees (`2 / 2^G`), for G <= 16 (all sign patterns) and for G <= 40 where
  Monte Carlo finds p <= 0.01 (meet in the middle), else Monte Carlo with
  `(1 + hits) / (1 + draws)`; `p_method` says which. When `2 / 2^G > 0.05` no p-value is
  given (`n too small`). `q_value` = Benjamini-Hochberg adjusted p over the keys with a
  p-value and `support >= min_support`, separately per metric.
* **Base vs adapted** (paired on prompts present in both): `d_p = x_p(adapted) - x_p(base)`
  with absent = 0; `mean_diff`, t interval and sign-flip p of the cluster means of `d_p`.
  Category: `gained` (never in a base graph, in >= 1 adapted graph), `lost` (the reverse),
  else `strengthened` / `weakened` (|mean_adapted| above / below |mean_base|) when
  `|mean_diff| > threshold` and, if at least `ci_min_n` prompts have the key in either model,
  the CI excludes 0; else `unchanged`. `shift` says the sign of `mean_diff` (toward evil > 0).
* **The adapter's shift of the contrast** (paired by prompt): the direct effects partition
  each graph's contrast value exactly, `value(c) = sum_L sum_{f in layer L} A[c, f] +
  sum_L sum_{e in layer L, pos >= 1} A[c, e] + sum_L g_L[0] . m_L + sum_{e at BOS} A[c, e] +
  sum_{tokens} A[c, x] + bias`, with `m_L` what layer L's MLP writes at BOS less its skip
  connection and `g_L[0]` the direct gradient of `c` at that layer's write site at BOS
  (circuit-tracer zeroes every feature and error node at BOS, so `m_L` is a constant of
  the graph and its error nodes there are 0); `bias` is then the transcoders' decoder biases
  after BOS. So `value_adapted - value_base` is the sum of the same parts' differences: the
  features, the error nodes and the MLP output at BOS of each layer, the error nodes at BOS,
  the token embeddings and the biases. Each part's mean shift over clusters, with its t
  interval; the parts add up to the shift of the value. No part is divided by the contrast.
* **Causal tests**: the top `causal_candidates` features by discovery mean total effect are
  each ablated alone on the discovery prompts; the change of the contrast is measured with
  attention frozen (circuit-tracer's intervention: each layer's pattern keeps its clean value)
  and in the real model with nothing frozen (the MLP output of the feature's layer loses
  `(0 - a) W_dec[f]` at each active position); a prompt's ablations run as batch rows of a few
  forward passes of the real model, the frozen ones with the clean run's patterns
  (`models/frozen_attention.py`, equal to circuit-tracer's `feature_intervention` to 1e-4);
  the `causal_top_k` with the most negative measured change are tested on the validation
  prompts: single-feature measured changes next to the linearised prediction `-total[c, f]`
  (Pearson r, median ratio measured / linearised, same-sign share), the joint ablation
  against activation- and position-matched random features (one-sided sign-flip over
  clusters), and in the base model the same features ablated (two-sided) and amplified
  (one-sided, does evil rise?).
"""
