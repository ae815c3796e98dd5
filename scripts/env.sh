# Sourced by demo.sh and test.sh: prepares a Python environment for fusedwarm and sets $PY.
# An existing torch is used as it is (the virtual environment sees the system's packages); with
# no torch, the CPU build torch==2.13.0 is installed (pinned: an unpinned torch pulls gigabytes
# of CUDA packages).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [ -x "$VENV/bin/python" ] || "$BASE_PY" -m venv --system-site-packages "$VENV" >/dev/null 2>&1; then
  PY="$VENV/bin/python"
  export PATH="$VENV/bin:$PATH"
  pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
else
  # No venv module (Debian/Ubuntu without python3-venv): install into the user's site instead.
  rm -rf "$VENV"
  echo "fusedwarm: could not create $VENV; installing into the user site (apt-get install python3-venv avoids this)"
  PY="$BASE_PY"
  export PATH="$HOME/.local/bin:$PATH"
  pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check --user "$@"; }
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "fusedwarm: no torch found; installing torch==2.13.0 (CPU build)"
  pip_install torch==2.13.0
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
