"""Training-loop benchmark: time per iteration and memory of torch AdamW and fusedwarm AdamW, with
the optimizer step after the backward pass or inside it (``backward_step=True``).

The byte-level GPT of ``benchmarks/models.py`` (``ByteGPT``: token and position embeddings, pre-LN
transformer blocks with causal self-attention and a GELU MLP, a final LayerNorm and an untied or
tied output head; GPT-2's initialization) is trained on the bytes of the Python standard library's
own source files, read in sorted order, on batches drawn with a fixed seed, so every configuration
sees the same data. The configurations:

* ``torch-amp``: ``torch.optim.AdamW`` (fused where the device supports it) on float32 weights,
  forward under ``torch.autocast(device, dtype=torch.bfloat16)``;
* ``torch-bf16``: the same optimizer on bfloat16 weights (bfloat16 states, no master copy);
* ``fusedwarm``: ``fusedwarm.AdamW`` on bfloat16 weights, 16 extra bits, bfloat16 states;
  backward, then ``step()``;
* ``fusedwarm-bs``: the same with ``backward_step=True``: every parameter is updated during
  ``backward()`` from post-accumulate-grad hooks, in buckets of ``--bucket-cap-mb``, and its
  gradient is freed (Lewandowski & Kosson 2023, arXiv 2309.12381);
* ``fusedwarm-bs-x0``: ``backward_step=True`` with ``extra_bits=0`` (stochastic rounding).

**Time.** An iteration is forward + backward + ``step()`` + ``zero_grad()``. Every configuration
keeps its own model and optimizer for the whole run. After ``--warmup`` untimed iterations each,
the configurations are timed in ``--rounds`` round-robin rounds; in each round every configuration
runs ``--iters`` consecutive iterations (the order rotates from round to round), so all of them
share whatever else the machine is doing at the time. Reported: the median of the per-round
median times and their spread. The backward-step overhead is the median over rounds of the
paired ratio fusedwarm-bs / fusedwarm, checked against issue 3's target (at most 5% slower). CPU
iterations are timed with ``time.perf_counter``, CUDA iterations with CUDA events.

**Memory**, measured once per configuration in a fresh subprocess (a new model and optimizer,
``--warmup`` iterations, then one instrumented iteration):

* storage accounting: bytes of the parameters + the ``.grad`` tensors alive + the optimizer's
  state tensors, sampled in post-accumulate-grad hooks registered both before and after the
  optimizer's own (so the gradient that has just arrived is counted before the optimizer
  consumes it), after ``backward()``, after ``step()`` and after ``zero_grad()``. Reported: the
  peak of that sum and the most gradient bytes alive at once, next to the bytes of a full
  gradient set. Activations, autocast's bfloat16 weight copies and other temporaries are not in
  this count;
* the process's peak resident set size (``resource.getrusage``), and its growth over the peak
  before the model was built (libraries and the extension are loaded by then);
* on CUDA, ``torch.cuda.max_memory_allocated`` over the instrumented iteration (everything:
  weights, states, gradients, activations).

Last, fusedwarm and fusedwarm-bs, which start from the same weights and seed and see the same
batches, are checked for bit-identical weights and states at the end.

Run from the repository root::

    PYTHONPATH=. python benchmarks/train_loop.py                 # CPU, about 5 minutes on 2 cores
    PYTHONPATH=. python benchmarks/train_loop.py --device cuda --layers 12 --dim 768 --heads 12 \\
        --seq 1024 --batch 8 --bucket-cap-mb 25

Results go to ``benchmarks/results/train_loop_<device>.json`` (device, versions, commit, command
line, every configuration's numbers and per-round times) and a markdown table next to it, which
is printed as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fusedwarm
from models import ByteGPT, byte_loss, load_text, make_batches
from step import environment, git, plain_tensors, sync

RESULTS = Path(__file__).resolve().parent / "results"

# Issue 3's target: the step inside backward costs at most this much more time per iteration.
TARGET_OVERHEAD = 1.05
BASELINE, CANDIDATE = "fusedwarm", "fusedwarm-bs"
MIB = 2**20
CODE_PATHS = ("fusedwarm/", "csrc/", "benchmarks/")  # uncommitted changes here affect the results
HYPER = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}  # AdamW's, besides lr, in every configuration


# ---- configurations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One way of training the model.

    ``design_bytes`` is the training state per parameter (weight + extra bits + gradient +
    moments) that shared/DESIGN.md's memory table gives for this setup (torch on bfloat16
    weights, not in the table: 2 + 2 + 2 + 2).
    """

    name: str
    description: str
    param_dtype: torch.dtype
    autocast: bool = False
    extra_bits: int | None = None
    backward_step: bool = False
    design_bytes: int | None = None


