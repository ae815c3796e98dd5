"""How long a user waits for fusedwarm's just-in-time build, and what a step costs the host.

Measures, on this machine, in fresh processes with their own cache directories:

* **cold first step**: ``import torch``, then ``import fusedwarm``, an AdamW on bf16 weights with
  16 extra bits and bf16 states, and its first ``step()`` with an empty cache (the torch-facing
  library and the step's one kernel variant are compiled); reported as time beyond torch's import;
* **warm first step**: the same in a new process with the cache filled, and for reference
  ``torch.optim.AdamW(fused=True)``'s first step in a fresh process (torch.optim's first
  ``add_param_group`` imports ``torch._dynamo``, about a second; fusedwarm does not, see
  ``fusedwarm/_eager.py``), each followed by ``zero_grad()``, and whether ``torch._dynamo`` was
  imported;
* **one kernel variant**: a CPU variant (C++ compiler) and a CUDA variant (NVRTC through CuPy,
  for sm_90; no GPU needed), each into an empty cache;
* **every variant** (``python -m fusedwarm build --all``) for the CPU and for one CUDA arch;
* **host time per step** for a GPT-2-small parameter list (148 tensors) shrunk to a few elements
  each, so that the time is the per-tensor host work (Python, packing, dispatch) and not the
  arithmetic: ``fusedwarm.AdamW.step()`` vs ``torch.optim.AdamW(fused=True).step()``, and the
  bare op calls (``torch.ops.fusedwarm.adamw_`` vs ``torch._fused_adamw_``), timed in interleaved
  blocks (the fastest block of each, and the median ratio of neighbouring blocks).

The targets (issue "JIT in seconds"): cold first step <= 20 s on a 2-core machine, warm <= 1 s
beyond torch's import, one NVRTC variant <= 5 s, fusedwarm's host time <= torch fused AdamW's.

Run from the repository root::

    PYTHONPATH=. python benchmarks/jit_build.py

Results go to ``benchmarks/results/jit_build.json`` and ``jit_build.md`` (also printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# A warm start is what a process that never compiles waits for. Each snippet also reports whether
# torch._dynamo got imported (about a second here): torch.optim's own optimizers import it in their
# first add_param_group; fusedwarm marks its methods eager lazily (fusedwarm._eager) and does not.
FIRST_STEP = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import fusedwarm
p = torch.nn.Parameter(torch.randn(4096, dtype=torch.bfloat16))
opt = fusedwarm.AdamW([p], lr=1e-3, extra_bits=16, state_dtype=torch.bfloat16)
p.grad = torch.randn_like(p)
opt.step()
opt.zero_grad()
t2 = time.perf_counter()
print(f"RESULT {t1 - t0:.4f} {t2 - t1:.4f} {int('torch._dynamo' in sys.modules)}")
"""

# The same first step with torch's own fused AdamW (float32 weights): what torch.optim costs a fresh
# process beyond torch's import.
TORCH_FIRST_STEP = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
p = torch.nn.Parameter(torch.randn(4096))
opt = torch.optim.AdamW([p], lr=1e-3, fused=True)
p.grad = torch.randn_like(p)
opt.step()
opt.zero_grad()
t2 = time.perf_counter()
print(f"RESULT {t1 - t0:.4f} {t2 - t1:.4f} {int('torch._dynamo' in sys.modules)}")
"""

VARIANT = """
import sys, time
from fusedwarm import _build
backend, name = sys.argv[1], sys.argv[2]
_build.library("core")  # the cache key's compiler query, outside the timing
if backend.startswith("cuda"):
    _build._nvrtc()
t = time.perf_counter()
_build.variant_file(backend, name)
print(f"RESULT {time.perf_counter() - t:.4f}")
"""

HOST = """
import statistics, time, torch
import fusedwarm
torch.manual_seed(0)
# GPT-2 small's parameter list (12 layers, width 768): 148 tensors, as counts of its shapes.
shapes = [(50257, 768), (1024, 768)] + [s for _ in range(12) for s in (
    (768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,),
    (768, 3072), (768,))] + [(768,), (768,)]
