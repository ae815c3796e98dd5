"""The float32 reference (layer 6 of DESIGN.md): optimizers, warmup, schedules, update-size control, PA arithmetic.

Plain PyTorch, written to read like the papers' equations: every parameter gets a float32
master copy and float32 states, the update is computed on the master, and the parameter (of
any dtype) is set to the master rounded to nearest. Everything fusedwarm computes is tested
against this package. It never imports the compiled extension, nor any part of fusedwarm outside
it; its modules are :mod:`.optim` (the optimizers), :mod:`.schedules`, :mod:`.control`,
:mod:`.pam` and :mod:`.quant`, and every public name is re-exported here.

The constructors take the same arguments as :mod:`fusedwarm.optim` so tests can swap one class
for the other; ``extra_bits``, ``state_dtype`` and ``seed`` are accepted and, except for quantized
states, ignored, since the reference keeps everything in float32 and rounds nothing. Like the fused
optimizers, an element whose gradient is not finite is left untouched.

Block-quantized states (issue 16; :mod:`.quant`): ``state_dtype="int8"`` or ``"int4"`` (with
``state_block``, a power of two from 32 to 2048, by default 256 for 8 bits and 128 for 4) keeps the
states of every parameter of at least ``QUANT_MIN_NUMEL`` (4096) elements as one code per element
and one float32 scale per block of consecutive elements (Dettmers et al. 2022, *8-bit Optimizers via
Block-wise Quantization*), smaller parameters keeping float32 states. First moments and momentum use
signed codes (E4M3, or E2M1 whose grid is the OCP MX FP4 grid over 4), AdamW's second moment
unsigned ones (E5M3, E3M1) that never round a nonzero value to zero (Li et al. 2023, *Memory
Efficient Optimizers with 4-bit States*). Each step decodes the states, runs the rule in float32 and
encodes them with stochastic rounding; the random words are fusedwarm's (:func:`element_words`,
:func:`state_words`: the parameter's index in the optimizer, the step and ``seed``, which is then
required), so the fused kernels can be checked bit for bit (:func:`quantize_block`,
:func:`dequantize`). A block holding a non-finite gradient is left untouched as a whole: master,
codes and scale.

Warmup and schedules follow the papers' formulas in float64 (update ``t = 1, 2, ...`` uses
``lr * warmup(t) * schedule(t)``; see :func:`warmup_factor` and :func:`schedule_factor`), with the
same defaults as the fused optimizers: ``warmup="untuned"`` (none for SGD), constant schedule.

Update-size control (``update_control="tensor"`` or ``"row"`` with ``update_norm``; Kosson et al.
2024, *Analyzing & Reducing the Need for Learning Rate Warmup in GPT Training*) scales each row's
update ``u = p_new - p`` (a tensor, or an output row along dim 0 of a 2-D+ weight) by
``min(1, update_norm ||p|| / ||u||)``, leaving rows with ``||p|| = 0`` or ``||u|| = 0`` as they are
(:func:`bound_update`). ``update_control="rotational"`` (Kosson et al. 2024, *Rotational
Equilibrium*) runs the rule without weight decay on every 2-D+ weight and rotates each output row by
the equilibrium angular update at fixed norm (:func:`rotate_update`, :func:`equilibrium_update`);
1-D tensors take the plain step.

``arithmetic="pam"`` runs the update with piecewise-affine arithmetic (Kosson & Jaggi 2023;
``pam_mul`` and friends in :mod:`.pam`): every per-element multiply, divide and square root is a PA
operation, additions stay float32. The per-step scalars (bias corrections, ``1 - lr wd``, the
step size) are ordinary float32 arithmetic, evaluated in fusedwarm's order so that the fused
optimizers can be checked bit for bit.
"""

from __future__ import annotations

from .control import UPDATE_CONTROLS, bound_update, equilibrium_update, rotate_update
from .optim import ARITHMETICS, SGD, AdamW, Lion
from .pam import pam_div, pam_exp2, pam_log2, pam_matmul, pam_mul, pam_sqrt
from .quant import (QUANT_DTYPES, QUANT_MIN_NUMEL, ROUND_HALF_UP, CodeFormat, code_format, dequantize, element_words,
                    lowbias32, philox4x32_10, quantize_block, state_words, stream_key, weight_is_lossy)
from .schedules import schedule_factor, warmup_factor

__all__ = ["AdamW", "SGD", "Lion", "bound_update", "rotate_update", "equilibrium_update", "warmup_factor",
           "schedule_factor", "pam_mul", "pam_div", "pam_sqrt", "pam_exp2", "pam_log2", "pam_matmul",
           "ARITHMETICS", "UPDATE_CONTROLS", "quantize_block", "dequantize", "code_format", "CodeFormat",
           "stream_key", "element_words", "state_words", "weight_is_lossy", "philox4x32_10", "lowbias32",
           "QUANT_DTYPES", "QUANT_MIN_NUMEL", "ROUND_HALF_UP"]
