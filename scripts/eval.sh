#!/usr/bin/env bash
# Sets up (scripts/setup.sh, idempotent) and runs the evaluator; arguments go to
# jobs/eval_libero.py (see --help). README's first command.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/activate.sh"
exec "$VENV/bin/python" jobs/eval_libero.py "$@"
