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
