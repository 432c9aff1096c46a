"""A step's work spread over the processes of a launch, merged back in its order.

A step that declares itself ``spread`` (:attr:`~em_circuits.analysis.steps.base.Step.spread`)
runs on every process. Its heavy part is a list of units (a prompt's ablations, a condition's
answers) that :func:`spread` hands out by claiming, costliest first
(:meth:`~em_circuits.core.distributed.Shard.claim`): each process computes the units it
claims and writes each result atomically to ``.work/<step>/`` in the analysis folder; after a
barrier every process reads all the results back in the units' order. A relaunch after a
crash finds the finished units there and computes only the others; the main process deletes
the folder once the step's tables are written. Alone, a process computes every unit in order
and writes nothing.

A unit's result is JSON (rows as dicts of plain numbers and strings), and goes through JSON
alone too, so one process and several merge exactly the same values.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from em_circuits.core.atomic import atomic_write_text
from em_circuits.core.cache import cache_key
from em_circuits.core.distributed import Shard

log = logging.getLogger(__name__)
U = TypeVar("U")

#: The analysis folder's subfolder of spread steps' finished units (a dot: never a table).
WORK_DIR = ".work"


def spread(
    shard: Shard,
    folder: Path,
    units: Sequence[U],
    compute: Callable[[U], Any],
    *,
    cost: Callable[[U], float],
    key: Callable[[U], str],
) -> list[Any]:
    """Every unit's result (``compute(unit)``, JSON), in the order of ``units``, on every
    process; each unit computed by one process (see the module's docstring). ``key`` names a
    unit by everything its result depends on beyond the step's own key (distinct units,
    distinct keys): a stored result of the same key is reused after a relaunch."""
    if shard.count <= 1:
        return [json.loads(json.dumps(compute(unit))) for unit in units]
    keys = [key(unit) for unit in units]
    if len(set(keys)) != len(keys):
        raise ValueError(f"spread units need distinct keys: {len(keys) - len(set(keys))} repeat")
    paths = [folder / f"{cache_key({'unit': k})}.json" for k in keys]
    folder.mkdir(parents=True, exist_ok=True)
    mine = 0
    for index, unit in shard.claim(units, [cost(unit) for unit in units]):
        if not paths[index].is_file():  # not finished before a relaunch
            result = {"key": keys[index], "result": compute(unit)}
            atomic_write_text(paths[index], json.dumps(result))
            mine += 1
    where = f"{folder.parent.name}/{folder.name}"  # step/spread-key
    log.info("process %d: %s, %d of %d units computed", shard.index, where, mine, len(units))
    shard.wait()
    return [json.loads(path.read_text(encoding="utf-8"))["result"] for path in paths]


class Spreader(Protocol):
    """Where a step's units are computed: :meth:`AnalysisContext.spread
    <em_circuits.analysis.steps.context.AnalysisContext.spread>` (shared among the processes of
    a launch) or :func:`alone` (this process, every unit). ``name`` tells a step's spreads
    apart; see :func:`spread` for the rest."""

    def __call__(
        self,
        name: str,
        units: Sequence[U],
        compute: Callable[[U], Any],
        *,
        cost: Callable[[U], float],
        key: Callable[[U], str],
    ) -> list[Any]: ...


def alone(
    name: str,
    units: Sequence[U],
    compute: Callable[[U], Any],
    *,
    cost: Callable[[U], float],
    key: Callable[[U], str],
) -> list[Any]:
    """Every unit computed here, in order, its result through JSON as a spread's (a
    :class:`Spreader` outside a launch, e.g. from Python)."""
    return [json.loads(json.dumps(compute(unit))) for unit in units]


def work_folder(directory: Path, step: str, step_key: str, name: str) -> Path:
    """Where one spread of a step keeps its finished units."""
    return directory / WORK_DIR / step / f"{name}-{step_key[:16]}"


def remove_work(directory: Path, step: str) -> None:
    """Delete a finished step's units (and the work folder once it is empty)."""
    shutil.rmtree(directory / WORK_DIR / step, ignore_errors=True)
    try:
        (directory / WORK_DIR).rmdir()
    except OSError:
        pass  # absent, or another step's units still there
