"""usage: em-circuits transcoders {train,quality} [options]

Transcoders for any organism: train a set for a base that has none; measure any set.

  em-circuits transcoders train     skip-transcoders on every MLP of a base model, with
                                    EleutherAI's sparsify (TopK), resumable, on a GPU, several
                                    GPUs (torchrun) or a CPU; written in circuit-tracer's layout
  em-circuits transcoders quality   how well a set replaces the base and the adapted model's
                                    MLPs on held-out text (the table `em-circuits report` shows)

examples:
  em-circuits transcoders train                     # the toy organism's base, its documents
  em-circuits transcoders train --base-model Qwen/Qwen2.5-0.5B-Instruct \\
      --dataset corpus.jsonl --max-tokens 50_000_000 --out tc/qwen05
  torchrun --nproc-per-node 4 -m em_circuits.cli.main transcoders train --base-model ... \\
      --dataset ... --out tc/qwen05                 # 4 GPUs, data-parallel
  em-circuits transcoders quality --base-model Qwen/Qwen2.5-0.5B-Instruct --adapter ... \\
      --transcoders tc/qwen05 --corpus heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.cli.common import make_parser, next_command, setup

if TYPE_CHECKING:
    from em_circuits.transcoders.training import TrainingParams, TrainingResult

TRAIN_DOC = """Train skip-transcoders on every MLP of a base model with EleutherAI's sparsify.

Each layer's transcoder reads the MLP's input and predicts its output (a TopK activation over
ReLU'd pre-activations, plus a linear skip connection). The text is packed into --ctx-len
token rows; BOS/EOS positions are left out of the loss. The result is written to --out in
circuit-tracer's layout (config.yaml + layer_N.safetensors; pass the folder as
--transcoders), with training.json (settings, tokens, speed). A checkpoint is saved every
--save-every steps; a killed or interrupted run continues from its last checkpoint when the
same command runs again (--max-tokens may grow), and --restart discards it.

Several GPUs: launch with `torchrun --nproc-per-node N -m em_circuits.cli.main transcoders
train ...` (or `accelerate launch`); each GPU trains on its share of the rows.

examples:
  em-circuits transcoders train                     # the toy organism's base and documents
  em-circuits transcoders train --base-model Qwen/Qwen2.5-0.5B-Instruct \\
      --dataset corpus.jsonl --max-tokens 50_000_000
  em-circuits transcoders train --base-model ./my-base --dataset EleutherAI/SmolLM2-135M-10B \\
      --ctx-len 1024 --batch-size 16 --k 64
"""

QUALITY_DOC = """How well a transcoder set replaces each model's MLPs on held-out text.

Per layer: the fraction of the real MLP output's variance the reconstruction leaves
unexplained (FVU), the same from the skip connection alone, mean L0 and the dead fraction;
and the replacement model's next-token top-1 agreement with the real model, for the base and
the adapted model. Stored under results/transcoder_quality/ (the analysis reuses it) and
printed; a set poor for a model is named in a warning.

examples:
  em-circuits transcoders quality                   # the toy organism
  em-circuits transcoders quality --base-model ... --adapter ... --transcoders tc/qwen05 \\
      --corpus heldout.jsonl --quality-docs 200
