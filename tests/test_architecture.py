"""The layers: the locked harness imports nothing of the optimizer, and no module of either imports itself back
through others (the import graph, every import counted: top-level, in functions, under TYPE_CHECKING)."""
from __future__ import annotations

import ast
import subprocess
import sys
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("harness", "hybrid")


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` imports (a `from package import module` counts as the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def test_the_import_graph_has_no_cycle():
    try:
        order = list(TopologicalSorter(import_graph()).static_order())
    except CycleError as e:
        pytest.fail(f"an import cycle: {' -> '.join(e.args[1])}")
    assert len(order) == len(modules())


def test_the_harness_imports_nothing_of_hybrid_statically():
    graph = import_graph()
    reaching = {name: sorted(d for d in deps if d.startswith("hybrid"))
                for name, deps in graph.items() if name.startswith("harness")}
    assert not {name: deps for name, deps in reaching.items() if deps}


def test_importing_every_harness_module_loads_no_hybrid_module():
    names = [name for name in modules() if name.startswith("harness") and not name.endswith("__main__")]
    script = ("import importlib, sys\n"
              f"for name in {names!r}:\n    importlib.import_module(name)\n"
              "print(sorted(m for m in sys.modules if m == 'hybrid' or m.startswith('hybrid.')))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_graph_sees_a_cycle(tmp_path, monkeypatch):
    """The check itself: two modules that import each other (one inside a function) are a cycle."""
    (tmp_path / "harness").mkdir()
    (tmp_path / "hybrid").mkdir()
    (tmp_path / "harness" / "__init__.py").write_text("")
    (tmp_path / "hybrid" / "__init__.py").write_text("")
    (tmp_path / "hybrid" / "a.py").write_text("from hybrid.b import thing\n")
    (tmp_path / "hybrid" / "b.py").write_text("def thing():\n    from . import a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(CycleError):
        list(TopologicalSorter(import_graph()).static_order())


def test_the_cli_and_every_method_load_no_llm_sdk_until_a_provider_is_made():
    """The Anthropic and OpenAI SDKs cost 1.6 s of import on a quiet core: a run without an LLM (and `hybrid --help`) never pays."""
    script = ("import importlib, sys, hybrid.cli, hybrid.loop, hybrid.llm.client\n"
              "from hybrid.config import METHODS\n"
              "for m in METHODS.values():\n    importlib.import_module(m.factory.partition(':')[0])\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('anthropic', 'openai')))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
