#!/usr/bin/env bash
# Runs the long test matrices marked slow (left out of scripts/test.sh and CI's default run).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
"$PY" -c "import pytest" >/dev/null 2>&1 || pip_install pytest
exec "$PY" -m pytest -m slow "$@"
