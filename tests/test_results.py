"""lora_edu.results: the committed records load by name; every benchmark shares its options, record and timing."""

import json
import time
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


def test_save_writes_json_and_nothing_without_a_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    committed = results.names()
    results.save({"a": 1}, None)
    assert not list(tmp_path.iterdir()) and results.names() == committed
    assert capsys.readouterr().err == ""  # nor says it wrote
    out = tmp_path / "sub" / "r.json"
    results.save({"a": 1}, out)
    assert json.loads(out.read_text()) == {"a": 1}
    assert f"wrote {out}" in capsys.readouterr().err


def test_a_run_record_says_what_ran_where_with_which_versions_and_when():
    import torch

    record = results.run_record("lora_latency", {"quick": True}, [{"x": 1}], device="cpu", start=time.time() - 2,
                                libraries=("numpy",), ratios={"a": 1.5})
    assert list(record) == ["benchmark", "command", "config", "results", "ratios", "device", "versions", "date",
                            "wall_seconds"]
    assert record["command"] == "python benchmarks/lora_latency.py"
    assert (Path(__file__).resolve().parents[1] / "benchmarks" / "lora_latency.py").is_file()
    assert record["versions"]["torch"] == torch.__version__ and "numpy" in record["versions"]
    assert record["wall_seconds"] >= 2 and len(record["date"]) == 10


# ---------------------------------------------------------------------------------------
# The benchmarks' one way of timing
# ---------------------------------------------------------------------------------------


def test_interleaved_medians_warms_up_then_times_each_call_in_turn():
    ran = []
    calls = {name: (lambda name=name: ran.append(name)) for name in "abc"}
    seconds = results.interleaved_medians(calls, rounds=3, repeats=2, warm_up=2)
    assert list(seconds) == ["a", "b", "c"] and all(s >= 0 for s in seconds.values())
    warm_up, timed = ran[:6], ran[6:]
    assert warm_up == ["a", "a", "b", "b", "c", "c"]
    # each round a different call goes first, and each takes its turn `repeats` times in a row
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]


def test_interleaved_medians_can_warm_each_turn_or_not_at_all():
    ran = []
    calls = {name: (lambda name=name: ran.append(name)) for name in "ab"}
    results.interleaved_medians(calls, rounds=2, warm_up=0, warm_each_turn=True)
    assert ran == ["a", "a", "b", "b", "b", "b", "a", "a"]  # one untimed, one timed run per turn


def test_interleaved_medians_is_the_median_of_each_call():
    slow = iter([0.03, 0, 0])  # one slow run among three: the median ignores it

    def sleep_then_fast():
        time.sleep(next(slow))

    seconds = results.interleaved_medians({"mostly_fast": sleep_then_fast, "slow": lambda: time.sleep(0.01)},
                                          rounds=3, warm_up=0)
    assert seconds["mostly_fast"] < 0.01 <= seconds["slow"]


# ---------------------------------------------------------------------------------------
# The GPU run's record (scripts/gpu_check.sh writes it; tests/test_gpu_check.py rehearses the run)
# ---------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="0" tests="3"><testcase classname="tests.test_cuda" name="test_a"/><testcase classname="tests.test_cuda"
name="test_b"><failure message="no"/></testcase><testcase classname="tests.test_cuda" name="test_c"/></testsuite>
</testsuites>"""


def test_a_gpu_check_record_says_which_steps_passed_and_what_the_run_left(tmp_path):
    (tmp_path / "pytest_cuda.xml").write_text(JUNIT)
    (tmp_path / "chapters_cuda.json").write_text(json.dumps([{"notebook": "05.ipynb", "status": "passed"}]))
    (tmp_path / "chapter5_bfloat16.json").write_text(json.dumps([{"notebook": "05.ipynb", "report": {"x": 1}}]))
    record = results.gpu_check_record("rehearse", [("wheels", 0, 3), ("tests", 1, 40)], tmp_path)
    assert record["benchmark"] == "gpu_check" and record["command"] == "bash scripts/gpu_check.sh"
    assert record["mode"] == "rehearse"
    assert record["results"] == [{"step": "wheels", "exit_status": 0, "seconds": 3},
                                 {"step": "tests", "exit_status": 1, "seconds": 40}]
    assert record["cuda_tests"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 0,
                                    "not_passed": ["tests.test_cuda::test_b"]}
    assert record["chapters"] == [{"notebook": "05.ipynb", "status": "passed"}]
    # one notebook per Chapter 5 run: its outcome, not a list of one; a run that wrote nothing is "missing"
    assert record["chapter5_gpt2"] == {"bfloat16": {"notebook": "05.ipynb", "report": {"x": 1}}, "float16": "missing"}
    for key in ("commit", "device", "versions", "date"):
        assert record[key], key
    json.dumps(record)  # a record, as save writes it


def test_a_gpu_check_record_of_a_run_that_left_nothing(tmp_path):
    record = results.gpu_check_record("full", [], tmp_path)
    assert record["cuda_tests"] == {"report": "missing"} and record["chapters"] == "missing"
    assert set(record["chapter5_gpt2"].values()) == {"missing"}


def test_a_bundle_gathers_every_record_and_unbundles_to_the_same_files(tmp_path):
    folder, out = tmp_path / "records", tmp_path / "unpacked"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps({"benchmark": "a", "results": [1]}))
    (folder / "b.json").write_text(json.dumps({"benchmark": "b", "results": [2]}))
    (folder / "half_written.json").write_text('{"benchmark": ')  # a step still writing: left for the next bundle
    (folder / "notes.txt").write_text("not a record")
    assert results.bundle(folder, tmp_path / "bundle.json") == ["a.json", "b.json"]
    written = results.unbundle(tmp_path / "bundle.json", out)
    assert sorted(p.name for p in written) == ["a.json", "b.json"]
    assert json.loads((out / "b.json").read_text()) == {"benchmark": "b", "results": [2]}


@pytest.mark.parametrize("name", ["../escape.json", "sub/dir.json", "record.txt"])
def test_unbundle_refuses_names_that_are_not_plain_json_files(tmp_path, name):
    (tmp_path / "bundle.json").write_text(json.dumps({"fine.json": {}, name: {}}))
    with pytest.raises(ValueError, match="expected a plain"):
        results.unbundle(tmp_path / "bundle.json", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.json").exists()  # not even fine.json


def test_unbundle_refuses_what_is_not_a_bundle(tmp_path):
    (tmp_path / "bundle.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a bundle"):
        results.unbundle(tmp_path / "bundle.json", tmp_path)