n = len(shapes)
def params(dtype):
    ps = [torch.nn.Parameter(torch.randn(4, dtype=dtype)) for _ in shapes]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps
def block(fn, calls=20):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6
def compare(a, b, rounds=60):
    # Interleaved blocks of calls (a, b, a, b, ...), so that both see the same machine: the fastest
    # block of each (what the code costs when nothing else runs) and the median ratio of neighbours.
    for _ in range(20):
        a()
        b()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(block(a))
        tb.append(block(b))
    return min(ta), min(tb), statistics.median(x / y for x, y in zip(ta, tb))
fw_params = params(torch.bfloat16)
fw = fusedwarm.AdamW(fw_params, lr=1e-3, extra_bits=16, state_dtype=torch.bfloat16)
fw.step()
th_params = params(torch.float32)
th = torch.optim.AdamW(th_params, lr=1e-3, fused=True)
th.step()
g = fw.param_groups[0]
st = [fw.state[p] for p in fw_params]
ops = torch.ops.fusedwarm
names = list(st[0])
def fw_op():
    ops.adamw_(fw_params, [p.grad for p in fw_params], [s["extra"] for s in st], [s["exp_avg"] for s in st],
               [s["exp_avg_sq"] for s in st], [s["step"] for s in st], list(range(n)), None, 1e-3, 16, 0, 0.9,
               0.999, 1e-8, 0.01, False)
tst = [th.state[p] for p in th_params]
def th_op():
    torch._fused_adamw_(th_params, [p.grad for p in th_params], [s["exp_avg"] for s in tst],
                        [s["exp_avg_sq"] for s in tst], [], [s["step"] for s in tst], lr=1e-3, beta1=0.9,
                        beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False)
