"""Committed benchmark results say where, when and with what they were measured."""

import json
from pathlib import Path

import pytest

RESULTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json"))


def test_there_are_results():
    assert RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_results_record_device_versions_date_and_command(path):
    record = json.loads(path.read_text())
    for key in ("benchmark", "command", "device", "versions", "date", "results"):
        assert record.get(key), f"{path.name} lacks {key!r}"
    assert "torch" in record["versions"]
    script = Path(__file__).resolve().parents[1] / record["command"].split()[-1]
    assert script.is_file(), f"{path.name} names a script that does not exist: {script}"


def test_qlora_memory_runs_on_the_cpu_and_measures_what_the_chapter_claims(tmp_path):
    """The GPU benchmark at the tiny size, on this machine: every method runs and is measured."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "qlora_memory.py"
    spec = importlib.util.spec_from_file_location("qlora_memory", script)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "qlora_memory.json"
    record = benchmark.main(["--quick", "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
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
