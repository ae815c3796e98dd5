"""DistributedDataParallel: the fused update in DDP's communication hook trains as one process would.

Two processes (gloo, CPU) each train the same small MLP under DDP with ``fusedwarm.AdamW(...,
backward_step=True)`` and :meth:`~fusedwarm.FusedOptimizer.register_ddp_comm_hook`, each on its
half of every batch (loss = mean over its half). DDP is given a small ``bucket_cap_mb`` so that,
once it rebuilds its buckets after the first iteration, the model spans three buckets; the first
iteration runs with DDP's single initial bucket. The parent trains the same model from the same
initialization and fusedwarm seed in one process and compares.

Two references, two kinds of comparison:

* **Split batch, bit for bit.** The reference computes each half's mean-loss gradient ``g0`` and
  ``g1`` exactly as the ranks do and steps on ``(g0 + g1) / 2``: with two ranks gloo's sum is the
  single rounded addition ``g0 + g1`` (addition commutes exactly, in float32 and in bfloat16, where
  gloo and torch both add in float32 and round to nearest even), and halving is exact, so the
  reduced buffer equals the reference gradient bit for bit and so must everything after it. This is
  done with ``backward_step=False`` (gradients set by hand) and with ``backward_step=True``, where
  ``accumulate()`` sums the two halves' gradients of ``loss / 2`` (scaling by a power of two is
  exact through every op of the model). It also checks the bucket layout end to end: a gradient
  slice given to the wrong parameter could not match.
* **Combined batch, within a tolerance.** The reference takes one mean loss over the combined
  batch, with ``backward_step=False`` and ``backward_step=True``. ``mean(16 rows)`` and
  ``(mean(8) + mean(8)) / 2`` sum in different orders, so the gradients differ by rounding and
  cannot be made equal; COMBINED_RTOL states how far the parameters may drift apart.

CPU kernels may split their sums by thread count, so the workers and the reference all run on one
thread.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedwarm
from fusedwarm import _ops
from helpers import HYPER, free_port, init_gloo_worker, rel_err

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORLD, HALF, ITERS = 2, 8, 6
SIZES = (16, 32, 32, 32, 4)  # an MLP with four Linear layers
N_PARAMS = 2 * (len(SIZES) - 1)
# 2 KiB: DDP's rebuilt buckets are [Linear 4, Linear 3], [Linear 2], [Linear 1] (float32 and bfloat16).
BUCKET_CAP_MB = 2048 / 2**20
# No warmup: the tests see each update as a change of the visible (bfloat16) weight.
OPT_KW = dict(HYPER["AdamW"], extra_bits=16, seed=1234, warmup="none")
INIT_SEED, DATA_SEED = 11, 12

# (case id, parameter dtype, DDP's gradient_as_bucket_view)
CASES = (("f32", torch.float32, False), ("f32-bucketview", torch.float32, True), ("bf16-x16", torch.bfloat16, False))
CASE_IDS = [c[0] for c in CASES]

# Combined-batch reference: max|ddp - ref| / max|ref| of the final weights and float32 masters after
# ITERS AdamW steps. float32: the gradients differ by summation-order rounding, about one float32 ulp
# (6e-8) relative, and AdamW's normalized update passes that on; measured 1.7e-7, so 1e-6.
# bfloat16: the model's forward and backward round every product sum to 8 bits, in two different
# orders, so gradient elements with cancellation differ by far more than 2^-8 relative, and early
# AdamW steps (close to lr * sign(g)) turn that into up to ~lr per step on such elements; weights
# also flip by one bf16 ulp (2^-8 relative) where their masters straddle a rounding boundary.
# Measured 5.6e-3 (masters, about lr = 1e-3 absolute on weights of ~0.2); 2e-2 leaves margin.
# AdamW is almost invariant to the gradient's scale, so these comparisons could not tell a sum
# from an average: the bit-exact split-batch comparisons and the .grad check pin that down.
COMBINED_RTOL = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


def _model(dtype: torch.dtype) -> torch.nn.Sequential:
    torch.manual_seed(INIT_SEED)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(SIZES, SIZES[1:])):
        layers += [torch.nn.Linear(n_in, n_out)] + ([torch.nn.Tanh()] if i < len(SIZES) - 2 else [])
    return torch.nn.Sequential(*layers).to(dtype)


def _batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ITERS combined batches (WORLD * HALF rows); rank r trains on rows [r * HALF, (r + 1) * HALF)."""
    gen = torch.Generator().manual_seed(DATA_SEED)
    return [(torch.randn(WORLD * HALF, SIZES[0], generator=gen).to(dtype),
             torch.randn(WORLD * HALF, SIZES[-1], generator=gen).to(dtype)) for _ in range(ITERS)]


