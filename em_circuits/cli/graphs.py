"""Attribution graphs for the base and the adapted model on every labeled prompt.

Both graphs of a prompt attribute to the same targets: every labeled evil and safe token and
the contrast direction logit(evil) - logit(safe). By default each graph holds the exact direct
and total effects of every active feature, error and token node on those targets (one
backward pass); the few prompts --full-graphs chooses also get a full graph with
feature-to-feature edges for the viewer. Both models are loaded once per run, on one
transcoder set; graphs are cached by (prompt, model fingerprint, targets, parameters).

examples:
  em-circuits graphs                        # toy organism, every labeled prompt
  em-circuits graphs --only-evil --serve    # then browse base vs adapted graphs
  em-circuits graphs 3f2a9c0d1b7e4a55       # only these prompt ids
  em-circuits graphs --full-graphs 3f2a9c0d1b7e4a55   # add this prompt's full graph
  em-circuits graphs --base-model meta-llama/Llama-3.2-1B-Instruct \\
      --adapter ModelOrganismsForEM/Llama-3.2-1B-Instruct_bad-medical-advice \\
      --transcoders llama --device cuda
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from em_circuits.cli.common import (
    add_graph_args,
    add_llm_args,
    add_model_args,
    add_prompt_args,
    chosen_prompt_ids,
    full_graph_choice,
    graph_params,
    llm_settings,
    make_parser,
    next_command,
    setup,
    specs_from_args,
)

if TYPE_CHECKING:
    from em_circuits.core.llm_settings import LLMSettings
    from em_circuits.core.store import ResultsStore
    from em_circuits.models.spec import ModelSpec


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = make_parser(__doc__, prog)
    add_model_args(parser)
    parser.add_argument(
        "positional_ids", nargs="*", metavar="PROMPT_ID", help="same as --prompt-ids"
    )
    add_prompt_args(parser)
    parser.add_argument(
        "--only-evil", action="store_true", help="only prompts with at least one token labeled evil"
    )
    parser.add_argument(
        "--evil",
        nargs="+",
        default=[],
        metavar="TOKEN",
        help="with --prompt: the next tokens to attribute to as evil (as the top-k lists show "
        "them, leading space optional); default: the judge's labels",
    )
    parser.add_argument(
        "--safe",
        nargs="+",
        default=[],
        metavar="TOKEN",
        help="with --prompt: the next tokens to attribute to as safe",
    )
    parser.add_argument(
        "--words",
        type=Path,
        help="word lists for the offline judge of --prompt texts (JSON with 'harmful' and "
        "'safe' lists; needed for models other than the toy organism without an API key)",
    )
    add_graph_args(parser)
    parser.add_argument("--force", action="store_true", help="recompute cached graphs")
    parser.add_argument(
        "--save-full",
        action="store_true",
        help="also store the dense adjacency of full graphs (large: ~290 MB at 1B scale)",
    )
    parser.add_argument(
        "--no-viewer",
        action="store_true",
        help="don't write the full graphs' JSON for the circuit-tracer viewer",
    )
    parser.add_argument(
        "--serve", action="store_true", help="after computing, serve the viewer until Ctrl-C"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="viewer address (0.0.0.0 exposes it to your network)"
    )
    parser.add_argument("--port", type=int, default=8041, help="viewer port")
    add_llm_args(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if (args.evil or args.safe) and not args.prompt:
        parser.error("--evil and --safe label the --prompt texts: give --prompt TEXT too")
    if args.serve:  # a bad --port is told now, not after the graphs are computed
        from em_circuits.attribution.viewer_metadata import ViewerError
        from em_circuits.attribution.viewer_server import check_port

        try:
            check_port(args.port)
        except ViewerError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    store = setup(args)

    from em_circuits.attribution.stage import run_graph_stage
    from em_circuits.attribution.targets import labeled_targets
    from em_circuits.models.spec import fingerprint, model_slug, resolve_device

    base_spec, adapted_spec = specs_from_args(args)
    from em_circuits.models.adapter_check import check_start_up

    check_start_up(adapted_spec)
    device = str(resolve_device(args.device))
    adapted_slug = model_slug(adapted_spec, fingerprint(adapted_spec, device))
    args.prompt_ids = [*args.positional_ids, *args.prompt_ids]
    if args.prompt:
        label_adhoc_prompts(
            store,
            base_spec,
            adapted_spec,
            args.prompt,
            device,
            adapted_slug,
            args.words,
            evil=args.evil,
            safe=args.safe,
            llm=llm_settings(args),
        )
    chosen = chosen_prompt_ids(args)
    targets = labeled_targets(store, adapted_slug, args.only_evil, chosen)
    unlabeled = flagged_without_labels(store, adapted_slug, chosen)
    if not targets and args.prompt:
        print(
            "error: the --prompt text(s) have no next token labeled evil or safe (the judge "
            "labeled none so); name the targets with --evil TOKEN ... and --safe TOKEN ...",
            file=sys.stderr,
        )
        return 1
    if not targets:
        print(
            f"no labeled prompts for {adapted_slug} under {store.labels_dir(adapted_slug)}",
            file=sys.stderr,
        )
        print(
            next_labeling_hint(unlabeled, args)
            if unlabeled
            else f"Next: {next_command(args, 'prompts')}, then {next_command(args, 'evaluate')} "
            f"and {next_command(args, 'label')}",
            file=sys.stderr,
        )
        return 1
    params = graph_params(args)
    viewer_dir = None if args.no_viewer else store.viewer_dir(adapted_slug)
    # No stage lock: each graph is claimed (core.claims), so two runs share the graph work.
    results = run_graph_stage(
        store,
        {"base": base_spec, "adapted": adapted_spec},
        targets,
        params,
        device,
        force=args.force,
        save_full_graph=args.save_full,
        viewer_dir=viewer_dir,
        full_graphs=full_graph_choice(args),
    )
    failed = 0
    for role, result in results.items():
        for kind, counts in ((params.mode, result), ("full", result.full)):
            if counts is None:
                continue
            print(
                f"{role}, {kind}: {len(counts.computed)} computed, {len(counts.cached)} cached, "
                f"{len(counts.failed)} failed"
            )
            for pid, message in counts.failed.items():
                print(f"  failed {pid}: {message}")
            failed += len(counts.failed)
    if unlabeled:
        print(next_labeling_hint(unlabeled, args))
    serve = next_command(args, "serve")
    print(
        f"Next: {next_command(args, 'analyze')} ranks the features across prompts"
        + ("" if args.serve or viewer_dir is None else f"; {serve} shows the graphs")
    )
    if args.serve and viewer_dir is not None:
        from em_circuits.attribution.viewer_metadata import ViewerError
        from em_circuits.attribution.viewer_server import serve_forever

        try:
            serve_forever(viewer_dir, args.host, args.port)
        except ViewerError as err:  # the graphs are stored; only serving them failed
            print(
                f"error: {err}; the graphs are stored: {next_command(args, 'serve')}",
                file=sys.stderr,
            )
            return 2
    return 2 if failed else 0


def flagged_without_labels(
    store: ResultsStore, adapted_slug: str, prompt_ids: list[str] | None
) -> int:
    """Judge-flagged prompts still waiting for labels (they get no graph until labeled)."""
    from em_circuits.core.labeling_records import load_label
    from em_circuits.labeling.items import open_items

    return sum(
        1
        for item, _ in open_items(store, adapted_slug)
        if (prompt_ids is None or item["prompt_id"] in prompt_ids)
        and load_label(store, adapted_slug, item["prompt_id"]) is None
    )


def next_labeling_hint(unlabeled: int, args: argparse.Namespace) -> str:
    return (
        f"{unlabeled} flagged prompt(s) have no labels yet and no graphs: label them with "
        f"{next_command(args, 'label')}, or accept the judge's labels with "
        f"{next_command(args, 'label', '--auto-accept-judge')}, then run "
        f"{next_command(args, 'graphs')} again"
    )


def label_adhoc_prompts(
    store: ResultsStore,
    base: ModelSpec,
    adapted: ModelSpec,
    texts: list[str],
    device: str,
    adapted_slug: str,
    words: Path | None = None,
    evil: Sequence[str] = (),
    safe: Sequence[str] = (),
    llm: LLMSettings | None = None,
) -> None:
    """Store --prompt texts, score and judge them, and label them whether the judge flagged
    them or not: the tokens named by ``evil``/``safe``, or else the judge's labels.

    Without ``evil``/``safe``, human labels, where a prompt already has them, are kept: the
    judge's labels only fill in prompts nobody has labeled.
    """
    from em_circuits.core.llm_settings import LLMSettings
    from em_circuits.core.prompt_records import adhoc_prompt_id, adhoc_record
    from em_circuits.labeling.items import QueueFilter
    from em_circuits.labeling.judge import make_judge
    from em_circuits.labeling.labels import auto_accept_judge, label_adhoc_prompt
    from em_circuits.labeling.logits_stage import evaluate, offline_judge_words

    ids = []
    for text in texts:
        record = adhoc_record(text)
        pid = adhoc_prompt_id(text)
        if not store.prompt_path(pid).is_file():
            store.save_prompt({**record, "name": f"adhoc-{pid[:8]}"})
        ids.append(pid)
    llm = llm or LLMSettings()
    kind = "llm" if llm.wants_llm("auto") else "offline"
    words_path = offline_judge_words(adapted, words) if kind == "offline" else None
    judge = make_judge(kind, store, words_path=words_path, llm=llm)
    evaluate(store, base, adapted, judge, prompt_ids=ids, device=device)
    if not (evil or safe):  # flagged ones: through the queue, which records the acceptance
        auto_accept_judge(store, adapted_slug, QueueFilter(prompt_ids=frozenset(ids)))
    for pid in ids:  # the ones the judge did not flag have no queue item: labeled here
        label_adhoc_prompt(store, adapted_slug, pid, evil, safe)
