"""The docs cannot go stale: generated sections match the code."""

from __future__ import annotations

from pathlib import Path

from sidecar import docgen

ROOT = Path(__file__).resolve().parent.parent


def test_generated_sections_are_up_to_date():
    """Config keys, metrics, admin API and CLI in docs/ are what the code says now."""
    stale = [str(p.relative_to(ROOT)) for p in docgen.stale()]
    assert not stale, f"{', '.join(stale)}: out of date; run `{docgen.COMMAND}` to update"
    missing = docgen.undocumented_sections()
    assert not missing, (f"config sections without a table: {missing}; add `<!-- generated: config NAME -->` "
                         f"to docs/reference/configuration.md and run `{docgen.COMMAND}`")
