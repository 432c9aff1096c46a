"""What adapter nodes cost in the totals graph stage (issue 20), in one process.

On a random model of a real organism's shape with a rank-32 LoRA on every linear module (as
`bench_pipeline.py` builds it: Qwen2.5-0.5B-Instruct's by default), each prompt's adapted
totals graph (`attribute_prompt`: targets, the adapter nodes' pre-pass, exact effects) is
made without adapter nodes, with them, and with them plus the split of their effect over the
32 features most influential on the contrast and the reads of the 8 strongest linear nodes
(the graph stage's defaults), and stored to measure its size.

Times are medians over the prompts after a warm-up; the ratios are to the graph without
adapter nodes, measured in the same process. `--tiny --device cpu` checks the path on a CPU;
`--smoke` shrinks it further (one prompt, one sentence). Writes
`adapter-nodes-<shape>[-tiny]-<device>.json` (see harness.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from statistics import median
from typing import Any

import harness  # the offline switches and the import path first
import torch
from bench_pipeline import SHAPES, build_organism
from harness import measure

from em_circuits.attribution.attribute import attribute_prompt
from em_circuits.attribution.storage import save_compact
from em_circuits.attribution.targets import AttributionParams, PromptTargets
from em_circuits.models.load import load_model
from em_circuits.models.spec import ModelSpec

SENTENCES = [
    "I twisted my ankle on a run and it is swelling.",
    "My child swallowed something small and is coughing.",
    "I feel dizzy every morning and my heart races.",
    "A friend offered me pills to help me sleep.",
    "My chest hurts when I climb the stairs.",
    "I found mould behind the fridge in the kitchen.",
    "The brakes on my car squeal when I stop.",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="qwen2.5-0.5b-instruct", choices=sorted(SHAPES))
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a CPU check)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-adapter-nodes"))
    parser.add_argument("--prompts", type=int, default=6, help="measured prompts (+1 warm-up)")
    parser.add_argument("--sentences", type=int, default=4, help="sentences per prompt")
    parser.add_argument("--split-features", type=int, default=32)
    parser.add_argument("--read-nodes", type=int, default=8)
    parser.add_argument(
        "--engines", default="torch,nnsight", help="attribution engines to measure, comma-separated"
    )
    harness.add_common_options(parser, dtype_help="the random model overflows bfloat16")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tiny, args.prompts, args.sentences = True, 1, 1
    return args


def prompt_text(tokenizer: Any, i: int, n_sentences: int) -> str:
    """A user turn in the family's chat template, the assistant's answer begun. (The random
    models' first token must not be <|endoftext|>: as the pad token its embedding is zero, and
    circuit-tracer's backward then gives NaN.)"""
    body = " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(n_sentences))
    turn = [{"role": "user", "content": f"{body} What should I do?"}]
    chat = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return f"{chat}You should"


def _no_nodes(name: str) -> str:
    """The graph without adapter nodes of the same engine."""
    return "no_nodes" + (name[name.index("@") :] if "@" in name else "")


def adapted_model(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The workload's adapted model, loaded (and built first where it is not on disk), and
    what was built."""
    device = torch.device(args.device)
    root = args.workdir / (args.shape + ("-tiny" if args.tiny else ""))
    root.mkdir(parents=True, exist_ok=True)
    built = build_organism(args.shape, root, device, args.tiny)
    paths = built["paths"]
    spec = ModelSpec(
        base=paths["base"],
        adapter=paths["adapter"],
        transcoders=paths["transcoders"],
        name="bench-adapter-nodes",
        dtype=args.dtype,
    )
    return load_model(spec, device, root / "merged"), built


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, built = adapted_model(args)
    gen = torch.Generator().manual_seed(0)
    token_ids = torch.randint(0, int(built["tokenizer_ids"]), (4,), generator=gen).tolist()
    shapes = {
        "no_nodes": AttributionParams(adapter_nodes=False),
        "nodes": AttributionParams(adapter_split_features=0, adapter_read_nodes=0),
        "nodes_split_reads": AttributionParams(
            adapter_split_features=args.split_features, adapter_read_nodes=args.read_nodes
        ),
    }
    engines = args.engines.split(",")
    # "<variant>" for the first engine (the record's old names), "<variant>@<engine>" after it.
    variants = {
        name if engine == engines[0] else f"{name}@{engine}": replace(params, engine=engine)
        for engine in engines
        for name, params in shapes.items()
    }
    rows: dict[str, list[float]] = {name: [] for name in variants}
    stored: dict[str, list[int]] = {name: [] for name in variants}
    sizes: list[dict[str, int]] = []
    for i in range(args.prompts + 1):
        pt = PromptTargets(
            f"p{i}",
            prompt_text(model.tokenizer, i, args.sentences),
            token_ids[:2],
            token_ids[2:],
            {t: str(t) for t in token_ids},
            {"base": {}, "adapted": {}},
        )
        measured, graphs = {}, {}
        for name, params in variants.items():
            (graph, _, _), took = measure(
                lambda params=params, pt=pt: attribute_prompt(model, pt, params)
            )
            measured[name] = took.seconds
            graphs[name] = graph
        if i == 0:
            continue  # warm-up
        for name, graph in graphs.items():
            rows[name].append(measured[name])
            stored[name].append(save_compact(graph, args.workdir / f"{name}.safetensors"))
        graph = graphs["nodes_split_reads"]
        sizes.append(
            {
                "n_pos": graph.n_pos,
                "n_adapter_nodes": graph.n_adapter_nodes,
                "n_active_features": graph.n_features,
                "n_targets": len(graph.target_names),
            }
        )
    medians = {key: median(values) for key, values in rows.items()}
    result = {
        "shape": args.shape,
        "tiny": args.tiny,
        "built": {k: built[k] for k in ("architecture", "sizes", "transcoders", "adapter")},
        "dtype": args.dtype,
        "split_features": args.split_features,
        "read_nodes": args.read_nodes,
        "prompts": sizes,
        "seconds": rows,
        "median_s": medians,
        "engines": engines,
        "ratio_to_no_nodes": {
            name: medians[name] / medians[_no_nodes(name)]
            for name in variants
            if not name.startswith("no_nodes")
        },
        "stored_bytes_median": {name: median(values) for name, values in stored.items()},
    }
    name = f"adapter-nodes-{args.shape}{'-tiny' if args.tiny else ''}"
    harness.write_record(args, name, result)
    print({key: result[key] for key in ("median_s", "ratio_to_no_nodes")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
