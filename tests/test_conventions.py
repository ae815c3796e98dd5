"""torch.optim conventions, each tested for the fused AdamW, SGD (with momentum) and Lion.

Bit-for-bit comparisons go through integer views of the tensors (``bits``), so ``-0.0`` vs
``0.0`` and NaN payloads count as differences. "Deterministic mode" means ``extra_bits=16`` with
float32 states: no stochastic rounding happens, so results do not depend on the random streams;
stochastic cases use ``extra_bits=0`` and bfloat16 states, where the seed and stream position
decide every rounding.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fusedwarm
from helpers import HYPER, OPTIMIZERS

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
EXTRA_DTYPE = {16: torch.int16, 8: torch.int8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of ``t`` as a contiguous integer tensor (a copy)."""
    t = t.detach().contiguous()
    return t.view(_INT_VIEW[t.element_size()]).clone()


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (bits(a) != bits(b)).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ bitwise"


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """Bit patterns of every parameter and state tensor of ``opt``, keyed by (group, index, name)."""
    snap = {}
    for gi, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            snap[(gi, i, "param")] = p.detach().clone()
            for name, value in opt.state.get(p, {}).items():
                snap[(gi, i, name)] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return snap


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), f"state entries differ: {sorted(set(a) ^ set(b))}"
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert_bits_equal(a[key], b[key], f"{key}")
        else:
            assert a[key] == b[key], f"{key}: {a[key]!r} != {b[key]!r}"


def snapshots_differ(a: dict, b: dict) -> bool:
    try:
        assert_same_snapshot(a, b)
    except AssertionError:
        return True
    return False


def new_opt(name: str, params, **kw) -> fusedwarm.FusedOptimizer:
    # No warmup: these tests need the first steps to move bfloat16 weights by more than an ulp.
    return getattr(fusedwarm, name)(params, **{**HYPER[name], "warmup": "none", **kw})


