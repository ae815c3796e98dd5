"""The training benchmark (``benchmarks/train.py``) end to end on the CPU with a tiny model.

One run of ``main`` trains torch's mixed-precision baseline and fusedwarm with and without the step
in backward, plus two peers made unavailable on purpose: one whose module cannot be imported (it
must be listed as skipped with the ImportError) and one whose optimizer raises (listed as failed
with the error's first line); neither may stop the run. The checks are on the written result file:
the rows come from real training (finite, decreasing losses; throughput from the timed steps), the
memory accounting shows what the step in backward saves, and every comparison and target value is
the arithmetic of the rows. Small checks cover the configuration selection, the learning-rate
schedule and the target verdicts on CUDA at GPT-2-small scale, which a CPU run never reaches.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAN = ["torch-amp", "fusedwarm-x16", "fusedwarm-x16-bs"]
TINY = ["--layers", "1", "--dim", "32", "--heads", "2", "--seq", "32", "--batch", "4", "--steps", "12",
        "--warmup", "2", "--evals", "2", "--eval-batches", "2", "--log-every", "2", "--text-bytes", "200000",
        "--bucket-cap-mb", "0.01"]  # a bucket holds a few of the tiny model's gradients, not all of them


@pytest.fixture
def bench(monkeypatch):
    """The benchmark module; its memory subprocesses run ``benchmarks/train.py``, which finds
    fusedwarm through PYTHONPATH, as when it is run from the repository root."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return importlib.import_module("train")


def test_select_configs_takes_names_and_regular_expressions(bench):
    assert bench.select_configs("fusedwarm-x16.*, torch-amp") == ["torch-amp", "fusedwarm-x16", "fusedwarm-x16-bs"]
    assert bench.select_configs("fusedwarm-x16") == ["fusedwarm-x16"]  # whole-name match: not the -bs variant
    with pytest.raises(ValueError, match="matches no configuration"):
        bench.select_configs("torch-amp,adam")


def test_lr_schedule_warms_up_then_decays_to_the_final_fraction(bench):
    factors = [bench.lr_factor(step, warmup=10, total=100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(bench.FINAL_LR_FRACTION)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_cpu_run_writes_rows_comparisons_and_table(bench, tmp_path, monkeypatch):
    def needs_cuda(module, params, hyper):
        raise RuntimeError("this kernel runs on CUDA only\nmore detail")

    from step import Peer  # benchmarks/ is on the path (the bench fixture)

    monkeypatch.setitem(bench.PEERS, "optimi-bf16", Peer("fusedwarm_test_no_such_module", "absent peer", needs_cuda))
    monkeypatch.setitem(bench.PEERS, "bnb-8bit", Peer("math", "CUDA-only peer", needs_cuda))
    out = tmp_path / "train_cpu.json"
    assert bench.main([*TINY, "--configs", ",".join([*RAN, "optimi-bf16", "bnb-8bit"]), "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["configs"]}
    assert list(rows) == [*RAN, "optimi-bf16", "bnb-8bit"]
    assert rows["optimi-bf16"]["status"] == "skipped"
    assert rows["optimi-bf16"]["error"].startswith("ModuleNotFoundError")
    assert "fusedwarm_test_no_such_module" in rows["optimi-bf16"]["error"]
    assert rows["bnb-8bit"]["status"] == "failed"
    assert rows["bnb-8bit"]["error"] == "RuntimeError: this kernel runs on CUDA only"

    setup = result["setup"]
    assert result["environment"]["device_type"] == "cpu" and result["environment"]["torch"]
    for name in RAN:
        r = rows[name]
        assert r["status"] == "ok", (name, r["error"])
        curve, held = r["loss_curve"]["loss"], r["held_out_curve"]["loss"]
        assert r["loss_curve"]["step"] == list(range(2, 13, 2)) and r["held_out_curve"]["step"] == [6, 12]
        assert all(math.isfinite(x) for x in [*curve, *held])
        assert curve[-1] < curve[0], (name, curve)
        assert held[-1] < held[0] < math.log(256), (name, held)  # below the loss of a uniform guess
        assert r["final_train_loss"] == curve[-1] and r["held_out_loss"] == held[-1]
        assert r["timed_steps"] == setup["steps"] - setup["warmup"] == 10
        assert r["tokens_per_s"] == pytest.approx(10 * 4 * 32 / r["timed_seconds"])
        assert "error" not in r["memory"], r["memory"]
        assert r["peak_memory_bytes"] == r["memory"]["peak_storage_bytes"]
    # Same initial weights and batches: the step in backward gives bit-identical losses.
    assert rows["fusedwarm-x16"]["loss_curve"] == rows["fusedwarm-x16-bs"]["loss_curve"]

    amp, x16, bs = (rows[n]["memory"] for n in RAN)
    params = rows["torch-amp"]["params"]
    assert amp["peak_storage_bytes"] / params == pytest.approx(16, abs=0.1)  # fp32 weight + grad + 2 states
    assert bs["peak_storage_bytes"] < x16["peak_storage_bytes"] < amp["peak_storage_bytes"]
    assert bs["peak_grad_bytes"] < bs["grad_set_bytes"] == x16["peak_grad_bytes"]  # gradients freed as it goes

    base = rows["torch-amp"]
    for name in RAN:
        r = rows[name]
        assert r["vs_baseline"] == pytest.approx({
            "memory_saving": 1 - r["peak_memory_bytes"] / base["peak_memory_bytes"],
            "speed_ratio": r["tokens_per_s"] / base["tokens_per_s"],
            "held_out_ratio": r["held_out_loss"] / base["held_out_loss"]})
    assert rows["optimi-bf16"]["vs_baseline"] is None and rows["bnb-8bit"]["vs_baseline"] is None
    targets = result["targets"]
    assert targets["candidate"] == "fusedwarm-x16-bs" and targets["applies"] is False and targets["all_met"] is None
    for key in ("memory_saving", "speed_ratio", "held_out_ratio"):
        assert targets[key]["value"] == rows["fusedwarm-x16-bs"]["vs_baseline"][key]
        assert targets[key]["met"] is None  # a CPU run: comparison without a verdict
    assert targets["memory_saving"]["value"] > 0

    table = out.with_suffix(".md").read_text()
    assert table == bench.render_markdown(result) + "\n"
    for name in RAN:
        assert f"| {name} |" in table
    assert "skipped: ModuleNotFoundError" in table and "failed: RuntimeError: this kernel runs on CUDA only" in table


def test_target_verdicts_apply_on_cuda_at_gpt2_small_scale_only(bench):
    rows = [{"name": "torch-amp", "status": "ok", "vs_baseline": {}},
            {"name": "fusedwarm-x16-bs", "status": "ok",
             "vs_baseline": {"memory_saving": 0.45, "speed_ratio": 1.10, "held_out_ratio": 1.004}}]
    gpt2 = {k: bench.PRESETS["gpt2-small"][k] for k in bench.SCALE_KEYS}
    t = bench.target_verdicts(rows, gpt2, "cuda")
    assert t["applies"] and [t[k]["met"] for k in bench.TARGETS] == [True, False, True] and t["all_met"] is False
    for setup, device in ((gpt2, "cpu"), ({**gpt2, "layers": 2}, "cuda")):
        t = bench.target_verdicts(rows, setup, device)
        assert not t["applies"] and t["all_met"] is None and all(t[k]["met"] is None for k in bench.TARGETS)
        assert t["speed_ratio"]["value"] == 1.10
