"""Using the fused optimizers inside training frameworks: a clipping guard, accumulation, master EMA.

This package owns the glue between fusedwarm's optimizers and the loops that drive them
(Hugging Face ``transformers.Trainer``, ``accelerate``, PyTorch Lightning, timm's train script, or
a hand-written loop). Two things break when such a loop meets ``backward_step=True``, where each
parameter is updated and its gradient freed during ``backward()`` (Lewandowski & Kosson 2023):

* **Clipping.** The frameworks clip after ``backward()`` with ``torch.nn.utils.clip_grad_norm_`` or
  ``clip_grad_value_`` (``transformers.Trainer`` and accelerate through
  ``Accelerator.clip_grad_norm_``, Lightning's precision plugins directly), when nothing is left
  to clip: the norm comes back 0.0 and the run is the unclipped one. :func:`guard_clipping` makes
  those two functions refuse parameters whose gradients a fused optimizer has consumed.
* **Gradient accumulation.** The frameworks run several backward passes before ``step()``; the
  second gradient of an iteration is refused. The fused optimizer must be inside
  ``opt.accumulate()`` during every backward but the last of an accumulation window:
  :func:`accumulate` does this for accelerate loops, :class:`AccumulationSwitch` for adapters.

The framework adapters live in :mod:`fusedwarm.trainers.huggingface` (a ``TrainerCallback``) and
:mod:`fusedwarm.trainers.lightning` (a Lightning ``Callback``); this module imports no framework.
It also owns :class:`MasterEMA`, an exponential moving average of the float32 master weights:
averaging the bfloat16 weights themselves (``torch.optim.swa_utils.AveragedModel`` on a bfloat16
model, timm's ``ModelEma``) rounds every averaging step to bfloat16 and stalls.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .. import backward
from ..optim import FusedOptimizer

__all__ = ["AccumulationSwitch", "MasterEMA", "accumulate", "clip_error", "fused_optimizers", "guard_clipping"]


def fused_optimizers(obj: Any) -> list[FusedOptimizer]:
    """The fused optimizers in ``obj``: an optimizer, a framework's wrapper of one, or a list of them.

    accelerate's ``AcceleratedOptimizer`` keeps the wrapped optimizer in ``.optimizer``; Lightning's
    ``LightningOptimizer`` keeps it in ``._optimizer`` and also *subclasses* its class, so it is
    unwrapped before the ``isinstance`` test.

    Args:
        obj: an optimizer, a wrapper of one, a list or tuple of those, or None.

    Returns:
        The :class:`fusedwarm.FusedOptimizer` instances found, in order (empty if none).
    """
    if isinstance(obj, (list, tuple)):
        return [opt for item in obj for opt in fused_optimizers(item)]
    for _ in range(8):  # wrappers nest a few levels at most; a cycle must not hang
        if hasattr(obj, "_optimizer"):
            obj = obj._optimizer
        elif isinstance(obj, FusedOptimizer):
            return [obj]
        elif hasattr(obj, "optimizer"):
            obj = obj.optimizer
        else:
            break
    return []


# ---- the clipping guard --------------------------------------------------------------------------


def clip_error(what: str, optimizers: Iterable[FusedOptimizer], framework_fix: str | None = None) -> str:
    """The message that explains why clipping cannot act on gradients consumed in the backward pass.

    Args:
        what: the clipping call or setting refused, e.g. ``"torch.nn.utils.clip_grad_norm_"``.
        optimizers: the fused optimizers that update the parameters in the backward pass.
        framework_fix: the framework setting that turns its clipping off; None names those of
            transformers, Lightning and accelerate.

    Returns:
        One paragraph: what happened, what to switch off, and fusedwarm's clipping to use instead.
    """
    names = "/".join(sorted({f"fusedwarm.{type(opt).__name__}" for opt in optimizers}))
    fix = framework_fix or ("transformers: TrainingArguments(max_grad_norm=0); Lightning: "
                            "Trainer(gradient_clip_val=None); accelerate: no accelerator.clip_grad_norm_ or "
                            "clip_grad_value_ call")
    return (f"{what}: these parameters are updated inside the backward pass by {names} (backward_step=True), "
            f"so their gradients were applied and freed during backward() and clipping them now would "
            f"silently do nothing. Turn the framework's clipping off ({fix}) and let the optimizer clip: "
            f"{names}(..., backward_step=True, max_grad_norm=<limit>, clip='lagged') clips by the global norm "
            f"of the previous iteration, clip='tensor' each tensor by its own norm; backward_step=False allows "
            f"exact global clipping (clip='global').")


def _consumers(params: list[Tensor]) -> list[FusedOptimizer]:
    """The optimizers that consumed the gradients of ``params`` in the backward pass (empty if none).

    A parameter whose optimizer updates it in the backward pass and holds no gradient has had it
    consumed. If any such parameter still holds one, the gradients were kept (``opt.accumulate()``)
    and ``opt.step()`` will apply them after the clip, so clipping is meaningful and allowed.
    """
    owners: dict[int, FusedOptimizer] = {}
    for p in params:
        opt = backward.owner(p)
        if opt is not None and opt.backward_step:
            if p.grad is not None:
                return []
            owners[id(opt)] = opt
    return list(owners.values())


def _as_list(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    return [parameters] if isinstance(parameters, Tensor) else list(parameters)


def _guarded_clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                             error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``, refusing gradients consumed in the backward pass."""
    params = _as_list(parameters)
    consumers = _consumers(params)
    if not consumers:
        return torch.nn.utils.clip_grad.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    if math.isinf(max_norm):
        # A norm query, not a clip (transformers.Trainer logs grad_norm this way with
        # max_grad_norm=0): nothing is skipped, but 0.0 would be a wrong norm.
        warnings.warn(
            "torch.nn.utils.clip_grad_norm_(..., max_norm=inf) on parameters updated in the backward pass by "
            "fusedwarm (backward_step=True) returns nan: their gradients are gone. The optimizer's own global "
            "norm is opt.last_grad_norm() after opt.step(), computed when max_grad_norm is set.", stacklevel=2)
        return torch.full((), math.nan, device=params[0].device)
    raise RuntimeError(clip_error("torch.nn.utils.clip_grad_norm_", consumers))


