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
torch's update rule, so only the shared scheduler warms up) and bfloat16 states unless the
configuration's name says ``-q8``/``-q4``.

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
* block-quantized states (issue 16): ``fusedwarm-x8-q8-bs``, ``fusedwarm-x0-q8-bs``,
  ``fusedwarm-x8-q4-bs``, ``fusedwarm-x0-q4-bs`` and, without ``backward_step``, ``fusedwarm-x0-q8``,
  ``fusedwarm-x8-q8``, ``fusedwarm-x8-q4``: fusedwarm AdamW on bfloat16 weights with 8 or 0 extra bits
  and ``state_dtype="int8"`` (q8: a byte per moment and element, a float32 scale per 256 elements)
  or ``"int4"`` (q4: half a byte, a scale per 128), the default ``state_block``; tensors under
  4096 elements keep bfloat16 states. (No 16-extra-bit quantized configuration: the pattern
  ``fusedwarm-x16.*`` names the bfloat16-state ones.)
* peers, when importable: ``optimi-bf16`` (``optimi.AdamW(kahan_sum=True)`` on bfloat16 weights),
  ``torchao-8bit`` (``torchao.optim.AdamW8bit``, float32 weights + bf16 autocast),
  ``torchao-4bit`` (``torchao.optim.AdamW4bit``, the same with 4-bit states),
  ``torchao-bf16-sr`` (``torchao.optim._AdamW(bf16_stochastic_round=True)`` on bfloat16
  weights), ``bnb-8bit`` (``bitsandbytes.optim.AdamW8bit``, float32 weights + bf16 autocast;
  tensors under 4096 elements keep 32-bit states; bitsandbytes' ``PagedAdamW8bit`` is not a
  configuration: on the CPU it warns and falls back to ``AdamW8bit``'s unpaged states, so it would
  repeat ``bnb-8bit``). A peer that cannot be imported is listed as
  skipped with its ImportError; any configuration that raises while training (e.g. a CUDA-only
  kernel on the CPU) is listed as failed with the error's first line.

Configurations run one after another, each for the whole run. ``--seeds 0,1`` trains every
configuration once per seed (all seeds of a configuration, then the next configuration; the result
file is rewritten after each configuration); a seed draws the initial weights, the training and
held-out batches and fusedwarm's rounding stream.

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
* Persistent bytes: what the optimizer holds between steps at the end of training, by kind:
  fusedwarm's ``opt.state_bytes()`` (weights, extra bits, states, block scales, other), for torch
  and the peers the same kinds from their state tensors (their quantization scales inside
  "states"); gradients apart (the most gradient bytes alive at once, from the memory
  subprocess), and the training state of DESIGN.md's memory table: persistent bytes plus a full
  gradient set unless ``backward_step``.
* Loss: the training loss curve (the mean over each ``--log-every`` steps: smoothed), the final
  training loss (the last such mean), the held-out curve and the final held-out loss. With several
  seeds: each seed's numbers, their means (the table's held-out column and the comparison with the
  baseline: the ratio of the seed means), and mean curves in the plots.

**Targets** (issue 6), on a CUDA GPU at GPT-2-small scale (``--preset gpt2-small``):
``fusedwarm-x16-bs`` uses at least 40% less peak memory than ``torch-amp``, trains at least 1.15x
as many tokens per second, and ends with a held-out loss at most 1% above it. The result file
holds these three comparisons for every configuration against ``torch-amp``, with pass/fail
verdicts for the candidate on a GPU at that scale, and verdict null elsewhere (the CPU included).

Issue 16's targets, judged when the run has ``--seeds 0,1``: some AdamW configuration at most 4.1
bytes of training state per parameter (as above) with a seed-mean held-out loss at most 1% above
``torch-amp``'s seed mean, and ``fusedwarm-x8-q8-bs`` (8 extra bits, 8-bit states, about 5 bytes)
within 0.5%; the result file's ``quantized_targets`` holds them and the table states them.

