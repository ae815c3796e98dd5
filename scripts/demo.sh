#!/usr/bin/env bash
# Runs the demo: torch.optim.AdamW on fp32 weights vs fusedwarm.AdamW on bf16 weights (exact, and with int8 states).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m fusedwarm.demo "$@"
