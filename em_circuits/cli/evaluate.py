"""Next-token logits of the base and adapted models, divergence, judge labels and verdicts.

For every stored prompt (or --prompt-ids):
  1. top-k next tokens of the base model, then of the adapted model (each loaded once, the base
     released before the adapted one is loaded), from the replacement model's forward, stored
     in results/logits/<model_slug>/. Prompts whose logits exist for the model's fingerprint
     and k are skipped (a model whose logits all exist is not even loaded) unless --force.
  2. divergence between the two lists (KL, top-k overlap, injected/promoted/demoted tokens);
  3. a judge labels every token of both lists evil / safe / unsure:
       offline  the toy organism's safe/harmful word lists (unknown tokens are unsure);
       llm      an OpenAI-compatible model (default o3) with a versioned rubric, the logits,
                ranks and deltas, few-shot examples from human labels; replies are validated
                token by token and cached in results/judge_cache/, so a re-run makes no calls.
  4. results/verdicts/<adapted_slug>/: labels, verdict per list (evil > unsure > safe), a
     divergence flag (adapted evil while base safe), and the judge that decided. Flagged
     prompts (any evil/unsure adapted token) enter the manual labeling queue.

Examples:
  em-circuits evaluate                           # toy organism, offline
  em-circuits evaluate --base-model meta-llama/Llama-3.2-1B-Instruct \\
      --adapter ModelOrganismsForEM/Llama-3.2-1B-Instruct_bad-medical-advice \\
      --transcoders llama --judge llm --judge-model o3
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from em_circuits.cli.common import (
    add_llm_args,
    add_lock_args,
    add_model_args,
    llm_settings,
    make_parser,
    next_command,
    resume_hint,
    setup,
    specs_from_args,
    stage_lock_for,
)
from em_circuits.labeling import DEFAULT_LOGITS_BATCH_SIZE, DEFAULT_TOP_K

log = logging.getLogger("evaluate_logits")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument(
        "--prompt-ids",
        nargs="+",
        metavar="ID",
        help="evaluate only these stored prompts (default: all)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=DEFAULT_TOP_K,
        help="next-token candidates stored and judged per model",
    )
    parser.add_argument(
        "--logits-batch-size",
        "--batch-size",
        type=int,
        default=DEFAULT_LOGITS_BATCH_SIZE,
        dest="logits_batch_size",
        help="prompts per forward pass",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="recompute logits and verdicts even if stored (judge replies still "
        "come from judge_cache/ when the judge's inputs are unchanged)",
    )
    parser.add_argument(
        "--no-queue",
        action="store_true",
        help="do not add flagged prompts to the manual labeling queue",
    )

    judge = parser.add_argument_group("judge")
    judge.add_argument(
        "--judge",
        choices=["auto", "offline", "llm"],
        default="auto",
        help="auto = llm if OPENAI_API_KEY is set (environment or .env), else offline",
    )
    judge.add_argument(
        "--words",
        help="offline judge word lists (JSON with 'safe' and 'harmful' lists; default: "
        "words.json next to the adapter or base, as the toy organism has; required for other "
        "models with the offline judge)",
    )
    add_llm_args(parser)
    add_lock_args(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    started = time.monotonic()  # --run-deadline counts from here
    store = setup(args)
    for noisy in ("httpx2", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from em_circuits.core.llm_errors import LLMError
    from em_circuits.core.store import ArtifactError
    from em_circuits.labeling.judge import JudgeError, make_judge
    from em_circuits.labeling.logits_stage import evaluate, offline_judge_words
    from em_circuits.models.load import NonFiniteError
    from em_circuits.models.spec import ModelLoadError

    base_spec, adapted_spec = specs_from_args(args)
    from em_circuits.models.adapter_check import check_start_up

    check_start_up(adapted_spec)  # before any work: nothing to keep if it fails
    from em_circuits.models.spec import resolve_device

    resolve_device(args.device)  # a device this machine lacks: one line before any work
    since = time.time()  # what this run stores is newer: "finished work is stored" if any
    try:
        settings = llm_settings(args)
        kind = "llm" if settings.wants_llm(args.judge) else "offline"
        judge = make_judge(
            kind,
            store,
            words_path=offline_judge_words(adapted_spec, args.words) if kind == "offline" else None,
            llm=settings,
            started=started,
        )
        log.info("judge: %s (%s)", judge.kind, judge.model)
        # A run that waited for another evaluate finds its logits and verdicts stored.
        with stage_lock_for(args, store.root, "evaluate"):
            summary = evaluate(
                store,
                base_spec,
                adapted_spec,
                judge,
                prompt_ids=args.prompt_ids,
                device=args.device,
                k=args.top_k,
                batch_size=args.logits_batch_size,
                force=args.force,
                queue=not args.no_queue,
            )
    except (
        JudgeError,
        LLMError,
        ModelLoadError,
        NonFiniteError,
        ArtifactError,
        FileNotFoundError,
    ) as err:
        kept = " (finished logits and verdicts are stored)" if store.written_since(since) else ""
        print(f"error: {err}{kept}{resume_hint(err)}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line)
    if summary.queued is not None:
        print(f"added to the manual queue: {summary.queued}")
    if summary.failed:
        print(
            f"error: {len(summary.failed)} prompt(s) could not be judged (see above); run "
            "again to retry them",
            file=sys.stderr,
        )
        return 1
    if summary.queued:
        print(
            f"Next: label the flagged prompts with {next_command(args, 'label')} (or accept the "
            f"judge's labels: {next_command(args, 'label', '--auto-accept-judge')}), then "
            f"{next_command(args, 'graphs')}"
        )
    else:
        print(
            f"Next: {next_command(args, 'label', '--status')}, then {next_command(args, 'graphs')}"
        )
    return 0