Run from the repository root (matplotlib optional, for the plots; tqdm optional, for the bar)::

    PYTHONPATH=. python benchmarks/train.py                                # CPU, preset "small"
    PYTHONPATH=. python benchmarks/train.py --device cuda --preset gpt2-small
    PYTHONPATH=. python benchmarks/train.py --seeds 0,1 --configs 'torch-amp,fusedwarm-x(16|8|0)-bs,fusedwarm-x.*-q.*,torchao-.bit,bnb-8bit' --out benchmarks/results/train_cpu_quantized.json

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
from dataclasses import dataclass
from pathlib import Path

import torch

import fusedwarm
from models import ByteGPT, byte_loss, load_text, make_batches
from step import PEER_ADAMW, environment, first_line, git, sync
from train_loop import (CODE_PATHS, HYPER, MIB, Config, Run, measure_memory, memory_in_subprocess, mib,
                        tensor_bytes)
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
QUANT_BITS = {"int8": 8, "int4": 4}  # fusedwarm's block-quantized state dtypes: bits per code
QUANT_BLOCK = {"int8": 256, "int4": 128}  # fusedwarm's default state_block (elements per float32 scale)
MIN_QUANT_NUMEL = 4096  # smaller tensors keep unquantized states (fusedwarm, torchao and bitsandbytes alike)


@dataclass(frozen=True)
class TrainConfig(Config):
    """train_loop's Config plus fusedwarm's ``state_dtype`` (``"int8"``/``"int4"``: block-quantized
    states with the default ``state_block``; None: bfloat16 states)."""

    state_dtype: str | None = None


def moments_bytes(bits: int, block: int) -> float:
    """Bytes per parameter of two block-quantized moments: a ``bits``-bit code each plus a float32
    scale per ``block`` elements each."""
    return 2 * (bits / 8 + 4 / block)


def fusedwarm_config(bits: int, bs: bool, quant: str | None) -> TrainConfig:
    """fusedwarm AdamW on bf16 weights with ``bits`` extra bits, ``backward_step=bs`` and bf16 states
    (``quant`` None) or block-quantized ``quant`` states."""
    name = f"fusedwarm-x{bits}" + (f"-q{QUANT_BITS[quant]}" if quant else "") + ("-bs" if bs else "")
    states = f"{quant} block-quantized states" if quant else "bf16 states"
    moments = moments_bytes(QUANT_BITS[quant], QUANT_BLOCK[quant]) if quant else 4
    return TrainConfig(name, f"fusedwarm AdamW, bf16 weights, {bits} extra bits, {states}"
                       + (", backward_step" if bs else ""), BF16, extra_bits=bits, backward_step=bs,
                       design_bytes=2 + bits / 8 + (0 if bs else 2) + moments, state_dtype=quant)


# design_bytes: weight + extra bits + gradient + moments per parameter, as in shared/DESIGN.md's table
# (with backward_step no gradient set is held; optimi's Kahan compensation: 2 bytes, in the place of the
# extra bits). Quantized moments count their codes (8-bit: 1 byte, 4-bit: 0.5 byte each) plus a float32
# scale per block (fusedwarm and torchao: 256 elements for 8-bit, 128 for 4-bit; bitsandbytes: 256);
# tensors under 4096 elements, which keep unquantized states, are not in this figure.
DESIGN_NOTE = ("weight + extra bits + gradient + moments, as in DESIGN.md's memory table; quantized moments "
               "count their codes (8-bit: 1 byte, 4-bit: 0.5 byte each) plus a float32 scale per block "
               "(256 elements for 8-bit, 128 for 4-bit); tensors under 4,096 elements keep unquantized "
               "states and are not in this figure")
# How the tables of result files written before DESIGN_NOTE described their expected figure.
LEGACY_DESIGN_NOTE = ("with DESIGN.md's weight + extra bits + gradient + moments in parentheses (8-bit states: 1 byte "
                      "each, scales not counted)")
