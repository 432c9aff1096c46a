"""Train a transcoder set for a base model that has none, with EleutherAI's sparsify.

sparsify trains skip-transcoders on each decoder layer's MLP (hookpoint ``layers.N.mlp``: the
module's input is circuit-tracer's ``mlp.hook_in``, its output ``mlp.hook_out``) with a TopK
activation over ReLU'd pre-activations, on one GPU, on several (under ``torchrun`` /
``accelerate launch``, data-parallel) or on a CPU. This module gives it what the pipeline
needs around it:

* the text: a local text or JSONL file (read as the feature cards read a corpus), a folder
  written by ``datasets``' ``save_to_disk``, or a dataset on the Hugging Face Hub (or in its
  cache); packed into ``ctx_len``-token rows by sparsify's ``chunk_and_tokenize``;
* resumable runs: sparsify's checkpoint is written to a temporary folder and swapped in, so a
  kill leaves the last complete checkpoint; re-running the same command continues from it
  (at the first row it has not seen), and a folder holding a run with other settings is
  refused;
* the result in circuit-tracer's per-layer layout (``config.yaml`` + ``layer_N.safetensors``),
  which ``--transcoders`` loads (``activation: relu_topk`` with ``k``, see
  :mod:`em_circuits.models.transcoders`); the checkpoint folder itself is a sparsify set that
  loads too, so a run can be looked at before it ends.

The BOS / EOS tokens sparsify puts at the start of every packed row (and between documents)
are left out of the loss: circuit-tracer zeroes position 0, and the attention-sink activations
there would dominate the fit.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from em_circuits.core.atomic import atomic_path, atomic_write_text
from em_circuits.models.spec import ModelLoadError
from em_circuits.models.transcoder_formats import (
    MLP_INPUT_HOOK,
    MLP_OUTPUT_HOOK,
    RELU_TOPK,
    SPARSIFY_TENSOR_NAMES,
    read_sparsify_set,
)
from em_circuits.models.transcoder_source import TranscoderSource

CHECKPOINT_DIR = "checkpoint"
RUN_NAME = "sparsify"
TRAINING_FILE = "training.json"
CONFIG_FILE = "config.yaml"


class TrainingError(ModelLoadError):
    """A training request that cannot run as given (bad data, a folder of another run)."""


@dataclass(frozen=True)
class TrainingParams:
    """How to train; the fields that change what is trained make a run's identity."""

    k: int = 32
    expansion_factor: int = 32
    num_latents: int = 0  # 0: expansion_factor x the model width
    ctx_len: int = 2048
    batch_size: int = 8  # rows (sequences) per step, per process
    grad_acc_steps: int = 1
    micro_acc_steps: int = 1
    # Adam at 1e-3 after a short warm-up: sparsify's own default (sign-SGD at a learning rate
    # set by the width) diverged on a Qwen2.5-0.5B-shaped model and fit the toy organism
    # poorly, where this improved steadily (benchmarks/RESULTS.md). None: sparsify's default.
    lr: float | None = 1e-3
    optimizer: str = "adam"
    lr_warmup_steps: int = 100  # adam only
    auxk_alpha: float = 0.0
    dead_feature_threshold: int = 10_000_000
    epochs: int = 1
    seed: int = 0
    # Not part of the identity: a run can be given more tokens, or saved more often.
    max_tokens: int | None = None
    save_every: int = 1000

    def identity(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("max_tokens", "save_every"):
            out.pop(key)
        return out


# -- the text -----------------------------------------------------------------------------
def _text_dataset(dataset: str, split: str, text_column: str) -> Any:
    """The untokenised dataset ``dataset`` names, as a ``datasets.Dataset``."""
    import datasets

    path = Path(dataset).expanduser()
    if path.is_file():
        from em_circuits.models.corpus import read_corpus

        try:
            texts = read_corpus(path)
        except (ValueError, UnicodeDecodeError) as err:
            raise TrainingError(f"{path}: {err}") from None
        if not texts:
            raise TrainingError(f"{path}: no documents (blank-line separated text or JSONL)")
        return datasets.Dataset.from_dict({text_column: texts})
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise TrainingError(
                f"{path}: not a dataset folder written by datasets' save_to_disk ({err})"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise TrainingError(f"{path}: no split {split!r} (has {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    if dataset.startswith((".", "/", "~")):
        raise TrainingError(f"{dataset}: no such file or folder")
    try:
        return datasets.load_dataset(dataset, split=split)
    except Exception as err:  # offline, unknown id, no such split: all one line for the user
        raise TrainingError(
            f"cannot load dataset {dataset!r} split {split!r} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); give a local file or folder, or "
            "download it once with internet access (same HF_HOME)"
        ) from None


def tokenized_rows(
    dataset: str | Any,
    tokenizer: Any,
    ctx_len: int,
    *,
    split: str = "train",
    text_column: str = "text",
    num_proc: int | None = None,
) -> Any:
    """``dataset`` (a name as :func:`_text_dataset` reads, or a ``datasets.Dataset``) as rows
    of ``ctx_len`` token ids (column ``input_ids``), documents packed and EOS-separated."""
    from sparsify.data import chunk_and_tokenize

    data = _text_dataset(dataset, split, text_column) if isinstance(dataset, str) else dataset
    if "input_ids" in data.column_names:
        return data.with_format("torch", columns=["input_ids"])
    if text_column not in data.column_names:
        raise TrainingError(
            f"dataset {dataset!r} has no column {text_column!r} (columns: "
            f"{', '.join(data.column_names)}); name the text column with --text-column"
        )
    # Worker processes pay off only for large datasets; small ones tokenise faster inline.
    procs = num_proc or (max(1, (os.cpu_count() or 2) // 2) if len(data) > 20_000 else 1)
    try:
        rows = chunk_and_tokenize(
            data,
            tokenizer,
            max_seq_len=ctx_len,
            num_proc=procs,
            text_key=text_column,
            load_from_cache_file=False,
        )
    except ValueError as err:
        if "Not enough data" not in str(err):
            raise
        rows = []
    if len(rows) == 0:
        raise TrainingError(
            f"dataset {dataset!r} holds fewer than {ctx_len} tokens: give more text or a "
            "smaller --ctx-len"
        )
    return rows


def _rows_for_run(rows: Any, params: TrainingParams, world_size: int, rank: int) -> Any:
    """The rows this process trains on: repeated ``epochs`` times, cut to ``max_tokens``, a
    multiple of the process count, and this process's shard."""
    import datasets

    if params.epochs > 1:
        rows = datasets.concatenate_datasets([rows] * params.epochs)
    if params.max_tokens is not None:
        rows = rows.select(range(min(len(rows), max(1, params.max_tokens // params.ctx_len))))
    if world_size > 1:
        rows = rows.select(range(len(rows) - len(rows) % world_size))
        rows = rows.shard(world_size, rank, contiguous=True)
    if len(rows) < params.batch_size:
        raise TrainingError(
            f"{len(rows)} rows of {params.ctx_len} tokens per process is less than one batch "
            f"({params.batch_size} rows): give more text, or a smaller --batch-size or --ctx-len"
        )
    return rows.with_format("torch", columns=["input_ids"])


# -- the run ------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    """(world size, rank), with the process group set up when launched with several."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            raise TrainingError(
                "training on several processes needs one GPU each (sparsify's data-parallel "
                "training wraps each transcoder for its GPU); run one process on a CPU"
            )
    return dist.get_world_size(), dist.get_rank()


def _checkpoint_trainer_class() -> type:
    """sparsify's Trainer, saving each checkpoint to a temporary folder that is then swapped
    for the previous one, so a kill mid-save leaves the last complete checkpoint."""
    import torch.distributed as dist
    from sparsify import Trainer

    class CheckpointingTrainer(Trainer):
        save_seconds = 0.0  # spent writing checkpoints (not training)

        def save(self) -> None:
            started = time.perf_counter()
            path = Path(self.cfg.save_dir) / (self.cfg.run_name or RUN_NAME)
            if not dist.is_initialized() or dist.get_rank() == 0:
                partial = path.with_name(path.name + ".partial")
                shutil.rmtree(partial, ignore_errors=True)
                self._checkpoint(self.saes, str(partial), True)
                previous = path.with_name(path.name + ".previous")
                if path.exists():
                    path.rename(previous)
                partial.rename(path)
                shutil.rmtree(previous, ignore_errors=True)
            if dist.is_initialized():
                dist.barrier()
            self.save_seconds += time.perf_counter() - started

    return CheckpointingTrainer


def _recover_checkpoint(path: Path) -> None:
    """Undo a swap a kill interrupted: the previous checkpoint comes back if no new one
    replaced it; a half-written one is dropped."""
    previous = path.with_name(path.name + ".previous")
    if not path.exists() and previous.exists():
        previous.rename(path)
    shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)


def _run_identity(model_ref: str, model: Any, dataset: str, params: TrainingParams) -> dict:
    return {
        "base_model": model_ref,
        "model_config": {
            "model_type": model.config.model_type,
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
        },
        "dataset": dataset,
        "params": params.identity(),
    }


def _check_same_run(out: Path, identity: dict[str, Any]) -> None:
    record_path = out / TRAINING_FILE
    if not record_path.is_file():
        return
    try:
        stored = json.loads(record_path.read_text()).get("identity")
    except (OSError, ValueError):
        stored = None
    if stored is not None and stored != identity:
        changed = sorted(
            key
            for key in set(stored.get("params", {})) | set(identity["params"])
            if stored.get("params", {}).get(key) != identity["params"].get(key)
        )
        changed += [
            key
            for key in ("base_model", "dataset", "model_config")
            if stored.get(key) != identity[key]
        ]
        raise TrainingError(
            f"{record_path}: this folder holds a training run with other settings "
            f"({', '.join(changed)}); give another --out, or --restart to discard it"
        )


@dataclass
class TrainingResult:
    config_path: Path  # the circuit-tracer config.yaml, for --transcoders
    tokens: int  # tokens trained on in all (every process, every run of this folder)
    steps: int
    seconds: float  # this invocation's training time
    tokens_per_second: float | None  # this invocation's, all processes together
    main_process: bool = True  # False in the other processes of a multi-GPU launch


def check_trainable(model_dir: Path) -> None:
    """A one-line TrainingError unless circuit-tracer reads and writes this architecture's
    transcoders at the MLP module's input and output (``mlp.hook_in`` / ``mlp.hook_out``),
    the values sparsify trains on: Gemma-2's are read inside a norm and written after the
    post-feedforward norm, so a set trained here would not load."""
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping
    from transformers import AutoConfig

    from em_circuits.models.architectures import architecture_of, supported_architectures

    architecture = architecture_of(AutoConfig.from_pretrained(model_dir))
    if architecture not in supported_architectures():
        raise TrainingError(
            f"{model_dir}: circuit-tracer cannot trace {architecture}, so transcoders trained "
            f"for it would not load; supported: {', '.join(supported_architectures())}"
        )
    hooks = get_mapping(architecture).feature_hook_mapping
    if MLP_INPUT_HOOK not in hooks or MLP_OUTPUT_HOOK not in hooks:
        raise TrainingError(
            f"{model_dir}: cannot train transcoders for {architecture}: sparsify trains on the "
            f"MLP module's input and output ({MLP_INPUT_HOOK} / {MLP_OUTPUT_HOOK}), which "
            f"circuit-tracer has no hooks for on {architecture} (it has "
            f"{', '.join(sorted(hooks))}); use a published set for it (e.g. --transcoders "
            "gemma for Gemma-2-2B)"
        )


def train_transcoders(
    model_ref: str,
    out: Path,
    *,
    dataset: str | Any,
    dataset_name: str | None = None,
    params: TrainingParams = TrainingParams(),
    revision: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    split: str = "train",
    text_column: str = "text",
    restart: bool = False,
) -> TrainingResult:
    """Train (or continue training) skip-transcoders on every MLP of ``model_ref`` and write
    them to ``out`` in circuit-tracer's layout; returns where the config is and what ran."""
    import torch
    from sparsify import TrainConfig, TranscoderConfig
    from transformers import AutoModel, AutoTokenizer

    from em_circuits.models.spec import resolve_device, resolve_dtype, resolve_model_dir

    world, rank = _distributed()
    if world > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type != "cuda" and torch_dtype != torch.float32:
        # sparsify casts the activations to its float32 weights only under CUDA autocast
        raise TrainingError(f"--dtype {dtype} trains on CUDA only; on {torch_device} use float32")
    model_dir = resolve_model_dir(model_ref, revision, "base model")
    check_trainable(model_dir)  # before any text is read or anything is written
    # fvu loss reads MLP inputs and outputs only: the bare model, no LM head.
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch_dtype).to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    name = dataset_name or (dataset if isinstance(dataset, str) else "a datasets.Dataset")
    identity = _run_identity(model_ref, model, name, params)

    out = Path(out)
    checkpoint = out / CHECKPOINT_DIR / RUN_NAME
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
            (out / TRAINING_FILE).unlink(missing_ok=True)
        _check_same_run(out, identity)
        _recover_checkpoint(checkpoint)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the other processes read the checkpoint rank 0 has just put right

    rows = tokenized_rows(dataset, tokenizer, params.ctx_len, split=split, text_column=text_column)
    rows = _rows_for_run(rows, params, world, rank)
    exclude = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None})
    n_layers = int(model.config.num_hidden_layers)
    cfg = TrainConfig(
        TranscoderConfig(
            k=params.k,
            expansion_factor=params.expansion_factor,
            num_latents=params.num_latents,
            skip_connection=True,
        ),
        batch_size=params.batch_size,
        grad_acc_steps=params.grad_acc_steps,
        micro_acc_steps=params.micro_acc_steps,
        loss_fn="fvu",
        optimizer=params.optimizer,
        lr=params.lr,
        lr_warmup_steps=params.lr_warmup_steps,
        auxk_alpha=params.auxk_alpha,
        dead_feature_threshold=params.dead_feature_threshold,
        exclude_tokens=exclude,
        hookpoints=[f"layers.{i}.mlp" for i in range(n_layers)],
        init_seeds=[params.seed],
        save_every=params.save_every,
        log_to_wandb=False,
        run_name=RUN_NAME,
        save_dir=str(out / CHECKPOINT_DIR),
    )
    torch.manual_seed(params.seed)
    trainer = _checkpoint_trainer_class()(cfg, rows, model)
    if (checkpoint / "state.pt").is_file():
        trainer.load_state(str(checkpoint))
    start_step = trainer.global_step
    if rank == 0:
        atomic_write_text(
            out / TRAINING_FILE,
            json.dumps({"identity": identity, "complete": False}, indent=2) + "\n",
        )
    started = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - started
    steps = trainer.global_step
    tokens = steps * params.batch_size * params.ctx_len * world
    new_tokens = (steps - start_step) * params.batch_size * params.ctx_len * world
    config_path = out / CONFIG_FILE
    if rank == 0:
        # From the checkpoint, not the live modules: a schedule-free optimizer (signum) keeps
        # its training iterate in them and swaps in the averaged weights only to save.
        config_path = write_circuit_tracer_set(
            read_sparsify_set(str(checkpoint), checkpoint, scan=out.name),
            out,
            base_model=model_ref,
        )
        record = {
            "identity": identity,
            "complete": True,
            "tokens": tokens,
            "steps": steps,
            "rows_per_step": params.batch_size * world,
            "processes": world,
            "exclude_tokens": exclude,
            "last_run_seconds": round(seconds, 2),
            "last_run_tokens_per_second": round(new_tokens / seconds, 1) if seconds else None,
            # the same without the time spent writing checkpoints
            "last_run_steps_tokens_per_second": (
                round(new_tokens / (seconds - trainer.save_seconds), 1)
                if seconds > trainer.save_seconds
                else None
            ),
            "sparsify_version": _sparsify_version(),
            "device": str(torch_device),
        }
        atomic_write_text(out / TRAINING_FILE, json.dumps(record, indent=2) + "\n")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the set is written before any process reports
        dist.destroy_process_group()
    return TrainingResult(
        config_path=config_path,
        tokens=tokens,
        steps=steps,
        seconds=seconds,
        tokens_per_second=new_tokens / seconds if seconds and new_tokens else None,
        main_process=rank == 0,
    )


def _sparsify_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("eai-sparsify")
    except PackageNotFoundError:
        return None


def write_circuit_tracer_set(
    source: TranscoderSource, out: Path, *, base_model: str | None = None
) -> Path:
    """A resolved sparsify set (:func:`read_sparsify_set`, one k for all layers) as
    circuit-tracer's per-layer files and ``config.yaml``; each file is written whole or not
    at all, the config last. Returns the config's path."""
    import yaml
    from safetensors.torch import load_file, save_file

    ks = set(source.config["k"])
    if len(ks) != 1:
        raise ValueError(f"{source.ref}: layers differ in k ({sorted(ks)}); need one k")
    files = []
    for layer, path in enumerate(source.files):
        stored = load_file(str(path))
        state = {
            ours: stored[theirs].float().contiguous()
            for ours, theirs in SPARSIFY_TENSOR_NAMES.items()
            if theirs in stored
        }
        name = f"layer_{layer}.safetensors"
        with atomic_path(out / name) as tmp:
            save_file(state, str(tmp))
        files.append(name)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": MLP_INPUT_HOOK,
        "feature_output_hook": MLP_OUTPUT_HOOK,
        "activation": RELU_TOPK,
        "k": ks.pop(),
        "scan": source.config["scan"],
        "transcoders": files,
    }
    if base_model is not None:
        config["model_name"] = base_model
    path = out / CONFIG_FILE
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path
