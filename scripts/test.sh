#!/usr/bin/env bash
# Runs the test suite (CUDA tests skip without a GPU; the nvcc compile test runs when nvcc exists).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -c "import pytest" >/dev/null 2>&1 || pip_install pytest
exec "$PY" -m pytest "$@"
