"""Several processes under ``accelerate launch``: which prompts are mine, and barriers.

The model stages (logits, graphs) give each process every ``count``-th prompt; each writes
its own per-prompt artifacts atomically, so the files are those of a single-process run and a
re-launch skips whatever any process finished. The judge, the queue, the analysis and the
report stay on the main process. Without a launcher everything is one process and the
barriers do nothing.

On GPUs accelerate's ``PartialState`` sets up the process group (NCCL). Launched on CPUs
(``accelerate launch --multi_gpu`` on a machine without GPUs runs torchrun, whose environment
accelerate's CPU path ignores unless MPI is installed), a gloo group is set up from the same
environment variables.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# The main process may spend hours alone (judge calls, labeling) while the others wait.
BARRIER_TIMEOUT = dt.timedelta(hours=12)


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    local_index: int

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """Every ``count``-th item starting at ``index``: disjoint, and together all items."""
        return list(items[self.index :: self.count])

    def wait(self) -> None:
        """Block until every process arrives (no-op for a single process)."""
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier()


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_shard() -> Shard:
    """This process's place among the launched processes."""
    if world_size() <= 1:
        return Shard(0, 1, 0)
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        from accelerate import PartialState
        from accelerate.utils import InitProcessGroupKwargs

        state = PartialState(**InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT).to_kwargs())
        return Shard(state.process_index, state.num_processes, state.local_process_index)
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
