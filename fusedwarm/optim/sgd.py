"""SGD with momentum, fused: hyperparameters, states and defaults as :class:`torch.optim.SGD`.

This module owns what is particular to SGD: its constructor and docstring, the checks of its
hyperparameters, its state (``momentum_buffer``, only with momentum) and its operator
(``fusedwarm::sgd_``). The update itself is ``csrc/include/fusedwarm/update.cuh``; the shared
machinery is :mod:`fusedwarm.optim.base`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _validation, schedules
from .base import FusedOptimizer


class SGD(FusedOptimizer):
    """SGD with momentum, dampening, Nesterov and weight decay, as :class:`torch.optim.SGD`.

    Args:
        params: parameters or param groups.
        lr: learning rate, a float or a one-element tensor (read on the device).
        momentum: momentum factor (0 keeps no momentum buffer).
        dampening: dampening for momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: use Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize: maximize the objective instead of minimizing it.
        warmup: ``"untuned"`` (default) means no warmup for SGD: Ma & Yarats's rule covers the
            zero-initialized EMA of an adaptive optimizer, and SGD has none, so the default keeps
            :class:`torch.optim.SGD`'s behaviour. ``"linear"`` (with ``warmup_steps``,
            ``warmup_start``) and ``"none"`` are supported.
        extra_bits, state_dtype, state_block, seed, arithmetic, warmup_steps, warmup_start, schedule, backward_step,
            bucket_cap_mb, max_grad_norm, clip, loss_scale, update_control, update_norm, foreach, fused,
            differentiable: see :class:`AdamW`.
    """

    _op_name = "sgd_"
    _op_states = ("momentum_buffer",)
    _hyper_names = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _warmups = ("untuned", "linear", "none")

    # The options every fused optimizer takes are spelled out in each constructor on purpose, as
    # torch.optim does: help(), IDEs and inspect.signature show all of them.
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
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
        foreach: bool | None = None,
        fused: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        _validation.check_torch_options("SGD", dict(foreach=foreach, fused=fused, differentiable=differentiable))
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, extra_bits=extra_bits, state_dtype=state_dtype,
                        state_block=state_block,
                        seed=seed, arithmetic=arithmetic, warmup=warmup, warmup_steps=warmup_steps,
                        warmup_start=warmup_start, schedule=schedule, update_control=update_control,
                        update_norm=update_norm)
        self._check_hyper(defaults)
        super().__init__(params, defaults, backward_step=backward_step, bucket_cap_mb=bucket_cap_mb,
                         max_grad_norm=max_grad_norm, clip=clip, loss_scale=loss_scale)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _validation.check_nonneg("lr", group["lr"])
        _validation.check_nonneg("momentum", group["momentum"])
        _validation.check_nonneg("weight_decay", group["weight_decay"])
        if not isinstance(group["dampening"], (int, float)) or isinstance(group["dampening"], bool):
            raise ValueError(f"Invalid dampening: {group['dampening']!r} (expected a number)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
