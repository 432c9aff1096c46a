"""Setup (the workload's files, the adapter merge) and loading both models once."""

from __future__ import annotations

import shutil
import time
from typing import Any

from harness import Budget, Estimates, log, measure, weights_gib
from workloads import random_workload, toy_workload

from em_circuits.core.store import ResultsStore
from em_circuits.models.load import load_model, load_transcoder_set, merged_model_dir
from em_circuits.models.merge import merge_adapter
from em_circuits.models.spec import resolve_dtype
from sections.common import Context, ResidentModels, Settings, model_weights_gib


def prepare(settings: Settings, budget: Budget, estimates: Estimates) -> Context:
    """The workload's files and store, and the merged adapter; one-off costs in
    ``workload.setup``, which no ratio includes."""
    args, device = settings.args, settings.device
    if args.fresh:
        shutil.rmtree(settings.workdir, ignore_errors=True)
    settings.workdir.mkdir(parents=True, exist_ok=True)
    if args.workload == "toy":
        workload = toy_workload(args)
    else:
        workload = random_workload(args, settings.workdir / "files", device)
    store = ResultsStore(settings.workdir / "results")
    # Import what loading needs now, so the timed first load pays no module imports.
    start = time.perf_counter()
    import circuit_tracer.replacement_model.replacement_model_nnsight  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    workload.setup["imports (circuit-tracer, nnsight, peft)"] = time.perf_counter() - start
    spec = workload.adapted_spec
    merged = merged_model_dir(spec, store.merged_cache_dir, device)
    if (merged / "merge_report.json").is_file():
        workload.setup["merge adapter"] = "cached"
    else:
        dtype = resolve_dtype(spec.dtype, device)
        _, m = measure(lambda: merge_adapter(spec, merged, dtype))
        workload.setup["merge adapter (once per adapter and dtype)"] = m.seconds
    log(f"   {workload.description}")
    return Context(settings, workload, store, budget, estimates)


def load_resident(ctx: Context, resident: ResidentModels) -> dict[str, Any]:
    """Transcoders once, then base and adapted on them: times and resident weights.

    Each model joins ``resident`` as soon as it is loaded, so a failure releases it later.
    """
    spec = ctx.workload.adapted_spec
    dtype = resolve_dtype(spec.dtype, ctx.device)
    shared, m_tc = measure(lambda: load_transcoder_set(spec.transcoders, ctx.device, dtype))
    out: dict[str, Any] = {"transcoders_s": m_tc.seconds}
    for role, s in (("base", ctx.workload.base_spec), ("adapted", spec)):
        model, m = measure(
            lambda s=s: load_model(s, ctx.device, ctx.store.merged_cache_dir, transcoder_set=shared)
        )
        resident.add(role, model)
        out[f"{role}_s"] = m.seconds
    base, adapted = resident.pair()
    out["total_s"] = out["transcoders_s"] + out["base_s"] + out["adapted_s"]
    out["transcoders_gib"] = weights_gib(shared)
    out["model_gib"] = weights_gib(base.hf_model)
    out["one_model_gib"] = model_weights_gib(base)
    out["both_resident_gib"] = weights_gib(base.hf_model, adapted.hf_model, shared)
    out["dtype"] = str(dtype).removeprefix("torch.")
    if adapted.merge_report is not None:
        out["adapter"] = adapted.merge_report.summary()
    ctx.estimates.load_s = max(out["transcoders_s"] + out["base_s"], 1.0)
    log(
        f"   transcoders {out['transcoders_s']:.1f} s, base {out['base_s']:.1f} s, adapted "
        f"{out['adapted_s']:.1f} s; weights resident {out['both_resident_gib']:.2f} GiB"
    )
    return out
