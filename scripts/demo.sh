#!/usr/bin/env bash
# Sets everything up, then simulates a small dataset and processes it on the embedded LocalCluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cryodask demo --o demo "$@"
