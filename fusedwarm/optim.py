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
left exactly as they were; :meth:`FusedOptimizer.nonfinite_count` (a device tensor, no sync) and
:meth:`FusedOptimizer.nonfinite_params` report what was skipped in the last iteration.

Step in the backward pass (``backward_step=True``; Lewandowski & Kosson 2023, with
``Tensor.register_post_accumulate_grad_hook``): each parameter's gradient, once complete for the
backward, joins a bucket of its (group, device, dtype); a bucket is updated by one fused call when it
holds ``bucket_cap_mb`` of gradients and at the end of ``backward()``, and its gradients are freed
then. The result is bit-identical to ``backward_step=False`` with the same seed and gradients.
``step()`` ends the iteration and must be called between two backward passes (a second gradient for
an already-updated parameter raises an error rather than updating twice); ``accumulate()`` keeps
gradients for micro-batches; ``close()`` removes the hooks. Clipping (``max_grad_norm``, ``clip``)
and loss scaling (``loss_scale``) happen inside the fused update, on the device, without host sync.

Warmup and schedules (``warmup=``, ``schedule=``; :mod:`fusedwarm.schedules`) are closed forms of the
step counter, evaluated inside the fused update on the device: update ``t`` uses
``lr * warmup(t) * schedule(t)`` (``t = 1, 2, ...``), in the weight decay as in the step. The default
is ``warmup="untuned"`` (Ma & Yarats 2021, *On the adequacy of untuned warmup for adaptive
optimization*): linear over ``2 / (1 - beta2)`` updates for AdamW (2000 for ``beta2 = 0.999``), over
``2 / (1 - beta2)`` updates of Lion's momentum EMA for Lion (200 for ``beta2 = 0.99``) and none for
SGD, which has no EMA whose zero initialization it would cover. Pass ``warmup="none"`` for exactly
``torch.optim``'s behaviour. :meth:`FusedOptimizer.last_factors` reads the factors as device tensors.

Update-size control (``update_control=``, ``update_norm=``; Kosson et al. 2024, *Analyzing &
Reducing the Need for Learning Rate Warmup in GPT Training*, after their *Rotational Equilibrium*,
ICML 2024) bounds each step relative to the weight: with ``update_control="tensor"`` every tensor's
update ``u = p_new - p`` (the whole step, weight decay included), with ``"row"`` every output row's
(dim 0 of a weight with two or more dimensions; 1-D tensors count as one row) is scaled by
``min(1, update_norm * ||p|| / ||u||)``, so ``||u|| <= update_norm * ||p||``. Rows whose weight or
update is zero are not scaled; the optimizer states move exactly as without control. The sums of
squares are float32 in a fixed order (1024-element chunks summed in order, then the chunk sums in
order) that the CPU and CUDA backends share, so they agree bit for bit; they cost one extra read
pass over the weights, gradients and states inside the fused call, and nothing extra in memory but
three floats per 1024 elements.

``update_control="rotational"`` (after Kosson et al.'s *Rotational Equilibrium*) keeps every output
row's norm fixed and sets its angular update: the rule's update without weight decay loses its
radial part, ``u_perp = u - (u.p / p.p) p``, is scaled to ``||u_perp|| = eta ||p||`` and the row
becomes ``(p + u_perp) / sqrt(1 + eta^2)``, where ``eta`` is the equilibrium angular update that
weight decay would reach (AdamW ``sqrt(2 lr wd (1 - b1) / (1 + b1))``, SGD
``sqrt(2 lr wd / (1 + momentum))``, Lion ``sqrt(pi / 2) sqrt(2 lr wd) sqrt((1 - b1)^2 + b1^2 (1 - b2) /
(1 + b2))``) with ``lr`` the effective lr (warmup and schedule included). Weight decay enters only
through ``eta`` (it must be > 0). Tensors of one dimension (gains, biases) take the plain step, as
in the paper; a row whose weight is zero takes the rule's step without weight decay, one whose
update is purely radial stays. Elements skipped for a non-finite gradient stay as they were, so
their row's norm is then kept only approximately.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _ops, schedules

__all__ = ["AdamW", "SGD", "Lion", "FusedOptimizer"]

EXTRA_BITS = (0, 8, 16)
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.bfloat16)
ARITHMETICS = ("ieee", "pam")
_EXTRA_DTYPE = {16: torch.int16, 8: torch.int8}
UPDATE_CONTROLS = (None, "tensor", "row", "rotational")


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


CLIP_MODES = ("global", "tensor", "lagged")
_DYNAMIC_INIT_SCALE = 2.0**16  # torch.amp.GradScaler's defaults
_DYNAMIC_INTERVAL = 2000
_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


