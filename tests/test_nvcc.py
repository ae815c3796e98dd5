"""Every CUDA kernel file compiles with nvcc for the architectures we target, on any machine.

The kernel files include no torch header (DESIGN.md, layer 2), so this needs the CUDA toolkit
only: no GPU and no CUDA build of torch. It catches kernel compile errors on CPU-only CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fusedwarm import _build

CSRC = _build.CSRC
ARCHS = ("sm_80", "sm_90")
CU_FILES = sorted(CSRC.rglob("*.cu"))
INCLUDE_DIRS = (CSRC / "include", CSRC)

_INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.MULTILINE)
_TORCH_HEADER = re.compile(r"^(torch|ATen|c10)/")


def _rel(path: Path) -> str:
    return str(path.relative_to(CSRC))


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").is_file():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def _compile(nvcc: str, src: Path, arch: str, out_dir: Path) -> subprocess.CompletedProcess:
    # The flags of the JIT build (fusedwarm/_build.py), minus torch's: these files must not need them.
    cmd = [
        nvcc,
        "-std=c++17",
        *_build.CUDA_FLAGS,
        f"-gencode=arch=compute_{arch[3:]},code={arch}",
        *(f"-I{d}" for d in INCLUDE_DIRS),
        "-c",
        str(src),
        "-o",
        str(out_dir / f"{_rel(src).replace('/', '_')}.{arch}.o"),
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Starts every (file, arch) compile at once; each test waits for its own."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (not on PATH, and no $CUDA_HOME/bin/nvcc)")
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = [(src, arch) for src in CU_FILES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        yield {job: pool.submit(_compile, nvcc, *job, out_dir) for job in jobs}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", CU_FILES, ids=_rel)
def test_nvcc_compiles(compiled, src, arch):
    result = compiled[(src, arch)].result()
    assert result.returncode == 0, f"nvcc failed on {_rel(src)} for {arch}:\n{result.stderr}"


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


@pytest.mark.parametrize("src", CU_FILES, ids=_rel)
def test_kernels_include_no_torch_header(src):
    offending = [f"{_rel(f)}: {h}" for f, h in _includes(src, {src.resolve()}) if _TORCH_HEADER.match(h)]
    assert not offending, "CUDA kernel files must stay torch-free (DESIGN.md, layer 2): " + ", ".join(offending)
