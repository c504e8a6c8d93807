"""Run notebooks' code cells as plain Python, for machines without Jupyter (the GPU machine).

Each notebook's code cells run top to bottom in one namespace, in the notebook's folder,
with matplotlib drawing off screen: the same code a reader runs, and its asserts are the
checks. Outputs are printed, not compared (on a GPU they differ from the committed CPU
outputs, which nbval checks). Notebooks use no IPython magics; a line that would need
IPython (``%...`` or ``!...``) is refused rather than skipped, so none creeps in unnoticed.

    python scripts/run_notebooks_as_scripts.py book/05_qlora_gpt2.ipynb book/02_lora_from_scratch.ipynb \\
        --budget 240 --summary out/notebooks.json
    python scripts/run_notebooks_as_scripts.py --compile-only book/*.ipynb   # parse every cell, run nothing
    python scripts/run_notebooks_as_scripts.py book/05_qlora_gpt2.ipynb --summary out/ch5.json \
        --report base.name_or_path compute_dtype   # also record what these name at the end

``--report`` evaluates each expression in the notebook's namespace once it has run (or
failed), and records the value under the outcome's ``"report"``: a JSON value as it is,
anything else as its ``str``, and an expression that fails as the error it raised. It
lets a check say which branch a chapter took, not only that it passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path


def code_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    sources = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    for i, source in enumerate(sources):
        magics = [line for line in source.splitlines() if line.lstrip().startswith(("%", "!"))]
        if magics:
            raise ValueError(f"{path}: code cell {i} uses IPython syntax ({magics[0]!r}); notebooks must be plain Python")
    return sources


def run(path: Path, namespace: dict | None = None) -> None:
    """Execute ``path``'s code cells in ``namespace`` (by default a fresh one), in its folder."""
    namespace = {} if namespace is None else namespace
    namespace.update({"__name__": "__main__", "display": print})
    with contextlib.chdir(path.parent):
        for i, source in enumerate(code_cells(path)):
            print(f"--- {path.name}, code cell {i}", flush=True)
            exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)


def report(namespace: dict, expressions: list[str]) -> dict:
    """Each expression's value in ``namespace``: JSON as it is, else its str; or its error."""
    values = {}
    for expression in expressions:
        try:
            value = eval(expression, dict(namespace))  # the caller's own expressions, not input
        except Exception as err:
            values[expression] = f"not evaluated: {type(err).__name__}: {err}"
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            value = str(value)
        values[expression] = value
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--budget", type=float, default=None, help="seconds; notebooks left when it is spent are not started")
    parser.add_argument("--summary", type=Path, default=None, help="write each notebook's outcome here as JSON")
    parser.add_argument("--compile-only", action="store_true", help="parse every code cell, run nothing")
    parser.add_argument("--report", nargs="+", default=[], metavar="EXPRESSION",
                        help="record these expressions' values in each notebook's namespace after it ran")
    args = parser.parse_args(argv)
    start, outcomes = time.time(), []
    for path in args.notebooks:
        path = path.resolve()
        if args.compile_only:
            for i, source in enumerate(code_cells(path)):
                compile(source, f"{path.name}[cell {i}]", "exec")
            outcomes.append({"notebook": path.name, "status": "compiled"})
            continue
        if args.budget is not None and time.time() - start > args.budget:
            outcomes.append({"notebook": path.name, "status": "not run: time budget spent"})
            continue
        began, namespace = time.time(), {}
        try:
            run(path, namespace)
            status, error = "passed", None
        except Exception:
            status, error = "failed", traceback.format_exc(limit=-3)
            print(error, file=sys.stderr, flush=True)
        outcomes.append({"notebook": path.name, "status": status, "seconds": round(time.time() - began, 1),
                         **({"error": error} if error else {}),
                         **({"report": report(namespace, args.report)} if args.report else {})})
        print(f"=== {path.name}: {status} in {time.time() - began:.0f} s", flush=True)
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(outcomes, indent=1) + "\n")
    return 0 if all(o["status"] in ("passed", "compiled") for o in outcomes) else 1


if __name__ == "__main__":
    # Set here, not in main(): a caller's process (the tests) must keep its own environment.
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no internet: fail at once, not after retries
    sys.exit(main())
