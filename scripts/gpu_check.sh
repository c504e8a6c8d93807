#!/usr/bin/env bash
# The GPU run, in one call: everything in this project that needs a CUDA GPU.
#
#   bash scripts/gpu_check.sh              on a GPU machine: the full run (about 8 minutes on one H100)
#   bash scripts/gpu_check.sh --rehearse   anywhere: every step in a quick CPU mode (make test runs this)
#
# Steps, each under its own time limit, each run even if an earlier one failed:
#   1. wheels    install the wheels in .whl/ (bitsandbytes; scripts/download_gpu_wheels.sh fetches them)
#   r. reciprocal  scripts/cuda_reciprocal_table.py: the GPU's approximate 1/x, which bitsandbytes' kernel uses
#   2. tests     pytest -m cuda tests/test_cuda*.py: NF4 against bitsandbytes' CUDA kernels, the layers
#                forward and backward (a later chapter's GPU checks go in tests/test_cuda_<topic>.py)
#   3. nf4       benchmarks/nf4_throughput.py on CUDA: ours, ours fast and bitsandbytes, beside copy bandwidth
#   4. qlora     benchmarks/qlora_memory.py: peak memory and tokens/s, GPT-2 124M to 1.5B, ours against PEFT
#   5. latency   benchmarks/lora_latency.py: the LoRA paper's Table 1 setting
#   6. dora      benchmarks/dora_overhead.py: DoRA's step time and memory against LoRA, ours and PEFT's
#   7. serving   benchmarks/multi_adapter_throughput.py: a batch of mixed adapters, five ways of serving it, prefill and decode
#   8. chapters  the chapters with a GPU path, run as scripts (no Jupyter there), hub unreachable
#   9. gpt2_random    scripts/save_random_gpt2.py: a GPT-2 124M-shaped checkpoint with random weights
#                     and an offline byte-level BPE tokenizer, saved as the Hub's gpt2 is
#  10. chapter5_bfloat16, 11. chapter5_float16   Chapter 5's GPT-2 branch (load_pretrained, 16-bit
#                     compute, paged AdamW) on that folder (LORA_EDU_GPT2_PATH), in bfloat16 and in
#                     a T4's float16 with a GradScaler (LORA_EDU_COMPUTE_DTYPE); the rehearsal runs
#                     both on the CPU at the tiny model's size (4 layers, 128 wide), torch's AdamW
# Everything lands in $OUT (when set, as on the device machine) or gpu_results/: a log, one JSON per
# benchmark, gpu_check.json (every step's status, the CUDA tests' counts and failures, the chapters'
# outcomes) and cuda_reciprocal.npz only when it differs from the committed table: at most 8 files,
# all the device tool brings back. Copy the results into lora_edu/results/ (the run record into
# benchmarks/gpu_check/) and commit them. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=full
[[ "${1:-}" == "--rehearse" ]] && MODE=rehearse
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-gpu_results}
SCRATCH=$(mktemp -d)  # what gpu_check.json summarises: the pytest report, the chapters' outcomes
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1

if [[ "$MODE" == full ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU here: running the CPU rehearsal instead"
  MODE=rehearse
fi
if [[ "$MODE" == rehearse ]]; then
  export LORA_EDU_REHEARSE_CUDA=1  # tests/test_cuda.py runs on the CPU
  QUICK=--quick
else
  QUICK=
fi
echo "gpu_check: mode $MODE, python $("$PYTHON" --version 2>&1), results in $RESULTS, $(date -u +%FT%TZ)"

STEPS=()
step() {  # step NAME SECONDS COMMAND...: run COMMAND under a time limit, record its exit status
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - start)) s"
  STEPS+=("$name $rc $(($(date +%s) - start))")
}

