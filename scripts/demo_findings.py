"""The README's numbers of `make demo`, regenerated from the run's report.json.

    .venv/bin/python scripts/demo_findings.py results/report.json   # after `make demo`
    .venv/bin/python scripts/demo_findings.py --check                # README == the record

The first form keeps what the README quotes in ``docs/demo-findings.json`` (the report's
Findings, the counts and the run's machine) and rewrites the README block between the
``demo-findings`` markers from it; ``--check`` fails when the README block is not the record's
rendering, so the README never quotes numbers no command produced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "demo-findings.json"
README = ROOT / "README.md"
START, END = "<!-- demo-findings: start -->", "<!-- demo-findings: end -->"


def record_of(report: dict[str, Any]) -> dict[str, Any]:
    """What the README quotes of one run's report.json."""
    sys.path.insert(0, str(ROOT))
    from em_circuits.run.report import findings, report_from_json

    counts = report["counts"]
    split = report.get("split") or {}
    return {
        "date": date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, Python "
        f"{platform.python_version()}",
        "command": "make demo",
        "prompts": counts.get("prompts"),
        "divergent": counts.get("divergent"),
        "graphs": counts.get("graphs"),
        "discovery": [split.get("discovery_prompts"), split.get("discovery_clusters")],
        "validation": [split.get("validation_prompts"), split.get("validation_clusters")],
        "findings": findings(report_from_json(report)),
    }


def render(record: dict[str, Any]) -> str:
    """The README block of a record."""
    graphs = record.get("graphs") or {}
    lines = [
        START,
        f"What `{record['command']}` reports on this organism: the Findings of "
        f"`results/report.md` of a run on {record['date']} ({record['machine']}). The organism "
        "is trained on the machine that runs the demo, and float sums depend on its thread "
        "count, so another machine's numbers differ in their later digits and, where a test "
        "is close to its threshold, in its verdict; `scripts/demo_findings.py` regenerates "
        "this block from a run's report.json.",
        "",
        f"- {record['prompts']} prompts, {record['divergent']} divergent; graphs of "
        f"{graphs.get('base')} (base) and {graphs.get('adapted')} (adapted) prompts; features "
        f"ranked on {record['discovery'][0]} discovery prompts ({record['discovery'][1]} "
        f"clusters) and tested on {record['validation'][0]} validation prompts "
        f"({record['validation'][1]} clusters).",
        *(f"- {line}" for line in record["findings"]),
        END,
    ]
    return "\n".join(lines)


def readme_block(text: str) -> str | None:
    match = re.search(re.escape(START) + r".*?" + re.escape(END), text, re.S)
    return match.group(0) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", type=Path, help="a run's report.json")
    parser.add_argument("--check", action="store_true", help="README == the record's rendering")
    args = parser.parse_args(argv)
    readme = README.read_text(encoding="utf-8")
    block = readme_block(readme)
    if block is None:
        print(f"error: {README}: no {START} ... {END} block", file=sys.stderr)
        return 2
    if args.check:
        record = json.loads(RECORD.read_text(encoding="utf-8"))
        if block != render(record):
            print(
                f"error: {README}'s demo findings are not {RECORD.relative_to(ROOT)}'s: run "
                "`python scripts/demo_findings.py results/report.json` after `make demo`",
                file=sys.stderr,
            )
            return 1
        return 0
    if args.report is None:
        parser.error("give a report.json, or --check")
    record = record_of(json.loads(args.report.read_text(encoding="utf-8")))
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    README.write_text(readme.replace(block, render(record)), encoding="utf-8")
    print(f"wrote {RECORD.relative_to(ROOT)} and the README block")
    return 0


if __name__ == "__main__":
    sys.exit(main())
