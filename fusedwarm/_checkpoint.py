"""Saving and restoring a fused optimizer: ``state_dict``, ``load_state_dict``, pickling, deepcopy.

This module owns the round trips of an optimizer's persistent state: torch.optim's state dict
plus the ``"fusedwarm"`` entry (loss scale and clipping scalars), the exact restoring of state
tensors (integer extra bits and float32 states are never cast to the parameter's dtype), and what
a pickled or deep-copied optimizer carries (its options and scalars, not its hooks or per-iteration
bookkeeping). A load checks everything before it changes anything. It does not define state
layouts (``_states``) or run updates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Checkpointing:
    """Mixin of :class:`fusedwarm.FusedOptimizer` (placed before :class:`torch.optim.Optimizer`)."""

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``"fusedwarm"``: the loss scale and lagged clipping scalars."""
        sd = super().state_dict()
        sd["fusedwarm"] = {k: v.clone() for k, v in self._scalars().items() if v is not None}
        return sd

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
        self._init_scalars(saved)
        if self.backward_step:
            self._backward.attach()

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
            self._states.check(groups[gi], lambda: label, p, tensors, ValueError)
            kept[key] = tensors
        super().load_state_dict({**state_dict, "param_groups": groups, "state": stripped})
        for key, tensors in kept.items():
            self.state[index_to_param[key][2]].update(tensors)
        for key, value in scalars.items():
            self._scalars()[key].copy_(value)
