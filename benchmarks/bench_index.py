#!/usr/bin/env python
"""Feature activation index throughput (issue 17): tokens per second of ``build_index``.

Two workloads:

* ``--toy``: the embedded toy organism's adapted model reading its default corpus (the
  documents feature cards use), on the CPU. Goal: under one minute on 2 cores.
* ``--shape llama-3.2-1b-instruct``: a randomly initialised model of Llama-3.2-1B-Instruct's
  architecture and sizes with TopK transcoders of circuit-tracer's Llama width (131,072
  features, k = 64) in bfloat16, built as in ``bench_pipeline.py``, reading ``--tokens``
  tokens of random-word documents. Goal: 10 million tokens in under 10 minutes on one H100.

Each run records documents, positions, seconds and tokens per second (positions read, BOS
left out) in ``index-toy-<device>.json`` or ``index-<shape>[-tiny]-<device>.json`` (see
harness.py). ``--smoke`` runs the ``--shape`` path at toy sizes on a few thousand tokens.

Examples::

    python benchmarks/bench_index.py --toy
    python benchmarks/bench_index.py --shape llama-3.2-1b-instruct --tokens 10000000
    python benchmarks/bench_index.py --smoke --device cpu
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import harness  # the offline switches and the import path first
import torch
from harness import sync


def log(message: str) -> None:
    print(f"[bench_index {time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed_build(
    model: Any, texts: list[str], params: Any, progress_file: Path | None = None
) -> dict[str, Any]:
    """Build an index of ``texts``; with ``progress_file``, the documents, positions and
    seconds so far are written there at each checkpoint (a run cut short still tells its
    rate)."""
    from em_circuits.interpret.activation_index import build_index

    sync()
    start = time.perf_counter()

    def note(partial: Any) -> None:
        if progress_file is not None:
            seconds = time.perf_counter() - start
            progress_file.write_text(
                json.dumps(
                    {
                        "documents": partial.n_docs,
                        "positions": partial.n_positions,
                        "seconds": seconds,
                        "tokens_per_second": partial.n_positions / seconds,
                    }
                )
            )

    index = build_index(
        model, texts, params, progress=True, checkpoint=note, checkpoint_every=16384
    )
    sync()
    seconds = time.perf_counter() - start
    return {
        "documents": index.n_docs,
        "positions": index.n_positions,
        "seconds": seconds,
        "tokens_per_second": index.n_positions / seconds,
        "features": int(index.values.shape[0] * index.values.shape[1]),
        "layers": int(index.values.shape[0]),
        "top_k": int(index.values.shape[2]),
        "batch_documents": params.batch_size,
        "max_tokens": params.max_tokens,
    }


@torch.no_grad()
def phase_seconds(model: Any, texts: list[str], params: Any, batches: int = 6) -> dict[str, float]:
    """Seconds per batch of each phase of the build (tokenize, forward, encode, merge),
    synchronised after each, averaged over ``batches`` batches after one warm-up batch."""
    from em_circuits.interpret.activation_index import ActivationIndex, LiveIndex
    from em_circuits.models.hooks import record_transcoder_input, transcoder_set
    from em_circuits.models.load import n_layers_of
    from em_circuits.models.transcoders import active_entries

    transcoders = transcoder_set(model)
    n_layers = n_layers_of(model)
    device = torch.device(model.device)
    live = LiveIndex(
        ActivationIndex.empty(n_layers, int(transcoders.d_transcoder), params.top_k), device
    )
    seen: dict[int, torch.Tensor] = {}
    handles = [record_transcoder_input(model, layer, seen) for layer in range(n_layers)]
    totals = {"tokenize": 0.0, "forward": 0.0, "encode": 0.0, "merge": 0.0}

    def sync() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    try:
        for i in range(batches + 1):
            chunk = [
                texts[j % len(texts)]
                for j in range(i * params.batch_size, (i + 1) * params.batch_size)
            ]
            t0 = sync()
            batch = [model.encode(text)[: params.max_tokens].cpu() for text in chunk]
            ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True).to(device)
            mask = torch.ones_like(ids)
            t1 = sync()
            model.hf_model(ids, attention_mask=mask, logits_to_keep=1)
            t2 = sync()
            valid = mask.bool()
            valid[:, 0] = False
            entries = [
                active_entries(transcoders[layer], seen.pop(layer), valid)
                for layer in range(n_layers)
            ]
            t3 = sync()
            for layer, (rows, positions, features, values) in enumerate(entries):
                live.add(layer, features, values, rows, positions)
            t4 = sync()
            if i:  # the first batch warms up kernels and allocator
                for name, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    totals[name] += seconds / batches
    finally:
        for handle in handles:
            handle.remove()
    return totals


def toy(args: argparse.Namespace) -> dict[str, Any]:
    from em_circuits.interpret.activation_index import IndexParams
    from em_circuits.models.corpus import ORGANISM_CORPUS_DOCS, organism_corpus
    from em_circuits.models.load import load_model
    from em_circuits.models.spec import ModelSpec
    from em_circuits.organism import ensure_default_organism

    organism = ensure_default_organism(progress=True)
    spec = ModelSpec(
        base=str(organism.base_dir),
        adapter=str(organism.adapter_dir),
        transcoders=str(organism.transcoder_config),
        name="toy-em-organism",
    )
    model = load_model(spec, args.device, merged_cache=Path(args.workdir) / "merged")
    texts = organism_corpus(ORGANISM_CORPUS_DOCS)
    got = timed_build(model, texts, IndexParams())
    return {"workload": "toy organism, default corpus", **got}


def shape(args: argparse.Namespace) -> dict[str, Any]:
    from bench_pipeline import build_organism

    from em_circuits.interpret.activation_index import IndexParams
    from em_circuits.models.load import load_model
    from em_circuits.models.spec import ModelSpec

    device = torch.device(args.device)
    root = Path(args.workdir) / args.shape
    start = time.perf_counter()
    built = build_organism(args.shape, root, device, tiny=args.tiny)
    setup = time.perf_counter() - start
    spec = ModelSpec(
        base=built["paths"]["base"],
        transcoders=built["paths"]["transcoders"],
        dtype=args.dtype,
        name=args.shape,
    )
    model = load_model(spec, device, merged_cache=root / "merged")
    words = json.loads(Path(built["paths"]["words"]).read_text())
    vocabulary = words["harmful"] + words["safe"]
    rng = random.Random(0)
    params = IndexParams(batch_size=args.batch_docs, max_tokens=128)
    per_doc = params.max_tokens - 1  # positions read per full document (BOS left out)
    n_docs = max(1, args.tokens // per_doc)
    # Random words, long enough that every document is cut at max_tokens.
    texts = [" ".join(rng.choices(vocabulary, k=160)) for _ in range(n_docs)]
    log(f"{args.shape}: {n_docs} documents of random words; setup {setup:.1f} s")
    phases = phase_seconds(model, texts, params)
    log(f"seconds per batch of {args.batch_docs} documents: {json.dumps(phases)}")
    if args.profile_only:
        return {"workload": args.shape, "phase_seconds_per_batch": phases}
    progress = harness.out_dir(args) / f"index-{args.shape}-progress.json"
    got = timed_build(model, texts, params, progress)
    return {
        "workload": f"random {args.shape} ({built['sizes']['num_hidden_layers']} layers, "
        f"{built['transcoders']['features']} features per layer, TopK k = "
        f"{built['transcoders']['k']}, {args.dtype})",
        "setup_seconds": setup,
        "phase_seconds_per_batch": phases,
        **got,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="the toy organism on --device")
    parser.add_argument("--shape", default="llama-3.2-1b-instruct")
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--batch-docs", type=int, default=64)
    parser.add_argument("--profile-only", action="store_true", help="phase timings only")
    parser.add_argument("--tiny", action="store_true", help="toy sizes of --shape (CPU check)")
    parser.add_argument("--workdir", default="/tmp/bench-index")
    harness.add_common_options(
        parser,
        dtype="bfloat16",
        dtype_help="the --shape model's dtype",
        device_help="default: cpu for --toy, else cuda when there is one",
    )
    parser.set_defaults(device=None)
    args = parser.parse_args(argv)
    args.device = args.device or ("cpu" if args.toy or not harness.cuda() else "cuda")
    if args.smoke:  # the --shape path at toy sizes: no organism to build
        args.toy, args.tiny, args.tokens, args.batch_docs = False, True, 2000, 8
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    measured = {
        "cpu_threads": torch.get_num_threads(),
        **(toy(args) if args.toy else shape(args)),
    }
    name = "index-toy" if args.toy else f"index-{args.shape}{'-tiny' if args.tiny else ''}"
    harness.write_record(args, name, measured)
    if "positions" in measured:
        log(
            f"{measured['workload']} on {harness.device_name(args.device)}: "
            f"{measured['positions']} tokens in {measured['seconds']:.1f} s = "
            f"{measured['tokens_per_second']:.0f} tokens/s"
        )


if __name__ == "__main__":
    main()
