"""Time per optimizer step and effective memory bandwidth: fusedwarm AdamW vs torch.optim.AdamW.

The parameters are a GPT-style list of tensors (token embedding; per layer the qkv, attention
projection and MLP weights and biases and two layernorms; a final layernorm) totalling about
``--params`` elements. Every optimizer gets fresh random non-zero gradients, created once and
reused, a few warm-up steps, then the median over ``--steps`` timed steps.

Bytes moved per step follow a simple model: every per-parameter tensor is read once, and written
once if the optimizer updates it (weight, extra bits, states; the gradient is only read). The
sizes come from the dtypes of the tensors the optimizer actually holds after its first step, so,
e.g., torch fused AdamW on float32 weights moves 4+4 (weight) + 4 (grad) + 8 (m) + 8 (v) = 28
bytes per parameter, and fusedwarm on bfloat16 weights with 16 extra bits and bfloat16 states
2+2 + 2+2 + 2 + 4 + 4 = 18. Effective bandwidth = modelled bytes / median step time, shown next
to the machine's copy bandwidth (a large tensor copy, read + write bytes, same threads, best of
20). An optimizer can exceed 100% of it: a copy's destination is written without being read,
which write-allocate caches pay for with a hidden read; the in-place add ``a += b`` printed
alongside has no such hidden traffic.

Last, the project's CPU target is checked: fusedwarm AdamW (bf16 weights, 16 extra bits, bf16
states) against torch.optim.AdamW(fused=True) on float32 weights, timed interleaved (one step of
each in turn, so both see the same machine load), torch's default thread count for both.

Run from the repository root::

    PYTHONPATH=. python benchmarks/step.py                    # CPU, 16M parameters
    PYTHONPATH=. python benchmarks/step.py --device cuda --params 350M

Results go to ``benchmarks/results/step_<device>.json`` (device, versions, commit, command line
and every row), plus a bar chart next to it when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fusedwarm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# The project's CPU target: fusedwarm (bf16 weights, 16 extra bits, bf16 states) at least this
# much faster than torch.optim.AdamW(fused=True) on float32 weights, from 16M parameters up.
TARGET_SPEEDUP = 1.3
TARGET_MIN_PARAMS = 16_000_000
BASELINE = "torch fused fp32"
CANDIDATE = "fusedwarm bf16 x16 bf16"

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 1e-2


# ---- parameters ---------------------------------------------------------------------------------


def parse_count(text: str) -> int:
    """'16M', '1.5G', '350k', '2e6' or '1000' -> an integer count."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMgGbB]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 16M, 1.5G, 350k)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[m.group(2).lower()]
    value = int(round(float(m.group(1)) * scale))
    if value < 100_000:
        raise argparse.ArgumentTypeError(f"--params must be at least 100k, got {text!r}")
    return value


