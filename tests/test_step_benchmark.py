"""benchmarks/step.py end to end on a tiny parameter list: it runs, its bytes model matches the
optimizers' real tensors, and its summary and verdicts come from its rows. benchmarks/step_runs.py:
its range is the arithmetic of its runs, and bad arguments are refused before anything runs."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODES = ["torch fused fp32", "fusedwarm fp32", "fusedwarm bf16 x16 bf16", "fusedwarm bf16 x0 fp32"]
# Bytes moved per parameter by the documented model (weight and states read + written, gradient
# read); the per-tensor step counters add a few thousandths at this size.
EXPECTED_MOVED = {"torch fused fp32": 28, "fusedwarm fp32": 28, "fusedwarm bf16 x16 bf16": 18,
                  "fusedwarm bf16 x0 fp32": 22}


def run_step(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("step") / "step.json"
    only = "^(" + "|".join(MODES) + ")$"
    proc = run_step(out.parent, "--sizes", "150k,300k", "--steps", "3", "--warmup", "1", "--only", only,
                    "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_every_size_has_every_mode_timed(result):
    data, _ = result
    assert [s["requested_params"] for s in data["sizes"]] == [150_000, 300_000]
    for size in data["sizes"]:
        assert size["params"] >= size["requested_params"]
        assert sum(math.prod(shape) for _, shape in size["shapes"]) == size["params"]
        rows = {r["name"]: r for r in size["rows"]}
        assert sorted(rows) == sorted(MODES)
        for name, r in rows.items():
            assert r["error"] is None, (name, r["error"])
            assert r["timed_steps"] == 3 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
            assert r["bytes_moved_per_param"] == pytest.approx(EXPECTED_MOVED[name], abs=0.05)
            gbps = r["bytes_moved_per_param"] * r["params"] / (r["median_ms"] / 1e3) / 1e9
            assert r["effective_gbps"] == pytest.approx(gbps)
            assert r["fraction_of_copy"] == pytest.approx(gbps / data["copy_bandwidth_gbps"])


def test_targets_are_not_judged_below_their_sizes(result):
    data, _ = result
    for size in data["sizes"]:
        assert size["head_to_head"] is None  # only from 16M parameters
        assert size["bandwidth"]["meets_target"] is None
        cand = next(r for r in size["rows"] if r["name"] == size["bandwidth"]["mode"])
        assert size["bandwidth"]["fraction_of_copy"] == cand["fraction_of_copy"]


def test_markdown_lists_every_mode_with_its_numbers(result):
    data, table = result
    for name in MODES:
        line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        for size in data["sizes"]:
            r = next(r for r in size["rows"] if r["name"] == name)
            assert f"{r['median_ms']:.2f} ({100 * r['fraction_of_copy']:.0f}%)" in line


@pytest.mark.parametrize("sizes", ["12", "1M,abc", "5k"])
def test_bad_sizes_are_refused_with_a_clear_error(tmp_path, sizes):
    proc = run_step(tmp_path, "--sizes", sizes, "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert "--sizes" in proc.stderr or "parameter count" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("args, message", [(["--runs", "0"], "--runs must be at least 1"),
                                           (["--sizes", "16M,1M"], "--sizes 1M: step.py compares"),
                                           (["--sizes", "abc"], "not a parameter count"),
                                           (["--steps", "0"], "--steps must be at least 1")])
def test_step_runs_refuses_bad_arguments_with_a_clear_error(tmp_path, args, message):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_runs.py"), *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not out.exists()


def test_step_runs_summary_is_the_range_of_its_runs(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    step_runs = importlib.import_module("step_runs")
    runs = [{"run": i + 1, "load_average": [0.5, 0.5, 0.5], "sizes": [
        {"params": 16_000_128, "speedup": s16, "baseline_ms": 10.0, "candidate_ms": 10.0 / s16},
        {"params": 64_000_000, "speedup": s64, "baseline_ms": 40.0, "candidate_ms": 40.0 / s64}]}
        for i, (s16, s64) in enumerate([(1.1, 1.35), (0.9, 1.2), (1.3, 1.25)])]
    summary = step_runs.summarize(runs)
    assert [(s["min"], s["max"], s["median"], s["runs_meeting_target"]) for s in summary] == [
        (0.9, 1.3, 1.1, 1), (1.2, 1.35, 1.25, 1)]
    machine = {k: None for k in step_runs.MACHINE_KEYS}
    table = step_runs.markdown({"machine": machine, "runs": runs, "summary": summary}, ROOT / "x.json")
    assert "| 16M | 0.90-1.30x | 1.10x | 1 of 3 | 1.10x (9.09 / 10.00); 0.90x (11.11 / 10.00); 1.30x" in table
    assert "| 64M | 1.20-1.35x | 1.25x | 1 of 3 |" in table
