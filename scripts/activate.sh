# Sourced by scripts/eval.sh and scripts/test.sh: runs the idempotent setup, then sets the venv
# and the headless-rendering defaults. Defines ROOT and VENV.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${RSD_VENV:-$ROOT/.venv}"
cd "$ROOT"
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
