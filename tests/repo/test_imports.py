"""Imports point one way: nas_scam (the console entry) -> api -> orchestrator -> nas_core, and no circles.

The source is read with ``ast``, so an import inside a function counts as much as one at the top: a
lazy import still runs, only later.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# lowest first: a package may import itself and the packages before it, never one after it
LAYERS = ("nas_core", "orchestrator", "api", "nas_scam")
# third-party packages a layer must not import (orchestrator: no HTTP server; api: Ray only through the
# orchestrator's job door)
BANNED = {"nas_core": {"ray", "mlflow", "fastapi", "starlette", "uvicorn", "optuna"},
          "orchestrator": {"fastapi", "starlette", "uvicorn"},
          "api": {"ray"}}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def imports(name: str, path: Path, top_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``; ``from pkg import sub`` names the submodule
    when it is one. ``top_level_only``: what runs when the module is imported (no function bodies, no
    ``if TYPE_CHECKING:`` blocks)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and (isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                                   or isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)):
                continue
            if isinstance(child, ast.Import):
                out.extend((alias.name, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package, one level up per extra dot
                    base = ".".join(package[:len(package) - child.level + 1] + ([child.module] if child.module else []))
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    out.append((sub if sub in MODULES else base, child.lineno))
            visit(child)

    visit(tree)
    return out


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_walk_sees_every_package_and_lazy_imports():
    assert {name.split(".")[0] for name in MODULES} == set(LAYERS)
    # orchestrator.runner imports ray inside its functions only: the walk must see it
    assert "ray" in {m.split(".")[0] for m, _ in imports("orchestrator.runner", MODULES["orchestrator.runner"])}
    assert "ray" not in {m.split(".")[0] for m, _ in imports("orchestrator.runner", MODULES["orchestrator.runner"],
                                                             top_level_only=True)}
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_points_up_or_outside_its_layer(layer):
    wrong = []
    for name, path in MODULES.items():
        if name.split(".")[0] != layer:
            continue
        for target, line in imports(name, path):
            top = target.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > LAYERS.index(layer) or top in BANNED.get(layer, ()):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for target, _ in imports(name, path):
            if target.split(".")[0] in LAYERS:
                graph.setdefault(name.split(".")[0], set()).add(target.split(".")[0])
    for pkg in graph:
        graph[pkg].discard(pkg)
    assert _circles(graph) == []


def test_no_circle_between_modules():
    def graph(top_level_only: bool) -> dict[str, set[str]]:
        return {name: {t for t, _ in imports(name, path, top_level_only) if t in MODULES and t != name}
                for name, path in MODULES.items()}

    # what runs at import time: a circle there breaks or half-initialises a module
    assert _circles(graph(top_level_only=True)) == []
    # and none through function-level imports either (the cell/stacked one is gone: StackedCell(Cell))
    circles = _circles(graph(top_level_only=False))
    assert not circles, f"modules that import each other (also inside functions): {circles}"


def test_nas_core_imports_no_orchestration_stack():
    # a fresh interpreter: importing every nas_core module must not pull ray, mlflow or fastapi
    code = (
        "import importlib, pkgutil, sys, nas_core\n"
        "for m in pkgutil.walk_packages(nas_core.__path__, 'nas_core.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in ('ray', 'mlflow', 'fastapi') if n in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"nas_core imported {out.stdout.strip()}"


def _nas_core_import_graph() -> dict[str, set[str]]:
    """{module: nas_core modules it imports}, read from the source (imports inside functions and under
    TYPE_CHECKING count: a deferred import is still an arrow)."""
    import ast
    from pathlib import Path

    import nas_core

    root = Path(nas_core.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[:-1]  # what a relative import starts from, for a module and an __init__ alike
        name = ".".join(package if parts[-1] == "__init__" else parts)
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package[:len(package) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        imports[name] = targets
    return {m: {t for t in ts if t in imports and t != m} for m, ts in imports.items()}


def test_nas_core_has_no_import_circle():
    graph = _nas_core_import_graph()
    assert {"nas_core.search_space.stacked", "nas_core.search_space.cell"} <= graph.keys()  # the graph is read
    assert "nas_core.search_space.cell" in graph["nas_core.search_space.stacked"]
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_script_folder_shadows_a_package():
    # bench/ and tools put their own folder first on sys.path; a bench/api.py there made every later
    # `import api` (a spawned inference worker's, after a bench test) find the script instead of the package
    shadowing = [f"{d}/{f.name}" for d in ("bench", "tests", "experiments", "docker") if (ROOT / d).is_dir()
                 for f in (ROOT / d).glob("*.py") if f.stem in LAYERS]
    assert not shadowing, shadowing
