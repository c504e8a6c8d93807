"""The prose a reader sees: no placeholders, and every colon followed by what it introduces."""

from pathlib import Path

import nbformat
import pytest

from check_prose import html_placeholders, notebook_defects  # the rendered pages: tests/test_book.py

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = [p for folder in ("book", "solutions", "exercises") for p in sorted((ROOT / folder).glob("*.ipynb"))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_prose_has_no_placeholder_and_no_colon_left_hanging(path):
    assert notebook_defects(path) == []


# --- the check itself, on notebooks with one defect each

def notebook(tmp_path, *cells):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(c[5:]) if c.startswith("code:") else nbformat.v4.new_markdown_cell(c)
        for c in cells
    ])
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("text", [
    "LR_PROSE\n\n### The scale",
    "The results TODO.",
    "FIXME: say why",
    "The loss is XXX nats.",
    "It takes {seconds} seconds.",
    "It takes {{ seconds }} seconds.",
    "And then {...}",
    "```{admonition} How to choose\n:class: tip\n\n- SCALE_PROSE\n```",
])
def test_a_placeholder_is_found(tmp_path, text):
    defects = notebook_defects(notebook(tmp_path, text, "code:print(1)"))
    assert len(defects) == 1 and "placeholder" in defects[0]


@pytest.mark.parametrize("text", [
    "Set `MILTON_FINE_TUNE.lr` or `HF_HUB_OFFLINE=1`.",
    "```python\nLORA_LR = 3e-3\n```",
    "Its loss is $\\mathcal{L}$ and $$\\frac{\\alpha}{r}$$ scales it.",
    "As {cite}`hu2022lora` show, and {cite:t}`biderman2024lora` too.",
    "See [the docs](https://example.com/A_B_C).",
    "```{admonition} Pitfalls\n:class: warning\n\n- ordinary prose\n```",
])
def test_code_math_roles_and_links_are_not_placeholders(tmp_path, text):
    assert notebook_defects(notebook(tmp_path, text, "code:print(1)")) == []


def test_a_colon_followed_by_a_heading_is_found(tmp_path):
    path = notebook(tmp_path, "The same script ran on an H200:\n\n## DoRA over a 4-bit base\n\nText.", "code:x")
    (defect,) = notebook_defects(path)
    assert "followed by the heading '## DoRA over a 4-bit base'" in defect


def test_a_cell_ending_with_a_colon_before_another_markdown_cell_is_found(tmp_path):
    path = notebook(tmp_path, "The table:", "## Next", "code:x")
    (defect,) = notebook_defects(path)
    assert "followed by another markdown cell" in defect


def test_a_colon_at_the_end_of_the_notebook_is_found(tmp_path):
    (defect,) = notebook_defects(notebook(tmp_path, "code:x", "As follows:"))
    assert "the end of the notebook" in defect


@pytest.mark.parametrize("cells", [
    ("Built inline:", "code:print(1)"),
    ("Three kinds:\n\n- one\n- two", "code:x"),
    ("The update:\n\n$$\nW = W_0 + BA\n$$", "code:x"),
    ("In code:\n\n```python\nx = 1\n```\n\n## Next", "code:x"),
])
def test_a_colon_followed_by_what_it_introduces_passes(tmp_path, cells):
    assert notebook_defects(notebook(tmp_path, *cells)) == []


def test_the_rendered_page_check_reads_text_not_code_or_math():
    page = ("<html><head><title>T_T</title></head><body><p>Fine text, then SCALE_PROSE.</p>"
            "<pre>LORA_LR = 3e-3</pre><p><code>HF_HUB_OFFLINE</code> and \\(\\mathcal{L}\\)</p></body></html>")
    assert html_placeholders(page) == ["SCALE_PROSE"]
