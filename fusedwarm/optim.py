"""Fused half-precision-only optimizers: AdamW, SGD and Lion (layer 5 of DESIGN.md).

The weights stay in their own dtype (bfloat16, float16 or float32). For half-precision weights
there is no float32 master copy; instead (Lewandowski & Kosson 2023, *Memory Efficient
Mixed-Precision Optimizers*, arXiv 2309.12381) the optimizer keeps ``extra_bits`` low-order bits
of the master weight in a small integer tensor:

* ``extra_bits=16`` (default): bfloat16 weight + int16 extension *is* the float32 master, bit for
  bit. For float16 weights 13 of the 16 bits are used, which makes the master exactly float32
  inside float16's exponent range (values below float16's smallest normal keep float16's
  exponent floor and are rounded stochastically).
* ``extra_bits=8``: an int8 extension, i.e. a master with 8 more mantissa bits than the weight
  (a 24-bit master for bfloat16); writes to it round stochastically.
* ``extra_bits=0``: no extension; the weight itself is written with stochastic rounding
  (Zamirai et al. 2020, *Revisiting BFloat16 Training*), so updates far below one ulp still move
  it in expectation.

In every mode the weight the model sees is the round-to-nearest (ties away from zero) of the
master. Float32 weights are their own master and ignore ``extra_bits``.

Optimizer states are kept in ``state_dtype`` (float32 or bfloat16; by default bfloat16 for
half-precision weights and float32 for float32 weights); bfloat16 states are written with
stochastic rounding so EMAs with ``beta2 = 0.999`` do not stall. Random bits come from
Philox4x32-10 keyed by ``(seed, step, tensor, element)``, so results never depend on thread
layout and CPU and CUDA agree bit for bit.

An element whose gradient is ``inf`` or ``nan`` is skipped: its weight, extra bits and states are
left exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _ops

__all__ = ["AdamW", "SGD", "Lion", "FusedOptimizer"]

EXTRA_BITS = (0, 8, 16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
ARITHMETICS = ("ieee", "pam")
_EXTRA_DTYPE = {16: torch.int16, 8: torch.int8}


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a one-element floating-point tensor, got {value!r}")
        # As torch.optim does, the value is checked once here (a sync for a GPU tensor at
        # construction only); step() itself never reads it on the host.
        if not bool(value >= 0):
            raise ValueError(f"Invalid {name}: {value!r} (expected a number >= 0)")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number >= 0)")


def _check_beta(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (expected 0 <= {name} < 1)")


def _check_lr_betas(group: dict[str, Any]) -> None:
    _check_nonneg("lr", group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair)")
    _check_beta("beta1", betas[0])
    _check_beta("beta2", betas[1])


def _check_common(extra_bits: Any, state_dtype: Any, seed: Any) -> None:
    if type(extra_bits) is not int or extra_bits not in EXTRA_BITS:
        raise ValueError(f"Invalid extra_bits: {extra_bits!r} (expected one of {EXTRA_BITS})")
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (expected None, torch.float32 or torch.bfloat16)")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise ValueError(f"Invalid seed: {seed!r} (expected an int in [0, 2**63))")


def _check_arithmetic(arithmetic: Any) -> None:
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"Invalid arithmetic: {arithmetic!r} (expected one of {ARITHMETICS})")


def _default_seed() -> int:
    """A seed drawn from torch's global generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