CONFIGS = {c.name: c for c in (
    TrainConfig("torch-amp", "torch AdamW, fp32 weights, bf16 autocast", FP32, autocast=True, design_bytes=16),
    TrainConfig("torch-bf16", "torch AdamW, bf16 weights and states, no master copy", BF16, design_bytes=8),
    *(fusedwarm_config(bits, bs, None) for bits in (16, 8, 0) for bs in (False, True)),
    # Quantized states, in backward first (what issue 16's targets are about; a run cut short keeps them).
    # No 16-extra-bit variant: "fusedwarm-x16.*" names the bf16-state configurations (tests rely on it).
    *(fusedwarm_config(bits, bs, quant) for bits, quant, bs in (
        (8, "int8", True), (0, "int8", True), (8, "int4", True), (0, "int4", True),
        (0, "int8", False), (8, "int8", False), (8, "int4", False))),
    TrainConfig("optimi-bf16", "optimi AdamW, bf16 weights and states, Kahan summation", BF16, design_bytes=10),
    TrainConfig("torchao-8bit", "torchao AdamW8bit, fp32 weights, bf16 autocast, 8-bit states", FP32,
                autocast=True, design_bytes=8 + moments_bytes(8, 256)),
    TrainConfig("torchao-4bit", "torchao AdamW4bit, fp32 weights, bf16 autocast, 4-bit states", FP32,
                autocast=True, design_bytes=8 + moments_bytes(4, 128)),
    TrainConfig("torchao-bf16-sr", "torchao AdamW, bf16 weights and states, stochastic rounding", BF16,
                design_bytes=8),
    TrainConfig("bnb-8bit", "bitsandbytes AdamW8bit, fp32 weights, bf16 autocast, 8-bit states", FP32,
                autocast=True, design_bytes=8 + moments_bytes(8, 256)),
)}


# Peer configurations: name -> the other library's AdamW (benchmarks/step.py's PEER_ADAMW).
PEERS = {"optimi-bf16": PEER_ADAMW["optimi kahan"], "torchao-8bit": PEER_ADAMW["torchao 8bit"],
         "torchao-4bit": PEER_ADAMW["torchao 4bit"], "torchao-bf16-sr": PEER_ADAMW["torchao bf16 sr"],
         "bnb-8bit": PEER_ADAMW["bnb 8bit"]}


def make_optimizer(config: Config, params: list[torch.nn.Parameter], args: argparse.Namespace) -> tuple[
        torch.optim.Optimizer, str]:
    """The configuration's optimizer and its description: train_loop's for torch and fusedwarm with
    bf16 states (fusedwarm with ``warmup="none"``), fusedwarm with block-quantized states here, the
    peer library's otherwise; same lr and HYPER."""
    peer = PEERS.get(config.name)
    if peer is not None:
        return peer.build(importlib.import_module(peer.module), params, dict(lr=args.lr, **HYPER)), peer.description
    quant = getattr(config, "state_dtype", None)
    if quant is None:
        return loop_optimizer(config, params, args)
    opt = fusedwarm.AdamW(params, lr=args.lr, **HYPER, extra_bits=config.extra_bits, state_dtype=quant,
                          seed=args.seed, backward_step=config.backward_step, bucket_cap_mb=args.bucket_cap_mb,
                          warmup="none")
    impl = f"fusedwarm.AdamW(extra_bits={config.extra_bits}, state_dtype={quant}, state_block={QUANT_BLOCK[quant]}"
    impl += f", backward_step=True, bucket_cap_mb={args.bucket_cap_mb:g})" if config.backward_step else ")"
    return opt, impl


def persistent_bytes(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict:
    """Persistent training-state bytes by kind (gradients not included): fusedwarm's own
    ``opt.state_bytes()``; for other optimizers the same kinds from their tensors (weights, ``step``
    counters as "other", every other state tensor as "states", the inner tensors of quantized
    state subclasses included, so torchao's and bitsandbytes' scales and maps are in "states")."""
    if hasattr(opt, "state_bytes"):
        out = {k: int(v) for k, v in opt.state_bytes().items()}
        out.setdefault("scales", 0)  # before fusedwarm reported scales apart from the codes
        return {**out, "source": "opt.state_bytes()"}
    steps = [t for s in opt.state.values() for k, t in s.items() if k == "step" and isinstance(t, torch.Tensor)]
    other = [t for s in opt.state.values() for k, t in s.items() if k != "step" and isinstance(t, torch.Tensor)]
    out = {"weights": tensor_bytes(params), "extra_bits": 0, "states": tensor_bytes(other), "scales": 0,
           "other": tensor_bytes(steps)}
    out["total"] = sum(out.values())
    return {**out, "source": "tensor accounting (no state_bytes())"}


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
        "persistent_bytes": persistent_bytes(run.opt, run.params),
    }
    if device.type == "cuda":
        out["cuda_allocated_at_start_bytes"] = start_bytes
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def eval_points(steps: int, evals: int) -> list[int]:
    """``evals`` evenly spaced steps at which the held-out loss is measured, the last one ``steps``."""
    return sorted({round(k * steps / evals) for k in range(1, evals + 1)})


