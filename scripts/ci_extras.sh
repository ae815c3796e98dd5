#!/usr/bin/env bash
# Installs the training frameworks that tests/test_trainers.py runs against, and CuPy with NVRTC
# (tests/test_nvrtc.py compiles every CUDA kernel variant with them, no GPU needed), at pinned
# versions, into env.sh's environment: only those missing or at another version, so a warm machine pays
# nothing. The installed torch is named on the same pip command line at its own version, so no
# framework's dependencies can replace it (torch==2.13.0 matches the installed 2.13.0+cpu).
# timm is not installed: it needs torchvision, whose PyPI wheel is built against CUDA torch and
# fails to load its operators next to the CPU torch build.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
PINNED="transformers==5.17.0 lightning==2.6.6 accelerate==1.15.0 cupy-cuda13x==14.2.0 nvidia-cuda-nvrtc==13.5.37"
missing="$("$PY" - $PINNED <<'PYEOF'
import importlib.metadata as metadata
import sys

for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        found = metadata.version(name)
    except metadata.PackageNotFoundError:
        found = None
    if found != version:
        print(spec)
PYEOF
)"
if [ -n "$missing" ]; then
  torch_version="$("$PY" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])")"
  echo "fusedwarm: installing" $missing "(torch stays at $torch_version)"
  pip_install $missing "torch==$torch_version"
fi
