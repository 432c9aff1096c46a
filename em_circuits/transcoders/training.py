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

The run's settings and identity are in :mod:`em_circuits.transcoders.training_run`, the text in
:mod:`em_circuits.transcoders.training_data`, the checkpoints and the written set in
:mod:`em_circuits.transcoders.sparsify_checkpoint`.

The BOS / EOS tokens sparsify puts at the start of every packed row (and between documents)
are left out of the loss: circuit-tracer zeroes position 0, and the attention-sink activations
there would dominate the fit.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from em_circuits.core.atomic import atomic_write_text
from em_circuits.models.spec import resolve_device, resolve_dtype, resolve_model_dir
from em_circuits.models.transcoder_formats import MLP_INPUT_HOOK, MLP_OUTPUT_HOOK, read_sparsify_set
from em_circuits.transcoders.sparsify_checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    RUN_NAME,
    checkpoint_trainer_class,
    recover_checkpoint,
    sparsify_version,
    write_circuit_tracer_set,
)
from em_circuits.transcoders.training_data import rows_for_run, tokenized_rows
from em_circuits.transcoders.training_run import (
    TRAINING_FILE,
    TrainingError,
    TrainingParams,
    check_same_run,
    run_identity,
)

if TYPE_CHECKING:
    import torch


# -- the run ------------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    """(world size, rank), with the process group set up when launched with several."""
    import torch  # noqa: PLC0415  # heavy: torch
    import torch.distributed as dist  # noqa: PLC0415  # heavy: torch

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

    from em_circuits.models.architectures import architecture_of, supported_architectures  # noqa: PLC0415  # heavy: loads torch

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


def _device_and_dtype(device: str | None, dtype: str, world: int) -> tuple[torch.device, Any]:
    """The device this process trains on (its own GPU under a launcher) and the dtype."""
    import torch  # noqa: PLC0415  # heavy: torch

    if world > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if torch_device.type != "cuda" and torch_dtype != torch.float32:
        # sparsify casts the activations to its float32 weights only under CUDA autocast
        raise TrainingError(f"--dtype {dtype} trains on CUDA only; on {torch_device} use float32")
    return torch_device, torch_dtype


def _prepare_out(
    out: Path, identity: dict[str, Any], *, restart: bool, rank: int, world: int
) -> None:
    """Rank 0 makes ``out``, discards an old run on ``restart``, refuses a folder holding a run
    with other settings and puts right a checkpoint swap a kill interrupted; the other
    processes wait for it."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if restart:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
            (out / TRAINING_FILE).unlink(missing_ok=True)
        check_same_run(out, identity)
        recover_checkpoint(out / CHECKPOINT_DIR / RUN_NAME)
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415  # heavy: torch

        dist.barrier()  # the other processes read the checkpoint rank 0 has just put right


def _train_config(params: TrainingParams, out: Path, n_layers: int, exclude: list[int]) -> Any:
    """sparsify's TrainConfig: skip-transcoders with an FVU loss on every layer's MLP."""
    from sparsify import TrainConfig, TranscoderConfig

    return TrainConfig(
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


def _complete_record(
    identity: dict[str, Any],
    *,
    tokens: int,
    steps: int,
    params: TrainingParams,
    world: int,
    exclude: list[int],
    seconds: float,
    new_tokens: int,
    save_seconds: float,
    device: torch.device,
) -> dict[str, Any]:
    """``training.json`` of a finished run: what it trained on, and this invocation's speed."""
    return {
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
            round(new_tokens / (seconds - save_seconds), 1) if seconds > save_seconds else None
        ),
        "sparsify_version": sparsify_version(),
        "device": str(device),
    }


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
    import sparsify  # noqa: F401  (not installed: fail before anything is read or written)
    import torch  # noqa: PLC0415  # heavy: torch
    from transformers import AutoModel, AutoTokenizer

    world, rank = _distributed()
    torch_device, torch_dtype = _device_and_dtype(device, dtype, world)
    model_dir = resolve_model_dir(model_ref, revision, "base model")
    check_trainable(model_dir)  # before any text is read or anything is written
    # fvu loss reads MLP inputs and outputs only: the bare model, no LM head.
    model = AutoModel.from_pretrained(str(model_dir), dtype=torch_dtype).to(torch_device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    name = dataset_name or (dataset if isinstance(dataset, str) else "a datasets.Dataset")
    identity = run_identity(model_ref, model, name, params)

    out = Path(out)
    checkpoint = out / CHECKPOINT_DIR / RUN_NAME
    _prepare_out(out, identity, restart=restart, rank=rank, world=world)

    rows = tokenized_rows(dataset, tokenizer, params.ctx_len, split=split, text_column=text_column)
    rows = rows_for_run(rows, params, world, rank)
    exclude = sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None})
    cfg = _train_config(params, out, int(model.config.num_hidden_layers), exclude)
    torch.manual_seed(params.seed)
    trainer = checkpoint_trainer_class()(cfg, rows, model)
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
        record = _complete_record(
            identity,
            tokens=tokens,
            steps=steps,
            params=params,
            world=world,
            exclude=exclude,
            seconds=seconds,
            new_tokens=new_tokens,
            save_seconds=trainer.save_seconds,
            device=torch_device,
        )
        atomic_write_text(out / TRAINING_FILE, json.dumps(record, indent=2) + "\n")
    if world > 1:
        import torch.distributed as dist  # noqa: PLC0415  # heavy: torch

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
