"""docs/reliability.md promises only what tests check: every test it cites exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_cited_test_exists():
    cited = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", DOC.read_text())
    assert len(cited) >= 20, "the pattern no longer matches how the page cites tests"
    missing = [f"{f}::{name}" for f, name in cited if not (ROOT / f).exists() or name not in _test_names(ROOT / f)]
    assert not missing, f"docs/reliability.md cites tests that do not exist: {missing}"
