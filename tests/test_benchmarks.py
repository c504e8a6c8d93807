"""Committed benchmark results say where, when and with what they were measured."""

import json
from pathlib import Path

import pytest

RESULTS = sorted((Path(__file__).resolve().parents[1] / "lora_edu" / "results").glob("*.json"))


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
