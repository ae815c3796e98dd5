"""AdamW (Loshchilov & Hutter 2019) with half-precision-only weights: hyperparameters, states, defaults.

This module owns what is particular to AdamW: its constructor and docstring (every option the
fused optimizers take is documented here), the checks of its hyperparameters, its state tensors
(``exp_avg``, ``exp_avg_sq``) and its operator (``fusedwarm::adamw_``). The update itself is
``csrc/include/fusedwarm/update.cuh``; the shared machinery is :mod:`fusedwarm.optim.base`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import _validation, schedules
from .base import FusedOptimizer


class AdamW(FusedOptimizer):
    """AdamW with half-precision-only weights, fused on CPU and CUDA.

    Same update as :class:`torch.optim.AdamW` (decoupled weight decay, bias-corrected moments),
    computed in float32 on the master weight; see :mod:`fusedwarm.optim` for ``extra_bits``,
    ``state_dtype`` and ``seed``.

    Args:
        params: parameters or param groups.
        lr: learning rate, a float or a one-element tensor (read on the device).
        betas: coefficients of the gradient and squared-gradient running averages.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay coefficient.
        amsgrad, capturable, differentiable: accepted for ``torch.optim.AdamW``'s signature; fusedwarm
            does not implement them, and ``True`` raises a ``ValueError`` saying why.
        foreach, fused: ``torch.optim``'s choice of implementation; ``None`` or ``True`` (fusedwarm
            always runs its fused multi-tensor kernel), ``False`` raises a ``ValueError``.
        maximize: maximize the objective instead of minimizing it.
        extra_bits: 16 (the default), 8 or 0 low-order master bits kept per half-precision weight.
        state_dtype: ``torch.float32``, ``torch.bfloat16``, ``"int8"``, ``"int4"`` or ``None`` (bfloat16
            for half-precision weights, float32 for float32 weights). ``"int8"``/``"int4"``: block-quantized
            states (8 or 4 bits per element plus a float32 scale per block, written with stochastic
            rounding; see :mod:`fusedwarm.optim`); parameters with fewer than 4,096 elements keep the
            default dtype. ``extra_bits``, ``state_dtype`` and ``state_block`` are the storage
            options: given here (or in a param group), they also apply to a loaded checkpoint, whose
            states are converted; left unset, a loaded checkpoint keeps its own (see
            :meth:`load_state_dict`).
        state_block: elements per block of quantized states, a power of two from 32 to 2048; ``None``
            is 256 for ``"int8"``, 128 for ``"int4"`` (only with those).
        seed: key of the stochastic-rounding random stream; drawn from torch's generator if None.
        backward_step: update each parameter inside ``backward()`` as soon as its gradient is
            complete, then free the gradient (Lewandowski & Kosson 2023); ``step()`` then only
            ends the iteration. See :mod:`fusedwarm.backward`.
        bucket_cap_mb: with ``backward_step``, ready gradients are collected per (group, device,
            dtype) until they hold this many MiB, then updated in one fused call.
        max_grad_norm: clip gradients to this norm (None: no clipping).
        clip: ``"global"`` (exact global norm, as ``torch.nn.utils.clip_grad_norm_``; not with
            ``backward_step``), ``"tensor"`` (each tensor by its own norm), ``"lagged"`` (the
            global norm of the previous iteration, computed on the device) or ``"lagged-tensor"``
            (the lagged coefficient, never above a tensor's own; the first iteration holds each
            of the T tensors to ``max_grad_norm / sqrt(T)``).
        loss_scale: ``None``, a constant, or ``"dynamic"``: the gradients are divided by
            :attr:`loss_scale` inside the update (multiply the loss by it before backward).
        arithmetic: ``"ieee"`` (float32 operations) or ``"pam"``: every per-element multiply, divide
            and square root of the update is piecewise-affine (Kosson & Jaggi 2023; see
            :mod:`fusedwarm.pam`), additions stay float32 and rounding/extra bits are integer
            operations. The per-step scalars (bias corrections, ``1 - lr wd``, step size, the
            warmup and schedule factors) are float32 arithmetic either way.
        warmup: ``"untuned"`` (default; linear over ``2 / (1 - beta2)`` updates, Ma & Yarats 2021),
            ``"untuned-exp"`` (``1 - exp(-(1 - beta2) t)``, same paper), ``"linear"`` (from
            ``warmup_start`` to 1 over ``warmup_steps`` updates), ``"radam"`` (RAdam's rectification
            ``r_t``, Liu et al. 2019, with its fallback: while ``rho_t <= 5`` the update is momentum
            SGD, ``p - lr m / (1 - beta1^t)``, as :class:`torch.optim.RAdam`) or ``"none"``
            (exactly :class:`torch.optim.AdamW`).
        warmup_steps: length of the ``"linear"`` warmup (only with it).
        warmup_start: the ``"linear"`` warmup's factor at ``t = 0`` (update ``t`` gets
            ``start + (1 - start) min(t, W) / W``).
        schedule: a :mod:`fusedwarm.schedules` object (``Constant``, ``Cosine``, ``WSD``) or its
            ``to_dict()``; ``None`` is constant. Multiplies lr after the warmup.
        v_init: ``"zero"`` (Adam) or ``"grad"``: GI-Adam (Kalra & Barkeshli 2024), the second moment
            starts at the first squared gradient and then needs no bias correction.
        update_control: ``None`` (default), ``"tensor"`` or ``"row"``: bound each tensor's, or each
            output row's, update relative to its weight; ``"rotational"``: rotate each output row
            of every 2-D+ weight by the equilibrium angular update at fixed norm (Kosson et al.
            2024; :mod:`fusedwarm.optim`).
        update_norm: the bound, ``||u|| <= update_norm * ||p||`` (a number > 0; only with
            ``update_control``).
    """

    _op_name = "adamw_"
    _op_states = ("exp_avg", "exp_avg_sq")
    _hyper_names = ("beta1", "beta2", "eps", "weight_decay", "maximize")
    _warmups = _validation.WARMUPS

    # The options every fused optimizer takes are spelled out in each constructor on purpose, as
    # torch.optim does: help(), IDEs and inspect.signature show all of them.
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
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
        v_init: str = "zero",
        backward_step: bool = False,
        bucket_cap_mb: float = 25.0,
        max_grad_norm: float | None = None,
        clip: str = "global",
        loss_scale: float | str | None = None,
        update_control: str | None = None,
        update_norm: float | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        _validation.check_torch_options("AdamW", dict(amsgrad=amsgrad, foreach=foreach, fused=fused,
                                                      capturable=capturable, differentiable=differentiable))
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        extra_bits=extra_bits, state_dtype=state_dtype, state_block=state_block, seed=seed, arithmetic=arithmetic,
                        warmup=warmup, warmup_steps=warmup_steps, warmup_start=warmup_start, schedule=schedule,
                        v_init=v_init, update_control=update_control, update_norm=update_norm)
        self._check_hyper(defaults)
        super().__init__(params, defaults, backward_step=backward_step, bucket_cap_mb=bucket_cap_mb,
                         max_grad_norm=max_grad_norm, clip=clip, loss_scale=loss_scale)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _validation.check_lr_betas(group)
        _validation.check_nonneg("eps", group["eps"])
        _validation.check_nonneg("weight_decay", group["weight_decay"])
        if group.get("v_init", "zero") not in _validation.V_INITS:
            raise ValueError(f"Invalid v_init: {group['v_init']!r} (expected one of {_validation.V_INITS})")
        if group.get("warmup") == "radam" and not group["betas"][1] > 0.6:
            raise ValueError(f"warmup='radam' needs beta2 > 0.6 (rho_inf > 4), got {group['betas'][1]!r}")
        if group.get("v_init") == "grad" and group.get("warmup") == "radam":
            raise ValueError("v_init='grad' and warmup='radam' both correct the zero-initialized second moment; "
                             "choose one")

    def _schedule_args(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._schedule_args(group), "v_init": group["v_init"]}

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")
