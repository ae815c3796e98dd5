"""Plots every warmup and schedule shape as the fused kernels compute it.

The factors come from ``torch.ops.fusedwarm.schedule_factors``, which evaluates the same layer-1
header functions (``csrc/include/fusedwarm/schedule.cuh``) as the update kernels, so the curves are
what training uses; the float64 formulas of ``fusedwarm.reference`` are drawn dashed on top, and
the largest difference between the two is recorded per curve.

Run from the repository root (matplotlib is needed only here)::

    PYTHONPATH=. python benchmarks/schedules_plot.py

Results go to ``benchmarks/results/schedules.png`` and ``schedules.json`` (versions, commit, and
per curve the maximum |fused - reference| over the plotted steps).
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

import torch

import fusedwarm
from fusedwarm import _ops, reference, schedules
from step import git

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

BETA2 = 0.999  # AdamW's default: untuned warmups last about 2000 updates
WARMUP_STEPS = 6000
TOTAL = 10_000

WARMUPS = {
    "untuned (linear over 2/(1-β2))": dict(warmup="untuned"),
    "untuned-exp (1 - exp(-(1-β2) t))": dict(warmup="untuned-exp"),
    "linear, 1000 steps from 0.1": dict(warmup="linear", warmup_steps=1000, warmup_start=0.1),
    "radam (r_t; momentum SGD while ρ_t ≤ 5)": dict(warmup="radam"),
}
SCHEDULES = {
    "Constant": schedules.Constant(),
    "Cosine(10000, final 0.1)": schedules.Cosine(TOTAL, final_fraction=0.1),
    "WSD(10000, 0.2, linear)": schedules.WSD(TOTAL, 0.2, "linear"),
    "WSD(10000, 0.2, 1-sqrt)": schedules.WSD(TOTAL, 0.2, "1-sqrt"),
    "WSD(10000, 0.2, cosine, final 0.1)": schedules.WSD(TOTAL, 0.2, "cosine", 0.1),
}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = _ops.load()
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=(13, 4.5))
    record = {}
    steps = torch.arange(1, WARMUP_STEPS + 1)
    for label, kw in WARMUPS.items():
        fused = ops.schedule_factors(steps, BETA2, **kw)[:, 0]
        ref = torch.tensor([reference.warmup_factor(kw["warmup"], int(t), BETA2, kw.get("warmup_steps"),
                                                    kw.get("warmup_start", 0.0))[0] for t in steps])
        record[f"warmup: {label}"] = float((fused.double() - ref).abs().max())
        line, = ax_w.plot(steps, fused, label=label)
        ax_w.plot(steps, ref, "--", color=line.get_color(), linewidth=0.8)
    ax_w.set(title=f"warmup factor (β2 = {BETA2})", xlabel="update t", ylabel="factor")
    ax_w.legend(fontsize=8)
    steps = torch.arange(1, TOTAL + 501)
    for label, sched in SCHEDULES.items():
        fused = ops.schedule_factors(steps, BETA2, **sched.op_args())[:, 1]
        ref = torch.tensor([reference.schedule_factor(sched.to_dict(), int(t)) for t in steps])
        record[f"schedule: {label}"] = float((fused.double() - ref).abs().max())
        line, = ax_s.plot(steps, fused, label=label)
        ax_s.plot(steps, ref, "--", color=line.get_color(), linewidth=0.8)
    ax_s.set(title="schedule factor", xlabel="update t", ylabel="factor")
    ax_s.legend(fontsize=8)
    fig.suptitle("fusedwarm: lr multipliers computed in the kernel (solid) and the float64 reference (dashed)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "schedules.png", dpi=110)
    meta = {
        "environment": {"torch": torch.__version__, "fusedwarm": fusedwarm.__version__, "python": platform.python_version(),
                        "matplotlib": matplotlib.__version__, "git_commit": git("rev-parse", "HEAD") or "unknown",
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "beta2": BETA2,
        "max_abs_diff_fused_vs_reference": record,
    }
    (RESULTS / "schedules.json").write_text(json.dumps(meta, indent=2) + "\n")
    for name, diff in record.items():
        print(f"{diff:.2e}  {name}")


if __name__ == "__main__":
    main()
