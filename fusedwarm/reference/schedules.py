"""Warmup and learning-rate schedule factors of the reference, in float64 (DESIGN.md layer 6).

Owns :func:`warmup_factor` (none, linear, untuned and untuned-exp of Ma & Yarats 2021, RAdam's
rectification of Liu et al. 2019) and :func:`schedule_factor` (constant, cosine, warmup-stable-decay
of Hägele et al. 2024): the papers' formulas as plain functions of the update number ``t``, and the
conversion of a schedule object to its plain-data form. It must not touch tensors or optimizer
state, and it must never import the compiled extension or any other part of fusedwarm (schedule
objects are duck-typed through their ``to_dict``).
"""

from __future__ import annotations

import math
from typing import Any


def warmup_factor(warmup: str, t: int, beta2: float | None = None, warmup_steps: int | None = None,
                  warmup_start: float = 0.0) -> tuple[float, bool]:
    """The warmup's multiplier of lr at update ``t >= 1``, and whether the step is adaptive.

    Args:
        warmup: ``"none"``, ``"linear"``, ``"untuned"``, ``"untuned-exp"`` or ``"radam"``.
        t: the update number (1 for the first update).
        beta2: the EMA coefficient the untuned rules and RAdam derive from.
        warmup_steps, warmup_start: the ``"linear"`` warmup's length and starting factor.

    Returns:
        ``(factor, adaptive)``; ``adaptive`` is False only in RAdam's first steps, where the update
        is un-adapted momentum SGD (Liu et al. 2019, Alg. 2; threshold rho_t > 5 as torch.optim.RAdam).
    """
    if warmup == "none":
        return 1.0, True
    if warmup == "linear":
        return warmup_start + (1 - warmup_start) * min(1.0, t / warmup_steps), True
    if warmup == "untuned":  # Ma & Yarats 2021: omega_t = min(1, (1 - beta2) t / 2)
        return min(1.0, (1 - beta2) * t / 2), True
    if warmup == "untuned-exp":  # Ma & Yarats 2021: omega_t = 1 - exp(-(1 - beta2) t)
        return 1 - math.exp(-(1 - beta2) * t), True
    if warmup == "radam":
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        if rho_t <= 5:
            return 1.0, False
        return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)), True
    raise ValueError(f"Invalid warmup: {warmup!r}")


def schedule_factor(schedule: dict[str, Any] | None, t: int) -> float:
    """The schedule's multiplier of lr at update ``t``, from its plain-data description.

    Args:
        schedule: ``None`` or ``{"name": "constant"}``; ``{"name": "cosine", "total_steps": T,
            "final_fraction": f}`` (cosine from 1 to f over T updates); ``{"name": "wsd",
            "total_steps": T, "decay_fraction": d, "shape": s, "final_fraction": f}`` (Hägele et al.
            2024: 1, then over the last round(d T) updates a cooldown of shape s to f).
        t: the update number.

    Returns:
        The factor.
    """
    if schedule is None or schedule["name"] == "constant":
        return 1.0
    total, final = schedule["total_steps"], schedule["final_fraction"]
    if schedule["name"] == "cosine":
        return final + (1 - final) * (1 + math.cos(math.pi * min(t, total) / total)) / 2
    decay = round(schedule["decay_fraction"] * total)
    if decay == 0:
        return 1.0
    u = min(max(t - (total - decay), 0), decay) / decay
    shape = {"linear": 1 - u, "1-sqrt": 1 - math.sqrt(u), "cosine": (1 + math.cos(math.pi * u)) / 2}
    return final + (1 - final) * shape[schedule["shape"]]


def _schedule_dict(schedule: Any) -> dict[str, Any] | None:
    """A fusedwarm.schedules object (duck-typed: this module imports nothing of fusedwarm) or dict."""
    return schedule.to_dict() if hasattr(schedule, "to_dict") else schedule
