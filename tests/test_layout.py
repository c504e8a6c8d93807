"""The package's layout, as the README states it: imports run one way, and no module
imports another's private names (issue 27)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lora_edu"
FOUNDATIONS = ("lora_edu.plumbing", "lora_edu.data", "lora_edu.results")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names, at top level) for every import of a lora_edu module in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_edu"):
            names = [a.name for a in node.names]
            if node.module == "lora_edu":  # from lora_edu import results: a module
                found += [(f"lora_edu.{n}", [], id(node) in top) for n in names]
            else:
                found.append((node.module, names, id(node) in top))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], id(node) in top) for a in node.names if a.name.startswith("lora_edu")]
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_private_name_crosses_a_module():
    crossings = [f"{name} imports {n} from {module}"
                 for name, path in MODULES.items()
                 for module, names, _ in package_imports(path) if module != name
                 for n in names if n.startswith("_")]
    assert crossings == []


def test_no_import_cycle():
    graph = {name: {m for m, _, _ in package_imports(path) if m in MODULES and m != name}
             for name, path in MODULES.items()}
    # a package imports its own submodules to hand their names on: not a cycle of ideas
    graph = {name: {m for m in deps if not m.startswith(name + ".")} for name, deps in graph.items()}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, seen + (d,))) for d in graph[start])

    assert [name for name in graph if reaches(name, name)] == []


def test_the_foundations_import_no_other_module_of_the_package():
    for name in FOUNDATIONS:
        assert {m for m, _, _ in package_imports(MODULES[name])} <= {name}, name


@pytest.mark.parametrize("name", ["lora_edu.lora", "lora_edu.dora", "lora_edu.serving", "lora_edu.peft_family"])
def test_chapter_modules_import_at_the_top(name):
    """A lazy import inside a function is how a cycle hides; these modules need none."""
    assert [m for m, _, top in package_imports(MODULES[name]) if not top] == []
