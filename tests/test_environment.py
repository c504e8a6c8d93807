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


def test_ci_runs_make_test_only():
    commands = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    # Everything is in `make test`; before it, .ci/run only installs Chromium for the browser test.
    assert commands[-1] == "make test"
    assert not any("pytest" in c or c.lstrip().startswith("make") for c in commands[:-1])
