"""Update-size control (Kosson et al. 2024): ``update_control="tensor" | "row"`` with ``update_norm``
bounds every row's update relative to its weight; ``"rotational"`` rotates every output row by the
equilibrium angular update at fixed norm. Fused vs reference, the bound, the norm and angle, bit
identity with ``backward_step=True`` and across backends, and the errors."""

from __future__ import annotations

import math

import pytest
import torch

import fusedwarm
from fusedwarm import _ops, reference

from helpers import HYPER, MASTER_RTOL, OPTIMIZERS, rel_err, seed_all

# Shapes with rows of several 1024-element chunks (and a partial last chunk), a 1-D tensor (one row
# in both modes) and a 3-D weight (rows along dim 0).
SHAPES = [(6, 2500), (3000,), (5, 3, 7)]
CONTROLS = ("tensor", "row")
# Half the typical ||u|| / ||w|| of one step of each optimizer with HYPER and unit gradients on unit
# weights, so that the bound is active on most rows.
BOUND = {"AdamW": 5e-4, "SGD": 5e-3, "Lion": 5e-5}
# ||u|| = update_norm ||w|| on a bounded float32 row holds up to the float32 roundings of the norms
# and the factor (relative, BOUND_RTOL) and the final rounding of the new weight, at most
# 2^-24 max|w| per element, so sqrt(n) 2^-24 max|w| on the row's norm (absolute, _rounding).
BOUND_RTOL = 1e-6
NO_WARMUP = dict(warmup="none")
# Rotational runs: weight decay sets the angular update, so every optimizer gets some.
ROT_HYPER = {"AdamW": HYPER["AdamW"], "SGD": {**HYPER["SGD"], "weight_decay": 0.05}, "Lion": HYPER["Lion"]}
# Fused vs reference, rotational: max|fused - reference| / max|reference| on the master after 30
# steps. The fused row sums are float32 in chunk order and the orthogonal part's norm comes from
# them (||u||^2 - (u.w)^2 / w.w), the reference's from torch's reductions of u_perp itself.
ROT_RTOL = 1e-5


def _rows(t: torch.Tensor, control: str) -> torch.Tensor:
    return t.reshape(t.shape[0] if control == "row" and t.dim() >= 2 else 1, -1)


def _rounding(w: torch.Tensor) -> torch.Tensor:
    """Per row, the largest change of ||u|| that rounding the new float32 weight can make."""
    return w.shape[1] ** 0.5 * 2.0**-24 * w.abs().amax(dim=1) * (1 + 2 * max(BOUND.values()))


def _grads(params, steps: int, inf_at: int | None = None):
    """Fresh unit-normal gradients; with inf_at, one element of every tensor is inf at that step."""
    out = []
    for t in range(steps):
        gs = [torch.randn(p.shape) for p in params]
        if t == inf_at:
            for g in gs:
                g.view(-1)[7] = torch.inf
        out.append(gs)
    return out


def _masters_after_30_steps(name: str, init: list[torch.Tensor], kw: dict):
    """Fused (bf16 + 16 extra bits, fp32 states) and reference masters after 30 steps of the same
    gradients (an inf at step 4), pairwise per parameter."""
    fused_params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in init]
    ref_params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in init]
    fused = getattr(fusedwarm, name)(fused_params, state_dtype=torch.float32, seed=1, **kw)
    ref = getattr(reference, name)(ref_params, **kw)
    for gs in _grads(init, 30, inf_at=4):
        for opt, params in ((fused, fused_params), (ref, ref_params)):
            for p, g in zip(params, gs):
                p.grad = g.to(p.dtype)
            opt.step()
    return [(fused.master_weight(p), ref.master_weight(q)) for p, q in zip(fused_params, ref_params)]


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_matches_reference(name, control):
    seed_all("update-control-ref", name, control)
    init = [torch.randn(s) for s in SHAPES]
    kw = {**HYPER[name], **NO_WARMUP, "update_control": control, "update_norm": BOUND[name]}
    for fused_master, ref_master in _masters_after_30_steps(name, init, kw):
        assert rel_err(fused_master, ref_master) < MASTER_RTOL[(torch.bfloat16, 16, torch.float32)]


