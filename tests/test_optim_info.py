"""Generic torch.optim conformance checks, run over a list of optimizer configurations.

Shaped after PyTorch's own optimizer suite (``torch/testing/_internal/common_optimizers.py``:
``OptimizerInfo``, ``optim_inputs_func``; ``test/test_optim.py``): every optimizer has an
:class:`OptimizerInfo` whose ``optim_inputs_func`` yields constructor variants
(:class:`OptimizerInput`) with readable ids, and every check below is one test function
parametrized over all of them. A new option is checked by every check once a config that uses it
is added to an ``optim_inputs_func``.

The configs cover AdamW, SGD and Lion x weight dtype (bfloat16, float16, float32, mixed) x
``extra_bits`` (16, 8, 0) x ``state_dtype`` (bfloat16, float32), and, each on one storage mode,
the options: tensor lr, maximize, weight decay, SGD momentum/dampening/Nesterov, warmups, the
schedules of :mod:`fusedwarm.schedules`, update-size control, ``arithmetic="pam"``, gradient
clipping (global, tensor, lagged), constant and dynamic loss scales, and ``backward_step=True``.

Every parameter set holds a 2-D, a 1-D and a 3-D tensor, a 0-dim tensor and two zero-size
tensors, so each check also covers those. Gradients come from a real ``backward()`` of
``sum_i (p_i * g_i).sum()`` (times the loss scale), so ``p_i.grad`` is exactly ``g_i`` (scaled)
and ``backward_step=True`` updates inside the backward pass. Comparisons are bit for bit
(``test_conventions.bits``): two runs with the same seed, parameters and gradients must agree in
every weight, extra bit, state and the loss-scale/clipping scalars, whatever the rounding mode.

The checks: ``state_dict`` round trip through ``torch.save``/``torch.load(weights_only=True)``;
``copy.deepcopy`` and pickling; step hooks (per optimizer and global); state-dict and
load-state-dict hooks as torch runs them; closures; param groups with other options; parameters
without gradients; zero-size and 0-dim parameters; LR schedulers (StepLR, LambdaLR, OneCycleLR);
the direction of the update; ``zero_grad``; a light ``torch.compile`` check. Checks crossed with
further variants (schedulers, copy methods) run them all on the ``core`` configs (storage modes,
tensor lr, ``backward_step``) and only the first on the others by default; the rest are marked
``slow``.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fusedwarm
from fusedwarm import schedules
from helpers import HYPER
from test_conventions import assert_bits_equal, assert_same_snapshot, bits, snapshot, snapshots_differ

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
_SHORT = {F32: "f32", BF16: "bf16", F16: "f16"}

# Shapes of every parameter set: matrices (rows for update control), a vector, a 3-D tensor, a
# 0-dim tensor and two zero-size tensors.
SHAPES = ((6, 5), (11,), (2, 3, 4), (), (0,), (3, 0))
STEPS = 3  # steps before and after the event a check looks at (a save, a copy, ...)


# ---- the configurations -------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerInput:
    """One constructor variant: keyword arguments over the optimizer's base ones, and weight dtypes.

    Args:
        desc: the readable part of the test id.
        kwargs: constructor arguments that override :attr:`OptimizerInfo.base_kwargs`. Tensors in
            it (a tensor lr) are cloned for every optimizer made from it.
        dtypes: the weight dtypes, cycled over :data:`SHAPES`.
        marks: pytest marks of every test of this variant (e.g. ``pytest.mark.slow``).
        core: whether checks crossed with further variants (schedulers, copy methods) run all of
            them by default; for the other configs only the first runs, the rest are ``slow``.
    """

    desc: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtypes: tuple[torch.dtype, ...] = (BF16,)
    marks: tuple = ()
    core: bool = False


@dataclass(frozen=True)
class OptimizerInfo:
    """An optimizer under test: its class, base arguments and the variants to run.

    Args:
        optim_cls: the fusedwarm optimizer class.
        optim_inputs_func: yields the :class:`OptimizerInput` variants.
        base_kwargs: arguments every variant starts from.
    """

    optim_cls: type
    optim_inputs_func: Callable[[], Iterator[OptimizerInput]]
    base_kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.optim_cls.__name__


@dataclass(frozen=True)
class Config:
    """An :class:`OptimizerInfo` with one of its inputs: what every check is parametrized over."""

    info: OptimizerInfo
    input: OptimizerInput

    @property
    def id(self) -> str:
        return f"{self.info.name}-{self.input.desc}"

    @property
    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments (tensors cloned, so no two optimizers share one)."""
        kw = {**self.info.base_kwargs, **self.input.kwargs}
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in kw.items()}

    @property
    def backward_step(self) -> bool:
        return bool(self.kwargs.get("backward_step", False))

    @property
    def deterministic(self) -> bool:
        """No stochastic rounding anywhere: float32 masters (bfloat16 + 16 bits, or float32) and states.

        float16 + 16 bits is not: below float16's smallest normal the master is rounded stochastically.
        """
        kw = self.kwargs
        return kw.get("state_dtype") == F32 and all(
            d == F32 or (d == BF16 and kw.get("extra_bits", 16) == 16) for d in self.input.dtypes)

    def dtype(self, i: int) -> torch.dtype:
        return self.input.dtypes[i % len(self.input.dtypes)]

    def params(self, seed: int = 0, shapes=SHAPES) -> list[nn.Parameter]:
        """Fresh random parameters (the same for the same seed)."""
        gen = torch.Generator().manual_seed(seed)
        return [nn.Parameter(torch.randn(s, generator=gen).to(self.dtype(i))) for i, s in enumerate(shapes)]

    def make(self, params, **overrides) -> fusedwarm.FusedOptimizer:
        return self.info.optim_cls(params, **{**self.kwargs, **overrides})

    def build(self, seed: int = 0, **overrides) -> tuple[list[nn.Parameter], fusedwarm.FusedOptimizer]:
        params = self.params(seed)
        return params, self.make(params, **overrides)


