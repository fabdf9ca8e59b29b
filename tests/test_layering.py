"""Dependencies point one way (docs/design.md section 2):
triton_kernels <- moba <- bench, scaling_runs. Read from the imports of every source file.
(bench may read scaling_runs checkpoints: both sit at the top, over moba.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imported_roots(path: Path) -> set[str]:
    """Top-level names of every absolute import in a file (function-level imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("moba", {"bench", "scaling_runs", "tests"}),
        ("triton_kernels", {"moba", "bench", "scaling_runs", "tests"}),
    ],
)
def test_imports_point_one_way(folder, forbidden):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & forbidden)
        for path in sorted((ROOT / folder).rglob("*.py"))
    }
    offenders = {name: roots for name, roots in offenders.items() if roots}
    assert not offenders, f"{folder}/ must not import {sorted(forbidden)}: {offenders}"


def test_the_check_sees_function_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from scaling_runs.checkpoint import load_gpt\n    import bench.roofline\n")
    assert _imported_roots(source) == {"scaling_runs", "bench"}


#: the test modules other tests may import: shared helpers, and the subprocess runner (kept apart
#: because it imports neither torch nor moba)
SHARED_TEST_MODULES = {"tests._helpers", "tests._subprocess"}


def test_tests_import_shared_code_from_helpers_only():
    """No test module imports another test module, and one import style: shared code comes from
    ``tests._helpers`` (``from tests._helpers import ...``)."""
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else [f"relative {node.module}"]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            bad = [n for n in names if n.startswith(("tests.test_", "test_", "relative", "_helpers")) or
                   (n.startswith("tests.") and n not in SHARED_TEST_MODULES)]
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert not offenders, offenders


#: The one sys.path edit a bench tool may make: run as a file (``python bench/tool.py``), it puts
#: the repository root in place of bench/ and imports itself as part of the package.
RUN_AS_FILE = '''
if not __package__:  # run as a file (python bench/TOOL.py, from anywhere): import it as bench.TOOL
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root, not bench/
    __package__ = "bench"
'''


def test_bench_tools_are_modules_without_sys_path_edits():
    """bench/ is a package (``python -m bench.<tool>``, or ``python bench/<tool>.py`` through
    ``RUN_AS_FILE``): no script reaches another through sys.path."""
    edits = []
    for p in sorted((ROOT / "bench").glob("*.py")):
        text = p.read_text().replace(RUN_AS_FILE.replace("TOOL", p.stem), "")
        if "sys.path" in text or ("__package__" in text and p.name != "__init__.py"):
            edits.append(p.name)
    assert not edits, edits
    assert (ROOT / "bench" / "__init__.py").exists()
