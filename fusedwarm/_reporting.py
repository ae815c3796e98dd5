"""What a fused optimizer reports: schedule factors, skipped gradients, loss scale, master weights.

This module owns the read-only views of an optimizer's state that users and trainers inspect
(device tensors, no host sync unless a method says so): the learning-rate factors of the last
update, the elements skipped for non-finite gradients, the loss scale and last gradient norm, and
the float32 master weight of a parameter. It never changes a parameter, a state or a scalar.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops, _sharding
from ._states import SCALE_SUFFIX, extra_bits


def _nbytes(t: Tensor) -> int:
    """The bytes of ``t``'s elements on this rank (a DTensor's local shard)."""
    local = _sharding.local(t)
    return local.numel() * local.element_size()


class Reporting:
    """Mixin of :class:`fusedwarm.FusedOptimizer`: its inspection methods."""

    @property
    def loss_scale(self) -> Tensor | None:
        """The current loss scale as a 0-d float32 device tensor (``None`` without ``loss_scale``).

        Multiply the loss by it before ``backward()``; the update divides the gradients by it.
        With ``loss_scale="dynamic"`` it halves after an iteration with non-finite gradients and
        doubles after 2000 clean iterations, on the device (``torch.amp.GradScaler``'s rule).
        """
        return self._scaling.scale

    def last_grad_norm(self) -> Tensor:
        """The global gradient norm of the last iteration, a 0-d float32 device tensor (no sync).

        Computed when ``max_grad_norm`` is set (``nan`` otherwise); it is the norm of the unscaled
        gradients, with non-finite tensors giving ``inf`` or ``nan``.
        """
        return self._scaling.last_grad_norm

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

    def state_bytes(self) -> dict[str, int]:
        """The bytes of persistent training state this optimizer holds on this rank, by kind.

        Returns:
            ``{"weights", "extra_bits", "states", "scales", "other", "total"}``: the parameters' own
            storage, the extra bits of their float32 masters, the moment buffers (m, v, momentum;
            the codes of quantized states), the block scales of quantized states, and everything else (step counters, loss-scale and clipping scalars), summed over every
            parameter; a sharded (FSDP2) parameter and its states count their local shards.
            Gradients are not persistent state and are not counted. Divide by the number of
            parameters for bytes per parameter (DESIGN.md's memory table).
        """
        out = {"weights": 0, "extra_bits": 0, "states": 0, "scales": 0, "other": 0}
        for group in self.param_groups:  # torch.optim admits a parameter in one group only
            for p in group["params"]:
                out["weights"] += _nbytes(p)
                for name, value in self.state.get(p, {}).items():
                    if isinstance(value, Tensor):
                        kind = ("extra_bits" if name == "extra" else "other" if name == "step"
                                else "scales" if name.endswith(SCALE_SUFFIX) else "states")
                        out[kind] += _nbytes(value)
        out["other"] += sum(_nbytes(t) for t in self._scalars().values() if isinstance(t, Tensor))
        out["total"] = sum(out.values())
        return out

    def master_weight(self, p: Tensor) -> Tensor:
        """The float32 master weight of ``p``: weight plus extra bits (a copy of ``p`` if none).

        Args:
            p: a parameter of this optimizer.

        Returns:
            A new float32 tensor with the shape of ``p`` (a DTensor placed as ``p`` when ``p`` is one).
        """
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError("master_weight: the tensor is not a parameter of this optimizer")
        k = extra_bits(group, p)
        extra = self.state.get(p, {}).get("extra")
        if extra is None:
            k = 0
            extra = torch.empty(0, dtype=torch.int8, device=p.device)
        master = _ops.load().master_weight(_sharding.local(p.detach()).contiguous(), _sharding.local(extra), k)
        return _sharding.like(p, master)
