"""The reference optimizers: float32 master bookkeeping and the AdamW, SGD and Lion rules (DESIGN.md layer 6).

Owns ``_Reference`` (the float32 master and states, the skip of non-finite gradients, and the order
in which warmup, schedule, update rule and update-size control are applied each step) and the
update rules of :class:`AdamW`, :class:`SGD` and :class:`Lion` in IEEE and piecewise-affine form,
with the float32 per-step scalars evaluated in fusedwarm's order, and the block-quantized states of
``state_dtype="int8"`` / ``"int4"`` (decoded before and encoded after each step). It must not define
arithmetic, schedules, update-size control or state codes itself (those come from :mod:`.pam`,
:mod:`.schedules`, :mod:`.control` and :mod:`.quant`), and it must never import the compiled
extension or any other part of fusedwarm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .control import _check_update_control, bound_update, equilibrium_update, rotate_update
from .pam import pam_div, pam_mul, pam_sqrt
from .quant import (QUANT_DTYPES, QUANT_MIN_NUMEL, check_block, code_bytes, dequantize, num_blocks, quantize_block,
                    state_words, weight_is_lossy)
from .schedules import _schedule_dict, schedule_factor, warmup_factor

ARITHMETICS = ("ieee", "pam")


def _f32(x: float | Tensor) -> Tensor:
    """A float32 scalar tensor: the per-step scalars of the pam optimizers are rounded as in fp32."""
    return torch.as_tensor(x, dtype=torch.float32).detach().reshape(()).cpu()


def _sqrt_f32(x: Tensor) -> Tensor:
    """The correctly rounded float32 square root of the float32 scalar ``x``, as IEEE sqrt gives.

    torch's float32 sqrt is not correctly rounded on every CPU (on an AMD EPYC with torch 2.13,
    sqrt(0.097500026) came out one ulp high); the float64 root of a float32 value, rounded once to
    float32, is (53 >= 2 * 24 + 2 bits, so the double rounding cannot go wrong).
    """
    return torch.sqrt(x.double()).float()


def _powi_f32(base: Tensor, n: int) -> Tensor:
    """base**n by repeated squaring in float32, the order fusedwarm's fw::powi uses."""
    r = _f32(1.0)
    while n > 0:
        if n & 1:
            r = r * base
        base = base * base
        n >>= 1
    return r


def _check_arithmetic(arithmetic: Any) -> None:
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"Invalid arithmetic: {arithmetic!r} (expected one of {ARITHMETICS})")


def _quant_bits(state_dtype: Any) -> int | None:
    return QUANT_DTYPES.get(state_dtype) if isinstance(state_dtype, str) else None


def _check_storage(group: dict[str, Any]) -> None:
    """Quantized states need a valid block size and a seed (their rounding's random words)."""
    bits = _quant_bits(group["state_dtype"])
    if bits is None:
        if group["state_block"] is not None:
            raise ValueError(f"state_block={group['state_block']!r} applies to state_dtype 'int8' or 'int4' only, "
                             f"got state_dtype={group['state_dtype']!r}")
        return
    check_block(group["state_block"], bits)
    seed = group["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"state_dtype={group['state_dtype']!r} rounds states with random words: seed must be an "
                         f"int in [0, 2**64), got {seed!r}")


def _storage(extra_bits: int, state_dtype: Any, state_block: int | None, seed: int | None) -> dict[str, Any]:
    return dict(extra_bits=extra_bits, state_dtype=state_dtype, state_block=state_block, seed=seed)


def _quantization(group: dict[str, Any], p: Tensor) -> tuple[int, int] | None:
    """(bits, block) of ``p``'s quantized states, or None for float32 states (small tensors too)."""
    bits = _quant_bits(group["state_dtype"])
    if bits is None or p.numel() < QUANT_MIN_NUMEL:
        return None
    return bits, check_block(group["state_block"], bits)


def _blockwise_all(mask: Tensor, block: int) -> Tensor:
    """``mask`` with each block of ``block`` consecutive elements (flattened) set to the block's all()."""
    flat = mask.reshape(-1)
    n = flat.numel()
    nb = num_blocks(n, block)
    padded = torch.cat([flat, flat.new_ones(nb * block - n)]).reshape(nb, block)
    return padded.all(dim=1).repeat_interleave(block)[:n].reshape(mask.shape)