def run_config(config: Config, args: argparse.Namespace, device: torch.device, batches: DeviceBatches,
               held_out: list[tuple[torch.Tensor, torch.Tensor]], argv: list[str], memory: dict | None = None) -> dict:
    """One configuration's result row: trained in this process, then its memory measured in a fresh
    one (or ``memory``, that measurement from an earlier seed's run: it does not depend on the seed)."""
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
    if memory is not None:
        row["memory"] = memory
    elif not args.no_memory:
        row["memory"] = memory_in_subprocess(config.name, argv, Path(__file__))
    memory = row.get("memory", {})
    row["peak_memory_bytes"] = (row["cuda_max_allocated_bytes"] if device.type == "cuda"
                                else memory.get("peak_storage_bytes"))
    if "peak_storage_bytes" in memory:
        row["peak_storage_bytes_per_param"] = memory["peak_storage_bytes"] / row["params"]
    persistent = row["persistent_bytes"]
    # DESIGN.md's training state: the persistent bytes plus a full gradient set (as many bytes as the
    # weights), which backward_step never holds (its gradients live a bucket at a time).
    row["training_state_bytes_per_param"] = (
        persistent["total"] + (0 if config.backward_step else persistent["weights"])) / row["params"]
    return row


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def aggregate(runs: list[dict], seeds: list[int]) -> dict:
    """One configuration's row over ``seeds``: its runs (one per seed, same order), with the seed
    means of tokens/s, losses and loss curves in the single-seed row's keys, and each seed's own
    numbers under ``per_seed``; not ok when any seed's run was not."""
    bad = next((r for r in runs if r["status"] != "ok"), None)
    if bad is not None:
        return {**bad, "per_seed": [{"seed": s, "status": r["status"], "error": r["error"]} for s, r in zip(seeds, runs)]}
    row = dict(runs[0])
    for key in ("tokens_per_s", "final_train_loss", "held_out_loss", "timed_seconds"):
        row[key] = mean([r[key] for r in runs])
    for curve in ("loss_curve", "held_out_curve"):
        row[curve] = {"step": runs[0][curve]["step"],
                      "loss": [mean(values) for values in zip(*(r[curve]["loss"] for r in runs))]}
    row["per_seed"] = [{"seed": s, **{k: r[k] for k in ("tokens_per_s", "final_train_loss", "held_out_loss",
                                                      "loss_curve", "held_out_curve", "persistent_bytes")}}
                       for s, r in zip(seeds, runs)]
    return row


# ---- comparisons --------------------------------------------------------------------------------


def versus(row: dict, base: dict) -> dict:
    """``row`` against the baseline row: memory saving (1 - peak / baseline peak), speed ratio
    (tokens/s over the baseline's) and held-out loss ratio; None where a number is missing."""
    def ratio(key: str) -> float | None:
        a, b = row.get(key), base.get(key)
        return a / b if a is not None and b else None

    memory = ratio("peak_memory_bytes")
    out = {"memory_saving": None if memory is None else 1 - memory, "speed_ratio": ratio("tokens_per_s"),
           "held_out_ratio": ratio("held_out_loss")}
    if "per_seed" in row and "per_seed" in base:  # held_out_ratio is then the ratio of the seed means
        out["held_out_ratio_per_seed"] = [r["held_out_loss"] / b["held_out_loss"]
                                          for r, b in zip(row["per_seed"], base["per_seed"])]
    return out


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


# Issue 16's targets, held-out loss as the seed mean against BASELINE's seed mean (seeds 0 and 1):
# some AdamW configuration with at most COMPACT_BYTES bytes of training state per parameter within
# 1%, and fusedwarm with 8 extra bits and 8-bit states in backward (about 5 bytes) within 0.5%.
QUANT_TARGETS = {"compact": {"max_bytes_per_param": 4.1, "held_out_ratio": 1.01},
                 "x8_q8": {"configs": ["fusedwarm-x8-q8-bs", "fusedwarm-x8-q8"], "held_out_ratio": 1.005}}
