"""Time per optimizer step and effective memory bandwidth: fusedwarm AdamW against torch.optim.AdamW
and, when importable, the low-precision AdamW variants of optimi, torchao and bitsandbytes.

The parameters are a GPT-style list of tensors (token embedding; per layer the qkv, attention
projection and MLP weights and biases and two layernorms; a final layernorm) totalling about
each of ``--sizes`` elements. Every optimizer gets fresh random non-zero gradients, created once
and reused, a few warm-up steps, then the median over ``--steps`` timed steps (fewer for an
optimizer so slow that they would take more than ``--max-seconds``; CUDA steps are timed with
events).

Bytes moved per step follow a simple model: every tensor the optimizer keeps per parameter
(weight, extra bits, states, quantization scales) is read once and written once, the gradient is
only read. The sizes come from the tensors the optimizer actually holds after its first step (the
inner tensors of quantized states included), so, e.g., torch fused AdamW on float32 weights moves
4+4 (weight) + 4 (grad) + 8 (m) + 8 (v) = 28 bytes per parameter, and fusedwarm on bfloat16
weights with 16 extra bits and bfloat16 states 2+2 + 2+2 + 2 + 4 + 4 = 18. Effective bandwidth =
modelled bytes / median step time, shown as a fraction of the machine's copy bandwidth (a large
tensor copy, read + write bytes, best of 20). An optimizer can exceed 100% of it: a copy's
destination is written without being read, which write-allocate caches pay for with a hidden
read; the in-place add ``a += b`` printed alongside has no such hidden traffic.

The project's targets are checked and reported with their verdicts: on CPU, fusedwarm AdamW
(bf16 weights, 16 extra bits, bf16 states) at least 1.3x faster than
torch.optim.AdamW(fused=True) on float32 weights from 16M parameters, timed interleaved (one step
of each in turn, so both see the same machine load); and that fusedwarm mode at >= 80% (CPU) /
85% (CUDA) of the copy bandwidth from 16M (CPU) / 100M (CUDA) parameters.

It runs in the environment a user has: it sets no allocator variable, and every tensor sits where
glibc puts it. (An earlier version set ``THP_MEM_ALLOC_ENABLE=1``, huge pages for every tensor,
having measured the same optimizer step up to 2x slower without it depending on which optimizer
ran before it; its numbers were not what a user sees.) Because
placement and machine load differ from process to process, one run is one sample:
``benchmarks/step_runs.py`` repeats the head-to-head comparison in separate processes and reports
the range.

Run from the repository root::

    PYTHONPATH=. python benchmarks/step.py                            # CPU: 1M, 4M, 16M, 64M
    PYTHONPATH=. python benchmarks/step.py --device cuda              # CUDA: 1M, 10M, 100M, 1B

Results go to ``benchmarks/results/step_<device>.json`` (device, versions, commit, command line
and every row of every size), a markdown summary ``step_<device>.md`` (also printed), and a plot
``step_<device>.png`` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
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
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import fusedwarm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

# The project's CPU target: fusedwarm (bf16 weights, 16 extra bits, bf16 states) at least this
# much faster than torch.optim.AdamW(fused=True) on float32 weights, from 16M parameters up.
TARGET_SPEEDUP = 1.3
TARGET_MIN_PARAMS = 16_000_000
BASELINE = "torch fused fp32"
CANDIDATE = "fusedwarm bf16 x16 bf16"
# The bandwidth targets of the same fusedwarm mode: (fraction of copy bandwidth, from this many
# parameters) per device type.
BANDWIDTH_TARGET = {"cpu": (0.80, 16_000_000), "cuda": (0.85, 100_000_000)}
DEFAULT_SIZES = {"cpu": "1M,4M,16M,64M", "cuda": "1M,10M,100M,1B"}

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
        raise argparse.ArgumentTypeError(f"a parameter count must be at least 100k, got {text!r}")
    return value


def count_label(n: int) -> str:
    """16000128 -> '16M', 200000 -> '200k', 1.2e9 -> '1.2G'."""
    for scale, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


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
    library: str  # "torch", "fusedwarm", "optimi", "torchao" or "bitsandbytes"
    param_dtype: torch.dtype
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]


HYPER = dict(lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


class Peer(NamedTuple):
    """An AdamW from another library: the module to import, a description, and
    ``build(module, params, hyper)`` returning the optimizer (hyper: lr, betas, eps, weight_decay)."""

    module: str
    description: str
    build: Callable


# The other libraries' AdamW variants, shared with benchmarks/train.py.
PEER_ADAMW = {
    "optimi kahan": Peer("optimi", "optimi.AdamW(kahan_sum=True)",
                         lambda m, ps, h: m.AdamW(ps, **h, kahan_sum=True)),
    "torchao bf16 sr": Peer("torchao.optim", "torchao.optim._AdamW(bf16_stochastic_round=True)",
                            lambda m, ps, h: m._AdamW(ps, **h, bf16_stochastic_round=True)),
    "torchao 8bit": Peer("torchao.optim", "torchao.optim.AdamW8bit", lambda m, ps, h: m.AdamW8bit(ps, **h)),
    "torchao 4bit": Peer("torchao.optim", "torchao.optim.AdamW4bit", lambda m, ps, h: m.AdamW4bit(ps, **h)),
    "bnb 8bit": Peer("bitsandbytes.optim", "bitsandbytes.optim.AdamW8bit", lambda m, ps, h: m.AdamW8bit(ps, **h)),
}
# This benchmark's peer modes, all on bfloat16 weights: mode name -> PEER_ADAMW entry.
PEER_MODES = {"optimi bf16 kahan": "optimi kahan", "torchao bf16 sr": "torchao bf16 sr",
              "torchao 8bit bf16": "torchao 8bit", "bnb 8bit bf16": "bnb 8bit"}


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone for an empty message), as reported for
    an optimizer that cannot run."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def modes() -> tuple[list[Mode], dict[str, str]]:
    """The optimizers under test, and for each peer library that cannot be imported, why."""
    out = []
    for dt, short in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for impl in ("fused", "foreach"):
            out.append(Mode(f"torch {impl} {short}", "torch", dt,
                            lambda ps, impl=impl: torch.optim.AdamW(ps, **HYPER, **{impl: True})))
    out.append(Mode("fusedwarm fp32", "fusedwarm", torch.float32,
                    lambda ps: fusedwarm.AdamW(ps, **HYPER, seed=0, warmup="none")))
    for k in (16, 8, 0):
        # bf16 or fp32 states, or block-quantized ones (int8: 1 byte per moment + a float32 scale per
        # 256 elements, int4: half a byte + a scale per 128), next to each other per extra-bit count.
        for sdt, short in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"), ("int8", "int8"), ("int4", "int4")):
            out.append(Mode(f"fusedwarm bf16 x{k} {short}", "fusedwarm", torch.bfloat16,
                            lambda ps, k=k, sdt=sdt: fusedwarm.AdamW(ps, **HYPER, extra_bits=k, state_dtype=sdt,
                                                                     seed=0, warmup="none")))
    missing = {}
    for name, kind in PEER_MODES.items():
        peer = PEER_ADAMW[kind]
        try:
            mod = importlib.import_module(peer.module)
        except Exception as exc:  # an absent or broken peer is reported, not fatal
            missing[name] = first_line(exc)
            continue
        out.append(Mode(name, peer.module.split(".")[0], torch.bfloat16,
                        lambda ps, mod=mod, peer=peer: peer.build(mod, ps, HYPER)))
    return out, missing


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """``t``; for a tensor subclass that wraps others (torchao's quantized states: codes, scales, a
    quantization map), the plain tensors it holds, which are its storage (its own size is its
    logical float size)."""
    if is_traceable_wrapper_subclass(t):
        return [x for name in t.__tensor_flatten__()[0] for x in plain_tensors(getattr(t, name))]
    return [t]


def state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Bytes of every tensor the optimizer keeps for ``p`` (states, extra bits, scales, step)."""
    return sum(x.nbytes for t in opt.state[p].values() if isinstance(t, torch.Tensor) for x in plain_tensors(t))


