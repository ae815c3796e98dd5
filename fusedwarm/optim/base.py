"""The base class of the fused optimizers: param groups, one fused launch per group, reporting.

This module owns what every fused optimizer shares: registering param groups and parameters
(with their tensor ids, the random-stream keys), creating and checking state through
:mod:`fusedwarm._states`, ``step()`` (gradient checks before anything changes, then one fused call
per group, device and dtype), the open iteration's bookkeeping, and reporting (schedule factors,
skipped non-finite elements, master weights). It delegates argument checks to
:mod:`fusedwarm._validation`, clipping and loss scaling to :mod:`fusedwarm._scaling`, the step in
the backward pass to :mod:`fusedwarm.backward` and checkpoints to :mod:`fusedwarm._checkpoint`; the
update rules themselves live in the kernels (``csrc/include/fusedwarm/update.cuh``), never here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _ops, _sharding, _validation, backward, schedules
from .._eager import eager, undecorated
from .._checkpoint import Checkpointing
from .._reporting import Reporting
from .._scaling import GradScaling
from .._states import (DEFAULT_EXTRA_BITS, SCALE_SUFFIX, STORAGE_OPTIONS, StateLayout, extra_bits, state_bits,
                       state_block)


def _default_seed() -> int:
    """A seed derived from torch's global generator without drawing from it.

    torch.optim's optimizers consume no random numbers, so swapping one for a fusedwarm optimizer
    must not shift later dropout masks or data order: the generator's state is hashed, not advanced.
    ``torch.manual_seed`` makes the seed repeatable, and optimizers made at different points of a
    run (after other draws) get different streams.
    """
    state = torch.default_generator.get_state().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") >> 2


def _update_rows(control: str, p: Tensor) -> int:
    """The number of rows ``p``'s update is bounded in: its (local) output rows for ``"row"`` and 2-D+."""
    shard = _sharding.local(p)
    return shard.shape[0] if control == "row" and p.dim() >= 2 and shard.numel() > 0 else 1


