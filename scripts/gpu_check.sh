#!/usr/bin/env bash
# The GPU run, in one call: everything in this project that needs a CUDA GPU.
#
#   bash scripts/gpu_check.sh              on a GPU machine: the full run (about 9.5 minutes on one H100)
#   bash scripts/gpu_check.sh --rehearse   anywhere: every step in a quick CPU mode (make test runs this)
#   bash scripts/gpu_check.sh --only wheels,activations   only the steps named (a run split in two calls)
#
# The steps are the table below: each runs under its own time limit (the GPU's, or the
# rehearsal's generous one on a busy CPU), even if an earlier one failed. Everything lands in $OUT
# (when set, as on the device machine) or gpu_results/: a log; gpu_benchmarks.json, every
# benchmark's record in one file, rewritten after each step (lora_edu.results.bundle; unpack it
# with scripts/unpack_gpu_results.py); gpu_check.json (every step's status, the CUDA tests' counts
# and failures, the chapters' outcomes: lora_edu.results.gpu_check_record); and cuda_reciprocal.npz
# only when it differs from the committed table: four files, of the 8 the device tool brings back.
# scripts/GPU.md says how to run it and where its files go. Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=full ONLY=
while (($#)); do
  case "$1" in
    --rehearse) MODE=rehearse ;;
    --only) ONLY=",${2:?--only needs a comma-separated list of step names},"; shift ;;
    *) echo "unknown option $1 (expected --rehearse or --only STEPS)" >&2; exit 2 ;;
  esac
  shift
done
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-gpu_results}
SCRATCH=$(mktemp -d)  # what gpu_check.json summarises, and Chapter 5's 500 MB random-weight folder
trap 'rm -rf "$SCRATCH"' EXIT
GPT2_DIR="$SCRATCH/gpt2_random"
BENCH="$SCRATCH/benchmarks"  # one JSON per benchmark, bundled into $RESULTS/gpu_benchmarks.json after every step
mkdir -p "$RESULTS" "$BENCH"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1

