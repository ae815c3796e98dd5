"""Saving and restoring a fused optimizer: ``state_dict``, ``load_state_dict``, pickling, deepcopy.

This module owns the round trips of an optimizer's persistent state: torch.optim's state dict
plus the ``"fusedwarm"`` entry (loss scale and clipping scalars), the exact restoring of state
tensors (integer extra bits and float32 states are never cast to the parameter's dtype), and what
a pickled or deep-copied optimizer carries (its options and scalars, not its hooks or per-iteration
bookkeeping). A load checks everything before it changes anything. It does not define state
layouts (``_states``) or run updates.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import _ops, _validation
from ._eager import eager, undecorated
from ._states import EXTRA_DTYPE, SCALE_SUFFIX, extra_bits, state_bits, state_block
SAVED_EXTRA_BITS = {dtype: bits for bits, dtype in EXTRA_DTYPE.items()}
# The key of the loss-scale and clipping scalars in a state dict's first param group.
SCALARS = "fusedwarm"


class Checkpointing:
    """Mixin of :class:`fusedwarm.FusedOptimizer` (placed before :class:`torch.optim.Optimizer`).

    Its ``state_dict`` and ``load_state_dict`` wrap torch's, and run torch's state-dict hooks
    themselves, so that hooks see what torch's would: the whole state dict (``"fusedwarm"`` entry
    included) after ``state_dict``, the caller's dict (which a pre hook may adapt) before a load, and
    the loaded state after it.
    """

    @contextlib.contextmanager
    def _torch_hooks_suspended(self, *names: str) -> Iterator[None]:
        """Runs torch's method with the given hook tables empty; this class runs those hooks."""
        saved = {name: getattr(self, name) for name in names}
        try:
            for name, hooks in saved.items():
                setattr(self, name, type(hooks)())
            yield
        finally:
            for name, hooks in saved.items():
                setattr(self, name, hooks)

    @eager  # as torch.optim.Optimizer's: run eagerly under torch.compile
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict; its first param group also holds ``"fusedwarm"``: the loss-scale and
        clipping scalars. In a param group they survive tools that keep only ``state`` and
        ``param_groups``, such as ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict``."""
        with self._torch_hooks_suspended("_optimizer_state_dict_post_hooks"):
            sd = undecorated(torch.optim.Optimizer.state_dict)(self)
        sd["param_groups"][0][SCALARS] = {k: v.clone() for k, v in self._scalars().items() if v is not None}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
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

    @eager  # as torch.optim.Optimizer's: run eagerly under torch.compile
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict made by :meth:`state_dict` or by a ``torch.optim`` optimizer.

        ``torch.optim.Optimizer.load_state_dict`` casts floating-point states to the parameter's
        dtype, which would round float32 states and destroy the integer extra bits; here state
        tensors are converted only to what this optimizer keeps (copied onto the parameter's
        device). Everything is checked before anything changes.

        * Hyperparameters come from the checkpoint (as in torch); options missing from it (e.g. in
          a ``torch.optim.AdamW`` state dict) take this optimizer's defaults.
        * Storage options (``extra_bits``, ``state_dtype``) given to this optimizer's constructor or
          param group win over the checkpoint's, so a run can resume with less memory: states are
          converted to its ``state_dtype`` (float32 -> bfloat16 rounds to nearest) and extra bits to
          its ``extra_bits`` (16 -> 8 -> 0 and back; a state without extra bits, as torch's, starts
          from master = weight). Storage options left unset follow the checkpoint. Converting extra bits rewrites the master from the parameter's current
          weight, so load the model's weights first, as trainers do; with fewer bits the master is
          rounded to nearest and the weight follows it.
        * A ``step`` that is a float tensor or a plain number becomes an int64 tensor; a state
          without one (``torch.optim.SGD``'s momentum buffer) counts as one update done, so the
          loaded buffer is used by the next step.
        * torch options fusedwarm does not implement (``amsgrad``, ``capturable``,
          ``differentiable``, Adam's L2 weight decay) must be off; ``foreach``/``fused`` are dropped.
        """
        name = type(self).__name__
        state_dict = state_dict.copy()  # shallow, as torch's: pre hooks may change it, not the caller's
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved_groups = state_dict["param_groups"]
        # The scalars: in the first param group, or at the top level (state dicts of earlier versions).
        scalars = state_dict.get(SCALARS, saved_groups[0].get(SCALARS) if saved_groups else None)
        if scalars is None and (self._scaling.scale is not None
                                or self._scaling.clipping in ("lagged", "lagged-tensor")):
            warnings.warn(
                f"{name}.load_state_dict: the state dict has no '{SCALARS}' scalars (a torch.optim state dict), so "
                f"the loss scale and the lagged clipping coefficient keep this optimizer's current values",
                stacklevel=2)
        scalars = scalars or {}
        for key, value in scalars.items():
            current = self._scalars().get(key, ...)
            if current is ... or not isinstance(value, Tensor) or value.shape != () or (
                    current is not None and value.dtype != current.dtype):
                raise ValueError(f"{name}.load_state_dict: unexpected 'fusedwarm' entry {key!r}: {value!r}")
            if current is None:
                raise ValueError(f"{name}.load_state_dict: the state dict has a {key!r} but this optimizer was "
                                 f"made without it (loss_scale=None)")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        groups = []
        index_to_param: dict[Any, tuple[int, int, Tensor]] = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            _validation.check_torch_options(f"{name}.load_state_dict", saved, loading=True)
            groups.append({**self.defaults,
                           **{k: v for k, v in saved.items() if k not in (*_validation.TORCH_GROUP_KEYS, SCALARS)},
                           **{k: group[k] for k in self._options["storage_given"][gi]}})
            self._check_group_options(groups[gi])
            for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
                index_to_param[key] = (gi, i, p)
        kept: dict[Any, dict[str, Tensor]] = {}
        weights: list[tuple[Tensor, Tensor]] = []
        stripped: dict[Any, dict[str, Any]] = {}
        for key, entry in state_dict["state"].items():
            tensors = {k: v for k, v in entry.items() if isinstance(v, Tensor)}
            stripped[key] = {k: v for k, v in entry.items() if not isinstance(v, Tensor)}
            if key not in index_to_param:
                continue
            gi, i, p = index_to_param[key]
            label = f"{name}.load_state_dict: parameter {key} ({self._param_label(groups[gi], gi, i, p)})"
            step = stripped[key].pop("step", None)
            if step is not None:
                if not isinstance(step, (int, float)) or isinstance(step, bool):
                    raise ValueError(f"{label}: state 'step' is {step!r}; expected a number or a tensor")
                tensors["step"] = torch.tensor(step)
            for k, value in tensors.items():
                # Quantized states are flat codes and block scales (checked after conversion).
                quantized = k.endswith(SCALE_SUFFIX) or k + SCALE_SUFFIX in tensors
                if k != "step" and not quantized and value.shape != p.shape:
                    raise ValueError(f"{name}.load_state_dict: state '{k}' of parameter {key} has shape "
                                     f"{tuple(value.shape)} but the parameter has shape {tuple(p.shape)}")
            tensors, weight = self._convert_state(groups[gi], p, tensors)
            self._states.check(groups[gi], lambda: label, p, tensors, ValueError)
            kept[key] = tensors
            if weight is not None:
                weights.append((p, weight))
        with self._torch_hooks_suspended("_optimizer_load_state_dict_pre_hooks",
                                         "_optimizer_load_state_dict_post_hooks"):
            undecorated(torch.optim.Optimizer.load_state_dict)(
                self, {**state_dict, "param_groups": groups, "state": stripped})
        for key, tensors in kept.items():
            self.state[index_to_param[key][2]].update(tensors)
        with torch.no_grad():
            for p, weight in weights:
                p.copy_(weight)
        for key, value in scalars.items():
            self._scalars()[key].copy_(value)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _convert_state(self, group: dict[str, Any], p: Tensor,
                       tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """``p``'s loaded state tensors in this optimizer's storage, and ``p``'s new weight if it changes.

        Nothing here modifies ``p`` or the given tensors: the caller applies the result once every
        parameter's state has been checked.
        """
        expected = self._states.expected(group, p)
        out = {k: v.to(device=p.device, copy=True) for k, v in tensors.items()}
        step = out.get("step")
        if step is None and any(n in out for n in expected if n not in ("step", "extra")):
            out["step"] = torch.ones((), dtype=torch.int64, device=p.device)
        elif step is not None and step.dtype != torch.int64 and step.numel() == 1:
            out["step"] = step.to(torch.int64)
        self._convert_moments(group, p, out)
        saved = out.get("extra")
        saved_bits = 0 if saved is None else SAVED_EXTRA_BITS.get(saved.dtype)
        bits = extra_bits(group, p)
        if p.dtype == torch.float32 or not out or saved_bits is None or saved_bits == bits:
            return out, None
        ops = _ops.load()
        master = ops.master_weight(p.detach().contiguous(), saved if saved is not None else p.new_empty(0), saved_bits)
        weight, extra = ops.master_split(master, p.dtype, bits)
        out.pop("extra", None)
        if bits:
            out["extra"] = extra
        return out, weight

    def _convert_moments(self, group: dict[str, Any], p: Tensor, out: dict[str, Tensor]) -> None:
        """Converts ``p``'s loaded moment buffers in ``out`` to this optimizer's state dtype, in place.

        A moment saved in a state dtype fusedwarm keeps, or in the parameter's dtype (torch.optim's
        states), becomes this optimizer's: quantized states saved in the same format (bits and block)
        are kept as they are (a resumed run continues bit for bit), others are decoded to float32 and,
        for quantized states, encoded again rounding to nearest (quant.cuh). Anything else is left
        for check() to refuse.
        """
        ops = None
        bits = state_bits(group, p)
        block = state_block(group, bits) if bits else 0
        n = p.numel()
        for index, name in enumerate(self._op_states):
            value, scale = out.get(name), out.get(name + SCALE_SUFFIX)
            if value is None:
                continue
            signed = index == 0  # the first state (m, momentum) has signed codes, AdamW's v unsigned
            if value.dtype == torch.uint8 and scale is not None:
                saved_bits = 8 if value.numel() == n else 4 if value.numel() == (n + 1) // 2 else None
                blocks = (2**i for i in range(_validation.MIN_STATE_BLOCK.bit_length() - 1,
                                              _validation.MAX_STATE_BLOCK.bit_length()))
                saved_block = next((b for b in blocks if -(-n // b) == scale.numel()), None)
                if saved_bits is None or saved_block is None:
                    continue
                if (saved_bits, saved_block) == (bits, block):
                    continue
                ops = ops or _ops.load()
                value = ops.dequantize_states(value.contiguous(), scale.contiguous(), n, saved_bits, signed,
                                              saved_block).view(p.shape)
                del out[name + SCALE_SUFFIX]
            elif value.dtype not in (*_validation.STATE_DTYPES, p.dtype):
                continue
            if bits:
                ops = ops or _ops.load()
                nearest = torch.full((n,), -2**31, dtype=torch.int32, device=value.device)
                out[name], out[name + SCALE_SUFFIX] = ops.quantize_states(
                    value.reshape(-1).to(torch.float32), nearest, bits, signed, block)
            else:
                out[name] = value.to(self._states.expected(group, p)[name])

    @eager  # as load_state_dict
    @torch.no_grad()
    def load_master_weights(self, masters: Iterable[Tensor] | Mapping[str, Tensor]) -> None:
        """Sets every parameter, and its extra bits, from float32 master weights.

        The way to move a float32 run onto half-precision weights without losing its master: the
        weight becomes the master rounded to nearest and the extra bits keep the rest (all of it
        with ``extra_bits=16`` on bfloat16 weights; with fewer bits the master is rounded to
        nearest). Together with :meth:`load_state_dict` of the float32 run's ``torch.optim``
        state, training continues as the float32 run would (see the README's checkpoint section).

        Args:
            masters: float32 (or wider) tensors, one per parameter, in the optimizer's order (param
                groups in order), e.g. ``fp32_model.parameters()``; or a mapping from parameter
                names to tensors, e.g. ``fp32_model.state_dict()``, for an optimizer built from
                ``model.named_parameters()``.
        """
        name = type(self).__name__
        params = [(gi, i, p) for gi, g in enumerate(self.param_groups) for i, p in enumerate(g["params"])]
        if isinstance(masters, Mapping):
            values = []
            for gi, i, p in params:
                names = self.param_groups[gi].get("param_names")
                if not names:
                    raise ValueError(f"{name}.load_master_weights: a mapping needs parameter names; build the "
                                     f"optimizer from model.named_parameters(), or pass a list of tensors")
                if names[i] not in masters:
                    raise ValueError(f"{name}.load_master_weights: no tensor named {names[i]!r}")
                values.append(masters[names[i]])
        else:
            values = list(masters)
            if len(values) != len(params):
                raise ValueError(f"{name}.load_master_weights: got {len(values)} tensors for {len(params)} "
                                 f"parameters")
        splits = []
        ops = _ops.load()
        for (gi, i, p), m in zip(params, values):
            label = self._param_label(self.param_groups[gi], gi, i, p)
            if not isinstance(m, Tensor) or not m.is_floating_point() or m.shape != p.shape:
                got = f"{m.dtype} tensor of shape {tuple(m.shape)}" if isinstance(m, Tensor) else repr(m)
                raise ValueError(f"{name}.load_master_weights: {label}: expected a floating-point tensor of shape "
                                 f"{tuple(p.shape)}, got {got}")
            m = m.detach().to(device=p.device, dtype=torch.float32).contiguous()
            bits = extra_bits(self.param_groups[gi], p)
            splits.append((gi, p, (m, None) if p.dtype == torch.float32 else ops.master_split(m, p.dtype, bits)))
        for gi, p, (weight, extra) in splits:
            p.copy_(weight)
            if extra is not None and extra.numel():
                state = self._states.create(self.param_groups[gi], p, self.state[p])
                state["extra"] = extra
