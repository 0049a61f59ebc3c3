#!/usr/bin/env bash
# Every GPU measurement the project needs in one budgeted run (about 8 minutes on one H100-class card):
#   bash bench/gpu_suite.sh --out "$OUT"          # summary.md + summary.json (+ one log per part) in $OUT
#   bash bench/gpu_suite.sh --dry-run --out /tmp/x   # CPU, tiny sizes: checks the plumbing in under a minute
# Interpreter: $PYTHON, else .venv/bin/python of the repository, else python3. Options: bench/gpu_suite.py --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then
  py="$root/.venv/bin/python"
else
  py="python3"
fi
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
echo "[suite] $(date -u +%FT%TZ) interpreter $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
exec "$py" -u "$root/bench/gpu_suite.py" "$@"
