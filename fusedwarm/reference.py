"""The float32 reference optimizers (layer 6 of DESIGN.md).

Plain PyTorch, written to read like the papers' equations: every parameter gets a float32
master copy and float32 states, the update is computed on the master, and the parameter (of
any dtype) is set to the master rounded to nearest. Everything fusedwarm computes is tested
against these classes. This module never imports the compiled extension.

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
``pam_mul`` and friends below): every per-element multiply, divide and square root is a PA
operation, additions stay float32. The per-step scalars (bias corrections, ``1 - lr wd``, the
step size) are ordinary float32 arithmetic, evaluated in fusedwarm's order so that the fused
optimizers can be checked bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["AdamW", "SGD", "Lion", "bound_update", "rotate_update", "equilibrium_update", "warmup_factor", "schedule_factor", "pam_mul", "pam_div", "pam_sqrt", "pam_exp2", "pam_log2", "pam_matmul"]

ARITHMETICS = ("ieee", "pam")

# ---- piecewise-affine arithmetic --------------------------------------------------------------
#
# Kosson & Jaggi 2023, *Multiplication-Free Transformer Training via Piecewise Affine Operations*
# (after Mogami 2020), written from the definitions on float32 bit patterns held in int64 (so
# nothing wraps around): PAM(a, b) = A + B - 0x3F800000 on the magnitudes with the XOR sign,
# PAD(a, b) = A - B + 0x3F800000, PA-sqrt(a) = (A + 0x3F800000) >> 1, PA-exp2(x) = the bits
# 0x3F800000 + trunc(x 2^23), PA-log2(a) = (A - 0x3F800000) 2^-23. Subnormal inputs count as
# zero; results below the smallest normal flush to a signed zero, results past the largest finite
# value are a signed infinity; inf * 0, 0 / 0, inf / inf and sqrt/log2 of a negative number are
# NaN; NaN in gives NaN out; every NaN is 0x7FC00000.

_ONE = 0x3F800000
_MIN_NORMAL = 0x00800000
_INF = 0x7F800000
_NAN = 0x7FC00000
_SIGN = 0x80000000


def _to_bits(x: Tensor) -> Tensor:
    """float32 -> its bit pattern as a non-negative int64."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(bits: Tensor) -> Tensor:
    """A bit pattern in [0, 2^32) held in int64 -> float32."""
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _check_f32(name: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32:
            raise TypeError(f"reference.{name}: expected float32 tensors, got {t.dtype}")


def pam_mul(a: Tensor, b: Tensor) -> Tensor:
    """Piecewise-affine multiplication of float32 tensors (broadcast), Kosson & Jaggi 2023."""
    _check_f32("pam_mul", a, b)
    a, b = torch.broadcast_tensors(a, b)
    A, B = _to_bits(a), _to_bits(b)
    sign = (A ^ B) & _SIGN
    ma, mb = A & 0x7FFFFFFF, B & 0x7FFFFFFF
    total = ma + mb - _ONE
    mag = torch.where(total < _MIN_NORMAL, 0, torch.where(total >= _INF, _INF, total))
    zero = (ma < _MIN_NORMAL) | (mb < _MIN_NORMAL)
    inf = (ma == _INF) | (mb == _INF)
    nan = (ma > _INF) | (mb > _INF) | (inf & zero)
    mag = torch.where(inf, _INF, torch.where(zero, 0, mag))
    return _from_bits(torch.where(nan, _NAN, sign | mag))


def pam_div(a: Tensor, b: Tensor) -> Tensor:
    """Piecewise-affine division a / b of float32 tensors (broadcast), Kosson & Jaggi 2023."""
    _check_f32("pam_div", a, b)
    a, b = torch.broadcast_tensors(a, b)
    A, B = _to_bits(a), _to_bits(b)
    sign = (A ^ B) & _SIGN
    ma, mb = A & 0x7FFFFFFF, B & 0x7FFFFFFF
    total = ma - mb + _ONE
    mag = torch.where(total < _MIN_NORMAL, 0, torch.where(total >= _INF, _INF, total))
    a_zero, b_zero = ma < _MIN_NORMAL, mb < _MIN_NORMAL
    a_inf, b_inf = ma == _INF, mb == _INF
    nan = (ma > _INF) | (mb > _INF) | (a_zero & b_zero) | (a_inf & b_inf)
    mag = torch.where(a_inf | b_zero, _INF, torch.where(a_zero | b_inf, 0, mag))
    return _from_bits(torch.where(nan, _NAN, sign | mag))


def pam_sqrt(a: Tensor) -> Tensor:
    """Piecewise-affine square root of a float32 tensor: the bit offset from 1.0 halved (floor)."""
    _check_f32("pam_sqrt", a)
    A = _to_bits(a)
    ma, sign = A & 0x7FFFFFFF, A & _SIGN
    zero = ma < _MIN_NORMAL
    nan = (ma > _INF) | ((sign != 0) & ~zero)
    out = torch.div(ma + _ONE, 2, rounding_mode="floor")
    out = torch.where(ma == _INF, _INF, torch.where(zero, sign, out))
    return _from_bits(torch.where(nan, _NAN, out))


def pam_exp2(x: Tensor) -> Tensor:
    """Piecewise-affine 2**x of a float32 tensor: 2^floor(x) (1 + frac(x)), from x 2^23 truncated."""
    _check_f32("pam_exp2", x)
    X = _to_bits(x)
    mx = X & 0x7FFFFFFF
    neg = (X & _SIGN) != 0
    normal = mx >= _MIN_NORMAL
    big = mx >= (127 + 7) << 23  # |x| >= 128
    # |x| 2^23 is exact in float64; truncating it is the fixed-point value of |x|.
    scaled = torch.where(normal & ~big, x.abs(), torch.zeros_like(x)).double() * 2.0**23
    fixed = torch.trunc(scaled).to(torch.int64)
    r = torch.where(neg, _ONE - fixed, _ONE + fixed)
    out = torch.where(r < _MIN_NORMAL, 0, r)
    out = torch.where(big, torch.where(neg, 0, _INF), out)
    return _from_bits(torch.where(mx > _INF, _NAN, out))


def pam_log2(a: Tensor) -> Tensor:
    """Piecewise-affine log2 of a float32 tensor: (A - 0x3F800000) 2^-23, i.e. exponent + mantissa."""
    _check_f32("pam_log2", a)
    A = _to_bits(a)
    ma, sign = A & 0x7FFFFFFF, A & _SIGN
    zero = ma < _MIN_NORMAL
    nan = (ma > _INF) | ((sign != 0) & ~zero)
    # The integer rounds once (to nearest even) on conversion; the power-of-two scale is exact.
    value = (ma - _ONE).to(torch.float32) * 2.0**-23
    out = _to_bits(value)
    out = torch.where(ma == _INF, _INF, torch.where(zero, _SIGN | _INF, out))
    return _from_bits(torch.where(nan, _NAN, out))


def pam_matmul(a: Tensor, b: Tensor) -> Tensor:
    """Matrix product of 2-D float32 tensors with PAM products, summed strictly in order of k."""
    _check_f32("pam_matmul", a, b)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"reference.pam_matmul: cannot multiply shapes {tuple(a.shape)} and {tuple(b.shape)}")
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    for k in range(a.shape[1]):
        out = out + pam_mul(a[:, k:k + 1], b[k:k + 1, :])
    return out