def traffic_and_memory(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[float, float]:
    """(modelled bytes moved per step, persistent bytes held) per parameter, from the real tensors.

    Moved: weight and every per-parameter state read and written once, the gradient read once.
    Held: weight + gradient + per-parameter states (the DESIGN.md memory table's columns).
    """
    numel = sum(p.numel() for p in params)
    moved = held = 0
    for p in params:
        states = state_bytes(opt, p)
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


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else None


SHARED_CORES = 0.25  # other processes busy on this many cores on average: the table says the machine was shared


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent so far (Linux ``/proc/stat``: user, nice,
    system, irq, softirq), None where unknown."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_busy_seconds() -> float:
    t = os.times()
    return t.user + t.system


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
        "thp_mode": thp_mode(),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
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
    params: int
    tensors: int
    bytes_moved_per_param: float | None = None
    bytes_held_per_param: float | None = None
    timed_steps: int | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    effective_gbps: float | None = None
    fraction_of_copy: float | None = None
    cpu_busy: float | None = None
    error: str | None = None


def new_row(mode: Mode, shapes) -> Row:
    return Row(mode.name, mode.library, str(mode.param_dtype).removeprefix("torch."),
               sum(math.prod(s) for _, s in shapes), len(shapes))


def prepare(mode: Mode, shapes, device: torch.device, seed: int, row: Row) -> torch.optim.Optimizer:
    """An optimizer over fresh parameters that has taken its first step (states created); fills
    ``row``'s byte counts."""
    params = make_params(shapes, mode.param_dtype, device, seed)
    opt = mode.make(params)
    opt.step()  # creates the states (and builds or compiles whatever the optimizer needs)
    sync(device)
    row.bytes_moved_per_param, row.bytes_held_per_param = traffic_and_memory(opt, params)
    return opt


def budgeted_steps(opt: torch.optim.Optimizer, device: torch.device, args) -> tuple[int, int]:
    """(warm-up steps, timed steps) that fit in ``args.max_seconds``, from the time of one more
    (untimed) step: at most ``args.steps`` timed steps and at least 3; no further warm-up for an
    optimizer too slow for it (it has taken two untimed steps by then)."""
    t0 = time.perf_counter()
    opt.step()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-9)
    timed = max(3, min(args.steps, int(args.max_seconds / one)))
    return (args.warmup if one * (args.warmup + timed) <= args.max_seconds else 0), timed


