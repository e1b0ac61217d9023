"""The docs a newcomer reads: a short README that opens with the two commands, and links
that lead somewhere. No Ray, nothing imported from raypipe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move detail to docs/"
    first_block = text.split("```")[1]
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines()[1:] if ln.strip()]
    assert commands == ["./scripts/demo", "./scripts/test"]
    for command in commands:
        assert (ROOT / command).is_file()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_files(doc):
    broken = [
        target
        for target in LINK.findall(doc.read_text())
        if "://" not in target and not (doc.parent / target).exists()
    ]
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_docs_hold_the_four_topics_once():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"architecture.md", "data-contract.md", "llm-backends.md", "cluster.md"} <= names
    # A topic's section lives in one document; the others link to it.
    headings: dict[str, list[str]] = {}
    for doc in DOCS:
        for heading in re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M):
            headings.setdefault(heading.strip().lower(), []).append(doc.name)
    for topic in ("running on a cluster", "llm backends", "data contract"):
        owners = headings.get(topic, [])
        assert len(owners) == 1, f"{topic!r} has a section in {owners}"
