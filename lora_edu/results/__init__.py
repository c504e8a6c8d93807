"""The committed benchmark results, shipped with the package so every chapter can read them.

The scripts in ``benchmarks/`` measure (speed, memory, sweeps too long for a chapter's
three minutes) and write here, one JSON file per run, each naming its device, versions,
date and command. A chapter reads them with :func:`load`, which works the same in a
checkout and on Colab, where the installed package is all there is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["RESULTS_DIR", "benchmark_arguments", "describe_device", "load", "names", "out_path", "run_record", "save"]

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


def run_record(benchmark: str, config: dict, results: list, *, device: str, start: float,
               libraries: tuple[str, ...] = (), **measured) -> dict:
    """A run of ``benchmarks/<benchmark>.py`` as a record: its config and results (and any other
    ``measured`` entries), then what every record says: the command, the device, the versions
    of Python, torch and ``libraries``, the date, and the seconds since ``start``."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                **{name: importlib.import_module(name).__version__ for name in libraries}}
    return {"benchmark": benchmark, "command": f"python benchmarks/{benchmark}.py", "config": config,
            "results": results, **measured, "device": describe_device(device), "versions": versions,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "wall_seconds": round(time.time() - start)}


def save(record: dict, out: Path | None) -> None:
    """Write a benchmark's record as JSON to ``out`` (nothing when ``out`` is None), and say where."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


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