def grad_stream(params, steps: int, seed: int) -> list[list[torch.Tensor]]:
    """``steps`` lists of fresh random float32 gradients, one per parameter."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def run(opt: torch.optim.Optimizer, params, grads_per_step) -> None:
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.to(p.dtype)
        opt.step()


def rand_params(specs, seed: int) -> list[nn.Parameter]:
    """Fresh random parameters from (dtype, shape) specs."""
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for dtype, shape in specs]


def clone_params(params) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


opt_names = pytest.mark.parametrize("name", OPTIMIZERS)


# ---- param groups ---------------------------------------------------------------------------------


@opt_names
def test_param_groups_use_their_own_hyperparameters(name):
    params = rand_params([(torch.bfloat16, (33,)), (torch.bfloat16, (4, 5)), (torch.bfloat16, (17,))], seed=1)
    base = HYPER[name]
    other = {"lr": base["lr"] * 7, "weight_decay": 0.25}
    det = dict(extra_bits=16, state_dtype=torch.float32, seed=3)
    opt = new_opt(name, [{"params": params[:2]}, {"params": params[2:], **other}], **det)
    assert opt.param_groups[1]["lr"] == other["lr"] and opt.param_groups[0]["lr"] == base["lr"]

    # Each group must behave exactly like a separate optimizer built with that group's options.
    alone0, alone1, wrong1 = clone_params(params[:2]), clone_params(params[2:]), clone_params(params[2:])
    opt0 = new_opt(name, alone0, **det)
    opt1 = new_opt(name, alone1, **det, **other)
    wrong = new_opt(name, wrong1, **det)  # group 1's params with group 0's options
    grads = grad_stream(params, 4, seed=2)
    run(opt, params, grads)
    run(opt0, alone0, [g[:2] for g in grads])
    run(opt1, alone1, [g[2:] for g in grads])
    run(wrong, wrong1, [g[2:] for g in grads])
    for p, q, o in zip(params, alone0 + alone1, [opt0, opt0, opt1]):
        assert_bits_equal(p, q, "param")
        assert_bits_equal(opt.master_weight(p), o.master_weight(q), "master")
    assert not torch.equal(opt.master_weight(params[2]), wrong.master_weight(wrong1[0]))


@opt_names
def test_add_param_group_takes_defaults_and_overrides(name):
    a, b, c = rand_params([(torch.bfloat16, (9,)), (torch.bfloat16, (6,)), (torch.bfloat16, (7,))], seed=4)
    opt = new_opt(name, [a], extra_bits=16, state_dtype=torch.float32, seed=11)
    opt.add_param_group({"params": [b]})
    opt.add_param_group({"params": [c], "lr": 0.5, "extra_bits": 8})
    assert len(opt.param_groups) == 3
    for key, value in opt.defaults.items():
        assert opt.param_groups[1][key] == value, key
        if key not in ("lr", "extra_bits"):
            assert opt.param_groups[2][key] == value, key
    assert opt.param_groups[1]["seed"] == 11
    assert opt.param_groups[2]["lr"] == 0.5 and opt.param_groups[2]["extra_bits"] == 8
    run(opt, [a, b, c], grad_stream([a, b, c], 2, seed=5))
    assert opt.state[b]["extra"].dtype == torch.int16
    assert opt.state[c]["extra"].dtype == torch.int8
    assert all(opt.state[p][n].dtype == torch.float32 for p in (a, b, c) for n in opt.state[p] if "exp" in n or
               "momentum" in n)


@opt_names
def test_add_param_group_gives_fresh_random_streams(name):
    init = torch.randn(512, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    sr = dict(extra_bits=0, state_dtype=torch.bfloat16, seed=21)

    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt = new_opt(name, [a], **sr)
    opt.add_param_group({"params": [b]})
    grads = grad_stream([a], 3, seed=7)
    run(opt, [a, b], [[g[0], g[0]] for g in grads])  # the same gradient for both
    # Same start, same gradients, same options: only the random stream differs.
    assert not torch.equal(bits(a), bits(b)), "the added parameter reuses the first parameter's random stream"
    state_name = "momentum_buffer" if name == "SGD" else "exp_avg"
    assert not torch.equal(bits(opt.state[a][state_name]), bits(opt.state[b][state_name]))

    # add_param_group must be equivalent to passing both groups to the constructor.
    a2, b2 = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt2 = new_opt(name, [{"params": [a2]}, {"params": [b2]}], **sr)
    run(opt2, [a2, b2], [[g[0], g[0]] for g in grads])
    assert_same_snapshot(snapshot(opt), snapshot(opt2))


def test_add_param_group_rejects_duplicate_parameter():
    (a,) = rand_params([(torch.bfloat16, (5,))], seed=8)
    opt = fusedwarm.AdamW([a], seed=0)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [a]})
    assert len(opt.param_groups) == 1


# ---- mixed dtypes ---------------------------------------------------------------------------------


MIXED_SPECS = [
    [(torch.bfloat16, (13,)), (torch.float16, (3, 7)), (torch.float32, (11,))],
    [(torch.float32, (2, 5)), (torch.bfloat16, (19,)), (torch.float16, (8,))],
]


@opt_names
def test_mixed_dtypes_match_one_optimizer_per_parameter(name):
    """Grouping by dtype inside a step must not change what any parameter computes."""
    groups = [rand_params(specs, seed=10 + k) for k, specs in enumerate(MIXED_SPECS)]
    params = groups[0] + groups[1]
    other = {"lr": HYPER[name]["lr"] * 3}
    det = dict(extra_bits=16, state_dtype=torch.float32, seed=0)
    opt = new_opt(name, [{"params": groups[0]}, {"params": groups[1], **other}], **det)
    singles = clone_params(params)
    single_opts = [new_opt(name, [q], **det, **(other if i >= len(groups[0]) else {})) for i, q in enumerate(singles)]
    grads = grad_stream(params, 5, seed=12)
    run(opt, params, grads)
    for i, (q, o) in enumerate(zip(singles, single_opts)):
        run(o, [q], [[g[i]] for g in grads])
    for p, q, o in zip(params, singles, single_opts):
        assert_bits_equal(p, q, f"{p.dtype} param")
        assert_bits_equal(opt.master_weight(p), o.master_weight(q), f"{p.dtype} master")
        for key in opt.state[p]:
            assert_bits_equal(opt.state[p][key], o.state[q][key], f"{p.dtype} state {key}")


@opt_names
def test_mixed_dtypes_default_state_layout(name):
    params = rand_params(MIXED_SPECS[0] + MIXED_SPECS[1], seed=13)
    opt = new_opt(name, [{"params": params[:3]}, {"params": params[3:], "extra_bits": 8}], seed=1)
    before = [p.detach().clone() for p in params]
    run(opt, params, grad_stream(params, 3, seed=14))
    for gi, group in enumerate(opt.param_groups):
        for p in group["params"]:
            state = opt.state[p]
            if p.dtype == torch.float32:
                assert "extra" not in state
                expected_state = torch.float32
                assert_bits_equal(opt.master_weight(p), p.detach(), "fp32 master is the weight")
            else:
                assert state["extra"].dtype == EXTRA_DTYPE[group["extra_bits"]]
                assert state["extra"].shape == p.shape
                expected_state = torch.bfloat16
            for key, value in state.items():
                if key not in ("step", "extra"):
                    assert value.dtype == expected_state and value.shape == p.shape, (gi, key)
            assert state["step"].dtype == torch.int64 and int(state["step"]) == 3
    for p, b in zip(params, before):
        assert p.dtype == b.dtype
        assert not torch.equal(opt.master_weight(p), b.float()), f"{p.dtype} parameter was not updated"


# ---- state_dict / load_state_dict -------------------------------------------------------------------


def _layout(name: str, layout: str, seed: int):
    """(params, builder) for the round-trip tests: all-bf16, or two groups of mixed dtypes."""
    if layout == "bf16":
        params = rand_params([(torch.bfloat16, (37,)), (torch.bfloat16, (4, 6))], seed=seed)
        return params, lambda ps: [{"params": ps}]
    params = rand_params([(torch.bfloat16, (37,)), (torch.bfloat16, (4, 6)), (torch.float16, (9,)),
                          (torch.float32, (5,))], seed=seed)
    other = {"lr": HYPER[name]["lr"] * 3, "weight_decay": 0.0}
    return params, lambda ps: [{"params": ps[:2]}, {"params": ps[2:], **other}]


def _save(opt, via: str):
    if via == "deepcopy":
        # torch.optim's state_dict() holds references to the live state (which steps mutate in
        # place), so a checkpoint kept in memory is a deep copy, as with torch's own optimizers.
        return copy.deepcopy(opt.state_dict())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


def _restore(saved, via: str):
    if via == "deepcopy":
        return saved
    return torch.load(io.BytesIO(saved), weights_only=True)


@opt_names
@pytest.mark.parametrize("extra_bits", [16, 8, 0])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=["bf16_states", "fp32_states"])
@pytest.mark.parametrize("layout", ["bf16", "mixed"])
@pytest.mark.parametrize("via", ["deepcopy", "torch_save"])
def test_state_dict_round_trip_resumes_bit_identically(name, extra_bits, state_dtype, layout, via):
    params, groups = _layout(name, layout, seed=20)
    opt = new_opt(name, groups(params), extra_bits=extra_bits, state_dtype=state_dtype, seed=1234)
    grads = grad_stream(params, 7, seed=21)
    run(opt, params, grads[:3])

    saved = _save(opt, via)
    saved_params = [p.detach().clone() for p in params]
    run(opt, params, grads[3:])

    # A fresh optimizer with another seed: load_state_dict must restore seed, steps and states.
    resumed = clone_params(saved_params)
    opt2 = new_opt(name, groups(resumed), extra_bits=extra_bits, state_dtype=state_dtype, seed=99)
    opt2.load_state_dict(_restore(saved, via))
    loaded = snapshot(opt2)
    for gi, group in enumerate(opt2.param_groups):
        assert group["seed"] == 1234
        for i, p in enumerate(group["params"]):
            state = opt2.state[p]
            assert loaded[(gi, i, "step")].dtype == torch.int64 and int(loaded[(gi, i, "step")]) == 3
            if p.dtype == torch.float32:
                assert "extra" not in state
            elif extra_bits:
                assert state["extra"].dtype == EXTRA_DTYPE[extra_bits], "extra bits lost their integer dtype"
            for key, value in state.items():
                if key not in ("step", "extra"):
                    assert value.dtype == state_dtype, f"state {key} of a {p.dtype} parameter became {value.dtype}"
    run(opt2, resumed, grads[3:])
    assert_same_snapshot(snapshot(opt), snapshot(opt2))

    # Control: without the loaded state the continuation differs, so the comparison above can fail.
    fresh = clone_params(saved_params)
    opt3 = new_opt(name, groups(fresh), extra_bits=extra_bits, state_dtype=state_dtype, seed=1234)
    run(opt3, fresh, grads[3:])
    assert any(not torch.equal(bits(p), bits(q)) or not torch.equal(opt.master_weight(p), opt3.master_weight(q))
               for p, q in zip(params, fresh))


@opt_names
def test_load_state_dict_does_not_alias_source(name):
    params = rand_params([(torch.bfloat16, (21,)), (torch.float32, (6,))], seed=22)
    opt = new_opt(name, params, extra_bits=0, seed=5)
    grads = grad_stream(params, 4, seed=23)
    run(opt, params, grads[:2])

    copies = clone_params(params)
    opt2 = new_opt(name, copies, extra_bits=0, seed=5)
    sd = opt.state_dict()  # live references, not a copy
    opt2.load_state_dict(sd)
    source_ptrs = {t.untyped_storage().data_ptr() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor)}
    for s in opt2.state.values():
        for key, t in s.items():
            assert t.untyped_storage().data_ptr() not in source_ptrs, f"loaded state {key} aliases the source"
    after_load = snapshot(opt2)
    run(opt, params, grads[2:])  # mutates the source's state in place
    assert_same_snapshot(after_load, snapshot(opt2))


def test_load_state_dict_keeps_fp32_states_and_integer_extras():
    """torch.optim.Optimizer.load_state_dict would cast states to the bf16 parameter dtype."""
    params = rand_params([(torch.bfloat16, (300,))], seed=24)
    opt = fusedwarm.AdamW(params, state_dtype=torch.float32, extra_bits=16, seed=0)
    run(opt, params, grad_stream(params, 2, seed=25))
    sd = copy.deepcopy(opt.state_dict())
    opt2 = fusedwarm.AdamW(clone_params(params), state_dtype=torch.float32, seed=0)
    opt2.load_state_dict(sd)
    (state,) = opt2.state.values()
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert state["extra"].dtype == torch.int16
    assert_bits_equal(state["exp_avg_sq"], sd["state"][0]["exp_avg_sq"], "fp32 state")
    assert_bits_equal(state["extra"], sd["state"][0]["extra"], "extra bits")
    # The values really need more than bf16 precision, so a cast would have shown.
    assert not torch.equal(state["exp_avg_sq"], state["exp_avg_sq"].bfloat16().float())


@opt_names
def test_deepcopy_of_model_and_optimizer_continues_identically(name):
    torch.manual_seed(30)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    opt = new_opt(name, model.parameters(), extra_bits=0, seed=8)
    gen = torch.Generator().manual_seed(31)
    batches = [(torch.randn(5, 6, generator=gen).bfloat16(), torch.randn(5, 3, generator=gen).bfloat16())
               for _ in range(6)]

    def train(m, o, data):
        for x, y in data:
            o.zero_grad()
            ((m(x).float() - y.float()) ** 2).mean().backward()
            o.step()

    train(model, opt, batches[:3])
    model2, opt2 = copy.deepcopy((model, opt))
    assert all(q is r for q, r in zip(opt2.param_groups[0]["params"], model2.parameters()))
    train(model, opt, batches[3:])
    train(model2, opt2, batches[3:])
    assert_same_snapshot(snapshot(opt), snapshot(opt2))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert p is not q


# ---- repr, closure, hooks, zero_grad -----------------------------------------------------------------


@opt_names
def test_repr_lists_groups_and_options(name):
    a, b = rand_params([(torch.bfloat16, (3,)), (torch.bfloat16, (4,))], seed=32)
    opt = new_opt(name, [{"params": [a]}, {"params": [b], "lr": 0.125}], extra_bits=8, seed=77)
    text = repr(opt)
    assert text.startswith(f"{name} (")
    for needle in ("Parameter Group 0", "Parameter Group 1", "lr: 0.125", f"lr: {HYPER[name]['lr']}",
                   "extra_bits: 8", "seed: 77", "state_dtype: None", "weight_decay"):
        assert needle in text, needle


@opt_names
def test_closure_returns_loss_and_runs_with_grad(name):
    torch.manual_seed(33)
    model = nn.Linear(5, 2).to(torch.bfloat16)
    twin = copy.deepcopy(model)
    opt = new_opt(name, model.parameters(), seed=2)
    opt_twin = new_opt(name, twin.parameters(), seed=2)
    gen = torch.Generator().manual_seed(34)
    x, y = torch.randn(4, 5, generator=gen).bfloat16(), torch.randn(4, 2, generator=gen).bfloat16()
    seen = []

    def closure():
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = ((model(x).float() - y.float()) ** 2).mean()
        loss.backward()
        seen.append(loss)
        return loss

    with torch.no_grad():
        result = opt.step(closure)
    assert seen[0] is True, "the closure must run with gradients enabled"
    assert result is seen[1]
    assert opt.step() is None

    opt_twin.zero_grad()
    ((twin(x).float() - y.float()) ** 2).mean().backward()
    opt_twin.step()
    opt_twin.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_bits_equal(p, q, "closure step vs manual step")


@opt_names
def test_step_hooks_are_called(name):
    (p,) = rand_params([(torch.bfloat16, (10,))], seed=35)
    opt = new_opt(name, [p], seed=0)
    calls = []

    def pre(o, args, kwargs):
        calls.append(("pre", o, o.master_weight(p)))

    def post(o, args, kwargs):
        calls.append(("post", o, o.master_weight(p)))

    def global_pre(o, args, kwargs):
        calls.append(("global_pre", o, None))

    h_pre, h_post = opt.register_step_pre_hook(pre), opt.register_step_post_hook(post)
    h_global = register_optimizer_step_pre_hook(global_pre)
    try:
        before = opt.master_weight(p)
        p.grad = torch.randn(10, generator=torch.Generator().manual_seed(36)).bfloat16()
        opt.step()
    finally:
        h_global.remove()
    assert [c[0] for c in calls] == ["global_pre", "pre", "post"]
    assert all(c[1] is opt for c in calls)
    assert torch.equal(bits(calls[1][2]), bits(before)), "pre hook must run before the update"
    assert torch.equal(bits(calls[2][2]), bits(opt.master_weight(p))), "post hook must run after the update"
    assert not torch.equal(before, calls[2][2])
    h_pre.remove()
    h_post.remove()
    opt.step()
    assert len(calls) == 3


@opt_names
def test_zero_grad(name):
    params = rand_params([(torch.bfloat16, (4,)), (torch.float32, (3,))], seed=37)
    opt = new_opt(name, params, seed=0)
    for p in params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.zero_grad()
    assert all(p.grad is None for p in params), "zero_grad() sets grads to None by default"
    grads = []
    for p in params:
        p.grad = (torch.rand(p.shape) + 0.5).to(p.dtype)
        grads.append(p.grad)
    opt.zero_grad(set_to_none=False)
    for p, g in zip(params, grads):
        assert p.grad is g and p.grad.dtype == p.dtype
        assert torch.equal(p.grad, torch.zeros_like(p))


# ---- parameters that are skipped, empty or frozen ---------------------------------------------------------


@opt_names
def test_parameter_without_grad_is_untouched(name):
    a, b = rand_params([(torch.bfloat16, (16,)), (torch.bfloat16, (12,))], seed=38)
    opt = new_opt(name, [a, b], extra_bits=0, seed=4)
    b_before = b.detach().clone()
    grads = grad_stream([a], 2, seed=39)
    run(opt, [a], grads)
    assert_bits_equal(b, b_before, "parameter without grad")
    assert b.grad is None and len(opt.state.get(b, {})) == 0, "no state may be created for it"
    assert a in opt.state

    # A parameter that already has state and then gets no gradient keeps weight and state.
    b.grad = torch.randn(12, generator=torch.Generator().manual_seed(40)).bfloat16()
    opt.step()
    snap_b = {k: v for k, v in snapshot(opt).items() if k[1] == 1}
    b.grad = None
    a.grad = grads[0][0].bfloat16()
    opt.step()
    assert_same_snapshot(snap_b, {k: v for k, v in snapshot(opt).items() if k[1] == 1})


@opt_names
def test_frozen_parameters_are_untouched(name):
    torch.manual_seed(41)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).to(torch.bfloat16)
    for q in model[0].parameters():
        q.requires_grad_(False)
    frozen_before = [q.detach().clone() for q in model[0].parameters()]
    trained_before = [q.detach().clone() for q in model[1].parameters()]
    opt = new_opt(name, model.parameters(), seed=0)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(42)).bfloat16()
    for _ in range(2):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    for q, before in zip(model[0].parameters(), frozen_before):
        assert q.grad is None
        assert_bits_equal(q, before, "frozen parameter")
        assert len(opt.state.get(q, {})) == 0
    for q, before in zip(model[1].parameters(), trained_before):
        assert not torch.equal(q.detach(), before)


@opt_names
@pytest.mark.parametrize("extra_bits", [16, 0])
def test_zero_size_parameters(name, extra_bits):
    specs = [(torch.bfloat16, (0,)), (torch.bfloat16, (3, 0)), (torch.bfloat16, (7,)), (torch.float32, (0,)),
             (torch.float16, (3, 0))]
    params = rand_params(specs, seed=43)
    opt = new_opt(name, params, extra_bits=extra_bits, seed=0, lr=0.1)  # large enough to move a bf16 weight
    before = params[2].detach().float()
    run(opt, params, grad_stream(params, 2, seed=44))
    assert not torch.equal(opt.master_weight(params[2]), before)
    for p in params:
        state = opt.state[p]
        assert int(state["step"]) == 2
        for key, value in state.items():
            if key != "step":
                assert value.shape == p.shape, key
        assert opt.master_weight(p).shape == p.shape and opt.master_weight(p).dtype == torch.float32
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    opt2 = new_opt(name, clone_params(params), extra_bits=extra_bits, seed=1, lr=0.1)
    opt2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert_same_snapshot(snapshot(opt), snapshot(opt2))


# ---- seeds ---------------------------------------------------------------------------------------


@opt_names
def test_seed_decides_stochastic_rounding(name):
    init = rand_params([(torch.bfloat16, (256,)), (torch.bfloat16, (8, 8))], seed=45)
    grads = grad_stream(init, 3, seed=46)

    def result(seed):
        params = clone_params(init)
        opt = new_opt(name, params, extra_bits=0, state_dtype=torch.bfloat16, seed=seed)
        run(opt, params, grads)
        return snapshot(opt)

    assert_same_snapshot(result(5), result(5))
    assert snapshots_differ(result(5), result(6)), "different seeds gave identical stochastic rounding"
    assert snapshots_differ(result(5), result(5 + 2**32)), "the seed's high 32 bits are ignored"


@opt_names
def test_default_seed_follows_torch_manual_seed(name):
    init = rand_params([(torch.bfloat16, (128,))], seed=47)
    grads = grad_stream(init, 2, seed=48)

    def result(global_seed):
        torch.manual_seed(global_seed)
        params = clone_params(init)
        opt = new_opt(name, params, extra_bits=0)
        run(opt, params, grads)
        return opt.param_groups[0]["seed"], snapshot(opt)

    seed_a, snap_a = result(123)
    seed_b, snap_b = result(123)
    seed_c, snap_c = result(124)
    assert isinstance(seed_a, int) and 0 <= seed_a < 2**63
    assert seed_a == seed_b and seed_a != seed_c
    assert_same_snapshot(snap_a, snap_b)
    assert snapshots_differ(snap_a, snap_c)


@opt_names
def test_default_seed_draws_nothing_from_torch_generator(name):
    """Swapping in a fusedwarm optimizer leaves later dropout masks and data order as they were."""
    params = clone_params(rand_params([(torch.bfloat16, (16,))], seed=50))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    first = new_opt(name, params, extra_bits=0).param_groups[0]["seed"]
    assert torch.equal(torch.rand(4), expected)
    # Made after other draws, an optimizer gets another stream.
    assert new_opt(name, params, extra_bits=0).param_groups[0]["seed"] != first


# ---- non-contiguous parameters -------------------------------------------------------------------------


@opt_names
@pytest.mark.parametrize("extra_bits", [16, 8, 0])
def test_non_contiguous_parameter_matches_contiguous_copy(name, extra_bits):
    gen = torch.Generator().manual_seed(49)
    p = nn.Parameter(torch.randn(8, 5, generator=gen).to(torch.bfloat16).t())
    assert not p.is_contiguous() and p.shape == (5, 8)
    other = nn.Parameter(torch.randn(6, generator=gen).to(torch.bfloat16))
    q = nn.Parameter(p.detach().contiguous())
    other_q = nn.Parameter(other.detach().clone())
    stride, ptr = p.stride(), p.data_ptr()
    opt = new_opt(name, [p, other], extra_bits=extra_bits, seed=9)
    opt_q = new_opt(name, [q, other_q], extra_bits=extra_bits, seed=9)
    before = p.detach().clone()
    for _ in range(3):
        g = torch.randn(8, 5, generator=gen).to(torch.bfloat16).t()  # a transposed (non-contiguous) gradient
        g_other = torch.randn(6, generator=gen).to(torch.bfloat16)
        p.grad, other.grad = g, g_other
        q.grad, other_q.grad = g.contiguous(), g_other.clone()
        opt.step()
        opt_q.step()
    assert p.stride() == stride and p.data_ptr() == ptr, "the parameter must be updated in place"
    assert not torch.equal(bits(p), bits(before))
    assert_bits_equal(p, q, "transposed parameter vs contiguous copy")
    assert_bits_equal(opt.master_weight(p), opt_q.master_weight(q), "master weight")
    assert_same_snapshot(snapshot(opt), snapshot(opt_q))


# ---- non-finite gradients ----------------------------------------------------------------------------------


NONFINITE_CASES = {
    "bf16-extra16": (torch.bfloat16, 16, None),
    "bf16-extra8-fp32states": (torch.bfloat16, 8, torch.float32),
    "bf16-extra0": (torch.bfloat16, 0, torch.bfloat16),
    "fp16-extra16": (torch.float16, 16, None),
    "fp32": (torch.float32, 16, None),
}


@opt_names
@pytest.mark.parametrize("case", list(NONFINITE_CASES))
def test_nonfinite_gradient_elements_are_skipped(name, case):
    dtype, extra_bits, state_dtype = NONFINITE_CASES[case]
    (p,) = rand_params([(dtype, (96,))], seed=50)
    opt = new_opt(name, [p], extra_bits=extra_bits, state_dtype=state_dtype, seed=3)
    run(opt, [p], grad_stream([p], 2, seed=51))  # so that states are non-zero

    gen = torch.Generator().manual_seed(52)
    g = torch.randn(96, generator=gen)
    bad = torch.randperm(96, generator=gen)[:24]
    mask = torch.zeros(96, dtype=torch.bool)
    mask[bad] = True
    g_bad = g.clone()
    g_bad[bad] = torch.tensor([float("inf"), float("-inf"), float("nan")]).repeat(8)

    p_twin, opt_twin = copy.deepcopy((p, opt))  # gets finite values where p gets inf/nan
    before = snapshot(opt)
    p.grad = g_bad.to(dtype)
    p_twin.grad = g.to(dtype)
    opt.step()
    opt_twin.step()
    after, twin = snapshot(opt), snapshot(opt_twin)
    for key, value in after.items():
        if not isinstance(value, torch.Tensor) or key[2] == "step":
            continue
        assert_bits_equal(value[mask], before[key][mask], f"{key} at non-finite gradients")
        assert_bits_equal(value[~mask], twin[key][~mask], f"{key} at finite gradients")
    # The twin must have changed the masked elements (in weight, extra bits or a state), else the
    # "untouched" check above would be vacuous.
    changed = torch.zeros(96, dtype=torch.bool)
    for key, value in twin.items():
        if isinstance(value, torch.Tensor) and key[2] != "step":
            changed |= bits(value) != bits(before[key])
    assert changed[mask].float().mean() > 0.9
