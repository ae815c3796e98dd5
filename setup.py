"""Installs fusedwarm. The extension is built just in time on first use (the default); set
FUSEDWARM_BUILD_EXT=1 (with ``pip install --no-build-isolation .`` so torch is importable) to
build it ahead of time from the same source list and flags."""

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
    names = SOURCES["CPU_SOURCES"] + (SOURCES["CUDA_SOURCES"] if cuda else ())
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext = kind(
        "fusedwarm._C",
        [f"csrc/{n}" for n in names],
        include_dirs=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": list(SOURCES["CXX_FLAGS"]) + (["-DFUSEDWARM_WITH_CUDA"] if cuda else []),
            "nvcc": list(SOURCES["CUDA_FLAGS"]),
        },
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
    install_requires=["torch>=2.4", "ninja"],
    ext_modules=modules,
    cmdclass={"build_py": BuildPyWithSources, **commands},
)
