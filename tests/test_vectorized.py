"""The CPU element loop must stay vectorized: it is what makes the CPU backend fast, and a
harmless-looking edit of the math header (an early return, a select the vectorizer does not
support, a possible alias) silently turns it scalar and several times slower. Each case compiles
csrc/cpu/chunk.h's loops (the element loop and the gradient scan before it) for one (rule,
weight, state) combination and one kind of update-size coefficients with the build's flags, and
asserts GCC reports each loop vectorized and no copy of it left scalar: a loop-invariant select once let GCC unswitch the loop and keep the common copy
scalar while the other was vectorized (2.6x slower, unseen by a check for "vectorized" alone)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fusedwarm._sources import VARIANT_FLAGS

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
template int64_t fusedwarm::run_chunk<R, P, S, {arith}, C, {plain}>(R::Scalars, uint32_t, float, C, int64_t, int64_t,
                                                           int64_t, P::storage*, const P::storage*, P::extra_storage*,
                                                           S::storage*, S::storage*);
"""
COEFS = ("fw::Uncontrolled", "fw::Blended")
# run_chunk's loops for each kind of update-size coefficients, and the loop with plain scalars
# (kPlain: update.cuh, "plain scalars") that the CPU backend takes without control in the common case.
CHUNK_KINDS = [("fw::Uncontrolled", "true"), ("fw::Uncontrolled", "false"), ("fw::Blended", "false")]


def simd_loops(lines: list[str]) -> list[range]:
    """The line ranges (1-based) of the loops under "#pragma omp simd" in chunk.h: the span's
    gradient scan and the element loop. GCC reports a loop by a line in it; the loops around them
    (spans, prefetch blocks) and the rare-path copies are not meant to vectorize."""
    loops = []
    for i, line in enumerate(lines):
        if line.strip().startswith("#pragma omp simd"):
            indent = len(lines[i + 1]) - len(lines[i + 1].lstrip())
            close = next(k for k in range(i + 2, len(lines)) if lines[k].startswith(" " * indent + "}"))
            loops.append(range(i + 1, close + 2))
    return loops


SIMD_LOOPS = simd_loops((CSRC / "cpu" / "chunk.h").read_text().splitlines())
# run_chunk's loops (the gradient scan; the element loop by pairs of 16-bit elements, or one by one),
# then run_quantized_block's: 4-bit unpack, block values, block store, 4-bit pack.
CHUNK_LOOPS, QUANT_LOOPS = SIMD_LOOPS[:3], SIMD_LOOPS[3:]

QUANT_PROBE = """#include "cpu/chunk.h"
using R = fw::{rule};
using P = {param};
using S = fw::StateQuant<{bits}>;
using CS = fusedwarm::SameCoef<fw::{coef}>;
template int32_t fusedwarm::run_quantized_block<R, P, S, fw::Ieee, CS>(R::Scalars, uint32_t, float, CS, int64_t,
                                                                     int32_t, P::storage*, const P::storage*,
                                                                     P::extra_storage*, uint8_t*, uint8_t*, float*,
                                                                     float*);
"""
QUANT_CASES = [("AdamW", "fw::ParamHalf<fw::BF16Format, 16>", 8), ("AdamW", "fw::ParamHalf<fw::BF16Format, 8>", 4),
               ("AdamW", "fw::ParamHalf<fw::BF16Format, 0>", 8), ("Lion", "fw::ParamHalf<fw::BF16Format, 16>", 8),
               ("SGDMomentum", "fw::ParamF32", 4)]


def _compile_probe(tmp_path, source: str) -> list[str]:
    probe = tmp_path / "probe.cpp"
    probe.write_text(source)
    result = subprocess.run(
        [CXX, "-std=c++17", *VARIANT_FLAGS, f"-I{CSRC / 'include'}", f"-I{CSRC}", "-fopt-info-vec-all", "-c",
         str(probe), "-o", str(tmp_path / "probe.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stderr.splitlines()


def _check_loops(report: list[str], loops: list[range], names: tuple[str, ...], what: str) -> None:
    for lines, name in zip(loops, names):
        loop = [line for line in report if (m := re.search(r"chunk\.h:(\d+):", line)) and int(m.group(1)) in lines]
        assert any("loop vectorized" in line for line in loop), \
            f"the {name} of {what} is not vectorized:\n" + "\n".join(loop)
        scalar = [line for line in loop if "couldn't vectorize loop" in line or "not vectorized" in line]
        assert not scalar, f"a copy of the {name} of {what} stays scalar:\n" + "\n".join(scalar)


@pytest.mark.skipif(CXX is None or platform.machine() != "x86_64", reason="checks GCC's vectorizer on x86-64")
@pytest.mark.parametrize("coef,plain", CHUNK_KINDS,
                         ids=[c.split("::")[-1] + ("-plain" if p == "true" else "") for c, p in CHUNK_KINDS])
@pytest.mark.parametrize("rule,param,state,arith", ALL_CASES,
                         ids=[f"{r}-{p.split('::')[-1]}-{s[4:]}" + ("-pam" if a == "fw::Pam" else "")
                              for r, p, s, a in ALL_CASES])
def test_element_loop_vectorizes(tmp_path, rule, param, state, arith, coef, plain):
    """The gradient scan and the element loop that the combination takes: by pairs when every
    array holds 16-bit values (half weights; bfloat16 states or none) and the arithmetic is IEEE,
    else one by one."""
    report = _compile_probe(tmp_path, PROBE.format(rule=rule, param=param, state=state, arith=arith, coef=coef,
                                                   plain=plain))
    assert len(CHUNK_LOOPS) == 3, CHUNK_LOOPS
    pairs = param.startswith("fw::ParamHalf") and (state == "fw::StateBF16" or rule == "SGD") and arith == "fw::Ieee"
    scan, pair_loop, element_loop = CHUNK_LOOPS
    _check_loops(report, [scan, pair_loop if pairs else element_loop],
                 ("gradient scan", "pair loop" if pairs else "element loop"),
                 f"run_chunk<{rule}, {param}, {state}, {arith}, {coef}, {plain}>")


@pytest.mark.skipif(CXX is None or platform.machine() != "x86_64", reason="checks GCC's vectorizer on x86-64")
@pytest.mark.parametrize("coef", COEFS, ids=[c.split("::")[-1] for c in COEFS])
@pytest.mark.parametrize("rule,param,bits", QUANT_CASES,
                         ids=[f"{r}-{p.split('::')[-1]}-q{b}" for r, p, b in QUANT_CASES])
def test_quantized_block_loops_vectorize(tmp_path, rule, param, bits, coef):
    """Both element loops of a quantized block (values and maxima; encode and store)."""
    report = _compile_probe(tmp_path, QUANT_PROBE.format(rule=rule, param=param, bits=bits, coef=coef.split("::")[-1]))
    assert len(QUANT_LOOPS) == 4, QUANT_LOOPS
    _check_loops(report, QUANT_LOOPS[1:3], ("value loop", "store loop"),
                 f"run_quantized_block<{rule}, {param}, q{bits}, {coef}>")
