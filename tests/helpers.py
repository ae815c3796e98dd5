"""Shared test utilities: the tolerances (stated once per mode) and same-gradient-stream drivers."""

from __future__ import annotations

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
    (torch.bfloat16, 0, torch.bfloat16): 1e-1,
    (torch.float16, 8, torch.bfloat16): 2e-2,
    (torch.float16, 0, torch.bfloat16): 5e-2,
}


def make_pair(name: str, dtype: torch.dtype, shapes, extra_bits=16, state_dtype=None, seed=0, **overrides):
    """A fused optimizer and its float32 reference over identical fresh random parameters."""
    kw = {**HYPER[name], **overrides}
    init = [torch.randn(s) for s in shapes]
    fused_params = [torch.nn.Parameter(t.to(dtype)) for t in init]
    ref_params = [torch.nn.Parameter(t.to(dtype)) for t in init]
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
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())
