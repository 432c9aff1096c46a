"""Generate or import pivotal prompts into results/prompts/.

A pivotal prompt stops right before the word that decides between a safe and a harmful
continuation. Sources:

  offline  composes prompts from the toy organism's held-out scenario templates (no network;
           the default when no API key is set). Each is marked origin.kind = offline-template.
  llm      asks an OpenAI-compatible model (default o3) for new prompts, one call each, showing
           it earlier prompts with their verdicts and human feedback from labels/ within a
           token budget. Point --base-url (or OPENAI_BASE_URL) at vLLM, Ollama or a proxy.
           The key is read from OPENAI_API_KEY in the environment or a .env file and is never
           written to results or logs.
  --import FILE  adds prompts from JSON files: a list of objects (or one object) with "name"
           and "prompt", optionally "category", "reasoning", "domain", "format".

Exact and near duplicates (normalized-text hash, character 3-gram Jaccard >= threshold) of any
stored prompt are dropped. Every prompt is saved the moment it is ready, so prompts made before
an error stay stored.

Examples:
  em-circuits prompts -n 20                      # offline
  em-circuits prompts --import my_prompts.json
  OPENAI_API_KEY=... em-circuits prompts --generator llm -n 5 \\
      --format chat --chat-template --tokenizer meta-llama/Llama-3.2-1B-Instruct
  em-circuits prompts --generator llm --llm-model qwen2.5 \\
      --base-url http://localhost:11434/v1                                     # Ollama
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from em_circuits.cli.common import (
    add_llm_args,
    add_lock_args,
    llm_settings,
    make_parser,
    next_command,
    resume_hint,
    setup,
    stage_lock_for,
)
from em_circuits.core.llm_errors import LLMError
from em_circuits.core.prompt_records import FORMATS, PromptError
from em_circuits.core.store import ResultsStore
from em_circuits.models.spec import ModelLoadError
from em_circuits.prompts.context import approx_tokens
from em_circuits.prompts.dedup import DEFAULT_DEDUP_THRESHOLD, Deduper, SaveSummary
from em_circuits.prompts.generator import describe, generate_llm_prompts
from em_circuits.prompts.sources import (
    DEFAULT_MAX_PROMPT_TOKENS,
    generate_offline_prompts,
    import_prompts,
)

log = logging.getLogger("generate_pivotal_prompts")

DOMAINS_HELP = "medical finance home_safety relationships computer_security"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = make_parser(__doc__, prog)
    parser.add_argument(
        "--generator",
        choices=["auto", "offline", "llm"],
        default="auto",
        help="where new prompts come from; auto = llm if OPENAI_API_KEY is set (environment "
        "or .env), else offline",
    )
    parser.add_argument(
        "-n",
        "--n",
        type=int,
        default=None,
        help="how many new prompts to generate (default: 10, or 0 when --import is given); "
        "prompts another run stores meanwhile (one this run waited for) count too",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="chat",
        help="raw text, chat (User/Assistant) or cot (chain of thought); the "
        "offline generator makes chat prompts only",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="FILE",
        help="import prompts from a JSON file (repeatable)",
    )
    parser.add_argument(
        "--import-format",
        choices=FORMATS,
        default="raw",
        help="format of imported entries that name none ('format' or the prior "
        "art's 'prompt_type' field)",
    )
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="render chat prompts with --tokenizer's chat template (recorded in "
        "each prompt record); without it chat prompts are plain "
        "'User: ...\\nAssistant: ...' text",
    )
    parser.add_argument(
        "--tokenizer",
        help="HF id or local directory of the tokenizer for "
        "--chat-template and for counting context tokens (usually your base "
        "model); default: context tokens are approximated as characters/4",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=DEFAULT_MAX_PROMPT_TOKENS,
        help="warn at import about a prompt longer than this many tokens (counted with "
        "--tokenizer, else about 4 characters a token); a prompt longer than the "
        "--tokenizer model's context is refused",
    )
    parser.add_argument(
        "--dedup-threshold",
        type=float,
        default=DEFAULT_DEDUP_THRESHOLD,
        help="drop a prompt whose character 3-gram Jaccard similarity to any "
        "stored prompt is at least this",
    )

    add_llm_args(parser)
    add_lock_args(parser)
    parser.add_argument(
        "--context-tokens",
        type=int,
        default=4000,
        help="token budget for earlier prompts, verdicts and human feedback shown "
        "to the LLM generator (disagreements and rejections first, then newest)",
    )

    off = parser.add_argument_group("offline generator")
    off.add_argument("--seed", type=int, default=0, help="shuffles the template combinations")
    off.add_argument(
        "--split",
        choices=["heldout", "train"],
        default="heldout",
        help="which of the organism's scenario/template splits to compose from",
    )
    off.add_argument(
        "--domains",
        nargs="+",
        metavar="DOMAIN",
        help=f"restrict to these domains (default: all: {DOMAINS_HELP})",
    )
    return parser


def load_tokenizer(ref: str) -> Any:
    from transformers import AutoTokenizer

    from em_circuits.models.spec import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(ref, what="tokenizer")))


def model_context(ref: str, tokenizer: Any) -> tuple[Any, int] | None:
    """(tokenizer, positions) of the model in ``ref`` when its config says how many
    positions it has (a tokenizer-only folder does not)."""
    from transformers import AutoConfig

    from em_circuits.models.spec import resolve_model_dir

    try:
        config = AutoConfig.from_pretrained(str(resolve_model_dir(ref, what="tokenizer")))
    except (OSError, ValueError):
        return None
    positions = getattr(config, "max_position_embeddings", None)
    return (tokenizer, int(positions)) if positions else None


def choose_generator(args: argparse.Namespace) -> str:
    if args.generator != "auto":
        return args.generator
    return "llm" if llm_settings(args).wants_llm("auto") else "offline"


def run(args: argparse.Namespace, summary: SaveSummary) -> None:
    """Import, then generate, recording every stored prompt in ``summary`` as it goes, so
    the caller can report what was kept even when an error stops the run."""
    store = setup(args)
    for noisy in ("httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.chat_template and not args.tokenizer:
        raise PromptError("--chat-template needs --tokenizer (the base model's HF id or folder)")
    with stage_lock_for(args, store.root, "prompts"):
        # Prompts another run stored since this command started (while it waited for the
        # lock) count towards -n: two identical commands started together store n, not 2n.
        by_others = max(0, len(store.prompt_ids()) - args.stored_at_start)
        if by_others:
            log.info(
                "%d prompt(s) stored by the run this one waited for count towards -n", by_others
            )
        _run_locked(args, store, summary, by_others)


def _run_locked(
    args: argparse.Namespace, store: ResultsStore, summary: SaveSummary, by_others: int
) -> None:
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    template_tok = tokenizer if args.chat_template else None
    deduper = Deduper.from_store(store, args.dedup_threshold)
    context = model_context(args.tokenizer, tokenizer) if tokenizer is not None else None
    for path in args.imports:
        summary.merge(
            import_prompts(
                store,
                path,
                deduper,
                default_fmt=args.import_format,
                tokenizer=template_tok,
                context=context,
                max_tokens=args.max_prompt_tokens,
            )
        )
    n = (args.n if args.n is not None else (0 if args.imports else 10)) - by_others
    if n <= 0:
        return
    generator = choose_generator(args)
    if generator == "offline":
        log.info("offline generator: composing from the toy organism's %s templates", args.split)
        summary.merge(
            generate_offline_prompts(
                store,
                n,
                deduper,
                seed=args.seed,
                split=args.split,
                domains=args.domains,
                fmt=args.format,
                tokenizer=template_tok,
            )
        )
        return
    client = llm_settings(args).client(args.started)
    log.info("llm generator: %s at %s", client.model, client.endpoint)
    count = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else approx_tokens
    generate_llm_prompts(
        client,
        store,
        n,
        deduper,
        fmt=args.format,
        context_tokens=args.context_tokens,
        tokenizer=template_tok,
        count_tokens=count,
        summary=summary,
    )


def report(summary: SaveSummary) -> None:
    """What this run stored and dropped."""
    print(f"saved {len(summary.saved)} new prompt(s)")
    for record in summary.saved:
        print(f"  {describe(record)}")
    if summary.duplicates:
        print(f"dropped {len(summary.duplicates)} duplicate(s)")
        for dup in summary.duplicates:
            print(f"  {dup['name']}: {dup['why']} of {dup['duplicate_of']}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    args.started = time.monotonic()  # --run-deadline counts from here
    args.stored_at_start = len(ResultsStore(args.results_dir).prompt_ids())
    summary = SaveSummary()
    try:
        run(args, summary)
    except (LLMError, PromptError, ModelLoadError) as err:
        report(summary)
        kept = f" ({len(summary.saved)} prompt(s) saved before it are kept)"
        print(f"error: {err}{kept if summary.saved else ''}{resume_hint(err)}", file=sys.stderr)
        return 1
    report(summary)
    print(
        f"Next: {next_command(args, 'evaluate')} scores every stored prompt with both models "
        "and the judge"
    )
    return 0
