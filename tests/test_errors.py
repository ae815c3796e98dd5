"""Bad input gets a clear error that names the parameter and the problem, and changes nothing.

Every test snapshots the bit pattern of every parameter, gradient and state tensor (and the
param-group options) before the bad call and compares after it. Bad gradients are put into
group 1 of a two-group optimizer whose group 0 is fine, so an update of group 0 before the
check would show up.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedwarm
from helpers import HYPER, OPTIMIZERS

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

opt_names = pytest.mark.parametrize("name", OPTIMIZERS)


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach().contiguous()
    return t.view(_INT_VIEW[t.element_size()]).clone()


def snapshot(opt: torch.optim.Optimizer) -> dict:
    """Everything a failed call must leave alone: groups, options, weights, grads, states."""
    snap = {"num_groups": len(opt.param_groups)}
    for gi, group in enumerate(opt.param_groups):
        snap[(gi, "options")] = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        snap[(gi, "num_params")] = len(group["params"])
        for i, p in enumerate(group["params"]):
            snap[(gi, i, "param")] = (p.dtype, tuple(p.shape), bits(p))
            g = p.grad
            snap[(gi, i, "grad")] = None if g is None else (g.layout, g.dtype, tuple(g.shape), bits(g))
            for key, value in opt.state.get(p, {}).items():
                snap[(gi, i, key)] = (value.dtype, tuple(value.shape), bits(value))
    return snap


def assert_unchanged(before: dict, after: dict) -> None:
    assert before.keys() == after.keys(), f"entries appeared or vanished: {sorted(map(str, set(before) ^ set(after)))}"
    for key, old in before.items():
        new = after[key]
        if isinstance(old, tuple) and any(isinstance(x, torch.Tensor) for x in old):
            assert old[:-1] == new[:-1], f"{key}: {old[:-1]} became {new[:-1]}"
            assert torch.equal(old[-1], new[-1]), f"{key} changed"
        else:
            assert old == new, f"{key}: {old!r} became {new!r}"


def two_group_opt(name: str, seed: int = 0):
    """A stepped two-group optimizer, all of whose parameters hold fresh gradients."""
    gen = torch.Generator().manual_seed(seed)
    group0 = [nn.Parameter(torch.randn(12, generator=gen).bfloat16()), nn.Parameter(torch.randn(5, generator=gen))]
    group1 = [nn.Parameter(torch.randn(3, 4, generator=gen).bfloat16()),
              nn.Parameter(torch.randn(7, generator=gen).half())]
    opt = getattr(fusedwarm, name)([{"params": group0}, {"params": group1, "lr": HYPER[name]["lr"] * 2}],
                                   seed=1, **HYPER[name])
    params = group0 + group1
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    return opt, params


LABEL = r"parameter \(group 1, index 0, shape \(3, 4\), dtype torch.bfloat16\)"


def force_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    """Sets a gradient whose dtype differs from the parameter's (torch refuses a plain assignment)."""
    p.grad_dtype = None  # torch >= 2.10: allow a gradient of any dtype
    p.grad = grad


# ---- bad gradients --------------------------------------------------------------------------------


@opt_names
def test_sparse_gradient(name):
    opt, params = two_group_opt(name)
    bad = params[2]
    bad.grad = torch.randn(3, 4).bfloat16().to_sparse()
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=LABEL + r" has a sparse gradient.*dense gradients only"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


@opt_names
def test_complex_gradient(name):
    opt, params = two_group_opt(name)
    force_grad(params[2], torch.randn(3, 4, dtype=torch.complex64))
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=LABEL + r" has a complex gradient \(torch.complex64\)"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


@opt_names
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16])
def test_gradient_dtype_mismatch(name, grad_dtype):
    opt, params = two_group_opt(name)
    force_grad(params[2], torch.randn(3, 4).to(grad_dtype))
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=LABEL + rf" has a gradient of dtype {grad_dtype}.*expected dtype "
                                                   r"torch.bfloat16"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


@opt_names
@pytest.mark.parametrize("shape", [(12,), (4, 3), (3, 5)])
def test_gradient_shape_mismatch(name, shape):
    opt, params = two_group_opt(name)
    # torch refuses `p.grad = g` with another shape; resizing the assigned gradient gets past it.
    params[2].grad.set_(torch.randn(shape).bfloat16())
    before = snapshot(opt)
    shape_text = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(RuntimeError, match=LABEL + rf" has a gradient of .*shape {shape_text}.*expected .*shape "
                                                   r"\(3, 4\)"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


@opt_names
def test_gradient_device_mismatch_is_refused_by_torch(name):
    """torch refuses a gradient on another device type at assignment (and `.data` swaps between
    device types), so a mismatched device cannot reach the optimizer on a CPU-only machine; the
    optimizer's own check (device compared in ``_check_grad``) is the backstop."""
    opt, params = two_group_opt(name)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="device"):
        params[2].grad = torch.randn(3, 4, device="meta").bfloat16()
    assert_unchanged(before, snapshot(opt))


