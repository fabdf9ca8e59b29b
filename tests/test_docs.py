"""The docs/ pages work as written, and the contract's citations resolve.

* every marked python block of every docs/ page runs (``tests/_helpers.py`` has the marker
  rules): the blocks without a setup in order, one namespace per page; the others with their
  setup;
* every ``python -m ...`` / ``torchrun ...`` command shown in the README or a docs/ page starts
  and prints its ``--help``;
* the contract lives in the repository (docs/design.md), and every citation of a section of it
  resolves.
"""

from __future__ import annotations

import re
import sys

import pytest
import torch

from tests._helpers import (
    DOCS,
    ROOT,
    SETUPS,
    doc_pages,
    entry_point,
    marked_blocks,
    run_plain_blocks,
    shell_commands,
    unmarked_python_blocks,
)
from tests._subprocess import run_child

DESIGN = DOCS / "design.md"
PAGES = [p for p in doc_pages() if p.parent == DOCS]
BLOCKS = {p.name: marked_blocks(p.read_text(), f"docs/{p.name}") for p in PAGES}


# --------------------------------------------------------------------------- python blocks
def test_docs_have_marked_blocks_and_known_setups():
    every = [b for blocks in BLOCKS.values() for b in blocks]
    setups = {s for _, s, _ in every}
    # the API reference's blocks (moved out of the README): at least the seven it had
    assert len(BLOCKS.get("api.md", [])) >= 7 and None in setups, {k: len(v) for k, v in BLOCKS.items()}
    assert setups - {None} <= set(SETUPS), f"unknown setups {setups - {None} - set(SETUPS)}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_python_block_is_marked(page):
    unmarked = unmarked_python_blocks(page.read_text())
    assert not unmarked, f"docs/{page.name}: python blocks at lines {unmarked} have no cpu-test marker (they never run)"


@pytest.mark.parametrize("page", [p for p in PAGES if any(s is None for _, s, _ in BLOCKS[p.name])],
                         ids=lambda p: p.name)
def test_plain_blocks_run_in_order(page):
    run_plain_blocks(BLOCKS[page.name], f"docs/{page.name}")


SETUP_BLOCKS = [(p.name, line, setup, code) for p in PAGES for line, setup, code in BLOCKS[p.name] if setup]


@pytest.mark.parametrize("page,line,setup,code", SETUP_BLOCKS, ids=[f"{b[0]}:{b[1]}" for b in SETUP_BLOCKS])
def test_block_with_setup_runs(page, line, setup, code, tmp_path):
    namespace = {"torch": torch, **SETUPS[setup](tmp_path)}
    exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)  # noqa: S102


# --------------------------------------------------------------------------- shell commands
COMMANDS = [c for p in doc_pages() for c in shell_commands(p.read_text())]
ENTRY_POINTS = sorted({tuple(entry_point(c)) for c in COMMANDS})


def test_commands_are_found():
    assert len(ENTRY_POINTS) >= 8, ENTRY_POINTS  # the parser still reads the pages' blocks
    assert ("-m", "scaling_runs.train") in ENTRY_POINTS and ("-m", "bench.attn_speed") in ENTRY_POINTS
    # bench is a package: its tools run as modules, never as script paths
    assert not [e for e in ENTRY_POINTS if e[0].startswith("bench/")], ENTRY_POINTS


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=" ".join)
def test_every_command_exists_and_has_help(entry):
    """Each script or module the README or a docs page tells users to run starts and prints its usage."""
    result = run_child([sys.executable, *entry, "--help"], cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(entry)} --help failed:\n{result.stderr[-2000:]}"
    assert len(result.stdout) > 100, result.stdout  # its help text, not an empty run


def test_sweep_dry_run_command_runs():
    """The documented dry-run command, as written (it only plans: runs, FLOPs, time)."""
    command = next(c for c in COMMANDS if "--dry_run true" in c)
    result = run_child([sys.executable, *command.split()[1:]], cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------- links between pages
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    missing = [t for t in local if not (page.parent / t).exists()]
    assert not missing, f"docs/{page.name} links to missing files: {missing}"


# --------------------------------------------------------------------------- the contract
def _sources():
    for folder in ("moba", "triton_kernels", "bench", "scaling_runs", "tests"):
        yield from (ROOT / folder).rglob("*.py")
    yield from ROOT.glob("*.md")
    yield from DOCS.glob("*.md")


def test_every_cited_section_of_the_design_exists():
    sections = set(re.findall(r"^## (\d+)\.", DESIGN.read_text(), flags=re.M))
    assert {"1", "2", "3"} <= sections
    cited = {}
    for path in _sources():
        for n in re.findall(r"design\.md[),]? \(?section (\d+)", path.read_text(errors="ignore")):
            cited.setdefault(n, []).append(path.name)
    assert cited, "no citation found: the pattern no longer matches how the code cites the design"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"


def test_no_citation_of_a_design_file_outside_the_repository():
    stale = [str(p.relative_to(ROOT)) for p in _sources()
             if re.search(r"(?<!docs/)DESIGN\.md", p.read_text(errors="ignore"))]
    assert not stale, f"cite docs/design.md instead: {stale}"
