"""PyTorch Lightning with a fused optimizer updating in the backward pass: a Lightning ``Callback``.

This module owns :class:`FusedwarmCallback`, the adapter that makes ``lightning.Trainer`` drive a
``backward_step=True`` optimizer returned by ``configure_optimizers``. Without ``backward_step``
Lightning needs no adapter (``precision="bf16-true"`` keeps the weights bfloat16; Lightning calls
``step(closure)``, clips with ``gradient_clip_val`` and checkpoints the ``state_dict``).

With ``backward_step=True`` Lightning's ``gradient_clip_val`` would clip gradients that no longer
exist, and ``accumulate_grad_batches`` would run a second backward before ``step()``. The
callback refuses the first when fitting starts and puts the optimizer inside ``opt.accumulate()``
for the backward of every micro-batch that Lightning does not step after. Importing it imports
``lightning``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from . import AccumulationSwitch, clip_error, fused_optimizers, guard_clipping


class FusedwarmCallback(pl.Callback):
    """Adapts ``lightning.Trainer`` to fused optimizers with ``backward_step=True``.

    Pass it as ``Trainer(..., callbacks=[FusedwarmCallback()])`` without ``gradient_clip_val``, and
    clip in the optimizer (``max_grad_norm=..., clip="lagged"`` or ``"tensor"``). When fitting
    starts it raises ``ValueError`` if ``gradient_clip_val`` is set and installs
    :func:`fusedwarm.trainers.guard_clipping`; before each backward it asks Lightning's fit loop
    whether the optimizer steps after this micro-batch (the test Lightning's own optimization loop
    makes) and, if not, keeps the gradients with ``opt.accumulate()``. Automatic optimization
    only; with manual optimization use ``opt.accumulate()`` yourself.
    """

    def __init__(self) -> None:
        self._switch: AccumulationSwitch | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks ``gradient_clip_val`` and prepares the accumulation switch."""
        self._switch = None
        optimizers = [opt for opt in fused_optimizers(trainer.optimizers) if opt.backward_step]
        if not optimizers:
            return
        guard_clipping()
        if trainer.gradient_clip_val:
            raise ValueError(clip_error(f"Trainer(gradient_clip_val={trainer.gradient_clip_val})", optimizers,
                                        "Trainer(gradient_clip_val=None)"))
        self._switch = AccumulationSwitch(optimizers)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """Enters ``opt.accumulate()`` when no optimizer step follows this micro-batch."""
        if self._switch is not None:
            self._switch.set(trainer.fit_loop._should_accumulate())

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Leaves ``opt.accumulate()``: the gradients stay in ``.grad`` for the next backward or ``step()``."""
        if self._switch is not None:
            self._switch.set(False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Leaves ``opt.accumulate()`` if a backward raised inside it."""
        self.on_after_backward(trainer, pl_module)
