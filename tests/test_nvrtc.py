"""Every CUDA kernel module compiles for the architectures we target, on any machine.

The kernels are compiled at run time by NVRTC through CuPy (fusedwarm/_build.py), which needs no
GPU: every step variant and the module "misc" are compiled here for sm_80 and sm_90 through the
same code a GPU user's first step runs, into a temporary cache. Where nvcc is installed, the
same sources also compile with it (the kernel files stay valid CUDA for an ahead-of-time build).
The kernel files include no torch header (DESIGN.md, layer 2).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusedwarm import _build

CSRC = _build.CSRC
ARCHS = ("sm_80", "sm_90")
MODULES = (*_build.step_variants(), "misc")
CU_FILES = sorted(CSRC.rglob("*.cu"))
INCLUDE_DIRS = (CSRC / "include", CSRC)

_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
_TORCH_HEADER = re.compile(r"^(torch|ATen|c10)/")


def _rel(path: Path) -> str:
    return str(path.relative_to(CSRC))


def _nvrtc_or_skip() -> None:
    try:
        _build._nvrtc()
    except _build.BuildError as exc:
        if os.environ.get("CI"):
            raise  # CI installs CuPy and NVRTC (scripts/ci_extras.sh): a missing one is a failure there
        pytest.skip(f"NVRTC through CuPy is not available: {exc}")


def _compile(arch: str, name: str) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        path = _build.variant_file(f"cuda-{arch}", name)
    except _build.BuildError as exc:
        return time.perf_counter() - start, str(exc)
    return time.perf_counter() - start, path.read_bytes()[:4].hex()


@pytest.fixture(scope="module")
def nvrtc_compiled(tmp_path_factory):
    """Starts every (arch, module) compile into a fresh cache; each test waits for its own."""
    _nvrtc_or_skip()
    mp = pytest.MonkeyPatch()
    mp.setenv("FUSEDWARM_CACHE_DIR", str(tmp_path_factory.mktemp("nvrtc-cache")))
    jobs = [(arch, name) for arch in ARCHS for name in MODULES]
    try:
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            yield {job: pool.submit(_compile, *job) for job in jobs}
    finally:
        mp.undo()


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("arch", ARCHS)
def test_nvrtc_compiles(nvrtc_compiled, arch, name):
    elapsed, result = nvrtc_compiled[(arch, name)].result()
    # A cubin is an ELF file: 7f 45 4c 46.
    assert result == "7f454c46", f"NVRTC failed on {name} for {arch}:\n{result}"
    assert elapsed < 60, f"{name} for {arch} took {elapsed:.1f} s"


def test_unknown_arch_and_variant_are_named(tmp_path, monkeypatch):
    _nvrtc_or_skip()
    monkeypatch.setenv("FUSEDWARM_CACHE_DIR", str(tmp_path))
    with pytest.raises(_build.BuildError, match=r"cannot compile for sm_1\b"):
        _build.variant_file("cuda-sm_1", "misc")
    with pytest.raises(_build.BuildError, match="unknown kernel variant 'adamw.bf16x4.f32.ieee'"):
        _build.variant_file("cuda-sm_90", "adamw.bf16x4.f32.ieee")
    assert not list(tmp_path.rglob("*.cubin")), "a failed compile must leave no cache entry"


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").is_file():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


@pytest.mark.parametrize("src", CU_FILES, ids=_rel)
def test_nvcc_compiles(src, tmp_path):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, and no $CUDA_HOME/bin/nvcc); NVRTC is what users need")
    # The variant's macros through a header: nvcc would split their commas (ParamHalf<F, 16>) into two -D.
    header = tmp_path / "variant.h"
    header.write_text("".join(f"#define {d[2:].replace('=', ' ', 1)}\n" for d in _build._variant_defines(
        "adamw.bf16x16.bf16.ieee")))
    cmd = [nvcc, *_build.NVRTC_FLAGS, "-gencode=arch=compute_90,code=sm_90", *(f"-I{d}" for d in INCLUDE_DIRS),
           "-include", str(header), "-c", str(src), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"nvcc failed on {_rel(src)}:\n{result.stderr}"


def _includes(path: Path, seen: set[Path]) -> list[tuple[Path, str]]:
    """(file, header) for every #include reachable from `path` through the project's own headers."""
    found = []
    for kind, header in _INCLUDE.findall(path.read_text()):
        found.append((path, header))
        dirs = ((path.parent,) if kind == '"' else ()) + INCLUDE_DIRS
        local = next((d / header for d in dirs if (d / header).is_file()), None)
        if local is not None and local.resolve() not in seen:
            seen.add(local.resolve())
            found += _includes(local, seen)
    return found


@pytest.mark.parametrize("src", [*CU_FILES, CSRC / "cpu" / "step_variant.cpp"], ids=_rel)
def test_kernels_include_no_torch_header(src):
    offending = [f"{_rel(f)}: {h}" for f, h in _includes(src, {src.resolve()}) if _TORCH_HEADER.match(h)]
    assert not offending, "kernel files must stay torch-free (DESIGN.md, layer 2): " + ", ".join(offending)


def test_gpu_host_side_compiles_without_cuda_toolkit():
    """The GPU host side (driver calls, no CUDA header) is built into the torch-facing library on a torch
    with CUDA; this CPU torch does not build it, so compile it here against torch's headers alone."""
    cxx = _build._cxx()
    _build._compiler_id(cxx)  # a missing compiler is a BuildError naming it
    (source,) = _build.CORE_CUDA_UNITS[0]
    cmd = [cxx, "-std=c++17", "-fsyntax-only", *_build.CXX_FLAGS, f"-I{CSRC / 'include'}", f"-I{CSRC}",
           *_build._torch_compile_flags(), str(CSRC / source)]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CPATH": "", "CPLUS_INCLUDE_PATH": ""})
    assert result.returncode == 0, result.stderr[-4000:]
