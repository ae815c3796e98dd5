"""``transformers.Trainer`` with a fused optimizer updating in the backward pass: a ``TrainerCallback``.

This module owns :class:`FusedwarmCallback`, the adapter that makes ``transformers.Trainer`` drive
a ``backward_step=True`` optimizer given as ``Trainer(optimizers=(opt, scheduler))``. Without
``backward_step`` the Trainer needs no adapter: it calls ``step()``/``zero_grad()``, clips with
``max_grad_norm`` and saves and restores the optimizer's ``state_dict`` as for torch's optimizers.

With ``backward_step=True`` the Trainer's own clipping (``TrainingArguments.max_grad_norm``,
default 1.0) would clip gradients that no longer exist, and its gradient accumulation
(``gradient_accumulation_steps``) would run a second backward before ``step()``. The callback
refuses the first (at ``on_train_begin``, before any update) and switches the optimizer into
``opt.accumulate()`` for the non-final micro-batches of the second. Importing it imports
``transformers`` and ``accelerate``.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.state import GradientState
from transformers import TrainerCallback

from . import AccumulationSwitch, clip_error, fused_optimizers, guard_clipping


class FusedwarmCallback(TrainerCallback):
    """Adapts ``transformers.Trainer`` to fused optimizers with ``backward_step=True``.

    Pass it as ``Trainer(..., optimizers=(opt, scheduler), callbacks=[FusedwarmCallback()])``
    with ``TrainingArguments(max_grad_norm=0)``, and clip in the optimizer
    (``max_grad_norm=..., clip="lagged"`` or ``"tensor"``). At the start of training it:

    * raises ``ValueError`` if ``TrainingArguments.max_grad_norm > 0`` (the Trainer's clip would
      do nothing) and installs :func:`fusedwarm.trainers.guard_clipping`;
    * with ``gradient_accumulation_steps > 1``, registers a forward pre-hook on the model that puts
      the optimizer inside ``opt.accumulate()`` whenever accelerate's ``sync_gradients`` (which the
      Trainer sets before each micro-batch) says no ``step()`` follows this micro-batch.

    The Trainer logs ``grad_norm`` as nan (see :func:`fusedwarm.trainers.guard_clipping`): the
    gradients are gone when it measures them; the optimizer's ``last_grad_norm()`` holds the global
    norm of the last step when it clips. Optimizers without ``backward_step`` are left alone.
    """

    def __init__(self) -> None:
        self._switch: AccumulationSwitch | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Checks the clipping settings and installs the accumulation hook (see the class docstring)."""
        self._release()  # a previous train() that raised never reached on_train_end
        optimizers = [opt for opt in fused_optimizers(optimizer) if opt.backward_step]
        if not optimizers:
            return
        guard_clipping()
        if args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(clip_error(f"TrainingArguments(max_grad_norm={args.max_grad_norm})", optimizers,
                                        "TrainingArguments(max_grad_norm=0)"))
        if args.gradient_accumulation_steps > 1 and model is not None:
            self._switch = AccumulationSwitch(optimizers)
            self._hook = model.register_forward_pre_hook(self._before_forward)

    def _before_forward(self, module: torch.nn.Module, args: tuple) -> None:
        # The Trainer sets sync_gradients before each micro-batch's forward; the backward that
        # follows must keep its gradients unless the optimizer steps after it. Evaluation
        # forwards (no grad, or eval mode) leave the switch as it is.
        if torch.is_grad_enabled() and module.training:
            self._switch.set(not GradientState().sync_gradients)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Removes the accumulation hook and leaves ``opt.accumulate()``."""
        self._release()

    def _release(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._switch is not None:
            self._switch.set(False)
            self._switch = None
