"""Put the files a GPU run brought back where the project keeps them.

    python scripts/unpack_gpu_results.py FOLDER [--part 2]

FOLDER holds what ``scripts/gpu_check.sh`` left in ``$OUT`` (the device tool's ``files_at``):
every benchmark record of ``gpu_benchmarks.json`` goes to ``lora_edu/results/``, the run's
own record and log (``gpu_check.json``, ``gpu_check.log``) to ``benchmarks/gpu_check/``, and
``cuda_reciprocal.npz``, which comes back only when the GPU measured another table, to
``lora_edu/data/``. A run split into calls (``gpu_check.sh --only``) unpacks each, the later
ones with ``--part N``, so that their records land beside the first's as
``gpu_check_partN.json`` and ``.log``. Then ``git status`` shows what changed, to commit.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lora_edu.results import RESULTS_DIR, unbundle

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the files a GPU run brought back")
    parser.add_argument("--part", type=int, default=None, help="which call of a split run this is (2, 3, ...)")
    args = parser.parse_args(argv)
    folder, suffix = args.folder, f"_part{args.part}" if args.part else ""
    bundled = folder / "gpu_benchmarks.json"
    if not bundled.is_file():
        raise SystemExit(f"{bundled} not found: is {folder} what scripts/gpu_check.sh wrote?")
    placed = unbundle(bundled, RESULTS_DIR)
    run_records = ROOT / "benchmarks" / "gpu_check"
    for name, target in (("gpu_check.json", run_records / f"gpu_check{suffix}.json"),
                         ("gpu_check.log", run_records / f"gpu_check{suffix}.log"),
                         ("cuda_reciprocal.npz", ROOT / "lora_edu" / "data" / "cuda_reciprocal.npz")):
        if (folder / name).is_file():
            placed.append(Path(shutil.copy(folder / name, target)))
    for path in placed:
        print(path.relative_to(ROOT))
    return placed


if __name__ == "__main__":
    main()
