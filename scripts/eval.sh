#!/usr/bin/env bash
# Sets up (scripts/setup.sh, idempotent) and runs the evaluator; arguments go to
# jobs/eval_libero.py (see --help). README's first command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${RSD_VENV:-$ROOT/.venv}"
cd "$ROOT"
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
exec "$VENV/bin/python" jobs/eval_libero.py "$@"