CONFIGS = {c.name: c for c in (
    Config("torch-amp", "torch AdamW, fp32 weights, bf16 autocast", torch.float32, autocast=True, design_bytes=16),
    Config("torch-bf16", "torch AdamW, bf16 weights and states", torch.bfloat16, design_bytes=8),
    Config("fusedwarm", "fusedwarm AdamW, bf16 weights, 16 extra bits, bf16 states", torch.bfloat16,
           extra_bits=16, design_bytes=10),
    Config("fusedwarm-bs", "fusedwarm AdamW, bf16 weights, 16 extra bits, bf16 states, backward_step=True",
           torch.bfloat16, extra_bits=16, backward_step=True, design_bytes=8),
    Config("fusedwarm-bs-x0", "fusedwarm AdamW, bf16 weights, no extra bits, bf16 states, backward_step=True",
           torch.bfloat16, extra_bits=0, backward_step=True, design_bytes=6),
)}


def make_optimizer(config: Config, params: list[nn.Parameter], args: argparse.Namespace) -> tuple[
        torch.optim.Optimizer, str]:
    """The configuration's optimizer over ``params`` and a short description of its implementation."""
    hyper = dict(lr=args.lr, **HYPER)
    if config.extra_bits is None:
        try:
            return torch.optim.AdamW(params, **hyper, fused=True), "torch.optim.AdamW(fused=True)"
        except RuntimeError:  # no fused kernel for this device
            return torch.optim.AdamW(params, **hyper, foreach=True), "torch.optim.AdamW(foreach=True)"
    # warmup="none": the same update rule as the torch.optim.AdamW baselines.
    opt = fusedwarm.AdamW(params, **hyper, extra_bits=config.extra_bits, state_dtype=torch.bfloat16,
                          seed=args.seed, backward_step=config.backward_step, bucket_cap_mb=args.bucket_cap_mb,
                          warmup="none")
    impl = f"fusedwarm.AdamW(extra_bits={config.extra_bits}, state_dtype=bfloat16"
    impl += f", backward_step=True, bucket_cap_mb={args.bucket_cap_mb:g})" if config.backward_step else ")"
    return opt, impl


def make_model(config: Config, args: argparse.Namespace, device: torch.device) -> ByteGPT:
    """The model with ``--seed``'s initial weights (the same for every configuration) in the config's dtype."""
    torch.manual_seed(args.seed)
    model = ByteGPT(args.layers, args.dim, args.heads, args.seq, args.tie)
    return model.to(device=device, dtype=config.param_dtype)


class Run:
    """A configuration's persistent model and optimizer, trained one iteration at a time."""

    def __init__(self, config: Config, args: argparse.Namespace, device: torch.device,
                 probe: Callable[[str], None] | None = None, make_opt: Callable = make_optimizer) -> None:
        """With ``probe``, it is called from post-accumulate-grad hooks on every parameter, registered
        before the optimizer is built and after it (hooks run in registration order, so the first
        see each gradient before a ``backward_step`` optimizer consumes it, the second after).
        ``make_opt(config, params, args)`` returns the optimizer and its description (another
        benchmark passes its own, with more configurations)."""
        self.config = config
        self.device = device
        self.model = make_model(config, args, device)
        self.params = list(self.model.parameters())
        if probe:
            for p in self.params:
                p.register_post_accumulate_grad_hook(lambda _: probe("gradient arrived"))
        self.opt, self.impl = make_opt(config, self.params, args)
        if probe:
            for p in self.params:
                p.register_post_accumulate_grad_hook(lambda _: probe("gradient consumed"))
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.autocast
                         else contextlib.nullcontext())
        self.done = 0  # iterations trained so far: the index of the next batch
        self.losses: list[torch.Tensor] = []

    def iteration(self, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  probe: Callable[[str], None] | None = None) -> None:
        """Forward, backward, step and zero_grad on the next batch; ``probe(where)`` samples memory."""
        x, y = batches[self.done]
        with self.autocast:
            logits = self.model(x)
        loss = byte_loss(logits, y)
        loss.backward()
        if probe:
            probe("after backward")
        self.opt.step()
        if probe:
            probe("after step")
        self.opt.zero_grad(set_to_none=True)
        if probe:
            probe("after zero_grad")
        self.losses.append(loss.detach())
        self.done += 1

    def timed(self, batches: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> list[float]:
        """Seconds of each of ``count`` consecutive iterations."""
        times = []
        if self.device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(count)]
            for start, end in events:
                start.record()
                self.iteration(batches)
                end.record()
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) / 1e3 for start, end in events]
        for _ in range(count):
            t0 = time.perf_counter()
            self.iteration(batches)
            times.append(time.perf_counter() - t0)
        return times


