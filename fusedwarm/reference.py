"""The float32 reference optimizers (layer 6 of DESIGN.md).

Plain PyTorch, written to read like the papers' equations: every parameter gets a float32
master copy and float32 states, the update is computed on the master, and the parameter (of
any dtype) is set to the master rounded to nearest. Everything fusedwarm computes is tested
against these classes. This module never imports the compiled extension.

The constructors take the same arguments as :mod:`fusedwarm.optim` so tests can swap one class
for the other; ``extra_bits``, ``state_dtype`` and ``seed`` are accepted and ignored, since
the reference keeps everything in float32 and rounds nothing. Like the fused optimizers, an
element whose gradient is not finite is left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["AdamW", "SGD", "Lion"]


class _Reference(Optimizer):
    """Float32-master bookkeeping shared by the reference optimizers."""

    _state_names: tuple[str, ...] = ()

    def _states(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._state_names

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["master"] = p.detach().to(torch.float32, copy=True)
                for name in self._states(group):
                    state.setdefault(name, torch.zeros_like(state["master"]))
                state["step"] += 1
                g = p.grad.to(torch.float32)
                if group["maximize"]:
                    g = -g
                finite = torch.isfinite(g)
                old = {name: state[name].clone() for name in ("master",) + self._states(group)}
                self._update(group, lr, state, torch.where(finite, g, torch.zeros_like(g)))
                for name, before in old.items():
                    state[name].copy_(torch.where(finite, state[name], before))
                p.copy_(state["master"])
        return loss

    def _update(self, group: dict[str, Any], lr: float, state: dict[str, Any], g: Tensor) -> None:
        raise NotImplementedError

    def master_weight(self, p: Tensor) -> Tensor:
        """The float32 master weight of ``p`` (a copy of ``p`` before its first step)."""
        state = self.state.get(p)
        return state["master"].clone() if state else p.detach().to(torch.float32, copy=True)


class AdamW(_Reference):
    """AdamW (Loshchilov & Hutter 2019) on a float32 master, as :class:`torch.optim.AdamW`:

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, *,
                 maximize: bool = False, extra_bits: int = 16, state_dtype: torch.dtype | None = None,
                 seed: int | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize))

    def _update(self, group, lr, state, g):
        beta1, beta2 = group["betas"]
        t = state["step"]
        p, m, v = state["master"], state["exp_avg"], state["exp_avg_sq"]
        p.mul_(1 - lr * group["weight_decay"])
        m.mul_(beta1).add_((1 - beta1) * g)
        v.mul_(beta2).add_((1 - beta2) * g * g)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        denom = v.sqrt() / bias_correction2**0.5 + group["eps"]
        p.sub_((lr / bias_correction1) * (m / denom))


class SGD(_Reference):
    """SGD as :class:`torch.optim.SGD` on a float32 master:

    g <- g + wd p;  b <- g on the first step, else momentum b + (1 - dampening) g;
    d <- g + momentum b (Nesterov) or b;  p <- p - lr d.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, extra_bits: int = 16, state_dtype: torch.dtype | None = None,
                 seed: int | None = None) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize))

    def _states(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, group, lr, state, g):
        p = state["master"]
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * p
        momentum = group["momentum"]
        if momentum != 0:
            buf = state["momentum_buffer"]
            if state["step"] == 1:
                buf.copy_(g)
            else:
                buf.mul_(momentum).add_((1 - group["dampening"]) * g)
            g = g + momentum * buf if group["nesterov"] else buf
        p.sub_(lr * g)


class Lion(_Reference):
    """Lion (Chen et al. 2023) on a float32 master:

    c <- b1 m + (1 - b1) g;  p <- p (1 - lr wd) - lr sign(c);  m <- b2 m + (1 - b2) g.
    """

    _state_names = ("exp_avg",)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *, maximize: bool = False,
                 extra_bits: int = 16, state_dtype: torch.dtype | None = None, seed: int | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize))

    def _update(self, group, lr, state, g):
        beta1, beta2 = group["betas"]
        p, m = state["master"], state["exp_avg"]
        c = beta1 * m + (1 - beta1) * g
        p.mul_(1 - lr * group["weight_decay"]).sub_(lr * torch.sign(c))
        m.mul_(beta2).add_((1 - beta2) * g)
