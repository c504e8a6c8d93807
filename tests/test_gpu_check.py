"""scripts/gpu_check.sh, rehearsed on the CPU: every step of the GPU run must work before a GPU is lent.

The rehearsal runs once per test session (about six minutes on 2 cores, five of them Chapter 5
on the random-weight GPT-2 folder, twice, most of it in float16, slow on a CPU); the tests below
read what it wrote.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["wheels", "reciprocal", "tests", "nf4", "qlora", "latency", "dora", "serving", "activations", "chapters",
         "gpt2_random", "chapter5_bfloat16", "chapter5_float16"]
# The claims of Chapter 5 that need pretrained weights, skipped by name on the random-weight folder
PRETRAINED_CLAIMS = ["the loss drops by more than 0.05", "training closes most of the 4-bit base's gap",
                     "re-quantizing keeps part of the improvement"]


@pytest.fixture(scope="session")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--rehearse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    return done, out


def read(out: Path, name: str) -> dict:
    """The run's own record, or a benchmark's record from the bundle every step rewrites."""
    if name == "gpu_check.json":
        return json.loads((out / name).read_text())
    return json.loads((out / "gpu_benchmarks.json").read_text())[name]


def test_every_step_runs_and_passes(rehearsal):
    done, out = rehearsal
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = read(out, "gpu_check.json")
    assert record["mode"] == "rehearse"
    assert [r["step"] for r in record["results"]] == STEPS
    assert all(r["exit_status"] == 0 for r in record["results"])
    assert (out / "gpu_check.log").read_text().count("=== ") >= len(STEPS)


def test_the_cuda_tests_ran_on_the_cpu_and_none_was_skipped(rehearsal):
    _, out = rehearsal
    counts = read(out, "gpu_check.json")["cuda_tests"]
    assert counts["tests"] >= 20 and counts["skipped"] == 0
    assert counts["failures"] == counts["errors"] == 0 and counts["not_passed"] == []


def test_the_run_leaves_no_more_files_than_the_device_tool_brings_back(rehearsal):
    """The device tool returns at most 8 files from $OUT: a ninth would be lost on the GPU."""
    _, out = rehearsal
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, sorted(p.name for p in files)


def test_every_results_file_says_where_when_and_with_what(rehearsal):
    _, out = rehearsal
    bundled = json.loads((out / "gpu_benchmarks.json").read_text())
    assert sorted(bundled) == ["activation_memory.json", "dora_overhead.json", "lora_latency.json",
                               "multi_adapter_throughput.json", "nf4_throughput_cuda.json", "qlora_memory.json"]
    for name in (*bundled, "gpu_check.json"):
        record = read(out, name)
        for key in ("benchmark", "command", "device", "versions", "date", "results"):
            assert record.get(key), f"{name} lacks {key!r}"


def test_nf4_rehearsal_is_byte_exact_and_measures_the_fast_path(rehearsal):
    _, out = rehearsal
    record = read(out, "nf4_throughput_cuda.json")
    rows = record["results"]
    assert rows and all(r["same_packed_bytes_and_absmax"] and r["same_dequantized_values"] for r in rows)
    assert all("lora_edu_fast" in r for r in rows if r["op"] == "dequantize")
    assert record["copy_bytes_per_second"]["cpu"] > 0
    assert record["edge_cases"] and all(c["same_packed_bytes_and_absmax"] for c in record["edge_cases"])


def test_qlora_rehearsal_measures_what_the_chapter_claims(rehearsal):
    """The GPU benchmark at the tiny size, on this machine: every method runs and is measured."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import qlora_memory as benchmark

    _, out = rehearsal
    record = read(out, "qlora_memory.json")
    rows = {row["method"]: row for row in record["results"]}
    assert set(rows) == set(benchmark.METHODS)
    assert not [m for m, row in rows.items() if "skipped" in row]
    assert all(row["tokens_per_second"] > 0 for row in rows.values())
    full, qlora, peft = rows["full"], rows["qlora_lora_edu"], rows["qlora_peft"]
    # The same adapters and optimizer states, however the QLoRA model was built.
    assert qlora["trainable_parameters"] == rows["qlora_lora_edu_bnb"]["trainable_parameters"] == peft["trainable_parameters"]
    assert qlora["optimizer_state_bytes"] == peft["optimizer_state_bytes"]
    # two float32 states per trainable parameter, plus AdamW's step counters (4 bytes per tensor)
    assert 0 <= qlora["optimizer_state_bytes"] - 8 * qlora["trainable_parameters"] <= 4 * 64
    frozen = qlora["weight_bytes"] - 4 * qlora["trainable_parameters"]  # the adapters are float32 parameters
    assert frozen < full["weight_bytes"] / 4
    assert qlora["saved_activation_bytes"] < rows["lora_bf16"]["saved_activation_bytes"] / 2  # checkpointing
    assert abs(qlora["saved_activation_bytes"] / peft["saved_activation_bytes"] - 1) < 0.1
    assert {r["ours"] for r in record["ratios_lora_edu_over_peft"]} == {"qlora_lora_edu", "qlora_lora_edu_bnb"}


