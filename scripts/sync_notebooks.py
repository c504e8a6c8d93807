"""Keep the notebooks in step with the repository: Colab cells and generated exercises.

1. Every notebook in book/, solutions/ and exercises/ gets, right after its title
   cell, a Colab badge (a markdown cell tagged ``colab-badge``) and a setup cell
   (tagged ``colab-setup``) that installs lora_edu only on Colab. Both are made
   from ``repository`` in _config.yml, the one place that names the repository.
   A book chapter's cell tagged ``exercises-link`` is filled with links to its
   exercises (with their own Colab badge) and solutions.
2. exercises/NN_*.ipynb is generated from solutions/NN_*.ipynb: each part fenced by
   ``# BEGIN SOLUTION: <hint>`` ... ``# END SOLUTION`` becomes
   ``raise NotImplementedError("<hint>")``, cells tagged ``solution-only`` are
   dropped, and outputs are cleared.

    python scripts/sync_notebooks.py          # rewrite what is out of date
    python scripts/sync_notebooks.py --check  # exit 1 and name what is out of date
    python scripts/sync_notebooks.py --repository https://github.com/you/lora-edu [--branch main]
        # a fork: point _config.yml and every copy of the URL at it, then restamp
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIRS = ("book", "solutions")
BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION(?::\s*(?P<hint>.*))?$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
CONTINUED = re.compile(r"^\s*#\s{3,}(?P<more>\S.*)$")  # a hint's next line, indented past the '#'

BADGE_TAG, SETUP_TAG, SOLUTION_ONLY_TAG = "colab-badge", "colab-setup", "solution-only"
EXERCISES_LINK_TAG = "exercises-link"


def repository(root: Path = ROOT) -> tuple[str, str]:
    """(url, branch) of the repository, from _config.yml."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    repo = config["repository"]
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def colab_badge(relative_path: str, url: str, branch: str) -> str:
    github_path = url.removeprefix("https://github.com/")
    link = f"https://colab.research.google.com/github/{github_path}/blob/{branch}/{relative_path}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({link})"


def exercises_link(name: str, url: str, branch: str) -> str:
    """The end of a chapter: where its exercises and solutions are, on GitHub and Colab."""
    exercises, solutions = f"exercises/{name}", f"solutions/{name}"
    return (
        "## Exercises\n"
        "\n"
        f"The exercises for this chapter are in [`{exercises}`]({url}/blob/{branch}/{exercises}) "
        f"{colab_badge(exercises, url, branch)}\n"
        "\n"
        "After each one, a check cell tells you in a sentence what is wrong or that it is right. "
        f"Worked solutions: [`{solutions}`]({url}/blob/{branch}/{solutions})."
    )


def setup_source(url: str, branch: str) -> str:
    return (
        "# Setup: on Google Colab, install lora_edu; elsewhere, do nothing.\n"
        "import subprocess\n"
        "import sys\n"
        "\n"
        'if "google.colab" in sys.modules:\n'
        f'    PACKAGE = "lora_edu[colab] @ git+{url}@{branch}"\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", PACKAGE],\n'
        "                   check=True)"
    )


def raise_stub(indent: str, hint: str, width: int = 79) -> list[str]:
    """``raise NotImplementedError(<hint>)`` in lines of at most ``width`` columns (the book's)."""
    line = f"{indent}raise NotImplementedError({hint!r})"
    if len(line) <= width:
        return [line]
    inner = indent + " " * 4
    pieces = textwrap.wrap(hint, width - len(inner) - 3, break_long_words=False)  # 3: quotes and a space
    pieces = [piece + " " for piece in pieces[:-1]] + pieces[-1:]
    return [f"{indent}raise NotImplementedError(", *(f"{inner}{piece!r}" for piece in pieces), f"{indent})"]


def stub_solutions(source: str) -> str:
    """Replace each fenced solution in a code cell's source with a NotImplementedError stub.

    A hint too long for one line goes on, right after the BEGIN line, in comment lines
    indented past the ``#`` (``#   more of the hint``).
    """
    out, inside, hint, indent = [], False, None, ""
    for number, line in enumerate(source.splitlines(), start=1):
        if hint is not None:  # just after BEGIN: the hint may go on
            more = CONTINUED.match(line)
            if more:
                hint += " " + more.group("more").strip()
                continue
            out.extend(raise_stub(indent, hint))
            hint = None
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise ValueError(f"line {number}: BEGIN SOLUTION inside another solution")
            hint, indent = (begin.group("hint") or "").strip(), begin.group("indent")
            if not hint:
                raise ValueError(f"line {number}: '# BEGIN SOLUTION' needs a hint: '# BEGIN SOLUTION: <hint>'")
            inside = True
        elif END.match(line):
            if not inside:
                raise ValueError(f"line {number}: END SOLUTION without a BEGIN SOLUTION")
            inside = False
        elif not inside:
            out.append(line)
    if hint is not None:
        out.extend(raise_stub(indent, hint))
    if inside:
        raise ValueError("a BEGIN SOLUTION is never closed by END SOLUTION")
    return "\n".join(out)