def _storage_inputs() -> Iterator[OptimizerInput]:
    """Weight dtype x extra_bits x state_dtype, where the combination means something."""
    yield OptimizerInput("f32", dict(state_dtype=F32), (F32,), core=True)
    yield OptimizerInput("f32-sbf16", dict(state_dtype=BF16), (F32,), core=True)
    for extra_bits in (16, 8, 0):
        for state_dtype in (F32, BF16):
            yield OptimizerInput(f"bf16-x{extra_bits}-s{_SHORT[state_dtype]}",
                                 dict(extra_bits=extra_bits, state_dtype=state_dtype), (BF16,), core=True)
    yield OptimizerInput("f16-x16-sf32", dict(extra_bits=16, state_dtype=F32), (F16,), core=True)
    yield OptimizerInput("f16-x8-sbf16", dict(extra_bits=8, state_dtype=BF16), (F16,), core=True)
    yield OptimizerInput("f16-x0-sbf16", dict(extra_bits=0, state_dtype=BF16), (F16,), core=True)
    yield OptimizerInput("mixed-default", {}, (BF16, F16, F32), core=True)


def _option_inputs(name: str) -> Iterator[OptimizerInput]:
    """Options every optimizer takes, each on one storage mode (bfloat16 weights unless said)."""
    lr = HYPER[name]["lr"]
    sr = dict(extra_bits=0, state_dtype=BF16)  # stochastic rounding of weight and states
    yield OptimizerInput("bf16-x16-tensor_lr", dict(lr=torch.tensor(lr)), core=True)
    yield OptimizerInput("bf16-x0-tensor_lr", dict(lr=torch.tensor(lr), **sr), core=True)
    yield OptimizerInput("bf16-x16-maximize", dict(maximize=True))
    yield OptimizerInput("bf16-x0-maximize", dict(maximize=True, **sr))
    yield OptimizerInput("bf16-x16-wd0", dict(weight_decay=0.0))
    yield OptimizerInput("bf16-x16-wd_large", dict(weight_decay=0.5))
    yield OptimizerInput("bf16-x16-pam", dict(arithmetic="pam", state_dtype=F32))
    yield OptimizerInput("bf16-x0-pam", dict(arithmetic="pam", **sr))
    yield OptimizerInput("bf16-x16-warmup_linear", dict(warmup="linear", warmup_steps=4, warmup_start=0.25))
    yield OptimizerInput("bf16-x8-cosine", dict(extra_bits=8, schedule=schedules.Cosine(total_steps=5,
                                                                                         final_fraction=0.1)))
    yield OptimizerInput("bf16-x16-wsd", dict(schedule=schedules.WSD(total_steps=6, decay_fraction=0.5,
                                                                     shape="1-sqrt")))
    yield OptimizerInput("bf16-x16-control_tensor", dict(update_control="tensor", update_norm=2e-4))
    yield OptimizerInput("bf16-x0-control_row", dict(update_control="row", update_norm=2e-4, **sr))
    yield OptimizerInput("bf16-x16-control_rotational", dict(update_control="rotational", state_dtype=F32))
    yield OptimizerInput("bf16-x16-clip_global", dict(max_grad_norm=1.0))
    yield OptimizerInput("bf16-x0-clip_tensor", dict(max_grad_norm=1.0, clip="tensor", **sr))
    yield OptimizerInput("bf16-x16-clip_lagged", dict(max_grad_norm=1.0, clip="lagged"))
    yield OptimizerInput("f16-x16-loss_scale", dict(loss_scale=1024.0), (F16,))
    yield OptimizerInput("bf16-x8-loss_scale_dynamic", dict(loss_scale="dynamic", extra_bits=8))
    yield OptimizerInput("bf16-x16-backward_step", dict(backward_step=True), core=True)
    yield OptimizerInput("bf16-x0-backward_step", dict(backward_step=True, **sr), core=True)
    yield OptimizerInput("mixed-backward_step-lagged-dynamic",
                         dict(backward_step=True, max_grad_norm=1.0, clip="lagged", loss_scale="dynamic",
                              bucket_cap_mb=40 / 2**20),  # a few parameters per bucket: several flushes
                         (BF16, F32))