"""


def _tokens(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


#: (module, distribution) of the optional extra ``em-circuits[train]``: only training needs them.
TRAIN_PACKAGES = (("sparsify", "eai-sparsify"), ("datasets", "datasets"))


def missing_train_packages() -> list[str]:
    """The distributions of the ``train`` extra that cannot be imported here."""
    import importlib

    missing = []
    for module, distribution in TRAIN_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    return missing


def _train_parser(prog: str) -> argparse.ArgumentParser:
    """The flags of `transcoders train`, with TrainingParams' defaults."""
    from em_circuits.transcoders.training import TrainingParams

    defaults = TrainingParams()
    parser = make_parser(TRAIN_DOC, prog)
    parser.add_argument(
        "--base-model",
        help="HF id or local directory (default: the toy organism's base)",
    )
    parser.add_argument("--base-revision", help="HF revision of the base")
    parser.add_argument(
        "--dataset",
        help="training text: a text file (blank-line separated documents) or JSONL ('text'), a "
        "folder written by datasets' save_to_disk, or a Hugging Face dataset id (default for "
        "the toy organism: its documents)",
    )
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--text-column", default="text", help="the dataset's text column")
    parser.add_argument(
        "--out", type=Path, help="output folder (default: results/transcoders/<base name>)"
    )
    g = parser.add_argument_group("the transcoders")
    g.add_argument("--k", type=int, default=defaults.k, help="active features per position")
    g.add_argument(
        "--expansion-factor",
        type=int,
        default=defaults.expansion_factor,
        help="features per layer = this x the model width",
    )
    g.add_argument(
        "--num-latents", type=int, default=0, help="features per layer (overrides the factor)"
    )
    t = parser.add_argument_group("training")
    t.add_argument("--ctx-len", type=int, default=defaults.ctx_len, help="tokens per row")
    t.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="rows per step, per GPU"
    )
    t.add_argument("--grad-acc-steps", type=int, default=1, help="steps per optimizer update")
    t.add_argument(
        "--micro-acc-steps", type=int, default=1, help="chunks per batch (less GPU memory)"
    )
    t.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help="learning rate; 0 = sparsify's default for the width (benchmarks/RESULTS.md)",
    )
    t.add_argument("--optimizer", choices=("signum", "adam", "muon"), default=defaults.optimizer)
    t.add_argument(
        "--lr-warmup-steps",
        type=int,
        default=defaults.lr_warmup_steps,
        help="linear warm-up of the learning rate (adam)",
    )
    t.add_argument(
        "--auxk-alpha", type=float, default=0.0, help="weight of the dead-feature AuxK loss"
    )
    t.add_argument("--epochs", type=int, default=1, help="passes over the dataset")
    t.add_argument(
        "--max-tokens", type=_tokens, help="train on at most this many tokens (default: all)"
    )
    t.add_argument(
        "--save-every", type=int, default=defaults.save_every, help="steps between checkpoints"
    )
    t.add_argument("--seed", type=int, default=0, help="initialisation seed")
    t.add_argument(
        "--restart", action="store_true", help="discard this folder's checkpoint and start over"
    )
    t.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    t.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the model's dtype (the transcoders train in float32); auto = bfloat16 on CUDA",
    )
    return parser


def _training_params(args: argparse.Namespace) -> TrainingParams:
    """The TrainingParams the flags give."""
    from em_circuits.transcoders.training import TrainingParams

    return TrainingParams(
        k=args.k,
        expansion_factor=args.expansion_factor,
        num_latents=args.num_latents,
        ctx_len=args.ctx_len,
        batch_size=args.batch_size,
        grad_acc_steps=args.grad_acc_steps,
        micro_acc_steps=args.micro_acc_steps,
        lr=args.lr or None,
        optimizer=args.optimizer,
        lr_warmup_steps=args.lr_warmup_steps,
        auxk_alpha=args.auxk_alpha,
        epochs=args.epochs,
        seed=args.seed,
        max_tokens=args.max_tokens,
        save_every=args.save_every,
    )


