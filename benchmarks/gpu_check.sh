#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in stages that each fit one device call (10 minutes):
#
#   bash benchmarks/gpu_check.sh build     # JIT build for the visible GPU, nvidia-smi, versions
#   bash benchmarks/gpu_check.sh test      # the whole test suite (CUDA tests included)
#   bash benchmarks/gpu_check.sh step      # benchmarks/step.py --device cuda (1M to 1B parameters)
#   bash benchmarks/gpu_check.sh matmul    # benchmarks/pam_matmul.py --device cuda
#   bash benchmarks/gpu_check.sh loop      # benchmarks/train_loop.py at GPT-2-small shape
#   bash benchmarks/gpu_check.sh train     # benchmarks/train.py --preset gpt2-small (STEPS, CONFIGS)
#
# Logs, result JSON/markdown/plots and a one-line-per-stage summary go under $OUT (the device
# tool's output folder; /tmp/fusedwarm_gpu when unset), to be committed under
# benchmarks/results/ with the device named. The extension cache stays outside $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-/tmp/fusedwarm_gpu}"
mkdir -p "$OUT"
export PYTHONPATH=.
export FUSEDWARM_CACHE_DIR="${FUSEDWARM_CACHE_DIR:-/tmp/fusedwarm_cache}"
PY="${PYTHON:-python}"

# run NAME COMMAND...: runs it with its output in $OUT/NAME.log; one summary line (exit status,
# seconds) in $OUT/summary.txt and on stdout.
run() {
  local name=$1
  shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log"
  return $rc
}

stage=${1:-}
case "$stage" in
  build)
    nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
    run versions "$PY" -c "import torch, platform; print(platform.python_version(), torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
    run build "$PY" -m fusedwarm build --all --verbose
    ;;
  test)
    run tests "$PY" -m pytest -q -rs --junitxml="$OUT/tests.xml"
    ;;
  step)
    run step "$PY" benchmarks/step.py --device cuda --out "$OUT/step_cuda.json"
    ;;
  matmul)
    run pam_matmul "$PY" benchmarks/pam_matmul.py --device cuda --out "$OUT"
    ;;
  loop)
    run train_loop "$PY" benchmarks/train_loop.py --device cuda --layers 12 --dim 768 --heads 12 --seq 1024 \
      --batch 8 --bucket-cap-mb 25 --rounds 20 --out "$OUT/train_loop_cuda.json"
    ;;
  train)
    run train "$PY" benchmarks/train.py --device cuda --preset gpt2-small --steps "${STEPS:-300}" \
      --configs "${CONFIGS:-torch-amp,torch-bf16,fusedwarm-x16,fusedwarm-x16-bs,fusedwarm-x0-bs}" \
      --out "$OUT/train_cuda.json"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh build|test|step|matmul|loop|train" >&2
    exit 2
    ;;
esac
