"""FSDP2 (``fully_shard``, DTensor parameters): sharding changes no bit, step in backward, DCP resharding.

Worker processes (gloo, CPU, one thread each) shard a small MLP with ``fully_shard`` on a
one-dimensional mesh. Its layers have 33, 40 and 1 output rows, so two ranks hold uneven shards
(17 and 16 rows) and one rank an empty shard of the last layer. The parent trains the same
model, unsharded, in one process, and compares the full tensors reassembled from the ranks' local
shards (parameters, float32 masters, extra bits, states) bit for bit:

* **Same gradients.** Each step every rank is given its shard of the same full gradient
  (``distribute_tensor``): AdamW with 16 and 0 extra bits and bfloat16 states, 8 extra bits with
  row-wise update control, SGD and Lion without extra bits. Stochastic rounding draws its random
  words by the element's index in the full tensor, so two ranks write the bits of one process.
* **Step in backward.** Every rank trains on the same batch, so FSDP2's averaged reduce-scatter
  ``(g + g) / 2`` is the gradient itself; with ``backward_step=True`` each shard is updated in the
  hook FSDP2 calls after the reduce-scatter, and the result equals one process's ordinary step.
* **Distributed checkpoints.** ``torch.distributed.checkpoint`` with ``get_optimizer_state_dict``
  / ``set_optimizer_state_dict``: saved by two ranks and resumed by one, and the other way round,
  training continues bit for bit as if never interrupted.
* **Clipping.** ``max_grad_norm`` with ``clip="global"``: the norm is summed over ranks; it equals
  one process's up to float32 summation order (CLIP_RTOL).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedwarm
from fusedwarm import _ops
from helpers import free_port, init_gloo_worker

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

SIZES = (4, 33, 40, 1)
INIT_SEED, GRAD_SEED, DATA_SEED = 21, 22, 23
STEPS, RESUME_AT = 5, 3
LR = {"AdamW": 1e-2, "SGD": 5e-2, "Lion": 1e-3}
CONFIGS = {
    "adamw-x16": ("AdamW", dict(extra_bits=16, state_dtype=torch.bfloat16)),
    "adamw-x0": ("AdamW", dict(extra_bits=0, state_dtype=torch.bfloat16)),
    "adamw-x8-row": ("AdamW", dict(extra_bits=8, update_control="row", update_norm=5e-3)),
    "sgd-x0": ("SGD", dict(extra_bits=0, momentum=0.9, weight_decay=1e-3)),
    "lion-x0": ("Lion", dict(extra_bits=0, weight_decay=0.1)),
}
BACKWARD = ("adamw-x16", "adamw-x0")
# Clipping, each with the training mode it runs in: "global" and "tensor" on given gradients,
# "lagged" in the backward pass (each hook's launch sums its tensors' norms over the ranks).
CLIPS = {
    "clip-global": ("AdamW", dict(extra_bits=16, max_grad_norm=0.05, clip="global"), "grads", False),
    "clip-tensor": ("AdamW", dict(extra_bits=16, max_grad_norm=0.01, clip="tensor"), "grads", False),
    "clip-lagged": ("AdamW", dict(extra_bits=16, max_grad_norm=0.05, clip="lagged"), "batch", True),
    "clip-lagged-grads": ("AdamW", dict(extra_bits=16, max_grad_norm=0.05, clip="lagged", loss_scale=1.0),
                          "grads", False),
}
# Two ranks add their shards' squares, then the two sums; one process adds whole tensors' squares.
# The float32 sums round differently (a few ulps) and so does every clipped update after; measured
# 0 to 2e-7 relative on norms and masters, so 1e-5.
CLIP_RTOL = 1e-5


def _model() -> torch.nn.Sequential:
    torch.manual_seed(INIT_SEED)
    layers: list[torch.nn.Module] = []
    for n_in, n_out in zip(SIZES, SIZES[1:]):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).to(torch.bfloat16)


def _full_grads(model, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(GRAD_SEED * 1000 + step)
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in model.parameters()]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(DATA_SEED * 1000 + step)
    return (torch.randn(8, SIZES[0], generator=gen).to(torch.bfloat16),
            torch.randn(8, SIZES[-1], generator=gen).to(torch.bfloat16))


def _optimizer(model, config: str, **extra):
    name, kw = CONFIGS[config] if config in CONFIGS else CLIPS[config][:2]
    if config in CLIPS:
        extra = {"backward_step": CLIPS[config][3], **extra}
    return getattr(fusedwarm, name)(model.parameters(), lr=LR[name], seed=77, **kw, **extra)


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t).detach().clone()


def _snapshot(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's local shard, master and states (the rank's rows of the full tensors)."""
    out = {}
    for name, p in model.named_parameters():
        entry = {"param": _local(p), "master": _local(opt.master_weight(p))}
        entry.update({k: _local(v) for k, v in opt.state[p].items()})
        out[name] = entry
    return out


