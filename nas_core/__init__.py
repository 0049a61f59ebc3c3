"""Pure-PyTorch core of NAS-SCAM: data, search space, models, losses, metrics and loops.

Never imports ray, mlflow or fastapi (tests/repo/test_imports.py checks it).
"""

__version__ = "0.1.0"
