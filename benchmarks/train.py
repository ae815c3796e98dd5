"""Training benchmark: peak memory, tokens per second and loss of AdamW implementations training a
byte-level GPT, from torch's mixed-precision baseline to fusedwarm's bf16-only modes (issue 6).

**Model and data.** The GPT-style decoder of ``benchmarks/models.py`` (``ByteGPT``: token and
position embeddings, pre-LN blocks with causal self-attention and a 4x GELU MLP, final LayerNorm,
untied output head over 256 bytes) trains on the bytes of the Python standard library's
top-level source files (they ship with Python; nothing is downloaded), read in sorted order up to
``--text-bytes``. The first 90% is the training text, from which ``--steps`` batches of
``--batch`` random ``--seq``-byte windows are drawn with ``--seed``; the last 10% is held out, and
``--eval-batches`` fixed batches from it give the held-out loss (mean cross-entropy, nats/byte)
at ``--evals`` evenly spaced steps, the last one at the end. Every configuration starts from the
same initial weights (built in float32 with ``--seed``, cast to the configuration's dtype), sees
the same batches in the same order, and follows the same learning rate: one
``torch.optim.lr_scheduler.LambdaLR`` per optimizer, linear warmup over ``--lr-warmup`` steps,
then cosine decay to 10% of ``--lr``; AdamW with betas (0.9, 0.95), eps 1e-8, weight decay 0.1 for
all (``train_loop.HYPER``); no gradient clipping. fusedwarm runs with ``warmup="none"`` (exactly
torch's update rule, so only the shared scheduler warms up) and bfloat16 states.

**Configurations** (``--configs``: comma-separated names or regular expressions, each matched
against whole names):

* ``torch-amp``: ``torch.optim.AdamW`` (fused) on float32 weights, forward under bfloat16
  autocast: the standard baseline;
* ``torch-bf16``: the same optimizer on bfloat16 weights (bfloat16 states, no master copy);
* ``fusedwarm-x16``, ``fusedwarm-x8``, ``fusedwarm-x0``: ``fusedwarm.AdamW`` on bfloat16 weights
  with 16, 8 or 0 extra bits (split master weights, Lewandowski & Kosson 2023, arXiv 2309.12381;
  0 = stochastic rounding), bfloat16 states; backward, then ``step()``;
* ``fusedwarm-x16-bs``, ``fusedwarm-x8-bs``, ``fusedwarm-x0-bs``: the same with
  ``backward_step=True``: each parameter is updated inside ``backward()`` from post-accumulate-grad
  hooks, in buckets of ``--bucket-cap-mb``, and its gradient freed (same paper);
* peers, when importable: ``optimi-bf16`` (``optimi.AdamW(kahan_sum=True)`` on bfloat16 weights),
  ``torchao-8bit`` (``torchao.optim.AdamW8bit``, float32 weights + bf16 autocast),
  ``torchao-bf16-sr`` (``torchao.optim._AdamW(bf16_stochastic_round=True)`` on bfloat16
  weights), ``bnb-8bit`` (``bitsandbytes.optim.AdamW8bit``, float32 weights + bf16 autocast;
  tensors under 4096 elements keep 32-bit states). A peer that cannot be imported is listed as
  skipped with its ImportError; any configuration that raises while training (e.g. a CUDA-only
  kernel on the CPU) is listed as failed with the error's first line.

Configurations run one after another, each for the whole run.

**Measured, per configuration.**

* Tokens per second: ``(steps - warmup) * batch * seq`` over the wall time of training steps
  ``warmup + 1 .. steps`` (forward, backward, ``step()``, ``zero_grad()``, scheduler), held-out
  evaluations excluded; the first ``--warmup`` steps (extension and compiler warm-up, allocator
  growth) are not timed. On CUDA the clock is read after ``torch.cuda.synchronize``.
* Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` over the whole training run (reset
  before it; everything: weights, states, gradients, activations). CPU: storage accounting, the
  peak bytes of parameters + live gradients + optimizer state tensors, sampled in
  post-accumulate-grad hooks and after backward / step / zero_grad, and the process's peak RSS;
  both come from ``train_loop.measure_memory``, run in a fresh subprocess per configuration
  (``--warmup`` iterations, then one instrumented one), which CUDA runs report as well.
* Loss: the training loss curve (the mean over each ``--log-every`` steps: smoothed), the final
  training loss (the last such mean), the held-out curve and the final held-out loss.

**Targets** (issue 6), on a CUDA GPU at GPT-2-small scale (``--preset gpt2-small``):
``fusedwarm-x16-bs`` uses at least 40% less peak memory than ``torch-amp``, trains at least 1.15x
as many tokens per second, and ends with a held-out loss at most 1% above it. The result file
holds these three comparisons for every configuration against ``torch-amp``, with pass/fail
verdicts for the candidate on a GPU at that scale, and verdict null elsewhere (the CPU included).

Run from the repository root (matplotlib optional, for the plots; tqdm optional, for the bar)::

    PYTHONPATH=. python benchmarks/train.py                                # CPU, preset "small"
    PYTHONPATH=. python benchmarks/train.py --device cuda --preset gpt2-small

The CPU preset (4 layers, width 256, 3.3M parameters, 300 steps of 8 x 128 bytes) takes about
8 minutes on 2 idle cores for all twelve configurations (torchao's compilation included); the GPU
preset is GPT-2 small's shape (12 layers, width 768, 12 heads, context 1024; 86M parameters with
a 256-byte vocabulary), 1000 steps of 8 x 1024 bytes. ``--render RESULT.json`` rewrites the
table and plots from an existing result file.

Results: ``benchmarks/results/train_<device>.json`` (environment with device, versions, commit and
command line; setup; every configuration's numbers and curves; the target comparisons),
``train_<device>.md`` (the table, also printed) and, with matplotlib, ``train_<device>_loss.png``
(loss curves) and ``train_<device>_bars.png`` (peak memory and tokens/s).
"""

