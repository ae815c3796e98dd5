"""The kernel files on the emulated CUDA device under AddressSanitizer and UBSan.

scripts/emu_sanitize.sh builds the torch-free driver tests/emu/sanitize.cpp with csrc/emu's runtime
and the real kernel files (g++ against the CUDA shim), with every buffer allocated to exactly its
size, and checks every output bit against a host loop over the layer-1 functions. The sources must
pass; each committed mutant (tests/emu/mutants) breaks them in one way that the run must catch, for
the expected reason: a sanitizer report or a bit mismatch. Slow (the sanitized build takes
minutes on two cores; the script caches objects by content, so a mutant rebuilds only what it
changes).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "emu_sanitize.sh"
MUTANTS = sorted(p.stem for p in (ROOT / "tests" / "emu" / "mutants").glob("*.mutant"))
SANITIZER_REPORTS = ("ERROR: AddressSanitizer", "runtime error:")

# What each mutant's run must print: the sanitizer's report (with the kernel file it points at),
# or the driver's mismatch line.
EXPECTED = {
    "tail_read": ("ERROR: AddressSanitizer: heap-buffer-overflow", "cuda/step_kernels.cuh"),
    "misaligned": ("runtime error:", "misaligned address", "cuda/step_kernels.cuh"),
    "no_barrier": ("MISMATCH pam matmul",),
}


@pytest.fixture(scope="module")
def sanitizing_compiler(tmp_path_factory):
    """The C++ compiler the script uses, once it has built and run a sanitized program."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} not found: the emulated device's sanitizer build needs a C++ compiler (g++)")
    out = tmp_path_factory.mktemp("asan") / "probe"
    build = subprocess.run(
        [cxx, "-fsanitize=address,undefined", "-x", "c++", "-", "-o", str(out)],
        input="int main() { return 0; }\n",
        capture_output=True,
        text=True,
    )
    if build.returncode != 0 or subprocess.run([str(out)], capture_output=True).returncode != 0:
        pytest.skip(
            f"{cxx} cannot build and run with -fsanitize=address,undefined (libasan / libubsan missing?): "
            f"{build.stderr.strip()[-300:]}"
        )
    return cxx


def _run(cxx: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXX=cxx, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=3600)


def test_every_mutant_has_an_expected_failure():
    assert MUTANTS, "no mutants in tests/emu/mutants"
    assert set(MUTANTS) == set(EXPECTED), f"tests/emu/mutants has {MUTANTS}; EXPECTED has {sorted(EXPECTED)}"


@pytest.mark.slow
def test_sources_pass(sanitizing_compiler):
    r = _run(sanitizing_compiler)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"scripts/emu_sanitize.sh failed (exit status {r.returncode}):\n{out[-6000:]}"
    assert "PASSED" in out
    assert not any(s in out for s in SANITIZER_REPORTS), out[-6000:]


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS)
def test_mutant_is_caught(sanitizing_compiler, mutant):
    r = _run(sanitizing_compiler, "--mutant", mutant)
    out = r.stdout + r.stderr
    assert r.returncode == 1, f"mutant {mutant}: expected a failed run (exit 1), got {r.returncode}:\n{out[-6000:]}"
    assert "PASSED" not in out
    missing = [s for s in EXPECTED[mutant] if s not in out]
    assert not missing, f"mutant {mutant} failed, but its output lacks {missing}:\n{out[-6000:]}"
    if not any(s.startswith(SANITIZER_REPORTS) for s in EXPECTED[mutant]):
        assert not any(s in out for s in SANITIZER_REPORTS), f"mutant {mutant}: a sanitizer report:\n{out[-6000:]}"