print("RESULT", n, *compare(fw.step, th.step), *compare(fw_op, th_op), ",".join(names))
"""


def _python(code: str, cache: Path, *args: str) -> list[str]:
    env = dict(os.environ, FUSEDWARM_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"jit_build: a measurement failed:\n{proc.stderr[-3000:]}")
    return next(line for line in proc.stdout.splitlines() if line.startswith("RESULT")).split()[1:]


def _build_all(cache: Path, backend: str) -> float:
    env = dict(os.environ, FUSEDWARM_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fusedwarm", "build", "--all", "--backend", backend], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"jit_build: build --all --backend {backend} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def measure(runs: int, build_all: bool) -> dict:
    import torch

    from fusedwarm import _build

    out: dict = {"cold_first_step": [], "warm_first_step": [], "torch_first_step": []}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            for key, code in (("cold_first_step", FIRST_STEP), ("warm_first_step", FIRST_STEP),
                              ("torch_first_step", TORCH_FIRST_STEP)):
                torch_s, rest_s, dynamo = _python(code, Path(tmp))
                out[key].append({"torch_import_s": float(torch_s), "beyond_torch_s": float(rest_s),
                                 "imported_dynamo": dynamo == "1"})
    variants = {"cpu": "adamw.bf16x16.bf16.ieee", "cuda-sm_90": "adamw.bf16x16.bf16.ieee"}
    out["one_variant_s"] = {}
    for backend, name in variants.items():
        times = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                times.append(float(_python(VARIANT, Path(tmp), backend, name)[0]))
        out["one_variant_s"][f"{backend} {name}"] = times
    if build_all:
        out["build_all_s"] = {}
        for backend in ("cpu", "cuda-sm_90"):
            with tempfile.TemporaryDirectory() as tmp:
                out["build_all_s"][backend] = _build_all(Path(tmp), backend)
        out["build_all_modules"] = {"cpu": len(_build.step_variants()), "cuda-sm_90": len(_build.step_variants()) + 1}
    with tempfile.TemporaryDirectory() as tmp:
        fields = _python(HOST, Path(tmp))
    out["host_us"] = {"tensors": int(fields[0]), "fusedwarm_step": float(fields[1]), "torch_fused_step": float(fields[2]),
                      "step_ratio_median": float(fields[3]), "fusedwarm_op": float(fields[4]),
                      "torch_fused_op": float(fields[5]), "op_ratio_median": float(fields[6]),
                      "timing": "fastest of 60 interleaved blocks of 20 calls; ratio: median over the blocks"}
    nvrtc = _build._nvrtc()
    out["environment"] = {
        "cpu_model": _cpu_model(), "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
        "torch": torch.__version__, "compiler": _build._compiler_id(_build._cxx()), "nvrtc": nvrtc.version,
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average": list(os.getloadavg()), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return out


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} s" if len(values) > 1 else f"{values[0]:.2f} s"


def markdown(r: dict) -> str:
    e = r["environment"]
    cold = [x["beyond_torch_s"] for x in r["cold_first_step"]]
    warm = [x["beyond_torch_s"] for x in r["warm_first_step"]]
    reference = [x["beyond_torch_s"] for x in r["torch_first_step"]]
    def dynamo(key: str) -> str:
        imported = {x["imported_dynamo"] for x in r[key]}
        return "imports torch._dynamo" if imported == {True} else (
            "never imports torch._dynamo" if imported == {False} else "imports torch._dynamo in some runs")
    h = r["host_us"]
    lines = [
        f"JIT build benchmark ({e['cpu_model']}, {e['usable_cpus']} CPUs, torch {e['torch']}, {e['compiler']}, "
        f"NVRTC {e['nvrtc']}, commit {(e['git_commit'] or '?')[:10]}{' (dirty)' if e['git_dirty'] else ''}; "
        f"{len(cold)} runs each; `benchmarks/jit_build.py`):",
        "",
        "| what | measured | target |",
        "|---|---|---|",
        f"| cold first step, empty cache (AdamW, bf16 weights, 16 extra bits, bf16 states), beyond torch's import "
        f"| {_range(cold)} | <= 20 s |",
        f"| warm process: import fusedwarm, construction, first step and zero_grad, beyond torch's import "
        f"({dynamo('warm_first_step')}) | {_range(warm)} | <= 1 s |",
        f"| for reference, torch.optim.AdamW(fused=True): construction, first step and zero_grad, beyond "
        f"torch's import ({dynamo('torch_first_step')}) | {_range(reference)} | - |",
    ]
    for key, times in r["one_variant_s"].items():
        backend, name = key.split()
        how = "NVRTC through CuPy, no GPU" if backend.startswith("cuda") else "C++ compiler"
        target = "<= 5 s" if backend.startswith("cuda") else "-"
        lines.append(f"| one kernel variant, {backend} ({name}; {how}) | {_range(times)} | {target} |")
    for backend, seconds in r.get("build_all_s", {}).items():
        lines.append(f"| `python -m fusedwarm build --all --backend {backend}` ({r['build_all_modules'][backend]} "
                     f"modules, one process) | {seconds:.0f} s | report |")
    lines += [
        f"| host time per step, {h['tensors']} tensors of 4 elements (GPT-2 small's list): fusedwarm.AdamW.step() "
        f"vs torch.optim.AdamW(fused=True).step(), fastest block (median ratio of interleaved blocks) "
        f"| {h['fusedwarm_step']:.0f} vs {h['torch_fused_step']:.0f} us ({h['step_ratio_median']:.2f}) | <= torch's |",
        f"| the same, bare op calls: torch.ops.fusedwarm.adamw_ vs torch._fused_adamw_ | {h['fusedwarm_op']:.0f} vs "
        f"{h['torch_fused_op']:.0f} us ({h['op_ratio_median']:.2f}) | - |",
        "",
        f"Load average at the end: {', '.join(f'{x:.2f}' for x in e['load_average'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repeats of each cold/warm/variant measurement")
    parser.add_argument("--no-build-all", action="store_true", help="skip the build --all timings (minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS / "jit_build.json")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    result = measure(args.runs, not args.no_build_all)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
