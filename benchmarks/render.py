"""The Markdown report: headline ratios, throughput and memory, setup, sections, method.

It reads only the JSON-ready numbers of results.json, the section records and the settings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import SectionRecord, cuda, median
from render_cells import fmt, gib, goal, mb
from render_defaults import HOW, past_defaults
from workloads import Workload

from em_circuits.attribution.targets import AttributionParams

REFERENCE_H100 = {"attribute_s": 3.0, "attribute_peak_gib": 21.3, "dense_pt_mb": 283.0}


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report shows, gathered once the sections have run."""

    args: argparse.Namespace
    env: dict[str, Any]
    workload: Workload | None  # None when the setup failed
    params: AttributionParams
    workdir: Path
    elapsed_s: float
    analysis_call: str
    sections: dict[str, SectionRecord]
    numbers: dict[str, Any]  # results.json's "numbers"

    def status(self, key: str) -> str:
        """Why a result is missing: the status of the section that makes it."""
        section = {"a": "graph", "b": "reload", "d": "analysis", "e": "logits"}.get(key, key)
        record = self.sections.get(section)
        return record.status if record else "not run"


def render(inputs: ReportInputs) -> str:
    """The report in Markdown, one section of RESULTS.md."""
    lines = header(inputs) + headline_rows(inputs) + throughput_rows(inputs)
    lines += past_defaults(inputs.numbers, inputs.args, inputs.status)
    lines += [
        "",
        "### Setup (one-off, not in any ratio)",
        "",
        "| step | seconds |",
        "| --- | --- |",
    ]
    for step, value in (inputs.numbers.get("setup") or {}).items():
        shown = fmt(value, 2) if isinstance(value, float) else str(value)
        lines.append(f"| {step} | {shown} |")
    lines += [
        "",
        "### Sections",
        "",
        "| section | status | seconds | section peak GiB |",
        "| --- | --- | --- | --- |",
    ]
    for record in inputs.sections.values():
        lines.append(
            f"| {record.title} | {record.status} | {fmt(record.seconds)} | "
            f"{fmt(record.section_peak_gib)} |"
        )
    n = inputs.numbers
    notes = [x for k in ("a", "b", "d", "fast_dtype") for x in (n.get(k) or {}).get("notes", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    lines += ["", "### How each number was measured", ""] + HOW
    return "\n".join(lines) + "\n"


def header(inputs: ReportInputs) -> list[str]:
    args, env, w, p = inputs.args, inputs.env, inputs.workload, inputs.params
    return [
        f"## Graph-stage benchmarks: {w.name if w else args.workload} on {env['device']}",
        "",
        f"- Date (UTC): {env['date_utc']}; total wall time {inputs.elapsed_s:.0f} s "
        f"(budget --max-seconds {args.max_seconds:.0f}).",
        f"- Software: Python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + (f", CUDA {env['cuda']}" if env["cuda"] else "")
        + (f"; GPU memory {env['gpu_memory_gib']:.1f} GiB" if env["gpu_memory_gib"] else ""),
        f"- Workload: {w.description if w else args.workload + ' (setup failed)'}.",
        f"- Attribution: max_feature_nodes {p.max_feature_nodes}, batch_size {p.batch_size}, "
        f"main dtype {args.dtype}, fast dtype {args.fast_dtype}; feature analysis: "
        f"{inputs.analysis_call}.",
        f"- Command: `{env['command']}`",
    ]


def headline_rows(inputs: ReportInputs) -> list[str]:
    a, b, c, d, e = (inputs.numbers.get(k) for k in ("a", "b", "c", "d", "e"))
    lines = [
        "",
        "### Headline ratios",
        "",
        "| | measurement | ours | reference | ratio | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    if a:
        lines.append(
            f"| (a) | graph stage per prompt, both models (build_graph x2: targets, logits, "
            f"compact save; + analysis x2) vs 2 raw `attribute()` | "
            f"{fmt(a['ours_per_prompt_s'])} s (attribute() {fmt(a['ours_attribute_per_prompt_s'])}"
            f" s, extras {fmt(a['ours_extras_per_prompt_s'])} s) | "
            f"{fmt(a['raw_per_prompt_s'])} s | {fmt(a['ratio'], 3)} | <= 1.1 | "
            f"{goal(a['ratio'] <= 1.1)} |"
        )
        lines.append(
            f"| (a') | the same, against 2 raw `attribute()` given the same targets as ours "
            f"(contrast + labeled tokens): our code's own overhead | "
            f"{fmt(a['ours_per_prompt_s'])} s | {fmt(a['raw_same_targets_per_prompt_s'])} s | "
            f"{fmt(a['ratio_same_targets'], 3)} | <= 1.1 | {goal(a['ratio_same_targets'] <= 1.1)}"
            f" |"
        )
    else:
        lines.append(
            f"| (a) | graph stage vs raw attribute() | {inputs.status('a')} | | | <= 1.1 | n/a |"
        )
    if b and "by_n" in b:
        for key, row in b["by_n"].items():
            lines.append(
                f"| (b) | reload-per-prompt pattern vs models loaded once, N = {key} prompts "
                f"(load amortised) | {fmt(row['ours_per_prompt_s'])} s/prompt | "
                f"{fmt(b['reload_per_prompt_s'])} s/prompt (loads {fmt(b['load_pair_s'])} s) | "
                f"{fmt(row['speedup'], 1)}x | >= 5x | {goal(row['speedup'] >= 5)} |"
            )
    else:
        lines.append(
            f"| (b) | reload-per-prompt pattern | {inputs.status('b')} | | | >= 5x | n/a |"
        )
    if c:
        lines.append(
            f"| (c) | stored bytes per prompt, both models (compact safetensors + meta JSON) vs "
            f"dense `Graph.to_pt` | {mb(c['compact_bytes_per_prompt'])} + "
            f"{mb(c['meta_bytes_per_prompt'])} | {mb(c['dense_bytes_per_prompt'])} | "
            f"{fmt(c['ratio'], 0)}x | >= 50x | {goal(c['ratio'] >= 50)} |"
        )
    else:
        lines.append(f"| (c) | stored bytes | {inputs.status('a')} | | | >= 50x | n/a |")
    if d:
        on_gpu = f"; on GPU {fmt(d['prune_graph_gpu_s'], 3)} s" if d["prune_graph_gpu_s"] else ""
        lines.append(
            f"| (d) | feature analysis per graph vs `prune_graph` (same graph) | "
            f"{fmt(d['analysis_s'], 3)} s (+ total effects at graph time "
            f"{fmt(d['total_effects_s'], 3)} s) | {fmt(d['prune_graph_s'], 3)} s "
            f"(on {d['rows'][0]['adjacency_device']}{on_gpu}) | "
            f"{fmt(d['ratio_analysis'], 1)}x ({fmt(d['ratio_with_total_effects'], 1)}"
            f"x incl. total effects) | > 1x | {goal(d['ratio_with_total_effects'] > 1)} |"
        )
    else:
        lines.append(f"| (d) | analysis vs prune_graph | {inputs.status('d')} | | | | n/a |")
    if e:
        lines.append(
            f"| (e) | next-token logits, {e['n_prompts']} prompts: batched (batch "
            f"{e['batch_size']}) vs per-prompt loop | {fmt(e['batched_prompts_per_s'], 1)} "
            f"prompts/s | {fmt(e['loop_prompts_per_s'], 1)} prompts/s | "
            f"{fmt(e['speedup'], 1)}x (max logit diff {e['max_abs_logit_diff']:.1e}) | "
            f"> 1x | {goal(e['speedup'] > 1)} |"
        )
    else:
        lines.append(f"| (e) | batched logits | {inputs.status('e')} | | | | n/a |")
    # The goals are about the real model's scale; tiny models only show the path works.
    target = inputs.workload is not None and inputs.workload.name == "llama1b-random" and cuda()
    lines += [
        "",
        "Ratio: (a) ours / raw (lower is better); (b), (d), (e) their time / ours "
        "(a speed-up); (c) dense bytes / compact bytes.",
        "",
        "Goals are set for the llama1b-random workload on a GPU"
        + (
            "."
            if target
            else "; on this workload and device the 'met' column is informational "
            "only (tiny models: fixed per-call costs dominate)."
        ),
    ]
    return lines


def throughput_rows(inputs: ReportInputs) -> list[str]:
    a, c, load = (inputs.numbers.get(k) for k in ("a", "c", "load"))
    if not a:
        return []
    hw = "GPU" if cuda() else "CPU"
    ref = REFERENCE_H100
    lines = [
        "",
        "### Throughput and memory",
        "",
        "| measurement | value | how |",
        "| --- | --- | --- |",
        f"| prompts per {hw}-hour, graph stage (both models + analysis) | "
        f"{fmt(a['prompts_per_hour'], 0)} | 3600 / median per-prompt time of (a), models "
        f"already loaded |",
        f"| raw `attribute()` per graph | {fmt(a['raw_attribute_median_s'])} s | median over "
        f"{2 * a['n_prompts']} warm calls (known H100 reference: ~{ref['attribute_s']} s) |",
        f"| peak {hw} memory during raw `attribute()`, both models resident | "
        f"{gib(a['raw_peak_gib_both_resident'])} | torch.cuda.max_memory_allocated, "
        f"reset before each call |",
    ]
    if load:
        one = (
            load["one_model_gib"] + a["raw_working_gib"]
            if a["raw_working_gib"] is not None
            else None
        )
        lines += [
            f"| peak for one model resident (as circuit-tracer runs it) | {gib(one)} | "
            f"weights of one model + its transcoders ({gib(load['one_model_gib'])}) + "
            f"the call's working memory ({gib(a['raw_working_gib'])}); H100 reference "
            f"{ref['attribute_peak_gib']} GiB |",
            f"| weights resident, both models on one transcoder set | "
            f"{gib(load['both_resident_gib'])} | model {gib(load['model_gib'])} each,"
            f" transcoders {gib(load['transcoders_gib'])} ({load['dtype']}) |",
            f"| load once: transcoders + base + adapted | "
            f"{fmt(load['transcoders_s'])} + {fmt(load['base_s'])} + "
            f"{fmt(load['adapted_s'])} s | load_transcoder_set, then load_model x2 with "
            f"transcoder_set=shared |",
        ]
    if c:
        lines.append(
            f"| dense graph, one model | {mb(median(list(c['dense_bytes'].values())))} "
            f"({next(iter(c['dense_nodes'].values()))} nodes) | Graph.to_pt to "
            f"{inputs.workdir / 'dense'}, size, deleted (H100 reference "
            f"{ref['dense_pt_mb']:.0f} MB) |"
        )
    return lines