def _half(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * HALF:(rank + 1) * HALF]


def _snapshot(model: torch.nn.Module, opt: fusedwarm.AdamW) -> dict[str, list[torch.Tensor]]:
    params = list(model.parameters())
    return {"params": [p.detach().clone() for p in params], "masters": [opt.master_weight(p) for p in params]}


# ---- the ranks --------------------------------------------------------------------------------------


def _bucket_layout(dtype: torch.dtype) -> list[tuple[int, list[tuple[int, int]]]]:
    """Per bucket reduced in two iterations: the buffer's numel, and per gradient (element offset, numel).

    register_ddp_comm_hook slices the buffer in bucket.parameters() order by numel; this reads
    where DDP actually put each gradient (bucket.gradients() are views into the buffer).
    """
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(_model(dtype), bucket_cap_mb=BUCKET_CAP_MB)
    seen: list[tuple[int, list[tuple[int, int]]]] = []

    def hook(_, bucket):
        buffer = bucket.buffer()
        views = []
        for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
            assert g.shape == p.shape and g.dtype == buffer.dtype
            views.append(((g.data_ptr() - buffer.data_ptr()) // buffer.element_size(), p.numel()))
        seen.append((buffer.numel(), views))
        return dist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, hook)
    for x, y in _batches(dtype)[:2]:
        F.mse_loss(ddp(_half(x, dist.get_rank())), _half(y, dist.get_rank())).backward()
    return seen


def _train_ddp(dtype: torch.dtype, bucket_view: bool, process_group=None) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    model = _model(dtype)
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB, gradient_as_bucket_view=bucket_view,
                                  process_group=process_group)
    opt = fusedwarm.AdamW(model.parameters(), **OPT_KW, backward_step=True)
    opt.register_ddp_comm_hook(ddp)
    # Count the buckets the hook updates per iteration (the hook looks the method up on the instance).
    updates: list[int] = []
    ddp_update = opt._backward.ddp_update
    opt._backward.ddp_update = lambda params, buffer: (updates.append(len(params)), ddp_update(params, buffer))
    params = list(model.parameters())
    record: dict[str, list] = {k: [] for k in ("buckets", "grads", "storages", "grads_after_step", "in_backward")}
    for x, y in _batches(dtype):
        updates.clear()
        before = [p.detach().clone() for p in params]
        F.mse_loss(ddp(_half(x, rank)), _half(y, rank)).backward()
        after_backward = [p.detach().clone() for p in params]
        record["grads"].append([None if p.grad is None else p.grad.clone() for p in params])
        record["storages"].append(len({p.grad.untyped_storage().data_ptr() for p in params if p.grad is not None}))
        opt.step()
        record["buckets"].append(list(updates))
        record["grads_after_step"].append([p.grad is not None for p in params])
        # Updated in backward (changed), not again in step() (unchanged).
        record["in_backward"].append([not torch.equal(b, a) and torch.equal(a, p) for b, a, p in
                                      zip(before, after_backward, params)])
    record["steps"] = [int(opt.state[p]["step"]) for p in params]
    return {**_snapshot(model, opt), **record}


def _worker(rank: int, port: int, out_dir: str) -> None:
    init_gloo_worker(rank, WORLD, port)
    try:
        result = {"layout": {str(dtype): _bucket_layout(dtype) for dtype in (torch.float32, torch.bfloat16)}}
        for case, dtype, bucket_view in CASES:
            result[case] = _train_ddp(dtype, bucket_view)
        # DDP over a group of this rank alone (every rank creates every group).
        own = [dist.new_group([r]) for r in range(WORLD)][rank]
        result["own-group"] = _train_ddp(torch.float32, False, process_group=own)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's results, from one 2-process run of every case."""
    import torch.multiprocessing as mp

    _ops.load()  # build the extension once here, not in both workers
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


# ---- the single-process references ------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _half_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int) -> list[torch.Tensor]:
    loss = F.mse_loss(model(_half(x, rank)), _half(y, rank))
    return list(torch.autograd.grad(loss, list(model.parameters())))


def _reference(dtype: torch.dtype, batch: str | int, backward_step: bool) -> dict:
    """Single-process training on (g0 + g1) / 2 ("split"), the combined batch's mean ("combined"), or one half."""
    with _one_thread():
        model = _model(dtype)
        params = list(model.parameters())
        opt = fusedwarm.AdamW(params, **OPT_KW, backward_step=backward_step)
        grads = []
        for x, y in _batches(dtype):
            if batch == "combined":
                F.mse_loss(model(x), y).backward()
            elif batch in range(WORLD):
                F.mse_loss(model(_half(x, batch)), _half(y, batch)).backward()
            elif backward_step:
                with opt.accumulate():
                    (F.mse_loss(model(_half(x, 0)), _half(y, 0)) / 2).backward()
                (F.mse_loss(model(_half(x, 1)), _half(y, 1)) / 2).backward()
            else:
                g0, g1 = _half_grads(model, x, y, 0), _half_grads(model, x, y, 1)
                grads.append([(a + b) / 2 for a, b in zip(g0, g1)])
                for p, g in zip(params, grads[-1]):
                    p.grad = g
            opt.step()
            opt.zero_grad()
        result = _snapshot(model, opt)
        opt.close()
        return {**result, "grads": grads}