def _check_driver(backward_step: Any, bucket_cap_mb: Any, max_grad_norm: Any, clip: Any, loss_scale: Any) -> None:
    if not isinstance(backward_step, bool):
        raise ValueError(f"Invalid backward_step: {backward_step!r} (expected True or False)")
    if not isinstance(bucket_cap_mb, (int, float)) or isinstance(bucket_cap_mb, bool) or not bucket_cap_mb > 0:
        raise ValueError(f"Invalid bucket_cap_mb: {bucket_cap_mb!r} (expected a number > 0)")
    if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float)) or isinstance(max_grad_norm, bool)
                                      or not 0 < max_grad_norm < math.inf):
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r} (expected None or a finite number > 0)")
    if clip not in CLIP_MODES:
        raise ValueError(f"Invalid clip: {clip!r} (expected one of {CLIP_MODES})")
    if backward_step and max_grad_norm is not None and clip == "global":
        raise ValueError(
            "clip='global' (exact global-norm clipping) needs every gradient before any update, but "
            "backward_step=True updates each parameter as soon as its gradient is ready. Options: "
            "clip='tensor' clips each tensor by its own norm (exact, local); clip='lagged' scales the "
            "gradients by the coefficient of the previous iteration's global norm (summed on the device "
            "during backward, no host sync); or backward_step=False for exact global clipping"
        )
    if loss_scale is not None and loss_scale != "dynamic" and (
            not isinstance(loss_scale, (int, float)) or isinstance(loss_scale, bool) or not 0 < loss_scale < math.inf):
        raise ValueError(f"Invalid loss_scale: {loss_scale!r} (expected None, 'dynamic' or a finite number > 0)")


def _clip_coefficient(max_norm: float, norm: Tensor) -> Tensor:
    """min(1, max_norm / (norm + 1e-6)) as torch.nn.utils.clip_grad_norm_, 1 where norm is not finite."""
    coef = (max_norm / (norm + _CLIP_EPS)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


def _is_dtensor(p: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(p, DTensor)


# Parameters updated in the backward pass, and by which optimizer: id(p) -> (weakref to p,
# weakref to the optimizer). A second optimizer over such a parameter would update it twice.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner(p: Tensor) -> Any:
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    return entry[1]()


def _claim(p: Tensor, opt: Any) -> None:
    _OWNERS[id(p)] = (weakref.ref(p, lambda _, key=id(p): _OWNERS.pop(key, None)), weakref.ref(opt))


def _release(p: Tensor, opt: Any) -> None:
    if _owner(p) is opt:
        del _OWNERS[id(p)]


def _check_update_control(group: dict[str, Any]) -> None:
    control, bound = group.get("update_control"), group.get("update_norm")
    if control not in UPDATE_CONTROLS:
        raise ValueError(f"Invalid update_control: {control!r} (expected one of {UPDATE_CONTROLS})")
    if control is None or control == "rotational":
        if bound is not None:
            raise ValueError(f"update_norm={bound!r} needs update_control='tensor' or 'row'")
        if control == "rotational" and not group.get("weight_decay", 0) > 0:
            raise ValueError("update_control='rotational' needs weight_decay > 0: it sets the equilibrium angular "
                             "update")
        return
    if (not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound)
            or bound <= 0):
        raise ValueError(f"Invalid update_norm: {bound!r} (update_control={control!r} needs a finite number > 0)")


def _update_rows(control: str, p: Tensor) -> int:
    """The number of rows ``p``'s update is bounded in: its output rows for ``"row"`` and 2-D+."""
    return p.shape[0] if control == "row" and p.dim() >= 2 and p.numel() > 0 else 1


def _check_arithmetic(arithmetic: Any) -> None:
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"Invalid arithmetic: {arithmetic!r} (expected one of {ARITHMETICS})")


WARMUPS = ("untuned", "untuned-exp", "linear", "radam", "none")
V_INITS = ("zero", "grad")


def _check_warmup(opt: str, allowed: tuple[str, ...], group: dict[str, Any]) -> None:
    warmup, steps, start = group["warmup"], group["warmup_steps"], group["warmup_start"]
    if warmup not in WARMUPS:
        raise ValueError(f"Invalid warmup: {warmup!r} (expected one of {WARMUPS})")
    if warmup not in allowed:
        raise ValueError(f"{opt} does not support warmup={warmup!r} (supported: {allowed})")
    if warmup == "linear":
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"Invalid warmup_steps: {steps!r} (warmup='linear' needs an int > 0)")
    elif steps is not None:
        raise ValueError(f"warmup_steps={steps!r} is only used with warmup='linear', not warmup={warmup!r}")
    if not isinstance(start, (int, float)) or isinstance(start, bool) or not 0.0 <= start <= 1.0:
        raise ValueError(f"Invalid warmup_start: {start!r} (expected a number in [0, 1])")
    if start != 0.0 and warmup != "linear":
        raise ValueError(f"warmup_start={start!r} is only used with warmup='linear', not warmup={warmup!r}")
    schedules.from_dict(group["schedule"])


