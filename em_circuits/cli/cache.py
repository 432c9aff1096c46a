"""The merged-adapter cache: what it holds, and pruning it.

Each adapted model is merged into its base once and kept under results/cache/merged/<model>/
(a full copy of the model: 2.5 GB at 1B in bf16, 16 GB at 8B). This lists each merge with its
size, the adapter and base it came from, and how many logits and graph files of that model the
results directory holds; --prune removes merges no stored result uses (or all of them). A
pruned merge is made again the next time a stage needs it.

examples:
  em-circuits cache                      # list
  em-circuits cache --prune unused       # remove merges of models with no stored results
  em-circuits cache --prune all --dry-run
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from em_circuits.cli.common import make_parser, setup


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = make_parser(__doc__, prog)
    parser.add_argument(
        "--prune",
        choices=["unused", "all"],
        help="remove the merges that no stored logits or graphs use, or every merge",
    )
    parser.add_argument("--dry-run", action="store_true", help="say what --prune would remove")
    args = parser.parse_args(argv)
    store = setup(args)
    merges = store.merged_models()
    if not merges:
        print(f"no merged models under {store.merged_cache_dir}")
        return 0
    freed = 0
    for folder in merges:
        report_path = folder / "merge_report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        used = store.artifacts_of(folder.name)
        size = _size(folder)
        origin = f"base {report.get('given_base', '?')}, LoRA on {report.get('target_modules')}"
        remove = args.prune == "all" or (args.prune == "unused" and used == 0)
        action = ""
        if remove:
            action = "  -> would remove" if args.dry_run else "  -> removed"
            if not args.dry_run:
                shutil.rmtree(folder)
            freed += size
        print(f"{folder.name}  {size / 2**30:.2f} GiB  {used} result file(s)  ({origin}){action}")
    if args.prune:
        verb = "would free" if args.dry_run else "freed"
        print(f"{verb} {freed / 2**30:.2f} GiB")
    return 0