def adamw_inputs() -> Iterator[OptimizerInput]:
    yield from _storage_inputs()
    yield from _option_inputs("AdamW")
    yield OptimizerInput("bf16-x16-warmup_untuned", dict(warmup="untuned"))
    yield OptimizerInput("bf16-x0-warmup_untuned_exp", dict(warmup="untuned-exp", extra_bits=0))
    yield OptimizerInput("bf16-x16-warmup_radam", dict(warmup="radam", state_dtype=F32))
    yield OptimizerInput("bf16-x16-v_init_grad", dict(v_init="grad"))
    yield OptimizerInput("bf16-x16-eps_large", dict(eps=1e-2))


def sgd_inputs() -> Iterator[OptimizerInput]:
    yield from _storage_inputs()
    yield from _option_inputs("SGD")
    yield OptimizerInput("bf16-x16-no_momentum", dict(momentum=0.0, nesterov=False))
    yield OptimizerInput("bf16-x0-no_momentum", dict(momentum=0.0, nesterov=False, extra_bits=0))
    yield OptimizerInput("bf16-x16-momentum_dampening", dict(momentum=0.8, dampening=0.1, nesterov=False))


def lion_inputs() -> Iterator[OptimizerInput]:
    yield from _storage_inputs()
    yield from _option_inputs("Lion")
    yield OptimizerInput("bf16-x16-warmup_untuned", dict(warmup="untuned"))
    yield OptimizerInput("bf16-x0-warmup_untuned_exp", dict(warmup="untuned-exp", extra_bits=0))


# warmup="none" so that the first few steps already move the weights; a fixed seed.
OPTIMIZER_INFOS = [
    OptimizerInfo(fusedwarm.AdamW, adamw_inputs, {**HYPER["AdamW"], "warmup": "none", "seed": 7}),
    OptimizerInfo(fusedwarm.SGD, sgd_inputs, {**HYPER["SGD"], "warmup": "none", "seed": 7}),
    OptimizerInfo(fusedwarm.Lion, lion_inputs, {**HYPER["Lion"], "warmup": "none", "seed": 7}),
]
CONFIGS = {c.id: c for info in OPTIMIZER_INFOS for c in (Config(info, inp) for inp in info.optim_inputs_func())}
assert len(CONFIGS) == sum(1 for info in OPTIMIZER_INFOS for _ in info.optim_inputs_func()), "duplicate ids"


def configs(select: Callable[[Config], bool] = lambda c: True):
    """``pytest.param`` of every config that ``select`` keeps, with its id and marks."""
    return [pytest.param(c, id=c.id, marks=c.input.marks) for c in CONFIGS.values() if select(c)]


all_configs = pytest.mark.parametrize("config", configs())


