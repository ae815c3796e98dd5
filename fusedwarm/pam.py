"""Piecewise-affine, multiplication-free arithmetic (layer 5 of DESIGN.md).

The user-facing ops, their autograd formulas and :class:`Linear`; the bit-level rules run in the
extension (``pam.cuh``), never here, and the independent float32 reference of the same ops is
:mod:`fusedwarm.reference.pam`.

Kosson & Jaggi 2023, *Multiplication-Free Transformer Training via Piecewise Affine Operations*
(after Mogami 2020): a float32 multiply is replaced by one integer addition of the two bit
patterns. With ``A``, ``B`` the magnitude bit patterns of ``a``, ``b`` read as integers:

* ``mul``: PAM(a, b) = A + B - 0x3F800000, sign = XOR of the signs. For a = 2^Ea (1 + Ma),
  b = 2^Eb (1 + Mb): 2^(Ea+Eb) (1 + Ma + Mb) if Ma + Mb < 1, else 2^(Ea+Eb+1) (Ma + Mb).
  Relative error in [-1/9, 0]; exact when either operand is a power of two.
* ``div``: PAD(a, b) = A - B + 0x3F800000. Relative error in [0, 1/8].
* ``sqrt``: (A + 0x3F800000) >> 1, the integer offset from 1.0 halved (rounded down).
* ``exp2``: the bits 0x3F800000 + trunc(x 2^23), i.e. 2^floor(x) (1 + frac(x)).
* ``log2``: (A - 0x3F800000) 2^-23, i.e. Ea + Ma (the integer is rounded to float32 once).

Special cases are decided by integer checks: subnormal inputs count as zero; a zero operand gives
a zero with the XOR sign; results below the smallest normal flush to a signed zero; results past
the largest finite value become a signed infinity; ``inf * 0``, ``0 / 0``, ``inf / inf`` and
``sqrt``/``log2`` of a negative number give NaN; NaN in gives NaN out (always 0x7FC00000).

Inputs are float32, bfloat16 or float16 tensors (Python numbers are accepted as the other operand
of ``mul``/``div``); bfloat16/float16 inputs are converted to float32 exactly, computed in
float32, and the result is rounded to nearest back to the input dtype. Binary operations
broadcast like torch.

Derivatives (for autograd) are the exact function's derivatives evaluated with PA operations, as
in Kosson & Jaggi 2023 (not the derivatives of the piecewise-affine functions themselves):

* ``mul``: dL/da = PAM(g, b), dL/db = PAM(g, a).
* ``div`` (y = PAD(a, b)): dL/da = PAD(g, b), dL/db = -PAD(PAM(g, y), b).
* ``sqrt`` (y = PA-sqrt(a)): dL/da = PAD(g, PAM(2, y)) (PAM by 2 is exact).
* ``exp2`` (y = PA-exp2(x)): dL/dx = PAM(PAM(g, y), ln 2).
* ``log2``: dL/da = PAD(g, PAM(a, ln 2)).
* ``matmul`` (C = A B): dL/dA = matmul(G, B^T), dL/dB = matmul(A^T, G), again PAM products.

:func:`matmul` multiplies 2-D matrices with every product a PAM and every sum an ordinary float32
addition, accumulated strictly in order of k from 0.0, on CPU and CUDA alike (the two agree bit
for bit). :class:`Linear` is a drop-in :class:`torch.nn.Linear` built on it.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from . import _ops

__all__ = ["mul", "div", "sqrt", "exp2", "log2", "matmul", "Linear"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LN2 = math.log(2.0)
_autograd_registered = False


def _lib():
    """The compiled ops, with their PA derivatives registered once."""
    global _autograd_registered
    ops = _ops.load()
    if not _autograd_registered:
        _register_autograd(ops)
        _autograd_registered = True
    return ops


def _full(like: Tensor, value: float) -> Tensor:
    return torch.full_like(like, value, dtype=torch.float32)


def _register_autograd(ops) -> None:
    def save_inputs_and_output(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output)

    def mul_backward(ctx, g):
        a, b, _ = ctx.saved_tensors
        return (ops.pam_mul(g, b) if ctx.needs_input_grad[0] else None,
                ops.pam_mul(g, a) if ctx.needs_input_grad[1] else None)

    def div_backward(ctx, g):
        _, b, y = ctx.saved_tensors
        return (ops.pam_div(g, b) if ctx.needs_input_grad[0] else None,
                -ops.pam_div(ops.pam_mul(g, y), b) if ctx.needs_input_grad[1] else None)

    def sqrt_backward(ctx, g):
        _, y = ctx.saved_tensors
        return ops.pam_div(g, ops.pam_mul(_full(y, 2.0), y))

    def exp2_backward(ctx, g):
        _, y = ctx.saved_tensors
        return ops.pam_mul(ops.pam_mul(g, y), _full(y, _LN2))

    def log2_backward(ctx, g):
        a, _ = ctx.saved_tensors
        return ops.pam_div(g, ops.pam_mul(a, _full(a, _LN2)))

    def matmul_backward(ctx, g):
        a, b, _ = ctx.saved_tensors
        return (ops.pam_matmul(g, b.t()) if ctx.needs_input_grad[0] else None,
                ops.pam_matmul(a.t(), g) if ctx.needs_input_grad[1] else None)

    for name, backward in (("pam_mul", mul_backward), ("pam_div", div_backward), ("pam_sqrt", sqrt_backward),
                           ("pam_exp2", exp2_backward), ("pam_log2", log2_backward),
                           ("pam_matmul", matmul_backward)):
        torch.library.register_autograd(f"fusedwarm::{name}", backward, setup_context=save_inputs_and_output)


def _check_tensor(fn: str, name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"fusedwarm.pam.{fn}: {name} must be a tensor or a real number, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"fusedwarm.pam.{fn}: {name} has dtype {x.dtype}; expected float32, bfloat16 or float16")
    if x.layout != torch.strided:
        raise TypeError(f"fusedwarm.pam.{fn}: {name} has layout {x.layout}; only dense tensors are supported")


def _binary(fn: str, op_name: str, a: Tensor | float, b: Tensor | float) -> Tensor:
    if isinstance(a, Real) and not isinstance(a, bool) and isinstance(b, Tensor):
        a = torch.tensor(float(a), dtype=b.dtype, device=b.device)
    if isinstance(b, Real) and not isinstance(b, bool) and isinstance(a, Tensor):
        b = torch.tensor(float(b), dtype=a.dtype, device=a.device)
    _check_tensor(fn, "a", a)
    _check_tensor(fn, "b", b)
    if a.dtype != b.dtype:
        raise TypeError(f"fusedwarm.pam.{fn}: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"fusedwarm.pam.{fn}: a is on {a.device} but b is on {b.device}")
    try:
        a_b, b_b = torch.broadcast_tensors(a, b)
    except RuntimeError as err:
        raise ValueError(
            f"fusedwarm.pam.{fn}: shapes {tuple(a.shape)} and {tuple(b.shape)} do not broadcast"
        ) from err
    out = getattr(_lib(), op_name)(a_b.float().contiguous(), b_b.float().contiguous())
    return out.to(a.dtype)


def _unary(fn: str, op_name: str, a: Tensor) -> Tensor:
    _check_tensor(fn, "a", a)
    return getattr(_lib(), op_name)(a.float().contiguous()).to(a.dtype)


def mul(a: Tensor | float, b: Tensor | float) -> Tensor:
    """Piecewise-affine product PAM(a, b) (Kosson & Jaggi 2023), element-wise with broadcasting.

    Args:
        a: float32/bfloat16/float16 tensor, or a real number if ``b`` is a tensor.
        b: tensor of the same dtype and device as ``a``, or a real number.

    Returns:
        The broadcast PAM product in the inputs' dtype (computed in float32).
    """
    return _binary("mul", "pam_mul", a, b)


def div(a: Tensor | float, b: Tensor | float) -> Tensor:
    """Piecewise-affine quotient PAD(a, b) = a / b (Kosson & Jaggi 2023), element-wise.

    Args:
        a: dividend, float32/bfloat16/float16 tensor, or a real number if ``b`` is a tensor.
        b: divisor, tensor of the same dtype and device as ``a``, or a real number.

    Returns:
        The broadcast PAD quotient in the inputs' dtype (computed in float32).
    """
    return _binary("div", "pam_div", a, b)


def sqrt(a: Tensor) -> Tensor:
    """Piecewise-affine square root (Kosson & Jaggi 2023): the bit offset from 1.0 halved.

    Args:
        a: float32/bfloat16/float16 tensor.

    Returns:
        PA-sqrt of ``a`` in its dtype; NaN for negative nonzero elements, -0 for -0.
    """
    return _unary("sqrt", "pam_sqrt", a)


def exp2(a: Tensor) -> Tensor:
    """Piecewise-affine 2**a (Kosson & Jaggi 2023): 2^floor(a) (1 + frac(a)).

    Args:
        a: float32/bfloat16/float16 tensor.

    Returns:
        PA-exp2 of ``a`` in its dtype; 0 below 2^-126, inf from a = 128 on.
    """
    return _unary("exp2", "pam_exp2", a)


def log2(a: Tensor) -> Tensor:
    """Piecewise-affine log2 (Kosson & Jaggi 2023): exponent plus mantissa fraction of ``a``.

    Args:
        a: float32/bfloat16/float16 tensor.

    Returns:
        PA-log2 of ``a`` in its dtype; -inf for zeros and subnormals, NaN for negative numbers.
    """
    return _unary("log2", "pam_log2", a)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """Matrix product with piecewise-affine products (Kosson & Jaggi 2023).

    ``out[i, j] = (((0 + PAM(a[i,0], b[0,j])) + PAM(a[i,1], b[1,j])) + ...)`` in float32,
    summed strictly in order of k, identically on CPU and CUDA. Backward uses PAM products too.

    Args:
        a: 2-D tensor (M x K), float32/bfloat16/float16.
        b: 2-D tensor (K x N) of the same dtype and device.

    Returns:
        The M x N product in the inputs' dtype.
    """
    _check_tensor("matmul", "a", a)
    _check_tensor("matmul", "b", b)
    if a.dtype != b.dtype:
        raise TypeError(f"fusedwarm.pam.matmul: a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"fusedwarm.pam.matmul: a is on {a.device} but b is on {b.device}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"fusedwarm.pam.matmul: a and b must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"fusedwarm.pam.matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be multiplied "
            f"({a.shape[1]} != {b.shape[0]})"
        )
    return _lib().pam_matmul(a.float(), b.float()).to(a.dtype)


class Linear(torch.nn.Linear):
    """Drop-in :class:`torch.nn.Linear` whose products are PAMs (Kosson & Jaggi 2023).

    ``y = matmul(x, W^T) + bias`` with :func:`matmul`; the backward pass is
    ``dx = matmul(dy, W)``, ``dW = matmul(dy^T, x)`` (PAM products, float32 sums) and
    ``dbias = dy.sum(0)``. Same constructor, parameters and state dict as torch.nn.Linear.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: learn an additive bias.
        device, dtype: factory arguments of the parameters.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Applies the layer to ``x`` of shape ``(..., in_features)``; returns ``(..., out_features)``."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"fusedwarm.pam.Linear: input has shape {tuple(x.shape)}; expected last dimension {self.in_features}"
            )
        y = matmul(x.reshape(-1, self.in_features), self.weight.t())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)
