"""Just-in-time build of the fusedwarm extension (layer 4 of DESIGN.md).

This is the only module that knows about compiling. On first use it compiles the C++ (and, when
a CUDA GPU is visible and torch has CUDA, the CUDA) sources with
``torch.utils.cpp_extension`` and ninja into a cache directory whose name is a hash of the
sources, the compile flags, and the torch, CUDA, Python and GPU-architecture versions. A file
lock makes concurrent processes build once; later processes load the cached library directly.
It defines no operator and no math: the sources and flags are :mod:`fusedwarm._sources`'s.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ._sources import (CPU_SOURCES, CUDA_FLAGS, CUDA_SOURCES, CXX_FLAGS, EMU_FLAGS, EMU_SOURCES, HEADER_SUFFIXES,
                       LD_FLAGS)

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" if (ROOT / "csrc").is_dir() else ROOT.parent / "csrc"

AOT_GLOB = "_C*.so"  # a library built ahead of time by setup.py (FUSEDWARM_BUILD_EXT=1)

_lock = threading.Lock()
_loaded: set[str] = set()


class BuildError(RuntimeError):
    """The extension could not be built; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class BuildConfig:
    """What a build is for: the backend, the CUDA architectures, and where the cache lives."""

    backend: str  # "cpu", "cuda", or "emu" (the emulated CUDA device's library)
    arch_list: str  # TORCH_CUDA_ARCH_LIST used for the build ("" for cpu)
    sources: tuple[Path, ...]
    key: str
    directory: Path

    @property
    def name(self) -> str:
        return f"fusedwarm_{self.backend}_{self.key[:16]}"

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"

    @property
    def ready(self) -> bool:
        return self.library.is_file()


