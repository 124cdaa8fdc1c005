"""The import rule of docs/architecture.md, read from the source (imports inside functions included).

Layers, bottom first: the core (adapters, genome, materialiser, export, evaluator, methods, tasks, models, zoo,
logs, files, errors), the search engine (``eep.search``, ``eep.parallel``), the application layer (``eep.app``,
``eep.settings``) and the command-line tools (``eep.cli``, ``eep.zoo.cli``). A module imports only its own layer
and those below; no module imports a private (``_``-prefixed) name of another module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "engine": 1, "app": 2, "cli": 3}


def layer(module: str) -> int | None:
    """The layer of an eep module name (None for the package itself, which only holds lazy entry points)."""
    if module == "eep":
        return None
    if module.startswith(("eep.cli", "eep.zoo.cli")):
        return LAYERS["cli"]
    if module.startswith(("eep.app", "eep.settings", "eep.schema")):
        return LAYERS["app"]
    if module.startswith(("eep.search", "eep.parallel")):
        return LAYERS["engine"]
    return LAYERS["core"]


def module_name(path: Path) -> str:
    """``eep.app.search`` for eep/app/search.py (a file outside the checkout: its stem)."""
    if not path.is_relative_to(ROOT):
        return path.stem
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """(imported module, imported names, line) for every import statement of ``path``, at any depth."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


SOURCES = sorted((ROOT / "eep").rglob("*.py"))
OTHERS = sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py")])


def test_every_eep_module_imports_only_its_layer_and_below():
    wrong = []
    for path in SOURCES:
        here = layer(module_name(path))
        for target, names, line in imports(path):
            for full in [target, *(f"{target}.{n}" for n in names)]:
                there = layer(full) if full.startswith("eep") else None
                if here is not None and there is not None and there > here:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {full}")
                    break
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


@pytest.mark.parametrize("group", ["eep", "tests and bench"])
def test_no_private_name_is_imported_across_modules(group):
    wrong = []
    for path in SOURCES if group == "eep" else OTHERS:
        for target, names, line in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if target.startswith("eep") and private:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(private)} from {target}")
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name: (n.module or "") + "." + a.name if isinstance(n, ast.ImportFrom) else a.name
                   for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases.get(node.value.id, "").startswith("eep")):
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "private names used across modules:\n" + "\n".join(wrong)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from eep.search.final import pick_final\n")
    assert [(t, n) for t, n, _ in imports(source)] == [("eep.search.final", ["pick_final"])]
