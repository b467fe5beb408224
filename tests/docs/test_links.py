"""Every relative link in README.md, CHANGELOG.md and docs/*.md points at a file that exists and,
where it names an #anchor, at a heading of that file (GitHub's anchor rule)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP = [REPO / "README.md", REPO / "CHANGELOG.md"]
DOCUMENTS = sorted([p for p in TOP if p.is_file()] + list((REPO / "docs").rglob("*.md")))
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def prose(text: str, code_spans: bool = False) -> str:
    """The text without fenced blocks and, unless kept, inline code spans (no links there)."""
    kept, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and line.strip().startswith(fence) and not line.strip()[len(fence) :].strip():
            fence = None
        elif fence is None:
            kept.append(line if code_spans else re.sub(r"(`+).*?\1", "", line))
    return "\n".join(kept)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(path.read_text(), code_spans=True).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = anchor(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(path: Path) -> list[str]:
    targets = LINK.findall(prose(path.read_text()))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # not http:, mailto:


def test_the_anchor_rule_matches_github():
    assert anchor("The `/predict` fast path") == "the-predict-fast-path"
    assert anchor("The Open Inference Protocol (KServe v2)") == "the-open-inference-protocol-kserve-v2"
    assert anchor("Several processes, GPUs or nodes") == "several-processes-gpus-or-nodes"
    assert anchor("[0.5.0] - 2026-11-29") == "050---2026-11-29"


def test_there_are_documents_with_links():
    assert REPO / "README.md" in DOCUMENTS and any(relative_links(p) for p in DOCUMENTS)


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path):
    problems = []
    for target in relative_links(doc):
        file_part, _, fragment = target.partition("#")
        file = (doc.parent / unquote(file_part)).resolve() if file_part else doc
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and unquote(fragment).lower() not in anchors(file):
            problems.append(f"{target}: {file.relative_to(REPO)} has no heading #{fragment}")
    assert not problems, f"{doc.relative_to(REPO)}: " + "; ".join(problems)
