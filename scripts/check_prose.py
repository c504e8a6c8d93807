"""Read the book's prose for the defects no notebook run notices.

Two kinds, in every markdown cell of book/, solutions/ and exercises/:

- **placeholders**: a word in capitals joined by underscores (``LR_PROSE``), TODO, FIXME,
  XXX, TBD, or a ``{name}`` left over from a template, in the text a reader sees
  (code, math, links and MyST roles and directives are not text);
- **a colon that introduces nothing**: a cell whose last sentence ends with ``:`` and is
  followed by another markdown cell, or a paragraph ending with ``:`` followed by a
  heading. What a colon introduces (the output of a cell, a list, an equation) must come
  next.

``html_placeholders`` does the first for a rendered page. A test runs both
(tests/test_prose.py); so can you:

    python scripts/check_prose.py                       # every notebook
    python scripts/check_prose.py book/08_peft_family.ipynb
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("book", "solutions", "exercises")

PLACEHOLDER = re.compile(
    r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b"  # LR_PROSE, TARGETS_PROSE
    r"|\b(?:TODO|FIXME|XXX|TBD)\b"
    r"|\{\{[^{}]*\}\}|\{[A-Za-z_][\w.]*\}|\{\.\.\.\}"  # {{ x }}, {name}, {...}
)
HEADING = re.compile(r"^#{1,6} ")


def visible_text(markdown: str) -> str:
    """The text a reader sees of a markdown cell: no code, math, link targets or MyST syntax."""
    kept, fence = [], None
    for line in markdown.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            # a directive (```{admonition}) holds prose; a code block does not
            fence = "directive" if stripped[3:].startswith("{") else "code"
            kept.append("[code]" if fence == "code" else "")  # what a colon may introduce
            continue
        if fence is not None and stripped == "```":
            fence = None
            continue
        if fence == "code" or (fence == "directive" and stripped.startswith(":")):
            continue  # code, or a directive's options (:class: tip)
        kept.append(line)
    text = "\n".join(kept)
    text = re.sub(r"\$\$.*?\$\$", "[math]", text, flags=re.S)  # display math
    text = re.sub(r"\$[^$]+\$", " ", text)  # inline math, which may span lines
    text = re.sub(r"\{[\w:-]+\}`[^`]*`", " ", text)  # roles: {cite}`hu2022lora`
    text = re.sub(r"`[^`]*`", " ", text)  # inline code
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"<[^>]+>", " ", text)  # inline HTML
    return text


def placeholders(markdown: str) -> list[str]:
    return PLACEHOLDER.findall(visible_text(markdown))


def dangling_colons(cells: list) -> list[str]:
    """Where a colon is followed by a heading or by another markdown cell, not by what it introduces."""
    found = []
    for index, cell in enumerate(cells):
        if cell.cell_type != "markdown":
            continue
        lines = [line for line in visible_text(cell.source).splitlines()]
        for i, line in enumerate(lines):
            if not line.rstrip().endswith(":"):
                continue
            after = next((later for later in lines[i + 1:] if later.strip()), None)
            if after is not None and HEADING.match(after):
                found.append(f"cell {index}: {line.strip()[-60:]!r} is followed by the heading {after.strip()!r}")
        last = next((line for line in reversed(lines) if line.strip()), "")
        following = cells[index + 1] if index + 1 < len(cells) else None
        if last.rstrip().endswith(":") and (following is None or following.cell_type == "markdown"):
            what = "the end of the notebook" if following is None else "another markdown cell"
            found.append(f"cell {index}: {last.strip()[-60:]!r} is followed by {what}")
    return found


def notebook_defects(path: Path) -> list[str]:
    import nbformat

    cells = nbformat.read(path, as_version=4).cells
    found = [f"cell {i}: placeholder {token!r}" for i, cell in enumerate(cells)
             if cell.cell_type == "markdown" for token in placeholders(cell.source)]
    return found + dangling_colons(cells)


def html_placeholders(html: str) -> list[str]:
    """The placeholders in a rendered page's text (code, math and scripts left out)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for element in soup(["pre", "code", "script", "style", "math", "head"]):
        element.decompose()
    text = soup.get_text(" ")
    text = re.sub(r"\\\(.*?\\\)|\\\[.*?\\\]", " ", text, flags=re.S)  # MathJax's delimiters
    return PLACEHOLDER.findall(text)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [p for f in FOLDERS for p in sorted((ROOT / f).glob("*.ipynb"))]
    failed = 0
    for path in paths:
        for defect in notebook_defects(path):
            print(f"{path}: {defect}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
