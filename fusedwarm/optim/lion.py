"""Lion (Chen et al. 2023), fused: hyperparameters, states and defaults.

This module owns what is particular to Lion: its constructor and docstring, the checks of its
hyperparameters, its state (``exp_avg``) and its operator (``fusedwarm::lion_``). The update
itself is ``csrc/include/fusedwarm/update.cuh``; the shared machinery is
:mod:`fusedwarm.optim.base`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _validation, schedules
from .base import FusedOptimizer


class Lion(FusedOptimizer):
    """Lion (Chen et al. 2023, *Symbolic Discovery of Optimization Algorithms*), fused.

    ``p <- p (1 - lr wd) - lr sign(b1 m + (1 - b1) g)``, then ``m <- b2 m + (1 - b2) g``.

    Args:
        params: parameters or param groups.
        lr: learning rate, a float or a one-element tensor (read on the device).
        betas: interpolation factor of the update direction and of the momentum average.
        weight_decay: decoupled weight decay coefficient.
        maximize: maximize the objective instead of minimizing it.
        warmup: ``"untuned"`` (default) uses Lion's ``beta2``, the coefficient of its momentum EMA
            (not a second moment): linear over ``2 / (1 - beta2)`` updates (200 for 0.99), the time
            the zero-initialized momentum takes to forget its start (``beta2^t = e^-2``). Lion's
            sign update has full size from the first step, so this is the analogue of Ma & Yarats's
            rule rather than their derivation. ``"untuned-exp"``, ``"linear"`` and ``"none"`` are
            supported; ``"radam"`` (no second moment) is not.
        extra_bits, state_dtype, state_block, seed, arithmetic, warmup_steps, warmup_start, schedule, backward_step,
            bucket_cap_mb, max_grad_norm, clip, loss_scale, update_control, update_norm: see :class:`AdamW`.
    """

    _op_name = "lion_"
    _op_states = ("exp_avg",)
    _hyper_names = ("beta1", "beta2", "weight_decay", "maximize")
    _warmups = ("untuned", "untuned-exp", "linear", "none")

    # The options every fused optimizer takes are spelled out in each constructor on purpose, as
    # torch.optim does: help(), IDEs and inspect.signature show all of them.
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        extra_bits: int | None = None,
        state_dtype: torch.dtype | str | None = None,
        state_block: int | None = None,
        seed: int | None = None,
        arithmetic: str = "ieee",
        warmup: str = "untuned",
        warmup_steps: int | None = None,
        warmup_start: float = 0.0,
        schedule: schedules.Constant | dict | None = None,
        backward_step: bool = False,
        bucket_cap_mb: float = 25.0,
        max_grad_norm: float | None = None,
        clip: str = "global",
        loss_scale: float | str | None = None,
        update_control: str | None = None,
        update_norm: float | None = None,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, extra_bits=extra_bits,
                        state_dtype=state_dtype, state_block=state_block, seed=seed, arithmetic=arithmetic,
                        warmup=warmup,
                        warmup_steps=warmup_steps, warmup_start=warmup_start, schedule=schedule,
                        update_control=update_control, update_norm=update_norm)
        self._check_hyper(defaults)
        super().__init__(params, defaults, backward_step=backward_step, bucket_cap_mb=bucket_cap_mb,
                         max_grad_norm=max_grad_norm, clip=clip, loss_scale=loss_scale)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _validation.check_lr_betas(group)
        _validation.check_nonneg("weight_decay", group["weight_decay"])

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)