def test_latency_rehearsal_times_every_model(rehearsal):
    _, out = rehearsal
    rows = read(out, "lora_latency.json")["results"]
    methods = {r["method"] for r in rows}
    assert methods == {"base", "lora_merged", "lora_unmerged", "adapter_l", "adapter_h"}
    assert all(r["median_seconds"] > 0 for r in rows)
    by = {(r["batch_size"], r["method"]): r for r in rows}
    # Merged LoRA has no parameters of its own; the unmerged one and the adapters do.
    assert all(by[b, "lora_merged"]["trainable_parameters"] == 0 < by[b, "lora_unmerged"]["trainable_parameters"]
               for b, _ in by)


def test_dora_rehearsal_measures_both_methods_both_ways(rehearsal):
    _, out = rehearsal
    record = read(out, "dora_overhead.json")
    rows = {(r["part"], r["method"]): r for r in record["results"]}
    assert set(rows) == {("training", m) for m in ("lora_lora_edu", "dora_lora_edu", "lora_peft", "dora_peft")} | {
        ("inference", m) for m in ("base", "lora_unmerged", "dora_unmerged", "dora_merged")}
    assert all(r["median_seconds"] > 0 for r in rows.values())
    train = {m: r for (part, m), r in rows.items() if part == "training"}
    # The same adapters in both implementations; DoRA adds one magnitude per output feature.
    assert train["lora_lora_edu"]["trainable_parameters"] == train["lora_peft"]["trainable_parameters"]
    assert train["dora_lora_edu"]["trainable_parameters"] == train["dora_peft"]["trainable_parameters"]
    assert train["dora_lora_edu"]["trainable_parameters"] > train["lora_lora_edu"]["trainable_parameters"]
    assert all(r["saved_activation_bytes"] > 0 for r in train.values())


def test_serving_rehearsal_runs_every_method_and_they_agree(rehearsal):
    _, out = rehearsal
    rows = read(out, "multi_adapter_throughput.json")["results"]
    checks = [r for r in rows if r["method"] == "check"]
    assert {r["phase"] for r in checks} == {"prefill", "decode"}
    assert all(max(r["max_abs_logit_difference_from_gather_bmm"].values()) < 1e-4 for r in checks)
    timed = [r for r in rows if "tokens_per_second" in r]
    assert {r["method"] for r in timed} == {"base", "merge_swap", "gather_bmm", "sgmv", "base_hf", "peft_mixed"}
    assert {r["seq_len"] for r in timed if r["phase"] == "decode"} == {1}  # one token per request
    assert all(r["tokens_per_second"] > 0 for r in timed)


