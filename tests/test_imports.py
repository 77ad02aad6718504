"""How the engine's modules depend on each other: cheap to import where only a little is needed."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_error_type_loads_neither_the_converter_nor_torch() -> None:
    code = (
        "import sys\n"
        "from quant_core import QuantError\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('quant_core') or m == 'torch')\n"
        "assert loaded == ['quant_core', 'quant_core.errors'], loaded\n"
        "from quant_core import convert_file\n"
        "assert 'quant_core.convert' in sys.modules and callable(convert_file)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str) -> set[str]:
    """Modules of this repository that `path` imports anywhere in its body (lazy imports inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted([*ROOT.glob("quant_core/**/*.py"), *ROOT.glob("nodes/*.py")])
    modules = {_module_name(f): f for f in files}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = {m for m in _imports(path, package) if m in modules and m != name}
    return graph


def test_no_import_cycles_among_the_pack_modules() -> None:
    graph = import_graph()
    assert "quant_core.convert" in graph and "nodes.loader" in graph
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for imported in sorted(graph[module]):
            # a package's __init__ importing its own submodules is how a package is built, not a cycle
            if not imported.startswith(module + "."):
                visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_readme_code_map_lists_every_module_once() -> None:
    readme = (ROOT / "README.md").read_text()
    code_map = readme[readme.index("### Code map") : readme.index("### Where a change goes")]
    listed = [line.split("`")[1] for line in code_map.splitlines() if line.startswith("| `")]
    modules = sorted(str(f.relative_to(ROOT)) for f in [*ROOT.glob("quant_core/**/*.py"), *ROOT.glob("nodes/*.py")])
    assert sorted(m for m in listed if m.startswith(("quant_core/", "nodes/"))) == modules


def test_every_engine_name_imported_anywhere_exists() -> None:
    """Benchmarks and tests import engine names inside functions too, on paths no test runs (a benchmark's
    evaluation step): a name moved or renamed in quant_core must not leave a stale import behind."""
    files = sorted([*ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("nodes/*.py")])
    missing = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("quant_core"):
                module = importlib.import_module(node.module)
                missing += [
                    f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name)
                    and importlib.util.find_spec(f"{node.module}.{alias.name}") is None
                ]
    assert missing == []
