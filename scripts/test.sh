#!/usr/bin/env bash
# Runs the test suite (CUDA tests run on the emulated device without a GPU; every CUDA kernel
# variant is compiled through NVRTC when CuPy is installed). The CPU and emulated kernel variants
# the suite uses (all of them) are compiled first, in parallel, as `python -m fusedwarm build --all`
# does for a shared cache; on a warm cache this takes a second.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -c "import pytest" >/dev/null 2>&1 || pip_install pytest
"$PY" -m fusedwarm build --all --backend cpu,emu >/dev/null
exec "$PY" -m pytest "$@"
