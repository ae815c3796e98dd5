"""Update-size control of the reference, in float32 (DESIGN.md layer 6).

Owns the per-tensor and per-row relative update bound (:func:`bound_update`; Kosson et al. 2024,
*Analyzing & Reducing the Need for Learning Rate Warmup in GPT Training*), the rotational update at
the equilibrium angle (:func:`rotate_update`, :func:`equilibrium_update`; Kosson et al. 2024,
*Rotational Equilibrium*) and the validation of the ``update_control``/``update_norm`` options:
functions of a master weight before and after the rule's step. It must not compute the rule's step
or keep optimizer state, and it must never import the compiled extension or any other part of
fusedwarm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

UPDATE_CONTROLS = (None, "tensor", "row", "rotational")


def bound_update(before: Tensor, after: Tensor, control: str, update_norm: float) -> Tensor:
    """Kosson et al. 2024's relative update bound, in float32.

    Args:
        before: the float32 master weight before the step.
        after: the master after the unbounded step.
        control: ``"tensor"`` (one row: the whole tensor) or ``"row"`` (rows along dim 0 of a
            weight with two or more dimensions; a 1-D tensor is one row).
        update_norm: the largest ``||u|| / ||p||`` of a row.

    Returns:
        ``before + c u`` with ``u = after - before`` and, per row,
        ``c = min(1, update_norm ||before|| / ||u||)``; ``after`` itself where ``c = 1``.
    """
    rows = before.shape[0] if control == "row" and before.dim() >= 2 and before.numel() > 0 else 1
    w = before.reshape(rows, -1)
    u = (after - before).reshape(rows, -1)
    ww, uu = (w * w).sum(dim=1, keepdim=True), (u * u).sum(dim=1, keepdim=True)
    bound = update_norm * update_norm * ww
    c = torch.where((ww > 0) & (uu > bound), update_norm * ww.sqrt() / uu.sqrt(), torch.ones_like(ww))
    return torch.where(c == 1, after.reshape(rows, -1), w + c * u).reshape(before.shape)


def equilibrium_update(group: dict[str, Any], lr: float) -> float:
    """The equilibrium angular update of Kosson et al. 2024 (*Rotational Equilibrium*).

    Args:
        group: the param group (``betas`` for AdamW and Lion, ``momentum`` for SGD, ``weight_decay``).
        lr: the effective learning rate (warmup and schedule included).

    Returns:
        AdamW ``sqrt(2 lr wd (1 - b1) / (1 + b1))``; SGD ``sqrt(2 lr wd / (1 + momentum))``; Lion
        ``sqrt(pi / 2) sqrt(2 lr wd) sqrt((1 - b1)^2 + b1^2 (1 - b2) / (1 + b2))``.
    """
    wd = group["weight_decay"]
    if "momentum" in group:
        return math.sqrt(2 * lr * wd / (1 + group["momentum"]))
    beta1, beta2 = group["betas"]
    if "eps" in group:
        return math.sqrt(2 * lr * wd * (1 - beta1) / (1 + beta1))
    return math.sqrt(math.pi / 2) * math.sqrt(2 * lr * wd) * math.sqrt((1 - beta1) ** 2
                                                                      + beta1**2 * (1 - beta2) / (1 + beta2))


def rotate_update(before: Tensor, after: Tensor, eta: float) -> Tensor:
    """Kosson et al. 2024's rotational update of every output row (dim 0) of a 2-D+ weight, in float32.

    Args:
        before: the float32 master weight before the step.
        after: the master after the rule's step without weight decay.
        eta: the angular update (:func:`equilibrium_update`).

    Returns:
        Per row, ``(w + eta ||w|| u_perp / ||u_perp||) / sqrt(1 + eta^2)`` with ``w = before``,
        ``u = after - before`` and ``u_perp = u - (u.w / w.w) w``: the same norm as ``w``, at angle
        ``atan(eta)`` from it. Rows with ``w = 0`` are ``after``; rows with ``u_perp = 0`` are ``before``.
    """
    w = before.reshape(before.shape[0], -1)
    u = (after - before).reshape(w.shape)
    ww = (w * w).sum(dim=1, keepdim=True)
    safe = torch.where(ww > 0, ww, torch.ones_like(ww))
    perp = u - (u * w).sum(dim=1, keepdim=True) / safe * w
    pn = perp.norm(dim=1, keepdim=True)
    rotated = (w + eta * ww.sqrt() / torch.where(pn > 0, pn, torch.ones_like(pn)) * perp) / math.sqrt(1 + eta**2)
    out = torch.where(ww > 0, torch.where(pn > 0, rotated, w), after.reshape(w.shape))
    return out.reshape(before.shape)


def _check_update_control(control: Any, update_norm: Any, weight_decay: float) -> None:
    if control not in UPDATE_CONTROLS:
        raise ValueError(f"Invalid update_control: {control!r} (expected one of {UPDATE_CONTROLS})")
    if (control in (None, "rotational")) != (update_norm is None):
        raise ValueError("update_norm goes with update_control='tensor' or 'row' (both or neither)")
    if control == "rotational" and not weight_decay > 0:
        raise ValueError("update_control='rotational' needs weight_decay > 0")