install_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/lora_edu_site .whl/*.whl || return 1
    export PYTHONPATH="/tmp/lora_edu_site:$PYTHONPATH"
  fi
  "$PYTHON" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | grep -v kernels-community
  "$PYTHON" -c "import bitsandbytes" 2>/dev/null \
    || { echo "bitsandbytes is missing: run scripts/download_gpu_wheels.sh and carry .whl"; return 1; }
}
# The wheels change PYTHONPATH, so they are installed in this shell (under the same time limit's spirit).
echo "=== wheels"
start=$(date +%s)
install_wheels
STEPS+=("wheels $? $(($(date +%s) - start))")
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

# On the GPU the limits keep the run within 8 minutes; the rehearsal's are generous (a busy CPU).
[[ "$MODE" == full ]] && TESTS_LIMIT=90 || TESTS_LIMIT=600
# The GPU's approximate reciprocal, which quantize_nf4(kernel="cuda") needs to copy bitsandbytes'
# CUDA kernel bit for bit: measured first, into lora_edu/data/, so the tests and chapters use it.
if [[ "$MODE" == full ]]; then
  step reciprocal 60 "$PYTHON" scripts/cuda_reciprocal_table.py
  git diff --quiet -- lora_edu/data/cuda_reciprocal.npz 2>/dev/null \
    || cp lora_edu/data/cuda_reciprocal.npz "$RESULTS/"
else
  step reciprocal 60 "$PYTHON" scripts/cuda_reciprocal_table.py --self-test
fi
# Only tests/test_cuda*.py: the other test files import what the GPU machine lacks (nbformat, ...).
step tests "$TESTS_LIMIT" "$PYTHON" -m pytest -m cuda tests/test_cuda*.py -q -o addopts= -p no:cacheprovider --junitxml="$SCRATCH/pytest_cuda.xml"
if [[ "$MODE" == full ]]; then
  step nf4 50 "$PYTHON" benchmarks/nf4_throughput.py --devices cuda --out "$RESULTS/nf4_throughput_cuda.json"
  # The 1.5B shape first: its QLoRA peak memory (the T4 question) matters most if time runs out.
  step qlora 200 "$PYTHON" benchmarks/qlora_memory.py --presets gpt2-xl gpt2 gpt2-medium gpt2-large \
    --out "$RESULTS/qlora_memory.json"
  step latency 45 "$PYTHON" benchmarks/lora_latency.py --out "$RESULTS/lora_latency.json"
  step dora 60 "$PYTHON" benchmarks/dora_overhead.py --out "$RESULTS/dora_overhead.json"
  step serving 140 "$PYTHON" benchmarks/multi_adapter_throughput.py --out "$RESULTS/multi_adapter_throughput.json"
  step chapters 110 "$PYTHON" scripts/run_notebooks_as_scripts.py --budget 80 \
    --summary "$SCRATCH/chapters_cuda.json" \
    book/05_qlora_gpt2.ipynb book/02_lora_from_scratch.ipynb book/00_meet_the_model.ipynb \
    book/01_svd_intuition.ipynb book/03_lora_plus.ipynb
else
  step nf4 600 "$PYTHON" benchmarks/nf4_throughput.py --quick --devices cpu --out "$RESULTS/nf4_throughput_cuda.json"
  step qlora 900 "$PYTHON" benchmarks/qlora_memory.py --quick --out "$RESULTS/qlora_memory.json"
  step latency 600 "$PYTHON" benchmarks/lora_latency.py --quick --out "$RESULTS/lora_latency.json"
  step dora 600 "$PYTHON" benchmarks/dora_overhead.py --quick --out "$RESULTS/dora_overhead.json"
  step serving 600 "$PYTHON" benchmarks/multi_adapter_throughput.py --quick --out "$RESULTS/multi_adapter_throughput.json"
  # nbval executes every chapter on the CPU already; here the runner parses every cell.
  step chapters 300 "$PYTHON" scripts/run_notebooks_as_scripts.py --compile-only \
    --summary "$SCRATCH/chapters_cuda.json" book/*.ipynb solutions/*.ipynb
fi

# Chapter 5's GPT-2 branch, which the Hub-less GPU machine otherwise never takes: a random-weight
# folder of GPT-2 124M's shape (the rehearsal's: the tiny model's size), the chapter run on it twice.
GPT2_DIR="$SCRATCH/gpt2_random"
if [[ "$MODE" == full ]]; then
  SMALL= SAVE_LIMIT=60 CHAPTER_LIMIT=100
else
  SMALL=--small SAVE_LIMIT=120 CHAPTER_LIMIT=300
fi
step gpt2_random "$SAVE_LIMIT" "$PYTHON" scripts/save_random_gpt2.py --out "$GPT2_DIR" $SMALL
# What each run records, so gpu_check.json shows which branch it took, not only that it passed.
REPORT=(base.name_or_path base.random_weights n_params base.config.n_layer base.config.n_embd
  "str(compute_dtype)" "str(config.amp_dtype)" "type(optimizer).__name__" config.steps SKIPPED)
for dtype in bfloat16 float16; do
  step "chapter5_$dtype" "$CHAPTER_LIMIT" env LORA_EDU_GPT2_PATH="$GPT2_DIR" LORA_EDU_COMPUTE_DTYPE="$dtype" \
    "$PYTHON" scripts/run_notebooks_as_scripts.py book/05_qlora_gpt2.ipynb \
    --summary "$SCRATCH/chapter5_$dtype.json" --report "${REPORT[@]}"
done
rm -rf "$GPT2_DIR"  # 500 MB on the GPU machine

"$PYTHON" - "$RESULTS/gpu_check.json" "$SCRATCH" "$MODE" "${STEPS[@]}" <<'PY'
import json, platform, subprocess, sys
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

import torch

out, scratch, mode, *steps = sys.argv[1:]


def cuda_tests(report: Path) -> dict:
    """The counts of pytest's JUnit report, and the name of every test that did not pass."""
    if not report.exists():
        return {"report": "missing"}
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "not_passed": failed}


chapters = Path(scratch, "chapters_cuda.json")
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
record = {
    "benchmark": "gpu_check", "command": "bash scripts/gpu_check.sh", "mode": mode,
    "results": [{"step": s, "exit_status": int(rc), "seconds": int(sec)} for s, rc, sec in (x.split() for x in steps)],
    "cuda_tests": cuda_tests(Path(scratch, "pytest_cuda.xml")),
    "chapters": json.loads(chapters.read_text()) if chapters.exists() else "missing",
    # Chapter 5 on a random-weight GPT-2 folder: each run's outcome and what it ran with
    "chapter5_gpt2": {
        dtype: json.loads(f.read_text())[0] if f.exists() else "missing"
        for dtype in ("bfloat16", "float16")
        for f in [Path(scratch, f"chapter5_{dtype}.json")]
    },
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.machine()})",
    "versions": {"python": platform.python_version(), "torch": torch.__version__},
    "commit": commit, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
}
open(out, "w").write(json.dumps(record, indent=1) + "\n")
for r in record["results"]:
    print(f"{r['step']:17s} {'passed' if r['exit_status'] == 0 else 'FAILED (exit %d)' % r['exit_status']:18s} {r['seconds']:4d} s")
sys.exit(any(r["exit_status"] for r in record["results"]))
PY
