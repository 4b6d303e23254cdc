#!/usr/bin/env bash
# Sets up (scripts/setup.sh, idempotent) and runs the whole test suite on the CPU.
# README's test command and CI's .ci/run are this script. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" RAY_DEDUP_LOGS=0
exec "$VENV/bin/python" -m pytest -q -ra --durations=15 -p no:cacheprovider "$@"
