"""Updating parameters inside the backward pass (``backward_step=True``).

This module owns everything that happens when a gradient arrives during ``backward()``: the
post-accumulate-grad hooks (``Tensor.register_post_accumulate_grad_hook``; Lewandowski & Kosson
2023, *Memory Efficient Mixed-Precision Optimizers*, arXiv 2309.12381), the buckets that collect
ready gradients per (param group, device, dtype), the end-of-backward flush, gradient
accumulation (``accumulate()``), the check that refuses a second gradient for a parameter already
updated in the iteration, the registry that keeps two optimizers from hooking one parameter, and
the DDP communication hook. It decides *when* parameters are updated; *how* (the fused launch,
clipping, loss scaling) belongs to the optimizer, which it calls.

Each parameter's gradient, once complete for the backward, joins a bucket of its (group, device,
dtype); a bucket is updated by one fused call when it holds ``bucket_cap_mb`` of gradients and at
the end of ``backward()``, and its gradients are freed then. The result is bit-identical to
``backward_step=False`` with the same seed and gradients. ``step()`` ends the iteration and must be
called between two backward passes (a second gradient for an already-updated parameter raises an
error rather than updating twice); ``accumulate()`` keeps gradients for micro-batches; ``close()``
removes the hooks.

Every callable handed to autograd or DDP (the post-accumulate-grad hook, the end-of-backward
callback :meth:`BackwardStep.flush_all`, the DDP communication hook and its future's callback) is
``torch.compiler.disable``d (``flush_all``, whose arguments hold no tensor, by the lazy equivalent
:func:`fusedwarm._eager.eager`, as ``FusedOptimizer.step`` is): when ``backward()`` runs inside a
compiled function, or under compiled autograd, dynamo would otherwise trace them, and it drops
attribute assignments on the optimizer they update. Under compiled autograd each hook is therefore
a graph break of the compiled backward and runs eagerly, updating full buckets as usual; but
compiled autograd drops the end-of-backward callback, so the buckets still pending then (at most
``bucket_cap_mb`` of gradients per (group, device, dtype)) are updated by ``step()``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ._eager import eager

# The reason dynamo gives for the hooks' graph break, e.g. in a fullgraph=True error (README: torch.compile).
_EAGER = "fusedwarm's backward_step hooks run eagerly: compile with fullgraph=False"


def _in_compiled_autograd() -> bool:
    """Whether compiled autograd is running the backward (never before torch._dynamo is imported)."""
    module = sys.modules.get("torch._dynamo.compiled_autograd")
    return module is not None and module.in_compiled_autograd_region


# Parameters updated in the backward pass, and by which optimizer: id(p) -> (weakref to p,
# weakref to the optimizer). A second optimizer over such a parameter would update it twice.
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def owner(p: Tensor) -> Any:
    """The optimizer that updates ``p`` in the backward pass, or None."""
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    return entry[1]()


def _claim(p: Tensor, opt: Any) -> None:
    _OWNERS[id(p)] = (weakref.ref(p, lambda _, key=id(p): _OWNERS.pop(key, None)), weakref.ref(opt))


def _release(p: Tensor, opt: Any) -> None:
    if owner(p) is opt:
        del _OWNERS[id(p)]


class BackwardStep:
    """The backward-pass driver of one optimizer: hooks, buckets and accumulation.

    It holds the optimizer weakly (hooks must not keep an optimizer alive) and is never saved:
    a deep-copied or unpickled optimizer makes a new one and attaches its hooks again.

    Args:
        opt: the :class:`fusedwarm.FusedOptimizer` whose parameters are updated.
        bucket_cap_mb: a bucket is updated once its gradients hold this many MiB.
    """

    def __init__(self, opt: Any, bucket_cap_mb: float) -> None:
        self._opt = weakref.ref(opt)
        self._cap_bytes = bucket_cap_mb * 2**20
        self._hooks: dict[int, tuple[Tensor, Any]] = {}  # id(p) -> (p, hook handle)
        self._claimed: dict[int, Tensor] = {}
        self._pending: dict[tuple, list[Tensor]] = {}  # (group index, device, dtype) -> ready parameters
        self._pending_bytes: dict[tuple, int] = {}
        self._queued_task: int | None = None
        self._accumulating = 0
        self.attached = False

    def attach(self) -> None:
        """Registers a post-accumulate-grad hook on every parameter that requires a gradient.

        It also installs :func:`fusedwarm.trainers.guard_clipping`: ``torch.nn.utils``' clipping
        called after backward (as trainers do) would find no gradients and silently clip nothing.
        """
        from .trainers import guard_clipping  # imported here: fusedwarm.trainers imports the optimizers

        guard_clipping()
        opt = self._opt()
        self.attached = True
        ref = weakref.ref(self)
        for group in opt.param_groups:
            for p in group["params"]:
                if id(p) in self._hooks or not p.requires_grad:
                    continue
                _claim(p, opt)
                self._claimed[id(p)] = p

                @torch.compiler.disable(reason=_EAGER)
                def hook(param: Tensor, ref=ref) -> None:
                    driver = ref()
                    if driver is not None:
                        driver.grad_ready(param)

                self._hooks[id(p)] = (p, p.register_post_accumulate_grad_hook(hook))

    def _remove_hooks(self) -> None:
        for _, handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.attached = False

    def close(self) -> None:
        """Flushes pending buckets, removes the hooks and releases the parameters."""
        self.flush_all()
        self._remove_hooks()
        opt = self._opt()
        for p in self._claimed.values():
            _release(p, opt)
        self._claimed.clear()

    def check_ready(self, p: Tensor, g: Tensor) -> None:
        """Checks a gradient that arrives during backward (hook or DDP bucket) before ``p`` is updated."""
        opt = self._opt()
        if id(p) in opt._updated:
            raise RuntimeError(
                f"{type(opt).__name__}: {opt._label(p)} received a second gradient in one iteration (backward "
                f"ran twice, e.g. with retain_graph=True, without opt.step() in between). With backward_step=True, "
                f"call opt.step() after each backward, or sum gradients over several backward passes inside "
                f"opt.accumulate()"
            )
        gi, i = opt._index[id(p)]
        opt._check_grad(opt.param_groups[gi], gi, i, p, g)

    @torch.no_grad()
    def grad_ready(self, p: Tensor) -> None:
        """Called by autograd once ``p.grad`` is complete for this backward: bucket ``p``, maybe flush."""
        entry = self._hooks.get(id(p))
        if entry is None or entry[0] is not p or self._accumulating:
            return
        opt = self._opt()
        self.check_ready(p, p.grad)
        opt._begin_iteration()
        opt._updated[id(p)] = p
        # Compiled autograd drops callbacks queued from eager code (torch 2.13): there the buckets
        # still pending at the end of backward wait for step(), which flushes them first.
        task = torch._C._current_graph_task_id()
        if task != self._queued_task and not _in_compiled_autograd():
            self._queued_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self.flush_all)
        key = (opt._index[id(p)][0], p.device, p.dtype)
        self._pending.setdefault(key, []).append(p)
        self._pending_bytes[key] = self._pending_bytes.get(key, 0) + p.grad.numel() * p.grad.element_size()
        if self._pending_bytes[key] >= self._cap_bytes:
            self._flush(key)

    def _flush(self, key: tuple) -> None:
        params = self._pending.pop(key)
        del self._pending_bytes[key]
        self._opt()._launch(key[0], params, [p.grad for p in params])
        for p in params:
            p.grad = None

    @eager(reason=_EAGER)
    @torch.no_grad()
    def flush_all(self) -> None:
        """Updates every bucket still pending (end of backward, and the start of step())."""
        self._queued_task = None
        for key in list(self._pending):
            self._flush(key)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Inside the block, hooks leave gradients in ``.grad`` (see ``FusedOptimizer.accumulate``)."""
        self._accumulating += 1
        try:
            yield
        finally:
            self._accumulating -= 1

    def register_ddp_comm_hook(self, ddp_model: torch.nn.Module) -> None:
        """Replaces the parameter hooks by a DDP communication hook (see ``FusedOptimizer``'s)."""
        import torch.distributed as dist

        self._remove_hooks()
        ref = weakref.ref(self)
        # The process group may run `update` on its worker threads (gloo does), several buckets at
        # once; the per-iteration bookkeeping is not thread-safe, so bucket updates take turns.
        lock = threading.Lock()

        # No annotations: DDP checks them against dist.GradBucket and Future[Tensor], and with
        # `from __future__ import annotations` they would be strings and be rejected.
        @torch.compiler.disable(reason=_EAGER)
        def comm_hook(process_group, bucket):
            group = process_group if process_group is not None else dist.group.WORLD
            world = dist.get_world_size(group)
            fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()

            @torch.compiler.disable(reason=_EAGER)
            def update(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
                buffer = fut.value()[0].div_(world)
                driver = ref()
                opt = driver._opt() if driver is not None else None
                # After close() the hook only averages, as DDP's default; step() then updates.
                if opt is not None and opt.backward_step:
                    with lock:
                        driver.ddp_update(bucket.parameters(), buffer)
                return buffer

            return fut.then(update)

        ddp_model.register_comm_hook(ddp_model.process_group, comm_hook)

    @torch.no_grad()
    def ddp_update(self, params: list[Tensor], buffer: Tensor) -> None:
        """Updates one DDP bucket's parameters with their slices of the reduced flat buffer."""
        opt = self._opt()
        by_group: dict[tuple[int, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        offset = 0
        for p in params:
            g = buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if id(p) not in opt._index:
                continue
            self.check_ready(p, g)
            entry = by_group.setdefault((opt._index[id(p)][0], p.dtype), ([], []))
            entry[0].append(p)
            entry[1].append(g)
        opt._begin_iteration()
        for (gi, _), (ps, gs) in by_group.items():
            opt._launch(gi, ps, gs)
            for p in ps:
                opt._updated[id(p)] = p


class BackwardStepMethods:
    """Mixin of :class:`fusedwarm.FusedOptimizer`: the public methods of the step in backward."""

    def accumulate(self) -> contextlib.AbstractContextManager[None]:
        """Keeps gradients instead of stepping, for gradient accumulation with ``backward_step=True``.

        Inside the block, ``backward()`` accumulates into ``.grad`` as plain autograd does. The
        next ``backward()`` outside the block adds its gradients and updates each parameter as
        usual (so its result equals one step on the summed gradients); alternatively
        :meth:`step` updates every parameter that holds a gradient. Scale each micro-batch's loss
        (e.g. by ``1 / micro_batches``) as you would without fusedwarm.
        """
        return self._backward.accumulate()

    @eager  # it changes bookkeeping and hooks (see step())
    def close(self) -> None:
        """Removes the backward hooks: autograd fills ``.grad`` again and :meth:`step` updates as usual.

        Pending buckets are flushed first. Calling it twice, or without ``backward_step``, is harmless.
        """
        self._backward.close()
        self._options["backward_step"] = False

    def register_ddp_comm_hook(self, ddp_model: torch.nn.Module) -> None:
        """Runs the fused update on each DDP bucket right after its all-reduce.

        For ``backward_step=True`` under :class:`torch.nn.parallel.DistributedDataParallel`: the
        per-parameter hooks (which would see local, un-reduced gradients) are replaced by a DDP
        communication hook that all-reduces a bucket, averages it, and updates the bucket's
        parameters at once, so updates overlap the remaining communication. DDP keeps its own
        bucket buffers (a full set of gradients), so under DDP the saving is time, not memory;
        ``gradient_as_bucket_view=True`` at least avoids DDP's second copy in ``.grad``. After
        :meth:`close` the hook only averages and :meth:`step` updates as usual.

        Args:
            ddp_model: the ``DistributedDataParallel`` module wrapping this optimizer's parameters.
        """
        if not self.backward_step:
            raise RuntimeError(f"{type(self).__name__}.register_ddp_comm_hook needs backward_step=True")
        self._backward.register_ddp_comm_hook(ddp_model)
