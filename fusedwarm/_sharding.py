"""Sharded parameters (FSDP2's DTensors): local shards, their place in the full tensor, sums over ranks.

This module owns what the optimizers need to know about ``torch.distributed.tensor.DTensor``
parameters, as ``torch.distributed.fsdp.fully_shard`` (FSDP2) makes them: each rank holds a
contiguous shard of every parameter (``Shard(0)`` on a one-dimensional device mesh, dim 0 cut into
near-equal row ranges, possibly empty) and updates only that shard. The optimizer keeps its
state tensors as DTensors with the parameter's placements, as ``torch.optim`` does under FSDP2,
and hands the kernels the local shards together with each shard's element offset, the index of
its first element in the full tensor, by which the random stream keys elements: so training on
any number of ranks writes the bits of unsharded training (DESIGN.md, "Sharding changes no bit").
Norms over sharded gradients are summed over the mesh. It never computes an update.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


_DTENSOR = None  # the DTensor class, once torch.distributed.tensor is imported


def _dtensor_type():
    """torch.distributed.tensor's DTensor, or None while that module is not imported (importing it costs
    most of a second, and no tensor can be a DTensor before it is imported)."""
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        _DTENSOR = getattr(module, "DTensor", None)
    return _DTENSOR


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter, its gradient, or a state made for one)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_sharded(tensors: list[Tensor]) -> bool:
    """True if any of ``tensors`` is a DTensor (one type lookup for the list: a step's per-tensor cost)."""
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or ``t`` itself."""
    return t._local_tensor if is_sharded(t) else t


def problem(p: Tensor) -> str | None:
    """Why the DTensor ``p`` cannot be a fused optimizer's parameter, or None if it can."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    if mesh.ndim != 1 or len(p.placements) != 1:
        return (f"is a DTensor on a {mesh.ndim}-dimensional device mesh with placements {p.placements!r}; "
                f"fusedwarm supports one-dimensional meshes (FSDP2's fully_shard, HSDP not yet)")
    placement = p.placements[0]
    if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
        return (f"is a DTensor with placement {placement!r}; fusedwarm supports Shard(0) (FSDP2's fully_shard) "
                f"and Replicate, not tensor parallelism's other placements")
    if not local(p).is_contiguous():
        return "is a DTensor whose local shard is not contiguous"
    return None


def element_offset(p: Tensor) -> int:
    """The index in the full (contiguous, row-major) tensor of ``p``'s first local element; 0 if unsharded."""
    if not is_sharded(p):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return sum(o * s for o, s in zip(offset, p.stride()))  # a DTensor's strides are the full tensor's


def like(p: Tensor, t: Tensor) -> Tensor:
    """``t``, a tensor shaped as ``p``'s local shard, as a DTensor placed as ``p`` (``t`` if ``p`` is unsharded)."""
    if not is_sharded(p):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def zeros(p: Tensor, dtype: torch.dtype) -> Tensor:
    """A state tensor of zeros for ``p``: contiguous, ``p``'s shape and device, sharded as ``p``."""
    return like(p, torch.zeros(local(p).shape, dtype=dtype, device=p.device))


def sum_over_ranks(values: Tensor, params: list[Tensor]) -> Tensor:
    """``values`` (per-rank partial sums, e.g. of squared gradient elements) summed over the mesh of ``params``.

    Unchanged when no parameter is sharded. A ``Replicate`` parameter's elements are on every
    rank, so its contributions must not be summed: mixing it with sharded ones is an error.
    """
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return values
    from torch.distributed.tensor import Shard

    meshes = {p.device_mesh for p in sharded}
    if len(meshes) != 1 or len(sharded) != len(params) or not all(isinstance(p.placements[0], Shard) for p in sharded):
        raise RuntimeError("fusedwarm: gradient norms over parameters that are not all Shard(0) DTensors of one "
                           "device mesh are not supported (clip='global' or 'tensor' with FSDP2)")
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values, group=meshes.pop().get_group())
    return values
