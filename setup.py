"""Installs fusedwarm. The extension is built just in time on first use (the default): a small
torch-facing library once, and each kernel variant the first time a step needs it (CUDA kernels
through NVRTC: ``pip install fusedwarm[cuda]`` adds CuPy; no CUDA toolkit is needed). Set
FUSEDWARM_BUILD_EXT=1 (with ``pip install --no-build-isolation .`` so torch is importable) to
build the torch-facing library ahead of time from the same source list and flags; kernel
variants are prebuilt with ``python -m fusedwarm build --all``."""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SOURCES = {}
exec((ROOT / "fusedwarm" / "_sources.py").read_text(), SOURCES)


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package, where the JIT build looks for it."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fusedwarm" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ROOT / "csrc", target)


def ext_modules():
    if os.environ.get("FUSEDWARM_BUILD_EXT") != "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda = torch.version.cuda is not None and os.environ.get("FUSEDWARM_CPU_ONLY") != "1"
    units = SOURCES["CORE_UNITS"] + (SOURCES["CORE_CUDA_UNITS"] if cuda else ())
    names = [name for unit in units for name in unit]
    ext = cpp_extension.CppExtension(
        "fusedwarm._C",
        [f"csrc/{n}" for n in names],
        include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc")],
        extra_compile_args={"cxx": list(SOURCES["CXX_FLAGS"])},
        extra_link_args=list(SOURCES["LD_FLAGS"]),
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


modules, commands = ext_modules()
setup(
    name="fusedwarm",
    version="0.1.0",
    description="Fused half-precision-only optimizers (AdamW, SGD, Lion) for PyTorch, with a float32 reference",
    packages=["fusedwarm", "fusedwarm.optim", "fusedwarm.reference", "fusedwarm.trainers"],
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # CUDA kernels are compiled at run time by NVRTC through CuPy, matching torch's CUDA major version.
    extras_require={"cuda": ["cupy-cuda13x"], "cuda13": ["cupy-cuda13x"], "cuda12": ["cupy-cuda12x"]},
    ext_modules=modules,
    cmdclass={"build_py": BuildPyWithSources, **commands},
)