def all_configs_times(argname: str, values) -> pytest.MarkDecorator:
    """Parametrizes ``config`` x ``argname``; beyond the first value only core configs run by default."""
    cases = []
    for c in CONFIGS.values():
        for k, v in enumerate(values):
            marks = c.input.marks + (() if k == 0 or c.input.core else (pytest.mark.slow,))
            cases.append(pytest.param(c, v, id=f"{c.id}-{v}", marks=marks))
    return pytest.mark.parametrize(("config", argname), cases)


# ---- driving and comparing ----------------------------------------------------------------------


def grad_stream(params, steps: int, seed: int) -> list[list[Tensor | None]]:
    """``steps`` lists of fresh random gradients in each parameter's dtype (None: no gradient)."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) if p.requires_grad else None for p in params]
            for _ in range(steps)]


def backward(opt, params, grads) -> Tensor:
    """``backward()`` of a loss whose gradient is exactly ``grads`` (times the loss scale)."""
    terms = [(p.float() * g.float()).sum() for p, g in zip(params, grads) if g is not None]
    loss = torch.stack(terms).sum()
    if opt.loss_scale is not None:
        loss = loss * opt.loss_scale
    loss.backward()
    return loss


def run(opt, params, grads_per_step, after_step: Callable[[int], None] | None = None) -> None:
    for t, grads in enumerate(grads_per_step):
        backward(opt, params, grads)
        opt.step()
        opt.zero_grad()
        if after_step is not None:
            after_step(t)


def clone_params(params) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in params]


def scalars(opt) -> dict[str, Tensor]:
    """The loss-scale and clipping scalars, as ``state_dict()["param_groups"][0]["fusedwarm"]`` holds them."""
    return {k: v.detach().clone() for k, v in opt._scalars().items() if v is not None}


def assert_same_run(a, b) -> None:
    """Every parameter, state tensor and scalar of optimizers ``a`` and ``b`` agrees bit for bit."""
    assert_same_snapshot(snapshot(a), snapshot(b))
    sa, sb = scalars(a), scalars(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_bits_equal(sa[k], sb[k], f"scalar {k}")


def param_state(opt, p) -> dict[str, Tensor]:
    """``p`` and its state tensors (copies)."""
    return {"param": p.detach().clone(), **{k: v.detach().clone() for k, v in opt.state.get(p, {}).items()}}


def assert_same_param_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: state entries {sorted(a)} != {sorted(b)}"
    for k in a:
        assert_bits_equal(a[k], b[k], f"{what} {k}")


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    """Options with tensors as (dtype, value), so that they compare with ==."""
    return {k: ("tensor", v.dtype, v.tolist()) if isinstance(v, Tensor) else v for k, v in options.items()
            if k != "params"}


def group_options(opt) -> list[dict[str, Any]]:
    return [_plain(g) for g in opt.param_groups]


def storages(opt, params) -> set[int]:
    out = {p.untyped_storage().data_ptr() for p in params if p.numel()}
    for state in opt.state.values():
        out |= {t.untyped_storage().data_ptr() for t in state.values() if isinstance(t, Tensor) and t.numel()}
    return out | {t.untyped_storage().data_ptr() for t in opt._scalars().values() if t is not None}


# ---- checkpoints and copies ---------------------------------------------------------------------


@all_configs
def test_state_dict_round_trip_resumes_bit_identically(config):
    params, opt = config.build()
    grads = grad_stream(params, 2 * STEPS, seed=1)
    run(opt, params, grads[:STEPS])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    # A fresh optimizer with another seed over the model's weights, loaded as trainers do.
    params2 = clone_params(params)
    opt2 = config.make(params2, seed=123)
    opt2.load_state_dict(loaded)
    assert group_options(opt2) == group_options(opt), "param group options (seed included) must be restored"
    assert_same_run(opt, opt2)

    # The same with each step as a plain number (torch.optim state dicts before 1.12).
    params3 = clone_params(params)
    opt3 = config.make(params3, seed=123)
    numbers = copy.deepcopy(loaded)
    for state in numbers["state"].values():
        state["step"] = float(state["step"])
    opt3.load_state_dict(numbers)

    run(opt, params, grads[STEPS:])
    run(opt2, params2, grads[STEPS:])
    run(opt3, params3, grads[STEPS:])
    assert_same_run(opt, opt2)
    assert_same_run(opt, opt3)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj))}


@all_configs_times("how", list(COPIES))
def test_copy_continues_bit_identically(config, how):
    """``copy.deepcopy`` (or pickling) a model's parameters with their optimizer gives an independent twin."""
    params, opt = config.build()
    grads = grad_stream(params, 2 * STEPS, seed=2)
    run(opt, params, grads[:STEPS])
    params2, opt2 = COPIES[how]((params, opt))
    assert all(q is p2 for q, p2 in zip(opt2.param_groups[0]["params"], params2))
    assert not storages(opt, params) & storages(opt2, params2), "the copy shares tensors with the original"
    assert group_options(opt2) == group_options(opt)
    # torch's Optimizer.__setstate__ adds defaults["differentiable"] = False to a copy; nothing else may change.
    assert _plain(opt2.defaults) == {**_plain(opt.defaults), "differentiable": False}
    assert opt2.backward_step == opt.backward_step
    assert_same_run(opt, opt2)
    run(opt, params, grads[STEPS:])
    run(opt2, params2, grads[STEPS:])
    assert_same_run(opt, opt2)


