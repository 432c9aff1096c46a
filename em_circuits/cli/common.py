"""Command-line pieces every stage script shares: results dir, model flags, logging."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from em_circuits.cli.command_line import (  # noqa: F401  (next_command, ...: re-exported)
    DEFAULT_RESULTS,
    add_lock_args,
    carried_flags,
    current_command,
    next_command,
    resume_hint,
    set_current_command,
    stage_lock_for,
)
from em_circuits.cli.library_noise import quiet_library_notices
from em_circuits.core.atomic import remove_orphaned_temporaries
from em_circuits.core.store import ResultsStore
from em_circuits.models.spec import ModelSpec


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default (when it has one) and keeps the description's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # a --no-X flag's default is the feature on; a help text may state its own default
        if (
            action.default in (None, False, [], argparse.SUPPRESS)
            or isinstance(action, argparse._StoreFalseAction)
            or "default" in (action.help or "")
        ):
            return action.help or ""
        return super()._get_help_string(action) or ""


def make_parser(description: str | None, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--results-dir",
        default=DEFAULT_RESULTS,
        help="root of the results store (layout: results/README.md)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "models", "default: the embedded toy organism (built offline on first use)"
    )
    group.add_argument(
        "--base-model",
        help="base model: HF id (e.g. meta-llama/Llama-3.2-1B-Instruct) or local directory "
        "(default: the toy organism's base)",
    )
    group.add_argument("--base-revision", help="HF revision (branch, tag or commit) of the base")
    group.add_argument(
        "--adapter",
        help="LoRA adapter: HF id (e.g. a ModelOrganismsForEM adapter) or local PEFT directory "
        "(default: the toy organism's adapter)",
    )
    group.add_argument("--adapter-revision", help="HF revision of the adapter")
    group.add_argument(
        "--transcoders",
        help="transcoder set: circuit-tracer preset (llama, gemma), HF reference, a local "
        "config.yaml / directory containing one, or an EleutherAI sparsify folder (one "
        "layers.N.mlp/ per layer) (default: the toy organism's transcoders)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = bfloat16 on CUDA, float32 on CPU",
    )
    group.add_argument(
        "--device",
        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)",
    )
    group.add_argument("--model-name", help="readable name used in result folder names")
    group.add_argument(
        "--allow-adapter-base-mismatch",
        action="store_true",
        help="merge even if the adapter declares another base model",
    )
    group.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        help="feed chat prompts as the plain 'User: ...\nAssistant: ...' transcript even when "
        "the tokenizer has a chat template (default: apply it, as for instruct models)",
    )


def specs_from_args(args: argparse.Namespace) -> tuple[ModelSpec, ModelSpec]:
    """(base spec, adapted spec); any model flag left out falls back to the toy organism."""
    base, adapter, transcoders = args.base_model, args.adapter, args.transcoders
    name = args.model_name
    if base is None or adapter is None or transcoders is None:
        if base is not None and (adapter is None or transcoders is None):
            sys.exit(
                "error: with --base-model, also give --adapter and --transcoders "
                "(for Llama-3.2-1B: --transcoders llama)"
            )
        from em_circuits.organism import ensure_default_organism

        organism = ensure_default_organism(progress=True)
        base = base or str(organism.base_dir)
        other = adapter is not None and Path(adapter).resolve() != organism.adapter_dir.resolve()
        if other and base is None and not name:
            name = f"toy-em-organism-{Path(adapter).name}"  # e.g. its adapter-rank1
        adapter = adapter or str(organism.adapter_dir)
        transcoders = transcoders or str(organism.transcoder_config)
        name = name or "toy-em-organism"
    from em_circuits.models.spec import check_local_model_dir

    # Checked before any stage runs: a wrong folder would otherwise surface only when the
    # model is first loaded, after the prompts stage, as an error from inside transformers.
    for ref, what in ((base, "base model"), (adapter, "adapter")):
        if os.path.isdir(ref):
            check_local_model_dir(Path(ref), what)
    adapted = ModelSpec(
        base=base,
        adapter=adapter,
        transcoders=transcoders,
        base_revision=args.base_revision,
        adapter_revision=args.adapter_revision,
        dtype=args.dtype,
        name=name,
        allow_base_mismatch=args.allow_adapter_base_mismatch,
        chat_template=args.chat_template,
    )
    return adapted.base_only(), adapted


def setup(args: argparse.Namespace) -> ResultsStore:
    """Logging, offline-friendly environment, and the results store."""
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in (
        "httpx",
        "httpcore",
        "httpx2",
        "httpcore2",
        "urllib3",
        "openai",
        "filelock",
        "nnsight",
        "circuit_tracer",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_library_notices()
    root = Path(args.results_dir)
    root.mkdir(parents=True, exist_ok=True)
    removed = remove_orphaned_temporaries(root)
    if removed:
        logging.getLogger("store").info(
            "removed %d temporary files or folders of killed runs", removed
        )
    from em_circuits.core.claims import remove_stale_claims

    released = remove_stale_claims(root)
    if released:
        logging.getLogger("store").info("released %d claims of killed runs", released)
    return ResultsStore(root)


def add_llm_args(parser: argparse.ArgumentParser) -> None:
    """The LLM flags (:class:`~em_circuits.core.llm_settings.LLMSettings`), the same in every
    command that talks to an LLM."""
    from em_circuits.core.llm_settings import LLMSettings
    from em_circuits.core.options import add_flags

    add_flags(
        parser.add_argument_group(
            "LLM", "the generator, the judges and the feature labels (any OpenAI-compatible API)"
        ),
        LLMSettings,
    )


def llm_settings(args: argparse.Namespace) -> Any:
    """The :class:`~em_circuits.core.llm_settings.LLMSettings` the LLM flags give."""
    from em_circuits.core.llm_settings import LLMSettings
    from em_circuits.core.options import from_args

    return from_args(LLMSettings, args)


def add_graph_args(parser: argparse.ArgumentParser) -> None:
    """Attribution flags, shared by `graphs` and `run`: generated from
    :class:`~em_circuits.attribution.targets.AttributionParams`, plus the full-graph choice."""
    from em_circuits.attribution.targets import AttributionParams
    from em_circuits.core.options import add_flags

    g = parser.add_argument_group("attribution graphs")
    add_flags(g, AttributionParams)
    g.add_argument(
        "--full-graphs",
        nargs="+",
        default=[str(DEFAULT_FULL_GRAPHS)],
        metavar="N|ID",
        help="prompts that also get a full graph for the viewer, in totals mode: a number N "
        "(the N prompts whose contrast the adapter moves most towards evil) and/or prompt ids; "
        f"'none' for none (default: {DEFAULT_FULL_GRAPHS}). Run again with an id to add one",
    )


#: Full graphs that the main job and `graphs` make by default, so the viewer has graphs to show.
DEFAULT_FULL_GRAPHS = 3


def full_graph_choice(args: argparse.Namespace):
    """``--full-graphs`` as a FullGraphChoice: numbers set the top N, other words are ids."""
    from em_circuits.attribution.targets import FullGraphChoice

    top, ids = 0, []
    for word in args.full_graphs:
        word = word.strip()
        if word.lower() == "none":
            continue
        if word.isdigit():
            top = max(top, int(word))
        elif word:
            ids.append(word)
    return FullGraphChoice(prompt_ids=tuple(ids), top=top)


def graph_params(args: argparse.Namespace) -> Any:
    """The :class:`~em_circuits.attribution.targets.AttributionParams` the flags give."""
    from em_circuits.attribution.targets import AttributionParams
    from em_circuits.core.options import from_args

    return from_args(AttributionParams, args)


def add_analysis_args(parser: argparse.ArgumentParser) -> None:
    """Feature-analysis flags, shared by `analyze` and `run`: generated from the parameters
    of the analysis's steps (:mod:`em_circuits.run.steps`), so each default exists once."""
    from em_circuits.core.options import add_flags
    from em_circuits.run.steps import params_classes

    group = parser.add_argument_group("feature analysis")
    seen: set[str] = set()
    for cls in params_classes():
        add_flags(group, cls, seen)
    group.add_argument(
        "--analysis-name",
        default="main",
        help="folder of this analysis under analysis/<model>/runs/; another name keeps "
        "another parameter set's results beside it",
    )


