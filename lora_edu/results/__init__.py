"""The committed benchmark results, shipped with the package so every chapter can read them.

The scripts in ``benchmarks/`` measure (speed, memory, sweeps too long for a chapter's
three minutes) and write here, one JSON file per run, each naming its device, versions,
date and command. A chapter reads them with :func:`load`, which works the same in a
checkout and on Colab, where the installed package is all there is.

Below that, what the benchmarks share: their options (:func:`benchmark_arguments`), their
record (:func:`run_record`, :func:`save`), their one way of timing (:func:`interleaved_medians`),
and the record of the GPU run, ``scripts/gpu_check.sh`` (:func:`gpu_check_record`), whose
benchmark records travel back as one file (:func:`bundle`, :func:`unbundle`): the device
machine returns at most 8 files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["RESULTS_DIR", "benchmark_arguments", "bundle", "describe_device", "gpu_check_record",
           "interleaved_medians", "load", "names", "out_path", "run_record", "save", "unbundle"]

RESULTS_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """The results there are, e.g. ``["lora_latency", "lora_latency_cpu", ...]``."""
    return sorted(path.stem for path in RESULTS_DIR.glob("*.json"))


def load(name: str) -> dict:
    """The record of benchmark run ``name`` (a file name without ``.json``), as a dict."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results named {name!r}; there are: {', '.join(names())}")
    return json.loads(path.read_text())


def describe_device(device: str) -> str:
    """What a record says it ran on: the GPU and the CPU for ``"cuda"``, else the CPU and its threads."""
    import torch

    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{torch.cuda.get_device_name()}; CPU {cpu}" if device == "cuda" else cpu


def run_record(benchmark: str, config: dict, results: list | dict, *, device: str, start: float,
               libraries: tuple[str, ...] = (), **measured) -> dict:
    """A run of ``benchmarks/<benchmark>.py`` as a record: its config and results (and any other
    ``measured`` entries), then what every record says: the command, the device, the versions
    of Python, torch and ``libraries``, the date, and the seconds since ``start``."""
    return {"benchmark": benchmark, "command": f"python benchmarks/{benchmark}.py", "config": config,
            "results": results, **measured, **_where_and_when(device, libraries),
            "wall_seconds": round(time.time() - start)}


def _where_and_when(device: str, libraries: tuple[str, ...] = ()) -> dict:
    """What every record ends with: the device, the versions of Python, torch and ``libraries``, the date."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                **{name: importlib.import_module(name).__version__ for name in libraries}}
    return {"device": describe_device(device), "versions": versions,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}


def save(record: dict, out: Path | None) -> None:
    """Write a benchmark's record as JSON to ``out`` (nothing when ``out`` is None), and say where."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


def bundle(folder: Path | str, out: Path | str) -> list[str]:
    """Gather every ``*.json`` record in ``folder`` into one JSON file ``out``: {file name: record}.

    The GPU run calls it after every step, so a run cut short still brings back what it
    measured; a record being written at that moment (not yet valid JSON) waits for the next.
    Returns the names bundled.
    """
    records = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            records[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
    Path(out).write_text(json.dumps(records, indent=1) + "\n")
    return list(records)


def unbundle(path: Path | str, into: Path | str = RESULTS_DIR) -> list[Path]:
    """Write each record of a :func:`bundle` file back into ``into`` under its own name; returns the paths.

    Names are checked: a record's name must be a plain ``*.json`` file name, so a bundle
    cannot write outside ``into``.
    """
    records = json.loads(Path(path).read_text())
    if not isinstance(records, dict):
        raise ValueError(f"{path} is not a bundle of records ({{file name: record}})")
    for name in records:  # every name checked before anything is written
        if Path(name).name != name or not name.endswith(".json"):
            raise ValueError(f"{path} holds a record named {name!r}; expected a plain *.json file name")
    written = []
    for name, record in records.items():
        save(record, Path(into) / name)
        written.append(Path(into) / name)
    return written


def benchmark_arguments(doc: str, quick: str) -> argparse.ArgumentParser:
    """The options every benchmark takes, ``--quick`` (a smoke test, described by ``quick``)
    and ``--out``; a script adds its own and calls ``parse_args``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write results (default: lora_edu/results/; --quick writes nothing)")
    return parser


def out_path(args: argparse.Namespace, default: Path) -> Path | None:
    """Where a benchmark writes: ``--out`` if given, else nowhere for ``--quick``, else ``default``."""
    return args.out if args.out is not None else (None if args.quick else default)


def interleaved_medians(calls: Mapping[str, Callable[[], object]], *, rounds: int, repeats: int = 1,
                        device: str = "cpu", warm_up: int = 1, warm_each_turn: bool = False) -> dict[str, float]:
    """Median seconds of each of ``calls``, timed in interleaved rounds, so that a busy machine slows all alike.

    Each call first runs ``warm_up`` times untimed (CUDA kernels, the allocator, caches). Then in
    each of ``rounds`` rounds every call takes a turn, a different one first each round, and is
    timed ``repeats`` times in a row, after one untimed run if ``warm_each_turn`` (the caches the
    call before it filled). On ``"cuda"`` the clock waits for the GPU before and after each call.
    """
    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for call in calls.values():
        for _ in range(warm_up):
            call()
    order = list(calls)
    times = {name: [] for name in order}
    for round_ in range(rounds):
        for name in order[round_ % len(order):] + order[: round_ % len(order)]:
            if warm_each_turn:
                calls[name]()
            for _ in range(repeats):
                sync()
                start = time.perf_counter()
                calls[name]()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def gpu_check_record(mode: str, steps: list[tuple[str, int, int]], scratch: Path) -> dict:
    """The record of a run of ``scripts/gpu_check.sh``: which steps passed, and what the run left in ``scratch``.

    ``mode`` is ``"full"`` or ``"rehearse"``; ``steps`` holds each step's name, exit status and
    seconds. From ``scratch``: the CUDA tests' counts (pytest's JUnit report ``pytest_cuda.xml``),
    the chapters' outcomes (``chapters_cuda.json``) and Chapter 5's runs on the random-weight GPT-2
    (``chapter5_bfloat16.json``, ``chapter5_float16.json``); "missing" where a step left nothing.
    Then the commit, the device, the versions and the date.
    """
    import torch

    def outcomes(name: str, *, first: bool = False):
        """What a step wrote into ``scratch`` (its first entry, for a run of one notebook), or "missing"."""
        path = scratch / name
        if not path.exists():
            return "missing"
        written = json.loads(path.read_text())
        return written[0] if first else written

    return {
        "benchmark": "gpu_check", "command": "bash scripts/gpu_check.sh", "mode": mode,
        "results": [{"step": name, "exit_status": rc, "seconds": seconds} for name, rc, seconds in steps],
        "cuda_tests": _junit_counts(scratch / "pytest_cuda.xml"),
        "chapters": outcomes("chapters_cuda.json"),
        # Chapter 5 on a random-weight GPT-2 folder: each run's outcome and what it ran with
        "chapter5_gpt2": {dtype: outcomes(f"chapter5_{dtype}.json", first=True) for dtype in ("bfloat16", "float16")},
        "commit": _commit(),
        **_where_and_when("cuda" if torch.cuda.is_available() else "cpu"),
    }


def _junit_counts(report: Path) -> dict:
    """The counts of pytest's JUnit report, and the name of every test that did not pass."""
    if not report.exists():
        return {"report": "missing"}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "not_passed": failed}


def _commit() -> str:
    """The checkout's commit, or "unknown" (the GPU machine's copy may have no git, or no repository)."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"