def test_activation_rehearsal_counts_trains_and_times_every_remedy(rehearsal):
    _, out = rehearsal
    rows = read(out, "activation_memory.json")["results"]
    counted = [r for r in rows if r["part"] == "counted"]
    assert counted and all(r["checkpoint_formula_equals_measured"] and r["checkpoint_sqrt_formula_equals_measured"]
                           for r in counted)
    assert all(r["bytes"]["meft1"] < r["bytes"]["checkpoint"] < r["bytes"]["lora"] for r in counted)
    (depth,) = [r for r in rows if r["part"] == "meft_depth"]
    assert depth["spread"] == 0  # MEFT keeps the same bytes at 4, 8 and 16 blocks
    trained = {r["technique"]: r for r in rows if r["part"] == "trained"}
    assert set(trained) == {"plain", "checkpoint", "checkpoint_sqrt", "offload", "checkpoint_offload", "meft1"}
    assert all(r["tokens_per_second"] > 0 and r["final_loss"] > 0 for r in trained.values())
    saved = {t: r["saved_activation_bytes"] for t, r in trained.items() if "saved_activation_bytes" in r}
    assert saved["meft1"] < saved["checkpoint"] < saved["plain"]
    assert all(r["median_seconds"]["s2_attn"] > 0 for r in rows if r["part"] == "attention")


def test_only_runs_the_steps_it_names(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--rehearse", "--only", "wheels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [r["step"] for r in read(tmp_path, "gpu_check.json")["results"]] == ["wheels"]
    refused = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "unknown option --fast" in refused.stderr


def test_unpacking_puts_each_file_where_the_project_keeps_it(rehearsal, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import unpack_gpu_results

    _, out = rehearsal
    results, checks = tmp_path / "results", tmp_path / "benchmarks" / "gpu_check"
    results.mkdir(), checks.mkdir(parents=True)
    monkeypatch.setattr(unpack_gpu_results, "RESULTS_DIR", results)
    monkeypatch.setattr(unpack_gpu_results, "ROOT", tmp_path)
    unpack_gpu_results.main([str(out)])
    assert sorted(p.name for p in results.iterdir()) == sorted(json.loads((out / "gpu_benchmarks.json").read_text()))
    assert json.loads((results / "qlora_memory.json").read_text()) == read(out, "qlora_memory.json")
    assert sorted(p.name for p in checks.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    unpack_gpu_results.main([str(out), "--part", "2"])  # a split run's second call lands beside the first
    assert sorted(p.name for p in checks.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check_part2.json",
                                                        "gpu_check_part2.log"]
    with pytest.raises(SystemExit, match="gpu_benchmarks.json not found"):
        unpack_gpu_results.main([str(tmp_path)])


def test_the_chapters_step_parses_every_notebook(rehearsal):
    _, out = rehearsal
    outcomes = read(out, "gpu_check.json")["chapters"]
    notebooks = sorted(p.name for p in (ROOT / "book").glob("*.ipynb"))
    assert sorted({o["notebook"] for o in outcomes}) == notebooks
    assert all(o["status"] == "compiled" for o in outcomes)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_chapter5_takes_its_gpt2_branch_on_the_random_weight_folder(rehearsal, dtype):
    """Not the tiny model's fallback: load_pretrained on the saved folder, 16-bit compute, the
    pretrained-only claims skipped by name; with float16, autocast in float16 (a GradScaler)."""
    _, out = rehearsal
    outcome = read(out, "gpu_check.json")["chapter5_gpt2"][dtype]
    assert outcome["notebook"] == "05_qlora_gpt2.ipynb" and outcome["status"] == "passed", outcome
    ran = outcome["report"]
    assert Path(ran["base.name_or_path"]).name == "gpt2_random" and ran["base.random_weights"] is True
    # the rehearsal's size: GPT-2's architecture at the tiny model's depth and width
    assert (ran["base.config.n_layer"], ran["base.config.n_embd"]) == (4, 128)
    assert ran["str(compute_dtype)"] == ran["str(config.amp_dtype)"] == f"torch.{dtype}"
    assert ran["type(optimizer).__name__"] == "AdamW"  # paged AdamW needs CUDA
    assert ran["config.steps"] == 20
    assert ran["SKIPPED"] == PRETRAINED_CLAIMS


# ---------------------------------------------------------------------------------------
# The notebook runner the GPU machine uses in place of Jupyter
# ---------------------------------------------------------------------------------------


def notebook(path: Path, *cells: str) -> Path:
    path.write_text(json.dumps({
        "cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# title"]}]
        + [{"cell_type": "code", "metadata": {}, "source": [c], "outputs": [], "execution_count": None} for c in cells],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
    }))
    return path