# ---- hooks --------------------------------------------------------------------------------------


@all_configs
def test_step_hooks_fire_once_per_step(config):
    params, opt = config.build()
    calls = []

    def hook(kind):
        def record(o, args, kwargs):
            assert o is opt
            calls.append((kind, snapshot(o)))
        return record

    handles = [opt.register_step_pre_hook(hook("pre")), opt.register_step_post_hook(hook("post")),
               register_optimizer_step_pre_hook(hook("global_pre")),
               register_optimizer_step_post_hook(hook("global_post"))]
    before, after = [], []
    try:
        for grads in grad_stream(params, STEPS, seed=3):
            backward(opt, params, grads)  # with backward_step=True this already updates
            before.append(snapshot(opt))
            opt.step()
            after.append(snapshot(opt))
            opt.zero_grad()
    finally:
        for h in handles[2:]:
            h.remove()
    kinds = ["global_pre", "pre", "post", "global_post"]
    assert [k for k, _ in calls] == kinds * STEPS
    for t in range(STEPS):
        for k, (kind, seen) in enumerate(calls[4 * t:4 * t + 4]):
            assert_same_snapshot(seen, before[t] if k < 2 else after[t])
        if not config.backward_step:  # the pre hooks really ran before the update
            assert snapshots_differ(before[t], after[t])
    handles[0].remove()
    handles[1].remove()
    run(opt, params, grad_stream(params, 1, seed=4))
    assert len(calls) == 4 * STEPS, "removed hooks still fire"


@all_configs
def test_state_dict_hooks_as_in_torch(config):
    """The hooks of torch's test_optim (test_state_dict_pre_hook, test_load_state_dict_*_hook)."""
    params, opt = config.build()
    run(opt, params, grad_stream(params, 2, seed=5))
    seen = {}

    def sd_pre(o):
        o.state["test"] = 1

    def sd_post(o, state_dict):
        seen["keys"] = set(state_dict)
        state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) == 1
        return state_dict

    opt.register_state_dict_pre_hook(sd_pre)
    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    del opt.state["test"]
    assert sd["ran_state_dict_pre_hook"] is True and "test" not in sd["state"]
    del sd["ran_state_dict_pre_hook"]

    def load_pre1(o, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002

    def load_pre2(o, state_dict):
        assert state_dict["param_groups"][0]["lr"] == 0.002
        new = copy.deepcopy(state_dict)
        new["param_groups"][0]["lr"] = 0.003
        return new

    def load_post(o):
        seen["lr_in_post"] = o.param_groups[0]["lr"]

    params2 = clone_params(params)
    opt2 = config.make(params2)
    opt2.register_load_state_dict_pre_hook(load_pre1)
    opt2.register_load_state_dict_pre_hook(load_pre2)
    opt2.register_load_state_dict_post_hook(load_post)
    opt2.load_state_dict(sd)
    assert seen["lr_in_post"] == 0.003 and opt2.param_groups[0]["lr"] == 0.003


@all_configs
def test_state_dict_post_hook_sees_the_whole_state_dict(config):
    """A post hook (e.g. one that moves a checkpoint to the CPU) gets what state_dict() returns."""
    params, opt = config.build()
    run(opt, params, grad_stream(params, 1, seed=6))
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(keys=set(sd)))
    sd = opt.state_dict()
    assert seen["keys"] == set(sd), f"the post hook saw {sorted(seen['keys'])}, state_dict() returned {sorted(sd)}"


