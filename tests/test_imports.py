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
