"""Piecewise-affine arithmetic on float32 bit patterns, the reference definition (DESIGN.md layer 6).

Owns ``pam_mul``, ``pam_div``, ``pam_sqrt``, ``pam_exp2``, ``pam_log2`` and ``pam_matmul`` (Kosson
& Jaggi 2023): elementwise PyTorch functions on float32 tensors, written from the integer
definitions with their edge cases, that ``fusedwarm.pam`` and the kernels' ``pam.cuh`` are checked
against bit for bit. It must not know about optimizers, steps or per-step scalars (those live in
:mod:`fusedwarm.reference.optim`), and it must never import the compiled extension or any other
part of fusedwarm.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Kosson & Jaggi 2023, *Multiplication-Free Transformer Training via Piecewise Affine Operations*
# (after Mogami 2020), written from the definitions on float32 bit patterns held in int64 (so
# nothing wraps around): PAM(a, b) = A + B - 0x3F800000 on the magnitudes with the XOR sign,
# PAD(a, b) = A - B + 0x3F800000, PA-sqrt(a) = (A + 0x3F800000) >> 1, PA-exp2(x) = the bits
# 0x3F800000 + trunc(x 2^23), PA-log2(a) = (A - 0x3F800000) 2^-23. Subnormal inputs count as
# zero; results below the smallest normal flush to a signed zero, results past the largest finite
# value are a signed infinity; inf * 0, 0 / 0, inf / inf and sqrt/log2 of a negative number are
# NaN; NaN in gives NaN out; every NaN is 0x7FC00000.

_ONE = 0x3F800000
_MIN_NORMAL = 0x00800000
_INF = 0x7F800000
_NAN = 0x7FC00000
_SIGN = 0x80000000


def _to_bits(x: Tensor) -> Tensor:
    """float32 -> its bit pattern as a non-negative int64."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(bits: Tensor) -> Tensor:
    """A bit pattern in [0, 2^32) held in int64 -> float32."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _check_f32(name: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"reference.{name}: expected float32 tensors, got {t.dtype}")


def pam_mul(a: Tensor, b: Tensor) -> Tensor:
    """Piecewise-affine multiplication of float32 tensors (broadcast), Kosson & Jaggi 2023."""
    _check_f32("pam_mul", a, b)
    a, b = torch.broadcast_tensors(a, b)
    A, B = _to_bits(a), _to_bits(b)
    sign = (A ^ B) & _SIGN
    ma, mb = A & 0x7FFFFFFF, B & 0x7FFFFFFF
    total = ma + mb - _ONE
    mag = torch.where(total < _MIN_NORMAL, 0, torch.where(total >= _INF, _INF, total))
    zero = (ma < _MIN_NORMAL) | (mb < _MIN_NORMAL)
    inf = (ma == _INF) | (mb == _INF)
    nan = (ma > _INF) | (mb > _INF) | (inf & zero)
    mag = torch.where(inf, _INF, torch.where(zero, 0, mag))
    return _from_bits(torch.where(nan, _NAN, sign | mag))


def pam_div(a: Tensor, b: Tensor) -> Tensor:
    """Piecewise-affine division a / b of float32 tensors (broadcast), Kosson & Jaggi 2023."""
    # Spelled out like pam_mul on purpose: each op reads as its definition, with its own zero/inf/NaN rules.
    _check_f32("pam_div", a, b)
    a, b = torch.broadcast_tensors(a, b)
    A, B = _to_bits(a), _to_bits(b)
    sign = (A ^ B) & _SIGN
    ma, mb = A & 0x7FFFFFFF, B & 0x7FFFFFFF
    total = ma - mb + _ONE
    mag = torch.where(total < _MIN_NORMAL, 0, torch.where(total >= _INF, _INF, total))
    a_zero, b_zero = ma < _MIN_NORMAL, mb < _MIN_NORMAL
    a_inf, b_inf = ma == _INF, mb == _INF
    nan = (ma > _INF) | (mb > _INF) | (a_zero & b_zero) | (a_inf & b_inf)
    mag = torch.where(a_inf | b_zero, _INF, torch.where(a_zero | b_inf, 0, mag))
    return _from_bits(torch.where(nan, _NAN, sign | mag))


def pam_sqrt(a: Tensor) -> Tensor:
    """Piecewise-affine square root of a float32 tensor: the bit offset from 1.0 halved (floor)."""
    _check_f32("pam_sqrt", a)
    A = _to_bits(a)
    ma, sign = A & 0x7FFFFFFF, A & _SIGN
    zero = ma < _MIN_NORMAL
    nan = (ma > _INF) | ((sign != 0) & ~zero)
    out = torch.div(ma + _ONE, 2, rounding_mode="floor")
    out = torch.where(ma == _INF, _INF, torch.where(zero, sign, out))
    return _from_bits(torch.where(nan, _NAN, out))


def pam_exp2(x: Tensor) -> Tensor:
    """Piecewise-affine 2**x of a float32 tensor: 2^floor(x) (1 + frac(x)), from x 2^23 truncated."""
    _check_f32("pam_exp2", x)
    X = _to_bits(x)
    mx = X & 0x7FFFFFFF
    neg = (X & _SIGN) != 0
    normal = mx >= _MIN_NORMAL
    big = mx >= (127 + 7) << 23  # |x| >= 128
    # |x| 2^23 is exact in float64; truncating it is the fixed-point value of |x|.
    scaled = torch.where(normal & ~big, x.abs(), torch.zeros_like(x)).double() * 2.0**23
    fixed = torch.trunc(scaled).to(torch.int64)
    r = torch.where(neg, _ONE - fixed, _ONE + fixed)
    out = torch.where(r < _MIN_NORMAL, 0, r)
    out = torch.where(big, torch.where(neg, 0, _INF), out)
    return _from_bits(torch.where(mx > _INF, _NAN, out))


def pam_log2(a: Tensor) -> Tensor:
    """Piecewise-affine log2 of a float32 tensor: (A - 0x3F800000) 2^-23, i.e. exponent + mantissa."""
    _check_f32("pam_log2", a)
    A = _to_bits(a)
    ma, sign = A & 0x7FFFFFFF, A & _SIGN
    zero = ma < _MIN_NORMAL
    nan = (ma > _INF) | ((sign != 0) & ~zero)
    # The integer rounds once (to nearest even) on conversion; the power-of-two scale is exact.
    value = (ma - _ONE).to(torch.float32) * 2.0**-23
    out = _to_bits(value)
    out = torch.where(ma == _INF, _INF, torch.where(zero, _SIGN | _INF, out))
    return _from_bits(torch.where(nan, _NAN, out))


def pam_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Matrix product of 2-D float32 tensors with PAM products, summed strictly in order of k."""
    _check_f32("pam_matmul", a, b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"reference.pam_matmul: cannot multiply shapes {tuple(a.shape)} and {tuple(b.shape)}")
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for k in range(a.shape[1]):
        out = out + pam_mul(a[:, k:k + 1], b[k:k + 1, :])
    return out
