"""The set-up promises: one place pins versions, and the loose bounds admit the pins."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: requirements.txt pins exact versions"
            out[req.name.lower().replace("_", "-")] = Version(spec.version)
    return out


def test_every_dependency_is_pinned_within_its_bounds():
    pinned = pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is a dependency but not pinned in requirements.txt"
        assert dep.specifier.contains(pinned[name]), f"pin {name}=={pinned[name]} is outside {dep.specifier}"


def test_the_book_tooling_is_pinned():
    pinned = pins()
    assert pinned["torch"] == Version("2.13.0")
    assert Version("1") <= pinned["jupyter-book"] < Version("2")
    for name in ("nbval", "pytest", "hypothesis", "bitsandbytes", "transformers", "peft", "sphinxcontrib-bibtex"):
        assert name in pinned, name


def test_conda_users_get_the_same_pins():
    env = (ROOT / "environment.yml").read_text()
    assert "-r requirements.txt" in env and "==" not in env


def test_ci_runs_make_test_the_kernel_paths_then_the_python_matrix():
    commands = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    # Everything is in `make test`; before it, .ci/run only installs Chromium for the browser test,
    # after it the notebooks run again as another CPU computes, and the unit tests on the other
    # claimed Python versions.
    assert commands[-3:] == ["make test", "make kernels", "make matrix"]
    assert not any("pytest" in c or c.lstrip().startswith("make") for c in commands[:-3])


def claimed_versions() -> list[str]:
    classifiers = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["classifiers"]
    prefix = "Programming Language :: Python :: "
    return [c.removeprefix(prefix) for c in classifiers if c.startswith(prefix + "3.")]


def test_the_claimed_python_versions_are_stated_alike_everywhere():
    versions = claimed_versions()
    assert versions[0] == "3.11"  # the oldest the pins install on (numpy 2.4, transformers 5)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == f">={versions[0]}"
    stated = ", ".join(versions[:-1]) + f" and {versions[-1]}"
    for page in ("README.md", "book/intro.md"):
        assert f"Python {stated}" in " ".join((ROOT / page).read_text().split()), f"{page} should say Python {stated}"


def test_the_matrix_finds_the_claimed_versions_and_the_cpu_route_takes_torch_from_pytorch(tmp_path):
    import subprocess

    script = (ROOT / "scripts" / "python_matrix.sh").read_text()
    assert "classifiers" in script and "download.pytorch.org/whl/cpu" in script
    dry = subprocess.run(["make", "-n", "-B", "setup", "TORCH=cpu", f"VENV={tmp_path / 'v'}"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    torch_line = next(line for line in dry.splitlines() if "download.pytorch.org/whl/cpu" in line)
    assert "--no-deps" in torch_line and "torch==" in torch_line
    assert dry.index("whl/cpu") < dry.index("-r requirements.txt")  # torch first: the pins then keep it
    plain = subprocess.run(["make", "-n", "-B", "setup", f"VENV={tmp_path / 'v'}"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "download.pytorch.org" not in plain
