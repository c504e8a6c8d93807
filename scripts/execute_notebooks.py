"""Execute notebooks in place, storing the outputs that the book shows and nbval checks.

    python scripts/execute_notebooks.py book solutions        # every notebook in them
    python scripts/execute_notebooks.py book/00_meet_the_model.ipynb

Runs each notebook top to bottom in a fresh kernel of this Python, from the
notebook's own folder. Progress bars are stored as a terminal would leave them
(the last state of each line), and per-cell timing metadata is not stored, so
re-executing an unchanged notebook changes only what really varies.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def final_terminal_text(text: str) -> str:
    r"""What a terminal shows after ``text``: each line keeps what follows its last '\r'."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def merge_streams(outputs: list) -> list:
    """Join consecutive outputs of one stream (a progress bar sends hundreds), as a terminal shows them."""
    merged = []
    for output in outputs:
        if output.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                and merged[-1].name == output.name:
            merged[-1].text += output.text
        else:
            merged.append(output)
    for output in merged:
        if output.output_type == "stream":
            output.text = final_terminal_text(output.text)
    return merged


def execute(path: Path) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.time()
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = merge_streams(cell.outputs)
    nbformat.write(nb, path)
    return time.time() - start


def main(args: list[str]) -> None:
    if not args:
        sys.exit(__doc__)
    paths = []
    for arg in map(Path, args):
        paths += sorted(arg.glob("*.ipynb")) if arg.is_dir() else [arg]
    for path in paths:
        print(f"executing {path} ...", flush=True)
        print(f"  done in {execute(path):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