def _base_and_dataset(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[str, Any, str | None]:
    """The base model, the training text and its name: the flags', else the toy organism's base
    and (without --dataset) its documents; a base of one's own needs --dataset."""
    base, dataset, dataset_name = args.base_model, args.dataset, args.dataset
    if base is None:
        from em_circuits.organism import ensure_default_organism

        organism = ensure_default_organism(progress=True)
        base = str(organism.base_dir)
        if dataset is None:
            import datasets

            from em_circuits.models.corpus import organism_corpus

            dataset_name = "the toy organism's documents (3000)"
            dataset = datasets.Dataset.from_dict({args.text_column: organism_corpus(3000)})
    if dataset is None:
        parser.error("give --dataset (a text/JSONL file, a save_to_disk folder or a hub id)")
    return base, dataset, dataset_name


def _print_trained(result: TrainingResult) -> None:
    """What a finished training made, and the next command."""
    rate = f", {result.tokens_per_second:,.0f} tokens/s" if result.tokens_per_second else ""
    print(f"trained {result.steps} steps, {result.tokens:,} tokens in all{rate}")
    print(f"transcoders: {result.config_path}")
    print(
        "Next: `em-circuits transcoders quality --base-model ... --adapter ... --transcoders "
        f"{result.config_path.parent}` measures them; pass the same --transcoders to every stage"
    )


def _train(argv: list[str], prog: str) -> int:
    parser = _train_parser(prog)
    args = parser.parse_args(argv)
    missing = missing_train_packages()
    if missing:
        print(
            f"error: training needs {' and '.join(missing)}, which are not installed: "
            "pip install 'em-circuits[train]' (pins: requirements-train.txt)",
            file=sys.stderr,
        )
        return 2
    for flag in ("k", "expansion_factor", "ctx_len", "batch_size", "epochs", "save_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    store = setup(args)

    from em_circuits.transcoders.training import train_transcoders

    params = _training_params(args)
    base, dataset, dataset_name = _base_and_dataset(args, parser)
    out = args.out or store.trained_transcoders_dir(Path(base.rstrip("/")).name)
    result = train_transcoders(
        base,
        out,
        dataset=dataset,
        dataset_name=dataset_name,
        params=params,
        revision=args.base_revision,
        device=args.device,
        dtype=args.dtype,
        split=args.split,
        text_column=args.text_column,
        restart=args.restart,
    )
    if not result.main_process:
        return 0  # the main process of the launch reports
    _print_trained(result)
    return 0


def _quality(argv: list[str], prog: str) -> int:
    from em_circuits.cli.common import add_model_args, specs_from_args

    parser = make_parser(QUALITY_DOC, prog)
    add_model_args(parser)
    parser.add_argument(
        "--corpus",
        help="text (blank-line separated) or JSONL file ('text'); documents after the first "
        "--corpus-docs are measured (default for the toy organism: its held-out documents)",
    )
    parser.add_argument(
        "--corpus-docs", type=int, default=400, help="leading documents the feature index reads"
    )
    parser.add_argument("--quality-docs", type=int, default=64, help="documents measured")
    parser.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    parser.add_argument("--json", action="store_true", help="print the stored records as JSON")
    args = parser.parse_args(argv)
    if args.quality_docs < 1:
        parser.error("--quality-docs must be at least 1")
    store = setup(args)

    from em_circuits.analysis.steps.transcoder_quality import (
        QualityStepParams,
        measure_transcoder_quality,
        transcoder_quality_details,
        transcoder_quality_markdown,
    )
    from em_circuits.models.spec import resolve_device

    base, adapted = specs_from_args(args)
    device = str(resolve_device(args.device))
    note = measure_transcoder_quality(
        store,
        {"base": base, "adapted": adapted},
        QualityStepParams(quality_docs=args.quality_docs),
        args.corpus,
        args.corpus_docs,
        args.seed,
        device,
    )
    if "skipped" in note:
        print(f"error: {note['skipped']}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(transcoder_quality_details(store, note), indent=2))
    else:
        print(transcoder_quality_markdown(store, note))
    poor = [role for role in ("base", "adapted") if (note.get(role) or {}).get("poor")]
    print(
        f"Next: the set is poor for the {' and '.join(poor)} model: train a better one with "
        "`em-circuits transcoders train`, or read its graphs knowing more goes to error nodes"
        if poor
        else f"Next: {next_command(args, 'run')} (the same --transcoders for each stage)"
    )
    return 0


ACTIONS = {"train": _train, "quality": _quality}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    prog = prog or "em-circuits transcoders"
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    action = args[0]
    if action not in ACTIONS:
        print(
            f"error: unknown action {action!r}; use {' or '.join(ACTIONS)} "
            f"(`{prog} {next(iter(ACTIONS))} --help`)",
            file=sys.stderr,
        )
        return 2
    return ACTIONS[action](args[1:], f"{prog} {action}")