def exercise_notebook(solutions: nbformat.NotebookNode) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(solutions)  # a deep copy
    nb.cells = [c for c in nb.cells if SOLUTION_ONLY_TAG not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = stub_solutions(cell.source)
            cell.outputs, cell.execution_count = [], None
    return nb


def _tagged(cell: nbformat.NotebookNode, tag: str) -> bool:
    return tag in cell.metadata.get("tags", [])


def stamp_colab_cells(nb: nbformat.NotebookNode, relative_path: str, url: str, branch: str) -> None:
    """Put the badge and setup cells right after the title cell, replacing older ones."""
    title = nb.cells[0]
    if title.cell_type != "markdown" or not title.source.startswith("# "):
        raise ValueError(f"{relative_path}: the first cell must be a markdown title ('# ...')")
    old = {tag: next((c for c in nb.cells if _tagged(c, tag)), None) for tag in (BADGE_TAG, SETUP_TAG)}
    badge = old[BADGE_TAG] or nbformat.v4.new_markdown_cell(metadata={"tags": [BADGE_TAG]})
    badge.source = colab_badge(relative_path, url, branch)
    setup = old[SETUP_TAG] or nbformat.v4.new_code_cell()
    setup.source = setup_source(url, branch)
    setup.metadata["tags"] = [SETUP_TAG, "hide-cell"]  # runs on Colab; folded away in the book
    rest = [c for c in nb.cells[1:] if not (_tagged(c, BADGE_TAG) or _tagged(c, SETUP_TAG))]
    nb.cells = [title, badge, setup, *rest]


def stamp_exercises_link(nb: nbformat.NotebookNode, relative_path: str, url: str, branch: str) -> None:
    cells = [c for c in nb.cells if _tagged(c, EXERCISES_LINK_TAG)]
    if len(cells) != 1:
        raise ValueError(
            f"{relative_path}: a chapter with solutions needs exactly one markdown cell tagged "
            f"{EXERCISES_LINK_TAG!r} (where the link to its exercises goes), found {len(cells)}"
        )
    cells[0].source = exercises_link(Path(relative_path).name, url, branch)


def expected_notebooks(root: Path = ROOT) -> dict[Path, str]:
    """Every notebook the repository should hold, as the text it should have."""
    url, branch = repository(root)
    expected = {}
    for folder in NOTEBOOK_DIRS:
        for path in sorted((root / folder).glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            relative_path = path.relative_to(root).as_posix()
            stamp_colab_cells(nb, relative_path, url, branch)
            if folder == "book" and (root / "solutions" / path.name).is_file():
                stamp_exercises_link(nb, relative_path, url, branch)
            expected[path] = nbformat.writes(nb) + "\n"
            if folder == "solutions":
                exercise_path = root / "exercises" / path.name
                exercises = exercise_notebook(nb)
                stamp_colab_cells(exercises, exercise_path.relative_to(root).as_posix(), url, branch)
                expected[exercise_path] = nbformat.writes(exercises) + "\n"
    return expected


# Files that spell out the repository's URL beside _config.yml (install and clone lines).
URL_FILES = ("README.md", "book/intro.md", "pyproject.toml")


def restamp(url: str, branch: str | None = None, root: Path = ROOT) -> None:
    """Point the book at another repository (a fork): _config.yml first, then every copy of its URL."""
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise ValueError(f"url must look like https://github.com/OWNER/REPO (Colab opens notebooks from GitHub), got {url!r}")
    old_url, _ = repository(root)
    config = root / "_config.yml"
    text = config.read_text().replace(f"url: {old_url}", f"url: {url}")
    if branch is not None:
        text = re.sub(r"(?m)^(\s*branch:\s*)\S+", lambda m: m.group(1) + branch, text, count=1)
    config.write_text(text)
    for name in URL_FILES:
        path = root / name
        if path.is_file():
            path.write_text(path.read_text().replace(old_url, url))
    for path, text in expected_notebooks(root).items():
        path.write_text(text)


def out_of_date(root: Path = ROOT) -> list[Path]:
    """Notebooks whose text differs from what sync would write, and stray exercises."""
    expected = expected_notebooks(root)
    stale = [p for p, text in expected.items() if not p.is_file() or p.read_text() != text]
    stale += [p for p in sorted((root / "exercises").glob("*.ipynb")) if p not in expected]
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of date")
    parser.add_argument("--repository", metavar="URL", help="restamp everything for this repository (a fork)")
    parser.add_argument("--branch", help="with --repository: the branch Colab opens (default: unchanged)")
    args = parser.parse_args()
    if args.repository:
        restamp(args.repository, args.branch)
        print(f"now pointing at {args.repository}: _config.yml, {', '.join(URL_FILES)} and every notebook")
        return 0
    if args.check:
        stale = out_of_date()
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (run `make exercises`)")
        return 1 if stale else 0
    for path, text in expected_notebooks().items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