class FusedOptimizer(Optimizer):
    """Shared machinery of the fused optimizers; use :class:`AdamW`, :class:`SGD` or :class:`Lion`.

    Subclasses name their operator, the state tensors it updates and the hyperparameters it
    takes from each param group.
    """

    _op_name: str
    _hyper_names: tuple[str, ...]
    _op_states: tuple[str, ...]  # the operator's state-list arguments, in order

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any]) -> None:
        _check_common(defaults["extra_bits"], defaults["state_dtype"], defaults["seed"])
        _check_arithmetic(defaults.get("arithmetic", "ieee"))
        if defaults["seed"] is None:
            defaults["seed"] = _default_seed()
        super().__init__(params, defaults)
        _ops.load()

    # ---- parameters -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group, checking its parameters and options (see :class:`torch.optim.Optimizer`)."""
        if isinstance(param_group, dict):
            self._check_group_options(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for i, p in enumerate(group["params"]):
            problem = None
            if p.dtype not in PARAM_DTYPES:
                problem = f"has dtype {p.dtype}; fusedwarm updates float32, bfloat16 and float16 parameters only"
            elif p.layout != torch.strided:
                problem = f"has layout {p.layout}; only dense (strided) parameters are supported"
            if problem is not None:
                self.param_groups.pop()
                label = self._param_label(group, len(self.param_groups), i, p)
                raise TypeError(f"{type(self).__name__}: {label} {problem}")

    def _check_group_options(self, group: dict[str, Any]) -> None:
        merged = {**getattr(self, "defaults", {}), **group}
        _check_common(merged.get("extra_bits", 16), merged.get("state_dtype"), merged.get("seed"))
        _check_arithmetic(merged.get("arithmetic", "ieee"))
        self._check_hyper(merged)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def _param_label(group: dict[str, Any], group_index: int, index: int, p: Tensor) -> str:
        names = group.get("param_names")
        name = f"'{names[index]}' " if names else ""
        return f"parameter {name}(group {group_index}, index {index}, shape {tuple(p.shape)}, dtype {p.dtype})"

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _state_dtype(self, group: dict[str, Any], p: Tensor) -> torch.dtype:
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return torch.float32 if p.dtype == torch.float32 else torch.bfloat16

    @staticmethod
    def _extra_bits(group: dict[str, Any], p: Tensor) -> int:
        return 0 if p.dtype == torch.float32 else group["extra_bits"]

    def _tensor_ids(self) -> dict[int, int]:
        """Index of each parameter in the optimizer (all groups, in order): its random-stream key."""
        ids: dict[int, int] = {}
        for group in self.param_groups:
            for p in group["params"]:
                ids.setdefault(id(p), len(ids))
        return ids

    # ---- step -------------------------------------------------------------------------------

    def _check_grad(self, group: dict[str, Any], gi: int, i: int, p: Tensor) -> None:
        g = p.grad

        def what() -> str:  # built only for an error message: step() checks every parameter
            return f"{type(self).__name__}: {self._param_label(group, gi, i, p)}"

        if g.layout != torch.strided:
            raise RuntimeError(f"{what()} has a sparse gradient ({g.layout}); fusedwarm supports dense gradients only")
        if g.is_complex():
            raise RuntimeError(f"{what()} has a complex gradient ({g.dtype}); fusedwarm supports real gradients only")
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise RuntimeError(
                f"{what()} has a gradient of dtype {g.dtype}, shape {tuple(g.shape)} on {g.device}; "
                f"expected dtype {p.dtype}, shape {tuple(p.shape)} on {p.device}"
            )
        self._check_state(group, what, p, self.state.get(p), RuntimeError)

    def _expected_state(self, group: dict[str, Any], p: Tensor) -> dict[str, torch.dtype]:
        """The state tensors of ``p`` under ``group``'s options, with their dtypes."""
        expected = {"step": torch.int64}
        k = self._extra_bits(group, p)
        if k:
            expected["extra"] = _EXTRA_DTYPE[k]
        for name in self._state_names(group):
            expected[name] = self._state_dtype(group, p)
        return expected

    def _check_state(self, group: dict[str, Any], what: Callable[[], str], p: Tensor, state: dict[str, Any] | None,
                     error: type) -> None:
        """Raises ``error`` if an existing state tensor of ``p`` has the wrong dtype, shape or device."""
        if not state:
            return
        expected = self._expected_state(group, p)
        extra = state.get("extra")
        if (extra.dtype if isinstance(extra, Tensor) else None) != expected.get("extra"):
            k = self._extra_bits(group, p)
            raise error(f"{what()}: extra_bits changed to {k} after the first step; this is not supported")
        for name, dtype in expected.items():
            t = state.get(name)
            if t is None:
                continue
            shape = () if name == "step" else p.shape
            if not isinstance(t, Tensor) or t.dtype != dtype or t.shape != shape or t.device != p.device:
                got = f"{t.dtype}, shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(t)
                raise error(
                    f"{what()}: state '{name}' is {got}; expected {dtype}, shape {tuple(shape)} on {p.device}"
                )

    def _init_state(self, group: dict[str, Any], p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        for name, dtype in self._expected_state(group, p).items():
            if name not in state:
                state[name] = torch.zeros(() if name == "step" else p.shape, dtype=dtype, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Check every gradient before touching anything, so a bad one changes nothing. Each
        # group's parameters with a gradient are bucketed by (device, dtype): one call each.
        work: list[tuple[dict[str, Any], dict[tuple[torch.device, torch.dtype], list[Tensor]]]] = []
        for gi, group in enumerate(self.param_groups):
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    self._check_grad(group, gi, i, p)
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            if buckets:
                work.append((group, buckets))
        if not work:
            return loss

        ids = self._tensor_ids()
        op = getattr(_ops.load(), self._op_name)
        for group, buckets in work:
            for (device, _), params in buckets.items():
                self._run(op, group, device, params, ids)
        return loss

    def _run(self, op, group: dict[str, Any], device: torch.device, params: list[Tensor], ids: dict[int, int]) -> None:
        states = [self._init_state(group, p) for p in params]
        used = self._state_names(group)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        # Parameters that are not contiguous are updated through a contiguous copy.
        work = [p if p.is_contiguous() else p.contiguous() for p in params]
        lr = group["lr"]
        lr_tensor = lr.to(device=device, dtype=torch.float32).reshape(()) if isinstance(lr, Tensor) else None
        op(
            work,
            [p.grad.contiguous() for p in params],
            [s["extra"] for s in states if "extra" in s],
            # A state the group does not use (SGD's buffer without momentum) goes as an empty list.
            *[[s[n] for s in states] if n in used else [] for n in self._op_states],
            steps,
            [ids[id(p)] for p in params],
            lr_tensor,
            0.0 if lr_tensor is not None else float(lr),
            self._extra_bits(group, params[0]),
            group["seed"],
            *[self._hyper_value(group, n) for n in self._hyper_names],
            arithmetic=group.get("arithmetic", "ieee"),
        )
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    @staticmethod
    def _hyper_value(group: dict[str, Any], name: str) -> Any:
        if name in ("beta1", "beta2"):
            return float(group["betas"][0 if name == "beta1" else 1])
        value = group[name]
        return value if isinstance(value, bool) else float(value)

    # ---- inspection and checkpoints -----------------------------------------------------------

    def master_weight(self, p: Tensor) -> Tensor:
        """The float32 master weight of ``p``: weight plus extra bits (a copy of ``p`` if none).

        Args:
            p: a parameter of this optimizer.

        Returns:
            A new float32 tensor with the shape of ``p``.
        """
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError("master_weight: the tensor is not a parameter of this optimizer")
        k = self._extra_bits(group, p)
        extra = self.state.get(p, {}).get("extra")
        if extra is None:
            k = 0
            extra = torch.empty(0, dtype=torch.int8, device=p.device)
        return _ops.load().master_weight(p.detach().contiguous(), extra, k)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict made by :meth:`state_dict`, keeping state dtypes exactly.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point states to the parameter's
        dtype, which would round float32 states and destroy the integer extra bits; here the
        state tensors are restored as saved (copied onto the parameter's device). Everything is
        checked before anything changes: group options, and each state tensor's dtype, shape and
        device against its parameter. Options missing from the saved groups (e.g. a
        ``torch.optim.AdamW`` state dict) take this optimizer's defaults; a float ``step`` is
        converted to int64.
        """
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        groups = [{**self.defaults, **saved} for saved in saved_groups]
        index_to_param: dict[Any, tuple[int, int, Tensor]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            self._check_group_options(groups[gi])
            for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
                index_to_param[key] = (gi, i, p)
        kept: dict[Any, dict[str, Tensor]] = {}
        stripped: dict[Any, dict[str, Any]] = {}
        for key, entry in state_dict["state"].items():
            tensors = {k: v for k, v in entry.items() if isinstance(v, Tensor)}
            stripped[key] = {k: v for k, v in entry.items() if not isinstance(v, Tensor)}
            if key not in index_to_param:
                continue
            gi, i, p = index_to_param[key]
            for k, value in tensors.items():
                if k != "step" and value.shape != p.shape:
                    raise ValueError(
                        f"{name}.load_state_dict: state '{k}' of parameter {key} has shape {tuple(value.shape)} "
                        f"but the parameter has shape {tuple(p.shape)}"
                    )
            step = tensors.get("step")
            if step is not None and step.is_floating_point():
                tensors["step"] = step.to(torch.int64)
            tensors = {k: v.to(device=p.device, copy=True) for k, v in tensors.items()}
            label = f"{name}.load_state_dict: parameter {key} ({self._param_label(groups[gi], gi, i, p)})"
            self._check_state(groups[gi], lambda: label, p, tensors, ValueError)
            kept[key] = tensors
        super().load_state_dict({**state_dict, "param_groups": groups, "state": stripped})
        for key, tensors in kept.items():
            self.state[index_to_param[key][2]].update(tensors)


class AdamW(FusedOptimizer):
    """AdamW with half-precision-only weights, fused on CPU and CUDA.

    Same update as :class:`torch.optim.AdamW` (decoupled weight decay, bias-corrected moments),
    computed in float32 on the master weight; see the module docstring for ``extra_bits``,
    ``state_dtype`` and ``seed``.

    Args:
        params: parameters or param groups.
        lr: learning rate, a float or a one-element tensor (read on the device).
        betas: coefficients of the gradient and squared-gradient running averages.
        eps: term added to the denominator.
        weight_decay: decoupled weight decay coefficient.
        maximize: maximize the objective instead of minimizing it.
        extra_bits: 16, 8 or 0 low-order master bits kept per half-precision weight.
        state_dtype: ``torch.float32``, ``torch.bfloat16`` or ``None`` (bfloat16 for half-precision
            weights, float32 for float32 weights).
        seed: key of the stochastic-rounding random stream; drawn from torch's generator if None.
        arithmetic: ``"ieee"`` (float32 operations) or ``"pam"``: every per-element multiply, divide
            and square root of the update is piecewise-affine (Kosson & Jaggi 2023; see
            :mod:`fusedwarm.pam`), additions stay float32 and rounding/extra bits are integer
            operations. The per-step scalars (bias corrections, ``1 - lr wd``, step size) are
            float32 arithmetic either way.
    """

    _op_name = "adamw_"
    _op_states = ("exp_avg", "exp_avg_sq")
    _hyper_names = ("beta1", "beta2", "eps", "weight_decay", "maximize")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        extra_bits: int = 16,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        arithmetic: str = "ieee",
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        extra_bits=extra_bits, state_dtype=state_dtype, seed=seed, arithmetic=arithmetic)
        self._check_hyper(defaults)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _check_lr_betas(group)
        _check_nonneg("eps", group["eps"])
        _check_nonneg("weight_decay", group["weight_decay"])

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")


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
        extra_bits, state_dtype, seed, arithmetic: see :class:`AdamW`.
    """

    _op_name = "sgd_"
    _op_states = ("momentum_buffer",)
    _hyper_names = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")

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
        extra_bits: int = 16,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        arithmetic: str = "ieee",
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, extra_bits=extra_bits, state_dtype=state_dtype,
                        seed=seed, arithmetic=arithmetic)
        self._check_hyper(defaults)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _check_nonneg("lr", group["lr"])
        _check_nonneg("momentum", group["momentum"])
        _check_nonneg("weight_decay", group["weight_decay"])
        if not isinstance(group["dampening"], (int, float)) or isinstance(group["dampening"], bool):
            raise ValueError(f"Invalid dampening: {group['dampening']!r} (expected a number)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()


class Lion(FusedOptimizer):
    """Lion (Chen et al. 2023, *Symbolic Discovery of Optimization Algorithms*), fused.

    ``p <- p (1 - lr wd) - lr sign(b1 m + (1 - b1) g)``, then ``m <- b2 m + (1 - b2) g``.

    Args:
        params: parameters or param groups.
        lr: learning rate, a float or a one-element tensor (read on the device).
        betas: interpolation factor of the update direction and of the momentum average.
        weight_decay: decoupled weight decay coefficient.
        maximize: maximize the objective instead of minimizing it.
        extra_bits, state_dtype, seed, arithmetic: see :class:`AdamW`.
    """

    _op_name = "lion_"
    _op_states = ("exp_avg",)
    _hyper_names = ("beta1", "beta2", "weight_decay", "maximize")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        extra_bits: int = 16,
        state_dtype: torch.dtype | None = None,
        seed: int | None = None,
        arithmetic: str = "ieee",
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize, extra_bits=extra_bits,
                        state_dtype=state_dtype, seed=seed, arithmetic=arithmetic)
        self._check_hyper(defaults)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _check_lr_betas(group)
        _check_nonneg("weight_decay", group["weight_decay"])

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)