def analysis_params(args: argparse.Namespace) -> Any:
    """The :class:`~em_circuits.run.steps.AnalysisParams` the analysis flags give."""
    from em_circuits.analysis.steps.base import SharedParams
    from em_circuits.core.options import from_args
    from em_circuits.run.steps import STEPS, AnalysisParams

    return AnalysisParams(
        from_args(SharedParams, args), {s.name: from_args(s.Params, args) for s in STEPS}
    )


def adapted_slug_from_args(args: argparse.Namespace) -> str:
    """The results folder name of the adapted model the flags describe."""
    from em_circuits.models.spec import fingerprint, model_slug, resolve_device

    _, adapted = specs_from_args(args)
    return model_slug(adapted, fingerprint(adapted, resolve_device(args.device)))


#: Errors a user can fix: printed as one line naming the file or flag (traceback with -v).
def user_error_types() -> tuple[type[BaseException], ...]:
    from em_circuits.attribution.viewer_metadata import ViewerError
    from em_circuits.core.distributed import PeerFailedError
    from em_circuits.core.labeling_records import QueueError
    from em_circuits.core.llm_errors import LLMError
    from em_circuits.core.prompt_records import PromptError
    from em_circuits.core.stage_lock import StageBusyError
    from em_circuits.core.store import ArtifactError
    from em_circuits.labeling.judge import JudgeError
    from em_circuits.models.spec import ModelLoadError

    return (
        StageBusyError,
        ViewerError,
        PeerFailedError,
        ArtifactError,
        ModelLoadError,
        LLMError,
        QueueError,
        JudgeError,
        PromptError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )


