"""What every benchmark shares: the common flags, timing, memory measurement, the time
budget, section records, the environment, and the one JSON record each run writes.

Nothing here knows what a benchmark measures. Importing it sets the offline switches (nothing
is downloaded) and puts the repository and the test suite's stand-ins on the import path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Offline before anything imports transformers or huggingface_hub.
for _switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_switch, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as em_circuits

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
MEASURED = BENCHMARKS / "measured"
for _path in (BENCHMARKS, REPO / "tests", REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import torch  # noqa: E402

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


# --- the common flags and the one JSON record of a run ----------------------------------

#: Fields every record written by :func:`write_record` has, whatever the benchmark. Records
#: measured before the harness lack some of them; ``tables.py`` reads those too.
RECORD_FIELDS = ("benchmark", "device", "date", "environment", "args", "smoke")


def add_common_options(
    parser: Any,
    *,
    dtype: str | None = "float32",
    dtype_choices: Sequence[str] | None = None,
    dtype_help: str = "model dtype",
    device_help: str = "torch device (default: cuda when there is one, else cpu)",
) -> None:
    """``--device``, ``--dtype`` (default ``dtype``), ``--out`` and ``--smoke``."""
    default_device = "cuda" if cuda() else "cpu"
    parser.add_argument("--device", default=default_device, help=device_help)
    parser.add_argument("--dtype", default=dtype, choices=dtype_choices, help=dtype_help)
    add_record_options(parser)


def add_record_options(parser: Any) -> None:
    """``--out`` and ``--smoke`` (for a parser that has its own ``--device``)."""
    parser.add_argument(
        "--out",
        type=Path,
        help="folder of the JSON record (default: $OUT when set, else benchmarks/measured; "
        "with --smoke, a temporary folder)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="shrink the workload to seconds on a CPU (checks the path; the numbers mean "
        "nothing and never go to benchmarks/measured unless --out says so)",
    )


def device_name(device: str | torch.device) -> str:
    """The device as records name it: the GPU's model name, or ``cpu``."""
    device = torch.device(device)
    if device.type == "cuda" and cuda():
        return torch.cuda.get_device_name(device)
    return device.type


def device_slug(name: str) -> str:
    """A record file's device part: ``NVIDIA H100 80GB HBM3`` -> ``h100``, ``cpu`` -> ``cpu``."""
    words = name.lower().replace("nvidia", " ").split()
    for word in words:  # the model number (h100, a100, l40s, ...), as the files are named
        if any(c.isdigit() for c in word) and word[0].isalpha() and "gb" not in word:
            return word
    return "-".join(words) or "unknown"


def out_dir(args: Any) -> Path:
    """Where this run's record goes (see ``--out``)."""
    if getattr(args, "out", None):
        return Path(args.out)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    if getattr(args, "smoke", False):
        import tempfile

        return Path(tempfile.gettempdir()) / "em-circuits-bench-smoke"
    return MEASURED


def record_path(args: Any, name: str, device: str, tag: str = "") -> Path:
    """``<out>/<name>-<device>[-<tag>][-smoke].json``: the names in benchmarks/measured."""
    parts = [name, device_slug(device_name(device)), tag, "smoke" if args.smoke else ""]
    return out_dir(args) / ("-".join(p for p in parts if p) + ".json")


def write_record(
    args: Any, name: str, results: dict[str, Any], *, device: str | None = None, tag: str = ""
) -> Path:
    """Write one run's record: :data:`RECORD_FIELDS`, then the benchmark's own results (which
    keep the fields the records measured before the harness have)."""
    device = device or args.device
    clash = sorted(set(results) & set(RECORD_FIELDS))
    if clash:
        raise ValueError(f"results may not set the record's own fields {clash}")
    record = {
        "benchmark": name,
        "device": device_name(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "environment": environment(),
        "args": vars(args),
        "smoke": bool(args.smoke),
        **results,
    }
    path = record_path(args, name, device, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    log(f"wrote {path}")
    return path