from __future__ import annotations

import os

# Before torch is imported: torch's CPU allocator then serves large tensors from 2 MiB-aligned
# transparent huge pages. Otherwise glibc places tensors allocated after large frees on the heap,
# which made identical optimizer steps up to 2x slower depending on allocation order.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import argparse
import functools
import gc
import importlib
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from models import ByteGPT, byte_loss, load_text, make_batches
from step import PEER_ADAMW, environment, first_line, git, sync
from train_loop import CODE_PATHS, HYPER, MIB, Config, Run, measure_memory, memory_in_subprocess, mib
from train_loop import make_optimizer as loop_optimizer

RESULTS = Path(__file__).resolve().parent / "results"

BASELINE, CANDIDATE = "torch-amp", "fusedwarm-x16-bs"
# Issue 6's targets for CANDIDATE vs BASELINE on a CUDA GPU at GPT-2-small scale: at least 40% less
# peak memory, at least 1.15x the tokens per second, held-out loss at most 1% higher.
TARGETS = {"memory_saving": 0.40, "speed_ratio": 1.15, "held_out_ratio": 1.01}
HELD_OUT_FRACTION = 0.1  # the end of the text, never trained on
FINAL_LR_FRACTION = 0.1  # the cosine decay ends at this fraction of --lr

PRESETS = {
    "small": dict(layers=4, dim=256, heads=4, seq=128, batch=8, steps=300, lr=2e-3, bucket_cap_mb=1.0,
                  eval_batches=8, text_bytes=4 * MIB),
    "gpt2-small": dict(layers=12, dim=768, heads=12, seq=1024, batch=8, steps=1000, lr=6e-4, bucket_cap_mb=25.0,
                       eval_batches=16, text_bytes=8 * MIB),
}
SCALE_KEYS = ("layers", "dim", "heads", "seq")  # "GPT-2-small scale": the gpt2-small preset's shape