@opt_names
def test_error_names_the_parameter_by_name(name):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).bfloat16()
    opt = getattr(fusedwarm, name)(model.named_parameters(), seed=0, **HYPER[name])
    model(torch.randn(5, 3).bfloat16()).float().sum().backward()
    model[1].bias.grad.set_(torch.randn(6).bfloat16())
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=r"parameter '1.bias' \(group 0, index 3, shape \(2,\).*shape \(6,\)"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


@opt_names
def test_extra_bits_changed_after_first_step(name):
    opt, _ = two_group_opt(name)
    opt.param_groups[1]["extra_bits"] = 8
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match=LABEL + r": extra_bits changed to 8 after the first step"):
        opt.step()
    assert_unchanged(before, snapshot(opt))


@opt_names
@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_state_tensor_replaced_after_steps(name, change):
    """step() remembers the states it has checked; a tensor replaced since is checked again."""
    opt, params = two_group_opt(name)
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    state = opt.state[params[2]]
    if change == "dtype":
        state[key] = state[key].half()
    else:
        state[key] = torch.randn(4, 3).to(state[key].dtype)
    before = snapshot(opt)
    expected = {"dtype": rf"state '{key}' is torch.float16, shape \(3, 4\)",
                "shape": rf"state '{key}' is torch.\w+, shape \(4, 3\)"}[change]
    with pytest.raises(RuntimeError, match=LABEL + ": " + expected):
        opt.step()
    assert_unchanged(before, snapshot(opt))


# ---- bad parameters ------------------------------------------------------------------------------


@opt_names
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_parameter_rejected_at_construction(name, dtype):
    good = nn.Parameter(torch.randn(4).bfloat16())
    bad = nn.Parameter(torch.randint(0, 2, (2, 3)).to(dtype), requires_grad=False)
    with pytest.raises(TypeError, match=rf"{name}: parameter \(group 0, index 1, shape \(2, 3\), dtype {dtype}\) "
                                        rf"has dtype {dtype}.*float32, bfloat16 and float16"):
        getattr(fusedwarm, name)([good, bad])


@opt_names
@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64])
def test_unsupported_float_parameter_rejected_at_construction(name, dtype):
    bad = nn.Parameter(torch.randn(5, dtype=dtype))
    with pytest.raises(TypeError, match=rf"parameter \(group 0, index 0, shape \(5,\), dtype {dtype}\) has dtype"):
        getattr(fusedwarm, name)([bad])


@opt_names
def test_sparse_parameter_rejected_at_construction(name):
    bad = torch.randn(4, 3).to_sparse().requires_grad_()
    with pytest.raises(TypeError, match=r"parameter \(group 0, index 0, .*has layout torch.sparse_coo"):
        getattr(fusedwarm, name)([bad])


@opt_names
def test_bad_parameter_in_add_param_group_changes_nothing(name):
    opt, _ = two_group_opt(name)
    before = snapshot(opt)
    bad = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"parameter \(group 2, index 1, shape \(3,\), dtype torch.complex64\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2).bfloat16()), bad]})
    assert_unchanged(before, snapshot(opt))
    opt.step()  # still usable


# ---- bad hyperparameters -------------------------------------------------------------------------------

COMMON_BAD = [
    ("lr", -1e-3, "Invalid lr: -0.001"),
    ("lr", float("nan"), "Invalid lr: nan"),
    ("extra_bits", 4, r"Invalid extra_bits: 4 \(expected one of \(0, 8, 16\)\)"),
    ("extra_bits", True, "Invalid extra_bits: True"),
    ("state_dtype", torch.float16, "Invalid state_dtype: torch.float16"),
    ("state_dtype", torch.float64, "Invalid state_dtype: torch.float64"),
    ("state_dtype", "bfloat16", "Invalid state_dtype: 'bfloat16'"),
    ("seed", -1, r"Invalid seed: -1 \(expected an int in \[0, 2\*\*63\)\)"),
    ("seed", 2**63, "Invalid seed: 9223372036854775808"),
    ("seed", 1.5, "Invalid seed: 1.5"),
    ("seed", True, "Invalid seed: True"),
    ("seed", "7", "Invalid seed: '7'"),
    ("weight_decay", -0.1, "Invalid weight_decay: -0.1"),
]
BAD = {
    "AdamW": COMMON_BAD + [
        ("betas", (1.0, 0.999), r"Invalid beta1: 1.0 \(expected 0 <= beta1 < 1\)"),
        ("betas", (-0.1, 0.999), "Invalid beta1: -0.1"),
        ("betas", (0.9, 1.0), "Invalid beta2: 1.0"),
        ("betas", (0.9, 1.5), "Invalid beta2: 1.5"),
        ("betas", (0.9,), "Invalid betas"),
        ("eps", -1e-8, "Invalid eps: -1e-08"),
    ],
    "SGD": COMMON_BAD + [
        ("momentum", -0.5, "Invalid momentum: -0.5"),
        ("nesterov", {"nesterov": True, "momentum": 0.0}, "Nesterov momentum requires a momentum > 0 and zero "
                                                        "dampening"),
        ("nesterov", {"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "Nesterov momentum requires"),
    ],
    "Lion": COMMON_BAD + [
        ("betas", (1.0, 0.99), "Invalid beta1: 1.0"),
        ("betas", (0.9, -0.01), "Invalid beta2: -0.01"),
    ],
}
BAD_CASES = [(name, key, value, match) for name in OPTIMIZERS for key, value, match in BAD[name]]


def _case_id(case):
    name, key, value, _ = case
    if isinstance(value, dict):
        return f"{name}-" + ",".join(f"{k}={v!r}" for k, v in value.items())
    return f"{name}-{key}={value!r}"


def _options(name, key, value):
    """HYPER[name] with the bad option(s) applied."""
    return {**HYPER[name], **(value if isinstance(value, dict) else {key: value})}


@pytest.mark.parametrize("case", BAD_CASES, ids=[_case_id(c) for c in BAD_CASES])
def test_bad_hyperparameter_at_construction(case):
    name, key, value, match = case
    p = nn.Parameter(torch.randn(4).bfloat16())
    with pytest.raises(ValueError, match=match):
        getattr(fusedwarm, name)([p], **_options(name, key, value))


@pytest.mark.parametrize("case", BAD_CASES, ids=[_case_id(c) for c in BAD_CASES])
def test_bad_hyperparameter_in_add_param_group(case):
    name, key, value, match = case
    opt, _ = two_group_opt(name)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match):
        bad = value if isinstance(value, dict) else {key: value}
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3).bfloat16())], **bad})
    assert_unchanged(before, snapshot(opt))