def gpt_shapes(total: int) -> list[tuple[str, tuple[int, ...]]]:
    """Named shapes of a GPT-2-style model with about ``total`` parameters.

    The width is picked so that ~80% of the parameters sit in the transformer blocks at a
    GPT-like aspect ratio (width ~ 64 x depth); the embedding's row count takes up the rest,
    rounded up so that the total is at least ``total`` (and less than one row more).
    """
    d = max(64, 64 * round((0.8 * total * 64 / 12) ** (1 / 3) / 64))
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round(0.8 * total / per_layer))
    while layers > 1 and layers * per_layer + 2 * d + d > total:
        layers -= 1
    vocab = max(1, -(-(total - layers * per_layer - 2 * d) // d))  # rounded up: at least ``total``
    shapes = [("wte", (vocab, d))]
    for i in range(layers):
        shapes += [
            (f"h{i}.ln1.weight", (d,)),
            (f"h{i}.ln1.bias", (d,)),
            (f"h{i}.attn.qkv.weight", (3 * d, d)),
            (f"h{i}.attn.qkv.bias", (3 * d,)),
            (f"h{i}.attn.proj.weight", (d, d)),
            (f"h{i}.attn.proj.bias", (d,)),
            (f"h{i}.ln2.weight", (d,)),
            (f"h{i}.ln2.bias", (d,)),
            (f"h{i}.mlp.fc.weight", (4 * d, d)),
            (f"h{i}.mlp.fc.bias", (4 * d,)),
            (f"h{i}.mlp.proj.weight", (d, 4 * d)),
            (f"h{i}.mlp.proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


def make_params(shapes, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Parameters with random values and random non-zero gradients (made once, reused every step)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype).requires_grad_(True)
        g = (torch.randn(shape, generator=gen, device=device) * 1e-3).to(dtype)
        p.grad = torch.where(g == 0, torch.full_like(g, 1e-3), g)  # never exactly zero
        params.append(p)
    return params


# ---- the optimizers under test ------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    name: str
    library: str  # "torch" or "fusedwarm"
    param_dtype: torch.dtype
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    extra_bits: int | None = None
    state_dtype: torch.dtype | None = None


def modes() -> list[Mode]:
    hyper = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    out = []
    for dt, short in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for impl in ("fused", "foreach"):
            out.append(Mode(f"torch {impl} {short}", "torch", dt,
                            lambda ps, impl=impl: torch.optim.AdamW(ps, **hyper, **{impl: True}), state_dtype=dt))
    out.append(Mode("fusedwarm fp32", "fusedwarm", torch.float32,
                    lambda ps: fusedwarm.AdamW(ps, **hyper, seed=0, warmup="none"), extra_bits=0,
                    state_dtype=torch.float32))
    for k in (16, 8, 0):
        for sdt, short in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            out.append(Mode(f"fusedwarm bf16 x{k} {short}", "fusedwarm", torch.bfloat16,
                            lambda ps, k=k, sdt=sdt: fusedwarm.AdamW(ps, **hyper, extra_bits=k, state_dtype=sdt,
                                                                     seed=0, warmup="none"),
                            extra_bits=k, state_dtype=sdt))
    return out


def per_param_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer's tensors that have one element per parameter element (states, extra bits)."""
    return [t for t in opt.state[p].values() if isinstance(t, torch.Tensor) and t.numel() == p.numel()]


def traffic_and_memory(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[float, float]:
    """(modelled bytes moved per step, persistent bytes held) per parameter, from the real tensors.

    Moved: weight and every per-parameter state read and written once, the gradient read once.
    Held: weight + gradient + per-parameter states (the DESIGN.md memory table's columns).
    """
    numel = sum(p.numel() for p in params)
    moved = held = 0
    for p in params:
        states = sum(t.nbytes for t in per_param_tensors(opt, p))
        moved += 2 * p.nbytes + p.grad.nbytes + 2 * states
        held += p.nbytes + p.grad.nbytes + states
    return moved / numel, held / numel


# ---- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: list[Callable[[], object]], device: torch.device, warmup: int,
                     reps: int) -> list[tuple[list[float], float]]:
    """Times ``reps`` rounds of calling each of ``fns`` in turn, after ``warmup`` rounds.

    Interleaving gives every function the same share of whatever else the machine is doing,
    which matters for the comparisons on shared machines. Returns, per function, its seconds
    per call and its CPU/wall time ratio (how many cores were busy on average, OpenMP threads
    spinning at a barrier included; CPU only). CUDA calls are timed with events around each
    call, CPU calls with perf_counter.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    cpu = [0.0] * len(fns)
    wall = [0.0] * len(fns)
    if device.type == "cuda":
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns]
                  for _ in range(reps)]
        for round_events in events:
            for fn, (start, end) in zip(fns, round_events):
                start.record()
                fn()
                end.record()
        torch.cuda.synchronize(device)
        for round_events in events:
            for i, (start, end) in enumerate(round_events):
                times[i].append(start.elapsed_time(end) / 1e3)
        return [(t, float("nan")) for t in times]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), time.process_time()
            times[i].append(t1 - t0)
            wall[i] += t1 - t0
            cpu[i] += c1 - c0
    return [(t, c / max(w, 1e-9)) for t, c, w in zip(times, cpu, wall)]


def memory_bandwidths(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    """Bytes per second of two large streaming operations, best of ``reps`` (as STREAM reports).

    ``copy``: ``dst.copy_(src)``, counting bytes read + written. The destination is written
    without being read, so write-allocate caches may read it anyway, unseen by the count.
    ``update``: ``a.add_(b)``, reads a and b and writes a back, like an optimizer's in-place
    updates (every tensor it writes it has read), so no hidden traffic.
    """
    a = torch.rand(nbytes // 4, device=device)
    b = torch.rand(nbytes // 4, device=device)
    [(copy_t, _), (add_t, _)] = time_interleaved([lambda: a.copy_(b), lambda: a.add_(b, alpha=1e-9)], device,
                                                 warmup=3, reps=reps)
    return {"copy": 2 * a.nbytes / min(copy_t), "update": 3 * a.nbytes / min(add_t)}


# ---- environment --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict:
    status = git("status", "--porcelain", "--untracked-files=no")
    env = {
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fusedwarm": fusedwarm.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


# ---- main ---------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    library: str
    param_dtype: str
    extra_bits: int | None
    state_dtype: str | None
    params: int
    tensors: int
    bytes_moved_per_param: float | None = None
    bytes_held_per_param: float | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    effective_gbps: float | None = None
    fraction_of_copy: float | None = None
    cpu_busy: float | None = None
    error: str | None = None


def new_row(mode: Mode, shapes) -> Row:
    return Row(mode.name, mode.library, str(mode.param_dtype).removeprefix("torch."), mode.extra_bits,
               str(mode.state_dtype).removeprefix("torch.") if mode.state_dtype else None,
               sum(math.prod(s) for _, s in shapes), len(shapes))


def prepare(mode: Mode, shapes, device: torch.device, seed: int, row: Row) -> torch.optim.Optimizer:
    """An optimizer over fresh parameters that has taken its first step (states created); fills
    ``row``'s byte counts."""
    params = make_params(shapes, mode.param_dtype, device, seed)
    opt = mode.make(params)
    opt.step()  # creates the states (and, for fusedwarm, builds/loads the extension)
    sync(device)
    row.bytes_moved_per_param, row.bytes_held_per_param = traffic_and_memory(opt, params)
    return opt


def fill_timing(row: Row, times: list[float], busy: float, copy_bps: float) -> Row:
    median = statistics.median(times)
    row.median_ms, row.min_ms, row.max_ms = median * 1e3, min(times) * 1e3, max(times) * 1e3
    row.effective_gbps = row.bytes_moved_per_param * row.params / median / 1e9
    row.fraction_of_copy = row.effective_gbps * 1e9 / copy_bps
    row.cpu_busy = None if math.isnan(busy) else busy
    return row


def run_mode(mode: Mode, shapes, device: torch.device, args, copy_bps: float) -> Row:
    row = new_row(mode, shapes)
    try:
        opt = prepare(mode, shapes, device, args.seed, row)
        [(times, busy)] = time_interleaved([opt.step], device, args.warmup, args.steps)
    except Exception as exc:  # a mode that cannot run here is reported, not fatal
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    return fill_timing(row, times, busy, copy_bps)


def head_to_head(shapes, device: torch.device, args, copy_bps: float) -> dict:
    """The target comparison, timed interleaved (baseline step, candidate step, ...) so that both
    see the same machine load; default thread count for both."""
    by_name = {m.name: m for m in modes()}
    base_row, cand_row = new_row(by_name[BASELINE], shapes), new_row(by_name[CANDIDATE], shapes)
    base_opt = prepare(by_name[BASELINE], shapes, device, args.seed, base_row)
    cand_opt = prepare(by_name[CANDIDATE], shapes, device, args.seed, cand_row)
    (bt, bb), (ct, cb) = time_interleaved([base_opt.step, cand_opt.step], device, args.warmup, args.steps)
    base, cand = fill_timing(base_row, bt, bb, copy_bps), fill_timing(cand_row, ct, cb, copy_bps)
    numel = base.params
    speedup = base.median_ms / cand.median_ms
    return {"baseline": asdict(base), "candidate": asdict(cand), "speedup": speedup, "target": TARGET_SPEEDUP,
            "target_min_params": TARGET_MIN_PARAMS,
            "meets_target": speedup >= TARGET_SPEEDUP if device.type == "cpu" and numel >= TARGET_MIN_PARAMS
            else None}


def print_table(rows: list[Row], device: torch.device) -> None:
    busy_col = device.type == "cpu"
    head = f"{'optimizer':<26}{'B/param moved':>14}{'B/param held':>13}{'ms/step':>10}{'GB/s':>8}{'of copy':>9}"
    print(head + (f"{'cores busy':>11}" if busy_col else ""))
    print("-" * (len(head) + (11 if busy_col else 0)))
    for r in rows:
        if r.error:
            print(f"{r.name:<26}  failed: {r.error}")
            continue
        line = (f"{r.name:<26}{r.bytes_moved_per_param:>14.1f}{r.bytes_held_per_param:>13.1f}{r.median_ms:>10.2f}"
                f"{r.effective_gbps:>8.1f}{r.fraction_of_copy:>9.0%}")
        print(line + (f"{r.cpu_busy:>11.2f}" if busy_col else ""))


def save_plot(rows: list[Row], copy_gbps: float, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if not r.error]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ok) + 1.5))
    colors = ["tab:gray" if r.library == "torch" else "tab:blue" for r in ok]
    ax.barh([r.name for r in ok], [r.effective_gbps for r in ok], color=colors)
    ax.axvline(copy_gbps, color="tab:red", linestyle="--", label=f"copy {copy_gbps:.0f} GB/s")
    for i, r in enumerate(ok):
        ax.text(r.effective_gbps, i, f" {r.median_ms:.2f} ms", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("effective bandwidth (modelled bytes / median step time), GB/s")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--params", type=parse_count, default=None,
                        help="total parameter count, e.g. 16M, 350M, 1.5G (default: 16M on CPU, 350M on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default: 25 CPU, 100 CUDA)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default: 3)")
    parser.add_argument("--only", default=None, help="regular expression: run only the matching optimizers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/step_<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.params is None:
        args.params = 16_000_000 if device.type == "cpu" else 350_000_000
    if args.steps is None:
        args.steps = 25 if device.type == "cpu" else 100

    shapes = gpt_shapes(args.params)
    numel = sum(math.prod(s) for _, s in shapes)
    env = environment(device)
    selected = [m for m in modes() if args.only is None or re.search(args.only, m.name)]
    progress = sys.stderr.isatty()

    copy_bytes = min(2 << 30, max(256 << 20, 8 * numel)) if device.type == "cuda" else 256 << 20
    bandwidth = memory_bandwidths(device, copy_bytes, reps=20)
    copy_bps = bandwidth["copy"]
    print(f"device: {env['device_name']} ({device.type}); torch {env['torch']}, {env['torch_threads']} threads, "
          f"python {env['python']}, commit {(env['git_commit'] or '?')[:10]}{' (dirty)' if env['git_dirty'] else ''}")
    if env.get("load_average"):
        print(f"load average before the run: {env['load_average'][0]:.2f} (other work on the machine skews timings)")
    print(f"parameters: {numel:,} in {len(shapes)} tensors (width {shapes[0][1][1]}, "
          f"{(len(shapes) - 3) // 12} layers); {args.warmup} warm-up + {args.steps} timed steps, median")
    print(f"copy bandwidth: {copy_bps / 1e9:.1f} GB/s (read + write, {copy_bytes >> 20} MiB tensors, best of 20); "
          f"in-place add a += b: {bandwidth['update'] / 1e9:.1f} GB/s\n")

    rows = []
    for mode in selected:
        if progress:
            print(f"  {mode.name} ...", end="\r", flush=True, file=sys.stderr)
        rows.append(run_mode(mode, shapes, device, args, copy_bps))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, device)

    versus = None
    if args.only is None or (re.search(args.only, BASELINE) and re.search(args.only, CANDIDATE)):
        if progress:
            print(f"  {CANDIDATE} vs {BASELINE} ...", end="\r", flush=True, file=sys.stderr)
        try:
            versus = head_to_head(shapes, device, args, copy_bps)
        except Exception as exc:
            print(f"\nhead-to-head {CANDIDATE} vs {BASELINE} failed: {type(exc).__name__}: {exc}")
    if versus:
        verdict = ""
        if versus["meets_target"] is not None:
            verdict = " -> meets" if versus["meets_target"] else " -> MISSES"
            verdict += f" the CPU target of >= {TARGET_SPEEDUP}x"
        print(f"\n{CANDIDATE} vs {BASELINE}, timed interleaved: {versus['candidate']['median_ms']:.2f} vs "
              f"{versus['baseline']['median_ms']:.2f} ms/step, speedup {versus['speedup']:.2f}x{verdict}")

    out = args.out or RESULTS / f"step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "step", "environment": env,
              "config": {"params": numel, "tensors": len(shapes), "requested_params": args.params,
                         "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "lr": LR, "betas": BETAS,
                         "eps": EPS, "weight_decay": WEIGHT_DECAY, "copy_bytes": copy_bytes,
                         "bytes_model": "weight, extra bits and states read + written once, gradient read once",
                         "shapes": [[n, list(s)] for n, s in shapes]},
              "copy_bandwidth_gbps": copy_bps / 1e9, "update_bandwidth_gbps": bandwidth["update"] / 1e9,
              "rows": [asdict(r) for r in rows], "head_to_head": versus}
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    title = f"AdamW step, {numel / 1e6:.1f}M params, {env['device_name']}, torch {env['torch']}"
    if save_plot(rows, copy_bps / 1e9, out.with_suffix(".png"), title):
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
