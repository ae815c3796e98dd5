"""Just-in-time build of the fusedwarm extension (layer 4 of DESIGN.md).

This is the only module that knows about compiling. It builds two kinds of things into a cache
(``$FUSEDWARM_CACHE_DIR``, else ``~/.cache/fusedwarm``):

* the **torch-facing library** (op schemas and registrations, argument checks and packing, the
  CPU host side), once per source tree and torch: a few C++ translation units compiled in
  parallel with the C++ compiler; no CUDA toolkit, even for GPUs;
* **kernel variants**, each the first time a step needs it (rule x weight format x extra bits x
  state dtype x arithmetic, plus the CUDA module "misc"): a CPU variant is one torch-free
  translation unit compiled into a small shared library in about a second; a CUDA variant is
  compiled by NVRTC through CuPy into a cubin for the GPU's architecture (no nvcc); the emulated
  device's variants are the CUDA source compiled by g++ against its shim.

Every entry's name holds a hash of what made it: the sources, flags, compiler (or NVRTC)
version, torch version, CPU features or GPU architecture. An entry is compiled into a temporary
directory and renamed into place, so a failed or interrupted compile leaves nothing behind, and a
file lock per entry makes parallel processes (e.g. 8 DDP ranks) compile it once. The C++ library
asks for variants through the op ``fusedwarm_jit::variant_file``, registered here.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ._sources import (ARITHMETICS, CORE_CUDA_UNITS, CORE_UNITS, CXX_FLAGS, EMU_FLAGS, EMU_UNITS, LD_FLAGS,
                       MISC_SOURCES, NVRTC_FLAGS, RULES, SOURCE_SUFFIXES, STATES, VARIANT_DEPENDENCIES, VARIANT_FLAGS,
                       VARIANT_SOURCES, WEIGHTS)

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc" if (ROOT / "csrc").is_dir() else ROOT.parent / "csrc"

AOT_GLOB = "_C*.so"  # a torch-facing library built ahead of time by setup.py (FUSEDWARM_BUILD_EXT=1)
CUPY_PACKAGES = {"12": "cupy-cuda12x", "13": "cupy-cuda13x"}

_log = logging.getLogger(__name__)
_lock = threading.RLock()
_loaded: set[str] = set()


class BuildError(RuntimeError):
    """Something could not be built; the message says what is missing and how to fix it."""


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


# ---------------------------------------------------------------------------------------------
# What a build depends on


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


@functools.cache
def _compiler_id(cxx: str) -> str:
    """The C++ compiler's version line (part of every cache key), or a BuildError saying what to install."""
    if shutil.which(cxx) is None:
        raise BuildError(
            f"fusedwarm needs a C++ compiler to build its kernels, and '{cxx}' was not found. "
            "Install one (Debian/Ubuntu: 'apt-get install g++'; Fedora: 'dnf install gcc-c++'), "
            "or point the CXX environment variable at it.")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise BuildError(f"fusedwarm: running the C++ compiler '{cxx} --version' failed: {exc}") from exc
    return out.splitlines()[0] if out else cxx


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature flags (the CPU builds use -march=native), or the machine name if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@functools.cache
def _sources_digest(family: str | None = None) -> str:
    """A hash of the source files (names and bytes) under csrc: all of them, or those a family of
    variants ("cpu", "cuda", "emu") is compiled from (``VARIANT_DEPENDENCIES``)."""
    deps = VARIANT_DEPENDENCIES[family] if family is not None else None
    h = hashlib.sha256()
    for path in sorted(p for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        name = path.relative_to(CSRC).as_posix()
        if deps is None or any(name == d or (d.endswith("/") and name.startswith(d)) for d in deps):
            h.update(name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _key(*parts: object, family: str | None = None) -> str:
    h = hashlib.sha256(_sources_digest(family).encode())
    for part in (torch.__version__, sys.version, platform.machine(), *parts):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Cache entries: compiled once, into a temporary directory, renamed into place under a file lock


def _cache_entry(target: Path, build: Callable[[Path], Path], verbose: bool = False) -> Path:
    """``target``, compiled by ``build(tmpdir) -> file`` if it is not in the cache yet."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if not target.is_file():
                start = time.perf_counter()
                with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
                    built = build(Path(tmp))
                    os.replace(built, target)
                _log.info("built %s in %.1f s", target, time.perf_counter() - start)
                if verbose:
                    print(f"fusedwarm: built {target}", file=sys.stderr)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def _run_compilers(commands: list[list[str]], what: str, verbose: bool) -> None:
    """Runs the commands, as many at once as this process may use CPUs; a failure is a BuildError with the output."""
    jobs = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    pending = list(commands)
    running: list[tuple[list[str], subprocess.Popen]] = []
    failure = None
    while pending or running:
        while pending and len(running) < jobs and failure is None:
            cmd = pending.pop(0)
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            running.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        cmd, proc = running.pop(0)
        out, _ = proc.communicate()
        if verbose and out:
            print(out, file=sys.stderr)
        if proc.returncode != 0 and failure is None:
            failure = (cmd, out)
        if failure is not None:
            pending.clear()
    if failure is not None:
        cmd, out = failure
        tail = "\n".join(out.strip().splitlines()[-40:])
        raise BuildError(f"compiling {what} failed:\n$ {' '.join(cmd)}\n{tail}")


def _torch_compile_flags() -> list[str]:
    include = Path(torch.__file__).resolve().parent / "include"
    return ["-isystem", str(include), f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]


def _torch_link_flags() -> list[str]:
    lib = Path(torch.__file__).resolve().parent / "lib"
    return [f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{lib}"]


# ---------------------------------------------------------------------------------------------
# The torch-facing libraries: the main one (ops namespace fusedwarm) and the emulated device's


@dataclass(frozen=True)
class Library:
    """A torch-facing library: what it is built from and where it lives in the cache."""

    kind: str  # "core" (torch.ops.fusedwarm) or "emu" (torch.ops.fusedwarm_emu)
    units: tuple[tuple[str, ...], ...]  # translation units, each one or more sources (paths under csrc)
    flags: tuple[str, ...]
    include_dirs: tuple[Path, ...]
    path: Path

    @property
    def ready(self) -> bool:
        return self.path.is_file()


def library(kind: str = "core") -> Library:
    """The library this process would load for ``kind`` (it computes the cache key; it does not build)."""
    if kind == "core":
        units = CORE_UNITS + (CORE_CUDA_UNITS if torch.version.cuda is not None else ())
        flags, includes = CXX_FLAGS, (CSRC / "include", CSRC)
    elif kind == "emu":
        # The emulator's CUDA shim comes first, so that <cuda_runtime.h> names it in that build only.
        units, flags, includes = EMU_UNITS, EMU_FLAGS, (CSRC / "emu", CSRC / "include", CSRC)
    else:
        raise ValueError(f"fusedwarm: unknown library kind {kind!r}")
    missing = [n for unit in units for n in unit if not (CSRC / n).is_file()]
    if missing:
        raise BuildError(f"fusedwarm sources are missing: {', '.join(missing)} (looked in {CSRC})")
    cxx = _cxx()
    key = _key(kind, units, flags, LD_FLAGS, _compiler_id(cxx), _cpu_flags())
    return Library(kind, units, flags, includes, cache_root() / f"{kind}-{key}" / f"fusedwarm_{kind}.so")


def _build_library(lib: Library, verbose: bool) -> Path:
    cxx = _cxx()
    includes = [f"-I{d}" for d in lib.include_dirs]

    def build(tmp: Path) -> Path:
        compile_cmds, objects = [], []
        for i, unit in enumerate(lib.units):
            source = tmp / f"unit{i}.cpp"
            source.write_text("".join(f'#include "{CSRC / n}"\n' for n in unit))
            objects.append(tmp / f"unit{i}.o")
            compile_cmds.append([cxx, "-std=c++17", "-fPIC", *lib.flags, *includes, *_torch_compile_flags(), "-c",
                                 str(source), "-o", str(objects[-1])])
        _run_compilers(compile_cmds, f"the fusedwarm {lib.kind} library", verbose)
        out = tmp / lib.path.name
        link = [cxx, "-shared", *map(str, objects), *(LD_FLAGS if lib.kind == "core" else ()), *_torch_link_flags(),
                "-o", str(out)]
        _run_compilers([link], f"the fusedwarm {lib.kind} library (link)", verbose)
        return out

    return _cache_entry(lib.path, build, verbose)


def aot_library() -> Path | None:
    """The torch-facing library installed by ``FUSEDWARM_BUILD_EXT=1 pip install .``, if any."""
    found = sorted(ROOT.glob(AOT_GLOB))
    return found[0] if found else None


def _load(path: Path) -> None:
    with _lock:
        if str(path) in _loaded:
            return
        _register_variant_op()
        torch.ops.load_library(str(path))
        _loaded.add(str(path))


def build(verbose: bool = False) -> Library | None:
    """Builds (if needed) and loads the torch-facing library into this process.

    Safe to call from many threads and processes at once: one builds, the others wait and load.
    Kernel variants are not built here but on first use (or by :func:`prebuild`).

    Returns:
        The JIT-built library, or None when an ahead-of-time library was loaded.
    """
    aot = aot_library()
    if aot is not None:
        _load(aot)
        return None
    lib = library("core")
    _load(_build_library(lib, verbose))
    return lib


def build_emulator(verbose: bool = False) -> Library:
    """Builds (if needed) and loads the emulated CUDA device's library (ops ``torch.ops.fusedwarm_emu``)."""
    lib = library("emu")
    _load(_build_library(lib, verbose))
    return lib


# ---------------------------------------------------------------------------------------------
# Kernel variants


def step_variants() -> list[str]:
    """Every step variant's name ("<rule>.<weights>.<states>.<arithmetic>"); stateless SGD has only f32 states."""
    return [f"{r}.{w}.{s}.{a}" for r in RULES for w in WEIGHTS for s in STATES for a in ARITHMETICS
            if not (r == "sgd" and s != "f32")]


def _variant_defines(name: str) -> list[str]:
    """The macros that select variant ``name``'s types in the variant source files."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] not in RULES or parts[1] not in WEIGHTS or parts[2] not in STATES \
            or parts[3] not in ARITHMETICS:
        raise BuildError(f"fusedwarm: unknown kernel variant {name!r}; variants are "
                         f"'<rule>.<weights>.<states>.<arithmetic>' with rule in {sorted(RULES)}, weights in "
                         f"{sorted(WEIGHTS)}, states in {sorted(STATES)}, arithmetic in {sorted(ARITHMETICS)}")
    rule, weights, states, arith = parts
    return [f"-DFW_RULE={RULES[rule]}", f"-DFW_PARAM={WEIGHTS[weights]}", f"-DFW_STATE={STATES[states]}",
            f"-DFW_ARITH={ARITHMETICS[arith]}"]


def _module_source(backend: str, name: str) -> tuple[str, list[str]]:
    """The source file and macros of kernel module ``name`` for a backend family ("cpu", "cuda", "emu")."""
    if name == "misc":
        if backend not in MISC_SOURCES:
            raise BuildError(f"fusedwarm: the {backend} backend has no kernel module 'misc'")
        return MISC_SOURCES[backend], []
    return VARIANT_SOURCES[backend], _variant_defines(name)


def _cuda_arch(backend: str) -> str:
    arch = backend.removeprefix("cuda-")
    if not (backend.startswith("cuda-sm_") and arch[3:].isdigit()):
        raise BuildError(f"fusedwarm: unknown kernel backend {backend!r}; expected 'cpu', 'emu' or 'cuda-sm_<NN>'")
    return arch


def variant_path(backend: str, name: str) -> Path:
    """Where kernel module ``name`` for ``backend`` ("cpu", "emu", "cuda-sm_90") lives in the cache."""
    if backend == "cpu":
        source, defines = _module_source("cpu", name)
        key = _key(backend, source, defines, VARIANT_FLAGS, _compiler_id(_cxx()), _cpu_flags(), family="cpu")
        suffix = "so"
    elif backend == "emu":
        source, defines = _module_source("emu", name)
        # It links against that emulator library (its runtime), by path: a new library, a new variant.
        key = _key(backend, source, defines, EMU_FLAGS, _compiler_id(_cxx()), str(library("emu").path),
                   family="emu")
        suffix = "so"
    else:
        arch = _cuda_arch(backend)
        source, defines = _module_source("cuda", name)
        key = _key(backend, source, defines, NVRTC_FLAGS, _nvrtc().version, arch, family="cuda")
        suffix = "cubin"
    return cache_root() / "variants" / backend / f"{name}-{key}.{suffix}"


def variant_file(backend: str, name: str, verbose: bool = False) -> Path:
    """Kernel module ``name`` for ``backend``, compiled into the cache first if it is not there yet."""
    target = variant_path(backend, name)
    if target.is_file():
        return target
    if backend == "cpu":
        source, defines = _module_source("cpu", name)
        flags = ["-std=c++17", "-fPIC", "-shared", *VARIANT_FLAGS, f"-I{CSRC / 'include'}", f"-I{CSRC}"]
        link: list[str] = []
    elif backend == "emu":
        source, defines = _module_source("emu", name)
        emu_lib = _build_library(library("emu"), verbose)
        flags = ["-std=c++17", "-fPIC", "-shared", *EMU_FLAGS, f"-I{CSRC / 'emu'}", f"-I{CSRC / 'include'}",
                 f"-I{CSRC}"]
        # Its kernels call the emulator's runtime (threadIdx, __syncthreads, ...), which that library holds.
        link = [str(emu_lib), f"-Wl,-rpath,{emu_lib.parent}"]
    else:
        return _cache_entry(target, lambda tmp: _nvrtc_compile(tmp, backend, name), verbose)

    def build(tmp: Path) -> Path:
        out = tmp / target.name
        _run_compilers([[_cxx(), *flags, *defines, str(CSRC / source), "-o", str(out), *link]],
                       f"kernel variant {name} ({backend})", verbose)
        return out

    return _cache_entry(target, build, verbose)


@dataclass(frozen=True)
class _Nvrtc:
    module: object
    version: str
    include: Path | None  # CuPy's bundled libcudacxx (unused by the kernels today, offered for <cuda/std/...>)
    archs: tuple[int, ...]


@functools.cache
def _nvrtc() -> _Nvrtc:
    """CuPy's NVRTC bindings (no GPU needed), or a BuildError naming the package to install."""
    major = (torch.version.cuda or "13").split(".")[0]
    package = CUPY_PACKAGES.get(major, f"cupy-cuda{major}x")
    try:
        import cupy
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        raise BuildError(
            f"fusedwarm compiles its CUDA kernels at run time with NVRTC through CuPy, which is not installed "
            f"({exc}). Install it with 'pip install {package}' (or 'pip install fusedwarm[cuda]'); "
            "no CUDA toolkit is needed.") from exc
    try:
        version = ".".join(map(str, nvrtc.getVersion()))
        archs = tuple(int(a) for a in nvrtc.getSupportedArchs())
    except Exception as exc:  # noqa: BLE001 - CuPy raises its own types when libnvrtc cannot be loaded
        raise BuildError(
            f"fusedwarm: CuPy is installed but NVRTC (libnvrtc) could not be loaded: {exc}. Install the NVRTC "
            f"of your CUDA {major} ('pip install nvidia-cuda-nvrtc' for CUDA 13, 'nvidia-cuda-nvrtc-cu12' for "
            f"CUDA 12), or set CUDA_PATH to a CUDA installation that has lib64/libnvrtc.so.") from exc
    include = Path(cupy.__file__).parent / "_core" / "include" / "cupy" / "_cccl" / "libcudacxx"
    return _Nvrtc(nvrtc, version, include if include.is_dir() else None, archs)


def _nvrtc_compile(tmp: Path, backend: str, name: str) -> Path:
    arch = _cuda_arch(backend)
    info = _nvrtc()
    if int(arch[3:]) not in info.archs:
        raise BuildError(
            f"fusedwarm: NVRTC {info.version} cannot compile for {arch} (it supports "
            f"{', '.join(f'sm_{a}' for a in info.archs)}); install a newer NVRTC and CuPy for this GPU.")
    source, defines = _module_source("cuda", name)
    options = [f"-arch={arch}", *NVRTC_FLAGS, f"-I{CSRC / 'include'}", f"-I{CSRC}", *defines]
    if info.include is not None:
        options.append(f"-I{info.include}")
    nvrtc = info.module
    prog = nvrtc.createProgram((CSRC / source).read_text(), str(CSRC / source), [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise BuildError(f"NVRTC {info.version} failed to compile kernel module {name} for {arch} "
                             f"({exc}):\n{log}") from exc
        out = tmp / f"{name}.cubin"
        out.write_bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
    return out


_variant_lib: torch.library.Library | None = None


def _register_variant_op() -> None:
    """Defines ``fusedwarm_jit::variant_file(str backend, str name) -> str``, how the C++ libraries ask for a variant."""
    global _variant_lib
    if _variant_lib is not None:
        return
    lib = torch.library.Library("fusedwarm_jit", "DEF")
    lib.define("variant_file(str backend, str name) -> str")
    lib.impl("variant_file", lambda backend, name: str(variant_file(backend, name)), "CompositeExplicitAutograd")
    _variant_lib = lib


def prebuild(backends: Iterable[str], names: Iterable[str], verbose: bool = False,
             progress: Callable[[str, str, Path], None] | None = None, jobs: int | None = None) -> list[Path]:
    """Compiles kernel modules ahead of first use (``python -m fusedwarm build``); returns their files.

    Args:
        backends: "cpu", "emu" and/or "cuda-sm_<NN>".
        names: step variants (see :func:`step_variants`) and/or "misc" (CUDA and emulated only).
        verbose: print the compiler commands and output.
        progress: called with (backend, name, file) after each module, in completion order.
        jobs: modules compiled at once (default: the CPUs this process may use).
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    todo = [(b, n) for b in backends for n in names if not (n == "misc" and b == "cpu")]
    if not todo:
        return []
    if "emu" in {b for b, _ in todo}:
        _build_library(library("emu"), verbose)  # the emulated variants link against it: build it once, first
    jobs = jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    files = []
    # Threads suffice: each compile is a compiler process or an NVRTC call that releases the GIL.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(variant_file, b, n, verbose): (b, n) for b, n in todo}
        for future in as_completed(futures):
            path = future.result()
            files.append(path)
            if progress is not None:
                progress(*futures[future], path)
    return files


def cached_variants() -> dict[str, list[Path]]:
    """The kernel modules in the cache, by backend (every key, current or not)."""
    base = cache_root() / "variants"
    if not base.is_dir():
        return {}
    return {d.name: sorted(p for p in d.iterdir() if not p.name.startswith(".")) for d in sorted(base.iterdir())
            if d.is_dir()}
