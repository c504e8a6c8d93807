#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ (git-ignored), for scripts/gpu_check.sh.
#
#   bash scripts/download_gpu_wheels.sh
#
# Run it on a machine that reaches the package index. The GPU machine has no internet, and
# has PyTorch, transformers, peft, safetensors, tqdm, pytest and hypothesis, but not
# bitsandbytes; its Python is 3.12 on x86-64 Linux, so the wheels are fetched for exactly
# that platform, whatever this machine is. The version comes from requirements.txt, the
# one place of pins. The bitsandbytes wheel carries a native library for every CUDA version
# (41 MiB); bitsandbytes loads the one matching torch.version.cuda, and the GPU machine's
# torch is built for CUDA 13, so we keep the CPU library and the CUDA 13.x ones (3 MiB in
# all) and the working tree stays far under the device tool's 64 MiB. For another torch
# build, set CUDA_MAJOR (e.g. CUDA_MAJOR=12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
PINNED=$(grep -E '^bitsandbytes==' requirements.txt)
export CUDA_MAJOR=${CUDA_MAJOR:-13}
mkdir -p "$DEST"
rm -f "$DEST"/bitsandbytes-*.whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" "$PINNED"
"$PYTHON" - "$DEST" <<'PY'
"""Drop the native libraries for CUDA versions the GPU machine does not use."""
import os, re, sys, zipfile
from pathlib import Path

(wheel,) = Path(sys.argv[1]).glob("bitsandbytes-*.whl")
keep = re.compile(rf"libbitsandbytes_(cpu|cuda{os.environ['CUDA_MAJOR']}\d)\.so$")
with zipfile.ZipFile(wheel) as src:
    members = [m for m in src.infolist() if not m.filename.endswith(".so") or keep.search(m.filename)]
    data = {m.filename: src.read(m) for m in members}
trimmed = wheel.with_suffix(".tmp")
with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    for m in members:
        dst.writestr(m, data[m.filename])
before = wheel.stat().st_size
trimmed.replace(wheel)
print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {wheel.stat().st_size / 2**20:.1f} MiB "
      f"({sum(n.endswith('.so') for n in data)} native libraries kept)")
PY
ls -l "$DEST"
