#!/usr/bin/env bash
# Sets everything up (system packages, .venv) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
