"""Tests of the documentation: README.md's length, and every Markdown link in README.md and docs/ resolving to a
file (and, for #anchors, a heading) inside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DOCS = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
README_MAX_LINES = 300

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
EXTERNAL = ("http://", "https://", "mailto:")


def without_fences(text: str) -> str:
    """`text` without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def without_code(text: str) -> str:
    """`text` without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", without_fences(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: formatting dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown text; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in without_fences(markdown).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(source: Path, markdown: str, root: Path = HERE) -> list[str]:
    """The relative links of `markdown` (a file at `source`) that leave `root`, name no file, or name no heading."""
    broken = []
    for target in LINK.findall(without_code(markdown)):
        if target.startswith(EXTERNAL):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            if anchor not in anchors(markdown):
                broken.append(f"{target}: no heading with anchor #{anchor} in {source.name}")
            continue
        file = (source.parent / path).resolve()
        if not file.is_relative_to(root.resolve()):
            broken.append(f"{target}: outside the repository")
        elif not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file.read_text())):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    return broken


def test_readme_is_a_guide_of_at_most_300_lines() -> None:
    lines = len((HERE / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/ (limit {README_MAX_LINES})"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(HERE).as_posix())
def test_every_link_resolves_inside_the_repository(doc: Path) -> None:
    assert not broken_links(doc, doc.read_text()), f"{doc.name}: broken links {broken_links(doc, doc.read_text())}"


def test_docs_link_to_nothing_outside_the_repository() -> None:
    """No README or docs text refers to the summary or data outside the repository (users do not have them)."""
    offending = [(d.name, m.group(0)) for d in DOCS for m in re.finditer(r"PAPER\.md|\.\./shared|/shared/", d.read_text())]
    assert not offending, f"references outside the repository: {offending}"


def test_github_anchor_rules() -> None:
    text = "# Title\n## 4. The paper's numbers\n### Several GPUs (torch.distributed)\n## `--method snv`: *notes*\n" \
           "## Notes\n## Notes\n```\n# not a heading\n```\n"
    assert anchors(text) == {"title", "4-the-papers-numbers", "several-gpus-torchdistributed", "--method-snv-notes",
                             "notes", "notes-1"}


def test_broken_links_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "other.md").write_text("# Other\n## A section\n")
    (tmp_path / "data.txt").write_text("x")
    source = tmp_path / "docs" / "page.md"
    good = "[a](../other.md) [b](../other.md#a-section) [c](#here) [d](../data.txt) [e](https://example.org/x.md)\n" \
           "`[f](missing.md)`\n```\n[g](missing.md)\n```\n# Here\n"
    assert broken_links(source, good, tmp_path) == []
    bad = "[a](../missing.md) [b](../other.md#no-such-section) [c](#nowhere) [d](../data.txt#x) [e](../../PAPER.md)\n"
    assert broken_links(source, bad, tmp_path) == [
        "../missing.md: no such file", "../other.md#no-such-section: no heading with anchor #no-such-section in other.md",
        "#nowhere: no heading with anchor #nowhere in page.md", "../data.txt#x: no heading with anchor #x in data.txt",
        "../../PAPER.md: outside the repository"]