def run_command(
    main: Callable[..., int], argv: list[str] | None = None, prog: str | None = None
) -> int:
    """Run a command's ``main``; user errors become one line, Ctrl-C a clean exit.

    Finished artifacts are already on disk (every write is atomic), so both messages can say
    that a re-run continues where this one stopped.
    """
    args = sys.argv[1:] if argv is None else argv
    verbose = "-v" in args or "--verbose" in args
    from em_circuits.core.distributed import report_failure_to_peers

    set_current_command([*(prog or "em-circuits").split(), *args])

    try:
        return main(args, prog)
    except KeyboardInterrupt:
        report_failure_to_peers("interrupted")
        print(
            "\ninterrupted: finished work is stored; run the same command to continue",
            file=sys.stderr,
        )
        return 130
    except Exception as err:
        from em_circuits.core.atomic import is_storage_error

        if verbose or not (isinstance(err, user_error_types()) or is_storage_error(err)):
            raise  # sys.excepthook tells the other processes of a launch
        report_failure_to_peers(f"{type(err).__name__}: {err}")
        print(f"error: {err}{resume_hint(err)}", file=sys.stderr)
        return 2


def add_prompt_args(parser: argparse.ArgumentParser) -> None:
    """Prompt selection, named the same in every stage."""
    g = parser.add_argument_group("which prompts")
    g.add_argument(
        "--prompt-ids",
        nargs="+",
        metavar="ID",
        default=[],
        help="only these stored prompt ids (default: all)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="an ad-hoc prompt (repeatable; \\n and \\t are read as a newline and a tab); it "
        "is stored like any other and selected, and graphed whatever the judge says "
        "(targets: graphs --evil/--safe, else the judge's labels)",
    )


def chosen_prompt_ids(args: argparse.Namespace) -> list[str] | None:
    """The ids --prompt-ids and --prompt select, or None for all prompts."""
    from em_circuits.core.prompt_records import adhoc_prompt_id

    ids = [*args.prompt_ids, *(adhoc_prompt_id(text) for text in args.prompt)]
    return ids or None
