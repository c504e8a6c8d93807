"""The HTML book builds from the committed notebooks, with warnings as errors."""

from pathlib import Path

from check_prose import html_placeholders

ROOT = Path(__file__).resolve().parents[1]


def test_the_book_builds_without_warnings(built_book):
    result, html = built_book
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert (html / "index.html").is_file()
    chapter = (html / "book" / "00_meet_the_model.html").read_text()
    assert "colab.research.google.com" in chapter  # the launch button and the badge
    assert "exercises/00_meet_the_model.ipynb" in chapter  # the link to its exercises
    assert chapter.count("<img") >= 4  # the stored figures made it onto the page
    for page in ("intro.html", "00_meet_the_model.html"):
        # Citations render author-year and link into the References page.
        text = (html / "book" / page).read_text()
        assert "Hu <em>et al.</em>, 2022" in text and 'href="references.html#' in text, page
    qlora = (html / "book" / "05_qlora_gpt2.html").read_text()
    assert "Chen <em>et al.</em>, 2016" in qlora and "exercises/05_qlora_gpt2.ipynb" in qlora
    # References: labelled as the text cites them, each linked to the paper.
    references = (html / "book" / "references.html").read_text()
    assert "Hu et al., 2022" in references and "https://arxiv.org/abs/2106.09685" in references
    assert "HSW+22" not in references
    # Math from the book's own copy of MathJax, so an offline reader sees formulas.
    assert "_static/mathjax/tex-svg-full.js" in chapter and (html / "_static/mathjax/tex-svg-full.js").is_file()
    assert chapter.count("const THEBE_JS_URL") == 1  # declared twice, it was a SyntaxError
    assert not (html / "genindex.html").exists()  # no empty index page



def test_the_rendered_chapters_show_no_placeholder(built_book):
    _, html = built_book
    pages = sorted((html / "book").glob("*.html"))
    assert pages
    for page in pages:
        assert html_placeholders(page.read_text()) == [], page.name
