"""The layout of a parameter's optimizer state: which tensors, of which dtype and shape.

This module owns what ``optimizer.state[p]`` holds under a param group's storage options
(``step``; ``extra``, the master weight's low bits, for half-precision weights with extra bits;
the rule's moment buffers in ``state_dtype``; for quantized states, each buffer's codes as a flat
uint8 tensor and its block scales as ``<name>_scale``), creates missing state tensors and checks
existing ones. It never computes an update, and a check never changes the state it looks at.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _sharding
from ._validation import QUANTIZED_STATE_DTYPES

EXTRA_DTYPE = {16: torch.int16, 8: torch.int8}
# The options that decide how a parameter's master and states are stored.
STORAGE_OPTIONS = ("extra_bits", "state_dtype", "state_block")
DEFAULT_EXTRA_BITS = 16
# Quantized states: the default block size per bits, and the smallest parameter that is quantized
# (smaller ones, norms and biases, keep the default state dtype, as bitsandbytes does: their share of
# the memory is small and their statistics are the least regular).
DEFAULT_STATE_BLOCK = {8: 256, 4: 128}
QUANTIZE_MIN_NUMEL = 4096
SCALE_SUFFIX = "_scale"


def extra_bits(group: dict[str, Any], p: Tensor) -> int:
    """The low master bits kept for ``p``: the group's ``extra_bits``, 0 for float32 weights."""
    return 0 if p.dtype == torch.float32 else group["extra_bits"]


def state_bits(group: dict[str, Any], p: Tensor) -> int:
    """Bits per element of ``p``'s quantized moment buffers: 8 or 4, or 0 when they are not quantized."""
    bits = QUANTIZED_STATE_DTYPES.get(group["state_dtype"]) if isinstance(group["state_dtype"], str) else None
    return bits if bits and p.numel() >= QUANTIZE_MIN_NUMEL else 0


def state_block(group: dict[str, Any], bits: int) -> int:
    """Elements per block of quantized states with ``bits`` bits: the group's ``state_block`` or the default."""
    return group.get("state_block") or DEFAULT_STATE_BLOCK[bits]


def state_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
    """The dtype of ``p``'s moment buffers: the group's, uint8 codes for quantized states, or by default
    bfloat16 for half weights (also for parameters too small to be quantized)."""
    if state_bits(group, p):
        return torch.uint8
    if group["state_dtype"] is not None and not isinstance(group["state_dtype"], str):
        return group["state_dtype"]
    return torch.float32 if p.dtype == torch.float32 else torch.bfloat16