class FusedOptimizer(Checkpointing, Reporting, backward.BackwardStepMethods, Optimizer):
    """Shared machinery of the fused optimizers; use :class:`AdamW`, :class:`SGD` or :class:`Lion`.

    Subclasses name their operator, the state tensors it updates and the hyperparameters it
    takes from each param group, and check those hyperparameters; see :class:`AdamW` for the
    arguments every optimizer takes.
    """

    _op_name: str
    _hyper_names: tuple[str, ...]
    _op_states: tuple[str, ...]  # the operator's state-list arguments, in order
    _warmups: tuple[str, ...]    # the warmups the rule supports

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any], *,
                 backward_step: bool = False, bucket_cap_mb: float = 25.0, max_grad_norm: float | None = None,
                 clip: str = "global", loss_scale: float | str | None = None) -> None:
        # Storage options given here win over a loaded checkpoint's; unset ones follow it (_checkpoint).
        storage_given = frozenset(k for k in STORAGE_OPTIONS if defaults[k] is not None)
        if defaults["extra_bits"] is None:
            defaults["extra_bits"] = DEFAULT_EXTRA_BITS
        _validation.check_storage(defaults["extra_bits"], defaults["state_dtype"], defaults["seed"],
                                  defaults["state_block"])
        _validation.check_driver(backward_step, bucket_cap_mb, max_grad_norm, clip, loss_scale)
        _validation.check_arithmetic(defaults.get("arithmetic", "ieee"))
        _validation.check_update_control(defaults)
        defaults["schedule"] = schedules.as_dict(defaults["schedule"])
        _validation.check_warmup(type(self).__name__, self._warmups, defaults)
        if defaults["seed"] is None:
            defaults["seed"] = _default_seed()
        self._options = dict(backward_step=backward_step, bucket_cap_mb=bucket_cap_mb, max_grad_norm=max_grad_norm,
                             clip=clip, loss_scale=loss_scale, storage_defaults=storage_given, storage_given=[])
        self._reset_runtime()
        super().__init__(params, defaults)
        _ops.load()
        self._init_scalars()
        if backward_step:
            self._backward.attach()

    def _reset_runtime(self) -> None:
        """Per-process bookkeeping that is never saved: hooks, memos, the open iteration."""
        self._backward = backward.BackwardStep(self, self._options["bucket_cap_mb"])
        self._states = StateLayout(self._state_names)
        self._updated: dict[int, Tensor] = {}  # parameters updated in the open iteration
        self._skips: list[tuple[list[Tensor], Tensor]] = []  # (parameters, skipped elements) per launch
        self._iteration_open = False
        self._index: dict[int, tuple[int, int]] = {}  # id(p) -> (group index, index in group)
        self._ids: dict[int, int] = {}                # id(p) -> index in the optimizer: random-stream key

    def _init_scalars(self, saved: dict[str, Tensor | None] | None = None) -> None:
        """The loss-scale and clipping state, new on the main device or ``saved`` (see ``_checkpoint``)."""
        o = self._options
        self._scaling = GradScaling(o["max_grad_norm"], o["clip"], o["loss_scale"], self._main_device())
        if saved is not None:
            self._scaling.restore(saved)

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

    def _scalars(self) -> dict[str, Tensor | None]:
        return self._scaling.scalars()

    # ---- parameters -------------------------------------------------------------------------

    @eager  # as torch.optim.Optimizer's; it changes bookkeeping and hooks (see step())
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group, checking its parameters and options (see :class:`torch.optim.Optimizer`)."""
        if isinstance(param_group, dict):
            if "schedule" in param_group:
                param_group = {**param_group, "schedule": schedules.as_dict(param_group["schedule"])}
            self._check_group_options(param_group)
        # Before torch fills the defaults into the group: the storage options given for it.
        given = self._options["storage_defaults"] | {k for k in STORAGE_OPTIONS if param_group.get(k) is not None}
        undecorated(Optimizer.add_param_group)(self, param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        for i, p in enumerate(group["params"]):
            problem = _validation.param_problem(p)
            owner = backward.owner(p)
            if problem is None and owner is not None and owner is not self:
                problem = (f"is already updated in the backward pass by another {type(owner).__name__} "
                           f"(backward_step=True); a second optimizer would update it twice. Call close() "
                           f"on the other optimizer first")
            if problem is not None:
                self.param_groups.pop()
                raise TypeError(f"{type(self).__name__}: {self._param_label(group, gi, i, p)} {problem}")
        self._options["storage_given"].append(given)
        self._register_group(gi)
        if self._backward.attached:
            self._backward.attach()

    def _register_group(self, gi: int) -> None:
        """Indexes the parameters of group ``gi``; their tensor ids continue the earlier groups'."""
        first = sum(len(g["params"]) for g in self.param_groups[:gi])
        for i, p in enumerate(self.param_groups[gi]["params"]):
            self._index.setdefault(id(p), (gi, i))
            self._ids.setdefault(id(p), first + i)

    def _check_group_options(self, group: dict[str, Any]) -> None:
        _validation.check_group(type(self).__name__, self._warmups, self._check_hyper,
                                {**getattr(self, "defaults", {}), **group})

    def _check_hyper(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _state_names(self, group: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    @staticmethod
    def _param_label(group: dict[str, Any], group_index: int, index: int, p: Tensor) -> str:
        names = group.get("param_names")
        name = f"'{names[index]}' " if names else ""
        return f"parameter {name}(group {group_index}, index {index}, shape {tuple(p.shape)}, dtype {p.dtype})"

    def _label(self, p: Tensor) -> str:
        gi, i = self._index[id(p)]
        return self._param_label(self.param_groups[gi], gi, i, p)

    def _check_grad(self, group: dict[str, Any], gi: int, i: int, p: Tensor, g: Tensor) -> None:
        """Checks ``p``'s gradient ``g`` and ``p``'s existing state before an update."""
        def what() -> str:  # built only for an error message: step() checks every parameter
            return f"{type(self).__name__}: {self._param_label(group, gi, i, p)}"

        _validation.check_grad(what, p, g)
        self._states.check_for_step(group, what, p, self.state.get(p))

    # ---- step ---------------------------------------------------------------------------------

    @eager(reason="fusedwarm runs optimizer.step() eagerly (README: torch.compile)")
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step, or with ``backward_step=True`` ends the iteration.

        In backward-step mode the parameters were already updated during ``backward()``; this
        call updates any parameter that still holds a gradient (e.g. one accumulated under
        :meth:`accumulate`), frees the gradients, and closes the iteration: the lagged clipping
        coefficient and the dynamic loss scale are updated on the device, and the next backward
        may update every parameter again.

        Under ``torch.compile`` it always runs eagerly (one deliberate graph break): dynamo drops
        attribute assignments made on a ``torch.optim.Optimizer`` in a traced frame, which once made
        a traced step a silent no-op after its first call (README, "torch.compile").

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by ``closure``, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._backward.flush_all()

        # Check every gradient before touching anything, so a bad one changes nothing. Each
        # group's parameters with a gradient are bucketed by (device, dtype): one call each.
        # (The loop is the per-tensor host cost of every step: the common case, a gradient of the
        # parameter's dtype, shape and device and a state checked at an earlier step, costs a few
        # attribute reads and dict lookups; anything else takes the full checks.)
        work: list[tuple[int, dict[tuple[torch.device, torch.dtype], list[Tensor]]]] = []
        state = self.state
        updated = self._updated
        checked = self._states.checked_state
        strided = torch.strided
        for gi, group in enumerate(self.param_groups):
            buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            for i, p in enumerate(group["params"]):
                g = p.grad
                if g is None or id(p) in updated:
                    continue
                dtype, device = p.dtype, p.device
                if (g.dtype != dtype or g.device != device or g.shape != p.shape or g.layout != strided
                        or checked(group, p, state.get(p)) is None):
                    self._check_grad(group, gi, i, p, g)
                bucket = buckets.get((device, dtype))
                if bucket is None:
                    buckets[(device, dtype)] = bucket = []
                bucket.append(p)
            if buckets:
                work.append((gi, buckets))
        if work:
            self._begin_iteration()
            if self._scaling.clipping == "global":
                self._scaling.global_clip([p.grad for _, buckets in work for ps in buckets.values() for p in ps],
                                          self._main_device())
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

    @eager  # as torch.optim.Optimizer's, whose own wrapper would import torch._dynamo (see _eager)
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients, as :meth:`torch.optim.Optimizer.zero_grad`."""
        undecorated(Optimizer.zero_grad)(self, set_to_none)

    def _begin_iteration(self) -> None:
        if self._iteration_open:
            return
        self._iteration_open = True
        self._skips.clear()
        self._scaling.begin_iteration()

    def _end_iteration(self) -> None:
        """Closes the iteration: loss-scale and lagged-clipping updates, all on the device."""
        if not self._iteration_open:
            return
        self._iteration_open = False
        self._updated.clear()
        self._scaling.end_iteration(self.nonfinite_count)

    def _launch(self, gi: int, params: list[Tensor], grads: list[Tensor]) -> None:
        """Updates ``params`` (one group, device and dtype) with the given gradients.

        One fused call per state layout: with quantized states, parameters too small to be
        quantized keep the default states and take a call of their own.
        """
        group = self.param_groups[gi]
        if isinstance(group["state_dtype"], str):
            quantized = [state_bits(group, p) != 0 for p in params]
            if not all(quantized) and any(quantized):
                for want in (True, False):
                    self._launch_layout(gi, [p for p, q in zip(params, quantized) if q is want],
                                        [g for g, q in zip(grads, quantized) if q is want])
                return
        self._launch_layout(gi, params, grads)

    def _launch_layout(self, gi: int, params: list[Tensor], grads: list[Tensor]) -> None:
        """Updates ``params`` (one group, device, dtype and state layout) with the given gradients.

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
            if control == "tensor" and any(_sharding.is_sharded(p) for p in params):
                raise RuntimeError(f"{type(self).__name__}: update_control='tensor' bounds each update by its whole "
                                   f"tensor's norm, which sharded (FSDP2) parameters do not hold on one rank; use "
                                   f"update_control='row' or 'rotational' (rows are never split by Shard(0))")
            self._launch_call(gi, params, grads, dict(update_norm=float(self.param_groups[gi]["update_norm"]),
                                                      update_rows=[_update_rows(control, p) for p in params]))
        else:
            self._launch_call(gi, params, grads, {})

    def _launch_call(self, gi: int, params: list[Tensor], grads: list[Tensor], controls: dict[str, Any]) -> None:
        """One fused call for ``params`` with the op's update-size control arguments ``controls``."""
        group = self.param_groups[gi]
        device = params[0].device
        state = self.state
        states = [state[p] for p in params]
        complete = len(self._states.expected(group, params[0]))  # one dtype per launch: one layout
        for i, s in enumerate(states):
            if len(s) != complete:
                self._states.create(group, params[i], s)
        used = self._state_names(group)
        steps = [s["step"] for s in states]
        # The kernels see local shards (FSDP2) with their offsets in the full tensor. Parameters
        # that are not contiguous are updated through a contiguous copy.
        sharded = _sharding.any_sharded(params)
        shards = [_sharding.local(p) for p in params] if sharded else params
        work = [p if p.is_contiguous() else p.contiguous() for p in shards]
        offsets = [_sharding.element_offset(p) for p in params] if sharded else None
        local_grads = [_sharding.local(g) for g in grads] if sharded else grads
        if sharded:
            states = [{n: _sharding.local(t) for n, t in s.items()} for s in states]
        lr = group["lr"]
        lr_tensor = lr.to(device=device, dtype=torch.float32).reshape(()) if isinstance(lr, Tensor) else None
        skipped = torch.zeros(len(params), dtype=torch.int64, device=device)
        bits = state_bits(group, params[0])
        quantized = [n for n in self._op_states if n in used] if bits else []
        ids = [self._ids[id(p)] for p in params]  # each tensor's index in the optimizer: its random-stream key
        # The overload itself, not the packet: the packet's overload resolution costs ~50 us per call.
        op = getattr(_ops.load(), self._op_name).default
        op(
            work,
            [g.contiguous() for g in local_grads],
            [s["extra"] for s in states if "extra" in s],
            # A state the group does not use (SGD's buffer without momentum) goes as an empty list.
            *[[s[n] for s in states] if n in used else [] for n in self._op_states],
            steps,
            ids,
            lr_tensor,
            0.0 if lr_tensor is not None else float(lr),
            extra_bits(group, params[0]),
            group["seed"],
            *[self._hyper_value(group, n) for n in self._hyper_names],
            arithmetic=group.get("arithmetic", "ieee"),
            grad_scales=self._scaling.grad_scales(device, ids, grads, self._main_device(), len(self._ids)),
            nonfinite=skipped,
            **self._schedule_args(group),
            **controls,
            element_offsets=offsets,
            state_scales=[s[n + SCALE_SUFFIX] for n in quantized for s in states] if quantized else None,
            state_bits=bits,
            state_block=state_block(group, bits) if bits else 0,
            # The op checks everything and loads (compiles on first use) its kernel variant before
            # it changes anything, the step counters included.
            increment_steps=True,
        )
        self._skips.append((params, skipped))
        for p, w in zip(shards, work):
            if w is not p:
                p.copy_(w)

    def _schedule_args(self, group: dict[str, Any]) -> dict[str, Any]:
        """The op's warmup and schedule arguments for ``group``."""
        warmup = group["warmup"]
        if warmup == "untuned" and "betas" not in group:
            warmup = "none"  # SGD: see fusedwarm.optim's docstring
        return dict(warmup=warmup, warmup_steps=group["warmup_steps"] or 0,
                    warmup_start=float(group["warmup_start"]),
                    **schedules.from_dict(group["schedule"]).op_args())

    @staticmethod
    def _hyper_value(group: dict[str, Any], name: str) -> Any:
        if name in ("beta1", "beta2"):
            return float(group["betas"][0 if name == "beta1" else 1])
        value = group[name]
        return value if isinstance(value, bool) else float(value)