@pytest.mark.parametrize("control", CONTROLS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bound_holds_and_is_reached(name, control):
    seed_all("update-control-bound", name, control)
    init = [torch.randn(s) for s in SHAPES]
    init[0][2].zero_()  # a zero row has no scale: its update is left unbounded
    params = [torch.nn.Parameter(t.clone()) for t in init]
    bound = BOUND[name]
    opt = getattr(fusedwarm, name)(params, seed=1, **HYPER[name], **NO_WARMUP, update_control=control,
                                   update_norm=bound)
    plain_params = [torch.nn.Parameter(t.clone()) for t in init]
    plain = getattr(fusedwarm, name)(plain_params, seed=1, **HYPER[name], **NO_WARMUP)
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        plain_before = [p.detach().clone() for p in plain_params]
        gs = [torch.randn(p.shape) for p in params]
        for ps, o in ((params, opt), (plain_params, plain)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
        for p, b, q, qb in zip(params, before, plain_params, plain_before):
            w, u = _rows(b, control), _rows(p.detach() - b, control)
            unbounded = _rows(q.detach() - qb, control).norm(dim=1)
            limit = bound * w.norm(dim=1)
            slack = BOUND_RTOL * limit + _rounding(w)
            zero = w.norm(dim=1) == 0
            assert torch.all((u.norm(dim=1) <= limit + slack)[~zero])
            active = (unbounded > limit + slack) & ~zero
            assert active.any()
            assert torch.all(((u.norm(dim=1) - limit).abs() <= slack)[active])
    # The zero row was never bounded: it moved as far as the plain optimizer moved it on step 1.
    assert params[0].detach()[2].norm() > bound


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_loose_bound_is_the_plain_step(name):
    seed_all("update-control-loose", name)
    init = [torch.randn(s) for s in SHAPES]
    runs = []
    for extra in ({}, dict(update_control="row", update_norm=1e3)):
        params = [torch.nn.Parameter(t.to(torch.bfloat16)) for t in init]
        opt = getattr(fusedwarm, name)(params, seed=3, **HYPER[name], **extra)
        torch.manual_seed(4)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape).to(torch.bfloat16)
            opt.step()
        runs.append([opt.master_weight(p) for p in params])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("control", ("row", "rotational"))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_backward_step_is_bit_identical(name, control):
    seed_all("update-control-backward", name)
    x = torch.randn(12, 8)
    runs = []
    for backward_step in (False, True):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
        bound = BOUND[name] if control == "row" else None
        opt = getattr(fusedwarm, name)(model.parameters(), seed=2, backward_step=backward_step, extra_bits=0,
                                       **ROT_HYPER[name], update_control=control, update_norm=bound)
        for _ in range(6):
            model(x.to(torch.bfloat16)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append([opt.master_weight(p) for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rotational_matches_reference(name):
    seed_all("rotational-ref", name)
    init = [torch.randn(s) for s in SHAPES]
    kw = {**ROT_HYPER[name], "warmup": "linear", "warmup_steps": 10, "update_control": "rotational"}
    for fused_master, ref_master in _masters_after_30_steps(name, init, kw):
        assert rel_err(fused_master, ref_master) < ROT_RTOL


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rotational_keeps_norms_and_sets_the_angle(name):
    seed_all("rotational-angle", name)
    init = [torch.randn(s) for s in SHAPES]
    kw = {**ROT_HYPER[name], **NO_WARMUP}
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = getattr(fusedwarm, name)(params, seed=1, update_control="rotational", **kw)
    plain_params = [torch.nn.Parameter(t.clone()) for t in init]
    plain = getattr(fusedwarm, name)(plain_params, seed=1, **kw)
    eta = reference.equilibrium_update(opt.param_groups[0], kw["lr"])
    for _ in range(3):
        before = [p.detach().clone() for p in params]
        gs = [torch.randn(p.shape) for p in params]
        for ps, o in ((params, opt), (plain_params, plain)):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            o.step()
        for p, b in zip(params, before):
            if p.dim() < 2:
                continue
            w, new = _rows(b, "row"), _rows(p.detach(), "row")
            norm = w.norm(dim=1)
            slack = BOUND_RTOL * norm + _rounding(w)
            assert torch.all((new.norm(dim=1) - norm).abs() <= slack)
            radial = (new * w).sum(dim=1, keepdim=True) / norm[:, None] ** 2
            tangential = (new - radial * w).norm(dim=1)
            assert torch.all((tangential / radial[:, 0] - eta * norm).abs() <= slack)
    # The 1-D tensor took exactly the plain optimizer's steps, weight decay included.
    assert torch.equal(params[1], plain_params[1])
    assert math.isfinite(eta) and eta > 0


@pytest.mark.parametrize("kw,match", [
    (dict(update_control="neuron", update_norm=0.1), "Invalid update_control"),
    (dict(update_control="rotational", update_norm=0.1), "needs update_control='tensor' or 'row'"),
    (dict(update_control="rotational", weight_decay=0.0), "needs weight_decay > 0"),
    (dict(update_norm=0.1), "needs update_control"),
    (dict(update_control="row"), "Invalid update_norm"),
    (dict(update_control="row", update_norm=0.0), "Invalid update_norm"),
    (dict(update_control="tensor", update_norm=-1.0), "Invalid update_norm"),
    (dict(update_control="tensor", update_norm=float("inf")), "Invalid update_norm"),
    (dict(update_control="tensor", update_norm=True), "Invalid update_norm"),
])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_options_raise(name, kw, match):
    with pytest.raises(ValueError, match=match):
        getattr(fusedwarm, name)([torch.nn.Parameter(torch.randn(3))], **kw)
    opt = getattr(fusedwarm, name)([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], **kw})


def _sgd_args(n: int = 12):
    return ([torch.randn(n)], [torch.randn(n)], [], [], [torch.tensor(1)], [0], None, 1e-2, 16, 7, 0.0, 0.0, 0.0,
            False, False)


@pytest.mark.parametrize("kw,match", [
    (dict(update_norm=0.1), "update_rows goes with"),
    (dict(update_rows=[1]), "update_rows goes with"),
    (dict(rotational=True), "update_rows goes with"),
    (dict(update_norm=0.1, update_rows=[1], rotational=True), "choose one"),
    (dict(rotational=True, update_rows=[1]), "needs weight_decay > 0"),
    (dict(update_norm=0.0, update_rows=[1]), "update_norm must be a finite number > 0"),
    (dict(update_norm=0.1, update_rows=[1, 1]), "one entry per parameter"),
    (dict(update_norm=0.1, update_rows=[5]), r"update_rows\[0\] must be >= 1 and divide"),
    (dict(update_norm=0.1, update_rows=[0]), r"update_rows\[0\] must be >= 1 and divide"),
])
def test_op_rejects_bad_control_arguments(kw, match):
    params = _sgd_args()[0]
    before = params[0].clone()
    with pytest.raises(RuntimeError, match=match):
        _ops.load().sgd_(params, *_sgd_args()[1:], **kw)
    assert torch.equal(params[0], before)


def test_step_op_with_control_passes_opcheck():
    seed_all("opcheck-control")
    n = 2 * 1500
    args = ([torch.randn(2, 1500).bfloat16()], [torch.randn(2, 1500).bfloat16()],
            [torch.randint(-100, 100, (2, 1500), dtype=torch.int16)], [torch.randn(n).reshape(2, 1500) * 0.1],
            [torch.rand(n).reshape(2, 1500) * 0.1], [torch.tensor(3)], [0], None, 1e-3, 16, 7, 0.9, 0.99, 1e-8, 0.1,
            False)
    result = torch.library.opcheck(_ops.load().adamw_.default, args, dict(update_norm=1e-4, update_rows=[2]))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("control", (*CONTROLS, "rotational"))
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_cuda_matches_cpu_bit_for_bit(name, control, gpu):
    seed_all("update-control-cuda", name, control)
    init = [torch.randn(s) for s in SHAPES]
    grads = _grads(init, 12, inf_at=3)
    masters = []
    for device, context in gpu.sides(sms=2, blocks_per_sm=2, order="shuffle"):
        params = [torch.nn.Parameter(t.to(device, torch.bfloat16, copy=True)) for t in init]
        opt = getattr(fusedwarm, name)(params, seed=9, extra_bits=0, **ROT_HYPER[name], update_control=control,
                                       update_norm=None if control == "rotational" else BOUND[name])
        with context:
            for gs in grads:
                for p, g in zip(params, gs):
                    p.grad = g.to(device, torch.bfloat16)
                opt.step()
        masters.append([opt.master_weight(p).cpu() for p in params])
    for a, b in zip(*masters):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