def _train(model, opt, steps: range, mesh, mode: str) -> int:
    """Trains on given gradients ("grads"), a batch per step ("batch") or two accumulated micro-batches
    ("accumulate", FSDP2 syncing the second only); returns the gradients still held before the last step()."""
    from torch.distributed.tensor import distribute_tensor

    held = 0
    for step in steps:
        if mode == "grads":
            for p, g in zip(model.parameters(), _full_grads(model, step)):
                p.grad = g if mesh is None else distribute_tensor(g, mesh, p.placements, src_data_rank=None)
        else:
            micro = 2 if mode == "accumulate" else 1
            for i in range(micro):
                if mesh is not None:
                    model.set_requires_gradient_sync(i == micro - 1)
                x, y = _batch(micro * step + i)
                F.mse_loss(model(x), y).backward()
        held = sum(p.grad is not None for p in model.parameters())
        opt.step()
        opt.zero_grad()
    return held


def _sharded(mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _checkpoint(model, opt):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}


def _resume(model, opt, directory: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd = _checkpoint(model, opt)
    dcp.load(sd, checkpoint_id=directory)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, optim_state_dict=sd["optim"])


def _worker(rank: int, world: int, port: int, out_dir: str, tasks: list[str]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    init_gloo_worker(rank, world, port)
    try:
        mesh = init_device_mesh("cpu", (world,))
        result = {}
        for task in tasks:
            kind, _, config = task.partition(":")
            model = _sharded(mesh)
            if kind == "grads":
                opt = _optimizer(model, config)
                _train(model, opt, range(STEPS), mesh, "grads")
                result[task + ":dtensors"] = [type(t).__name__ for p in model.parameters()
                                              for t in (opt.master_weight(p), *opt.state[p].values())]
            elif kind in ("backward", "accumulate"):
                opt = _optimizer(model, config, backward_step=True)
                mode = "batch" if kind == "backward" else "accumulate"
                result[task + ":held"] = _train(model, opt, range(STEPS), mesh, mode)
            elif kind == "clip":
                opt = _optimizer(model, config)
                _train(model, opt, range(STEPS), mesh, CLIPS[config][2])
                result[task + ":norm"] = opt.last_grad_norm().clone()
            elif kind == "save":  # train, checkpoint, train on: the uninterrupted run
                opt = _optimizer(model, config)
                _train(model, opt, range(RESUME_AT), mesh, "grads")
                dcp.save(_checkpoint(model, opt), checkpoint_id=os.path.join(out_dir, f"ckpt-{world}-{config}"))
                _train(model, opt, range(RESUME_AT, STEPS), mesh, "grads")
            elif kind in ("resume", "resume-same"):  # resume the other (or this) world size's checkpoint
                opt = _optimizer(model, config)
                saved_by = 3 - world if kind == "resume" else world
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    _resume(model, opt, os.path.join(out_dir, f"ckpt-{saved_by}-{config}"))
                result[task + ":warnings"] = [str(w.message) for w in caught if "fusedwarm" in str(w.message)]
                _train(model, opt, range(RESUME_AT, STEPS), mesh, "grads")
            result[task] = _snapshot(model, opt)
        torch.save(result, os.path.join(out_dir, f"world{world}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, out_dir, tasks: list[str]) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(world, free_port(), str(out_dir), tasks), nprocs=world, join=True)
    return [torch.load(out_dir / f"world{world}-rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict]]:
    """Each world size's per-rank results; one spawn per world size and phase."""
    _ops.load()  # build the extension once here, not in every worker
    out_dir = tmp_path_factory.mktemp("fsdp")
    one = _spawn(1, out_dir, ["save:adamw-x0"])
    two = _spawn(2, out_dir, [f"grads:{c}" for c in CONFIGS] + [f"backward:{c}" for c in BACKWARD]
                 + ["accumulate:adamw-x16", *[f"clip:{c}" for c in CLIPS], "save:adamw-x0", "resume:adamw-x0",
                    "save:clip-lagged-grads", "resume-same:clip-lagged-grads"])
    one_resumed = _spawn(1, out_dir, ["resume:adamw-x0"])
    return {1: [{**one[0], **one_resumed[0]}], 2: two}


def _full(ranks: list[dict], task: str) -> dict[str, dict[str, torch.Tensor]]:
    """The full tensors of a task: each rank's rows, in rank order (Shard(0)); 0-dim entries from rank 0."""
    out = {}
    for name, entry in ranks[0][task].items():
        out[name] = {k: v if v.dim() == 0 else torch.cat([r[task][name][k] for r in ranks]) for k, v in entry.items()}
    return out


def _reference(config: str, mode: str = "grads", backward_step: bool = False) -> dict:
    torch.set_num_threads(1)
    model = _model()
    opt = _optimizer(model, config, backward_step=backward_step) if config in CONFIGS else _optimizer(model, config)
    _train(model, opt, range(STEPS), None, mode)
    return _snapshot(model, opt), opt


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8, 8: torch.int64}[t.element_size()])


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key, w in want[name].items():
            g = got[name][key]
            assert g.shape == w.shape and g.dtype == w.dtype, (name, key, g.shape, w.shape)
            assert torch.equal(_bits(g), _bits(w)), f"{name}.{key}: {int((_bits(g) != _bits(w)).sum())} differ"


@pytest.mark.parametrize("config", CONFIGS)
def test_two_ranks_write_one_process_bits(runs, config):
    _assert_same(_full(runs[2], f"grads:{config}"), _reference(config)[0])


@pytest.mark.parametrize("config", BACKWARD)
def test_step_in_backward_under_fsdp2_equals_one_process_step(runs, config):
    _assert_same(_full(runs[2], f"backward:{config}"), _reference(config, "batch")[0])
    # Each shard was updated in FSDP2's hook after its reduce-scatter, and its gradient freed then.
    assert [r[f"backward:{config}:held"] for r in runs[2]] == [0, 0]


def test_accumulation_without_gradient_sync_then_step_in_backward(runs):
    # model.set_requires_gradient_sync(False) for the first micro-batch: FSDP2 keeps the unsharded
    # gradient and calls no hook; the synced second backward reduce-scatters the sum and the hooks
    # update each shard once, as one process's step on the accumulated gradient.
    _assert_same(_full(runs[2], "accumulate:adamw-x16"), _reference("adamw-x16", "accumulate")[0])
    assert [r["accumulate:adamw-x16:held"] for r in runs[2]] == [0, 0]


def test_empty_shards_and_uneven_shards_are_covered(runs):
    shapes = {name: entry["param"].shape for name, entry in runs[2][1]["grads:adamw-x16"].items()}
    assert shapes["0.weight"] == (16, 4) and shapes["4.weight"] == (0, 40), shapes


def test_masters_and_states_are_dtensors_step_counts_plain(runs):
    # As torch.optim under FSDP2: per-element state sharded like the parameter, "step" a plain
    # scalar; master_weight(p) a DTensor too. Per parameter: master, step, extra, exp_avg, exp_avg_sq.
    kinds = runs[2][0]["grads:adamw-x16:dtensors"]
    assert kinds == ["DTensor", "Tensor", "DTensor", "DTensor", "DTensor"] * (2 * (len(SIZES) - 1)), kinds


@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_distributed_checkpoint_resumes_on_another_world_size(runs, saved, resumed):
    want, _ = _reference("adamw-x0")
    _assert_same(_full(runs[saved], "save:adamw-x0"), want)  # the uninterrupted run
    _assert_same(_full(runs[resumed], "resume:adamw-x0"), want)


def test_checkpoint_carries_the_lagged_clipping_coefficient(runs):
    # The loss-scale and clipping scalars live in the first param group, which
    # get_optimizer_state_dict keeps: a resumed lagged-clipping run continues bit for bit.
    _assert_same(_full(runs[2], "resume-same:clip-lagged-grads"), _full(runs[2], "save:clip-lagged-grads"))
    assert [r["resume-same:clip-lagged-grads:warnings"] for r in runs[2]] == [[], []]


@pytest.mark.parametrize("config", CLIPS)
def test_clipping_sums_the_norms_over_ranks(runs, config):
    want, opt = _reference(config, CLIPS[config][2])
    norm = runs[2][0][f"clip:{config}:norm"]
    assert float(norm) == pytest.approx(float(opt.last_grad_norm()), rel=CLIP_RTOL)
    assert float(opt.last_grad_norm()) > CLIPS[config][1]["max_grad_norm"]  # the updates were clipped
    got = _full(runs[2], f"clip:{config}")
    for name in want:
        m, r = got[name]["master"], want[name]["master"]
        assert float((m - r).abs().max()) <= CLIP_RTOL * float(r.abs().max()), name