def fill_timing(row: Row, times: list[float], busy: float, copy_bps: float) -> Row:
    median = statistics.median(times)
    row.timed_steps = len(times)
    row.median_ms, row.min_ms, row.max_ms = median * 1e3, min(times) * 1e3, max(times) * 1e3
    row.effective_gbps = row.bytes_moved_per_param * row.params / median / 1e9
    row.fraction_of_copy = row.effective_gbps * 1e9 / copy_bps
    row.cpu_busy = None if math.isnan(busy) else busy
    return row


def run_mode(mode: Mode, shapes, device: torch.device, args, copy_bps: float) -> Row:
    row = new_row(mode, shapes)
    try:
        opt = prepare(mode, shapes, device, args.seed, row)
        warmup, reps = budgeted_steps(opt, device, args)
        [(times, busy)] = time_interleaved([opt.step], device, warmup, reps)
    except Exception as exc:  # a mode that cannot run here is reported, not fatal
        row.error = first_line(exc)
        return row
    return fill_timing(row, times, busy, copy_bps)


def head_to_head(modes_by_name: dict[str, Mode], shapes, device: torch.device, args, copy_bps: float) -> dict:
    """The target comparison, timed interleaved (baseline step, candidate step, ...) so that both
    see the same machine load; default thread count for both."""
    base_row, cand_row = new_row(modes_by_name[BASELINE], shapes), new_row(modes_by_name[CANDIDATE], shapes)
    base_opt = prepare(modes_by_name[BASELINE], shapes, device, args.seed, base_row)
    cand_opt = prepare(modes_by_name[CANDIDATE], shapes, device, args.seed, cand_row)
    (bt, bb), (ct, cb) = time_interleaved([base_opt.step, cand_opt.step], device, args.warmup, args.steps)
    base, cand = fill_timing(base_row, bt, bb, copy_bps), fill_timing(cand_row, ct, cb, copy_bps)
    speedup = base.median_ms / cand.median_ms
    return {"baseline": asdict(base), "candidate": asdict(cand), "speedup": speedup, "target": TARGET_SPEEDUP,
            "target_min_params": TARGET_MIN_PARAMS,
            "meets_target": speedup >= TARGET_SPEEDUP if device.type == "cpu" and base.params >= TARGET_MIN_PARAMS
            else None}


