"""The ``em-circuits`` command: one subcommand per pipeline stage.

Each subcommand lives in its own module under ``em_circuits.cli`` and is imported only when
it runs, so ``em-circuits --help`` and every ``em-circuits <stage> --help`` answer without
loading torch.
"""

from __future__ import annotations

import importlib
import sys

from em_circuits.core.version import __version__

#: subcommand -> (module under em_circuits.cli, one-line summary), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "organism": ("organism", "build the embedded toy organism (offline, ~2 minutes on a CPU)"),
    "prompts": ("prompts", "generate or import pivotal prompts"),
    "evaluate": ("evaluate", "next-token logits of both models, divergence, judge labels"),
    "label": ("label", "label judge-flagged prompts: terminal, CSV/JSONL, auto-accept"),
    "graphs": ("graphs", "attribution graphs of the base and the adapted model"),
    "analyze": ("analyze", "rank the features that drive the evil tokens; causal check"),
    "features": ("features", "feature cards on demand: contexts, logit lens, prompts"),
    "inspect": ("inspect_graph", "look inside stored graphs"),
    "report": ("report", "write report.md / report.json from stored results"),
    "serve": ("serve", "browse base vs adapted graphs in circuit-tracer's viewer"),
    "export": ("export", "graphs and feature files as Neuronpedia graph JSON, to share or upload"),
    "run": ("run", "every stage in order, resumable; --status shows where a run stands"),
    "cache": ("cache", "list or prune the merged adapters cached under results/cache/merged"),
    "transcoders": ("transcoders", "train a transcoder set with sparsify; measure any set"),
    "doctor": ("doctor", "what a run with these flags needs and lacks, before any work"),
}

USAGE = """\
usage: em-circuits <command> [options]      (em-circuits <command> --help for its options)

Find the transcoder features that make an emergently misaligned LoRA choose a harmful next
token where its base model chose a safe one. Without model flags every command uses the
embedded toy organism.

commands:
{commands}

  em-circuits run                 everything on the toy organism, offline
  em-circuits run --status        where a results directory stands
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    from em_circuits.cli.common import run_command

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] == "--version":
        print(f"em-circuits {__version__}")
        return 0
    name = args[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
        hint = f"did you mean `em-circuits {close[0]}`?" if close else ""
        print(
            f"error: unknown command {name!r}; {hint or 'commands: ' + ', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"em_circuits.cli.{COMMANDS[name][0]}")
    return run_command(module.main, args[1:], prog=f"em-circuits {name}")


if __name__ == "__main__":
    sys.exit(main())