BF16, FP32 = torch.bfloat16, torch.float32
# design_bytes: weight + extra bits + gradient + moments per parameter, as in shared/DESIGN.md's table
# (with backward_step no gradient set is held; 8-bit states: 1 byte each, block scales not counted;
# optimi's Kahan compensation: 2 bytes, in the place of the extra bits).
CONFIGS = {c.name: c for c in (
    Config("torch-amp", "torch AdamW, fp32 weights, bf16 autocast", FP32, autocast=True, design_bytes=16),
    Config("torch-bf16", "torch AdamW, bf16 weights and states, no master copy", BF16, design_bytes=8),
    *(Config(f"fusedwarm-x{bits}{'-bs' if bs else ''}",
             f"fusedwarm AdamW, bf16 weights, {bits} extra bits, bf16 states" + (", backward_step" if bs else ""),
             BF16, extra_bits=bits, backward_step=bs, design_bytes=2 + bits // 8 + (0 if bs else 2) + 4)
      for bits in (16, 8, 0) for bs in (False, True)),
    Config("optimi-bf16", "optimi AdamW, bf16 weights and states, Kahan summation", BF16, design_bytes=10),
    Config("torchao-8bit", "torchao AdamW8bit, fp32 weights, bf16 autocast, 8-bit states", FP32, autocast=True,
           design_bytes=10),
    Config("torchao-bf16-sr", "torchao AdamW, bf16 weights and states, stochastic rounding", BF16, design_bytes=8),
    Config("bnb-8bit", "bitsandbytes AdamW8bit, fp32 weights, bf16 autocast, 8-bit states", FP32, autocast=True,
           design_bytes=10),
)}


# Peer configurations: name -> the other library's AdamW (benchmarks/step.py's PEER_ADAMW).
PEERS = {"optimi-bf16": PEER_ADAMW["optimi kahan"], "torchao-8bit": PEER_ADAMW["torchao 8bit"],
         "torchao-bf16-sr": PEER_ADAMW["torchao bf16 sr"], "bnb-8bit": PEER_ADAMW["bnb 8bit"]}


def make_optimizer(config: Config, params: list[torch.nn.Parameter], args: argparse.Namespace) -> tuple[
        torch.optim.Optimizer, str]:
    """The configuration's optimizer and its description: train_loop's for torch and fusedwarm
    (fusedwarm with ``warmup="none"``, bf16 states), the peer library's otherwise, same lr and HYPER."""
    peer = PEERS.get(config.name)
    if peer is None:
        return loop_optimizer(config, params, args)
    return peer.build(importlib.import_module(peer.module), params, dict(lr=args.lr, **HYPER)), peer.description


def library(config: Config) -> str:
    """The library that provides the configuration's optimizer: torch, fusedwarm or the peer's package."""
    if config.name in PEERS:
        return PEERS[config.name].module.split(".")[0]
    return "torch" if config.extra_bits is None else "fusedwarm"


def import_error(config: Config) -> str | None:
    """The ImportError of a peer configuration's module, or None when it imports (or is not a peer)."""
    peer = PEERS.get(config.name)
    if peer is None:
        return None
    try:
        importlib.import_module(peer.module)
    except ImportError as exc:
        return first_line(exc)
    return None


# ---- training -----------------------------------------------------------------------------------


class DeviceBatches:
    """(input, target) batches kept in host memory (pinned for CUDA) and copied to ``device`` when
    indexed, so that the whole run's batches do not count toward the device's peak memory."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        self.device = device
        self.batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches] if device.type == "cuda" else batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batches[i]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """LambdaLR's factor for update ``step + 1`` of ``total``: linear from 1/warmup to 1 over the first
    ``warmup`` updates, then a cosine decay that reaches FINAL_LR_FRACTION at the last update."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def held_out_loss(run: Run, held_out: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean cross-entropy (nats/byte) of the run's model over every predicted byte of ``held_out``."""
    total = torch.zeros((), device=run.device)
    with torch.no_grad():
        for x, y in held_out:
            x, y = x.to(run.device), y.to(run.device)
            with run.autocast:
                logits = run.model(x)
            total += byte_loss(logits, y, reduction="sum")
    return total.item() / sum(y.numel() for _, y in held_out)


class Progress:
    """One configuration's training progress on stderr: a tqdm bar when tqdm is importable, else a
    line rewritten in place when stderr is a terminal, else a line every tenth of the run."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.loss = label, total, None
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 10)
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, loss: float | None) -> None:
        """Step ``step`` is done; ``loss``, when given, is the latest training loss to show."""
        if loss is not None:
            self.loss = loss
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        if not (self.tty or step % self.every == 0 or step == self.total):
            return
        elapsed = time.perf_counter() - self.start
        filled = 30 * step // self.total
        line = (f"  {self.label} [{'#' * filled}{'.' * (30 - filled)}] {step}/{self.total}  {elapsed:.0f} s, "
                f"about {elapsed / step * (self.total - step):.0f} s left"
                + (f", loss {self.loss:.4f}" if self.loss is not None else ""))
        print(f"\r{line}\033[K" if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            print(file=sys.stderr, flush=True)


def release(device: torch.device) -> None:
    """Frees what earlier configurations left behind, so that each starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train(config: Config, args: argparse.Namespace, device: torch.device, batches: DeviceBatches,
          held_out: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Trains one configuration for the whole run (see the module docstring); returns its numbers."""
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    run = Run(config, args, device, make_opt=make_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.opt, functools.partial(lr_factor, warmup=args.lr_warmup, total=args.steps))
    eval_steps = eval_points(args.steps, args.evals)
    progress = Progress(config.name, args.steps)
    held, timed, clock = [], 0.0, None
    for step in range(1, args.steps + 1):
        if step == args.warmup + 1:
            sync(device)
            clock = time.perf_counter()
        run.iteration(batches)
        scheduler.step()
        progress.update(step, run.losses[-1].item() if step % args.log_every == 0 else None)
        if step in eval_steps:  # the last step is one, so the clock's last segment ends there
            if clock is not None:
                sync(device)
                timed += time.perf_counter() - clock
            held.append(held_out_loss(run, held_out))
            if clock is not None:
                clock = time.perf_counter()
    progress.close()

    losses = torch.stack(run.losses).float().cpu()
    logged = list(range(args.log_every, args.steps + 1, args.log_every))
    if not logged or logged[-1] != args.steps:
        logged.append(args.steps)
    curve = [losses[max(0, s - args.log_every):s].mean().item() for s in logged]
    timed_steps = args.steps - args.warmup
    out = {
        "optimizer": run.impl,
        "params": sum(p.numel() for p in run.params),
        "tensors": len(run.params),
        "timed_steps": timed_steps,
        "timed_seconds": timed,
        "tokens_per_s": timed_steps * args.batch * args.seq / timed,
        "final_train_loss": curve[-1],
        "held_out_loss": held[-1],
        "loss_curve": {"step": logged, "loss": curve},
        "held_out_curve": {"step": eval_steps, "loss": held},
    }
    if device.type == "cuda":
        out["cuda_allocated_at_start_bytes"] = start_bytes
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def eval_points(steps: int, evals: int) -> list[int]:
    """``evals`` evenly spaced steps at which the held-out loss is measured, the last one ``steps``."""
    return sorted({round(k * steps / evals) for k in range(1, evals + 1)})


def run_config(config: Config, args: argparse.Namespace, device: torch.device, batches: DeviceBatches,
               held_out: list[tuple[torch.Tensor, torch.Tensor]], argv: list[str]) -> dict:
    """One configuration's result row: trained in this process, then its memory measured in a fresh one."""
    row = {"name": config.name, "description": config.description, "library": library(config),
           "param_dtype": str(config.param_dtype).removeprefix("torch."), "autocast": config.autocast,
           "design_bytes_per_param": config.design_bytes, "status": "ok", "error": None}
    try:
        missing = import_error(config)
        if missing:
            return {**row, "status": "skipped", "error": missing}
        row.update(train(config, args, device, batches, held_out))
    except Exception as exc:  # a configuration that cannot run here is reported, not fatal
        return {**row, "status": "failed", "error": first_line(exc)}
    release(device)
    if not args.no_memory:
        row["memory"] = memory_in_subprocess(config.name, argv, Path(__file__))
    memory = row.get("memory", {})
    row["peak_memory_bytes"] = (row["cuda_max_allocated_bytes"] if device.type == "cuda"
                                else memory.get("peak_storage_bytes"))
    if "peak_storage_bytes" in memory:
        row["peak_storage_bytes_per_param"] = memory["peak_storage_bytes"] / row["params"]
    return row


# ---- comparisons --------------------------------------------------------------------------------


def versus(row: dict, base: dict) -> dict:
    """``row`` against the baseline row: memory saving (1 - peak / baseline peak), speed ratio
    (tokens/s over the baseline's) and held-out loss ratio; None where a number is missing."""
    def ratio(key: str) -> float | None:
        a, b = row.get(key), base.get(key)
        return a / b if a is not None and b else None

    memory = ratio("peak_memory_bytes")
    return {"memory_saving": None if memory is None else 1 - memory, "speed_ratio": ratio("tokens_per_s"),
            "held_out_ratio": ratio("held_out_loss")}


def target_verdicts(rows: list[dict], setup: dict, device_type: str) -> dict:
    """CANDIDATE vs BASELINE against TARGETS; ``met`` is None unless the run is on CUDA at GPT-2-small scale."""
    scale = all(setup[k] == PRESETS["gpt2-small"][k] for k in SCALE_KEYS)
    applies = device_type == "cuda" and scale
    out = {"candidate": CANDIDATE, "baseline": BASELINE, "applies": applies,
           "why_not": None if applies else ("a CPU run" if device_type != "cuda" else "not at GPT-2-small scale")}
    by_name = {r["name"]: r for r in rows}
    cand = by_name.get(CANDIDATE, {})
    if cand.get("status") != "ok" or not cand.get("vs_baseline"):
        return {**out, "all_met": None}
    for key, target in TARGETS.items():
        value = cand["vs_baseline"][key]
        met = None if value is None else (value <= target if key == "held_out_ratio" else value >= target)
        out[key] = {"value": value, "target": target, "met": met if applies else None}
    out["all_met"] = all(out[k]["met"] for k in TARGETS) if applies else None
    return out


# ---- reports ------------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt.format(value)


def render_markdown(result: dict) -> str:
    """The result file ``result`` (as written by ``main``) as a markdown table with a short header,
    the target comparison and notes; ``benchmarks/report.py`` can embed its ``.md`` in the README."""
    env, setup, base = result["environment"], result["setup"], result["baseline"]
    cuda = env["device_type"] == "cuda"
    code = [p.split()[-1] for p in env.get("uncommitted_paths", []) if p.split()[-1].startswith(CODE_PATHS)]
    dirty = f" + uncommitted changes to {', '.join(code)}" if code else ""
    lines = [
        (f"Training benchmark ({env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}, "
         f"commit {(env['git_commit'] or '?')[:10]}{dirty}): byte-level GPT, {setup['layers']} layers, width "
         f"{setup['dim']}, {setup['heads']} heads, {setup['params']:,} parameters; {setup['steps']} steps of "
         f"{setup['batch']} x {setup['seq']} bytes of stdlib source; AdamW lr {setup['lr']:g} (linear warmup "
         f"{setup['lr_warmup']} steps, cosine to {setup['final_lr_fraction']:g} x), betas {tuple(setup['betas'])}, "
         f"weight decay {setup['weight_decay']}; fusedwarm bucket cap {setup['bucket_cap_mb']:g} MiB."),
        "",
    ]
    peak = "CUDA max allocated MiB" if cuda else "peak params+grads+state MiB"
    head = ["config", "optimizer", peak, f"vs {base}"]
    head += ["params+grads+state MiB"] if cuda else []
    head += ["bytes / param (expected)", "peak RSS MiB", "tokens / s", f"vs {base}", "final train loss",
             "held-out loss", f"vs {base}"]
    lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in result["configs"]:
        if r["status"] != "ok":
            cells = [r["name"], r["description"], f"{r['status']}: {r['error']}"] + ["–"] * (len(head) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        vs = r.get("vs_baseline") or {}
        mem = r.get("memory", {})
        saving = vs.get("memory_saving")
        optimizer = f"{r['optimizer']}, {r['param_dtype']} weights" + (", bf16 autocast" if r["autocast"] else "")
        peak_bytes = r.get("peak_memory_bytes")
        cells = [r["name"], optimizer, _cell(None if peak_bytes is None else peak_bytes / MIB, "{:,.1f}"),
                 _cell(None if saving is None else 0.0 - saving, "{:+.0%}")]  # 0.0 - 0.0: "+0%", not "-0%"
        if cuda:
            cells.append(mib(mem["peak_storage_bytes"]) if "peak_storage_bytes" in mem else "–")
        cells += [
            _cell(r.get("peak_storage_bytes_per_param"), "{:.2f}") + f" ({r['design_bytes_per_param']})",
            mib(mem["peak_rss_bytes"]) if "peak_rss_bytes" in mem else "–",
            f"{r['tokens_per_s']:,.0f}", _cell(vs.get("speed_ratio"), "{:.2f}x"),
            _cell(r["final_train_loss"], "{:.4f}"), _cell(r["held_out_loss"], "{:.4f}"),
            _cell(None if vs.get("held_out_ratio") is None else vs["held_out_ratio"] - 1, "{:+.2%}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")

    failed = [f"`{r['name']}`: {r['memory']['error']}" for r in result["configs"] if "error" in r.get("memory", {})]
    if failed:
        lines += ["", "Memory measurement failed for " + "; ".join(failed) + "."]
    t = result["targets"]
    if t.get("memory_saving"):
        def part(key: str, what: str, fmt: str) -> str:
            item = t[key]
            verdict = "" if item["met"] is None else (" **PASS**" if item["met"] else " **FAIL**")
            bound = "≤" if key == "held_out_ratio" else "≥"
            return f"{what} {_cell(item['value'], fmt)} (target {bound} {fmt.format(item['target'])}){verdict}"

        lines += ["", (f"Targets, `{t['candidate']}` vs `{t['baseline']}`: "
                       + "; ".join([part("memory_saving", "peak memory saving", "{:.0%}"),
                                    part("speed_ratio", "tokens/s ratio", "{:.2f}x"),
                                    part("held_out_ratio", "held-out loss ratio", "{:.4f}")])
                       + (f". Overall: **{'PASS' if t['all_met'] else 'FAIL'}**." if t["applies"] else
                          f". The targets are for a CUDA GPU at GPT-2-small scale; this is {t['why_not']}, "
                          "so the comparison is reported without a verdict."))]
    lines += ["", (f"Tokens / s over steps {setup['warmup'] + 1}–{setup['steps']} (the first {setup['warmup']} "
                   "untimed), held-out evaluations excluded"
                   + (", CUDA-synchronized" if cuda else "") + ". "
                   + ("Peak memory: `torch.cuda.max_memory_allocated` over the training run (everything, "
                      "activations included). " if cuda else "Peak memory: ")
                   + "params+grads+state: storage accounting of parameters, live `.grad` tensors and optimizer "
                     "state tensors, sampled in post-accumulate-grad hooks and after backward, step and zero_grad, "
                     "in a fresh process per config; bytes / param is that peak over the parameter count, with "
                     "DESIGN.md's weight + extra bits + gradient + moments in parentheses (8-bit states: 1 byte "
                     "each, scales not counted). Peak RSS: that process's peak resident set size (libraries "
                     f"included). Final train loss: mean of the last {setup['log_every']} steps' losses (the loss "
                     "curve is smoothed the same way). Held-out loss: mean cross-entropy (nats/byte) over "
                     f"{setup['held_out_tokens']:,} bytes from the last 10% of the text, never trained on. "
                     "Every config starts from the same weights and sees the same batches.")]
    return "\n".join(lines)


def save_plots(result: dict, loss_path: Path, bars_path: Path) -> bool:
    """Loss curves and memory / throughput bars of the configurations that ran; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["configs"] if r["status"] == "ok"]
    if not rows:
        return False
    env, setup = result["environment"], result["setup"]
    title = (f"byte-level GPT, {setup['params']:,} parameters, {setup['steps']} steps of "
             f"{setup['batch']}x{setup['seq']} bytes; {env['device_name']}, torch {env['torch']}")
    colors = dict(zip((r["name"] for r in rows), plt.get_cmap("tab20").colors * 2))

    fig, (ax_train, ax_held) = plt.subplots(1, 2, figsize=(13, 4.8))
    for r in rows:
        style = dict(color="k", lw=2.2) if r["name"] == result["baseline"] else dict(color=colors[r["name"]], lw=1.3)
        ax_train.plot(r["loss_curve"]["step"], r["loss_curve"]["loss"], label=r["name"], **style)
        ax_held.plot(r["held_out_curve"]["step"], r["held_out_curve"]["loss"], marker="o", ms=3,
                     label=f"{r['name']} ({r['held_out_loss']:.3f})", **style)
    ax_train.set_ylabel(f"training loss, nats/byte (mean of {setup['log_every']} steps)")
    ax_held.set_ylabel("held-out loss, nats/byte")
    for ax in (ax_train, ax_held):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_held.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(loss_path, dpi=110)
    plt.close(fig)

    cuda = env["device_type"] == "cuda"
    fig, (ax_mem, ax_speed) = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 1.6))
    names = [r["name"] for r in rows]
    bar_colors = [{"torch": "tab:gray", "fusedwarm": "tab:blue"}.get(r["library"], "tab:orange") for r in rows]
    memory = [(r.get("peak_memory_bytes") or 0) / MIB for r in rows]
    speed = [r["tokens_per_s"] for r in rows]
    ax_mem.barh(names, memory, color=bar_colors)
    ax_speed.barh(names, speed, color=bar_colors)
    for ax, values, fmt in ((ax_mem, memory, "{:,.1f}"), (ax_speed, speed, "{:,.0f}")):
        for i, v in enumerate(values):
            ax.text(v, i, " " + (fmt.format(v) if v else "n/a"), va="center", fontsize=7)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    ax_mem.set_xlabel("peak memory, MiB (" + ("torch.cuda.max_memory_allocated" if cuda
                                               else "params + grads + optimizer state") + ")")
    ax_speed.set_xlabel("tokens / s")
    ax_speed.set_yticklabels([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(bars_path, dpi=110)
    plt.close(fig)
    return True


def write_reports(result: dict, out: Path) -> None:
    """Writes the markdown table (and prints it) and the plots next to the JSON path ``out``."""
    table = render_markdown(result)
    print("\n" + table)
    out.with_suffix(".md").write_text(table + "\n")
    loss_png, bars_png = out.with_name(f"{out.stem}_loss.png"), out.with_name(f"{out.stem}_bars.png")
    plotted = save_plots(result, loss_png, bars_png)
    print(f"\nwrote {out.with_suffix('.md')}" + (f", {loss_png} and {bars_png}" if plotted else
                                                  " (matplotlib not installed: no plots)"))


# ---- main ---------------------------------------------------------------------------------------


def select_configs(spec: str) -> list[str]:
    """The configurations named by ``spec``: comma-separated names or regular expressions, each
    matched against whole names; in CONFIGS order. Raises ValueError for an item that matches none."""
    chosen = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        try:
            pattern = re.compile(item)
        except re.error as exc:
            raise ValueError(f"{item!r} is neither a configuration name nor a regular expression ({exc})") from None
        hits = {name for name in CONFIGS if pattern.fullmatch(name)}
        if not hits:
            raise ValueError(f"{item!r} matches no configuration; choose from {', '.join(CONFIGS)}")
        chosen |= hits
    if not chosen:
        raise ValueError("no configuration selected")
    return [name for name in CONFIGS if name in chosen]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: cpu")
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="defaults for the size, steps, lr, bucket cap, held-out batches and text flags: "
                             + "; ".join(f"{k}: " + ", ".join(f"{a}={v:g}" for a, v in p.items() if a != "text_bytes")
                                         + f", text_bytes={p['text_bytes'] // MIB} MiB" for k, p in PRESETS.items())
                             + " (default: small on cpu, gpt2-small on cuda; explicit flags override it)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated configuration names or regular expressions matched against whole "
                             f"names, from {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--layers", type=int, help="transformer blocks")
    parser.add_argument("--dim", type=int, help="model width")
    parser.add_argument("--heads", type=int, help="attention heads; must divide --dim")
    parser.add_argument("--seq", type=int, help="bytes per sequence (context length)")
    parser.add_argument("--batch", type=int, help="sequences per step")
    parser.add_argument("--steps", type=int, help="training steps per configuration")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--bucket-cap-mb", type=float, help="fusedwarm's bucket_cap_mb with backward_step")
    parser.add_argument("--eval-batches", type=int, help="held-out batches (of --batch x --seq bytes) per evaluation")
    parser.add_argument("--text-bytes", type=int, help="bytes of standard-library source to use (train + held out)")
    parser.add_argument("--tie", action="store_true", help="tie the output head to the token embedding")
    parser.add_argument("--lr-warmup", type=int, default=None,
                        help="linear learning-rate warmup steps (default: a tenth of --steps)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="first steps not timed (extension and compiler warm-up, allocator growth); also the "
                             "iterations before the instrumented one in the memory measurement (default: 5)")
    parser.add_argument("--evals", type=int, default=5, help="held-out evaluations, evenly spaced (default: 5)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="training loss curve resolution: mean over this many steps (default: --steps / 50)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initial weights, the batches and fusedwarm's rounding (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's default, the number of usable cores)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the per-configuration memory subprocesses (CPU peak memory is then not measured)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/train_<device>.json); the .md and .png files "
                             "go next to it")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULT_JSON",
                        help="only rewrite the markdown table and plots of an existing result file")
    parser.add_argument("--measure-memory", default=None, help=argparse.SUPPRESS)  # internal: one config's memory
    args = parser.parse_args(argv)

    args.preset = args.preset or ("small" if args.device == "cpu" else "gpt2-small")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.configs = select_configs(args.configs)
    except ValueError as exc:
        parser.error(f"--configs: {exc}")
    if args.lr_warmup is None:
        args.lr_warmup = args.steps // 10
    if args.log_every is None:
        args.log_every = max(1, args.steps // 50)
    positive = ("layers", "dim", "heads", "seq", "batch", "steps", "eval_batches", "text_bytes", "evals", "log_every")
    bad = [f"--{k.replace('_', '-')}" for k in positive if getattr(args, k) < 1]
    if bad or (args.threads is not None and args.threads < 1):
        parser.error(f"{', '.join(bad) or '--threads'} must be at least 1")
    if args.dim % args.heads:
        parser.error(f"--heads ({args.heads}) must divide --dim ({args.dim})")
    if not (args.lr > 0 and args.bucket_cap_mb > 0):
        parser.error("--lr and --bucket-cap-mb must be positive")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup ({args.warmup}) must be at least 0 and less than --steps ({args.steps})")
    if not 0 <= args.lr_warmup <= args.steps:
        parser.error(f"--lr-warmup ({args.lr_warmup}) must be between 0 and --steps ({args.steps})")
    if args.evals > args.steps:
        parser.error(f"--evals ({args.evals}) must not exceed --steps ({args.steps})")
    if args.measure_memory is not None and args.measure_memory not in CONFIGS:
        parser.error(f"unknown configuration {args.measure_memory!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        write_reports(json.loads(args.render.read_text()), args.render)
        return 0
    if args.measure_memory:
        print(json.dumps(measure_memory(CONFIGS[args.measure_memory], args, device, make_optimizer)))
        return 0

    started = time.perf_counter()
    env = environment(device)
    env["command"] = shlex.join([Path(sys.executable).name, "benchmarks/train.py", *raw_argv])
    env["uncommitted_paths"] = (git("status", "--porcelain", "--untracked-files=no") or "").splitlines()
    text, files = load_text(args.text_bytes)
    split = int(len(text) * (1 - HELD_OUT_FRACTION))
    if len(text) - split <= args.seq + 1:
        raise SystemExit(f"error: the held-out text ({len(text) - split} bytes, the last "
                         f"{HELD_OUT_FRACTION:.0%} of --text-bytes) is shorter than --seq + 2; raise --text-bytes")
    host = torch.device("cpu")
    batches = DeviceBatches(make_batches(text[:split], args.steps, args.batch, args.seq, args.seed, host), device)
    held_out = make_batches(text[split:], args.eval_batches, args.batch, args.seq, args.seed + 1, host)
    with torch.device("meta"):
        model = ByteGPT(args.layers, args.dim, args.heads, args.seq, args.tie)
    setup = {
        "preset": args.preset, "layers": args.layers, "dim": args.dim, "heads": args.heads, "seq": args.seq,
        "batch": args.batch, "tie": args.tie, "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": args.batch * args.seq, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
        "lr_schedule": "LambdaLR: linear warmup from lr/lr_warmup to lr, then cosine to final_lr_fraction x lr",
        "lr_warmup": args.lr_warmup, "final_lr_fraction": FINAL_LR_FRACTION, "betas": list(HYPER["betas"]),
        "eps": HYPER["eps"], "weight_decay": HYPER["weight_decay"], "grad_clipping": None,
        "bucket_cap_mb": args.bucket_cap_mb, "seed": args.seed, "eval_steps": eval_points(args.steps, args.evals),
        "eval_batches": args.eval_batches, "held_out_tokens": args.eval_batches * args.batch * args.seq,
        "log_every": args.log_every,
        "loss_curve": "mean training loss of the log_every steps ending at each logged step",
        "text_bytes": len(text), "train_bytes": split, "held_out_bytes": len(text) - split,
        "text_source": f"{os.path.dirname(os.__file__)}/*.py, sorted: {files[0]} .. {files[-1]} ({len(files)} files)",
    }
    print(f"device: {env['device_name']} ({device.type}); torch {env['torch']}, {env['torch_threads']} threads; "
          f"commit {(env['git_commit'] or '?')[:10]}")
    print(f"model: byte-level GPT, {args.layers} layers x {args.dim} wide, {setup['params']:,} parameters; "
          f"{args.steps} steps of {args.batch} x {args.seq} bytes; text: {len(text):,} bytes "
          f"({split:,} train, {len(text) - split:,} held out)")

    rows = []
    for i, name in enumerate(args.configs):
        print(f"[{i + 1}/{len(args.configs)}] {name}: {CONFIGS[name].description}", file=sys.stderr, flush=True)
        rows.append(run_config(CONFIGS[name], args, device, batches, held_out, raw_argv))
        if rows[-1]["status"] != "ok":
            print(f"  {rows[-1]['status']}: {rows[-1]['error']}", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["name"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        r["vs_baseline"] = versus(r, base) if base and r["status"] == "ok" else None
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    result = {"benchmark": "train", "environment": env, "setup": setup, "baseline": BASELINE,
              "wall_seconds": time.perf_counter() - started, "configs": rows,
              "targets": target_verdicts(rows, setup, device.type)}
    out = args.out or RESULTS / f"train_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    write_reports(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
