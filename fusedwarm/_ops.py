"""Loads the compiled operators and registers their fake (meta) kernels for torch.compile.

The fake kernels only describe outputs (shapes, dtypes) and never compute; the operators'
schemas and kernels are ``csrc/ops.cpp``'s, and building is :mod:`fusedwarm._build`'s.
"""

from __future__ import annotations

import torch

from . import _build

_registered = False


def load() -> torch._ops._OpNamespace:
    """Builds/loads the extension on first call and returns ``torch.ops.fusedwarm``."""
    global _registered
    if not _registered:
        _build.build()
        _register_fakes()
        _registered = True
    return torch.ops.fusedwarm


def _register_fakes() -> None:
    def _mutating_step(*args, **kwargs):
        return None

    for name in ("adamw_", "sgd_", "lion_"):
        torch.library.register_fake(f"fusedwarm::{name}")(_mutating_step)

    @torch.library.register_fake("fusedwarm::master_weight")
    def _master_weight(param, extra, extra_bits):
        return torch.empty_like(param, dtype=torch.float32)

    @torch.library.register_fake("fusedwarm::master_split")
    def _master_split(master, dtype, extra_bits):
        extra_dtype = torch.int16 if extra_bits == 16 else torch.int8
        extra = master.new_empty(master.shape if extra_bits else (0,), dtype=extra_dtype)
        return torch.empty_like(master, dtype=dtype, memory_format=torch.contiguous_format), extra

    @torch.library.register_fake("fusedwarm::quantize_states")
    def _quantize_states(values, words, bits, is_signed, block):
        n = values.numel()
        return (values.new_empty((n if bits == 8 else (n + 1) // 2,), dtype=torch.uint8),
                values.new_empty(((n + block - 1) // block,), dtype=torch.float32))

    @torch.library.register_fake("fusedwarm::dequantize_states")
    def _dequantize_states(codes, scales, numel, bits, is_signed, block):
        return scales.new_empty((numel,), dtype=torch.float32)

    @torch.library.register_fake("fusedwarm::schedule_factors")
    def _schedule_factors(steps, beta2, *schedule):
        return steps.new_empty((*steps.shape, 4), dtype=torch.float32)

    @torch.library.register_fake("fusedwarm::schedule_math")
    def _schedule_math(x, fn):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fusedwarm::philox4x32")
    def _philox(counters, key):
        return torch.empty_like(counters)

    def _pam_elementwise(a, b=None):
        return torch.empty_like(a, memory_format=torch.contiguous_format)

    for name in ("pam_mul", "pam_div", "pam_sqrt", "pam_exp2", "pam_log2"):
        torch.library.register_fake(f"fusedwarm::{name}")(_pam_elementwise)

    @torch.library.register_fake("fusedwarm::pam_matmul")
    def _pam_matmul(a, b):
        torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0],
                     lambda: f"fusedwarm.pam_matmul: cannot multiply shapes {tuple(a.shape)} and {tuple(b.shape)}")
        return a.new_empty((a.shape[0], b.shape[1]))