def runner(*args):
    from run_notebooks_as_scripts import main

    before = dict(os.environ)
    outcome = main([str(a) for a in args])
    assert dict(os.environ) == before  # nbval's kernels, started later by this process, inherit it
    return outcome


def test_runner_runs_cells_in_one_namespace_in_the_notebook_folder(tmp_path):
    (tmp_path / "data.txt").write_text("42")
    good = notebook(tmp_path / "good.ipynb", "x = int(open('data.txt').read())", "assert x == 42\ndisplay(x)")
    summary = tmp_path / "summary.json"
    assert runner(good, "--summary", summary) == 0
    assert json.loads(summary.read_text())[0]["status"] == "passed"


def test_runner_reports_a_failing_assert_and_goes_on(tmp_path):
    bad = notebook(tmp_path / "bad.ipynb", "assert 1 + 1 == 3, 'arithmetic'")
    good = notebook(tmp_path / "good.ipynb", "pass")
    summary = tmp_path / "summary.json"
    assert runner(bad, good, "--summary", summary) == 1
    outcomes = json.loads(summary.read_text())
    assert [o["status"] for o in outcomes] == ["failed", "passed"]
    assert "arithmetic" in outcomes[0]["error"]


def test_runner_refuses_ipython_syntax_and_respects_its_budget(tmp_path):
    magic = notebook(tmp_path / "magic.ipynb", "%matplotlib inline")
    with pytest.raises(ValueError, match="uses IPython syntax"):
        runner("--compile-only", magic)
    slow = notebook(tmp_path / "slow.ipynb", "import time; time.sleep(0.2)")
    summary = tmp_path / "summary.json"
    assert runner(slow, slow, "--budget", "0.1", "--summary", summary) == 1
    assert [o["status"] for o in json.loads(summary.read_text())] == ["passed", "not run: time budget spent"]


def test_runner_reports_what_the_notebook_left_behind(tmp_path):
    nb = notebook(tmp_path / "branch.ipynb", "import torch\nsource, dtype = 'folder', torch.float16",
                  "skipped = ['a claim']")
    summary = tmp_path / "summary.json"
    assert runner(nb, "--summary", summary, "--report", "source", "dtype", "skipped", "missing") == 0
    reported = json.loads(summary.read_text())[0]["report"]
    assert reported["source"] == "folder" and reported["skipped"] == ["a claim"]
    assert reported["dtype"] == "torch.float16"  # not JSON: its str
    assert reported["missing"].startswith("not evaluated: NameError")
    # a failed notebook still reports how far it got
    bad = notebook(tmp_path / "bad.ipynb", "reached = 1", "assert False", "never = 2")
    assert runner(bad, "--summary", summary, "--report", "reached", "never") == 1
    reported = json.loads(summary.read_text())[0]["report"]
    assert reported["reached"] == 1 and reported["never"].startswith("not evaluated")


def test_the_step_table_gives_every_step_a_gpu_and_a_cpu_limit():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    table = script.split("<<'TABLE'\n", 1)[1].split("\nTABLE\n", 1)[0]
    rows = [line.split(maxsplit=3) for line in table.splitlines() if line.strip() and not line.startswith("#")]
    assert [row[0] for row in rows] == STEPS
    assert all(row[1].isdigit() and row[2].isdigit() and row[3] for row in rows), rows


@pytest.mark.parametrize("script", ["gpu_check.sh", "download_gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0
