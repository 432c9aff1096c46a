"""Timing, memory measurement, the time budget, section records and the environment.

Nothing here knows what a section measures: the sections and the report build on it.
"""

from __future__ import annotations

import gc
import importlib.metadata
import math
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

GIB = float(1 << 30)
RESERVE_S = 10.0  # kept for writing the report

T = TypeVar("T")


def log(message: str) -> None:
    print(message, flush=True)


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def weights_gib(*modules: Any) -> float:
    """Bytes of the distinct parameters of the given modules (shared ones counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if p.device.type == "meta" or p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total / GIB


@dataclass
class Measured:
    """Wall time of one synchronised call and the GPU memory it used (None on CPU)."""

    seconds: float
    peak_gib: float | None = None  # peak allocated during the call, everything resident included
    working_gib: float | None = None  # that peak minus what was allocated before the call


# measure() resets CUDA's peak counter before each call, so the highest peak a section saw
# would be lost without this: bytes, since the running section started.
_section_peak_bytes = 0


def measure(fn: Callable[[], T]) -> tuple[T, Measured]:
    """Run ``fn`` synchronised: its result, its time, and its peak memory."""
    global _section_peak_bytes
    sync()
    before = torch.cuda.memory_allocated() if cuda() else 0
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    sync()
    seconds = time.perf_counter() - start
    if not cuda():
        return out, Measured(seconds)
    peak = torch.cuda.max_memory_allocated()
    _section_peak_bytes = max(_section_peak_bytes, peak)
    return out, Measured(seconds, peak / GIB, (peak - before) / GIB)


class Skip(Exception):
    """A section cannot run (a prerequisite is missing); it is marked, not failed."""


class Budget:
    """The global ``--max-seconds``, less what writing the report needs."""

    def __init__(self, max_seconds: float) -> None:
        self.max_seconds = max_seconds
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.max_seconds - self.elapsed() - RESERVE_S

    def allows(self, seconds: float, what: str, notes: list[str]) -> bool:
        """Whether ``seconds`` more fit; if not, a note says where a loop stopped early."""
        if self.left() >= seconds:
            return True
        notes.append(f"{what}: stopped early, budget ({self.left():.0f} s left)")
        log(f"   {notes[-1]}")
        return False


@dataclass
class Estimates:
    """Current guesses of one graph's and one model load's wall time, in seconds.

    They decide whether a section or one more prompt fits the budget; sections refine them
    with what they measure.
    """

    graph_s: float
    load_s: float

    @classmethod
    def initial(cls, gpu_sized: bool) -> Estimates:
        return cls(graph_s=5.0, load_s=40.0) if gpu_sized else cls(graph_s=2.0, load_s=5.0)


@dataclass
class SectionRecord:
    """How a section went: the "sections" of results.json and the report's Sections table."""

    title: str
    estimate_s: float
    status: str = ""
    seconds: float | None = None
    section_peak_gib: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "title": self.title,
            "estimate_s": self.estimate_s,
            "status": self.status,
        }
        if self.seconds is not None:
            out["seconds"] = self.seconds
        if self.section_peak_gib is not None:
            out["section_peak_gib"] = self.section_peak_gib
        return out


class SectionRunner:
    """Runs sections in turn within the budget; one section's failure does not stop the rest."""

    def __init__(self, budget: Budget, skip: set[str]) -> None:
        self.budget = budget
        self.skip = skip
        self.records: dict[str, SectionRecord] = {}

    def run(
        self, key: str, title: str, estimate: Callable[[], float], fn: Callable[[], T]
    ) -> T | None:
        """``fn``'s result, or None when the section was skipped, did not fit or failed."""
        global _section_peak_bytes
        need = estimate()
        record = SectionRecord(title, round(need, 1))
        self.records[key] = record
        left = self.budget.left
        if key in self.skip:
            record.status = "not run: --skip"
            log(f"\n== {title}: not run (--skip)")
            return None
        if left() < need:
            record.status = f"not run: budget ({left():.0f} s left, needs ~{need:.0f} s)"
            log(f"\n== {title}: {record.status}")
            return None
        log(
            f"\n== [{self.budget.elapsed():6.1f} s] {title} (budget left {left():.0f} s, "
            f"estimate {need:.0f} s)"
        )
        if cuda():
            torch.cuda.reset_peak_memory_stats()
            _section_peak_bytes = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = None
        try:
            result = fn()
            record.status = "ok"
        except Skip as why:
            record.status = f"not run: {why}"
        except Exception as err:  # one section's failure must not lose the others
            traceback.print_exc()
            record.status = f"failed: {type(err).__name__}: {str(err)[:300]}"
        record.seconds = round(time.perf_counter() - start, 2)
        if cuda():
            peak = max(_section_peak_bytes, torch.cuda.max_memory_allocated())
            record.section_peak_gib = round(peak / GIB, 2)
        log(f"   {record.status} after {record.seconds:.1f} s")
        return result

    def failed(self) -> list[str]:
        return [k for k, r in self.records.items() if r.status.startswith("failed")]

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {key: record.to_json() for key, record in self.records.items()}


def environment() -> dict[str, Any]:
    """The device, software versions, command line and date the report is headed with."""

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "device": (
            torch.cuda.get_device_name(0)
            if cuda()
            else f"cpu ({platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads)"
        ),
        "gpu_memory_gib": (
            torch.cuda.get_device_properties(0).total_memory / GIB if cuda() else None
        ),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "versions": {
            n: version(n)
            for n in ("torch", "circuit-tracer", "nnsight", "transformers", "peft", "safetensors")
        },
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
