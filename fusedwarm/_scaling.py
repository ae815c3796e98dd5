"""Gradient clipping and loss scaling, next to each other, with their device-side state.

This module owns the loss scale (a constant, or dynamic with ``torch.amp.GradScaler``'s rule),
the clipping coefficient (exact global norm, per tensor, ``"lagged"``: the previous iteration's
global norm, or ``"lagged-tensor"``: that and each tensor's own norm) and the last global gradient
norm, all 0-d device tensors updated on the device without host syncs, and turns them into the
per-tensor gradient multipliers the fused kernels take. It reads gradients but never modifies
parameters, gradients or optimizer states.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import _sharding

_DYNAMIC_INIT_SCALE = 2.0**16  # torch.amp.GradScaler's defaults
_DYNAMIC_INTERVAL = 2000
_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


def clip_coefficient(max_norm: float, norm: Tensor) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_, 1 where norm is not finite."""
    coef = (max_norm / (norm + _CLIP_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


class GradScaling:
    """The loss scale and clipping state of one optimizer, and the multipliers of each launch.

    Args:
        max_grad_norm: the clipping threshold, or None for no clipping.
        clip: ``"global"``, ``"tensor"``, ``"lagged"`` or ``"lagged-tensor"`` (see :class:`fusedwarm.AdamW`).
        loss_scale: None, a constant, or ``"dynamic"``.
        device: where the scalars live (the device of the optimizer's first parameter).
    """

    def __init__(self, max_grad_norm: float | None, clip: str, loss_scale: float | str | None,
                 device: torch.device) -> None:
        self.max_grad_norm, self.clip, self.mode = max_grad_norm, clip, loss_scale
        self.scale: Tensor | None = None
        self.growth_tracker: Tensor | None = None
        if loss_scale is not None:
            start = _DYNAMIC_INIT_SCALE if loss_scale == "dynamic" else float(loss_scale)
            self.scale = torch.full((), start, dtype=torch.float32, device=device)
            self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.clip_coef = torch.ones((), dtype=torch.float32, device=device)
        self.last_grad_norm = torch.full((), float("nan"), dtype=torch.float32, device=device)
        self.begin_iteration()

    @property
    def clipping(self) -> str | None:
        """The clip mode in effect, or None without ``max_grad_norm``."""
        return self.clip if self.max_grad_norm is not None else None

    def scalars(self) -> dict[str, Tensor | None]:
        """The state carried between iterations (saved in ``state_dict()["param_groups"][0]["fusedwarm"]``)."""
        return {"loss_scale": self.scale, "growth_tracker": self.growth_tracker, "clip_coef": self.clip_coef,
                "last_grad_norm": self.last_grad_norm}

    def restore(self, scalars: dict[str, Tensor | None]) -> None:
        """Takes the scalars of :meth:`scalars` (from a pickled or deep-copied optimizer)."""
        self.scale, self.growth_tracker = scalars["loss_scale"], scalars["growth_tracker"]
        self.clip_coef, self.last_grad_norm = scalars["clip_coef"], scalars["last_grad_norm"]

    def begin_iteration(self) -> None:
        self._multipliers: dict[torch.device, Tensor | None] = {}
        self._sq_norms: dict[int, Tensor] = {}  # tensor id -> squared gradient norm, open iteration

    def end_iteration(self, nonfinite_count: Callable[[], Tensor]) -> None:
        """Dynamic loss-scale step and lagged clipping coefficient, from the closed iteration."""
        if self.scale is not None and self.mode == "dynamic":
            found_inf = (nonfinite_count() > 0).to(torch.float32)
            torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, 2.0, 0.5, _DYNAMIC_INTERVAL)
        if self._sq_norms:
            # Summed in tensor order, not launch order: the same bits with and without backward_step.
            norm = torch.stack([self._sq_norms[k] for k in sorted(self._sq_norms)]).sum().sqrt()
            self.last_grad_norm = norm
            if self.clip in ("lagged", "lagged-tensor"):
                # A non-finite norm (skipped elements) keeps the previous coefficient.
                coef = clip_coefficient(self.max_grad_norm, norm)
                self.clip_coef = torch.where(torch.isfinite(norm), coef, self.clip_coef)

    def global_clip(self, grads: list[Tensor], main: torch.device) -> None:
        """Exact global-norm clipping over ``grads`` (``clip="global"``, not in backward-step mode)."""
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in grads:
            by_device.setdefault(g.device, []).append(g)
        squares = [torch.stack(torch._foreach_norm([_sharding.local(g) for g in gs], 2, dtype=torch.float32))
                   .square().sum().to(main) for gs in by_device.values()]
        norm = _sharding.sum_over_ranks(torch.stack(squares).sum(), grads).sqrt()
        if self.scale is not None:
            norm = norm / self.scale
        self.last_grad_norm = norm
        self.clip_coef = clip_coefficient(self.max_grad_norm, norm)

    def _multiplier(self, device: torch.device) -> Tensor | None:
        """The gradient multiplier shared by every tensor of this iteration on ``device``, or None for 1."""
        if device not in self._multipliers:
            m = None
            if self.scale is not None:
                m = self.scale.reciprocal()
            if self.clipping in ("global", "lagged"):
                m = self.clip_coef if m is None else m * self.clip_coef
            self._multipliers[device] = None if m is None else m.to(device)
        return self._multipliers[device]

    def grad_scales(self, device: torch.device, ids: list[int], grads: list[Tensor],
                    main: torch.device, tensors: int) -> Tensor | None:
        """Per-tensor gradient multipliers for one launch (tensor ids ``ids``), or None for all 1.

        ``tensors`` is the number of tensors of the optimizer (``"lagged-tensor"``'s first iteration).
        """
        m = self._multiplier(device)
        clip = self.clipping
        if clip in ("tensor", "lagged", "lagged-tensor"):
            norms = torch.stack(torch._foreach_norm([_sharding.local(g) for g in grads], 2, dtype=torch.float32))
            if any(_sharding.is_sharded(g) for g in grads):
                norms = _sharding.sum_over_ranks(norms.square(), grads).sqrt()
            if self.scale is not None:
                norms = norms / self.scale.to(device)
            self._sq_norms.update(zip(ids, norms.square().to(main).unbind()))
            if clip != "lagged":
                coef = clip_coefficient(self.max_grad_norm, norms)
                if clip == "lagged-tensor":
                    # The lagged global coefficient cannot see a jump of this iteration's norm; a
                    # tensor's own limit catches one that sits in few tensors. Until a finite
                    # global norm is known (the first iteration, or after non-finite gradients),
                    # max_grad_norm / sqrt(tensors) per tensor bounds the global norm by max_grad_norm.
                    first = clip_coefficient(self.max_grad_norm, norms * math.sqrt(tensors))
                    known = torch.isfinite(self.last_grad_norm).to(device)
                    coef = torch.where(known, torch.minimum(coef, self.clip_coef.to(device)), first)
                return coef if m is None else coef * m
        if m is None:
            return None
        return m.expand(len(grads)).contiguous()
