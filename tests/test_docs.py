"""The docs cannot go stale: generated sections match the code, and every link into them resolves."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar import docgen

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code, where `[x](y)` is not a link."""
    return _CODE.sub("", _FENCE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The anchors a code host gives the page's headings; repeated ones get -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text())):
        base = docgen.slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_generated_sections_are_up_to_date():
    """Config keys, metrics, admin API and CLI in docs/ are what the code says now."""
    stale = [str(p.relative_to(ROOT)) for p in docgen.stale()]
    assert not stale, f"{', '.join(stale)}: out of date; run `{docgen.COMMAND}` to update"
    missing = docgen.undocumented_sections()
    assert not missing, (f"config sections without a table: {missing}; add `<!-- generated: config NAME -->` "
                         f"to docs/reference/configuration.md and run `{docgen.COMMAND}`")


def test_every_relative_link_resolves():
    """Every relative link in README.md and docs/ points at a file that exists, and at a heading in it."""
    broken = []
    for page in PAGES:
        for target in _LINK.findall(_prose(page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no file {path_part}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


_CODE_POINTER = re.compile(r"\bdocs/[\w./-]+?\.md(?:#[\w-]+)?")
CODE = [p for d in ("sidecar", "tests", "reliability", "bench") for p in sorted((ROOT / d).rglob("*"))
        if p.suffix in (".py", ".yaml", ".html")] + [ROOT / "Dockerfile", ROOT / ".ci" / "run"]


def test_every_docs_pointer_in_the_code_resolves():
    """Comments, docstrings and messages that cite `docs/<page>.md#<anchor>` name a page and heading that exist."""
    broken = []
    for path in CODE:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pointer in _CODE_POINTER.findall(line):
                page, _, anchor = pointer.partition("#")
                dest = ROOT / page
                if not dest.exists():
                    broken.append(f"{path.relative_to(ROOT)}:{n}: no file {page}")
                elif anchor and anchor not in anchors(dest):
                    broken.append(f"{path.relative_to(ROOT)}:{n}: no heading #{anchor} in {page}")
    assert not broken, "\n".join(broken)


def test_readme_opens_with_the_setup_commands_and_stays_short():
    """The README's first lines install and run the demo, and run the tests; it stays a short tour."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[2:6] == [
        "```sh",
        "python3 -m venv .venv && . .venv/bin/activate && pip install . && sidecar demo             "
        "# install, see it work",
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[dev]' && pytest -q      "
        "# run the tests",
        "```",
    ]
    assert len(lines) < 300, f"README.md has {len(lines)} lines: move detail into docs/"
