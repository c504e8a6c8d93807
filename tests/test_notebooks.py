"""The notebooks: executed and committed, Colab cells stamped, exercises in step with solutions."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

import sync_notebooks
from sync_notebooks import exercise_notebook, setup_source, stub_solutions

ROOT = Path(__file__).resolve().parents[1]
BOOK = sorted((ROOT / "book").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


def test_exercises_and_colab_cells_are_in_sync():
    stale = sync_notebooks.out_of_date()
    assert not stale, f"run `make exercises`; out of date: {[str(p.relative_to(ROOT)) for p in stale]}"


def test_every_book_notebook_is_in_the_toc_and_every_toc_entry_exists():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    for f in files:
        assert any((ROOT / f"{f}{ext}").is_file() for ext in (".md", ".ipynb")), f
    assert {f"book/{p.stem}" for p in BOOK} <= set(files)


def test_every_chapter_has_solutions_and_exercises():
    assert {p.name for p in BOOK} == {p.name for p in SOLUTIONS}
    for path in SOLUTIONS:
        exercises = nbformat.read(ROOT / "exercises" / path.name, as_version=4)
        code = "\n".join(c.source for c in exercises.cells if c.cell_type == "code")
        assert code.count("raise NotImplementedError(") >= 3, path.name
        assert "BEGIN SOLUTION" not in code


@pytest.mark.parametrize("path", BOOK + SOLUTIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebooks_are_committed_executed(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    unexecuted = [c.source.splitlines()[0] for c in code if c.execution_count is None]
    assert not unexecuted, f"cells with no stored output (run `make notebooks`): {unexecuted}"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "executed out of order or partly; run `make notebooks`"


def test_setup_cell_does_nothing_outside_colab(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(setup_source("https://github.com/o/r", "main"), {})
    assert calls == []
    monkeypatch.setitem(sys.modules, "google.colab", object())
    exec(setup_source("https://github.com/o/r", "main"), {})
    assert "lora_edu[colab] @ git+https://github.com/o/r@main" in calls[0][0]


def test_stub_solutions_replaces_each_fence_with_its_hint():
    source = (
        "def f(x):\n"
        "    # BEGIN SOLUTION: double it\n"
        "    y = 2 * x\n"
        "    return y\n"
        "    # END SOLUTION\n"
        "\n"
        "# BEGIN SOLUTION: pick 3\n"
        "answer = 3\n"
        "# END SOLUTION\n"
        "check(answer)"
    )
    assert stub_solutions(source) == (
        "def f(x):\n"
        "    raise NotImplementedError('double it')\n"
        "\n"
        "raise NotImplementedError('pick 3')\n"
        "check(answer)"
    )


def test_a_long_hint_is_raised_in_lines_that_fit_the_column():
    hint = "a hint long enough that one raise line would not fit in the book's seventy-nine columns of code"
    source = f"def f(x):\n        # BEGIN SOLUTION: {hint}\n        return x\n        # END SOLUTION"
    stub = stub_solutions(source)
    assert max(len(line) for line in stub.splitlines()) <= 79
    namespace = {}
    exec(stub, namespace)
    with pytest.raises(NotImplementedError) as raised:
        namespace["f"](1)
    assert str(raised.value) == hint


def test_a_hint_may_go_on_in_indented_comment_lines():
    source = (
        "def f(x):\n"
        "    # BEGIN SOLUTION: the first half of a hint,\n"
        "    #   and its second half\n"
        "    # a comment of the solution itself\n"
        "    return x\n"
        "    # END SOLUTION"
    )
    assert stub_solutions(source) == "def f(x):\n    raise NotImplementedError('the first half of a hint, and its second half')"


@pytest.mark.parametrize("source, message", [
    ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "needs a hint"),
    ("# BEGIN SOLUTION: h\nx = 1", "never closed"),
    ("x = 1\n# END SOLUTION", "without a BEGIN"),
    ("# BEGIN SOLUTION: a\n# BEGIN SOLUTION: b\n# END SOLUTION", "inside another"),
])
def test_stub_solutions_refuses_malformed_fences(source, message):
    with pytest.raises(ValueError, match=message):
        stub_solutions(source)


def test_exercise_notebook_drops_solution_only_cells_and_outputs():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# T"),
        nbformat.v4.new_markdown_cell("The answer is 3.", metadata={"tags": ["solution-only"]}),
        nbformat.v4.new_code_cell("# BEGIN SOLUTION: h\nx = 3\n# END SOLUTION", execution_count=1,
                                  outputs=[nbformat.v4.new_output("stream", text="3\n")]),
    ])
    out = exercise_notebook(nb)
    assert [c.source for c in out.cells] == ["# T", "raise NotImplementedError('h')"]
    assert out.cells[1].outputs == [] and out.cells[1].execution_count is None
    assert len(nb.cells) == 3  # the solutions are left untouched


def test_each_chapter_links_to_its_exercises_and_solutions():
    url, branch = sync_notebooks.repository()
    for path in BOOK:
        nb = nbformat.read(path, as_version=4)
        links = [c.source for c in nb.cells if "exercises-link" in c.metadata.get("tags", [])]
        assert len(links) == 1, path.name
        assert f"{url}/blob/{branch}/exercises/{path.name}" in links[0]
        assert "colab.research.google.com/github/" in links[0] and f"solutions/{path.name}" in links[0]


def test_a_chapter_without_its_exercises_link_cell_is_refused():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# T")])
    with pytest.raises(ValueError, match="exercises-link"):
        sync_notebooks.stamp_exercises_link(nb, "book/01_x.ipynb", "https://github.com/o/r", "main")


def test_progress_bars_are_stored_as_a_terminal_leaves_them():
    from execute_notebooks import merge_streams

    new = nbformat.v4.new_output
    outputs = [
        new("stream", name="stderr", text="training:   0%|  | 0/2\r"),
        new("stream", name="stderr", text="training:  50%|# | 1/2\r"),
        new("stream", name="stderr", text="training: 100%|##| 2/2\n"),
        new("stream", name="stdout", text="loss 1.5\n"),
        new("stream", name="stdout", text="done\n"),
    ]
    merged = merge_streams(outputs)
    assert [(o.name, o.text) for o in merged] == [
        ("stderr", "training: 100%|##| 2/2\n"),
        ("stdout", "loss 1.5\ndone\n"),
    ]


def test_only_a_stub_may_stop_an_exercise():
    from nbval_installed import is_stub_error

    assert is_stub_error("NotImplementedError", "write the LoRA forward pass")
    assert is_stub_error("CheckFailed", "lora_forward is still the stub: replace the `raise ...` line")
    assert not is_stub_error("CheckFailed", "your output has the wrong shape")
    assert not is_stub_error("FileNotFoundError", "../benchmarks/results/loraplus_sweep.json")


def test_a_fork_is_restamped_everywhere_by_one_command(tmp_path):
    import shutil

    for name in ("_config.yml", "README.md", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    for folder in ("book", "solutions"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    (tmp_path / "exercises").mkdir()
    old_url, _ = sync_notebooks.repository(tmp_path)
    fork = "https://github.com/someone/my-lora-book"
    sync_notebooks.restamp(fork, "teaching", root=tmp_path)
    assert sync_notebooks.repository(tmp_path) == (fork, "teaching")
    stamped = [tmp_path / n for n in sync_notebooks.URL_FILES] + sorted(tmp_path.glob("*/*.ipynb"))
    assert not [p.name for p in stamped if p.is_file() and old_url in p.read_text()]
    setup = (tmp_path / "book" / BOOK[0].name).read_text()
    assert f"git+{fork}@teaching" in setup and f"github/someone/my-lora-book/blob/teaching/book/" in setup
    assert not sync_notebooks.out_of_date(tmp_path)
    with pytest.raises(ValueError, match="url must look like"):
        sync_notebooks.restamp("git@github.com:someone/fork.git", root=tmp_path)

