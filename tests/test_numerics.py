"""lora_edu.numerics: the kernel paths really change the arithmetic; the tolerances hold and bite."""

import json
import os
import subprocess
import sys

import pytest
import torch

from lora_edu import results
from lora_edu.numerics import KERNEL_PATHS, loss_tolerance, matmul_tolerance

CAPABILITY = "import json, torch; print(json.dumps([torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()]))"


def capability_under(path: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", CAPABILITY], env={**env, **KERNEL_PATHS[path]},
                         capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out))


def test_each_kernel_path_changes_what_it_says():
    native, _ = capability_under("native")
    assert capability_under("no-vectors")[0] == "DEFAULT"
    assert capability_under("1-thread")[1] == 1
    if native in ("AVX2", "AVX512"):
        assert capability_under("avx2")[0] == "AVX2"
        assert capability_under("avx2-1-thread") == ("AVX2", 1)


def test_kernel_paths_set_only_variables_torch_and_its_libraries_read():
    known = {"ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS"}
    assert KERNEL_PATHS["native"] == {}
    for name, env in KERNEL_PATHS.items():
        assert set(env) <= known, name
        assert all(isinstance(v, str) for v in env.values())


@pytest.mark.parametrize("terms", [16, 512, 4096])
def test_matmul_tolerance_bounds_two_orders_of_one_sum(terms):
    g = torch.Generator().manual_seed(terms)
    a, b = torch.randn(64, terms, generator=g), torch.randn(terms, generator=g)
    forward = a @ b
    backward = (a.flip(1) @ b.flip(0))  # the same products, added in the other order
    pairwise = (a * b).view(64, -1, 2).sum(-1).sum(-1)  # and in pairs
    tol = matmul_tolerance(a.abs() @ b.abs(), terms)
    assert ((forward - backward).abs() <= tol).all()
    assert ((forward - pairwise).abs() <= tol).all()
    # ...and not so loose that an error of a thousandth of the magnitude would pass
    wrong = forward + 1e-3 * (a.abs() @ b.abs())
    assert ((wrong - forward).abs() > tol).all()


def test_matmul_tolerance_scales_with_the_dtype():
    assert matmul_tolerance(1.0, 100, torch.float64) < matmul_tolerance(1.0, 100, torch.float32)
    assert matmul_tolerance(2.0, 100) == 2 * matmul_tolerance(1.0, 100)


@pytest.mark.parametrize("kwargs, message", [
    ({"magnitude": 1.0, "terms": 0}, "terms must be a positive int"),
    ({"magnitude": 1.0, "terms": 2.5}, "terms must be a positive int"),
    ({"magnitude": 1.0, "terms": 8, "dtype": torch.int32}, "dtype must be a floating-point dtype"),
])
def test_matmul_tolerance_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        matmul_tolerance(**kwargs)


def test_loss_tolerance_is_four_times_the_spread_of_its_run():
    record = results.load("kernel_paths")
    spreads = {row["run"]: row["spread"] for row in record["results"]}
    for run, spread in spreads.items():
        assert loss_tolerance(run) == max(1e-5, 4 * spread)
    assert loss_tolerance() == max(loss_tolerance(run) for run in spreads)


def test_loss_tolerance_refuses_a_run_it_has_not_measured():
    with pytest.raises(ValueError, match="run must be one of .*lora.*; got 'lora r=8'"):
        loss_tolerance("lora r=8")


def test_the_committed_spreads_are_what_their_losses_say():
    record = results.load("kernel_paths")
    assert set(record["config"]["paths"]) == set(KERNEL_PATHS)
    for row in record["results"]:
        losses = list(row["final_loss"].values())
        assert set(row["final_loss"]) == set(KERNEL_PATHS)
        assert row["spread"] == max(losses) - min(losses)
    seeds = record["lora_seeds"]
    assert seeds["spread"] == max(seeds["final_loss"]) - min(seeds["final_loss"])


def test_what_the_readme_says_of_the_spreads():
    spread = {row["run"]: row["spread"] for row in results.load("kernel_paths")["results"]}
    seeds = results.load("kernel_paths")["lora_seeds"]["spread"]
    # a forward pass, and the runs of every chapter, keep to the seventh digit
    assert all(spread[run] < 1e-6 for run in ("pretrained", "full", "lora", "lora-100", "loraplus", "magnitudes"))
    # prompt tuning at 0.1 carries the differences into the fourth decimal...
    assert 1e-4 < spread["prompt"]
    # ...and still less than a change of seed moves a run
    assert spread["prompt"] < seeds