def bandwidth_verdict(rows: list[Row], device: torch.device) -> dict | None:
    """The candidate mode's fraction of copy bandwidth against the device's target (None below the
    target's size or when the candidate did not run)."""
    target, min_params = BANDWIDTH_TARGET[device.type]
    cand = next((r for r in rows if r.name == CANDIDATE and not r.error), None)
    if cand is None:
        return None
    return {"mode": CANDIDATE, "fraction_of_copy": cand.fraction_of_copy, "target": target,
            "target_min_params": min_params,
            "meets_target": cand.fraction_of_copy >= target if cand.params >= min_params else None}


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


def markdown(result: dict, path: Path) -> str:
    """The summary table of a result (every mode, every size: ms per step and fraction of copy
    bandwidth) with the target verdicts, as the README shows it."""
    env, sizes = result["environment"], result["sizes"]
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    lines = [
        f"From `{where}` ({env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}, "
        f"commit {(env['git_commit'] or '?')[:10]}; copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s, "
        f"in-place add {result['update_bandwidth_gbps']:.1f} GB/s; transparent huge pages: {env['thp_mode']}"
        "). GPT-style parameter lists; per size: median ms per step (fraction of copy bandwidth).",
        "",
        "| optimizer | bytes moved / param | " + " | ".join(count_label(s["params"]) for s in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    names = list(dict.fromkeys(r["name"] for s in sizes for r in s["rows"]))
    for name in names:
        cells, moved = [], None
        for s in sizes:
            r = next((r for r in s["rows"] if r["name"] == name), None)
            if r is None:
                cells.append("")
            elif r["error"]:
                cells.append("failed")
            else:
                moved = r["bytes_moved_per_param"]
                cells.append(f"{r['median_ms']:.2f} ({100 * r['fraction_of_copy']:.0f}%)")
        lines.append(f"| {name} | {'' if moved is None else f'{round(moved, 2):g}'} | " + " | ".join(cells) + " |")
    failed = {r["name"]: r["error"] for s in sizes for r in s["rows"] if r["error"]}
    notes = [f"{name}: {err}" for name, err in failed.items()]
    notes += [f"{name}: not run ({why})" for name, why in result["peers_missing"].items()]
    if notes:
        lines += ["", "Not measured: " + "; ".join(notes) + "."]
    before, after, others = env.get("load_average"), env.get("load_average_after"), env.get("other_processes_cores")
    if before and after:
        line = (f"Load average (1 min) before / after the run: {before[0]:.2f} / {after[0]:.2f} on "
                f"{env['usable_cpus']} cores (after: this run's own threads included)")
        if others is not None:
            line += f"; other processes kept {others:.2f} cores busy on average during the run"
            if others >= SHARED_CORES:
                line += ": the machine was shared, so these times are slower and noisier than on an idle one"
        lines += ["", line + "."]
    lines.append("")
    for s in sizes:
        h2h, bw = s["head_to_head"], s["bandwidth"]
        parts = []
        if h2h:
            verdict = "" if h2h["meets_target"] is None else (
                f", {'meets' if h2h['meets_target'] else 'misses'} the target of {h2h['target']}x")
            parts.append(f"{h2h['candidate']['name']} vs {h2h['baseline']['name']} timed interleaved: "
                         f"{h2h['candidate']['median_ms']:.2f} vs {h2h['baseline']['median_ms']:.2f} ms, "
                         f"speedup {h2h['speedup']:.2f}x{verdict}")
        if bw and bw["meets_target"] is not None:
            parts.append(f"{bw['mode']} at {100 * bw['fraction_of_copy']:.0f}% of copy bandwidth, "
                         f"{'meets' if bw['meets_target'] else 'misses'} the target of {100 * bw['target']:.0f}%")
        if parts:
            lines.append(f"- {count_label(s['params'])} parameters: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def save_plot(result: dict, path: Path) -> bool:
    """Milliseconds per step and fraction of copy bandwidth against the parameter count, one line
    per optimizer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    env, sizes = result["environment"], result["sizes"]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 5))
    palette = {"torch": plt.cm.Greys, "fusedwarm": plt.cm.Blues, "optimi": plt.cm.Greens,
               "torchao": plt.cm.Oranges, "bitsandbytes": plt.cm.Purples}
    names = list(dict.fromkeys((r["name"], r["library"]) for s in sizes for r in s["rows"]))
    for lib, cmap in palette.items():
        mine = [n for n, library in names if library == lib]
        for i, name in enumerate(mine):
            pts = [(r["params"], r["median_ms"], r["fraction_of_copy"]) for s in sizes for r in s["rows"]
                   if r["name"] == name and not r["error"]]
            if not pts:
                continue
            color = cmap(0.45 + 0.5 * (i + 1) / (len(mine) + 1))
            style = dict(color=color, marker="o", markersize=3, linewidth=2.2 if name == CANDIDATE else 1.2,
                         linestyle="-" if lib == "fusedwarm" else "--", label=name)
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], **style)
            ax_b.plot([p[0] for p in pts], [100 * p[2] for p in pts], **style)
    ax_t.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms per step (median)")
    ax_b.set(xscale="log", xlabel="parameters", ylabel="% of copy bandwidth (modelled bytes / time)")
    target, _ = BANDWIDTH_TARGET[env["device_type"]]
    ax_b.axhline(100 * target, color="tab:red", linestyle=":", label=f"target {100 * target:.0f}%")
    ax_b.legend(fontsize=7, loc="best")
    fig.suptitle(f"AdamW step, {env['device_name']}, torch {env['torch']}, "
                 f"copy {result['copy_bandwidth_gbps']:.0f} GB/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_size(count: int, all_modes: list[Mode], selected: list[Mode], device: torch.device, args,
             copy_bps: float, progress: bool) -> dict:
    """Every selected mode on a GPT-style parameter list of about ``count`` elements."""
    shapes = gpt_shapes(count)
    numel = sum(math.prod(s) for _, s in shapes)
    print(f"\n== {numel:,} parameters in {len(shapes)} tensors (width {shapes[0][1][1]}, "
          f"{(len(shapes) - 3) // 12} layers); {args.warmup} warm-up + up to {args.steps} timed steps, median")
    rows = []
    for mode in selected:
        if progress:
            print(f"  {mode.name} ...", end="\r", flush=True, file=sys.stderr)
        rows.append(run_mode(mode, shapes, device, args, copy_bps))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, device)
    versus = None
    names = {m.name for m in selected}
    if BASELINE in names and CANDIDATE in names and numel >= TARGET_MIN_PARAMS:
        if progress:
            print(f"  {CANDIDATE} vs {BASELINE} ...", end="\r", flush=True, file=sys.stderr)
        try:
            versus = head_to_head({m.name: m for m in all_modes}, shapes, device, args, copy_bps)
        except Exception as exc:
            print(f"head-to-head {CANDIDATE} vs {BASELINE} failed: {first_line(exc)}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if versus:
        verdict = ""
        if versus["meets_target"] is not None:
            verdict = " -> meets" if versus["meets_target"] else " -> MISSES"
            verdict += f" the CPU target of >= {TARGET_SPEEDUP}x"
        print(f"{CANDIDATE} vs {BASELINE}, timed interleaved: {versus['candidate']['median_ms']:.2f} vs "
              f"{versus['baseline']['median_ms']:.2f} ms/step, speedup {versus['speedup']:.2f}x{verdict}")
    bandwidth = bandwidth_verdict(rows, device)
    if bandwidth and bandwidth["meets_target"] is not None:
        print(f"{CANDIDATE} at {bandwidth['fraction_of_copy']:.0%} of copy bandwidth -> "
              f"{'meets' if bandwidth['meets_target'] else 'MISSES'} the target of >= {bandwidth['target']:.0%}")
    return {"params": numel, "tensors": len(shapes), "requested_params": count,
            "shapes": [[n, list(s)] for n, s in shapes], "rows": [asdict(r) for r in rows],
            "head_to_head": versus, "bandwidth": bandwidth}


def parse_sizes(text: str) -> list[int]:
    return [parse_count(part) for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="comma-separated parameter counts, e.g. 1M,16M,1.5G "
                             f"(default: {DEFAULT_SIZES['cpu']} on CPU, {DEFAULT_SIZES['cuda']} on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default: 25 CPU, 100 CUDA)")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="time budget of one optimizer's warm-up and timed steps; slower ones take fewer "
                             "(at least 3 timed)")
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
    if args.sizes is None:
        args.sizes = parse_sizes(DEFAULT_SIZES[device.type])
    if not args.sizes:
        parser.error("--sizes is empty")
    if args.steps is None:
        args.steps = 25 if device.type == "cpu" else 100
    if args.steps < 1 or args.warmup < 0 or args.max_seconds <= 0:
        parser.error("--steps must be >= 1, --warmup >= 0 and --max-seconds > 0")

    env = environment(device)
    all_modes, peers_missing = modes()
    selected = [m for m in all_modes if args.only is None or re.search(args.only, m.name)]
    peers_missing = {name: why for name, why in peers_missing.items() if args.only is None or re.search(args.only, name)}
    progress = sys.stderr.isatty()

    copy_bytes = (1 << 30) if device.type == "cuda" else 256 << 20
    bandwidth = memory_bandwidths(device, copy_bytes, reps=20)
    copy_bps = bandwidth["copy"]
    print(f"device: {env['device_name']} ({device.type}); torch {env['torch']}, {env['torch_threads']} threads, "
          f"python {env['python']}, commit {(env['git_commit'] or '?')[:10]}{' (dirty)' if env['git_dirty'] else ''}")
    if env.get("load_average"):
        print(f"load average before the run: {env['load_average'][0]:.2f} (other work on the machine skews timings)")
    print(f"copy bandwidth: {copy_bps / 1e9:.1f} GB/s (read + write, {copy_bytes >> 20} MiB tensors, best of 20); "
          f"in-place add a += b: {bandwidth['update'] / 1e9:.1f} GB/s")
    for name, why in peers_missing.items():
        print(f"not run: {name} ({why})")

    machine0, own0, wall0 = machine_busy_seconds(), own_busy_seconds(), time.perf_counter()
    sizes = [run_size(count, all_modes, selected, device, args, copy_bps, progress) for count in args.sizes]
    machine1, own1, wall1 = machine_busy_seconds(), own_busy_seconds(), time.perf_counter()
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    # Cores that other processes kept busy while the optimizers were timed: the machine's CPU time
    # less this process's, over the wall time.
    env["other_processes_cores"] = (None if machine0 is None or machine1 is None else
                                    max(0.0, (machine1 - machine0) - (own1 - own0)) / (wall1 - wall0))

    out = args.out or RESULTS / f"step_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "step", "environment": env,
              "config": {"sizes": args.sizes, "steps": args.steps, "max_seconds": args.max_seconds,
                         "warmup": args.warmup, "seed": args.seed, "lr": LR, "betas": BETAS, "eps": EPS,
                         "weight_decay": WEIGHT_DECAY, "copy_bytes": copy_bytes,
                         "bytes_model": "weight and every tensor the optimizer keeps per parameter read + written "
                                        "once, gradient read once"},
              "copy_bandwidth_gbps": copy_bps / 1e9, "update_bandwidth_gbps": bandwidth["update"] / 1e9,
              "peers_missing": peers_missing, "sizes": sizes}
    out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result, out.resolve())
    out.with_suffix(".md").write_text(table)
    print("\n" + table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    if save_plot(result, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
