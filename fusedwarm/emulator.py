"""The emulated CUDA device: fusedwarm's CUDA backend executed on the CPU (DESIGN.md, layer 2).

No GPU is needed to run the CUDA code: ``csrc/emu`` compiles the real host path
(``csrc/cuda/host.h``: slot tables, alignment decisions, chunk and row tables, variant lookup,
grid sizing, the staging buffer, boxed launches as the CUDA driver takes them) with g++ against
a small CUDA shim, into a library of its own whose ops are ``torch.ops.fusedwarm_emu``; each
kernel variant a call needs is the real kernel source (``csrc/cuda/step_variant.cu``, the file
NVRTC compiles for a GPU) compiled by g++ against that shim on first use. A launch runs every
block of the grid, and the threads of a block as fibers, so ``__syncthreads`` is a real barrier;
the arithmetic intrinsics follow the GPU's rules, NaN results included. Inside
:func:`device`, every call of a ``torch.ops.fusedwarm`` op that the CUDA backend implements
(the step ops, ``schedule_factors``, the ``pam_*`` ops) goes to the emulated device instead of
the CPU backend, through the same Python code: optimizers, step in backward, ``fusedwarm.pam``.

What it proves: the CUDA host path and kernels compute what the CPU backend computes, bit for
bit, for every block and thread order and resident-block count; with the sanitizer build
(``scripts/emu_sanitize.sh``), that the kernels stay inside their tensors and load vectors
only from aligned addresses. What only a GPU shows: speed, races between threads outside
barriers (fibers switch only at barriers), the memory model, and CUDA-graph capture and
streams.

Example::

    from fusedwarm import emulator

    with emulator.device(sms=2, blocks_per_sm=1, order="shuffle"):
        opt.step()  # CPU tensors; the step runs the CUDA kernels on the emulated device
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _build, _ops

ORDERS = ("forward", "reverse", "shuffle")


@dataclass(frozen=True)
class Counters:
    """What the emulated device has executed since its library was loaded."""

    launches: int
    blocks: int
    threads: int


def load() -> torch._ops._OpNamespace:
    """Builds (first use only; cached like the main extension) and loads the emulator; returns its ops."""
    _ops.load()
    _build.build_emulator()
    return torch.ops.fusedwarm_emu


def configure(sms: int = 4, blocks_per_sm: int = 2, order: str = "forward", seed: int = 0) -> None:
    """Sets the emulated device's shape and execution order.

    Args:
        sms: multiprocessors the device reports (the step kernel's grid is at most
            ``sms * blocks_per_sm`` blocks).
        blocks_per_sm: resident blocks per multiprocessor the occupancy query reports.
        order: the order of blocks in a launch and of threads between barriers: "forward",
            "reverse" or "shuffle" (a permutation drawn from ``seed``, new for each block and phase).
        seed: the shuffled orders' seed.
    """
    if order not in ORDERS:
        raise ValueError(f"fusedwarm.emulator: order must be one of {ORDERS}, got {order!r}")
    load().configure(sms, blocks_per_sm, order, seed)


def counters() -> Counters:
    """Launches, blocks and threads the emulated device has run (proof that a test executed kernels)."""
    return Counters(*load().counters())


@functools.cache  # the registrations are fixed once the library is loaded
def emulated_ops() -> frozenset[str]:
    """Names of the fusedwarm ops the emulated device implements (those of the CUDA backend)."""
    load()
    names = (name.removeprefix("fusedwarm_emu::") for name in torch._C._dispatch_get_all_op_names()
             if name.startswith("fusedwarm_emu::"))
    return frozenset(n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedwarm_emu::{n}", "CPU"))


class _Redirect(TorchDispatchMode):
    """Sends calls of the emulated fusedwarm ops to ``torch.ops.fusedwarm_emu``; everything else runs as usual."""

    def __init__(self, names: frozenset[str]):
        super().__init__()
        self._names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fusedwarm" and func._opname in self._names:
            func = getattr(getattr(torch.ops.fusedwarm_emu, func._opname), func._overloadname)
        return func(*args, **kwargs)


@contextlib.contextmanager
def device(sms: int = 4, blocks_per_sm: int = 2, order: str = "forward", seed: int = 0) -> Iterator[None]:
    """Runs the CUDA backend's ops on the emulated device (CPU tensors) inside the block; see :func:`configure`."""
    configure(sms, blocks_per_sm, order, seed)
    with _Redirect(emulated_ops()):
        yield