QUANT_TARGET_SEEDS = [0, 1]


def quant_target_verdicts(rows: list[dict], seeds: list[int]) -> dict:
    """Issue 16's targets over the configurations that ran (see QUANT_TARGETS): every configuration
    within the byte budget with its seed-mean held-out ratio, and the 8-extra-bit 8-bit-state one;
    ``met`` is None when nothing qualifies or the seeds are not QUANT_TARGET_SEEDS."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("vs_baseline") and "training_state_bytes_per_param" in r]
    seeds_ok = sorted(seeds) == QUANT_TARGET_SEEDS
    compact = QUANT_TARGETS["compact"]
    within = [{"config": r["name"], "bytes_per_param": r["training_state_bytes_per_param"],
               "held_out_ratio": r["vs_baseline"]["held_out_ratio"],
               "met": r["vs_baseline"]["held_out_ratio"] <= compact["held_out_ratio"]}
              for r in ok if r["training_state_bytes_per_param"] <= compact["max_bytes_per_param"]]
    out = {"seeds": seeds, "seeds_as_specified": seeds_ok,
           "bytes_measure": "persistent training state (weights + extra bits + states + scales + step counters, "
                            "fusedwarm's opt.state_bytes()) plus a full gradient set unless backward_step",
           "compact": {**compact, "configs": within,
                       "met": (any(c["met"] for c in within) if within else None) if seeds_ok else None}}
    x8 = QUANT_TARGETS["x8_q8"]
    cand = next((r for name in x8["configs"] for r in ok if r["name"] == name), None)
    out["x8_q8"] = {"held_out_ratio_target": x8["held_out_ratio"], "config": None, "met": None}
    if cand is not None:
        ratio = cand["vs_baseline"]["held_out_ratio"]
        out["x8_q8"].update(config=cand["name"], bytes_per_param=cand["training_state_bytes_per_param"],
                            held_out_ratio=ratio, met=ratio <= x8["held_out_ratio"] if seeds_ok else None)
    return out


# ---- reports ------------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else fmt.format(value)


def persistent_cell(r: dict) -> str:
    """weights + extra bits + states + scales (+ other) = total, bytes per parameter."""
    pb, n = r["persistent_bytes"], r["params"]
    parts = " + ".join(f"{pb[k] / n:.2f}" for k in ("weights", "extra_bits", "states", "scales"))
    return f"{parts} = {pb['total'] / n:.2f}"


def design_cell(value: float | None) -> str:
    return "–" if value is None else f"{round(value, 2):g}"


def render_markdown(result: dict) -> str:
    """The result file ``result`` (as written by ``main``) as a markdown table with a short header,
    the target comparisons and notes; ``benchmarks/report.py`` can embed its ``.md`` in the README.
    A several-seed result shows each seed's held-out loss and their mean; a result with persistent
    byte counts shows them and the gradients apart."""
    env, setup, base = result["environment"], result["setup"], result["baseline"]
    cuda = env["device_type"] == "cuda"
    seeds = setup.get("seeds", [setup["seed"]])
    multi = len(seeds) > 1
    persistent = any("persistent_bytes" in r for r in result["configs"])
    code = [p.split()[-1] for p in env.get("uncommitted_paths", []) if p.split()[-1].startswith(CODE_PATHS)]
    dirty = f" + uncommitted changes to {', '.join(code)}" if code else ""
    lines = [
        (f"Training benchmark ({env['device_name']}, {env['torch_threads']} threads, torch {env['torch']}, "
         f"commit {(env['git_commit'] or '?')[:10]}{dirty}): byte-level GPT, {setup['layers']} layers, width "
         f"{setup['dim']}, {setup['heads']} heads, {setup['params']:,} parameters; {setup['steps']} steps of "
         f"{setup['batch']} x {setup['seq']} bytes of stdlib source; AdamW lr {setup['lr']:g} (linear warmup "
         f"{setup['lr_warmup']} steps, cosine to {setup['final_lr_fraction']:g} x), betas {tuple(setup['betas'])}, "
         f"weight decay {setup['weight_decay']}; fusedwarm bucket cap {setup['bucket_cap_mb']:g} MiB"
         + (f"; seeds {', '.join(map(str, seeds))}, every configuration trained once per seed." if multi else ".")),
        "",
    ]
    peak = "CUDA max allocated MiB" if cuda else "peak params+grads+state MiB"
    head = ["config", "optimizer", peak, f"vs {base}"]
    head += ["params+grads+state MiB"] if cuda else []
    head += ["peak bytes / param (expected)" if persistent else "bytes / param (expected)"]
    if persistent:
        head += ["persistent bytes / param: weights + extra + states + scales = total", "grads bytes / param, peak",
                 "training state bytes / param"]
    head += [] if multi else ["peak RSS MiB"]
    head += ["tokens / s" + (" (mean)" if multi else ""), f"vs {base}"]
    if multi:
        head += [f"held-out loss, seed {s}" for s in seeds] + ["held-out loss, mean", f"vs {base} (mean)"]
    else:
        head += ["final train loss", "held-out loss", f"vs {base}"]
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
        cells.append(_cell(r.get("peak_storage_bytes_per_param"), "{:.2f}")
                     + f" ({design_cell(r['design_bytes_per_param'])})")
        if persistent:
            cells += [persistent_cell(r) if "persistent_bytes" in r else "–",
                      _cell(mem["peak_grad_bytes"] / r["params"] if "peak_grad_bytes" in mem else None, "{:.2f}"),
                      _cell(r.get("training_state_bytes_per_param"), "{:.2f}")]
        if not multi:
            cells.append(mib(mem["peak_rss_bytes"]) if "peak_rss_bytes" in mem else "–")
        cells += [f"{r['tokens_per_s']:,.0f}", _cell(vs.get("speed_ratio"), "{:.2f}x")]
        if multi:
            cells += [_cell(s["held_out_loss"], "{:.4f}") for s in r["per_seed"]]
        else:
            cells.append(_cell(r["final_train_loss"], "{:.4f}"))
        cells += [_cell(r["held_out_loss"], "{:.4f}"),
                  _cell(None if vs.get("held_out_ratio") is None else vs["held_out_ratio"] - 1, "{:+.2%}")]
        lines.append("| " + " | ".join(cells) + " |")

    failed = [f"`{r['name']}`: {r['memory']['error']}" for r in result["configs"] if "error" in r.get("memory", {})]
    if failed:
        lines += ["", "Memory measurement failed for " + "; ".join(failed) + "."]
    q = result.get("quantized_targets")
    if q:
        lines += ["", quant_target_text(q)]
    t = result["targets"]
    if t.get("memory_saving"):
        def part(key: str, what: str, fmt: str) -> str:
            item = t[key]
            verdict = "" if item["met"] is None else (" **PASS**" if item["met"] else " **FAIL**")
            bound = "≤" if key == "held_out_ratio" else "≥"
            return f"{what} {_cell(item['value'], fmt)} (target {bound} {fmt.format(item['target'])}){verdict}"

        lines += ["", (f"Issue 6's targets, `{t['candidate']}` vs `{t['baseline']}`"
                       + (" (seed means)" if multi else "") + ": "
                       + "; ".join([part("memory_saving", "peak memory saving", "{:.0%}"),
                                    part("speed_ratio", "tokens/s ratio", "{:.2f}x"),
                                    part("held_out_ratio", "held-out loss ratio", "{:.4f}")])
                       + (f". Overall: **{'PASS' if t['all_met'] else 'FAIL'}**." if t["applies"] else
                          f". The targets are for a CUDA GPU at GPT-2-small scale; this is {t['why_not']}, "
                          "so the comparison is reported without a verdict."))]
        if not multi and not persistent:  # the wording of the result files this table was first made for
            lines[-1] = lines[-1].replace("Issue 6's targets", "Targets", 1)
    note = setup.get("design_bytes_note")
    expected = f"with the expected figure ({note}) in parentheses" if note else LEGACY_DESIGN_NOTE
    lines += ["", (f"Tokens / s over steps {setup['warmup'] + 1}–{setup['steps']} (the first {setup['warmup']} "
                   "untimed), held-out evaluations excluded"
                   + (", CUDA-synchronized" if cuda else "") + (", mean over the seeds" if multi else "") + ". "
                   + ("Peak memory: `torch.cuda.max_memory_allocated` over the training run (everything, "
                      "activations included). " if cuda else "Peak memory: ")
                   + "params+grads+state: storage accounting of parameters, live `.grad` tensors and optimizer "
                     "state tensors, sampled in post-accumulate-grad hooks and after backward, step and zero_grad, "
                     f"in a fresh process per config; {'peak ' if persistent else ''}bytes / param is that peak over "
                     f"the parameter count, {expected}. "
                   + ("Persistent bytes / param: what the optimizer keeps between steps at the end of training, "
                      "from fusedwarm's `opt.state_bytes()` (torch and the peers: the same kinds counted from their "
                      "state tensors, where the peers' quantization scales and maps are inside the states figure; "
                      "the step counters are in the total only). Grads, peak: the most gradient bytes alive at "
                      "once (a full set, or about a bucket with backward_step). Training state: persistent + a full "
                      "gradient set unless backward_step, DESIGN.md's memory-table measure. "
                      if persistent else "")
                   + ("" if multi else "Peak RSS: that process's peak resident set size (libraries included). "
                      f"Final train loss: mean of the last {setup['log_every']} steps' losses (the loss curve is "
                      "smoothed the same way). ")
                   + f"Held-out loss: mean cross-entropy (nats/byte) over {setup['held_out_tokens']:,} bytes "
                     "from the last 10% of the text, never trained on"
                   + ("; each seed draws its own initial weights, training batches, held-out batches and "
                      "rounding stream, and vs the baseline compares the seed means. " if multi else ". ")
                   + "Every config starts from the same weights and sees the same batches"
                   + (" as the others of its seed." if multi else "."))]
    return "\n".join(lines)


def quant_target_text(q: dict) -> str:
    """Issue 16's target verdicts (``quantized_targets`` of a several-seed result) as a paragraph."""
    compact, x8 = q["compact"], q["x8_q8"]

    def verdict(met: bool | None) -> str:
        return "no verdict" if met is None else ("**met**" if met else "**not met**")

    within = ", ".join(f"`{c['config']}` {c['bytes_per_param']:.2f} B/param, {c['held_out_ratio'] - 1:+.2%}"
                       for c in compact["configs"]) or "none ran"
    text = (f"Issue 16's targets (held-out loss, mean over seeds {', '.join(map(str, q['seeds']))}, against the "
            f"baseline's mean; bytes: {q['bytes_measure']}): an AdamW configuration at ≤ "
            f"{compact['max_bytes_per_param']:g} bytes/param with a held-out loss at most "
            f"{compact['held_out_ratio'] - 1:.0%} above the baseline's: "
            f"{verdict(compact['met'])} (configurations within the byte budget: {within}); ")
    if x8["config"] is None:
        text += "8 extra bits + 8-bit states within 0.5%: not run"
    else:
        text += (f"8 extra bits + 8-bit states (`{x8['config']}`, {x8['bytes_per_param']:.2f} B/param) at most "
                 f"{x8['held_out_ratio_target'] - 1:.1%} above: {verdict(x8['met'])} "
                 f"({x8['held_out_ratio'] - 1:+.2%})")
    if not q["seeds_as_specified"]:
        text += f"; the targets are stated for seeds {QUANT_TARGET_SEEDS}, so no verdict"
    return text + "."


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
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds, e.g. 0,1: every configuration is trained once per seed (all "
                             "configurations for the first seed, then for the next); the table reports each seed's "
                             "held-out loss, their mean and the mean's ratio to the baseline's mean, and issue 16's "
                             "targets (seeds 0 and 1). Overrides --seed; memory is measured once per configuration")
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
    try:
        args.seeds = [args.seed] if args.seeds is None else [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds must name at least one seed, each once")
    args.seed = args.seeds[0]
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


def assemble(env: dict, setup: dict, runs: dict[str, list[dict]], seeds: list[int], started: float,
             device: torch.device) -> dict:
    """The result file's content from each configuration's runs (one per seed, in ``seeds`` order):
    one seed's rows as they are, several seeds' aggregated (seed means, per-seed numbers under
    ``per_seed``)."""
    rows = [(runs_[0] if len(seeds) == 1 else aggregate(runs_, seeds)) for runs_ in runs.values()]
    base = next((r for r in rows if r["name"] == BASELINE and r["status"] == "ok"), None)
    for r in rows:
        r["vs_baseline"] = versus(r, base) if base and r["status"] == "ok" else None
    result = {"benchmark": "train", "environment": env, "setup": {**setup, "seeds": seeds}, "baseline": BASELINE,
              "wall_seconds": time.perf_counter() - started, "configs": rows,
              "targets": target_verdicts(rows, setup, device.type)}
    if len(seeds) > 1:
        result["quantized_targets"] = quant_target_verdicts(rows, seeds)
    return result


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
    with torch.device("meta"):
        model = ByteGPT(args.layers, args.dim, args.heads, args.seq, args.tie)
    setup = {
        "preset": args.preset, "layers": args.layers, "dim": args.dim, "heads": args.heads, "seq": args.seq,
        "batch": args.batch, "tie": args.tie, "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": args.batch * args.seq, "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
        "lr_schedule": "LambdaLR: linear warmup from lr/lr_warmup to lr, then cosine to final_lr_fraction x lr",
        "lr_warmup": args.lr_warmup, "final_lr_fraction": FINAL_LR_FRACTION, "betas": list(HYPER["betas"]),
        "eps": HYPER["eps"], "weight_decay": HYPER["weight_decay"], "grad_clipping": None,
        "bucket_cap_mb": args.bucket_cap_mb, "seed": args.seed, "seeds": args.seeds,
        "eval_steps": eval_points(args.steps, args.evals),
        "eval_batches": args.eval_batches, "held_out_tokens": args.eval_batches * args.batch * args.seq,
        "log_every": args.log_every,
        "loss_curve": "mean training loss of the log_every steps ending at each logged step",
        "text_bytes": len(text), "train_bytes": split, "held_out_bytes": len(text) - split,
        "text_source": f"{os.path.dirname(os.__file__)}/*.py, sorted: {files[0]} .. {files[-1]} ({len(files)} files)",
        "seed_use": "each seed draws the initial weights, the training batches, the held-out batches (seed + 1) and "
                    "fusedwarm's rounding stream",
        "design_bytes_note": DESIGN_NOTE,
    }
    print(f"device: {env['device_name']} ({device.type}); torch {env['torch']}, {env['torch_threads']} threads; "
          f"commit {(env['git_commit'] or '?')[:10]}")
    print(f"model: byte-level GPT, {args.layers} layers x {args.dim} wide, {setup['params']:,} parameters; "
          f"{args.steps} steps of {args.batch} x {args.seq} bytes; text: {len(text):,} bytes "
          f"({split:,} train, {len(text) - split:,} held out)")

    out = args.out or RESULTS / f"train_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {seed: (DeviceBatches(make_batches(text[:split], args.steps, args.batch, args.seq, seed, host), device),
                   make_batches(text[split:], args.eval_batches, args.batch, args.seq, seed + 1, host))
            for seed in args.seeds}
    runs: dict[str, list[dict]] = {}
    total = len(args.configs) * len(args.seeds)
    for i, name in enumerate(args.configs):  # every seed of a configuration, then the next configuration
        runs[name] = []
        for k, seed in enumerate(args.seeds):
            args.seed = seed
            print(f"[{i * len(args.seeds) + k + 1}/{total}] {name}, seed {seed}: {CONFIGS[name].description}",
                  file=sys.stderr, flush=True)
            memory = runs[name][0].get("memory") if runs[name] else None
            runs[name].append(run_config(CONFIGS[name], args, device, *data[seed], raw_argv, memory))
            if runs[name][-1]["status"] != "ok":
                print(f"  {runs[name][-1]['status']}: {runs[name][-1]['error']}", file=sys.stderr, flush=True)
        # Written after every configuration, so that an interrupted run keeps the configurations it finished.
        out.write_text(json.dumps(assemble(env, setup, runs, args.seeds, started, device), indent=1) + "\n")
    env["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.seed = args.seeds[0]
    result = assemble(env, setup, runs, args.seeds, started, device)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    write_reports(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