def cache_root() -> Path:
    """The cache directory: ``$FUSEDWARM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedwarm``, else ``~/.cache/fusedwarm``."""
    env = os.environ.get("FUSEDWARM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fusedwarm"


def cuda_wanted() -> bool:
    """True when torch was built with CUDA and a GPU is visible."""
    return torch.version.cuda is not None and torch.cuda.is_available()


def _arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    archs = [f"{major}.{minor}" for major, minor in caps]
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def _cpu_flags() -> str:
    """The CPU's feature flags (the build uses -march=native), or the machine name if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def source_files(backend: str) -> tuple[Path, ...]:
    """The translation units of a build, as absolute paths."""
    names = EMU_SOURCES if backend == "emu" else CPU_SOURCES + (CUDA_SOURCES if backend == "cuda" else ())
    return tuple(CSRC / n for n in names)


def _cxx_flags(backend: str) -> tuple[str, ...]:
    if backend == "emu":
        return EMU_FLAGS
    return CXX_FLAGS + (("-DFUSEDWARM_WITH_CUDA",) if backend == "cuda" else ())


def _include_dirs(backend: str) -> list[str]:
    # The emulator's CUDA shim comes first, so that <cuda_runtime.h> names it in that build only.
    return ([str(CSRC / "emu")] if backend == "emu" else []) + [str(CSRC / "include"), str(CSRC)]


def _hash_inputs(sources: tuple[Path, ...], backend: str, arch_list: str) -> str:
    h = hashlib.sha256()
    files = set(sources) | {p for p in CSRC.rglob("*") if p.suffix in HEADER_SUFFIXES}
    for path in sorted(files):
        h.update(str(path.relative_to(CSRC)).encode())
        h.update(path.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), sys.version, platform.machine(), _cpu_flags(), backend,
                 arch_list, _cxx_flags(backend), CUDA_FLAGS, LD_FLAGS):
        h.update(repr(part).encode())
    return h.hexdigest()


def config(backend: str | None = None) -> BuildConfig:
    """The build this process would use, or the given backend's (it computes the cache key; it does not build)."""
    backend = backend or ("cuda" if cuda_wanted() else "cpu")
    arch_list = _arch_list() if backend == "cuda" else ""
    sources = source_files(backend)
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise BuildError(f"fusedwarm sources are missing: {', '.join(missing)} (looked in {CSRC})")
    key = _hash_inputs(sources, backend, arch_list)
    return BuildConfig(backend, arch_list, sources, key, cache_root() / f"{backend}_{key[:16]}")


def _check_tools(cfg: BuildConfig) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(
            f"fusedwarm needs a C++ compiler to build its extension, and '{cxx}' was not found. "
            "Install one (Debian/Ubuntu: 'apt-get install g++'; Fedora: 'dnf install gcc-c++'), "
            "or point the CXX environment variable at it."
        )
    if not cpp_extension.is_ninja_available():
        raise BuildError(
            "fusedwarm builds its extension with ninja, which was not found. "
            "Install it with 'pip install ninja' (or 'apt-get install ninja-build')."
        )
    if cfg.backend == "cuda":
        home = cpp_extension.CUDA_HOME
        nvcc = Path(home, "bin", "nvcc") if home else None
        if nvcc is None or not nvcc.is_file():
            raise BuildError(
                "a CUDA GPU is visible, so fusedwarm builds its CUDA kernels, but nvcc was not found "
                f"(CUDA_HOME={home!r}). Install the CUDA toolkit matching torch's CUDA {torch.version.cuda} "
                "and set CUDA_HOME, or hide the GPU (CUDA_VISIBLE_DEVICES='') for a CPU-only build."
            )


def aot_library() -> Path | None:
    """The library installed by ``FUSEDWARM_BUILD_EXT=1 pip install .``, if any."""
    found = sorted(ROOT.glob(AOT_GLOB))
    return found[0] if found else None


def build(verbose: bool = False) -> BuildConfig | None:
    """Builds (if needed) and loads the extension into this process.

    Safe to call from many threads and processes at once: one builds, the others wait and load.

    Returns:
        The JIT build's configuration, or None when an ahead-of-time library was loaded.
    """
    aot = aot_library()
    cfg = None if aot is not None else config()
    _load(cfg, aot, verbose)
    return cfg


def build_emulator(verbose: bool = False) -> BuildConfig:
    """Builds (if needed) and loads the emulated CUDA device's library (ops ``torch.ops.fusedwarm_emu``)."""
    cfg = config("emu")
    _load(cfg, None, verbose)
    return cfg


def _load(cfg: BuildConfig | None, aot: Path | None, verbose: bool) -> None:
    library = aot if cfg is None else cfg.library
    with _lock:
        if str(library) in _loaded:
            return
        if cfg is not None and not cfg.ready:
            _check_tools(cfg)
            cfg.directory.mkdir(parents=True, exist_ok=True)
            with open(cfg.directory / "build.lock", "w") as lock_file:
                fcntl.flock(lock_file, fcntl.LOCK_EX)
                try:
                    if not cfg.ready:
                        _compile(cfg, verbose)
                finally:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)
        torch.ops.load_library(str(library))
        _loaded.add(str(library))


def _compile(cfg: BuildConfig, verbose: bool) -> None:
    from torch.utils import cpp_extension

    env_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cfg.backend == "cuda":
        os.environ["TORCH_CUDA_ARCH_LIST"] = cfg.arch_list
    try:
        cpp_extension.load(
            name=cfg.name,
            sources=[str(p) for p in cfg.sources],
            extra_cflags=list(_cxx_flags(cfg.backend)),
            extra_cuda_cflags=list(CUDA_FLAGS),
            extra_ldflags=[] if cfg.backend == "emu" else list(LD_FLAGS),
            extra_include_paths=_include_dirs(cfg.backend),
            build_directory=str(cfg.directory),
            with_cuda=cfg.backend == "cuda",
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError) as exc:
        raise BuildError(
            f"building the fusedwarm extension in {cfg.directory} failed: {exc}. "
            "Run 'python -m fusedwarm build --verbose' to see the compiler output."
        ) from exc
    finally:
        if cfg.backend == "cuda":
            if env_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = env_arch
