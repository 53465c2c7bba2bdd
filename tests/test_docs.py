"""Documents generated from the code stay current, and links between documents resolve."""

from __future__ import annotations

import re
from pathlib import Path

from segmentation.settings_table import markdown

ROOT = Path(__file__).resolve().parent.parent


def test_the_settings_reference_is_generated_from_the_current_settings() -> None:
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert committed == markdown(), "docs/settings.md is stale: run `make docs`"


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_stays_a_front_door() -> None:
    assert len((ROOT / "README.md").read_bytes()) <= 10_500


def test_the_readme_s_commands_assume_no_sudo() -> None:
    """Root shells and containers often have no sudo: the two commands must not need it."""
    assert "sudo " not in (ROOT / "README.md").read_text()


def test_every_dead_letter_reason_is_documented_where_operators_look() -> None:
    from segmentation.events import REASONS

    rows = {
        "docs/design.md": r"^\| `dlq.reason` \|(.*)$",
        "docs/operations.md": r"^\| `segment_dead_letters_total` \|.*?`reason`:([^|]*)\|",
    }
    for doc, row in rows.items():
        found = re.search(row, (ROOT / doc).read_text(), re.MULTILINE)
        assert found, f"{doc}: no row lists the dead-letter reasons"
        assert set(re.findall(r"\w+", found.group(1))) == set(REASONS), doc