@all_configs
def test_load_state_dict_post_hook_runs_after_everything_is_loaded(config):
    """torch runs load post hooks once the state is loaded: they see what the optimizer then holds."""
    params, opt = config.build()
    run(opt, params, grad_stream(params, 2, seed=20))
    params2 = clone_params(params)
    opt2 = config.make(params2)
    seen = {}
    opt2.register_load_state_dict_post_hook(lambda o: seen.update(snapshot=snapshot(o), scalars=scalars(o)))
    opt2.load_state_dict(opt.state_dict())
    assert_same_snapshot(seen["snapshot"], snapshot(opt2))
    for k, v in seen["scalars"].items():
        assert_bits_equal(v, scalars(opt2)[k], f"scalar {k} seen by the post hook")


@all_configs
def test_load_state_dict_pre_hook_can_adapt_state_tensors(config):
    """torch runs load pre hooks on the state dict as given (the documented way to adapt an old one)."""
    params, opt = config.build()
    run(opt, params, grad_stream(params, 2, seed=7))
    sd = opt.state_dict()
    seen = {}

    def pre(o, state_dict):
        seen["state keys"] = set(state_dict["state"][0])
        new = copy.copy(state_dict)
        new["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
        new["state"][0]["step"] = state_dict["state"][0]["step"] + 10
        return new

    params2 = clone_params(params)
    opt2 = config.make(params2)
    opt2.register_load_state_dict_pre_hook(pre)
    opt2.load_state_dict(sd)
    assert seen["state keys"] == set(sd["state"][0]), "the pre hook did not see the state tensors"
    assert_bits_equal(opt2.state[params2[0]]["step"], sd["state"][0]["step"] + 10, "step set by the pre hook")


# ---- closure, param groups, skipped and special parameters -------------------------------------


@all_configs
def test_closure_returns_loss_and_its_gradients_are_used(config):
    params, opt = config.build()
    twin_params, twin = config.build()
    returned, seen = [], []
    for grads in grad_stream(params, STEPS, seed=8):
        def closure():
            seen.append(torch.is_grad_enabled())
            opt.zero_grad()
            returned.append(backward(opt, params, grads))
            return returned[-1]

        with torch.no_grad():
            assert opt.step(closure) is returned[-1]
        backward(twin, twin_params, grads)
        twin.step()
        twin.zero_grad()
    assert seen == [True] * STEPS, "the closure must run with gradients enabled"
    assert_same_run(opt, twin)


def _other_group_options(config: Config) -> dict[str, Any]:
    """Options for a second param group that differ from the config's in every group option tested."""
    kw = config.kwargs
    out = {"lr": kw["lr"] * 3, "weight_decay": kw["weight_decay"] + 0.05}
    if any(d != F32 for d in config.input.dtypes):
        out["extra_bits"] = {16: 8, 8: 0, 0: 16}[kw.get("extra_bits", 16)]
    out["state_dtype"] = BF16 if kw.get("state_dtype") == F32 else F32
    return out


@all_configs
def test_param_groups_behave_like_separate_optimizers(config):
    """Each group updates as an optimizer made with that group's options alone.

    The random stream of a tensor is keyed by its index in the optimizer (ids continue across
    groups), and global/lagged clipping sees every gradient, so the reference for group k is a
    one-group optimizer with group k's options over copies of *all* parameters: same indices,
    same gradients, and only group k's tensors are compared. In deterministic mode (no stochastic
    rounding) each group must also equal an optimizer over its own parameters only.
    """
    params = config.params()
    split = 3
    other = _other_group_options(config)
    opt = config.make([{"params": params[:split]}, {"params": params[split:], **other}])
    for key, value in other.items():
        got = opt.param_groups[1][key]
        assert (torch.equal(got, value) if isinstance(value, Tensor) else got == value), key
    refs = []
    for k, options in enumerate(({}, other)):
        copies = clone_params(params)
        refs.append((copies, config.make(copies, **options), k))
    grads = grad_stream(params, STEPS, seed=9)
    run(opt, params, grads)
    for copies, ref, _ in refs:
        run(ref, copies, grads)
    for i, p in enumerate(params):
        copies, ref, k = refs[0 if i < split else 1]
        assert_same_param_state(param_state(opt, p), param_state(ref, copies[i]), f"group {k}, parameter {i}")
    # The second group's options made a difference (else the check above would prove nothing).
    copies0, ref0, _ = refs[0]
    assert any(_differ(param_state(opt, p), param_state(ref0, copies0[i]))
               for i, p in enumerate(params) if i >= split), "group 1's options changed nothing"

    # Deterministic mode, with a second group that stays deterministic (other lr and weight decay):
    # each group equals an optimizer over its own parameters only, whatever their indices.
    kw = config.kwargs
    if config.deterministic and (kw.get("max_grad_norm") is None or kw.get("clip") == "tensor"):
        same_storage = {k: other[k] for k in ("lr", "weight_decay")}
        both = config.params()
        grouped = config.make([{"params": both[:split]}, {"params": both[split:], **same_storage}])
        run(grouped, both, grads)
        for part, options in ((slice(0, split), {}), (slice(split, None), same_storage)):
            alone = config.params()[part]
            ref = config.make(alone, **options)
            run(ref, alone, [g[part] for g in grads])
            for p, q in zip(both[part], alone):
                assert_same_param_state(param_state(grouped, p), param_state(ref, q), "group vs its own optimizer")


def _differ(a: dict, b: dict) -> bool:
    try:
        assert_same_param_state(a, b, "")
    except AssertionError:
        return True
    return False


@all_configs
def test_parameters_without_grad_are_untouched(config):
    params = config.params()
    gen = torch.Generator().manual_seed(10)
    frozen = nn.Parameter(torch.randn(4, 3, generator=gen).to(config.dtype(0)), requires_grad=False)
    unused = nn.Parameter(torch.randn(7, generator=gen).to(config.dtype(1)))  # requires grad, never gets one
    everything = params + [frozen, unused]
    opt = config.make(everything)
    before = {"frozen": frozen.detach().clone(), "unused": unused.detach().clone()}
    grads = grad_stream(everything, STEPS, seed=11)
    for g in grads:
        g[-1] = None  # `unused` is not part of the loss
    run(opt, everything, grads)
    for name, p in (("frozen", frozen), ("unused", unused)):
        assert p.grad is None
        assert_bits_equal(p, before[name], f"{name} parameter")
        assert len(opt.state.get(p, {})) == 0, f"state was created for the {name} parameter"

    # A parameter that has state and then gets no gradient keeps weight and state.
    kept = param_state(opt, params[0])
    last = [None if i == 0 else g for i, g in enumerate(grad_stream(everything, 1, seed=12)[0])]
    last[-1] = None
    run(opt, everything, [last])
    assert_same_param_state(param_state(opt, params[0]), kept, "parameter without gradient in the last step")


@all_configs
def test_zero_size_and_0dim_parameters(config):
    params, opt = config.build()
    run(opt, params, grad_stream(params, 1, seed=13))
    after_one = [param_state(opt, p) for p in params]
    run(opt, params, grad_stream(params, STEPS - 1, seed=19))
    for shape, p, one in zip(SHAPES, params, after_one):
        state = opt.state[p]
        assert int(state["step"]) == STEPS, shape
        for key, value in state.items():
            assert value.shape == (() if key == "step" else p.shape), (shape, key)
        assert opt.master_weight(p).shape == p.shape
        if p.dim() == 0:
            assert _differ(param_state(opt, p), one), "the 0-dim parameter and its state were not updated"

    # Optimizers over only empty tensors, or only a 0-dim one, step too.
    for shapes in (((0,), (3, 0)), ((),)):
        only = config.params(shapes=shapes)
        lone = config.make(only)
        run(lone, only, grad_stream(only, 2, seed=14))
        assert all(int(lone.state[p]["step"]) == 2 for p in only)


# ---- learning rate ------------------------------------------------------------------------------


SCHEDULERS = {
    "StepLR": lambda opt, steps: StepLR(opt, step_size=2, gamma=0.5),
    "LambdaLR": lambda opt, steps: LambdaLR(opt, lambda t: 1.0 / (1.0 + t)),
    "OneCycleLR": lambda opt, steps: OneCycleLR(opt, max_lr=3 * float(opt.param_groups[0]["lr"]), total_steps=steps),
}
SCHEDULED_KEYS = ("lr", "betas", "momentum")  # what torch's schedulers change (OneCycleLR cycles momentum)


@all_configs_times("scheduler", list(SCHEDULERS))
def test_lr_scheduler_changes_the_update(config, scheduler):
    """An LR scheduler's values are used exactly as if they had been set on the group by hand."""
    steps = 5
    params, opt = config.build()
    sched = SCHEDULERS[scheduler](opt, steps)

    def scheduled_values():
        return [{k: float(g[k]) if isinstance(g[k], Tensor) else g[k] for k in SCHEDULED_KEYS if k in g}
                for g in opt.param_groups]

    history = [scheduled_values()]  # OneCycleLR already sets the first values

    def after(t):
        sched.step()
        history.append(scheduled_values())

    grads = grad_stream(params, steps, seed=15)
    run(opt, params, grads, after)
    assert len({h[0]["lr"] for h in history}) > 1, "the scheduler never changed the lr"

    manual_params, manual = config.build()
    for t, g in enumerate(grads):
        for group, set_values in zip(manual.param_groups, history[t]):
            for k, v in set_values.items():
                if isinstance(group[k], Tensor):
                    group[k].fill_(v)
                else:
                    group[k] = v
        run(manual, manual_params, [g])
    assert_same_run(opt, manual)

    # The scheduled lr made a difference to the masters (with 16 extra bits or float32 weights, where
    # an lr change cannot drown in stochastic rounding or be masked by an update-size bound).
    if config.kwargs.get("extra_bits", 16) == 16 and config.kwargs.get("update_control") in (None, "rotational"):
        fixed_params, fixed = config.build()
        run(fixed, fixed_params, grads)
        assert any(not torch.equal(bits(opt.master_weight(p)), bits(fixed.master_weight(q)))
                   for p, q in zip(params, fixed_params)), "the scheduled lr changed no master weight"


@all_configs
def test_goes_the_right_direction(config):
    """A few steps on a linear loss lower it (raise it with maximize=True), measured on the masters.

    The lr is 10x the config's, so that warmups and stochastic rounding still move the weights.
    """
    lr = config.kwargs["lr"]
    params, opt = config.build(lr=lr * 10)
    gen = torch.Generator().manual_seed(16)
    c = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]

    def loss():
        return sum(float((opt.master_weight(p).double() * g.double()).sum()) for p, g in zip(params, c))

    start = loss()
    run(opt, params, [c] * 5)
    if config.kwargs.get("maximize"):
        assert loss() > start
    else:
        assert loss() < start