class _Reference(Optimizer):
    """Float32-master bookkeeping shared by the reference optimizers.

    With ``state_dtype="int8"`` or ``"int4"`` the states of a parameter of at least
    ``QUANT_MIN_NUMEL`` elements are block-quantized (:mod:`.quant`): state ``name`` holds the uint8
    codes and ``name + "_scale"`` the float32 block scales. Each step decodes them to float32, runs
    the rule, and encodes them with the random words of :func:`.quant.state_words` (the parameter's
    index in the optimizer is its tensor id); state 0 uses signed codes, state 1 (AdamW's
    ``exp_avg_sq``) unsigned ones. A block with any non-finite gradient is left untouched as a whole.
    """

    _state_names: tuple[str, ...] = ()

    def _states(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self._state_names

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group (see :class:`torch.optim.Optimizer`), checking its state storage options."""
        if isinstance(param_group, dict):
            _check_storage({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tensor_id = -1  # the parameter's index in the optimizer, in param_group order: its random stream
        for group in self.param_groups:
            for p in group["params"]:
                tensor_id += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["master"] = p.detach().to(torch.float32, copy=True)
                quant = _quantization(group, p)
                for name in self._states(group):
                    if quant is None:
                        state.setdefault(name, torch.zeros_like(state["master"]))
                    else:
                        state.setdefault(name, torch.zeros(code_bytes(p.numel(), quant[0]), dtype=torch.uint8,
                                                           device=p.device))
                        state.setdefault(name + "_scale", torch.zeros(num_blocks(p.numel(), quant[1]),
                                                                      dtype=torch.float32, device=p.device))
                state["step"] += 1
                t = state["step"]
                beta2 = group["betas"][1] if "betas" in group else None
                warmup = group["warmup"] if beta2 is not None or group["warmup"] != "untuned" else "none"
                w, adaptive = warmup_factor(warmup, t, beta2, group["warmup_steps"], group["warmup_start"])
                factor = w * schedule_factor(group["schedule"], t)
                g = p.grad.to(torch.float32)
                if group["maximize"]:
                    g = -g
                finite = torch.isfinite(g)
                work = state
                if quant is not None:
                    finite = _blockwise_all(finite, quant[1])
                    work = {**state, **{name: self._decode(state, name, i, p, quant)
                                        for i, name in enumerate(self._states(group))}}
                old = {name: work[name].clone() for name in ("master",) + self._states(group)}
                g = torch.where(finite, g, torch.zeros_like(g))
                control = group.get("update_control")
                rotational = control == "rotational" and p.dim() >= 2
                rule_group = {**group, "weight_decay": 0.0} if rotational else group
                if group.get("arithmetic", "ieee") == "pam":
                    self._update_pam(rule_group, _f32(group["lr"]) * _f32(factor), work, g)
                else:
                    self._update(rule_group, float(group["lr"]) * factor, work, g, adaptive)
                for name, before in old.items():
                    work[name].copy_(torch.where(finite, work[name], before))
                if quant is not None:
                    self._encode(group, p, tensor_id, state, work, finite, quant)
                master = state["master"]
                if rotational:
                    eta = equilibrium_update(group, float(group["lr"]) * factor)
                    master.copy_(torch.where(finite, rotate_update(old["master"], master, eta), old["master"]))
                elif control in ("tensor", "row"):
                    master.copy_(bound_update(old["master"], master, control, group["update_norm"]))
                p.copy_(master)
        return loss

    @staticmethod
    def _decode(state: dict[str, Any], name: str, index: int, p: Tensor, quant: tuple[int, int]) -> Tensor:
        """The float32 values of quantized state ``name`` (state number ``index`` of the rule)."""
        bits, block = quant
        values = dequantize(state[name], state[name + "_scale"], p.numel(), bits, index == 0, block)
        return values.reshape(p.shape)

    def _encode(self, group: dict[str, Any], p: Tensor, tensor_id: int, state: dict[str, Any],
                work: dict[str, Any], finite: Tensor, quant: tuple[int, int]) -> None:
        """Encodes the updated float32 states of ``work`` into ``state``'s codes and scales, leaving
        the blocks with a non-finite gradient (``finite`` is constant on blocks) as they were."""
        bits, block = quant
        words = state_words(group["seed"], tensor_id, state["step"], p.numel(),
                            weight_is_lossy(p.dtype, group["extra_bits"]), device=p.device)
        block_ok = finite.reshape(-1)[::block]
        byte_ok = block_ok.repeat_interleave(block * bits // 8)[:code_bytes(p.numel(), bits)]
        for i, name in enumerate(self._states(group)):
            codes, scales = quantize_block(work[name], words[i], bits, i == 0, block)
            state[name].copy_(torch.where(byte_ok, codes, state[name]))
            state[name + "_scale"].copy_(torch.where(block_ok, scales, state[name + "_scale"]))

    def _update(self, group: dict[str, Any], lr: float, state: dict[str, Any], g: Tensor, adaptive: bool) -> None:
        raise NotImplementedError

    def _update_pam(self, group: dict[str, Any], lr: float | Tensor, state: dict[str, Any], g: Tensor) -> None:
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
                 maximize: bool = False, extra_bits: int = 16, state_dtype: torch.dtype | str | None = None,
                 state_block: int | None = None, seed: int | None = None, arithmetic: str = "ieee",
                 warmup: str = "untuned",
                 warmup_steps: int | None = None, warmup_start: float = 0.0, schedule: Any = None,
                 v_init: str = "zero", update_control: str | None = None,
                 update_norm: float | None = None) -> None:
        _check_arithmetic(arithmetic)
        _check_update_control(update_control, update_norm, weight_decay)
        if arithmetic == "pam" and (v_init != "zero" or warmup == "radam"):
            raise ValueError("reference.AdamW: arithmetic='pam' is implemented for v_init='zero' without 'radam'")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                      arithmetic=arithmetic, warmup=warmup, warmup_steps=warmup_steps,
                                      warmup_start=warmup_start, schedule=_schedule_dict(schedule),
                                      v_init=v_init, update_control=update_control, update_norm=update_norm,
                                      **_storage(extra_bits, state_dtype, state_block, seed)))

    def _update(self, group, lr, state, g, adaptive):
        beta1, beta2 = group["betas"]
        t = state["step"]
        p, m, v = state["master"], state["exp_avg"], state["exp_avg_sq"]
        p.mul_(1 - lr * group["weight_decay"])
        m.mul_(beta1).add_((1 - beta1) * g)
        bias_correction1 = 1 - beta1**t
        if group["v_init"] == "grad":
            # GI-Adam (Kalra & Barkeshli 2024): v_0 = g_1^2, and v's weights sum to 1 (no correction).
            if t == 1:
                v.copy_(g * g)
            else:
                v.mul_(beta2).add_((1 - beta2) * g * g)
            bias_correction2 = 1.0
        else:
            v.mul_(beta2).add_((1 - beta2) * g * g)
            bias_correction2 = 1 - beta2**t
        if not adaptive:  # RAdam's fallback: momentum SGD
            p.sub_((lr / bias_correction1) * m)
            return
        denom = v.sqrt() / bias_correction2**0.5 + group["eps"]
        p.sub_((lr / bias_correction1) * (m / denom))

    def _update_pam(self, group, lr, state, g):
        # Kingma & Ba's one-division form, as fusedwarm computes it (update.cuh):
        # p <- p - a_t m / (sqrt(v) + eps_t), a_t = lr sqrt(1 - b2^t) / (1 - b1^t), eps_t = eps sqrt(1 - b2^t).
        beta1, beta2 = group["betas"]
        t = state["step"]
        lr = _f32(lr)
        decay = 1 - lr * _f32(group["weight_decay"])
        bc2_sqrt = _sqrt_f32(1 - _powi_f32(_f32(beta2), t))
        step_size = lr * bc2_sqrt / (1 - _powi_f32(_f32(beta1), t))
        eps = _f32(group["eps"]) * bc2_sqrt
        p, m, v = state["master"], state["exp_avg"], state["exp_avg_sq"]
        p.copy_(pam_mul(p, decay))
        m.copy_(pam_mul(_f32(beta1), m) + pam_mul(_f32(1 - beta1), g))
        v.copy_(pam_mul(_f32(beta2), v) + pam_mul(_f32(1 - beta2), pam_mul(g, g)))
        p.copy_(p - pam_mul(step_size, pam_div(m, pam_sqrt(v) + eps)))


class SGD(_Reference):
    """SGD as :class:`torch.optim.SGD` on a float32 master:

    g <- g + wd p;  b <- g on the first step, else momentum b + (1 - dampening) g;
    d <- g + momentum b (Nesterov) or b;  p <- p - lr d.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, extra_bits: int = 16, state_dtype: torch.dtype | str | None = None,
                 state_block: int | None = None, seed: int | None = None, arithmetic: str = "ieee",
                 warmup: str = "untuned",
                 warmup_steps: int | None = None, warmup_start: float = 0.0, schedule: Any = None,
                 update_control: str | None = None, update_norm: float | None = None) -> None:
        _check_arithmetic(arithmetic)
        _check_update_control(update_control, update_norm, weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, arithmetic=arithmetic, warmup=warmup,
                                      warmup_steps=warmup_steps, warmup_start=warmup_start,
                                      schedule=_schedule_dict(schedule), update_control=update_control,
                                      update_norm=update_norm, **_storage(extra_bits, state_dtype, state_block, seed)))

    def _states(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _update(self, group, lr, state, g, adaptive):
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

    def _update_pam(self, group, lr, state, g):
        p = state["master"]
        g = g + pam_mul(_f32(group["weight_decay"]), p)
        momentum = group["momentum"]
        if momentum != 0:
            buf = state["momentum_buffer"]
            first = state["step"] == 1
            buf_coef = _f32(0.0 if first else momentum)
            grad_coef = _f32(1.0 if first else 1 - group["dampening"])
            buf.copy_(pam_mul(buf_coef, buf) + pam_mul(grad_coef, g))
            nesterov = group["nesterov"]
            g = pam_mul(_f32(1.0 if nesterov else 0.0), g) + pam_mul(_f32(momentum if nesterov else 1.0), buf)
        p.copy_(p - pam_mul(_f32(lr), g))


class Lion(_Reference):
    """Lion (Chen et al. 2023) on a float32 master:

    c <- b1 m + (1 - b1) g;  p <- p (1 - lr wd) - lr sign(c);  m <- b2 m + (1 - b2) g.
    """

    _state_names = ("exp_avg",)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float | Tensor = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *, maximize: bool = False,
                 extra_bits: int = 16, state_dtype: torch.dtype | str | None = None,
                 state_block: int | None = None, seed: int | None = None, arithmetic: str = "ieee",
                 warmup: str = "untuned", warmup_steps: int | None = None, warmup_start: float = 0.0,
                 schedule: Any = None, update_control: str | None = None,
                 update_norm: float | None = None) -> None:
        _check_arithmetic(arithmetic)
        _check_update_control(update_control, update_norm, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      arithmetic=arithmetic, warmup=warmup, warmup_steps=warmup_steps,
                                      warmup_start=warmup_start, schedule=_schedule_dict(schedule),
                                      update_control=update_control, update_norm=update_norm,
                                      **_storage(extra_bits, state_dtype, state_block, seed)))

    def _update(self, group, lr, state, g, adaptive):
        beta1, beta2 = group["betas"]
        p, m = state["master"], state["exp_avg"]
        c = beta1 * m + (1 - beta1) * g
        p.mul_(1 - lr * group["weight_decay"]).sub_(lr * torch.sign(c))
        m.mul_(beta2).add_((1 - beta2) * g)

    def _update_pam(self, group, lr, state, g):
        beta1, beta2 = group["betas"]
        p, m = state["master"], state["exp_avg"]
        lr = _f32(lr)
        decay = 1 - lr * _f32(group["weight_decay"])
        c = pam_mul(_f32(beta1), m) + pam_mul(_f32(1 - beta1), g)
        p.copy_(pam_mul(p, decay) - pam_mul(lr, torch.sign(c)))
        m.copy_(pam_mul(_f32(beta2), m) + pam_mul(_f32(1 - beta2), g))