def _default_seed() -> int:
    """A seed drawn from torch's global generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


class FusedOptimizer(Optimizer):
    """Shared machinery of the fused optimizers; use :class:`AdamW`, :class:`SGD` or :class:`Lion`.

    Subclasses name their operator, the state tensors it updates and the hyperparameters it
    takes from each param group. This class holds what every optimizer shares: the checks, the
    step in the backward pass (``backward_step``), gradient clipping, loss scaling and the record
    of skipped non-finite gradient elements; see :class:`AdamW` for the arguments.
    """

    _op_name: str
    _hyper_names: tuple[str, ...]
    _op_states: tuple[str, ...]  # the operator's state-list arguments, in order
    _warmups: tuple[str, ...]    # the warmups the rule supports

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any], *,
                 backward_step: bool = False, bucket_cap_mb: float = 25.0, max_grad_norm: float | None = None,
                 clip: str = "global", loss_scale: float | str | None = None) -> None:
        _check_common(defaults["extra_bits"], defaults["state_dtype"], defaults["seed"])
        _check_driver(backward_step, bucket_cap_mb, max_grad_norm, clip, loss_scale)
        _check_arithmetic(defaults.get("arithmetic", "ieee"))
        _check_update_control(defaults)
        defaults["schedule"] = schedules.as_dict(defaults["schedule"])
        _check_warmup(type(self).__name__, self._warmups, defaults)
        if defaults["seed"] is None:
            defaults["seed"] = _default_seed()
        self._options = dict(backward_step=backward_step, bucket_cap_mb=bucket_cap_mb, max_grad_norm=max_grad_norm,
                             clip=clip, loss_scale=loss_scale)
        self._reset_runtime()
        super().__init__(params, defaults)
        _ops.load()
        self._init_scalars()
        if backward_step:
            self._attach_hooks()

    def _reset_runtime(self) -> None:
        """Per-process bookkeeping that is never saved: hooks, pending buckets, this iteration."""
        self._hooks: dict[int, Any] = {}            # id(p) -> hook handle
        self._pending: dict[tuple, list[Tensor]] = {}  # (group index, device, dtype) -> ready parameters
        self._pending_bytes: dict[tuple, int] = {}
        self._updated: dict[int, Tensor] = {}       # parameters updated in the open iteration
        self._skips: list[tuple[list[Tensor], Tensor]] = []  # (parameters, skipped elements) per launch
        self._multipliers: dict[torch.device, Tensor | None] = {}
        self._sq_norms: dict[int, Tensor] = {}     # tensor id -> squared gradient norm, open iteration
        self._iteration_open = False
        self._accumulating = 0
        self._queued_task: int | None = None
        self._index: dict[int, tuple[int, int]] = {}  # id(p) -> (group index, index in group)
        self._ids: dict[int, int] = {}                # id(p) -> tensor id (_tensor_id)
        self._expected: dict[tuple, dict[str, torch.dtype]] = {}  # memo of _expected_state
        self._checked: dict[int, tuple] = {}  # id(p) -> (expected, weak refs of its checked state tensors)
        self._claimed: dict[int, Tensor] = {}
        self._attached = False

    def _init_scalars(self) -> None:
        """Device scalars carried between iterations (and saved): loss scale and lagged clip coefficient."""
        device = self._main_device()
        scale = self._options["loss_scale"]
        self._scale = None
        self._growth_tracker = None
        if scale is not None:
            start = _DYNAMIC_INIT_SCALE if scale == "dynamic" else float(scale)
            self._scale = torch.full((), start, dtype=torch.float32, device=device)
            self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self._clip_coef = torch.ones((), dtype=torch.float32, device=device)
        self._last_grad_norm = torch.full((), float("nan"), dtype=torch.float32, device=device)

    def _main_device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    # ---- options ------------------------------------------------------------------------------

    @property
    def backward_step(self) -> bool:
        """Whether parameters are updated inside the backward pass (see :meth:`close`)."""
        return self._options["backward_step"]

    @property
    def loss_scale(self) -> Tensor | None:
        """The current loss scale as a 0-d float32 device tensor (``None`` without ``loss_scale``).

        Multiply the loss by it before ``backward()``; the update divides the gradients by it.
        With ``loss_scale="dynamic"`` it halves after an iteration with non-finite gradients and
        doubles after 2000 clean iterations, on the device (``torch.amp.GradScaler``'s rule).
        """
        return self._scale

    def last_grad_norm(self) -> Tensor:
        """The global gradient norm of the last iteration, a 0-d float32 device tensor (no sync).

        Computed when ``max_grad_norm`` is set (``nan`` otherwise); it is the norm of the unscaled
        gradients, with non-finite tensors giving ``inf`` or ``nan``.
        """
        return self._last_grad_norm

    # ---- parameters -------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group, checking its parameters and options (see :class:`torch.optim.Optimizer`)."""
        if isinstance(param_group, dict):
            if "schedule" in param_group:
                param_group = {**param_group, "schedule": schedules.as_dict(param_group["schedule"])}
            self._check_group_options(param_group)
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        for i, p in enumerate(group["params"]):
            problem = None
            if p.dtype not in PARAM_DTYPES:
                problem = f"has dtype {p.dtype}; fusedwarm updates float32, bfloat16 and float16 parameters only"
            elif p.layout != torch.strided:
                problem = f"has layout {p.layout}; only dense (strided) parameters are supported"
            elif _is_dtensor(p):
                problem = ("is a DTensor (FSDP2 or tensor parallel); fusedwarm does not support sharded "
                           "parameters yet: use torch.nn.parallel.DistributedDataParallel")
            else:
                owner = _owner(p)
                if owner is not None and owner is not self:
                    problem = (f"is already updated in the backward pass by another {type(owner).__name__} "
                               f"(backward_step=True); a second optimizer would update it twice. Call close() "
                               f"on the other optimizer first")
            if problem is not None:
                self.param_groups.pop()
                label = self._param_label(group, gi, i, p)
                raise TypeError(f"{type(self).__name__}: {label} {problem}")
        self._register_group(gi)
        if self._attached:
            self._attach_hooks()

    def _register_group(self, gi: int) -> None:
        """Indexes the parameters of group ``gi``; their tensor ids continue the earlier groups'."""
        first = sum(len(g["params"]) for g in self.param_groups[:gi])
        for i, p in enumerate(self.param_groups[gi]["params"]):
            self._index.setdefault(id(p), (gi, i))
            self._ids.setdefault(id(p), first + i)

    def _check_group_options(self, group: dict[str, Any]) -> None:
        merged = {**getattr(self, "defaults", {}), **group}
        _check_common(merged.get("extra_bits", 16), merged.get("state_dtype"), merged.get("seed"))
        _check_arithmetic(merged.get("arithmetic", "ieee"))
        _check_update_control(merged)
        self._check_hyper(merged)
        _check_warmup(type(self).__name__, self._warmups, merged)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def _param_label(group: dict[str, Any], group_index: int, index: int, p: Tensor) -> str:
        names = group.get("param_names")
        name = f"'{names[index]}' " if names else ""
        return f"parameter {name}(group {group_index}, index {index}, shape {tuple(p.shape)}, dtype {p.dtype})"

    def _label(self, p: Tensor) -> str:
        gi, i = self._index[id(p)]
        return self._param_label(self.param_groups[gi], gi, i, p)

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def _state_dtype(self, group: dict[str, Any], p: Tensor) -> torch.dtype:
        if group["state_dtype"] is not None:
            return group["state_dtype"]
        return torch.float32 if p.dtype == torch.float32 else torch.bfloat16

    @staticmethod
    def _extra_bits(group: dict[str, Any], p: Tensor) -> int:
        return 0 if p.dtype == torch.float32 else group["extra_bits"]

    def _tensor_id(self, p: Tensor) -> int:
        """Index of ``p`` in the optimizer (all groups, in order): its random-stream key."""
        return self._ids[id(p)]

    # ---- checks -------------------------------------------------------------------------------

    def _check_grad(self, group: dict[str, Any], gi: int, i: int, p: Tensor, g: Tensor) -> None:
        def what() -> str:  # built only for an error message: step() checks every parameter
            return f"{type(self).__name__}: {self._param_label(group, gi, i, p)}"

        if not (g.dtype == p.dtype and g.shape == p.shape and g.device == p.device and g.layout == torch.strided):
            if g.layout != torch.strided:
                raise RuntimeError(
                    f"{what()} has a sparse gradient ({g.layout}); fusedwarm supports dense gradients only")
            if g.is_complex():
                raise RuntimeError(
                    f"{what()} has a complex gradient ({g.dtype}); fusedwarm supports real gradients only")
            raise RuntimeError(
                f"{what()} has a gradient of dtype {g.dtype}, shape {tuple(g.shape)} on {g.device}; "
                f"expected dtype {p.dtype}, shape {tuple(p.shape)} on {p.device}"
            )
        state = self.state.get(p)
        if not state:
            return
        # A complete state passed this check at an earlier step if it still holds the same tensors
        # under the same options (weak references: a checked tensor is never kept alive by this).
        expected = self._expected_state(group, p)
        known = self._checked.get(id(p))
        if known is not None and known[0] is expected and all(state.get(name) is ref() for name, ref in known[1]):
            return
        self._check_state(group, what, p, state, RuntimeError)
        if all(name in state for name in expected):
            self._checked[id(p)] = (expected, tuple((name, weakref.ref(state[name])) for name in expected))

    def _expected_state(self, group: dict[str, Any], p: Tensor) -> dict[str, torch.dtype]:
        """The state tensors of ``p`` under ``group``'s options, with their dtypes (do not modify)."""
        key = (self._extra_bits(group, p), self._state_dtype(group, p), self._state_names(group))
        expected = self._expected.get(key)
        if expected is None:
            k, dtype, names = key
            expected = {"step": torch.int64, **({"extra": _EXTRA_DTYPE[k]} if k else {}),
                        **{name: dtype for name in names}}
            self._expected[key] = expected
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

    # ---- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step, or with ``backward_step=True`` ends the iteration.

        In backward-step mode the parameters were already updated during ``backward()``; this
        call updates any parameter that still holds a gradient (e.g. one accumulated under
        :meth:`accumulate`), frees the gradients, and closes the iteration: the lagged clipping
        coefficient and the dynamic loss scale are updated on the device, and the next backward
        may update every parameter again.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._flush_all()

        # Check every gradient before touching anything, so a bad one changes nothing. Each
        # group's parameters with a gradient are bucketed by (device, dtype): one call each.
        work: list[tuple[int, dict[tuple[torch.device, torch.dtype], list[Tensor]]]] = []
        for gi, group in enumerate(self.param_groups):
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for i, p in enumerate(group["params"]):
                if p.grad is not None and id(p) not in self._updated:
                    self._check_grad(group, gi, i, p, p.grad)
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            if buckets:
                work.append((gi, buckets))
        if work:
            self._begin_iteration()
            if self._options["max_grad_norm"] is not None and self._options["clip"] == "global":
                self._global_clip([p for _, buckets in work for params in buckets.values() for p in params])
            for gi, buckets in work:
                for params in buckets.values():
                    self._launch(gi, params, [p.grad for p in params])
                    for p in params:
                        self._updated[id(p)] = p
        if self.backward_step:
            for p in self._updated.values():
                p.grad = None
        self._end_iteration()
        return loss

    def _begin_iteration(self) -> None:
        if self._iteration_open:
            return
        self._iteration_open = True
        self._skips = []
        self._multipliers = {}
        self._sq_norms = {}

    def _end_iteration(self) -> None:
        """Closes the iteration: loss-scale and lagged-clipping updates, all on the device."""
        if not self._iteration_open:
            return
        self._iteration_open = False
        self._updated = {}
        if self._scale is not None and self._options["loss_scale"] == "dynamic":
            found_inf = (self.nonfinite_count() > 0).to(torch.float32)
            torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf, 2.0, 0.5, _DYNAMIC_INTERVAL)
        if self._sq_norms:
            # Summed in tensor order, not launch order: the same bits with and without backward_step.
            norm = torch.stack([self._sq_norms[k] for k in sorted(self._sq_norms)]).sum().sqrt()
            self._last_grad_norm = norm
            if self._options["clip"] == "lagged":
                # A non-finite norm (skipped elements) keeps the previous coefficient.
                coef = _clip_coefficient(self._options["max_grad_norm"], norm)
                self._clip_coef = torch.where(torch.isfinite(norm), coef, self._clip_coef)

    def _global_clip(self, params: list[Tensor]) -> None:
        """Exact global-norm clipping (``clip="global"``, not in backward-step mode)."""
        main = self._main_device()
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p.grad)
        squares = [torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).square().sum().to(main)
                   for grads in by_device.values()]
        norm = torch.stack(squares).sum().sqrt()
        if self._scale is not None:
            norm = norm / self._scale
        self._last_grad_norm = norm
        self._clip_coef = _clip_coefficient(self._options["max_grad_norm"], norm)

    def _multiplier(self, device: torch.device) -> Tensor | None:
        """The gradient multiplier shared by every tensor of this iteration on ``device``, or None for 1."""
        if device not in self._multipliers:
            m = None
            if self._scale is not None:
                m = self._scale.reciprocal()
            if self._options["max_grad_norm"] is not None and self._options["clip"] in ("global", "lagged"):
                m = self._clip_coef if m is None else m * self._clip_coef
            self._multipliers[device] = None if m is None else m.to(device)
        return self._multipliers[device]

    def _grad_scales(self, device: torch.device, ids: list[int], grads: list[Tensor]) -> Tensor | None:
        """Per-tensor gradient multipliers for one launch: loss scale and clipping, on the device."""
        m = self._multiplier(device)
        clip = self._options["clip"] if self._options["max_grad_norm"] is not None else None
        if clip in ("tensor", "lagged"):
            norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
            if self._scale is not None:
                norms = norms / self._scale.to(device)
            self._sq_norms.update(zip(ids, norms.square().to(self._main_device()).unbind()))
            if clip == "tensor":
                coef = _clip_coefficient(self._options["max_grad_norm"], norms)
                return coef if m is None else coef * m
        if m is None:
            return None
        return m.expand(len(grads)).contiguous()

    def _launch(self, gi: int, params: list[Tensor], grads: list[Tensor]) -> None:
        """Updates ``params`` (one group, device and dtype) with the given gradients.

        One fused call, or two with ``update_control="rotational"``: tensors of one dimension
        (gains, biases; excluded by Kosson et al. 2024) take the plain step with weight decay.
        """
        control = self.param_groups[gi].get("update_control")
        if control == "rotational":
            rot = [i for i, p in enumerate(params) if p.dim() >= 2]
            plain = [i for i, p in enumerate(params) if p.dim() < 2]
            if rot:
                self._launch_call(gi, [params[i] for i in rot], [grads[i] for i in rot],
                                  dict(rotational=True, update_rows=[_update_rows("row", params[i]) for i in rot]))
            if plain:
                self._launch_call(gi, [params[i] for i in plain], [grads[i] for i in plain], {})
        elif control is not None:
            self._launch_call(gi, params, grads, dict(update_norm=float(self.param_groups[gi]["update_norm"]),
                                                      update_rows=[_update_rows(control, p) for p in params]))
        else:
            self._launch_call(gi, params, grads, {})

    def _launch_call(self, gi: int, params: list[Tensor], grads: list[Tensor], controls: dict[str, Any]) -> None:
        """One fused call for ``params`` with the op's update-size control arguments ``controls``."""
        group = self.param_groups[gi]
        device = params[0].device
        states = [self._init_state(group, p) for p in params]
        used = self._state_names(group)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        # Parameters that are not contiguous are updated through a contiguous copy.
        work = [p if p.is_contiguous() else p.contiguous() for p in params]
        lr = group["lr"]
        lr_tensor = lr.to(device=device, dtype=torch.float32).reshape(()) if isinstance(lr, Tensor) else None
        skipped = torch.zeros(len(params), dtype=torch.int64, device=device)
        ids = [self._tensor_id(p) for p in params]
        getattr(_ops.load(), self._op_name)(
            work,
            [g.contiguous() for g in grads],
            [s["extra"] for s in states if "extra" in s],
            # A state the group does not use (SGD's buffer without momentum) goes as an empty list.
            *[[s[n] for s in states] if n in used else [] for n in self._op_states],
            steps,
            ids,
            lr_tensor,
            0.0 if lr_tensor is not None else float(lr),
            self._extra_bits(group, params[0]),
            group["seed"],
            *[self._hyper_value(group, n) for n in self._hyper_names],
            arithmetic=group.get("arithmetic", "ieee"),
            grad_scales=self._grad_scales(device, ids, grads),
            nonfinite=skipped,
            **self._schedule_args(group),
            **controls,
        )
        self._skips.append((params, skipped))
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    def _schedule_args(self, group: dict[str, Any]) -> dict[str, Any]:
        """The op's warmup and schedule arguments for ``group`` (and AdamW's ``v_init``)."""
        warmup = group["warmup"]
        if warmup == "untuned" and "betas" not in group:
            warmup = "none"  # SGD: see the module docstring
        return dict(warmup=warmup, warmup_steps=group["warmup_steps"] or 0,
                    warmup_start=float(group["warmup_start"]),
                    **schedules.from_dict(group["schedule"]).op_args())

    def last_factors(self) -> list[dict[str, Tensor]]:
        """The learning-rate factors of each param group's last update, as device tensors (no sync).

        They are computed from the group's first parameter's step counter by the same header
        functions the update kernel runs, so they are bit for bit what the update used (before the
        first update: those of update 1).

        Returns:
            One dict per param group with 0-d float32 tensors on the group's device: ``"warmup"``,
            ``"schedule"``, ``"lr"`` (the group's lr times both: the learning rate of the update)
            and ``"adaptive"`` (0 during RAdam's momentum-SGD fallback, else 1).
        """
        out = []
        for group in self.param_groups:
            params = group["params"]
            device = params[0].device if params else self._main_device()
            step = next((self.state[p]["step"] for p in params if "step" in self.state.get(p, {})),
                        torch.zeros((), dtype=torch.int64, device=device))
            args = self._schedule_args(group)
            args.pop("v_init", None)
            beta2 = float(group["betas"][1]) if "betas" in group else 0.0
            f = _ops.load().schedule_factors(step, beta2, **args)
            lr = group["lr"]
            lr = lr.to(device=device, dtype=torch.float32).reshape(()) if isinstance(lr, Tensor) else float(lr)
            out.append({"warmup": f[0], "schedule": f[1], "lr": f[2] * lr, "adaptive": f[3]})
        return out

    @staticmethod
    def _hyper_value(group: dict[str, Any], name: str) -> Any:
        if name in ("beta1", "beta2"):
            return float(group["betas"][0 if name == "beta1" else 1])
        value = group[name]
        return value if isinstance(value, bool) else float(value)

    # ---- non-finite gradients -----------------------------------------------------------------

    def nonfinite_count(self) -> Tensor:
        """Elements skipped for a non-finite gradient in the last iteration: a 0-d int64 device tensor.

        Never synchronizes; ``bool(opt.nonfinite_count())`` does, when you want to act on it.
        """
        main = self._main_device()
        if not self._skips:
            return torch.zeros((), dtype=torch.int64, device=main)
        return torch.stack([counts.sum().to(main) for _, counts in self._skips]).sum()

    def nonfinite_params(self) -> dict[str, int]:
        """Which parameters had elements skipped in the last iteration, and how many (synchronizes).

        Returns:
            A dict from a parameter's label (name if the group has ``param_names``, else group and
            index) to its number of skipped elements; empty when every gradient was finite.
        """
        found: dict[str, int] = {}
        for params, counts in self._skips:
            for p, n in zip(params, counts.tolist()):
                if n:
                    found[self._label(p)] = n
        return found

    # ---- step in the backward pass ------------------------------------------------------------

    def _attach_hooks(self) -> None:
        """Registers a post-accumulate-grad hook on every parameter that requires a gradient."""
        self._attached = True
        ref = weakref.ref(self)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._hooks or not p.requires_grad:
                    continue
                _claim(p, self)
                self._claimed[id(p)] = p

                def hook(param: Tensor, ref=ref) -> None:
                    opt = ref()
                    if opt is not None:
                        opt._grad_ready(param)

                self._hooks[id(p)] = (p, p.register_post_accumulate_grad_hook(hook))

    def _check_ready(self, p: Tensor, g: Tensor) -> None:
        """Checks a gradient that arrives during backward (hook or DDP bucket) before ``p`` is updated."""
        if id(p) in self._updated:
            raise RuntimeError(
                f"{type(self).__name__}: {self._label(p)} received a second gradient in one iteration (backward "
                f"ran twice, e.g. with retain_graph=True, without opt.step() in between). With backward_step=True, "
                f"call opt.step() after each backward, or sum gradients over several backward passes inside "
                f"opt.accumulate()"
            )
        gi, i = self._index[id(p)]
        self._check_grad(self.param_groups[gi], gi, i, p, g)

    @torch.no_grad()
    def _grad_ready(self, p: Tensor) -> None:
        """Called by autograd once ``p.grad`` is complete for this backward: bucket ``p``, maybe flush."""
        entry = self._hooks.get(id(p))
        if entry is None or entry[0] is not p or self._accumulating:
            return
        self._check_ready(p, p.grad)
        self._begin_iteration()
        self._updated[id(p)] = p
        task = torch._C._current_graph_task_id()
        if task != self._queued_task:
            self._queued_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._flush_all)
        key = (self._index[id(p)][0], p.device, p.dtype)
        self._pending.setdefault(key, []).append(p)
        self._pending_bytes[key] = self._pending_bytes.get(key, 0) + p.grad.numel() * p.grad.element_size()
        if self._pending_bytes[key] >= self._options["bucket_cap_mb"] * 2**20:
            self._flush(key)

    def _flush(self, key: tuple) -> None:
        params = self._pending.pop(key)
        del self._pending_bytes[key]
        self._launch(key[0], params, [p.grad for p in params])
        for p in params:
            p.grad = None

    @torch.no_grad()
    def _flush_all(self) -> None:
        """Updates every bucket still pending (end of backward, and the start of step())."""
        self._queued_task = None
        for key in list(self._pending):
            self._flush(key)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Keeps gradients instead of stepping, for gradient accumulation with ``backward_step=True``.

        Inside the block, ``backward()`` accumulates into ``.grad`` as plain autograd does. The
        next ``backward()`` outside the block adds its gradients and updates each parameter as
        usual (so its result equals one step on the summed gradients); alternatively
        :meth:`step` updates every parameter that holds a gradient. Scale each micro-batch's loss
        (e.g. by ``1 / micro_batches``) as you would without fusedwarm.
        """
        self._accumulating += 1
        try:
            yield
        finally:
            self._accumulating -= 1

    def close(self) -> None:
        """Removes the backward hooks: autograd fills ``.grad`` again and :meth:`step` updates as usual.

        Pending buckets are flushed first. Calling it twice, or without ``backward_step``, is harmless.
        """
        self._flush_all()
        for _, handle in self._hooks.values():
            handle.remove()
        for p in self._claimed.values():
            _release(p, self)
        self._hooks = {}
        self._claimed = {}
        self._attached = False
        self._options["backward_step"] = False

    def register_ddp_comm_hook(self, ddp_model: torch.nn.Module) -> None:
        """Runs the fused update on each DDP bucket right after its all-reduce.

        For ``backward_step=True`` under :class:`torch.nn.parallel.DistributedDataParallel`: the
        per-parameter hooks (which would see local, un-reduced gradients) are replaced by a DDP
        communication hook that all-reduces a bucket, averages it, and updates the bucket's
        parameters at once, so updates overlap the remaining communication. DDP keeps its own
        bucket buffers (a full set of gradients), so under DDP the saving is time, not memory;
        ``gradient_as_bucket_view=True`` at least avoids DDP's second copy in ``.grad``. After
        :meth:`close` the hook only averages and :meth:`step` updates as usual.

        Args:
            ddp_model: the ``DistributedDataParallel`` module wrapping this optimizer's parameters.
        """
        import torch.distributed as dist

        if not self.backward_step:
            raise RuntimeError(f"{type(self).__name__}.register_ddp_comm_hook needs backward_step=True")
        for _, handle in self._hooks.values():
            handle.remove()
        self._hooks = {}
        self._attached = False
        ref = weakref.ref(self)
        # The process group may run `update` on its worker threads (gloo does), several buckets at
        # once; the per-iteration bookkeeping is not thread-safe, so bucket updates take turns.
        lock = threading.Lock()

        # No annotations: DDP checks them against dist.GradBucket and Future[Tensor], and with
        # `from __future__ import annotations` they would be strings and be rejected.
        def comm_hook(process_group, bucket):
            group = process_group if process_group is not None else dist.group.WORLD
            world = dist.get_world_size(group)
            fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()

            def update(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
                buffer = fut.value()[0].div_(world)
                opt = ref()
                # After close() the hook only averages, as DDP's default; step() then updates.
                if opt is not None and opt.backward_step:
                    with lock:
                        opt._ddp_update(bucket.parameters(), buffer)
                return buffer

            return fut.then(update)

        ddp_model.register_comm_hook(ddp_model.process_group, comm_hook)

    @torch.no_grad()
    def _ddp_update(self, params: list[Tensor], buffer: Tensor) -> None:
        """Updates one DDP bucket's parameters with their slices of the reduced flat buffer."""
        by_group: dict[tuple[int, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        offset = 0
        for p in params:
            g = buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if id(p) not in self._index:
                continue
            self._check_ready(p, g)
            entry = by_group.setdefault((self._index[id(p)][0], p.dtype), ([], []))
            entry[0].append(p)
            entry[1].append(g)
        self._begin_iteration()
        for (gi, _), (ps, gs) in by_group.items():
            self._launch(gi, ps, gs)
            for p in ps:
                self._updated[id(p)] = p

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

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``"fusedwarm"``: the loss scale and lagged clipping scalars."""
        sd = super().state_dict()
        sd["fusedwarm"] = {k: v.clone() for k, v in self._scalars().items() if v is not None}
        return sd

    def _scalars(self) -> dict[str, Tensor | None]:
        return {"loss_scale": self._scale, "growth_tracker": self._growth_tracker, "clip_coef": self._clip_coef,
                "last_grad_norm": self._last_grad_norm}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_options"] = self._options
        state.update({f"_saved_{k}": v for k, v in self._scalars().items()})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also comes through here, with new "state" and "param_groups"
        # only; a whole optimizer (unpickled or deep-copied) brings its options and scalars.
        if "_options" not in state:
            super().__setstate__(state)
            return
        saved = {k[len("_saved_"):]: state.pop(k) for k in list(state) if k.startswith("_saved_")}
        super().__setstate__(state)
        self._reset_runtime()
        for gi in range(len(self.param_groups)):
            self._register_group(gi)
        self._scale, self._growth_tracker = saved["loss_scale"], saved["growth_tracker"]
        self._clip_coef, self._last_grad_norm = saved["clip_coef"], saved["last_grad_norm"]
        if self.backward_step:
            self._attach_hooks()

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
        scalars = state_dict.get("fusedwarm", {})
        for key, value in scalars.items():
            current = self._scalars().get(key, ...)
            if current is ... or not isinstance(value, Tensor) or value.shape != () or (
                    current is not None and value.dtype != current.dtype):
                raise ValueError(f"{name}.load_state_dict: unexpected 'fusedwarm' entry {key!r}: {value!r}")
            if current is None:
                raise ValueError(f"{name}.load_state_dict: the state dict has a {key!r} but this optimizer was "
                                 f"made without it (loss_scale=None)")
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
        for key, value in scalars.items():
            self._scalars()[key].copy_(value)


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
        backward_step: update each parameter inside ``backward()`` as soon as its gradient is
            complete, then free the gradient (Lewandowski & Kosson 2023); ``step()`` then only
            ends the iteration. See the module docstring.
        bucket_cap_mb: with ``backward_step``, ready gradients are collected per (group, device,
            dtype) until they hold this many MiB, then updated in one fused call.
        max_grad_norm: clip gradients to this norm (None: no clipping).
        clip: ``"global"`` (exact global norm, as ``torch.nn.utils.clip_grad_norm_``; not with
            ``backward_step``), ``"tensor"`` (each tensor by its own norm) or ``"lagged"`` (the
            global norm of the previous iteration, computed on the device).
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
            2024; module docstring).
        update_norm: the bound, ``||u|| <= update_norm * ||p||`` (a number > 0; only with
            ``update_control``).
    """

    _op_name = "adamw_"
    _op_states = ("exp_avg", "exp_avg_sq")
    _hyper_names = ("beta1", "beta2", "eps", "weight_decay", "maximize")
    _warmups = WARMUPS

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
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                        extra_bits=extra_bits, state_dtype=state_dtype, seed=seed, arithmetic=arithmetic,
                        warmup=warmup, warmup_steps=warmup_steps, warmup_start=warmup_start, schedule=schedule,
                        v_init=v_init, update_control=update_control, update_norm=update_norm)
        self._check_hyper(defaults)
        super().__init__(params, defaults, backward_step=backward_step, bucket_cap_mb=bucket_cap_mb,
                         max_grad_norm=max_grad_norm, clip=clip, loss_scale=loss_scale)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _check_lr_betas(group)
        _check_nonneg("eps", group["eps"])
        _check_nonneg("weight_decay", group["weight_decay"])
        if group.get("v_init", "zero") not in V_INITS:
            raise ValueError(f"Invalid v_init: {group['v_init']!r} (expected one of {V_INITS})")
        if group.get("warmup") == "radam" and not group["betas"][1] > 0.6:
            raise ValueError(f"warmup='radam' needs beta2 > 0.6 (rho_inf > 4), got {group['betas'][1]!r}")
        if group.get("v_init") == "grad" and group.get("warmup") == "radam":
            raise ValueError("v_init='grad' and warmup='radam' both correct the zero-initialized second moment; "
                             "choose one")

    def _schedule_args(self, group: dict[str, Any]) -> dict[str, Any]:
        return {**super()._schedule_args(group), "v_init": group["v_init"]}

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
        warmup: ``"untuned"`` (default) means no warmup for SGD: Ma & Yarats's rule covers the
            zero-initialized EMA of an adaptive optimizer, and SGD has none, so the default keeps
            :class:`torch.optim.SGD`'s behaviour. ``"linear"`` (with ``warmup_steps``,
            ``warmup_start``) and ``"none"`` are supported.
        extra_bits, state_dtype, seed, arithmetic, warmup_steps, warmup_start, schedule, backward_step,
            bucket_cap_mb, max_grad_norm, clip, loss_scale, update_control, update_norm: see :class:`AdamW`.
    """

    _op_name = "sgd_"
    _op_states = ("momentum_buffer",)
    _hyper_names = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _warmups = ("untuned", "linear", "none")

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
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, extra_bits=extra_bits, state_dtype=state_dtype,
                        seed=seed, arithmetic=arithmetic, warmup=warmup, warmup_steps=warmup_steps,
                        warmup_start=warmup_start, schedule=schedule, update_control=update_control,
                        update_norm=update_norm)
        self._check_hyper(defaults)
        super().__init__(params, defaults, backward_step=backward_step, bucket_cap_mb=bucket_cap_mb,
                         max_grad_norm=max_grad_norm, clip=clip, loss_scale=loss_scale)

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
        warmup: ``"untuned"`` (default) uses Lion's ``beta2``, the coefficient of its momentum EMA
            (not a second moment): linear over ``2 / (1 - beta2)`` updates (200 for 0.99), the time
            the zero-initialized momentum takes to forget its start (``beta2^t = e^-2``). Lion's
            sign update has full size from the first step, so this is the analogue of Ma & Yarats's
            rule rather than their derivation. ``"untuned-exp"``, ``"linear"`` and ``"none"`` are
            supported; ``"radam"`` (no second moment) is not.
        extra_bits, state_dtype, seed, arithmetic, warmup_steps, warmup_start, schedule, backward_step,
            bucket_cap_mb, max_grad_norm, clip, loss_scale, update_control, update_norm: see :class:`AdamW`.
    """

    _op_name = "lion_"
    _op_states = ("exp_avg",)
    _hyper_names = ("beta1", "beta2", "weight_decay", "maximize")
    _warmups = ("untuned", "untuned-exp", "linear", "none")

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
                        state_dtype=state_dtype, seed=seed, arithmetic=arithmetic, warmup=warmup,
                        warmup_steps=warmup_steps, warmup_start=warmup_start, schedule=schedule,
                        update_control=update_control, update_norm=update_norm)
        self._check_hyper(defaults)
        super().__init__(params, defaults, backward_step=backward_step, bucket_cap_mb=bucket_cap_mb,
                         max_grad_norm=max_grad_norm, clip=clip, loss_scale=loss_scale)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        _check_lr_betas(group)
        _check_nonneg("weight_decay", group["weight_decay"])

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg",)