# ---- zero_grad ----------------------------------------------------------------------------------


@all_configs
@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeros"])
def test_zero_grad(config, set_to_none):
    params, opt = config.build()
    twin_params, twin = config.build()
    grads = grad_stream(params, STEPS, seed=17)
    for g in grads:
        backward(opt, params, g)
        opt.step()
        held = [p.grad for p in params]
        opt.zero_grad(set_to_none=set_to_none)
        for p, h in zip(params, held):
            if set_to_none or h is None:
                assert p.grad is None
            else:
                assert p.grad is h and p.grad.dtype == p.dtype
                assert not bits(p.grad).any(), "zero_grad(set_to_none=False) must write +0.0"
        backward(twin, twin_params, g)
        twin.step()
        twin.zero_grad(set_to_none=True)
    assert_same_run(opt, twin)  # accumulating into zeroed gradients changes nothing

    if set_to_none:
        # A step without gradients changes nothing at all (torch's test_step_is_noop_when_params_have_no_grad).
        before, before_scalars = snapshot(opt), scalars(opt)
        opt.step()
        assert_same_snapshot(before, snapshot(opt))
        for k, v in before_scalars.items():
            assert_bits_equal(v, scalars(opt)[k], k)


# ---- torch.compile (light: tests/test_compile.py is the full check) ---------------------------


COMPILE_CONFIGS = ("AdamW-bf16-x16-tensor_lr", "SGD-bf16-x0-sbf16", "Lion-f32", "AdamW-bf16-x0-backward_step")


@pytest.mark.parametrize("config", configs(lambda c: c.id in COMPILE_CONFIGS))
def test_compiled_step_matches_eager(config):
    torch._dynamo.reset()
    try:
        params, opt = config.build()
        eager_params, eager = config.build()
        step = torch.compile(opt.step)
        grads = grad_stream(params, STEPS, seed=18)
        for g in grads:
            backward(opt, params, g)
            step()
            opt.zero_grad()
        run(eager, eager_params, grads)
        assert_same_run(opt, eager)
    finally:
        torch._dynamo.reset()
