"""The CPU speed claim as a range: benchmarks/step.py's head-to-head comparison (fusedwarm AdamW,
bf16 weights, 16 extra bits, bf16 states, against torch.optim.AdamW(fused=True) on float32
weights) repeated in separate processes.

One run of step.py is one sample of what a user sees: where the allocator puts each tensor, and
what else the machine is doing, change from process to process, and the speedup with them (five
earlier runs on one idle machine spread over 0.91-1.19x at 16M parameters). So the README quotes
the range over several runs, never the best one. Each run is a fresh
``step.py --sizes S --only '^(torch fused fp32|fusedwarm bf16 x16 bf16)$'`` process in the default
environment: the variables that change how glibc allocates (``THP_MEM_ALLOC_ENABLE``,
``GLIBC_TUNABLES``, ``MALLOC_*``, ``LD_PRELOAD``) are removed from the runs' environment, and the
result file lists the ones removed.

Run from the repository root::

    PYTHONPATH=. python benchmarks/step_runs.py --runs 5               # 16M and 64M parameters

Results go to ``benchmarks/results/step_cpu_runs_default.json`` (machine, versions, commit, command
line, every run's speedup and step times per size, and per size the range) and a markdown summary
next to it (also printed), which ``benchmarks/report.py`` copies into the README.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from step import BASELINE, CANDIDATE, RESULTS, ROOT, TARGET_MIN_PARAMS, TARGET_SPEEDUP, count_label, parse_sizes

ONLY = f"^({BASELINE}|{CANDIDATE})$"
DEFAULT_OUT = RESULTS / "step_cpu_runs_default.json"
# Environment variables that change where glibc puts tensors: not part of the default environment.
ALLOCATOR_VARIABLES = ("THP_MEM_ALLOC_ENABLE", "GLIBC_TUNABLES", "LD_PRELOAD")
ALLOCATOR_PREFIXES = ("MALLOC_",)
# The machine and version fields of step.py's environment record that every run shares.
MACHINE_KEYS = ("cpu_model", "logical_cpus", "usable_cpus", "torch_threads", "torch", "python", "platform",
                "fusedwarm", "git_commit", "git_dirty", "thp_mode")


def default_environment() -> tuple[dict[str, str], list[str]]:
    """This process's environment without the allocator variables, and the names removed."""
    removed = sorted(k for k in os.environ if k in ALLOCATOR_VARIABLES or k.startswith(ALLOCATOR_PREFIXES))
    env = {k: v for k, v in os.environ.items() if k not in removed}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env, removed


def run_once(index: int, args, env: dict[str, str], workdir: Path) -> dict:
    """One step.py process; its result file's record of this run (speedup and step times per size)."""
    out = workdir / f"run_{index}.json"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "step.py"), "--sizes",
           ",".join(str(s) for s in args.sizes), "--only", ONLY, "--out", str(out)]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step_runs: run {index + 1} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    sizes = []
    for s in result["sizes"]:
        h2h = s["head_to_head"]
        if h2h is None:
            raise SystemExit(f"step_runs: run {index + 1} has no head-to-head result at {s['params']:,} "
                             f"parameters:\n{proc.stdout[-3000:]}")
        sizes.append({"params": s["params"], "requested_params": s["requested_params"], "speedup": h2h["speedup"],
                      "baseline_ms": h2h["baseline"]["median_ms"], "candidate_ms": h2h["candidate"]["median_ms"],
                      "timed_steps": h2h["candidate"]["timed_steps"]})
    env_record = result["environment"]
    return {"run": index + 1, "timestamp": env_record["timestamp"], "load_average": env_record["load_average"],
            "copy_bandwidth_gbps": result["copy_bandwidth_gbps"], "sizes": sizes,
            "machine": {k: env_record.get(k) for k in MACHINE_KEYS}}


def summarize(runs: list[dict]) -> list[dict]:
    """Per size: every run's speedup, their range and median, and how many runs meet the target."""
    out = []
    for i, size in enumerate(runs[0]["sizes"]):
        speedups = [r["sizes"][i]["speedup"] for r in runs]
        out.append({"params": size["params"], "speedups": speedups, "min": min(speedups), "max": max(speedups),
                    "median": statistics.median(speedups),
                    "runs_meeting_target": sum(s >= TARGET_SPEEDUP for s in speedups)})
    return out


def markdown(result: dict, path: Path) -> str:
    """The range per size with every run's numbers, as the README shows it."""
    m, runs = result["machine"], result["runs"]
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    lines = [
        f"From `{where}` ({m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}, transparent huge "
        f"pages: {m['thp_mode']}, commit {(m['git_commit'] or '?')[:10]}{' (dirty)' if m['git_dirty'] else ''}): "
        f"{len(runs)} runs of "
        f"`benchmarks/step.py`, each in its own process in the default environment; "
        f"{CANDIDATE} vs {BASELINE} timed interleaved, speedup = ratio of median step times.",
        "",
        "| parameters | speedup, range over runs | median | runs at >= " + f"{TARGET_SPEEDUP}x | "
        "per run: speedup (fusedwarm / torch ms) |",
        "|---|---|---|---|---|",
    ]
    for i, s in enumerate(result["summary"]):
        per_run = "; ".join(f"{r['sizes'][i]['speedup']:.2f}x ({r['sizes'][i]['candidate_ms']:.2f} / "
                            f"{r['sizes'][i]['baseline_ms']:.2f})" for r in runs)
        lines.append(f"| {count_label(s['params'])} | {s['min']:.2f}-{s['max']:.2f}x | {s['median']:.2f}x | "
                     f"{s['runs_meeting_target']} of {len(runs)} | {per_run} |")
    loads = [r["load_average"][0] for r in runs if r["load_average"]]
    if loads:
        lines += ["", f"Load average before each run: {', '.join(f'{x:.2f}' for x in loads)} "
                      f"(other work on the machine slows both optimizers, not always equally)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="separate step.py processes (default: 5)")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("16M,64M"),
                        help=f"comma-separated parameter counts, each at least {count_label(TARGET_MIN_PARAMS)} "
                             "(the head-to-head's threshold; default: 16M,64M)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: step.py's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON path (default: results/step_cpu_runs_default.json)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if not args.sizes:
        parser.error("--sizes is empty")
    small = [count_label(s) for s in args.sizes if s < TARGET_MIN_PARAMS]
    if small:
        parser.error(f"--sizes {','.join(small)}: step.py compares the two optimizers head to head only from "
                     f"{count_label(TARGET_MIN_PARAMS)} parameters")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")

    env, removed = default_environment()
    if removed:
        print(f"removed from the runs' environment: {', '.join(removed)}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="step_runs_") as tmp:
        for i in range(args.runs):
            runs.append(run_once(i, args, env, Path(tmp)))
            print(f"run {i + 1}/{args.runs}: " + ", ".join(
                f"{count_label(s['params'])} {s['speedup']:.2f}x" for s in runs[-1]["sizes"]), flush=True)
    machines = [r.pop("machine") for r in runs]
    if any(m != machines[0] for m in machines):
        raise SystemExit(f"step_runs: the runs saw different machines or versions: {machines}")
    result = {"benchmark": "step_runs", "machine": machines[0], "baseline": BASELINE, "candidate": CANDIDATE,
              "target": TARGET_SPEEDUP,
              "config": {"runs": args.runs, "sizes": args.sizes, "steps": args.steps, "only": ONLY,
                         "removed_environment": removed},
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "runs": runs, "summary": summarize(runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result, args.out.resolve())
    args.out.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
