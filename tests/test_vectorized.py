"""The CPU element loop must stay vectorized: it is what makes the CPU backend fast, and a
harmless-looking edit of the math header (an early return, a select the vectorizer does not
support, a possible alias) silently turns it scalar and several times slower. Each case compiles
csrc/cpu/chunk.h's loop for one (rule, weight, state) combination with the build's flags and
asserts GCC reports it vectorized."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from fusedwarm._sources import CXX_FLAGS

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = shutil.which("g++")

CASES = [
    ("AdamW", "fw::ParamHalf<fw::BF16Format, 16>", "fw::StateBF16"),
    ("AdamW", "fw::ParamHalf<fw::BF16Format, 16>", "fw::StateF32"),
    ("AdamW", "fw::ParamHalf<fw::BF16Format, 8>", "fw::StateBF16"),
    ("AdamW", "fw::ParamHalf<fw::BF16Format, 0>", "fw::StateBF16"),
    ("AdamW", "fw::ParamF32", "fw::StateF32"),
    ("AdamW", "fw::ParamHalf<fw::F16Format, 16>", "fw::StateBF16"),
    ("AdamW", "fw::ParamHalf<fw::F16Format, 0>", "fw::StateF32"),
    ("SGDMomentum", "fw::ParamHalf<fw::BF16Format, 16>", "fw::StateBF16"),
    ("SGD", "fw::ParamHalf<fw::BF16Format, 0>", "fw::StateF32"),
    ("Lion", "fw::ParamHalf<fw::BF16Format, 16>", "fw::StateBF16"),
    ("Lion", "fw::ParamF32", "fw::StateF32"),
]
# Piecewise-affine arithmetic (arithmetic="pam"): the same loops with the fw::Pam policy.
PAM_CASES = [
    ("AdamW", "fw::ParamHalf<fw::BF16Format, 16>", "fw::StateBF16"),
    ("AdamW", "fw::ParamF32", "fw::StateF32"),
    ("AdamW", "fw::ParamHalf<fw::F16Format, 16>", "fw::StateF32"),
    ("SGDMomentum", "fw::ParamHalf<fw::BF16Format, 0>", "fw::StateBF16"),
    ("Lion", "fw::ParamHalf<fw::BF16Format, 16>", "fw::StateBF16"),
]
ALL_CASES = [(*c, "fw::Ieee") for c in CASES] + [(*c, "fw::Pam") for c in PAM_CASES]

PROBE = """#include "cpu/chunk.h"
using R = fw::{rule};
using P = {param};
using S = {state};
template int64_t fusedwarm::run_chunk<R, P, S, {arith}>(R::Scalars, uint64_t, float, float, float, int64_t, int64_t,
                                                        P::storage*,
                                                        const P::storage*, P::extra_storage*, S::storage*,
                                                        S::storage*);
"""


@pytest.mark.skipif(CXX is None or platform.machine() != "x86_64", reason="checks GCC's vectorizer on x86-64")
@pytest.mark.parametrize("rule,param,state,arith", ALL_CASES,
                         ids=[f"{r}-{p.split('::')[-1]}-{s[4:]}" + ("-pam" if a == "fw::Pam" else "")
                              for r, p, s, a in ALL_CASES])
def test_element_loop_vectorizes(tmp_path, rule, param, state, arith):
    probe = tmp_path / "probe.cpp"
    probe.write_text(PROBE.format(rule=rule, param=param, state=state, arith=arith))
    result = subprocess.run(
        [CXX, "-std=c++17", *CXX_FLAGS, f"-I{CSRC / 'include'}", f"-I{CSRC}", "-fopt-info-vec-optimized", "-c",
         str(probe), "-o", str(tmp_path / "probe.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    vectorized = [line for line in result.stderr.splitlines() if "chunk.h" in line and "loop vectorized" in line]
    assert vectorized, f"the element loop of run_chunk<{rule}, {param}, {state}, {arith}> is not vectorized:\n{result.stderr}"
