"""Checkpoints users already have: torch.optim state dicts, float32 masters, other storage options.

A fusedwarm optimizer must load what ``torch.optim.AdamW`` / ``torch.optim.SGD`` saved and continue
as the torch optimizer would (``warmup="none"`` gives torch's update rule); start bfloat16 weights
from a float32 run without losing its master (``load_master_weights``); and resume with other
storage options (extra bits, state dtype) than it saved with. Continuations are compared with the
float32 run they continue, at the 16-extra-bit tolerance of ``helpers.MASTER_RTOL``; a failed load
changes nothing (``test_errors.snapshot``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fusedwarm
from helpers import MASTER_RTOL, rel_err, round_nearest_away
from test_conventions import assert_bits_equal
from test_errors import assert_unchanged, snapshot

SHAPES = ((7, 5), (5,), (3, 4))
EXACT = MASTER_RTOL[(torch.bfloat16, 16, torch.float32)]  # float32 master, float32 states
TORCH_KW = {
    "AdamW": dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1),
    "SGD": dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True),
}


def fresh(gen: torch.Generator, dtype=torch.float32) -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def run(opt: torch.optim.Optimizer, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.to(p.dtype)
        opt.step()


def grad_stream(gen: torch.Generator, steps: int, dtype=torch.float32) -> list[list[torch.Tensor]]:
    """Fresh random gradients, rounded to ``dtype`` so a half-precision run and a float32 run see the same."""
    return [[torch.randn(s, generator=gen).to(dtype).float() for s in SHAPES] for _ in range(steps)]


def torch_run(name: str, steps: int, gen: torch.Generator) -> tuple[torch.optim.Optimizer, list[nn.Parameter]]:
    params = fresh(gen)
    opt = getattr(torch.optim, name)(params, **TORCH_KW[name])
    run(opt, params, grad_stream(gen, steps))
    return opt, params


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_float32_model_continues_from_a_torch_state_dict(name):
    """The loaded moments (SGD's momentum buffer included) are used: fusedwarm continues as torch does."""
    gen = torch.Generator().manual_seed(11)
    torch_opt, torch_params = torch_run(name, 4, gen)
    params = [nn.Parameter(p.detach().clone()) for p in torch_params]
    opt = getattr(fusedwarm, name)(params, **TORCH_KW[name], warmup="none", seed=1)
    opt.load_state_dict(torch_opt.state_dict())
    more = grad_stream(gen, 6)
    run(torch_opt, torch_params, more)
    run(opt, params, more)
    for p, q in zip(params, torch_params):
        assert rel_err(p, q) <= MASTER_RTOL[(torch.float32, 16, torch.float32)]


def test_sgd_momentum_buffer_from_torch_is_not_dropped():
    """The same continuation without the loaded buffer is far off: the test above can fail."""
    gen = torch.Generator().manual_seed(12)
    torch_opt, torch_params = torch_run("SGD", 4, gen)
    params = [nn.Parameter(p.detach().clone()) for p in torch_params]
    opt = fusedwarm.SGD(params, **TORCH_KW["SGD"], seed=1)  # no load: a fresh buffer
    more = grad_stream(gen, 3)
    run(torch_opt, torch_params, more)
    run(opt, params, more)
    assert max(rel_err(p, q) for p, q in zip(params, torch_params)) > 100 * EXACT


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_model_loads_a_torch_adamw_state_dict(state_dtype):
    """torch.optim.AdamW on bfloat16 weights keeps bfloat16 moments; the master starts as the weight."""
    gen = torch.Generator().manual_seed(13)
    params = fresh(gen, torch.bfloat16)
    torch_opt = torch.optim.AdamW(params, **TORCH_KW["AdamW"])
    run(torch_opt, params, grad_stream(gen, 3, torch.bfloat16))
    ours = [nn.Parameter(p.detach().clone()) for p in params]
    opt = fusedwarm.AdamW(ours, **TORCH_KW["AdamW"], warmup="none", state_dtype=state_dtype, seed=2)
    opt.load_state_dict(torch_opt.state_dict())
    for p, q in zip(ours, params):
        state, saved = opt.state[p], torch_opt.state[q]
        assert state["step"].dtype == torch.int64 and int(state["step"]) == 3
        assert state["exp_avg"].dtype == state_dtype and torch.equal(state["exp_avg"], saved["exp_avg"].to(state_dtype))
        assert torch.equal(opt.master_weight(p), q.detach().float())
    # Continue against torch.optim.AdamW on float32 copies of the same weights and moments.
    ref_params = [nn.Parameter(q.detach().float()) for q in params]
    ref = torch.optim.AdamW(ref_params, **TORCH_KW["AdamW"])
    sd = torch_opt.state_dict()
    sd["state"] = {k: {n: v.float() for n, v in s.items()} for k, s in sd["state"].items()}
    ref.load_state_dict(sd)
    more = grad_stream(gen, 5, torch.bfloat16)
    run(ref, ref_params, more)
    run(opt, ours, more)
    tol = EXACT if state_dtype == torch.float32 else MASTER_RTOL[(torch.bfloat16, 16, torch.bfloat16)]
    for p, q in zip(ours, ref_params):
        assert rel_err(opt.master_weight(p), q) <= tol


def test_plain_number_step_in_a_loaded_state():
    gen = torch.Generator().manual_seed(14)
    params = fresh(gen, torch.bfloat16)
    opt = fusedwarm.AdamW(params, seed=3)
    run(opt, params, grad_stream(gen, 2, torch.bfloat16))
    sd = opt.state_dict()
    as_numbers = {**sd, "state": {k: {**s, "step": int(s["step"])} for k, s in sd["state"].items()}}
    copies = []
    for loaded in (sd, as_numbers):
        ps = [nn.Parameter(p.detach().clone()) for p in params]
        o = fusedwarm.AdamW(ps, seed=9)
        o.load_state_dict(loaded)
        run(o, ps, [[g.clone() for g in step] for step in grad_stream(torch.Generator().manual_seed(1), 2)])
        copies.append((o, ps))
    for p, q in zip(copies[0][1], copies[1][1]):
        assert_bits_equal(p, q, "weight")
        assert_bits_equal(copies[0][0].state[p]["extra"], copies[1][0].state[q]["extra"], "extra")


@pytest.mark.parametrize("option", ["amsgrad", "capturable", "differentiable"])
def test_unsupported_torch_options_raise_at_construction(option):
    with pytest.raises(ValueError, match=rf"{option}=True, which fusedwarm does not support"):
        fusedwarm.AdamW(fresh(torch.Generator().manual_seed(0)), **{option: True})


@pytest.mark.parametrize("option", ["foreach", "fused"])
def test_torch_implementation_choices(option):
    params = fresh(torch.Generator().manual_seed(0))
    for value in (None, True):
        fusedwarm.AdamW(params, **{option: value})
        fusedwarm.SGD(params, **{option: value})
    with pytest.raises(ValueError, match=rf"{option}=False asks for torch's non-fused implementation"):
        fusedwarm.AdamW(params, **{option: False})


@pytest.mark.parametrize("saved, match", [
    (dict(amsgrad=True), "amsgrad=True, which fusedwarm does not support"),
    (dict(differentiable=True), "differentiable=True, which fusedwarm does not support"),
    (dict(decoupled_weight_decay=False), "decoupled_weight_decay=False with weight_decay=0.1"),
])
def test_unsupported_options_in_a_loaded_state_dict_raise_and_change_nothing(saved, match):
    gen = torch.Generator().manual_seed(15)
    torch_opt, torch_params = torch_run("AdamW", 2, gen)
    sd = torch_opt.state_dict()
    sd["param_groups"] = [{**g, **saved} for g in sd["param_groups"]]
    params = fresh(gen, torch.bfloat16)
    opt = fusedwarm.AdamW(params, seed=4)
    run(opt, params, grad_stream(gen, 1, torch.bfloat16))
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(before, snapshot(opt))


def test_torch_only_group_keys_are_not_kept():
    gen = torch.Generator().manual_seed(16)
    torch_opt, torch_params = torch_run("AdamW", 1, gen)
    opt = fusedwarm.AdamW([nn.Parameter(p.detach().clone()) for p in torch_params])
    opt.load_state_dict(torch_opt.state_dict())
    assert not set(opt.param_groups[0]) & {"amsgrad", "foreach", "fused", "capturable", "differentiable",
                                           "decoupled_weight_decay"}


def trained_x16(gen: torch.Generator):
    params = fresh(gen, torch.bfloat16)
    opt = fusedwarm.AdamW(params, extra_bits=16, state_dtype=torch.float32, seed=5)
    run(opt, params, grad_stream(gen, 4, torch.bfloat16))
    return opt, params


@pytest.mark.parametrize("bits", [8, 0])
def test_fewer_extra_bits_on_resume(bits):
    """Options given to the constructor win: the master is rounded to nearest into fewer bits."""
    gen = torch.Generator().manual_seed(17)
    opt, params = trained_x16(gen)
    masters = [opt.master_weight(p) for p in params]
    ours = [nn.Parameter(p.detach().clone()) for p in params]
    small = fusedwarm.AdamW(ours, extra_bits=bits, state_dtype=torch.bfloat16, seed=5)
    small.load_state_dict(opt.state_dict())
    for p, q, master in zip(ours, params, masters):
        state, saved = small.state[p], opt.state[q]
        assert ("extra" in state) == (bits > 0)
        if bits:
            assert state["extra"].dtype == torch.int8
        assert torch.equal(state["exp_avg_sq"], saved["exp_avg_sq"].bfloat16())
        # 15 mantissa bits (8 extra) or 7 (none), rounded to nearest: within half an ulp of the master.
        ulp = 2.0 ** -(7 + bits)
        assert ((small.master_weight(p) - master).abs() <= 0.5 * ulp * master.abs()).all()
        # The weight is the master's round to nearest, as in every mode.
        assert torch.equal(p.detach(), round_nearest_away(small.master_weight(p), torch.bfloat16))
    run(small, ours, grad_stream(gen, 2, torch.bfloat16))


def test_back_to_16_extra_bits_starts_the_master_at_the_weight():
    gen = torch.Generator().manual_seed(18)
    params = fresh(gen, torch.bfloat16)
    opt = fusedwarm.AdamW(params, extra_bits=0, seed=6)
    run(opt, params, grad_stream(gen, 2, torch.bfloat16))
    ours = [nn.Parameter(p.detach().clone()) for p in params]
    wide = fusedwarm.AdamW(ours, extra_bits=16, seed=6)
    wide.load_state_dict(opt.state_dict())
    for p in ours:
        assert wide.state[p]["extra"].dtype == torch.int16
        assert torch.equal(wide.master_weight(p), p.detach().float())


def test_unset_storage_options_follow_the_checkpoint():
    gen = torch.Generator().manual_seed(19)
    params = fresh(gen, torch.bfloat16)
    opt = fusedwarm.AdamW(params, extra_bits=8, state_dtype=torch.float32, seed=7)
    run(opt, params, grad_stream(gen, 2, torch.bfloat16))
    ours = [nn.Parameter(p.detach().clone()) for p in params]
    other = fusedwarm.AdamW(ours)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["extra_bits"] == 8 and other.param_groups[0]["state_dtype"] == torch.float32
    more = grad_stream(gen, 2, torch.bfloat16)
    run(opt, params, more)
    run(other, ours, more)
    for p, q in zip(params, ours):
        assert_bits_equal(p, q, "weight")
        assert_bits_equal(opt.state[p]["extra"], other.state[q]["extra"], "extra")


@pytest.mark.parametrize("named", [False, True], ids=["list", "named"])
def test_load_master_weights_continues_the_float32_run(named):
    """bfloat16 weights + 16 extra bits + float32 states from a float32 torch AdamW run: as if it went on."""
    gen = torch.Generator().manual_seed(20)
    torch_opt, torch_params = torch_run("AdamW", 5, gen)
    model = nn.ParameterDict({f"p{i}": nn.Parameter(p.detach().bfloat16()) for i, p in enumerate(torch_params)})
    ours = list(model.values())
    opt = fusedwarm.AdamW(model.named_parameters() if named else ours, **TORCH_KW["AdamW"], warmup="none",
                          state_dtype=torch.float32, seed=8)
    opt.load_state_dict(torch_opt.state_dict())
    fp32 = {f"p{i}": p.detach() for i, p in enumerate(torch_params)}
    opt.load_master_weights(fp32 if named else list(fp32.values()))
    for p, q in zip(ours, torch_params):
        assert_bits_equal(opt.master_weight(p), q.detach(), "master")
    more = grad_stream(gen, 20, torch.bfloat16)
    run(torch_opt, torch_params, more)
    run(opt, ours, more)
    for p, q in zip(ours, torch_params):
        assert rel_err(opt.master_weight(p), q) <= EXACT


@pytest.mark.parametrize("bad, match", [
    (lambda ps: [p.float() for p in ps[:-1]], "got 2 tensors for 3 parameters"),
    (lambda ps: [p.float() for p in ps[:-1]] + [torch.zeros(2)], r"expected a floating-point tensor of shape \(3, 4\)"),
    (lambda ps: {"p0": ps[0].float()}, "a mapping needs parameter names"),
])
def test_load_master_weights_errors_change_nothing(bad, match):
    gen = torch.Generator().manual_seed(21)
    params = fresh(gen, torch.bfloat16)
    opt = fusedwarm.AdamW(params, seed=9)
    run(opt, params, grad_stream(gen, 1, torch.bfloat16))
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_master_weights(bad([p.detach() for p in params]))
    assert_unchanged(before, snapshot(opt))


def test_state_dict_without_scalars_warns_when_they_would_not_resume():
    # A torch.optim state dict has no loss scale or lagged clipping coefficient to resume: loading
    # it into an optimizer that keeps them says so. (fusedwarm's own state dicts carry them in the
    # first param group, where torch.distributed.checkpoint keeps them: tests/test_fsdp.py.)
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = fusedwarm.AdamW([p], loss_scale="dynamic")
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["fusedwarm"]["loss_scale"] == opt.loss_scale
    del sd["param_groups"][0]["fusedwarm"]
    with pytest.warns(UserWarning, match=r"no 'fusedwarm' scalars .* loss scale and the lagged clipping"):
        fusedwarm.AdamW([p], loss_scale="dynamic").load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusedwarm.AdamW([p]).load_state_dict(sd)  # nothing to resume: no warning