def _f32(x: float | Tensor) -> Tensor:
    """A float32 scalar tensor: the per-step scalars of the pam optimizers are rounded as in fp32."""
    return torch.as_tensor(x, dtype=torch.float32).detach().reshape(()).cpu()


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


# ---- warmup and schedules ---------------------------------------------------------------------


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
                t = state["step"]
                beta2 = group["betas"][1] if "betas" in group else None
                warmup = group["warmup"] if beta2 is not None or group["warmup"] != "untuned" else "none"
                w, adaptive = warmup_factor(warmup, t, beta2, group["warmup_steps"], group["warmup_start"])
                factor = w * schedule_factor(group["schedule"], t)
                g = p.grad.to(torch.float32)
                if group["maximize"]:
                    g = -g
                finite = torch.isfinite(g)
                old = {name: state[name].clone() for name in ("master",) + self._states(group)}
                g = torch.where(finite, g, torch.zeros_like(g))
                control = group.get("update_control")
                rotational = control == "rotational" and p.dim() >= 2
                rule_group = {**group, "weight_decay": 0.0} if rotational else group
                if group.get("arithmetic", "ieee") == "pam":
                    self._update_pam(rule_group, _f32(group["lr"]) * _f32(factor), state, g)
                else:
                    self._update(rule_group, float(group["lr"]) * factor, state, g, adaptive)
                for name, before in old.items():
                    state[name].copy_(torch.where(finite, state[name], before))
                master = state["master"]
                if rotational:
                    eta = equilibrium_update(group, float(group["lr"]) * factor)
                    master.copy_(torch.where(finite, rotate_update(old["master"], master, eta), old["master"]))
                elif control in ("tensor", "row"):
                    master.copy_(bound_update(old["master"], master, control, group["update_norm"]))
                p.copy_(master)
        return loss

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
                 maximize: bool = False, extra_bits: int = 16, state_dtype: torch.dtype | None = None,
                 seed: int | None = None, arithmetic: str = "ieee", warmup: str = "untuned",
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
                                      v_init=v_init, update_control=update_control, update_norm=update_norm))

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
        bc2_sqrt = torch.sqrt(1 - _powi_f32(_f32(beta2), t))
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
                 maximize: bool = False, extra_bits: int = 16, state_dtype: torch.dtype | None = None,
                 seed: int | None = None, arithmetic: str = "ieee", warmup: str = "untuned",
                 warmup_steps: int | None = None, warmup_start: float = 0.0, schedule: Any = None,
                 update_control: str | None = None, update_norm: float | None = None) -> None:
        _check_arithmetic(arithmetic)
        _check_update_control(update_control, update_norm, weight_decay)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, arithmetic=arithmetic, warmup=warmup,
                                      warmup_steps=warmup_steps, warmup_start=warmup_start,
                                      schedule=_schedule_dict(schedule), update_control=update_control,
                                      update_norm=update_norm))

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
                 extra_bits: int = 16, state_dtype: torch.dtype | None = None, seed: int | None = None,
                 arithmetic: str = "ieee", warmup: str = "untuned", warmup_steps: int | None = None,
                 warmup_start: float = 0.0, schedule: Any = None, update_control: str | None = None,
                 update_norm: float | None = None) -> None:
        _check_arithmetic(arithmetic)
        _check_update_control(update_control, update_norm, weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                                      arithmetic=arithmetic, warmup=warmup, warmup_steps=warmup_steps,
                                      warmup_start=warmup_start, schedule=_schedule_dict(schedule),
                                      update_control=update_control, update_norm=update_norm))

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
