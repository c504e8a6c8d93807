"""Committed benchmark results say where, when and with what they were measured; the scripts share one way
of timing and of recording, and the sweeps still write what the chapters read, and resume."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

from lora_edu import results

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = sorted((Path(__file__).resolve().parents[1] / "lora_edu" / "results").glob("*.json"))
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_takes_the_shared_options_records_alike_and_times_one_way(script):
    text = script.read_text()
    for name in ("benchmark_arguments", "run_record", "save"):
        assert name in text, f"{script.name} does not use lora_edu.results.{name}"
    assert "perf_counter" not in text, f"{script.name} times by hand: use lora_edu.results.interleaved_medians"
    assert "sys.path" not in text and "importlib" not in text, f"{script.name} imports from another script"


def benchmark(name: str):
    """benchmarks/<name>.py as a module (the folder is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# The three sweeps, their training faked: what the chapters read, and resuming
# ---------------------------------------------------------------------------------------

# What the chapters (and lora_edu) read of each sweep's record: "*" is every key or item.
READ = {
    "lora_rank_sweep": ["date", "versions.torch", "base_milton_val_loss", "results.ranks.*.milton_val_loss",
                        "results.budget.*.milton_val_loss", "results.budget.*.trainable_parameters"],
    "dora_analysis": ["date", "config.full_lr", "config.lora_lr", "results.*.method", "results.*.seed",
                      "results.*.milton_val_loss", "results.*.trainable_parameters", "results.*.points",
                      "correlations_per_seed.*.*.correlation", "correlations_per_seed.*.*.demeaned"],
    "loraplus_sweep": ["date", "versions.torch", "results.grid.*.lr_a", "results.grid.*.lr_b",
                       "results.grid.*.seed", "results.grid.*.loss", "results.width.*.width",
                       "results.width.*.ratio", "results.width.*.lr_b", "results.width.*.seed",
                       "results.width.*.loss"],
}


def read(record, path: str) -> list:
    """Every value at ``path`` (keys joined by dots, "*" for all); KeyError where one is missing."""
    values = [record]
    for key in path.split("."):
        if key == "*":
            values = [v for value in values for v in (value.values() if isinstance(value, dict) else value)]
        else:
            values = [value[key] for value in values]
    assert values, f"nothing at {path}"
    return values


def record_reads_like_the_committed_one(name: str, record: dict) -> None:
    committed = results.load(name)
    for path in READ[name]:
        read(committed, path), read(record, path)
    assert record["benchmark"] == committed["benchmark"] and record["command"] == committed["command"]


def fake_loss(*numbers) -> float:
    return 1.5 + random.Random(repr(numbers)).random() / 10


def test_rank_sweep_records_what_chapters_2_and_6_read(tmp_path, monkeypatch):
    sweep = benchmark("lora_rank_sweep")

    def run(targets, r, fine_tune):
        return {"targets": targets, "r": r, "trainable_parameters": 100 * r, "milton_val_loss": fake_loss(r),
                "history": {"step": [0, fine_tune.steps], "val_loss": [2.0, 1.6]}}

    monkeypatch.setattr(sweep, "run", run)
    monkeypatch.setattr(sweep, "evaluate", lambda *args, **kwargs: 2.0)
    record = sweep.main(["--quick", "--out", str(tmp_path / "sweep.json")])
    assert json.loads((tmp_path / "sweep.json").read_text()) == record
    record_reads_like_the_committed_one("lora_rank_sweep", record)
    assert list(record["results"]["ranks"]) == ["1", "2"] and record["config"]["quick"] is True
    assert record["base_milton_val_loss"] == 2.0


@pytest.fixture
def dora_analysis(monkeypatch):
    """benchmarks/dora_analysis.py with each fine-tune faked; ``.ran`` lists the runs it made."""
    sweep = benchmark("dora_analysis")
    sweep.ran = []

    def run(method, seed, fine_tune, snapshot_steps):
        sweep.ran.append((method, seed))
        noise = random.Random(f"{method} {seed}")
        points = [{"step": s, "layer": layer, "delta_m": noise.random(), "delta_d": noise.random()}
                  for s in snapshot_steps for layer in range(4)]
        return {"method": method, "seed": seed, "trainable_parameters": 1000,
                "milton_val_loss": fake_loss(method, seed), "points": points}

    monkeypatch.setattr(sweep, "run", run)
    monkeypatch.setattr(sweep, "evaluate", lambda *args, **kwargs: 2.0)
    return sweep


def test_dora_analysis_records_what_chapter_6_reads(tmp_path, dora_analysis):
    record = dora_analysis.main(["--quick", "--out", str(tmp_path / "analysis.json")])
    record_reads_like_the_committed_one("dora_analysis", record)
    assert dora_analysis.ran == [(method, 0) for method in dora_analysis.METHODS]
    assert set(record["correlations_per_seed"]) == {"full", "lora_r8", "dora_r8"}  # lora_r9 is not analysed
    assert record["config"]["snapshot_steps"] == list(dora_analysis.QUICK["snapshot_steps"])


def test_dora_analysis_resumes_and_reruns_a_run_that_lacks_its_points(tmp_path, dora_analysis):
    out = tmp_path / "analysis.json"
    dora_analysis.main(["--quick", "--out", str(out)])
    earlier = json.loads(out.read_text())
    earlier["wall_seconds"] = 100
    for run in earlier["results"]:
        if run["method"] == "dora_r8":
            run["points"] = []
    out.write_text(json.dumps(earlier))
    dora_analysis.ran.clear()
    record = dora_analysis.main(["--quick", "--out", str(out)])
    assert dora_analysis.ran == [("dora_r8", 0)]
    assert sorted((r["method"], r["seed"]) for r in record["results"]) == sorted(
        (method, 0) for method in dora_analysis.METHODS)
    assert record["wall_seconds"] >= 100  # counts the earlier run's seconds too


@pytest.fixture
def loraplus_sweep(monkeypatch):
    """benchmarks/loraplus_sweep.py with each run faked (its best cell inside the grid); ``.ran`` counts."""
    sweep = benchmark("loraplus_sweep")
    sweep.ran = []

    def lora_run(base, config, lr_a, lr_b, seed, run_config, data):
        sweep.ran.append((lr_a, lr_b, seed))
        if getattr(sweep, "stop_after", None) == len(sweep.ran):
            raise KeyboardInterrupt
        return fake_loss(lr_a, lr_b, seed)

    monkeypatch.setattr(sweep, "lora_run", lora_run)
    monkeypatch.setattr(sweep, "width_base", lambda width, pretrain: (None, {}))
    return sweep


def test_loraplus_sweep_records_what_chapter_3_reads(tmp_path, loraplus_sweep):
    record = loraplus_sweep.main(["--quick", "--out", str(tmp_path / "sweep.json")])
    record_reads_like_the_committed_one("loraplus_sweep", record)
    assert record["complete"] is True and record["summary"]["grid"]["best"]["n"] == 2
    grid, width = record["results"]["grid"], record["results"]["width"]
    assert {r["seed"] for r in grid} == {0, 1} and len({(r["lr_a"], r["lr_b"]) for r in grid}) == 4
    assert sorted((r["ratio"], r["seed"]) for r in width) == [(1, 0), (1, 1), (4, 0), (4, 1)]


def without_seconds(record: dict) -> dict:
    """The runs of a record, less how long each took."""
    return {part: [{k: v for k, v in run.items() if k != "seconds"} for run in runs]
            for part, runs in record["results"].items()}


def test_loraplus_sweep_resumes_where_it_was_stopped(tmp_path, loraplus_sweep):
    out = tmp_path / "sweep.json"
    whole = loraplus_sweep.main(["--quick", "--out", str(tmp_path / "whole.json")])
    loraplus_sweep.ran.clear()
    loraplus_sweep.stop_after = 6
    with pytest.raises(KeyboardInterrupt):
        loraplus_sweep.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["complete"] is False
    loraplus_sweep.stop_after = None
    resumed = loraplus_sweep.main(["--quick", "--out", str(out)])
    assert len(loraplus_sweep.ran) == len(whole["results"]["grid"]) + len(whole["results"]["width"]) + 1
    assert without_seconds(resumed) == without_seconds(whole) and resumed["complete"] is True


# ---------------------------------------------------------------------------------------
# Chapter 9's fine-tunes, training faked: every run the chapter reads, and resuming
# ---------------------------------------------------------------------------------------


@pytest.fixture
def memory_fine_tunes(monkeypatch):
    sweep = benchmark("memory_fine_tunes")
    sweep.ran, sweep.stop_after = [], None

    def fine_tune(model, config, data, block_size):
        if sweep.stop_after is not None and len(sweep.ran) == sweep.stop_after:
            raise KeyboardInterrupt  # as a person stopping it would
        sweep.ran.append((type(model).__name__, config.lr, config.seed, block_size))
        numbers = (type(model).__name__, config.lr, config.seed, block_size, sum(p.numel() for p in model.parameters()
                                                                               if p.requires_grad))
        return {"milton_val_loss": fake_loss(*numbers), "shakespeare_val_loss": fake_loss("s", *numbers),
                "trainable_parameters": numbers[-1]}

    monkeypatch.setattr(sweep, "fine_tune", fine_tune)
    monkeypatch.setattr(sweep, "evaluate", lambda model, ids, block_size: fake_loss(block_size))
    return sweep


def test_memory_fine_tunes_runs_every_method_seed_and_attention(tmp_path, memory_fine_tunes):
    record = memory_fine_tunes.main(["--out", str(tmp_path / "runs.json")])
    assert record["complete"] is True
    meft = [r for r in record["results"] if r["part"] == "meft"]
    long = [r for r in record["results"] if r["part"] == "long_context"]
    assert {r["method"] for r in meft} == {"lora", "adapters", "meft1", "meft2", "meft3"}
    for method, grid in memory_fine_tunes.MEFT_GRIDS.items():  # the grid on seed 0, then the other seeds
        tried = {r["lr"]: r["milton_val_loss"] for r in meft if r["method"] == method and r["seed"] == 0}
        assert set(grid) <= set(tried) and len(tried) <= 7
        best = min(tried, key=tried.get)
        assert min(tried) < best < max(tried) or len(tried) == 7  # grown until the best lies inside
        assert {r["seed"] for r in meft if r["method"] == method and r["lr"] == best} == {0, 1, 2}
    assert all("milton_val_loss_before" in r for r in meft if r["method"].startswith("meft"))
    trained = {r["method"]: r["trainable_parameters"] for r in meft}
    assert trained["lora"] == 65_536 and trained["adapters"] == trained["meft1"] == 66_816  # similar budgets
    cells = {(r["method"], r["attention"]) for r in long}
    assert cells == {(m, a) for m in ("lora", "lora_embed_norm", "full") for a in ("s2", "full")} | {("lora", "s2_rolled")}
    assert all(len({r["seed"] for r in long if (r["method"], r["attention"]) == cell}) == 3 for cell in cells)
    assert {r["lr"] for r in long if r["method"] == "lora_embed_norm"} >= {record["config"]["long_lrs"]["lora_embed_norm"]}
    assert memory_fine_tunes.LONG == {"lora": 3e-3, "full": 3e-4}  # a run leaves the module's table alone


def test_memory_fine_tunes_resumes_where_it_was_stopped(tmp_path, memory_fine_tunes):
    whole = memory_fine_tunes.main(["--out", str(tmp_path / "whole.json")])
    out = tmp_path / "runs.json"
    memory_fine_tunes.ran.clear()
    memory_fine_tunes.stop_after = 7
    with pytest.raises(KeyboardInterrupt):
        memory_fine_tunes.main(["--out", str(out)])
    assert len(json.loads(out.read_text())["results"]) == 7
    memory_fine_tunes.stop_after = None
    resumed = memory_fine_tunes.main(["--out", str(out)])
    assert len(memory_fine_tunes.ran) == len(whole["results"])  # nothing ran twice
    strip = lambda record: [{k: v for k, v in r.items() if k != "seconds"} for r in record["results"]]
    assert strip(resumed) == strip(whole)
