"""Issue #25's rule for the study package: no file over ~500 lines without a reason stated at its top."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT = 520  # "about 500"


@pytest.mark.parametrize("path", sorted((REPO / "study").glob("*.py")), ids=lambda p: p.name)
def test_a_long_study_module_says_why_at_its_top(path):
    text = path.read_text()
    n = text.count("\n")
    if n <= LIMIT:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert any(w in doc for w in ("Why one file", "About ", "lines:")), (
        f"{path.relative_to(REPO)} has {n} lines and its docstring gives no reason for one file "
        "(say why in a sentence such as 'Why one file of ~N lines: ...', or split it)")
