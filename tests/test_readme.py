"""The README is a front page whose every line works.

Its first screen says what the package is, how to install it, the two commands (``make demo``,
``make test``), a first call that runs, and where to go next; the reference, results and
study write-ups live in docs/ pages (run by ``tests/test_docs.py``). The marker and setup
rules for python blocks are in ``tests/_helpers.py``.
"""

from __future__ import annotations

import re

from tests._helpers import (
    DOCS,
    README,
    ROOT,
    marked_blocks,
    pyproject,
    run_plain_blocks,
    unmarked_python_blocks,
)

TEXT = README.read_text()
BLOCKS = marked_blocks(TEXT)
FIRST_SCREEN = 40  # lines

#: docs pages the README links that land with other branches; a link to one of these may
#: dangle until they are merged (every other link must resolve)
PENDING_PAGES: set[str] = set()


def _links(text: str) -> list[str]:
    """Relative link targets of a markdown text, without #anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def test_the_two_commands_are_on_the_first_screen():
    first = TEXT.splitlines()[:FIRST_SCREEN]
    for command in ("make demo", "make test"):
        assert any(line.startswith(command) for line in first), f"`{command}` is not in the first {FIRST_SCREEN} lines"


def test_front_page_sections_in_order():
    headings = [h.strip() for h in re.findall(r"^## (.+)$", TEXT, flags=re.M)]
    for name in ("Install", "A first call", "Where to go next", "Optional extras and wheels"):
        assert name in headings, f"README has no '## {name}' section: {headings}"
    assert headings.index("Install") < headings.index("A first call") < headings.index("Where to go next")


def test_install_section_names_every_extra():
    """Every optional-dependency group of pyproject.toml is documented in the README."""
    install = TEXT.split("## Install\n", 1)[1].split("\n## ", 1)[0]
    extras = TEXT.split("## Optional extras and wheels\n", 1)[1].split("\n## ", 1)[0]
    for extra in pyproject()["project"]["optional-dependencies"]:
        assert f"| `{extra}` |" in extras, f"the extra {extra!r} is not in the README's table of extras"
    # both say plainly that the package index does not have it yet
    assert "Not on the package index yet" in install and "not published" in extras


def test_every_docs_page_is_linked_and_every_link_resolves():
    links = set(_links(TEXT))
    pages = {str(p.relative_to(ROOT)) for p in DOCS.glob("*.md")}
    assert not pages - links, f"docs pages the README does not link: {sorted(pages - links)}"
    assert PENDING_PAGES <= links, f"README lost its links to {sorted(PENDING_PAGES - links)}"
    dangling = [t for t in links if not (ROOT / t).exists() and t not in PENDING_PAGES]
    assert not dangling, f"README links to missing files: {dangling}"


def test_first_call_runs():
    assert BLOCKS and all(setup is None for _, setup, _ in BLOCKS)
    assert not unmarked_python_blocks(TEXT), "every python block of the README must be marked cpu-test"
    namespace = run_plain_blocks(BLOCKS, "README.md")
    assert tuple(namespace["out"].shape) == tuple(namespace["q"].shape)
