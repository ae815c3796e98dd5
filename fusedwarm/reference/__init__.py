"""The float32 reference (layer 6 of DESIGN.md): optimizers, warmup, schedules, update-size control, PA arithmetic.

Plain PyTorch, written to read like the papers' equations: every parameter gets a float32
master copy and float32 states, the update is computed on the master, and the parameter (of
any dtype) is set to the master rounded to nearest. Everything fusedwarm computes is tested
against this package. It never imports the compiled extension, nor any part of fusedwarm outside
it; its modules are :mod:`.optim` (the optimizers), :mod:`.schedules`, :mod:`.control` and
:mod:`.pam`, and every public name is re-exported here.

The constructors take the same arguments as :mod:`fusedwarm.optim` so tests can swap one class
for the other; ``extra_bits``, ``state_dtype`` and ``seed`` are accepted and ignored, since
the reference keeps everything in float32 and rounds nothing. Like the fused optimizers, an
element whose gradient is not finite is left untouched.

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
from .schedules import schedule_factor, warmup_factor

__all__ = ["AdamW", "SGD", "Lion", "bound_update", "rotate_update", "equilibrium_update", "warmup_factor",
           "schedule_factor", "pam_mul", "pam_div", "pam_sqrt", "pam_exp2", "pam_log2", "pam_matmul",
           "ARITHMETICS", "UPDATE_CONTROLS"]
