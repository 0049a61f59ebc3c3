# One entry for set-up + tests on a fresh machine. `make test` creates .venv if missing,
# installs the CPU torch from local disk and the project, then runs the whole suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install test test-fast demo clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so the project's looser range does not pull a CUDA build; a torch already
	# in the venv (a GPU user's own build) is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# the main job on the embedded default: smoke Table 2 (local Ray, local MLflow, synthetic data)
demo: install
	$(BIN)/nas-scam ablate experiments/table2.yaml --preset smoke

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
