#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) with cryodask and its test dependencies installed.
# Idempotent: reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $PY is older than Python 3.11; set PYTHON=/path/to/python3.11+" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >.venv/setup.log 2>&1 || { cat .venv/setup.log >&2; exit 1; }
fi
stamp=.venv/.cryodask-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing cryodask and its dependencies into .venv"
  .venv/bin/python -m pip install -q -e ".[test]" >.venv/setup.log 2>&1 || { cat .venv/setup.log >&2; exit 1; }
  echo "$want" > "$stamp"
fi
