"""Spelling, by codespell: the book's prose, the package's docstrings and comments, the docs."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROSE = ["README.md", "book", "benchmarks/README.md", "lora_edu", "scripts", "tests"]
SKIP = "*.txt,*.json,*.npz,*.safetensors,*.ipynb,*.log,*.xml"  # texts of 1667, data, notebooks (below)


def codespell(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codespell_lib", "--skip", SKIP, *map(str, paths)],
                          capture_output=True, text=True, cwd=ROOT)


def test_prose_and_docstrings_are_spelled_right():
    result = codespell(*PROSE)
    assert result.returncode == 0, result.stdout


def test_notebook_text_is_spelled_right(tmp_path):
    # The markdown cells and code (comments, strings) of every chapter and solution, not
    # their outputs, which hold images and the Milton of 1667.
    for path in sorted((ROOT / "book").glob("*.ipynb")) + sorted((ROOT / "solutions").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        text = "\n".join("".join(c["source"]) for c in cells)
        (tmp_path / f"{path.parent.name}_{path.stem}.md").write_text(text)
    result = codespell(tmp_path)
    assert result.returncode == 0, result.stdout


def test_codespell_finds_a_misspelling(tmp_path):
    wrong = "sep" + "erately"  # spelled apart, so this file passes its own check
    (tmp_path / "wrong.md").write_text(f"The adapter is initialised {wrong}.\n")
    assert wrong in codespell(tmp_path).stdout
