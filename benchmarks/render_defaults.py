"""The report's "Past circuit-tracer's defaults" table and its closing method section."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from harness import median
from render_cells import fmt, gib


def past_defaults(
    numbers: dict[str, Any], args: argparse.Namespace, status: Callable[[str], str]
) -> list[str]:
    """Each change past the defaults: predicted and measured effect. ``status`` says why a
    section's numbers are missing."""
    a, load, fast, sweep, b = (numbers.get(k) for k in ("a", "load", "fast_dtype", "batch", "b"))
    lines = [
        "",
        "### Past circuit-tracer's defaults",
        "",
        "| change | predicted | measured | check |",
        "| --- | --- | --- | --- |",
    ]
    if fast and "speedup" in fast:
        half = (
            (
                f"; weights of one model + transcoders {fmt(load['one_model_gib'])} -> "
                f"~{gib(load['one_model_gib'] / 2)}"
            )
            if load
            else ""
        )
        measured = (
            f"{fmt(fast['speedup'])}x speed-up ({fmt(fast['attribute_s'])} s vs "
            f"{fmt(fast['ref_attribute_s'])} s per attribute()); weights "
            f"{gib(fast['one_model_gib'])}; working memory "
            f"{gib(fast.get('working_gib'))} vs "
            f"{gib((a or {}).get('ours_working_gib'))}"
        )
        check = (
            f"top-{args.top_features} features by |total effect| on the contrast "
            f"target vs float32: Jaccard median {fmt(fast['jaccard_median'])} (min "
            f"{fmt(fast['jaccard_min'])}), Spearman (signed effects, union of both tops) "
            f"median {fmt(fast['spearman_median'], 3)}; {len(fast['prompts'])} prompts"
        )
        lines.append(
            f"| attribution in {fast['dtype']} instead of float32 | 1.5-2x faster (half the "
            f"bytes per pass, tensor-core matmuls){half} | {measured} | {check} |"
        )
    else:
        lines.append(
            f"| {args.fast_dtype} attribution | 1.5-2x faster, half the weights "
            f"| {status('fast')} | |"
        )
    if sweep and sweep.get("rows"):
        cells = []
        for row in sweep["rows"]:
            if "error" in row:
                cells.append(f"{row['batch_size']}: {row['error'][:60]}")
            else:
                cells.append(
                    f"{row['batch_size']}: {fmt(row['median_s'])} s, peak "
                    f"{gib(row['max_peak_gib'])}"
                )
        best = sweep.get("best_batch_size")
        lines.append(
            f"| batch size from measured memory ({sweep['dtype']}) | fewer backward passes "
            f"(8192/B) until the GPU is saturated; working memory grows ~linearly in B | "
            f"{'; '.join(cells)} | fastest within 80% of GPU memory: "
            f"{best if best is not None else 'n/a'} |"
        )
    else:
        lines.append(f"| batch size sweep | | {status('fast')} | |")
    if load and b:
        fresh = median([sum(r["load_s"].values()) for r in b["runs"]])
        saved = fresh - load["total_s"]
        lines.append(
            f"| both models resident on one transcoder set vs sequential load/release | saves "
            f"one transcoder-set load per stage run (~{fmt(load['transcoders_s'])} s) and costs "
            f"one more model's weights ({gib(load['model_gib'])}) | resident load "
            f"{fmt(load['total_s'])} s (the process's first loads) vs two fresh loads "
            f"{fmt(fresh)} s: {fmt(saved)} s saved "
            f"per stage run; weights resident {gib(load['both_resident_gib'])} vs one "
            f"model {gib(load['one_model_gib'])} at a time | per-graph time unchanged "
            f"(same attribute()) |"
        )
    else:
        lines.append("| both models resident | | needs the load and reload sections | |")
    if a and fast and "speedup" in fast:
        attr = a["ours_attribute_per_prompt_s"]
        projected = a["ours_per_prompt_s"] - attr + attr / fast["speedup"]
        lines.append(
            f"| all of the above together (projection) | | {fmt(3600 / projected, 0)} prompts "
            f"per hour (vs {fmt(a['prompts_per_hour'], 0)}): (a)'s per-prompt time with "
            f"attribute() scaled by the measured {fast['dtype']} speed-up | projected, not "
            f"measured |"
        )
    return lines


HOW = [
    "- Every timed call is wrapped in `torch.cuda.synchronize()` and `time.perf_counter()`; "
    "the first prompt of (a) is a warm-up and is not counted; medians over prompts.",
    "- (a) ours: `em_circuits.attribution.graph_build.build_graph` for base and adapted (custom "
    "targets: the evil-safe contrast direction and each labeled token; same-pass logits; "
    "total effects; compact safetensors save; meta JSON), then the per-prompt feature "
    "analysis on each graph loaded back from disk. Raw: "
    "`circuit_tracer.attribute(ids, model.replacement, "
    "batch_size, max_feature_nodes)` with its default salient-logit targets, on the same "
    "resident models, prompt by prompt interleaved with ours.",
    "- (b) reload pattern: per prompt, `load_model` (fingerprint, cached merged adapter, "
    "transcoders, replacement model, finiteness check) then `build_graph` then `release`, for "
    "base and adapted in turn, plus the analysis. Ours at N prompts = (a)'s per-prompt time + "
    "the one-off resident load / N. The adapter merge itself is cached after setup in both "
    "patterns.",
    "- (c) compact bytes: the `.safetensors` graph file and its meta `.json` of both models; "
    "dense: `Graph.to_pt` of the two raw graphs of the same prompt, written, measured, deleted.",
    "- (d) `prune_graph(graph)` on the Graph that `attribute()` returned (its adjacency lives "
    "on the CPU) vs the analysis of the compact graph of the same attribution; the total "
    "effects (`compact_from_dense`) are computed at graph time and also reported.",
    "- (e) `em_circuits.models.logits.next_token_logits` on the adapted model, batched with left "
    "padding vs batch size 1; the two results are compared.",
    "- Memory: `torch.cuda.max_memory_allocated` (reset before each call); working memory = "
    "peak minus what was allocated before the call.",
    "- Past the defaults: the fast dtype reloads the base model (its own transcoders in that "
    "dtype) and attributes the prompts of (a) to the same targets; feature agreement compares "
    "nodes (layer, position, feature) of the two compact graphs.",
]
