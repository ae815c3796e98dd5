"""Fused half-precision-only optimizers: AdamW, SGD and Lion (layer 5 of DESIGN.md).

This package holds one module per optimizer (:mod:`.adamw`, :mod:`.sgd`, :mod:`.lion`: hyperparameters,
states, defaults, docstrings) over a small base class (:mod:`.base`). It documents, below, what
the optimizers compute; it computes nothing itself (the update rules are the kernels' header
``csrc/include/fusedwarm/update.cuh``).

The weights stay in their own dtype (bfloat16, float16 or float32). For half-precision weights
there is no float32 master copy; instead (Lewandowski & Kosson 2023, *Memory Efficient
Mixed-Precision Optimizers*, arXiv 2309.12381) the optimizer keeps ``extra_bits`` low-order bits
of the master weight in a small integer tensor:

* ``extra_bits=16`` (default): bfloat16 weight + int16 extension *is* the float32 master, bit for
  bit. For float16 weights 13 of the 16 bits are used, which makes the master exactly float32
  inside float16's exponent range (values below float16's smallest normal keep float16's
  exponent floor and are rounded stochastically).
* ``extra_bits=8``: an int8 extension, i.e. a master with 8 more mantissa bits than the weight
  (a 24-bit master for bfloat16); writes to it round stochastically.
* ``extra_bits=0``: no extension; the weight itself is written with stochastic rounding
  (Zamirai et al. 2020, *Revisiting BFloat16 Training*), so updates far below one ulp still move
  it in expectation.

In every mode the weight the model sees is the round-to-nearest (ties away from zero) of the
master. Float32 weights are their own master and ignore ``extra_bits``.

Optimizer states are kept in ``state_dtype`` (float32 or bfloat16; by default bfloat16 for
half-precision weights and float32 for float32 weights); bfloat16 states are written with
stochastic rounding so EMAs with ``beta2 = 0.999`` do not stall. ``state_dtype="int8"`` or ``"int4"``
keeps block-quantized states: codes of 8 or 4 bits per element and a float32 scale per block of
``state_block`` elements (Dettmers et al. 2022, *8-bit Optimizers via Block-wise Quantization*),
small-float codes (signed for the first moment, unsigned and zero-excluded for the second, after
Li et al. 2023, *Memory Efficient Optimizers with 4-bit States*) written with stochastic rounding;
the format is ``csrc/include/fusedwarm/quant.cuh``'s. Parameters with fewer than 4,096 elements keep
the default state dtype. A block with a non-finite gradient is skipped as a whole. Random bits come from
Philox4x32-10 keyed by ``(seed, step, tensor, element)``, so results never depend on thread
layout and CPU and CUDA agree bit for bit.

An element whose gradient is ``inf`` or ``nan`` is skipped: its weight, extra bits and states are
left exactly as they were; :meth:`FusedOptimizer.nonfinite_count` (a device tensor, no sync) and
:meth:`FusedOptimizer.nonfinite_params` report what was skipped in the last iteration.

The step in the backward pass (``backward_step=True``), clipping and loss scaling are described
in :mod:`fusedwarm.backward` and :class:`AdamW`'s arguments.

Warmup and schedules (``warmup=``, ``schedule=``; :mod:`fusedwarm.schedules`) are closed forms of the
step counter, evaluated inside the fused update on the device: update ``t`` uses
``lr * warmup(t) * schedule(t)`` (``t = 1, 2, ...``), in the weight decay as in the step. The default
is ``warmup="untuned"`` (Ma & Yarats 2021, *On the adequacy of untuned warmup for adaptive
optimization*): linear over ``2 / (1 - beta2)`` updates for AdamW (2000 for ``beta2 = 0.999``), over
``2 / (1 - beta2)`` updates of Lion's momentum EMA for Lion (200 for ``beta2 = 0.99``) and none for
SGD, which has no EMA whose zero initialization it would cover. Pass ``warmup="none"`` for exactly
``torch.optim``'s behaviour. :meth:`FusedOptimizer.last_factors` reads the factors as device tensors.

Update-size control (``update_control=``, ``update_norm=``; Kosson et al. 2024, *Analyzing &
Reducing the Need for Learning Rate Warmup in GPT Training*, after their *Rotational Equilibrium*,
ICML 2024) bounds each step relative to the weight: with ``update_control="tensor"`` every tensor's
update ``u = p_new - p`` (the whole step, weight decay included), with ``"row"`` every output row's
(dim 0 of a weight with two or more dimensions; 1-D tensors count as one row) is scaled by
``min(1, update_norm * ||p|| / ||u||)``, so ``||u|| <= update_norm * ||p||``. Rows whose weight or
update is zero are not scaled; the optimizer states move exactly as without control. The sums of
squares are float32 in a fixed order (1024-element chunks summed in order, then the chunk sums in
order) that the CPU and CUDA backends share, so they agree bit for bit; they cost one extra read
pass over the weights, gradients and states inside the fused call, and nothing extra in memory but
three floats per 1024 elements.

``update_control="rotational"`` (after Kosson et al.'s *Rotational Equilibrium*) keeps every output
row's norm fixed and sets its angular update: the rule's update without weight decay loses its
radial part, ``u_perp = u - (u.p / p.p) p``, is scaled to ``||u_perp|| = eta ||p||`` and the row
becomes ``(p + u_perp) / sqrt(1 + eta^2)``, where ``eta`` is the equilibrium angular update that
weight decay would reach (AdamW ``sqrt(2 lr wd (1 - b1) / (1 + b1))``, SGD
``sqrt(2 lr wd / (1 + momentum))``, Lion ``sqrt(pi / 2) sqrt(2 lr wd) sqrt((1 - b1)^2 + b1^2 (1 - b2) /
(1 + b2))``) with ``lr`` the effective lr (warmup and schedule included). Weight decay enters only
through ``eta`` (it must be > 0). Tensors of one dimension (gains, biases) take the plain step, as
in the paper; a row whose weight is zero takes the rule's step without weight decay, one whose
update is purely radial stays. Elements skipped for a non-finite gradient stay as they were, so
their row's norm is then kept only approximately.
"""
from .adamw import AdamW
from .base import FusedOptimizer
from .lion import Lion
from .sgd import SGD

__all__ = ["AdamW", "SGD", "Lion", "FusedOptimizer"]