# ---- memory (one fresh subprocess per configuration) -------------------------------------------


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct tensors among ``tensors`` (a tied parameter counts once). A tensor
    subclass that wraps others (e.g. torchao's 8-bit optimizer states: codes, scales, a shared
    quantization map) counts the tensors it holds, since its own size is its logical float size."""
    seen = {}
    for t in tensors:
        for x in plain_tensors(t):
            seen[(x.data_ptr(), x.nbytes)] = x.nbytes
    return sum(seen.values())


def state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in the optimizer's state (moments, extra bits, step counters)."""
    return [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


def measure_memory(config: Config, args: argparse.Namespace, device: torch.device,
                   make_opt: Callable = make_optimizer) -> dict:
    """Memory of one configuration, measured in this (fresh) process; see the module docstring.
    ``make_opt`` builds the optimizer, as for ``Run``."""
    # Load the extension in every configuration's process, so the RSS baseline includes it.
    fusedwarm.AdamW([nn.Parameter(torch.zeros(1, device=device))])
    text, _ = load_text(args.text_bytes)
    batches = make_batches(text, args.warmup + 1, args.batch, args.seq, args.seed, device)
    sync(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    sampling = False
    peak = {"grads": 0, "storage": 0, "where": ""}

    def probe(where: str) -> None:
        if not sampling:
            return
        grads = tensor_bytes(p.grad for p in run.params if p.grad is not None)
        storage = tensor_bytes(run.params) + grads + tensor_bytes(state_tensors(run.opt))
        peak["grads"] = max(peak["grads"], grads)
        if storage > peak["storage"]:
            peak["storage"], peak["where"] = storage, where

    run = Run(config, args, device, probe, make_opt)
    for _ in range(args.warmup):
        run.iteration(batches)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_start = torch.cuda.memory_allocated(device)
    sampling = True
    run.iteration(batches, probe)
    sync(device)
    sampling = False
    out = {
        "param_bytes": tensor_bytes(run.params),
        "state_bytes": tensor_bytes(state_tensors(run.opt)),
        "grad_set_bytes": tensor_bytes(p for p in run.params if p.requires_grad),
        "peak_grad_bytes": peak["grads"],
        "peak_storage_bytes": peak["storage"],
        "peak_storage_at": peak["where"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
    }
    if device.type == "cuda":
        out["cuda_allocated_at_start_bytes"] = cuda_start
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def memory_in_subprocess(name: str, argv: list[str], script: Path = Path(__file__)) -> dict:
    """Runs ``measure_memory`` for configuration ``name`` in a fresh Python process: ``script``
    (this file, or another benchmark with the same hidden ``--measure-memory NAME`` option) with
    ``argv``; returns the JSON dict that it prints last, or ``{"error": ...}``."""
    cmd = [sys.executable, str(script.resolve()), *argv, "--measure-memory", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- statistics and reporting -------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (pos - lo)


@dataclass
class Result:
    """One configuration's numbers."""

    name: str
    description: str
    optimizer: str
    param_dtype: str
    design_bytes_per_param: int | None
    params: int
    round_times_ms: list[list[float]] = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    final_loss: float | None = None

    def round_medians(self) -> list[float]:
        return [statistics.median(r) for r in self.round_times_ms]

    def summary(self) -> dict:
        """Timing and memory figures derived from the raw numbers."""
        med = self.round_medians()
        out = {
            "median_ms": statistics.median(med),
            "round_median_min_ms": min(med),
            "round_median_max_ms": max(med),
            "round_median_p25_ms": quantile(med, 0.25),
            "round_median_p75_ms": quantile(med, 0.75),
            "all_iterations_median_ms": statistics.median(t for r in self.round_times_ms for t in r),
        }
        mem = self.memory
        if "peak_storage_bytes" in mem:
            out["peak_storage_bytes_per_param"] = mem["peak_storage_bytes"] / self.params
            out["persistent_bytes_per_param"] = (mem["param_bytes"] + mem["state_bytes"]) / self.params
            out["peak_grad_fraction"] = mem["peak_grad_bytes"] / mem["grad_set_bytes"]
        return out


def paired_ratios(a: Result, b: Result) -> list[float]:
    """Per round, a's median time over b's (both measured in the same round)."""
    return [x / y for x, y in zip(a.round_medians(), b.round_medians(), strict=True)]


def overhead(results: dict[str, Result]) -> dict | None:
    """fusedwarm-bs / fusedwarm time per iteration, paired by round, against issue 3's target."""
    if BASELINE not in results or CANDIDATE not in results:
        return None
    ratios = paired_ratios(results[CANDIDATE], results[BASELINE])
    ratio = statistics.median(ratios)
    return {"candidate": CANDIDATE, "baseline": BASELINE, "ratio": ratio,
            "ratio_p25": quantile(ratios, 0.25), "ratio_p75": quantile(ratios, 0.75),
            "ratio_of_medians": results[CANDIDATE].summary()["median_ms"] / results[BASELINE].summary()["median_ms"],
            "round_ratios": ratios, "target": TARGET_OVERHEAD, "meets_target": ratio <= TARGET_OVERHEAD}


def equivalence(runs: dict[str, Run]) -> dict | None:
    """Whether fusedwarm-bs ended with exactly fusedwarm's weights and optimizer states."""
    if BASELINE not in runs or CANDIDATE not in runs:
        return None
    a, b = runs[BASELINE], runs[CANDIDATE]
    weights = all(torch.equal(p, q) for p, q in zip(a.params, b.params, strict=True))
    states = all(torch.equal(s, t) for p, q in zip(a.params, b.params, strict=True)
                 for s, t in zip(a.opt.state[p].values(), b.opt.state[q].values(), strict=True))
    losses = torch.equal(torch.stack(a.losses), torch.stack(b.losses))
    return {"iterations": a.done, "weights_equal": weights, "states_equal": states, "losses_equal": losses}


def mib(n: float) -> str:
    return f"{n / MIB:.2f}"


def markdown(results: dict[str, Result], env: dict, setup: dict, over: dict | None, equal: dict | None) -> str:
    """The results as a markdown table with a short header and the verdict."""
    cuda = env["device_type"] == "cuda"
    code = [p for p in env["uncommitted_paths"] if p.split()[-1].startswith(CODE_PATHS)]
    dirty = f" + uncommitted changes to {', '.join(p.split()[-1] for p in code)}" if code else ""
    lines = [
        (f"Training-loop benchmark ({env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}, "
         f"commit {(env['git_commit'] or '?')[:10]}{dirty}): "
         f"byte-level GPT, {setup['layers']} layers, width {setup['dim']}, {setup['heads']} heads, "
         f"{'tied' if setup['tie'] else 'untied'} head, {setup['params']:,} parameters in {setup['tensors']} tensors; "
         f"batch {setup['batch']} x {setup['seq']} bytes; bucket cap {setup['bucket_cap_mb']:g} MiB. "
         f"Time: median of {setup['rounds']} interleaved rounds' medians ({setup['iters']} iterations each, "
         f"after {setup['warmup']} warm-up), forward + backward + step + zero_grad. Load average (1 min) "
         f"before / after: {env['load_average'][0]:.2f} / {env['load_average_after'][0]:.2f} on "
         f"{env['usable_cpus']} cores."),
        "",
        "| config | ms / iter | round medians p25–p75 (min–max) | vs fusedwarm | peak params+grads+state MiB "
        "| bytes / param (expected) | max grads alive MiB (of a full set) | peak RSS growth MiB | "
        + ("CUDA max allocated MiB | " if cuda else "") + "final loss |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "") + "---|",
    ]
    base = results.get(BASELINE)
    for r in results.values():
        s, m = r.summary(), r.memory
        versus = f"{statistics.median(paired_ratios(r, base)):.3f}" if base else "–"
        if not m or "error" in m:
            mem_cells = [f"error: {m['error']}" if m else "not measured"] + ["–"] * (4 if cuda else 3)
        else:
            mem_cells = [
                mib(m["peak_storage_bytes"]),
                f"{s['peak_storage_bytes_per_param']:.2f} ({r.design_bytes_per_param})",
                f"{mib(m['peak_grad_bytes'])} ({100 * s['peak_grad_fraction']:.0f}% of {mib(m['grad_set_bytes'])})",
                mib(m["rss_growth_bytes"]),
            ] + ([mib(m["cuda_max_allocated_bytes"])] if cuda else [])
        lines.append(
            f"| {r.name} | {s['median_ms']:.1f} | {s['round_median_p25_ms']:.1f}–{s['round_median_p75_ms']:.1f} "
            f"({s['round_median_min_ms']:.1f}–{s['round_median_max_ms']:.1f}) | {versus} | "
            + " | ".join(mem_cells) + f" | {r.final_loss:.4f} |")
    lines += ["", "Configs: " + "; ".join(f"`{r.name}` = {r.optimizer}"
                                        + (" under bf16 autocast" if CONFIGS[r.name].autocast else "")
                                        for r in results.values()) + "."]
    if over:
        verdict = "PASS" if over["meets_target"] else "FAIL"
        lines += ["", (f"**backward_step overhead: {CANDIDATE} / {BASELINE} = {over['ratio']:.3f}** (median of "
                       f"{len(over['round_ratios'])} per-round ratios, p25–p75 {over['ratio_p25']:.3f}–"
                       f"{over['ratio_p75']:.3f}; ratio of the medians {over['ratio_of_medians']:.3f}): "
                       f"**{verdict}** against the target of at most {over['target']:.2f}.")]
    grad_set = next((r.memory["grad_set_bytes"] for r in results.values() if "grad_set_bytes" in r.memory), None)
    if grad_set and setup["bucket_cap_mb"] * MIB >= grad_set:
        lines += ["", (f"Note: the bucket cap ({setup['bucket_cap_mb']:g} MiB) is at least the whole gradient set "
                       f"({mib(grad_set)} MiB), so with backward_step every gradient stays alive until the end of "
                       "backward; pass a smaller --bucket-cap-mb.")]
    if equal:
        same = equal["weights_equal"] and equal["states_equal"] and equal["losses_equal"]
        lines += ["", f"{CANDIDATE} vs {BASELINE} after {equal['iterations']} iterations on the same batches: "
                  + ("weights, optimizer states and losses bit-identical." if same else
                     f"NOT identical (weights equal: {equal['weights_equal']}, states equal: {equal['states_equal']}, "
                     f"losses equal: {equal['losses_equal']}).")]
    lines += ["", "Memory from one instrumented iteration per config in a fresh process. Peak params+grads+state: "
              "storage accounting of parameters, live `.grad` tensors and optimizer state tensors (step "
              "counters included), sampled in post-accumulate-grad hooks before and after the optimizer's, and "
              "after backward, step and zero_grad; activations and autocast's weight copies are not counted. "
              "Bytes / param: that peak over the parameter count, with DESIGN.md's figure (weight + extra bits "
              "+ gradient + moments) in parentheses; torch on bf16 weights, not in DESIGN.md: 2 + 2 + 2 + 2. "
              "Peak RSS growth: the process's peak resident set size over its peak before the model was built. "
              + ("CUDA max allocated: `torch.cuda.max_memory_allocated` over the instrumented iteration "
                 "(everything, activations included). " if cuda else "")
              + "vs fusedwarm: median of per-round time ratios."]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated configurations to run, from {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default: 4)")
    parser.add_argument("--dim", type=int, default=256, help="model width (default: 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads; must divide --dim (default: 4)")
    parser.add_argument("--seq", type=int, default=128, help="bytes per sequence (default: 128)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per iteration (default: 16)")
    parser.add_argument("--tie", action="store_true", help="tie the output head to the token embedding")
    parser.add_argument("--bucket-cap-mb", type=float, default=1.0,
                        help="fusedwarm's bucket_cap_mb with backward_step (default: 1, about a sixth of the default "
                             "model's bf16 gradient set; fusedwarm's own default of 25 would hold all of it)")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds (default: 40)")
    parser.add_argument("--iters", type=int, default=6, help="timed iterations per config per round (default: 6)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per config first (default: 3)")
    parser.add_argument("--text-bytes", type=int, default=4 * MIB,
                        help="bytes of standard-library source to sample batches from (default: 4 MiB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights, batches and "
                                                            "fusedwarm's rounding (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default, the number of usable cores)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements (subprocesses)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/train_loop_<device>.json); "
                             "the .md goes next to it")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)  # internal: one config's memory
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    if args.dim % args.heads:
        parser.error(f"--heads ({args.heads}) must divide --dim ({args.dim})")
    if min(args.layers, args.dim, args.heads, args.seq, args.batch, args.rounds, args.iters, args.warmup) < 1 or (
            args.threads is not None and args.threads < 1):
        parser.error("sizes, --rounds, --iters, --warmup and --threads must be at least 1")
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_memory:
        print(json.dumps(measure_memory(CONFIGS[args.measure_memory], args, device)))
        return 0

    started = time.perf_counter()
    env = environment(device)
    env["uncommitted_paths"] = (git("status", "--porcelain", "--untracked-files=no") or "").splitlines()
    text, files = load_text(args.text_bytes)
    total = args.warmup + args.rounds * args.iters
    batches = make_batches(text, total, args.batch, args.seq, args.seed, device)
    runs = {name: Run(CONFIGS[name], args, device) for name in args.configs}
    first = next(iter(runs.values()))
    numel = sum(p.numel() for p in first.params)
    setup = {"layers": args.layers, "dim": args.dim, "heads": args.heads, "seq": args.seq, "batch": args.batch,
             "tie": args.tie, "params": numel, "tensors": len(first.params), "bucket_cap_mb": args.bucket_cap_mb,
             "lr": args.lr, "betas": list(HYPER["betas"]), "weight_decay": HYPER["weight_decay"],
             "rounds": args.rounds, "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
             "text_bytes": len(text),
             "text_source": f"{os.path.dirname(os.__file__)}/*.py, sorted: {files[0]} .. {files[-1]} "
                            f"({len(files)} files)"}
    print(f"device: {env['device_name']} ({device.type}); torch {env['torch']}, {env['torch_threads']} threads; "
          f"commit {(env['git_commit'] or '?')[:10]}")
    print(f"model: byte-level GPT, {args.layers} layers x {args.dim} wide, {numel:,} parameters; "
          f"batch {args.batch} x {args.seq}; text: {len(text):,} bytes of {setup['text_source']}")

    results = {name: Result(name, run.config.description, run.impl, str(run.config.param_dtype).removeprefix("torch."),
                            run.config.design_bytes, numel) for name, run in runs.items()}
    if not args.no_memory:
        for i, name in enumerate(runs):
            print(f"  memory {i + 1}/{len(runs)}: {name} (fresh process) ...", file=sys.stderr, flush=True)
            results[name].memory = memory_in_subprocess(name, raw_argv)

    for name, run in runs.items():
        print(f"  warm-up: {name} ...", file=sys.stderr, flush=True)
        for _ in range(args.warmup):
            run.iteration(batches)
        sync(device)
    names = list(runs)
    t0 = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no config always goes first
        for name in order:
            results[name].round_times_ms.append([1e3 * t for t in runs[name].timed(batches, args.iters)])
        elapsed = time.perf_counter() - t0
        now = "  ".join(f"{n} {statistics.median(results[n].round_times_ms[-1]):.0f}" for n in names)
        print(f"  round {r + 1}/{args.rounds} (ms/iter: {now}); {elapsed:.0f} s, about "
              f"{elapsed / (r + 1) * (args.rounds - r - 1):.0f} s left", file=sys.stderr, flush=True)
    for name, run in runs.items():
        results[name].final_loss = torch.stack(run.losses[-args.iters:]).float().mean().item()

    env["load_average_after"] = list(os.getloadavg())
    over = overhead(results)
    equal = equivalence(runs)
    table = markdown(results, env, setup, over, equal)
    print("\n" + table)

    out = args.out or RESULTS / f"train_loop_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "train_loop", "environment": env, "setup": setup,
               "wall_seconds": time.perf_counter() - started,
               "configs": [{**{k: v for k, v in vars(r).items() if k != "round_times_ms"}, **r.summary(),
                            "round_times_ms": r.round_times_ms} for r in results.values()],
               "overhead": over, "equivalence": equal}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
