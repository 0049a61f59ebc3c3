import subprocess
import sys


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
