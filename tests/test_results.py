"""lora_edu.results: the committed records load by name, and every benchmark shares its options."""

import json
from pathlib import Path

import pytest

from lora_edu import results


def test_every_committed_record_loads_and_says_what_ran_where_and_when():
    assert results.names()
    for name in results.names():
        record = results.load(name)
        for key in ("benchmark", "device", "date"):
            assert record.get(key), f"{name} lacks {key!r}"


def test_an_unknown_name_is_refused_with_the_names_there_are():
    with pytest.raises(FileNotFoundError, match="lora_latency"):
        results.load("no_such_benchmark")
    with pytest.raises(TypeError, match="name must be a str"):
        results.load(Path("lora_latency"))


@pytest.mark.parametrize("argv, expected", [
    ([], "default"), (["--quick"], None), (["--out", "x.json"], "x.json"), (["--quick", "--out", "y.json"], "y.json"),
])
def test_quick_writes_nothing_unless_told_where(argv, expected):
    args = results.benchmark_arguments("A benchmark.\n\nMore.", "a smoke test").parse_args(argv)
    default = Path("default")
    assert results.out_path(args, default) == (None if expected is None else Path(expected))


def test_save_writes_json_and_nothing_without_a_path(tmp_path):
    results.save({"a": 1}, None)
    out = tmp_path / "sub" / "r.json"
    results.save({"a": 1}, out)
    assert json.loads(out.read_text()) == {"a": 1}


def test_a_run_record_says_what_ran_where_with_which_versions_and_when():
    import time

    import torch

    record = results.run_record("lora_latency", {"quick": True}, [{"x": 1}], device="cpu", start=time.time() - 2,
                                libraries=("numpy",), ratios={"a": 1.5})
    assert list(record) == ["benchmark", "command", "config", "results", "ratios", "device", "versions", "date",
                            "wall_seconds"]
    assert record["command"] == "python benchmarks/lora_latency.py"
    assert (Path(__file__).resolve().parents[1] / "benchmarks" / "lora_latency.py").is_file()
    assert record["versions"]["torch"] == torch.__version__ and "numpy" in record["versions"]
    assert record["wall_seconds"] >= 2 and len(record["date"]) == 10