@opt_names
@pytest.mark.parametrize("extra_bits", [16.0, 0.0])
def test_float_extra_bits_rejected_at_construction(name, extra_bits):
    p = nn.Parameter(torch.randn(4).bfloat16())
    with pytest.raises(ValueError, match=f"Invalid extra_bits: {extra_bits}"):
        getattr(fusedwarm, name)([p], extra_bits=extra_bits)


@opt_names
@pytest.mark.parametrize("lr", [-1e-3, float("nan")], ids=["negative", "nan"])
def test_bad_tensor_lr_rejected(name, lr):
    p = nn.Parameter(torch.randn(4).bfloat16())
    with pytest.raises(ValueError, match="Invalid lr"):
        getattr(fusedwarm, name)([p], **{**HYPER[name], "lr": torch.tensor(lr)})


# ---- bad state dicts ---------------------------------------------------------------------------------


@opt_names
@pytest.mark.parametrize("state_key", ["extra", "state"])
def test_state_dict_with_mismatched_state_shape(name, state_key):
    opt, _ = two_group_opt(name)
    sd = copy.deepcopy(opt.state_dict())
    key = "extra" if state_key == "extra" else ("momentum_buffer" if name == "SGD" else "exp_avg")
    sd["state"][2][key] = torch.randn(4, 3).to(sd["state"][2][key].dtype)  # parameter 2 has shape (3, 4)
    target, _ = two_group_opt(name, seed=5)
    target.param_groups[1]["lr"] = 0.0123  # would be overwritten by a (partial) load
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"load_state_dict: state '{key}' of parameter 2 has shape \(4, 3\) but "
                                         r"the parameter has shape \(3, 4\)"):
        target.load_state_dict(sd)
    assert_unchanged(before, snapshot(target))


@opt_names
def test_state_dict_with_wrong_group_count(name):
    opt, _ = two_group_opt(name)
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"] = sd["param_groups"][:1]
    target, _ = two_group_opt(name, seed=5)
    before = snapshot(target)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        target.load_state_dict(sd)
    assert_unchanged(before, snapshot(target))


@opt_names
def test_state_dict_with_wrong_state_dtype(name):
    opt, _ = two_group_opt(name)
    sd = copy.deepcopy(opt.state_dict())
    key = "momentum_buffer" if name == "SGD" else "exp_avg"
    sd["state"][2][key] = sd["state"][2][key].half()
    target, _ = two_group_opt(name, seed=5)
    before = snapshot(target)
    try:
        target.load_state_dict(sd)
    except (ValueError, TypeError) as exc:  # a clear refusal at load time is fine
        assert "parameter 2" in str(exc) and key in str(exc)
        assert_unchanged(before, snapshot(target))
        return
    before = snapshot(target)
    with pytest.raises(RuntimeError, match="float16|Half"):
        target.step()
    assert_unchanged(before, snapshot(target))


def test_torch_optim_state_dict_is_refused_or_usable():
    gen = torch.Generator().manual_seed(9)
    p = nn.Parameter(torch.randn(6, generator=gen).bfloat16())
    torch_opt = torch.optim.AdamW([p])
    p.grad = torch.randn(6, generator=gen).bfloat16()
    torch_opt.step()
    q = nn.Parameter(p.detach().clone())
    opt = fusedwarm.AdamW([q], seed=0)
    before = snapshot(opt)
    try:
        opt.load_state_dict(torch_opt.state_dict())
    except (ValueError, TypeError):
        assert_unchanged(before, snapshot(opt))
        return
    q.grad = torch.randn(6, generator=gen).bfloat16()
    opt.step()
