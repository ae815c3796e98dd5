"""Learning-rate schedules evaluated inside the fused update, from the step counter on the device.

A schedule is a closed form of the update number ``t = 1, 2, ...`` (the parameter's ``step``
state after its increment). The update uses ``lr * warmup(t) * schedule(t)``, with ``lr`` the
param group's learning rate, so ``torch.optim.lr_scheduler`` still works on top; the factors are
computed once per tensor in the kernel (``csrc/include/fusedwarm/schedule.cuh``), which costs no
host sync, survives checkpoints (the step is saved) and works with ``backward_step=True`` and
CUDA graphs.

* :class:`Constant`: 1.
* :class:`WSD`: warmup-stable-decay (Hägele et al. 2024, *Scaling Laws and Compute-Optimal
  Training Beyond Fixed Training Durations*): 1 until the cooldown, which takes the last
  ``decay_fraction`` of ``total_steps`` (``D = round(decay_fraction * total_steps)`` steps) and
  goes from 1 to ``final_fraction`` with the shape ``"linear"`` (``1 - u``), ``"1-sqrt"``
  (``1 - sqrt(u)``, the paper's best) or ``"cosine"`` (``(1 + cos(pi u)) / 2``), where
  ``u = (t - (total_steps - D)) / D`` clamped to [0, 1]; ``final_fraction`` after ``total_steps``.
* :class:`Cosine`: cosine decay over the whole run (Loshchilov & Hutter 2017, without restarts),
  the WSD cooldown with ``D = total_steps``: ``final + (1 - final) (1 + cos(pi min(t, T) / T)) / 2``.

Param groups store a schedule as a plain dict (:meth:`Constant.to_dict`), so optimizer state
dicts stay loadable with ``torch.load(weights_only=True)``; :func:`from_dict` rebuilds the object.
This module describes schedules and packs their operator arguments; it computes no factor
itself (that is ``schedule.cuh``'s, read back by ``FusedOptimizer.last_factors``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Constant", "Cosine", "WSD", "from_dict", "as_dict", "SHAPES"]

SHAPES = ("linear", "1-sqrt", "cosine")


def _check_total_steps(total_steps: Any) -> None:
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
        raise ValueError(f"Invalid total_steps: {total_steps!r} (expected an int > 0)")


def _check_fraction(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (expected a number in [0, 1])")


class Constant:
    """No decay: the factor is 1 at every step."""

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data, as param groups store it.

        Returns:
            ``{"name": "constant"}``.
        """
        return {"name": "constant"}

    def op_args(self) -> dict[str, Any]:
        """The schedule arguments of the fused ops (``total_steps``, ``decay_steps``, ...).

        Returns:
            Keyword arguments for ``torch.ops.fusedwarm.adamw_`` and friends.
        """
        return dict(total_steps=0, decay_steps=0, decay_shape="none", final_fraction=0.0)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"


class WSD(Constant):
    """Warmup-stable-decay (Hägele et al. 2024): constant, then a cooldown to ``final_fraction``.

    The warmup is the optimizer's ``warmup=`` argument; this class is the stable and decay parts.

    Args:
        total_steps: the update after which the factor stays at ``final_fraction``.
        decay_fraction: fraction of ``total_steps`` the cooldown takes, in [0, 1] (0: constant).
        shape: ``"linear"``, ``"1-sqrt"`` or ``"cosine"``.
        final_fraction: the factor at the end of the cooldown, in [0, 1].
    """

    def __init__(self, total_steps: int, decay_fraction: float = 0.2, shape: str = "1-sqrt",
                 final_fraction: float = 0.0) -> None:
        _check_total_steps(total_steps)
        _check_fraction("decay_fraction", decay_fraction)
        if shape not in SHAPES:
            raise ValueError(f"Invalid shape: {shape!r} (expected one of {SHAPES})")
        _check_fraction("final_fraction", final_fraction)
        self.total_steps = total_steps
        self.decay_fraction = float(decay_fraction)
        self.shape = shape
        self.final_fraction = float(final_fraction)

    @property
    def decay_steps(self) -> int:
        """Length of the cooldown in updates: ``round(decay_fraction * total_steps)``."""
        return round(self.decay_fraction * self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data, as param groups store it.

        Returns:
            A dict with ``name`` and the constructor's arguments.
        """
        return {"name": "wsd", "total_steps": self.total_steps, "decay_fraction": self.decay_fraction,
                "shape": self.shape, "final_fraction": self.final_fraction}

    def op_args(self) -> dict[str, Any]:
        """The schedule arguments of the fused ops; a zero-length cooldown is the constant schedule.

        Returns:
            Keyword arguments for ``torch.ops.fusedwarm.adamw_`` and friends.
        """
        if self.decay_steps == 0:
            return Constant().op_args()
        return dict(total_steps=self.total_steps, decay_steps=self.decay_steps, decay_shape=self.shape,
                    final_fraction=self.final_fraction)


class Cosine(WSD):
    """Cosine decay from 1 to ``final_fraction`` over ``total_steps`` updates, then constant.

    Args:
        total_steps: the length of the decay.
        final_fraction: the factor at ``total_steps`` and after, in [0, 1].
    """

    def __init__(self, total_steps: int, final_fraction: float = 0.0) -> None:
        super().__init__(total_steps, decay_fraction=1.0, shape="cosine", final_fraction=final_fraction)

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data, as param groups store it.

        Returns:
            A dict with ``name``, ``total_steps`` and ``final_fraction``.
        """
        return {"name": "cosine", "total_steps": self.total_steps, "final_fraction": self.final_fraction}


_CLASSES = {"constant": Constant, "wsd": WSD, "cosine": Cosine}


def from_dict(data: dict[str, Any]) -> Constant:
    """Rebuilds a schedule from :meth:`Constant.to_dict`'s plain data, checking it.

    Args:
        data: a dict with ``name`` (``"constant"``, ``"cosine"`` or ``"wsd"``) and the arguments.

    Returns:
        The schedule object.
    """
    if not isinstance(data, dict) or data.get("name") not in _CLASSES:
        raise ValueError(f"Invalid schedule: {data!r} (expected a fusedwarm.schedules object or its to_dict())")
    args = {k: v for k, v in data.items() if k != "name"}
    try:
        return _CLASSES[data["name"]](**args)
    except TypeError as e:
        raise ValueError(f"Invalid schedule: {data!r} ({e})") from None


def as_dict(schedule: Any) -> dict[str, Any]:
    """A schedule object, its dict or ``None`` (constant) as checked plain data for a param group.

    Args:
        schedule: a :class:`Constant`, :class:`Cosine` or :class:`WSD`, a dict from ``to_dict``, or None.

    Returns:
        The schedule's ``to_dict()``.
    """
    if schedule is None:
        return Constant().to_dict()
    if isinstance(schedule, Constant):
        return schedule.to_dict()
    return from_dict(schedule).to_dict()
