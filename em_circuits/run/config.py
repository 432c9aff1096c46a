"""What ``em-circuits run`` does, as one dataclass: its option fields carry the run's own flags
(kept apart from the pipeline, which imports torch, so ``run --help`` needs none)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from em_circuits.attribution.targets import AttributionParams, FullGraphChoice
from em_circuits.core.llm_settings import LLMSettings
from em_circuits.core.options import option
from em_circuits.run.steps import AnalysisParams


@dataclass
class PipelineConfig:
    """Everything ``em-circuits run`` does; the option fields carry the run's own flags."""

    n_prompts: int = option(40, "generate prompts until this many are stored")
    prompt_files: tuple[Path, ...] = option(
        (),
        "import a prompt file (prior-art format: list or object with name, prompt); repeatable",
        flag="--prompts",
        metavar="FILE",
        repeat=True,
    )
    generator: str = option(
        "auto",
        "auto = llm if OPENAI_API_KEY is set (env or .env), else offline",
        choices=("auto", "offline", "llm"),
    )
    judge: str = option(
        "auto",
        "auto = llm if OPENAI_API_KEY is set, else the organism's word lists",
        choices=("auto", "offline", "llm"),
    )
    #: the LLM of the generator, the judges and the feature labels
    llm: LLMSettings = field(default_factory=LLMSettings)
    labels: str = option(
        "auto",
        "auto: accept the judge's labels, recorded as judge-made; interactive: label in the "
        "terminal; import: read --labels-file",
        choices=("auto", "interactive", "import"),
    )
    labels_file: Path | None = option(None, "CSV/JSONL labels for --labels import")
    only_evil: bool = option(
        True,
        "graph every labeled prompt, not only those with evil tokens",
        negative_flag="--all-labeled",
    )
    graph: AttributionParams = field(default_factory=AttributionParams)
    #: Prompts that also get a full graph for the viewer (totals mode).
    full_graphs: FullGraphChoice = field(default_factory=lambda: FullGraphChoice(top=3))
    words: Path | None = option(
        None,
        "offline judge word lists (JSON with 'harmful' and 'safe' lists; needed for models "
        "other than the toy organism unless the LLM judge is used)",
    )
    analysis: AnalysisParams = field(default_factory=AnalysisParams.of)
    #: the analysis folder's name under analysis/<model>/runs/
    analysis_name: str = "main"
    device: str | None = None
    seed: int = 0
    progress: bool = True
    #: The run's start (``time.monotonic``), from which --run-deadline counts; None: when
    #: run_pipeline starts.
    started: float | None = None
    #: Wait for another run holding a stage's lock on the results directory (then reuse its
    #: work); False: stop with StageBusyError (--no-wait).
    wait: bool = True
    #: This run's command line, recorded in the stage locks it holds (said to waiters).
    command: str = "em-circuits run"