# ---- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bucket_layout(ranks, dtype):
    """Each DDP bucket's gradients lie back to back in its buffer, in bucket.parameters() order."""
    for rank in ranks:
        layout = rank["layout"][str(dtype)]
        for numel, views in layout:
            offsets = [sum(n for _, n in views[:i]) for i in range(len(views) + 1)]
            assert [o for o, _ in views] == offsets[:-1] and numel == offsets[-1]
        # First iteration: DDP's single initial bucket; then its rebuilt, size-capped buckets.
        assert len(layout[0][1]) == N_PARAMS
        assert len(layout[1:]) >= 2


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hook_updates_every_bucket(ranks, case):
    """The comm hook updates each bucket during backward, each parameter once per iteration."""
    name = case[0]
    for rank in ranks:
        buckets = rank[name]["buckets"]
        assert buckets[0] == [N_PARAMS]
        assert all(len(b) >= 2 and sum(b) == N_PARAMS for b in buckets[1:]), buckets
        assert all(all(it) for it in rank[name]["in_backward"])
        assert rank[name]["steps"] == [ITERS] * N_PARAMS


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grads_written_by_ddp_then_freed(ranks, case):
    """Under DDP, every .grad after backward holds the averaged gradient; step() frees them.

    The comm hook updates the parameters, then DDP writes the reduced bucket into .grad: copies of
    it by default, views into the bucket buffer with gradient_as_bucket_view=True. So the memory a
    backward-step saves without DDP is not saved under it. The averaged gradient is (g0 + g1) / 2
    of the split-batch reference, bit for bit.
    """
    name, dtype, bucket_view = case
    expected = _reference(dtype, "split", backward_step=False)["grads"]
    for rank in ranks:
        for it, (got, want) in enumerate(zip(rank[name]["grads"], expected, strict=True)):
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                assert g is not None, f"iteration {it}, parameter {i}: no .grad after backward"
                assert torch.equal(g, w), f"iteration {it}, parameter {i}: max diff {(g - w).abs().max()}"
        # One storage per bucket (views into its buffer), or one per parameter (copies).
        storages = [len(b) for b in rank[name]["buckets"]] if bucket_view else [N_PARAMS] * ITERS
        assert rank[name]["storages"] == storages
        assert not any(any(has_grad) for has_grad in rank[name]["grads_after_step"])


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ranks_agree(ranks, case):
    name = case[0]
    for key in ("params", "masters"):
        for a, b in zip(ranks[0][name][key], ranks[1][name][key], strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backward_step", [False, True], ids=["step", "backward_step"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_equals_split_batch_reference(ranks, case, backward_step):
    """Bit for bit: single-process training on (g0 + g1) / 2, the reduced buffer's exact value."""
    name, dtype, _ = case
    ref = _reference(dtype, "split", backward_step)
    for key in ("params", "masters"):
        for i, (got, want) in enumerate(zip(ranks[0][name][key], ref[key], strict=True)):
            assert torch.equal(got, want), f"{key}[{i}]: max diff {(got.float() - want.float()).abs().max()}"


@pytest.mark.parametrize("backward_step", [False, True], ids=["step", "backward_step"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_combined_batch(ranks, case, backward_step):
    """Within COMBINED_RTOL: single-process training on the combined batch's mean loss."""
    name, dtype, _ = case
    ref = _reference(dtype, "combined", backward_step)
    for key in ("params", "masters"):
        for i, (got, want) in enumerate(zip(ranks[0][name][key], ref[key], strict=True)):
            err = rel_err(got, want)
            assert err <= COMBINED_RTOL[dtype], f"{key}[{i}]: relative error {err:.3g}"


def test_uses_ddp_process_group(ranks):
    """The hook reduces over the DDP model's process group: here each rank's own, so no averaging."""
    for r, rank in enumerate(ranks):
        ref = _reference(torch.float32, r, backward_step=False)
        for key in ("params", "masters"):
            for i, (got, want) in enumerate(zip(rank["own-group"][key], ref[key], strict=True)):
                assert torch.equal(got, want), f"rank {r} {key}[{i}]: max diff {(got - want).abs().max()}"
