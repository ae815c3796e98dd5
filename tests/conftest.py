"""Shared fixtures: ``gpu``, the CUDA backend under test (a real GPU, else the emulated device).

Tests that take the ``gpu`` fixture run the CUDA backend: on a machine with a CUDA GPU, on the GPU;
anywhere else, on the emulated device (:mod:`fusedwarm.emulator`), which executes the same
kernel files and host path on the CPU. The session summary says how many ran and where, so CI
shows that the CUDA code executed.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

CUDA_BACKEND = "cuda_backend"


@dataclass(frozen=True)
class CudaTarget:
    """Where the CUDA tests run. ``device`` holds the tensors; ``run()`` wraps the calls."""

    emulated: bool

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.emulated else "cuda")

    @property
    def name(self) -> str:
        return "the emulated CUDA device" if self.emulated else torch.cuda.get_device_name()

    def run(self, sms: int = 4, blocks_per_sm: int = 2, order: str = "forward", seed: int = 0):
        """A context in which fusedwarm ops on ``device`` tensors run the CUDA backend.

        The emulated device's shape and order are set from the arguments; a GPU ignores them.
        """
        if not self.emulated:
            return contextlib.nullcontext()
        from fusedwarm import emulator

        return emulator.device(sms=sms, blocks_per_sm=blocks_per_sm, order=order, seed=seed)

    def sides(self, **shape) -> list[tuple[torch.device, contextlib.AbstractContextManager]]:
        """(device, context) of the CPU backend, then of this CUDA backend: for bit-for-bit comparisons.

        Each context is used once; ``shape`` configures the emulated device (see :meth:`run`).
        """
        return [(torch.device("cpu"), contextlib.nullcontext()), (self.device, self.run(**shape))]

    def launches(self) -> int | None:
        """Kernel launches the emulated device has run (None on a GPU): proof that a test reached it."""
        if not self.emulated:
            return None
        from fusedwarm import emulator

        return emulator.counters().launches

    def to(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t`` on the device (always a copy: the emulated device shares the CPU)."""
        return t.to(self.device, copy=True)

    def synchronize(self) -> None:
        if not self.emulated:
            torch.cuda.synchronize()

    def require_hardware(self, why: str) -> None:
        """Skips on the emulated device a test that only real hardware can answer."""
        if self.emulated:
            pytest.skip(f"needs a real CUDA GPU: {why}")


@pytest.fixture(scope="session")
def gpu() -> CudaTarget:
    target = CudaTarget(emulated=not torch.cuda.is_available())
    if target.emulated:
        from fusedwarm import emulator

        emulator.load()
    return target


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in getattr(item, "fixturenames", ()):
            item.add_marker(CUDA_BACKEND)


_outcomes: Counter = Counter()


def pytest_runtest_logreport(report):
    if CUDA_BACKEND not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    where = "a CUDA GPU" if torch.cuda.is_available() else "the emulated CUDA device (fusedwarm.emulator)"
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(_outcomes.items()))
    terminalreporter.write_line(f"CUDA backend tests on {where}: {counts}")
