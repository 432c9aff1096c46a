#!/usr/bin/env python
"""Where does a graph's time go? attribute() with salient, token-id and our custom targets,
and our attribute_prompt(), on the same prompts and resident model, plus a cProfile of each.

Uses the workload of run_benchmarks.py (same flags), e.g. on a GPU:
  python benchmarks/profile_attribution.py --workload llama1b-random --prompts 3
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_benchmarks as rb  # noqa: E402  (sets the offline defaults and the repository path)
from harness import Budget, Estimates, log, measure, median, sync  # noqa: E402
from sections.common import ResidentModels, Settings  # noqa: E402
from sections.setup import load_resident, prepare  # noqa: E402


def main() -> None:
    args = rb.parse_args()
    settings = Settings.from_args(args)
    ctx = prepare(
        settings, Budget(args.max_seconds), Estimates.initial(settings.device.type == "cuda")
    )
    resident = ResidentModels()
    load_resident(ctx, resident)
    from circuit_tracer import attribute

    from em_circuits.attribution.attribute import attribute_prompt, custom_targets, target_rows

    _, model = resident.pair()
    params = ctx.params
    rm = model.replacement
    variants = {
        "salient": lambda pt, ids: attribute(
            ids, rm, batch_size=params.batch_size, max_feature_nodes=params.max_feature_nodes
        ),
        "token ids": lambda pt, ids: attribute(
            ids,
            rm,
            attribution_targets=torch.tensor(pt.evil_ids + pt.safe_ids),
            batch_size=params.batch_size,
            max_feature_nodes=params.max_feature_nodes,
        ),
        "custom": lambda pt, ids: attribute(
            ids,
            rm,
            attribution_targets=custom_targets(
                model, pt, target_rows(model, pt, []), {t: 1.0 for t in pt.evil_ids + pt.safe_ids}
            ),
            batch_size=params.batch_size,
            max_feature_nodes=params.max_feature_nodes,
        ),
        "attribute_prompt": lambda pt, ids: attribute_prompt(model, pt, params, None),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    prompts = ctx.workload.prompts
    for i, pt in enumerate(prompts):
        ids = model.encode(pt.text)
        for name, fn in variants.items():
            _, m = measure(lambda fn=fn, pt=pt, ids=ids: fn(pt, ids))
            if i:
                times[name].append(m.seconds)
            log(f"   prompt {i} {name}: {m.seconds:.3f} s, peak {m.peak_gib} GiB")
    for name, ts in times.items():
        log(f"median {name}: {median(ts):.3f} s over {len(ts)}")
    pt = prompts[-1]
    ids = model.encode(pt.text)
    for name in ("salient", "attribute_prompt"):
        profiler = cProfile.Profile()
        profiler.enable()
        variants[name](pt, ids)
        sync()
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
        log(f"== cProfile {name}\n{out.getvalue()[:6000]}")


if __name__ == "__main__":
    main()
