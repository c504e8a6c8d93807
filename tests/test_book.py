"""The HTML book builds from the committed notebooks, with warnings as errors."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_book_builds_without_warnings(tmp_path):
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jupyter_book), "build", str(ROOT), "--path-output", str(tmp_path),
         "--warningiserror", "--nitpick", "--keep-going"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    html = tmp_path / "_build" / "html"
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
