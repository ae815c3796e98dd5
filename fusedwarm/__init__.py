"""fusedwarm: fused half-precision-only optimizers for PyTorch.

AdamW, SGD and Lion that update bfloat16/float16 weights with no float32 master copy (the
missing low bits live in a small integer tensor, or rounding is stochastic), on CPU and CUDA.
Warmup and learning-rate schedules (``fusedwarm.schedules``) are evaluated inside the update from
the step counter on the device. ``fusedwarm.reference`` holds the plain-PyTorch float32 reference
they are validated against. This module only re-exports the public API; it holds no logic.
"""

from . import schedules
from .optim import SGD, AdamW, FusedOptimizer, Lion

__version__ = "0.1.0"
__all__ = ["AdamW", "SGD", "Lion", "FusedOptimizer", "schedules", "__version__"]
