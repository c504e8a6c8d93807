"""Run every notebook the way Colab runs it: beside nothing but the installed package.

A reader opens a notebook from its badge; Colab gives it an empty folder, and the setup
cell installs lora_edu from the repository. So a notebook must not read anything from
the repository by relative path. This script checks that, for every notebook, in four
steps:

1. build the wheel of lora_edu and install it into a private folder (``--target``), so
   the editable checkout cannot leak in (``import lora_edu`` is checked to come from it);
2. copy book/, solutions/ and exercises/ notebooks into an empty temporary folder;
3. run nbval there on the book and solution notebooks: each is re-executed and its
   outputs compared with the committed ones;
4. execute each exercise notebook there, cell by cell: a cell may fail only because a
   learner's part is still a stub (``NotImplementedError``, or a checker's "still the
   stub" message), or, after such a cell, for a name the stub would have defined
   (``NameError``) or a checker judging that unfinished work (``CheckFailed``); any
   other error fails the run.

    python scripts/nbval_installed.py                   # everything (make test runs this)
    python scripts/nbval_installed.py book/04_nf4_quantization.ipynb exercises/04_nf4_quantization.ipynb
    python scripts/nbval_installed.py --kernel-path avx2-1-thread --workers 2 book/*.ipynb solutions/*.ipynb

``--kernel-path`` runs every kernel under the environment of one of
``lora_edu.numerics.KERNEL_PATHS``, so that PyTorch and MKL compute as another CPU would
(``make kernels`` runs the book and the solutions so, two notebooks at a time with
``--workers 2``): a printed number that changes there is one a reader's machine may not
reproduce.

Exit status 0 when every notebook passed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("book", "solutions", "exercises")
NBVAL = ["--nbval", "--nbval-current-env", "--nbval-cell-timeout=600", "-p", "no:cacheprovider"]
STUB_ERRORS = ("NotImplementedError",)


def install_package(into: Path) -> Path:
    """Build lora_edu's wheel and install it, without dependencies, into ``into``/site."""
    dist, site = into / "dist", into / "site"
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(dist), str(ROOT)], check=True, cwd=into)
    (wheel,) = dist.glob("lora_edu-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--target", str(site), str(wheel)], check=True, cwd=into)
    shutil.rmtree(ROOT / "build", ignore_errors=True)  # setuptools' leftovers in the checkout
    return site


def kernel_path_environment(name: str) -> dict[str, str]:
    """The environment variables of kernel path ``name`` (lora_edu.numerics.KERNEL_PATHS)."""
    from lora_edu.numerics import KERNEL_PATHS

    if name not in KERNEL_PATHS:
        raise SystemExit(f"--kernel-path must be one of {', '.join(KERNEL_PATHS)}; got {name!r}")
    return KERNEL_PATHS[name]


def isolated_environment(site: Path, kernel_path: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", **kernel_path)
    found = subprocess.run([sys.executable, "-c", "import lora_edu; print(lora_edu.__file__)"],
                           env=env, cwd=site.parent, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).is_relative_to(site):
        raise SystemExit(f"lora_edu was imported from {found}, not from the installed wheel in {site}")
    return env


def copy_notebooks(paths: list[Path], into: Path) -> list[Path]:
    copies = []
    for path in paths:
        target = into / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
        copies.append(target)
    return copies


def run_nbval(notebooks: list[Path], env: dict[str, str], cwd: Path, workers: int = 1) -> int:
    if not notebooks:
        return 0
    # pytest-xdist: each worker takes whole notebooks (loadscope), as one kernel runs a notebook
    parallel = ["-n", str(workers), "--dist", "loadscope"] if workers > 1 else []
    command = [sys.executable, "-m", "pytest", *NBVAL, *parallel, "--rootdir", str(cwd), "-c", os.devnull,
               *[str(n.relative_to(cwd)) for n in notebooks]]
    return subprocess.run(command, env=env, cwd=cwd).returncode


def is_stub_error(ename: str, evalue: str) -> bool:
    return ename in STUB_ERRORS or (ename == "CheckFailed" and "still the stub" in evalue)


def run_exercise(path: Path) -> list[str]:
    """Execute one exercise notebook cell by cell; the errors that are not a stub's."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    problems, stubs = [], 0
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as error:
                if is_stub_error(error.ename, error.evalue):
                    stubs += 1
                elif error.ename in ("NameError", "CheckFailed") and stubs:
                    pass  # a name a stubbed cell would have defined, or a check of that unfinished work
                else:
                    problems.append(f"{path.name}, cell {index}: {error.ename}: {error.evalue}")
    if stubs == 0:
        problems.append(f"{path.name}: no cell stopped at a stub; the exercises should leave work to do")
    return problems


def run_exercises(notebooks: list[Path], env: dict[str, str]) -> int:
    os.environ.update(env)  # the kernels inherit it (this process runs nothing of lora_edu itself)
    failed = 0
    for path in notebooks:
        start = time.perf_counter()
        problems = run_exercise(path)
        verdict = "passed" if not problems else "FAILED"
        print(f"exercises/{path.name}: {verdict} in {time.perf_counter() - start:.0f} s", flush=True)
        for problem in problems:
            print("   ", problem)
        failed += bool(problems)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in book/, solutions/, exercises/")
    parser.add_argument("--kernel-path", default="native",
                        help="compute as another CPU would: a name of lora_edu.numerics.KERNEL_PATHS (default: native)")
    parser.add_argument("--workers", type=int, default=1,
                        help="notebooks checked at once (pytest-xdist); with more than 1, take a 1-thread kernel path")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    kernel_path = kernel_path_environment(args.kernel_path)
    paths = [p.resolve() for p in args.notebooks] or [p for f in FOLDERS for p in sorted((ROOT / f).glob("*.ipynb"))]
    with tempfile.TemporaryDirectory(prefix="lora_edu_colab_") as tmp:
        tmp = Path(tmp)
        site = install_package(tmp / "install")
        env = isolated_environment(site, kernel_path)
        folder = tmp / "notebooks"
        copies = copy_notebooks(paths, folder)
        print(f"lora_edu installed from its wheel into {site}; {len(copies)} notebooks copied to {folder}", flush=True)
        if kernel_path:
            print(f"kernel path {args.kernel_path}: " + " ".join(f"{k}={v}" for k, v in kernel_path.items()), flush=True)
        checked = [c for c in copies if c.parent.name != "exercises"]
        exercises = [c for c in copies if c.parent.name == "exercises"]
        status = run_nbval(checked, env, folder, args.workers)
        failed = run_exercises(exercises, env)
    if failed:
        print(f"{failed} exercise notebook(s) failed other than at their stubs")
    return 1 if status or failed else 0


if __name__ == "__main__":
    sys.exit(main())
