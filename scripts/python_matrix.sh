#!/usr/bin/env bash
# The unit tests on every Python version the project claims, on this machine.
#
#   bash scripts/python_matrix.sh                  # every claimed version this machine has (CI runs this)
#   VERSIONS="3.12 3.13" bash scripts/python_matrix.sh
#
# The claimed versions are the "Programming Language :: Python :: 3.X" classifiers of
# pyproject.toml, the one place that states them. For each, the script looks for
# python3.X on PATH or in pyenv, builds .venv-3.X/ with the pinned requirements (torch's
# CPU build from PyTorch's index where it can be reached, about 200 MB, instead of the 5 GB
# CUDA build that PyPI gives on Linux) and runs the unit tests, less those that build or open the book and
# the GPU rehearsal, which do not depend on the Python version and make test runs.
# A version this machine lacks is reported, not failed. Exit status 0 when every version
# found passed.
set -uo pipefail
cd "$(dirname "$0")/.."

CLAIMED=$(python3 - <<'PY'
import re, tomllib
classifiers = tomllib.load(open("pyproject.toml", "rb"))["project"]["classifiers"]
print(" ".join(m.group(1) for c in classifiers if (m := re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c))))
PY
)
VERSIONS=${VERSIONS:-$CLAIMED}
TORCH_PIN=$(grep '^torch==' requirements.txt)
echo "python_matrix: claimed $CLAIMED; testing $VERSIONS"

find_python() {
  local version=$1 candidate
  for candidate in "python$version" "$HOME/.pyenv/versions/$version"*/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import sys; assert sys.version.startswith('$version.')" 2>/dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

# torch's CPU build from PyTorch's index where this machine can reach it (about 200 MB);
# else the pinned version from the configured index (PyPI's Linux build brings CUDA:
# gigabytes, but the same torch, and it runs on the CPU).
install_torch() {
  local venv=$1
  "$venv/bin/python" -m pip install --quiet --no-deps --timeout 15 --retries 1 \
    --index-url https://download.pytorch.org/whl/cpu "$TORCH_PIN" 2>/dev/null && return 0
  echo "python_matrix: PyTorch's CPU index is out of reach; $TORCH_PIN from the configured index"
  "$venv/bin/python" -m pip install --quiet "$TORCH_PIN"
}

# make test has run the unit tests on its own Python (.venv) already
TESTED=$( [[ -x .venv/bin/python ]] && .venv/bin/python -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')" )

status=0
summary=()
for version in $VERSIONS; do
  if [[ "$version" == "$TESTED" && -z "${INCLUDE_MAKE_TEST_VERSION:-}" ]]; then
    summary+=("$version: tested by make test (.venv)")
    continue
  fi
  python=$(find_python "$version") || { summary+=("$version: not on this machine (skipped)"); continue; }
  venv=".venv-$version"
  start=$(date +%s)
  echo "=== Python $version ($python) in $venv"
  if [[ ! -f "$venv/.installed" || requirements.txt -nt "$venv/.installed" ]]; then
    "$python" -m venv "$venv" \
      && install_torch "$venv" \
      && "$venv/bin/python" -m pip install --quiet -r requirements.txt \
      && "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e . \
      && touch "$venv/.installed" \
      || { summary+=("$version: FAILED to install"); status=1; continue; }
  fi
  if "$venv/bin/python" -m pytest -q -o addopts="-p no:cacheprovider" \
      --ignore=tests/test_browser.py --ignore=tests/test_book.py --ignore=tests/test_gpu_check.py; then
    summary+=("$version: passed in $(( $(date +%s) - start )) s")
  else
    summary+=("$version: FAILED")
    status=1
  fi
done
printf 'python_matrix: %s\n' "${summary[@]}"
exit $status