if [[ "$MODE" == full ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA GPU here: running the CPU rehearsal instead"
  MODE=rehearse
fi
# What the two modes run differently, as words of the commands in the table.
if [[ "$MODE" == full ]]; then
  QUICK= DEVICE=cuda SELF_TEST= SMALL=
  QLORA_PRESETS="--presets gpt2-xl gpt2 gpt2-medium gpt2-large"  # 1.5B first: its peak (the T4 question) matters most
  # the chapters with a GPU path, run as scripts (no Jupyter there), the Hub unreachable
  CHAPTERS="--budget 80 book/05_qlora_gpt2.ipynb book/02_lora_from_scratch.ipynb book/00_meet_the_model.ipynb
    book/01_svd_intuition.ipynb book/03_lora_plus.ipynb"
else
  export LORA_EDU_REHEARSE_CUDA=1  # tests/test_cuda.py runs on the CPU
  QUICK=--quick DEVICE=cpu SELF_TEST=--self-test SMALL=--small QLORA_PRESETS=
  CHAPTERS="--compile-only book/*.ipynb solutions/*.ipynb"  # nbval executes them on the CPU; here every cell parses
fi
export PYTHON RESULTS SCRATCH BENCH GPT2_DIR QUICK DEVICE SELF_TEST SMALL QLORA_PRESETS CHAPTERS
echo "gpu_check: mode $MODE, python $("$PYTHON" --version 2>&1), results in $RESULTS, $(date -u +%FT%TZ)"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|',
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

install_wheels() {  # bitsandbytes, from the wheels scripts/download_gpu_wheels.sh put in .whl/
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/lora_edu_site .whl/*.whl || return 1
  fi
  "$PYTHON" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | grep -v kernels-community
  "$PYTHON" -c "import bitsandbytes" 2>/dev/null \
    || { echo "bitsandbytes is missing: run scripts/download_gpu_wheels.sh and carry .whl"; return 1; }
}
chapter5() {  # chapter5 DTYPE: Chapter 5's GPT-2 branch on the random-weight folder, and which branch it took
  LORA_EDU_GPT2_PATH="$GPT2_DIR" LORA_EDU_COMPUTE_DTYPE="$1" "$PYTHON" scripts/run_notebooks_as_scripts.py \
    book/05_qlora_gpt2.ipynb --summary "$SCRATCH/chapter5_$1.json" --report base.name_or_path base.random_weights \
    n_params base.config.n_layer base.config.n_embd "str(compute_dtype)" "str(config.amp_dtype)" \
    "type(optimizer).__name__" config.steps SKIPPED
}
export -f install_wheels chapter5
compgen -G ".whl/*.whl" >/dev/null && export PYTHONPATH="/tmp/lora_edu_site:$PYTHONPATH"  # where the wheels go

STEPS=()  # "name exit_status seconds" of each step, for gpu_check.json
while read -r name gpu_limit cpu_limit command; do
  [[ -z "$name" || "$name" == "#"* ]] && continue
  [[ -n "$ONLY" && "$ONLY" != *",$name,"* ]] && continue
  [[ "$MODE" == full ]] && limit=$gpu_limit || limit=$cpu_limit
  echo "=== $name (limit ${limit} s): $command"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$command" </dev/null  # not the table: the loop reads it
  rc=$? seconds=$(($(date +%s) - start))
  echo "=== $name: exit $rc after $seconds s"
  STEPS+=("$name $rc $seconds")
  "$PYTHON" -c 'import sys; from lora_edu.results import bundle; bundle(*sys.argv[1:])' "$BENCH" \
    "$RESULTS/gpu_benchmarks.json" || echo "could not bundle the benchmark records"
done <<'TABLE'
# name           GPU s  CPU s  command (bash)
wheels              60    120  install_wheels
# The GPU's approximate reciprocal, which bitsandbytes' CUDA kernels (--use_fast_math) use and
# quantize_nf4(kernel="cuda") needs to equal their bytes: measured first, into lora_edu/data/.
reciprocal          60     60  "$PYTHON" scripts/cuda_reciprocal_table.py $SELF_TEST
# NF4 against bitsandbytes' CUDA kernels, the layers forward and backward (a later chapter's GPU
# checks go in tests/test_cuda_<topic>.py); the other test files import what the GPU machine lacks.
tests               90    600  "$PYTHON" -m pytest -m cuda tests/test_cuda*.py -q -o addopts= -p no:cacheprovider --junitxml="$SCRATCH/pytest_cuda.xml"
nf4                 50    600  "$PYTHON" benchmarks/nf4_throughput.py $QUICK --devices $DEVICE --out "$BENCH/nf4_throughput_cuda.json"
qlora              200    900  "$PYTHON" benchmarks/qlora_memory.py $QUICK $QLORA_PRESETS --out "$BENCH/qlora_memory.json"
latency             45    600  "$PYTHON" benchmarks/lora_latency.py $QUICK --out "$BENCH/lora_latency.json"
dora                60    600  "$PYTHON" benchmarks/dora_overhead.py $QUICK --out "$BENCH/dora_overhead.json"
serving            140    600  "$PYTHON" benchmarks/multi_adapter_throughput.py $QUICK --out "$BENCH/multi_adapter_throughput.json"
# Chapter 9: what a step keeps for backward and what checkpointing, offloading, MEFT and S²-Attn buy
activations         90    300  "$PYTHON" benchmarks/activation_memory.py $QUICK --out "$BENCH/activation_memory.json"
chapters           110    300  "$PYTHON" scripts/run_notebooks_as_scripts.py --summary "$SCRATCH/chapters_cuda.json" $CHAPTERS
# Chapter 5's GPT-2 branch, which the Hub-less GPU machine otherwise never takes: a folder of GPT-2
# 124M's shape with random weights and an offline tokenizer (the rehearsal's: the tiny model's size),
# and the chapter on it in bfloat16 and in a T4's float16 with a GradScaler (float16 on a CPU, which
# has no fast float16 matmul, takes about 280 s of the rehearsal's 6 minutes on 2 cores).
gpt2_random         60    120  "$PYTHON" scripts/save_random_gpt2.py --out "$GPT2_DIR" $SMALL
chapter5_bfloat16  100    600  chapter5 bfloat16
chapter5_float16   100    600  chapter5 float16
TABLE

if [[ "$MODE" == full ]]; then  # the reciprocal table comes back only when the GPU measured another
  git diff --quiet -- lora_edu/data/cuda_reciprocal.npz 2>/dev/null || cp lora_edu/data/cuda_reciprocal.npz "$RESULTS/"
fi
"$PYTHON" - "$RESULTS/gpu_check.json" "$SCRATCH" "$MODE" "${STEPS[@]}" <<'PY'
import sys
from pathlib import Path

from lora_edu.results import gpu_check_record, save

out, scratch, mode, *steps = sys.argv[1:]
record = gpu_check_record(mode, [(name, int(rc), int(seconds)) for name, rc, seconds in map(str.split, steps)],
                          Path(scratch))
save(record, Path(out))
for step in record["results"]:
    outcome = "passed" if step["exit_status"] == 0 else f"FAILED (exit {step['exit_status']})"
    print(f"{step['step']:17s} {outcome:18s} {step['seconds']:4d} s")
sys.exit(any(step["exit_status"] for step in record["results"]))
PY
