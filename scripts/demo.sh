#!/usr/bin/env bash
# Runs the demo: torch.optim.AdamW on fp32 weights vs fusedwarm.AdamW on bf16 weights.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m fusedwarm.demo "$@"
