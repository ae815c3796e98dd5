"""Shared test utilities: the tolerances (stated once per mode) and same-gradient-stream drivers."""

from __future__ import annotations

import datetime
import os
import socket
import zlib

import torch

import fusedwarm
from fusedwarm import reference

OPTIMIZERS = ("AdamW", "SGD", "Lion")

# Typical hyperparameters per optimizer, with weight decay and momentum switched on.
HYPER = {
    "AdamW": dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1),
    "SGD": dict(lr=1e-2, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1),
}

# Relative tolerance on the master weight after 200 steps of the same gradient stream,
# max|fused - reference| / max|reference|, per (param dtype, extra_bits, state dtype).
# 16 extra bits + fp32 states is the float32 master itself: only fp32 rounding-order differences.
# Fewer bits / bf16 states add stochastic rounding noise of order one master ulp per step.
MASTER_RTOL = {
    (torch.float32, 16, torch.float32): 1e-6,
    (torch.bfloat16, 16, torch.float32): 1e-6,
    (torch.float16, 16, torch.float32): 1e-6,
    (torch.bfloat16, 16, torch.bfloat16): 2e-2,
    (torch.bfloat16, 8, torch.bfloat16): 2e-2,
    # No extra bits: the bfloat16 weight itself random-walks by about an ulp (2^-8 relative) per
    # step; over 200 SGD-momentum steps the largest deviation is 0.05-0.11 (measured, 45 runs).
    (torch.bfloat16, 0, torch.bfloat16): 2e-1,
    (torch.float16, 8, torch.bfloat16): 2e-2,
    (torch.float16, 0, torch.bfloat16): 5e-2,
}

# The modes above, in a stable order, and readable test ids for them ("bf16-x8-sbf16").
MODES = tuple(MASTER_RTOL)
_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def mode_id(mode) -> str:
    dtype, extra_bits, state_dtype = mode
    return f"{_SHORT[dtype]}-x{extra_bits}-s{_SHORT[state_dtype]}"


# Statistical tests: a sample mean must lie within SIGMAS standard errors of its expectation.
# The standard errors are computed from the stochastic-rounding variance, not fitted; 5 sigma
# makes a false alarm a < 1e-6 event per check.
SIGMAS = 5.0

# Statistical test of bfloat16 optimizer states: after 2000 AdamW steps with beta2 = 0.999, the
# mean over elements of |v_fused / v_reference - 1| (v = exp_avg_sq).
V_RTOL = 0.05

# Training test: final loss (mean over the last steps) relative to the reference's.
TRAIN_LOSS_RTOL = 0.01


def seed_all(*key) -> None:
    """Seeds torch's global generator from a readable key, so each test case gets its own stream."""
    torch.manual_seed(zlib.crc32(repr(key).encode()))


def round_nearest_away(master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`master` (float32) rounded to the nearest `dtype` value, ties away from zero.

    This is fusedwarm's rule for the visible weight (bits.cuh: ties go away from zero so the
    master split is invertible). torch's casts round ties to even, so the cast is corrected
    where the master lies exactly halfway between two `dtype` neighbours, a test done exactly in
    float64 (both neighbours and the master have at most 24 significant bits).
    """
    nearest_even = master.to(dtype)
    away = torch.nextafter(nearest_even, torch.where(master < 0, -torch.inf, torch.inf).to(dtype))
    tie = master.double() * 2 == nearest_even.double() + away.double()
    return torch.where(tie, away, nearest_even)


def make_pair(name: str, dtype: torch.dtype, shapes, extra_bits=16, state_dtype=None, seed=0, **overrides):
    """A fused optimizer and its float32 reference over identical fresh random parameters."""
    kw = {**HYPER[name], **overrides}
    init = [torch.randn(s) for s in shapes]
    # copy=True: for float32, .to() would return `t` itself and both optimizers would share storage.
    fused_params = [torch.nn.Parameter(t.to(dtype, copy=True)) for t in init]
    ref_params = [torch.nn.Parameter(t.to(dtype, copy=True)) for t in init]
    fused = getattr(fusedwarm, name)(fused_params, extra_bits=extra_bits, state_dtype=state_dtype, seed=seed, **kw)
    ref = getattr(reference, name)(ref_params, **kw)
    return fused, fused_params, ref, ref_params


def feed_same_grads(opts_and_params, steps: int, scale: float = 1.0, generator=None):
    """Runs `steps` steps, giving every optimizer the same fresh random gradient each step."""
    for _ in range(steps):
        first_params = opts_and_params[0][1]
        grads = [torch.randn(p.shape, generator=generator) * scale for p in first_params]
        for opt, params in opts_and_params:
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            opt.step()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


def free_port() -> int:
    """A TCP port that is free now, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo_worker(rank: int, world: int, port: int) -> None:
    """A spawned test worker's process group (gloo, localhost) on one CPU thread.

    CPU kernels may split their sums by thread count, so workers and references run on one thread.
    """
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
