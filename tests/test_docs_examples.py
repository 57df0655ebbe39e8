"""Every fenced ```python block of README.md and docs/**/*.md runs without raising.

A page is read like a session: its blocks run in order, in one namespace (a later block may use what
an earlier one defined), in an empty working directory, so the documentation cannot drift from the
code. A block may be left out only by a visible marker on the line before its fence:
``<!-- no-test: reason -->`` (the reason is required). Examples are written at small sizes.
"""
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\s*$")
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(.*?)\s*-->\s*$")


def python_blocks(path: Path):
    """``(first line number, code, skip reason or None)`` of each ```python block of a markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        language, start = match.group(1), i + 1
        end = start
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if language == "python":
            before = lines[i - 1] if i > 0 else ""
            skip = NO_TEST.match(before)
            blocks.append((start + 1, "\n".join(lines[start:end]), skip.group(1) if skip else None))
        i = end + 1
    return blocks


def documented_files():
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


PAGES = [path for path in documented_files() if python_blocks(path)]
EXAMPLES = [(path, line, code, skip) for path in PAGES for line, code, skip in python_blocks(path)]


def test_the_docs_have_python_examples():
    assert len(EXAMPLES) >= 5


def test_every_skipped_block_says_why():
    for path, line, _, skip in EXAMPLES:
        assert skip is None or skip, f"{path.relative_to(ROOT)}:{line}: a no-test marker needs a reason"


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_examples_of_a_page_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__docs_example__"}
    for line, code, skip in python_blocks(path):
        if skip:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the example at {where} raised {type(e).__name__}: {e}") from e
    assert os.getcwd() == str(tmp_path)


LINK = re.compile(r"\]\(([^)\s]+)\)|<img src=\"([^\"]+)\"")


def github_anchor(heading: str) -> str:
    """The anchor a code host gives a markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_and_anchors_resolve():
    """The README is read outside the docs site, so its strict build cannot check it: every relative
    link must name a file of the repository, and an anchor a heading of that file."""
    text = (ROOT / "README.md").read_text()
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = ROOT / path if path else ROOT / "README.md"
        assert file.exists(), f"README links to {target}, which does not exist"
        if anchor:
            headings = [github_anchor(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.MULTILINE)]
            assert anchor in headings, f"README links to {target}: no such heading in {path}"
