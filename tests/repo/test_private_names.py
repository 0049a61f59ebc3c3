"""No module reaches a private name (``_name``) of another package of ours: what other packages use is
public, named for what it does. Modules of one package may share their private helpers.

The source is read with ``ast``: ``from pkg.mod import _name`` and ``mod._name`` where ``mod`` was
imported from our packages. Tests may reach private names; they are not read here.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "orchestrator", "nas_core", "nas_scam", "bench")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _package(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else module


def private_reaches(module: str, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every private name of another package that ``module`` reaches."""
    own = _package(module)
    bound: dict[str, str] = {}  # local name -> the module of ours it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES and not node.level:
            for alias in node.names:
                if _private(alias.name) and _package(node.module) != own:
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    bound[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in bound and _package(bound[node.value.id]) != own):
            found.append((node.lineno, f"{node.value.id}.{node.attr} ({bound[node.value.id]})"))
    return found


def test_no_module_reaches_a_private_name_of_another_package():
    bad = []
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            module = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            bad += [f"{f.relative_to(ROOT)}:{line}: {what}"
                    for line, what in private_reaches(module, ast.parse(f.read_text(), str(f)))]
    assert not bad, "private names reached from another package:\n" + "\n".join(bad)


def test_the_scan_sees_what_it_forbids():
    code = ("from orchestrator.runner import _tuner\nfrom api import results\nresults._client(s)\n"
            "from orchestrator import runner as r\nr._prepare_data()\n")
    assert [line for line, _ in private_reaches("bench.orchestration", ast.parse(code))] == [1, 3, 5]
    # one package shares its helpers; dunders and third-party privates are not ours to judge
    same = "from api.results import _reader\nimport ray\nray._private\nfrom api import errors\nerrors.__name__\n"
    assert private_reaches("api.service", ast.parse(same)) == []
