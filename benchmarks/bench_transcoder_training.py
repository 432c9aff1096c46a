#!/usr/bin/env python
"""Transcoder training with sparsify (issue 19): throughput, time to a usable set, and the toy
organism's set trained through the same path next to its hand-written trainer.

Two workloads, both through ``em_circuits.transcoders.training.train_transcoders`` (what
``em-circuits transcoders train`` runs):

* ``--shape qwen2.5-0.5b-instruct`` (GPU): a randomly initialised model of Qwen2.5-0.5B's
  architecture and sizes (built as in ``bench_pipeline.py``, bfloat16) on documents of random
  words from its tokenizer, packed into 2048-token rows. Training runs in stages of growing
  token budgets (``--budgets``), each resuming the last checkpoint; after each the set is
  measured on held-out rows (FVU per layer, L0, dead fraction, replacement top-1 agreement).
  Records tokens per second and the tokens and seconds until every layer's FVU is below the
  pipeline's warning threshold (a usable set).
* ``--toy`` (CPU): the toy organism's base trained on the documents its own transcoders are
  trained on (``TOY_SETTINGS``), and the organism report's transcoder table (held-out
  documents, pivotal-position agreement) for that set and for the hand-written one, whose
  training is timed again here on the same documents.

Writes ``transcoder-training-toy-<device>.json`` or
``transcoder-training-<shape>[-tiny]-<device>[-<tag>].json`` (see harness.py). ``--smoke``
runs the ``--shape`` path at toy sizes on a few thousand tokens.

Examples::

    python benchmarks/bench_transcoder_training.py --toy
    python benchmarks/bench_transcoder_training.py --shape qwen2.5-0.5b-instruct \\
        --budgets 2e6,6e6,14e6 --deadline 480
    python benchmarks/bench_transcoder_training.py --smoke --device cpu
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

#: The toy settings compared with the hand-written trainer: its width and k, Adam at its
#: learning rate with a short warm-up, ten passes over its documents.
TOY_SETTINGS: dict[str, Any] = {
    "k": 24,
    "num_latents": 512,
    "ctx_len": 128,
    "batch_size": 16,
    "optimizer": "adam",
    "lr": 3e-3,
    "lr_warmup_steps": 20,
    "epochs": 10,
}


def log(message: str) -> None:
    print(f"[bench_transcoder_training {time.strftime('%H:%M:%S')}] {message}", flush=True)


def toy(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    from transformers import PreTrainedTokenizerFast

    from em_circuits.organism import ensure_default_organism
    from em_circuits.organism.quality import load_models, transcoder_table
    from em_circuits.organism.recipe import Recipe
    from em_circuits.organism.train import recipe_transcoders, transcoder_texts
    from em_circuits.organism.transcoders import save_transcoders
    from em_circuits.transcoders.training import TrainingParams, train_transcoders

    torch.set_num_threads(args.threads)
    recipe = Recipe.default()
    organism = ensure_default_organism(progress=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(organism.base_dir))
    texts = transcoder_texts(tokenizer, recipe)
    models = load_models(organism)
    work = Path(args.workdir)

    log(f"hand-written trainer on {len(texts)} documents")
    start = time.perf_counter()
    by_hand = recipe_transcoders(models[1], tokenizer, texts, recipe, progress=False)
    hand_seconds = time.perf_counter() - start
    hand_config = save_transcoders(by_hand, work / "by-hand", scan="by-hand")

    log(f"sparsify through em-circuits transcoders train: {TOY_SETTINGS}")
    params = TrainingParams(**TOY_SETTINGS, save_every=10**9)
    result = train_transcoders(
        str(organism.base_dir),
        work / "sparsify",
        dataset=datasets.Dataset.from_dict({"text": texts}),
        dataset_name="the organism's transcoder documents",
        params=params,
        device="cpu",
        restart=True,
    )
    measured = {
        "hand_written": {
            "train_seconds": round(hand_seconds, 1),
            "recipe": {
                key: getattr(recipe, key)
                for key in ("tc_features", "tc_k", "tc_steps", "tc_finetune_steps", "tc_lr")
            },
            **transcoder_table(organism, str(hand_config), recipe, models),
        },
        "sparsify": {
            "train_seconds": round(result.seconds, 1),
            "tokens": result.tokens,
            "steps": result.steps,
            "settings": TOY_SETTINGS,
            **transcoder_table(organism, str(result.config_path), recipe, models),
        },
    }
    return {
        "workload": "toy organism: hand-written trainer vs sparsify, same documents",
        "documents": len(texts),
        "torch_threads": args.threads,
        **measured,
    }


def random_word_rows(tokenizer: Any, n_docs: int, seed: int) -> list[str]:
    words = sorted(
        {
            word
            for word in (tokenizer.decode([i]).strip() for i in range(len(tokenizer)))
            if word.isalpha() and word.isascii()
        }
    )
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(200, 1200))) for _ in range(n_docs)]


def quality_on(
    model_dir: Path, transcoders: Path, rows: torch.Tensor, device: torch.device
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from em_circuits.models.load import load_transcoder_set
    from em_circuits.transcoders.quality import measure

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    model = model.to(device).eval()
    tc = load_transcoder_set(str(transcoders), device, torch.bfloat16)
    try:
        return measure(model, tc, list(rows), batch_size=8)
    finally:
        del model, tc
        torch.cuda.empty_cache()


def shape(args: argparse.Namespace) -> dict[str, Any]:
    import datasets
    from bench_pipeline import build_organism
    from transformers import AutoTokenizer

    from em_circuits.transcoders.quality import FVU_MAX
    from em_circuits.transcoders.training import TrainingParams, train_transcoders
    from em_circuits.transcoders.training_data import tokenized_rows

    device = torch.device(args.device)
    root = Path(args.workdir) / args.shape
    start = time.perf_counter()
    built = build_organism(args.shape, root, device, tiny=args.tiny)
    base_dir = Path(built["paths"]["base"])
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    budgets = [int(float(b)) for b in args.budgets.split(",")]
    ctx = 2048 if not args.tiny else 128
    n_docs = max(budgets) // 700 + 64
    texts = random_word_rows(tokenizer, n_docs, seed=0)
    rows = tokenized_rows(datasets.Dataset.from_dict({"text": texts}), tokenizer, ctx)
    heldout = torch.stack(
        [row["input_ids"][:512] for row in rows.select(range(len(rows) - 16, len(rows)))]
    )
    train_rows = rows.select(range(len(rows) - 16))
    setup = time.perf_counter() - start
    log(f"{args.shape}: {len(train_rows)} rows of {ctx} tokens; setup {setup:.1f} s")

    params = dict(
        k=args.k,
        expansion_factor=args.expansion_factor,
        ctx_len=ctx,
        batch_size=args.batch_rows,
        optimizer=args.optimizer,
        lr=args.lr,
        lr_warmup_steps=args.lr_warmup_steps,
        save_every=10**9,  # one checkpoint per stage, at its end
    )
    out = root / f"trained{args.tag}"
    stages = []
    began = time.perf_counter()
    usable = None
    for budget in budgets:
        if stages:
            rate = stages[-1]["tokens_total"] / stages[-1]["elapsed_seconds"]
            projected = (budget - stages[-1]["tokens_total"]) / rate + 60
            if time.perf_counter() - began + projected > args.deadline:
                log(f"budget {budget:,} tokens would pass the deadline: stop")
                break
        result = train_transcoders(
            str(base_dir),
            out,
            dataset=train_rows,
            dataset_name="random-word documents",
            params=TrainingParams(**params, max_tokens=budget),
            device=str(device),
            dtype=args.dtype or ("bfloat16" if device.type == "cuda" else "float32"),
        )
        record = json.loads((out / "training.json").read_text())
        quality = quality_on(base_dir, out, heldout, device)
        fvus = [m["fvu"] for m in quality["layers"]]
        stage = {
            "tokens_total": result.tokens,
            "stage_seconds": round(result.seconds, 1),
            "stage_tokens_per_second": round(result.tokens_per_second or 0.0, 1),
            "steps_tokens_per_second": record.get("last_run_steps_tokens_per_second"),
            "elapsed_seconds": round(time.perf_counter() - began, 1),
            "max_fvu": max(fvus),
            "mean_fvu": sum(fvus) / len(fvus),
            "fvu_per_layer": [round(f, 4) for f in fvus],
            "mean_l0": [round(m["mean_l0"], 2) for m in quality["layers"]],
            "dead_fraction": [round(m["dead_fraction"], 4) for m in quality["layers"]],
            "top1_agreement": quality["top1_agreement"],
        }
        stages.append(stage)
        log(json.dumps(stage))
        if usable is None and stage["max_fvu"] < FVU_MAX:
            usable = {"tokens": result.tokens, "elapsed_seconds": stage["elapsed_seconds"]}
    return {
        "workload": f"{args.shape}, random weights, random-word documents",
        "architecture": built["architecture"],
        "sizes": built["sizes"],
        "settings": {**params, "lr": args.lr or "sparsify's default for the width"},
        "features_per_layer": args.expansion_factor * built["sizes"]["hidden_size"],
        "usable_threshold": f"every layer's held-out FVU below {FVU_MAX}",
        "usable_at": usable,
        "stages": stages,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toy", action="store_true", help="the toy organism (always on cpu)")
    parser.add_argument("--shape", choices=["qwen2.5-0.5b-instruct"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (checks the GPU path)")
    parser.add_argument("--budgets", default="2e6,6e6,14e6", help="token budgets of the stages")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds for all stages")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion-factor", type=int, default=32)
    parser.add_argument("--batch-rows", type=int, default=8, help="2048-token rows per step")
    parser.add_argument("--optimizer", default="signum", choices=["signum", "adam", "muon"])
    parser.add_argument("--lr", type=float, help="default: sparsify's for the width")
    parser.add_argument("--lr-warmup-steps", type=int, default=1000, help="adam's warm-up")
    parser.add_argument("--tag", default="", help="appended to the output file's name")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--toy)")
    parser.add_argument("--workdir", default="/tmp/bench-tc")
    harness.add_common_options(
        parser, dtype=None, dtype_help="transcoder training dtype (default: bf16 on cuda)"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # the --shape path at toy sizes: no organism to build
        args.toy, args.shape, args.tiny = False, args.shape or "qwen2.5-0.5b-instruct", True
        args.budgets, args.expansion_factor, args.k, args.batch_rows = "2048", 4, 8, 2
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.toy:
        args.device = "cpu"
        harness.write_record(args, "transcoder-training-toy", toy(args))
    elif args.shape:
        name = f"transcoder-training-{args.shape}{'-tiny' if args.tiny else ''}"
        harness.write_record(args, name, shape(args), tag=args.tag.strip("-"))
    else:
        parser.error("give --toy, --shape or --smoke")


if __name__ == "__main__":
    main()
