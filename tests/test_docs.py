"""Documentation that must agree with the code: the README's maths is the formulas text."""

from __future__ import annotations

import re
from pathlib import Path

from em_circuits.analysis.formulas import FORMULAS

ROOT = Path(__file__).resolve().parents[1]


def _normalised(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_readme_maths_section_is_the_formulas_text():
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## The maths of the feature analysis\n(.*?)^## ", readme, re.S | re.M)
    assert section, "README lacks its maths section"
    body = FORMULAS.split("### Formulas", 1)[1]
    assert _normalised(section.group(1)) == _normalised(body), (
        "README's maths differs from em_circuits/analysis/formulas.py: edit the formulas there "
        "and paste them into the README"
    )


def test_readme_quotes_the_demo_findings_a_run_reported():
    """The README's `make demo` numbers are the Findings of a run's report.json, kept in
    docs/demo-findings.json by scripts/demo_findings.py: never hand-typed, never stale."""
    import json
    import subprocess
    import sys

    script = ROOT / "scripts" / "demo_findings.py"
    done = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    record = json.loads((ROOT / "docs" / "demo-findings.json").read_text())
    readme = (ROOT / "README.md").read_text()
    # every claim the report makes of the demo, in its words, with its numbers
    heads = [re.match(r"\*\*([^*(:]+)", line).group(1).strip() for line in record["findings"]]
    for head in ("Replication", "Causal", "Baselines", "Sufficiency", "EM rate"):
        assert head in heads, (head, heads)
    for line in record["findings"]:
        assert f"- {line}" in readme
