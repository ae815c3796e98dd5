"""The CPU element loop must stay vectorized: it is what makes the CPU backend fast, and a
harmless-looking edit of the math header (an early return, a select the vectorizer does not
support, a possible alias) silently turns it scalar and several times slower. Each case compiles
csrc/cpu/chunk.h's loop for one (rule, weight, state) combination and one kind of update-size
coefficients with the build's flags, and asserts GCC reports the loop vectorized and no copy of
it left scalar: a loop-invariant select once let GCC unswitch the loop and keep the common copy
scalar while the other was vectorized (2.6x slower, unseen by a check for "vectorized" alone)."""

from __future__ import annotations

import platform
import re
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
using C = {coef};
template int64_t fusedwarm::run_chunk<R, P, S, {arith}, C>(R::Scalars, uint32_t, float, C, int64_t, int64_t,
                                                           P::storage*, const P::storage*, P::extra_storage*,
                                                           S::storage*, S::storage*);
"""
COEFS = ("fw::Uncontrolled", "fw::Blended")
# The lines of the element loop in chunk.h, from its "#pragma omp simd" to the end of the
# function: GCC reports a loop by a line in it, and the prefetch and block loops around the
# element loop are not meant to vectorize.
_CHUNK = (CSRC / "cpu" / "chunk.h").read_text().splitlines()
LOOP_LINES = range(next(i for i, line in enumerate(_CHUNK, 1) if "#pragma omp simd" in line),
                   next(i for i, line in enumerate(_CHUNK, 1) if "return skipped;" in line))


@pytest.mark.skipif(CXX is None or platform.machine() != "x86_64", reason="checks GCC's vectorizer on x86-64")
@pytest.mark.parametrize("coef", COEFS, ids=[c.split("::")[-1] for c in COEFS])
@pytest.mark.parametrize("rule,param,state,arith", ALL_CASES,
                         ids=[f"{r}-{p.split('::')[-1]}-{s[4:]}" + ("-pam" if a == "fw::Pam" else "")
                              for r, p, s, a in ALL_CASES])
def test_element_loop_vectorizes(tmp_path, rule, param, state, arith, coef):
    probe = tmp_path / "probe.cpp"
    probe.write_text(PROBE.format(rule=rule, param=param, state=state, arith=arith, coef=coef))
    result = subprocess.run(
        [CXX, "-std=c++17", *CXX_FLAGS, f"-I{CSRC / 'include'}", f"-I{CSRC}", "-fopt-info-vec-all", "-c",
         str(probe), "-o", str(tmp_path / "probe.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    loop = [line for line in result.stderr.splitlines()
            if (m := re.search(r"chunk\.h:(\d+):", line)) and int(m.group(1)) in LOOP_LINES]
    what = f"run_chunk<{rule}, {param}, {state}, {arith}, {coef}>"
    assert any("loop vectorized" in line for line in loop), f"the element loop of {what} is not vectorized:\n" + \
        "\n".join(loop)
    scalar = [line for line in loop if "couldn't vectorize loop" in line or "not vectorized" in line]
    assert not scalar, f"a copy of the element loop of {what} stays scalar:\n" + "\n".join(scalar)