def _guarded_clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float,
                              foreach: bool | None = None) -> None:
    """``torch.nn.utils.clip_grad_value_``, refusing gradients consumed in the backward pass."""
    params = _as_list(parameters)
    consumers = _consumers(params)
    if consumers:
        raise RuntimeError(clip_error("torch.nn.utils.clip_grad_value_", consumers))
    torch.nn.utils.clip_grad.clip_grad_value_(params, clip_value, foreach)


_TORCH_UNSCALE = torch.amp.GradScaler.unscale_


def _guarded_unscale_(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """``torch.amp.GradScaler.unscale_``, refusing an optimizer that updated in the backward pass."""
    consumers = [opt for opt in fused_optimizers(optimizer) if opt.backward_step]
    if consumers and scaler.is_enabled():
        names = "/".join(sorted({f"fusedwarm.{type(opt).__name__}" for opt in consumers}))
        raise RuntimeError(
            f"torch.amp.GradScaler with {names}(backward_step=True): the last backward() already applied its "
            f"gradients, still multiplied by the loss scale, before GradScaler could unscale them. Use the "
            f"optimizer's own loss scaling instead ({names}(..., loss_scale='dynamic'); multiply the loss by "
            f"opt.loss_scale), or backward_step=False with GradScaler.")
    _TORCH_UNSCALE(scaler, optimizer)


def guard_clipping(enabled: bool = True) -> None:
    """Makes ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` refuse consumed gradients.

    Replaces the two functions in ``torch.nn.utils`` (where transformers, accelerate, Lightning
    and timm look them up at each call) by wrappers that behave exactly as torch's unless the
    parameters are updated in the backward pass by a fused optimizer and hold no gradient. Then
    clipping raises a ``RuntimeError`` that names the framework setting to turn off and fusedwarm's
    ``max_grad_norm``/``clip`` to use instead, and a pure norm query (``max_norm=inf``, which
    ``transformers.Trainer`` makes to log ``grad_norm``) warns and returns nan instead of 0.0.
    Parameters that still hold gradients (kept by ``opt.accumulate()`` for ``opt.step()``) are
    clipped as usual. ``torch.amp.GradScaler.unscale_`` (which ``scaler.step(opt)`` calls) likewise
    raises for such an optimizer: the scaled gradients were applied during backward, so the
    first iteration is reported instead of every later one being silently wrong. The optimizer
    installs the guard when it attaches its backward hooks, and so do the framework adapters;
    calling it twice is harmless.

    Args:
        enabled: True installs the wrappers, False puts torch's functions back.
    """
    clip = torch.nn.utils.clip_grad
    torch.nn.utils.clip_grad_norm_ = _guarded_clip_grad_norm_ if enabled else clip.clip_grad_norm_
    torch.nn.utils.clip_grad_value_ = _guarded_clip_grad_value_ if enabled else clip.clip_grad_value_
    torch.amp.GradScaler.unscale_ = _guarded_unscale_ if enabled else _TORCH_UNSCALE


# ---- gradient accumulation -----------------------------------------------------------------------


class AccumulationSwitch:
    """Holds fused optimizers inside ``opt.accumulate()`` while a loop says a backward is not the last.

    Frameworks decide per micro-batch whether ``step()`` follows its backward; an adapter sets
    the switch before each backward (``set(True)`` on non-final micro-batches) so that
    ``backward_step=True`` optimizers keep the gradients instead of refusing the next backward.

    Args:
        optimizers: the optimizers (or wrappers) to switch; those without ``backward_step`` are left alone.
    """

    def __init__(self, optimizers: Any) -> None:
        self.optimizers = [opt for opt in fused_optimizers(optimizers) if opt.backward_step]
        self._stack: contextlib.ExitStack | None = None

    def set(self, accumulating: bool) -> None:
        """Enters (True) or leaves (False) ``accumulate()`` on every optimizer; a repeat does nothing.

        Args:
            accumulating: True when the next backward is not the last of its accumulation window.
        """
        if accumulating and self._stack is None:
            stack = contextlib.ExitStack()
            for opt in self.optimizers:
                stack.enter_context(opt.accumulate())
            self._stack = stack
        elif not accumulating and self._stack is not None:
            self._stack.close()
            self._stack = None


@contextlib.contextmanager
def accumulate(accelerator: Any, model: torch.nn.Module, optimizer: Any) -> Iterator[None]:
    """``accelerator.accumulate(model)`` that also keeps fused optimizers' gradients for ``step()``.

    With ``backward_step=True`` inside ``Accelerator(gradient_accumulation_steps=n)``, use
    ``with fusedwarm.trainers.accumulate(accelerator, model, optimizer):`` where the loop has
    ``with accelerator.accumulate(model):``. On the micro-batches after which accelerate does not
    step (``accelerator.sync_gradients`` is False) the optimizer is inside ``opt.accumulate()``;
    the last micro-batch's backward adds its gradients and updates, which equals one step on the
    summed gradients, as with ``backward_step=False``. It also installs :func:`guard_clipping`.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        model: the prepared model, as given to ``accelerator.accumulate``.
        optimizer: the prepared optimizer (or the fused optimizer itself).
    """
    guard_clipping()
    switch = AccumulationSwitch(optimizer)
    with accelerator.accumulate(model):
        switch.set(not accelerator.sync_gradients)
        try:
            yield
        finally:
            switch.set(False)


# ---- averages of the master weights --------------------------------------------------------------


class MasterEMA:
    """An exponential moving average of a fused optimizer's float32 master weights.

    ``torch.optim.swa_utils.AveragedModel`` and timm's ``ModelEma`` average a copy of the model in
    the model's dtype. For bfloat16 weights that rounds each averaging step to 8 mantissa bits:
    with decay 0.999 a step moves the average by 0.001 of its distance to the weight, and that
    change rounds away unless the distance exceeds about 2^-9 / 0.001 = 2 times the average's
    magnitude, so the average stalls near where it started. Averaging the bfloat16 weights into a float32
    copy is better but still averages rounded weights. This class keeps the average in float32
    and feeds it ``opt.master_weight(p)``, the weight with its extra bits (exactly the float32
    master with ``extra_bits=16``).

    Args:
        optimizer: a fused optimizer (or a framework's wrapper of one).
        decay: the weight of the old average, in [0, 1): ``avg += (1 - decay) * (master - avg)``.

    Raises:
        ValueError: if ``optimizer`` holds no fused optimizer or ``decay`` is outside [0, 1).
    """

    def __init__(self, optimizer: Any, decay: float = 0.999) -> None:
        found = fused_optimizers(optimizer)
        if len(found) != 1:
            raise ValueError(f"MasterEMA: expected one fusedwarm optimizer, found {len(found)} in {type(optimizer)}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MasterEMA: decay must be in [0, 1), got {decay}")
        self.optimizer = found[0]
        self.decay = float(decay)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.averages = [self.optimizer.master_weight(p) for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Moves every average towards its parameter's current master weight (call after ``step()``)."""
        masters = [self.optimizer.master_weight(p) for p in self.params]
        torch._foreach_lerp_(self.averages, masters, 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, params: Iterable[Tensor]) -> None:
        """Writes the averages, rounded to each target's dtype, into ``params`` (e.g. an evaluation copy).

        Args:
            params: tensors in the optimizer's parameter order, e.g. ``eval_model.parameters()`` of a
                deep copy of the model. Never the optimizer's own parameters: their low bits live in
                the optimizer, and overwriting the weight would corrupt the master.

        Raises:
            ValueError: if a target is one of the optimizer's parameters, or the counts differ.
        """
        targets = list(params)
        own = {id(p) for p in self.params}
        if any(id(t) in own for t in targets):
            raise ValueError("MasterEMA.copy_to: a target is a parameter of the optimizer; copy into a deep copy "
                             "of the model (its master weight would no longer match its extra bits)")
        if len(targets) != len(self.averages):
            raise ValueError(f"MasterEMA.copy_to: {len(targets)} targets for {len(self.averages)} averages")
        for target, avg in zip(targets, self.averages):
            target.copy_(avg)

    def state_dict(self) -> dict[str, Any]:
        """The decay and the averages (in the optimizer's parameter order), for checkpoints."""
        return {"decay": self.decay, "averages": [a.clone() for a in self.averages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`'s decay and averages (copied onto the averages' devices).

        Raises:
            ValueError: if the number or shapes of the averages differ.
        """
        saved = state_dict["averages"]
        if len(saved) != len(self.averages) or any(s.shape != a.shape for s, a in zip(saved, self.averages)):
            raise ValueError("MasterEMA.load_state_dict: the averages do not match this optimizer's parameters")
        self.decay = float(state_dict["decay"])
        for avg, s in zip(self.averages, saved):
            avg.copy_(s)