def state_shape(group: dict[str, Any], p: Tensor, name: str) -> tuple[int, ...]:
    """The shape of state ``name`` of ``p``: the parameter's, or flat codes and block scales when quantized."""
    if name == "step":
        return ()
    bits = state_bits(group, p) if name != "extra" else 0
    if not bits:
        return tuple(p.shape)
    n = p.numel()
    if name.endswith(SCALE_SUFFIX):
        block = state_block(group, bits)
        return ((n + block - 1) // block,)
    return (n if bits == 8 else (n + 1) // 2,)


def _check_unsharded(group: dict[str, Any], what: Callable[[], str], p: Tensor, error: type) -> None:
    if state_bits(group, p) and _sharding.is_sharded(p):
        raise error(f"{what()}: quantized states (state_dtype={group['state_dtype']!r}) are not supported for "
                    f"sharded (FSDP2) parameters: their blocks would follow each rank's shard")


class StateLayout:
    """Expected state tensors per parameter, with memos so that a step checks each one cheaply.

    Args:
        state_names: the rule's moment buffers used under a param group's options, in order.
    """

    def __init__(self, state_names: Callable[[dict[str, Any]], tuple[str, ...]]) -> None:
        self._names = state_names
        self._expected: dict[tuple, dict[str, torch.dtype]] = {}
        # id(p) -> (weak refs of its checked state tensors by name, the group's extra_bits and
        # state_dtype and p's dtype when it was checked)
        self._checked: dict[int, tuple] = {}

    def expected(self, group: dict[str, Any], p: Tensor) -> dict[str, torch.dtype]:
        """The state tensors of ``p`` under ``group``'s options, with their dtypes (do not modify)."""
        key = (extra_bits(group, p), state_dtype(group, p), self._names(group))
        expected = self._expected.get(key)
        if expected is None:
            k, dtype, names = key
            scales = {name + SCALE_SUFFIX: torch.float32 for name in names} if dtype == torch.uint8 else {}
            expected = {"step": torch.int64, **({"extra": EXTRA_DTYPE[k]} if k else {}),
                        **{name: dtype for name in names}, **scales}
            self._expected[key] = expected
        return expected

    def check(self, group: dict[str, Any], what: Callable[[], str], p: Tensor, state: dict[str, Any] | None,
              error: type) -> None:
        """Raises ``error`` if an existing state tensor of ``p`` has the wrong dtype, shape or device."""
        if not state:
            return
        expected = self.expected(group, p)
        extra = state.get("extra")
        if (extra.dtype if isinstance(extra, Tensor) else None) != expected.get("extra"):
            if p.dtype == torch.float32:
                raise error(f"{what()}: state 'extra' belongs to a half-precision weight; float32 weights are "
                            f"their own master and keep no extra bits")
            raise error(f"{what()}: extra_bits changed to {extra_bits(group, p)} after the first step; change it "
                        f"through state_dict() and load_state_dict() into an optimizer made with the new value")
        _check_unsharded(group, what, p, error)
        for name, dtype in expected.items():
            t = state.get(name)
            if t is None:
                continue
            shape = state_shape(group, p, name)
            if not isinstance(t, Tensor) or t.dtype != dtype or t.shape != shape or t.device != p.device:
                got = f"{t.dtype}, shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(t)
                raise error(
                    f"{what()}: state '{name}' is {got}; expected {dtype}, shape {tuple(shape)} on {p.device}"
                )

    def checked_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any] | None) -> bool | None:
        """True if ``state`` passed :meth:`check_for_step` earlier with the same tensors and options (so
        the step may skip the check), None if it must be checked (a new, changed or unchecked state).

        The per-tensor fast path of every step: a dict lookup and identity comparisons.
        """
        if not state:
            return True
        known = self._checked.get(id(p))
        if (known is None or known[1] is not group.get("extra_bits") or known[2] is not group.get("state_dtype")
                or known[3] is not p.dtype or known[4] is not group.get("state_block")
                or len(state) != len(known[0])):
            return None
        # The same tensors in the same entries: the values in the dict's order, as recorded.
        for value, ref in zip(state.values(), known[0]):
            if value is not ref():
                return None
        return True

    def check_for_step(self, group: dict[str, Any], what: Callable[[], str], p: Tensor,
                       state: dict[str, Any] | None) -> None:
        """:meth:`check` before an update, skipped for a state that passed it with the same tensors.

        A complete state passed at an earlier step if it still holds the same tensors under the
        same options (weak references: a checked tensor is never kept alive by this).
        """
        if self.checked_state(group, p, state):
            return
        self.check(group, what, p, state, RuntimeError)
        expected = self.expected(group, p)
        # Recorded only for a complete state of tensors (the expected names, which check() has just
        # checked, and no others), in the dict's order.
        if len(state) == len(expected) and all(name in state for name in expected):
            self._checked[id(p)] = (tuple(weakref.ref(value) for value in state.values()),
                                    group.get("extra_bits"), group.get("state_dtype"), p.dtype,
                                    group.get("state_block"))

    def create(self, group: dict[str, Any], p: Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """Adds ``p``'s missing state tensors (zeros; sharded as ``p``, ``step`` a plain scalar) to ``state``."""
        quantized = state_bits(group, p) != 0
        _check_unsharded(group, lambda: "parameter", p, RuntimeError)
        for name, dtype in self.expected(group, p).items():
            if name not in state:
                if name == "step" or (quantized and name != "extra"):
                    state[name] = torch.zeros(state_shape(group, p, name), dtype=dtype, device=p.device)
                else:
                    state[name] = _sharding.zeros(p, dtype)
        return state
