#!/usr/bin/env bash
# One-time setup of a fresh Debian 12 / Python 3.11 machine (CPU or GPU) for rsd_ray:
#   1. the Mesa GL libraries for headless MuJoCo rendering (what pip cannot install),
#   2. a virtual environment in .venv (override with RSD_VENV) with the pinned stack in
#      constraints.txt and this package (editable, with the test extras),
#   3. robosuite's private macro file (silences a warning at every import).
# Idempotent: a second run only checks what is there. Needs only PyPI and Debian's registries.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RSD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

GL_PACKAGES="libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri libglx-mesa0 libosmesa6"
if ! dpkg -s $GL_PACKAGES >/dev/null 2>&1; then
    echo "[setup] installing Mesa GL libraries: $GL_PACKAGES"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $GL_PACKAGES >/dev/null
fi

"$PY" - <<'PYCHECK'
import sys
if sys.version_info[:2] not in ((3, 10), (3, 11)):
    sys.exit(f"rsd_ray needs CPython 3.10 or 3.11 (mujoco 2.3.7 has no wheels for {sys.version.split()[0]}); "
             "set PYTHON=/path/to/python3.11")
PYCHECK

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -U pip
fi

# A -c on the command line replaces pip's configured constraint file; keep the machine's too.
EXTRA_C=()
PIP_CONS="$("$VENV/bin/python" -m pip config get global.constraint 2>/dev/null || true)"
[ -n "$PIP_CONS" ] && [ -f "$PIP_CONS" ] && EXTRA_C=(-c "$PIP_CONS")
STAMP="$VENV/.rsd_ray_installed"
WANT="$(cat "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing the pinned stack into $VENV (first time: a few minutes)"
    # (grep drops pip's notes about this machine's optional local index folders)
    "$VENV/bin/python" -m pip install -q -c "$ROOT/constraints.txt" "${EXTRA_C[@]}" -e "$ROOT[dev]" 2>&1 \
        | { grep -v -E "^WARNING: Location .* is ignored" || true; }
    echo "$WANT" > "$STAMP"
fi

"$VENV/bin/python" - <<'PYMACRO'
import os, shutil, robosuite
d = os.path.dirname(robosuite.__file__)
if not os.path.exists(os.path.join(d, "macros_private.py")):
    shutil.copyfile(os.path.join(d, "macros.py"), os.path.join(d, "macros_private.py"))
PYMACRO
echo "[setup] ready: $VENV"
