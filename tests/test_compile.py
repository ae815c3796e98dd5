"""fusedwarm under ``torch.compile``: compiled steps and compiled training steps end in eager's bits.

``FusedOptimizer.step`` and the callables fusedwarm hands to autograd and DDP are deliberately
never traced (``torch.compiler.disable``; see the README's "torch.compile" section): dynamo does
not replay attribute assignments made on a ``torch.optim.Optimizer`` inside a traced frame, and a
traced step once updated on its first call only. So every case here runs 20 steps eagerly and
compiled and compares the bits of every parameter and state tensor, and the graph breaks are
counted so that a new one (or a lost one) shows.

The model has exact gradients: the loss is ``sum_i (p_i * c_i).sum()`` with ``c_i`` holding
bfloat16 values, so ``p_i.grad == c_i`` whatever order inductor computes the forward and backward
in. A difference can then only come from the optimizer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo import compiled_autograd
from torch._dynamo.utils import counters

import fusedwarm
from helpers import HYPER, OPTIMIZERS
from test_conventions import assert_same_snapshot, snapshot

pytestmark = [
    pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="dynamo is not supported on this platform"),
    pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None,
                       reason="torch.compile's inductor backend needs a C++ compiler on the CPU"),
]

STEPS = 20
# Autograd delivers the last tensor's gradient first (see BUCKET_CAP_MB).
SHAPES = ((8,), (4, 3, 2), (16, 8))
# (param dtype, extra_bits): the main mode, the stochastic-rounding mode, float32.
MODES = {"bf16-x16": (torch.bfloat16, 16), "bf16-x0": (torch.bfloat16, 0), "f32": (torch.float32, 16)}
# plain: float lr, no scheduler. tensor-lr: a 0-d tensor lr that StepLR changes in place.
# scheduler: float lr from LambdaLR. backward_step: step in backward with LambdaLR; the (16, 8)
# tensor fills a bucket and is updated inside backward, the small ones at its end. clip-scale:
# backward_step with lagged clipping and the dynamic loss scale, whose state goes from one iteration
# to the next; the default bucket cap, so every update happens at the end of backward.
FEATURES = ("plain", "tensor-lr", "scheduler", "backward_step", "clip-scale")
BUCKET_CAP_MB = 16 * 8 * 2 / 2**20  # the (16, 8) tensor's bfloat16 gradient
# Every optimizer, mode and feature at least once in the default run; the rest with -m slow.
TRAIN_DEFAULT = {("AdamW", "bf16-x16", "plain"), ("SGD", "bf16-x0", "tensor-lr"), ("Lion", "f32", "scheduler"),
                 ("AdamW", "bf16-x0", "backward_step"), ("SGD", "f32", "backward_step"),
                 ("Lion", "bf16-x16", "backward_step"), ("AdamW", "bf16-x16", "clip-scale")}
STEP_DEFAULT = {("AdamW", "bf16-x16"), ("SGD", "bf16-x0"), ("Lion", "f32")}

# Graph breaks, by the first line of dynamo's message. fusedwarm's step(), zero_grad() and the other
# methods that run eagerly (fusedwarm._eager.eager) break where they are called ("inlining"); a
# function that torch.compiler.disable wrapped itself breaks as "calling".
BACKWARD = "Unsupported Tensor.backward() call"
EAGER_METHOD = "Skip inlining `torch.compiler.disable()`d function"
DISABLED = "Skip calling `torch.compiler.disable()`d function"


def _train_cases():
    for name in OPTIMIZERS:
        for mode in MODES:
            for feature in FEATURES:
                marks = () if (name, mode, feature) in TRAIN_DEFAULT else (pytest.mark.slow,)
                yield pytest.param(name, mode, feature, id=f"{name}-{mode}-{feature}", marks=marks)


def _step_cases():
    for name in OPTIMIZERS:
        for mode in MODES:
            marks = () if (name, mode) in STEP_DEFAULT else (pytest.mark.slow,)
            yield pytest.param(name, mode, id=f"{name}-{mode}", marks=marks)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each case compiles from scratch, so counters are its own and no cache limit carries over."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _inputs(steps: int = STEPS) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=gen).to(torch.bfloat16).float() for s in SHAPES] for _ in range(steps)]


def _setup(name: str, mode: str, feature: str, cls: type | None = None):
    """Fresh parameters (the same in every call), the optimizer and its LR scheduler (or None)."""
    dtype, extra_bits = MODES[mode]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    kw = {**HYPER[name], "warmup": "none", "extra_bits": extra_bits, "seed": 7}
    if feature == "tensor-lr":
        kw["lr"] = torch.tensor(kw["lr"])
    if feature == "backward_step":
        kw.update(backward_step=True, bucket_cap_mb=BUCKET_CAP_MB)
    if feature == "clip-scale":
        kw.update(backward_step=True, max_grad_norm=1.0, clip="lagged", loss_scale="dynamic")
    opt = (cls or getattr(fusedwarm, name))(params, **kw)
    if feature == "tensor-lr":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    elif feature == "plain":
        sched = None
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + 0.1 * t))
    return params, opt, sched


def _loss(params, cs, opt) -> torch.Tensor:
    loss = sum((p.float() * c).sum() for p, c in zip(params, cs))
    return loss if opt.loss_scale is None else loss * opt.loss_scale


def _train(name: str, mode: str, feature: str, wrap=None, *, cls: type | None = None, steps: int = STEPS,
           after_backward=None) -> fusedwarm.FusedOptimizer:
    """``steps`` iterations of forward, ``backward()``, ``step()``, ``zero_grad()`` in a function
    compiled by ``wrap`` (eager if None); the scheduler steps outside it, as in most loops.
    ``after_backward(params, opt)``, for eager runs only, looks at the state between backward and step."""
    params, opt, sched = _setup(name, mode, feature, cls)

    def train(cs):
        _loss(params, cs, opt).backward()
        if after_backward is not None:
            after_backward(params, opt)
        opt.step()
        opt.zero_grad()

    fn = train if wrap is None else wrap(train)
    for cs in _inputs(steps):
        fn(cs)
        if sched is not None:
            sched.step()
    return opt


def _assert_same(eager: fusedwarm.FusedOptimizer, compiled: fusedwarm.FusedOptimizer, steps: int = STEPS) -> None:
    assert [int(s["step"]) for s in compiled.state.values()] == [steps] * len(SHAPES)
    assert_same_snapshot(snapshot(eager), snapshot(compiled))


def _graph_breaks() -> dict[str, int]:
    """Graph breaks so far by kind: the first line of dynamo's message (the rest names the function,
    at an address that differs between runs)."""
    kinds: dict[str, int] = {}
    for reason, n in counters["graph_break"].items():
        kind = reason.split("\n")[0]
        kinds[kind] = kinds.get(kind, 0) + n
    return kinds


@pytest.mark.parametrize("name,mode,feature", _train_cases())
def test_compiled_train_step_matches_eager(name, mode, feature):
    """A compiled function with forward, backward(), step() and zero_grad(), default options."""
    eager = _train(name, mode, feature)
    compiled = _train(name, mode, feature, torch.compile)
    _assert_same(eager, compiled)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was compiled"


@pytest.mark.parametrize("name,mode", _step_cases())
def test_compiled_opt_step_matches_eager(name, mode):
    """``torch.compile(opt.step)``, alternating with eager ``opt.step()`` calls: issue 13 saw the
    first compiled call update and every later call, compiled or eager, do nothing."""
    results = []
    for compiled in (False, True):
        params, opt, _ = _setup(name, mode, "plain")
        step = torch.compile(opt.step) if compiled else opt.step
        for i, cs in enumerate(_inputs()):
            _loss(params, cs, opt).backward()
            (step if i % 2 == 0 else opt.step)()
            opt.zero_grad()
        results.append(opt)
    _assert_same(*results)
    assert _graph_breaks() == {EAGER_METHOD: 1}


@pytest.mark.parametrize("feature", ["plain", "backward_step"])
def test_compiled_model_eager_step(feature):
    """Only the forward compiled, the usual ``torch.compile(model)``: with ``backward_step=True`` the
    hooks run in the eager autograd engine after the compiled backward."""
    eager = _train("Lion", "bf16-x0", feature)
    params, opt, sched = _setup("Lion", "bf16-x0", feature)
    loss_fn = torch.compile(_loss)
    for cs in _inputs():
        loss_fn(params, cs, opt).backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    _assert_same(eager, opt)


def test_max_autotune():
    """``mode="max-autotune-no-cudagraphs"`` with the step in backward."""
    eager = _train("AdamW", "bf16-x16", "backward_step")
    compiled = _train("AdamW", "bf16-x16", "backward_step",
                      lambda f: torch.compile(f, mode="max-autotune-no-cudagraphs"))
    _assert_same(eager, compiled)


@pytest.mark.parametrize("feature,expected", [
    pytest.param("plain", {BACKWARD: 1, EAGER_METHOD: 3}, id="plain"),
    pytest.param("backward_step", {BACKWARD: 1, DISABLED: 1, EAGER_METHOD: 2}, id="backward_step-LambdaLR"),
])
def test_graph_breaks(feature, expected):
    """The graph breaks of a compiled training step over 20 iterations, none recompiled.

    ``backward()`` (not traced without compiled autograd) breaks for torch's optimizers too, and so
    does ``zero_grad()`` (torch.optim's is skipped by dynamo; fusedwarm's runs eagerly). ``opt.step()``
    is the deliberate break; it is counted twice, in the caller and in the frame of torch.optim's
    wrapper around ``step`` (whose ``functools.wraps`` copies the disable flag, so dynamo stops at
    the wrapper and then compiles the wrapper's own frame up to ``FusedOptimizer.step``; with an LR
    scheduler, at each of its two wrappers). The backward hooks add none: they are disabled too, so
    dynamo never sees their frames."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        _train("AdamW", "bf16-x16", feature, torch.compile)
    assert _graph_breaks() == expected


def test_eager_methods_do_not_import_dynamo():
    """A process that never compiles never imports torch._dynamo (about a second of a warm start):
    fusedwarm's import, construction, step(), zero_grad() and state_dict() mark themselves eager
    lazily (fusedwarm._eager) and call torch.optim's methods without their dynamo wrappers."""
    code = """
import sys, torch, fusedwarm
p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
opt = fusedwarm.AdamW([p], lr=1e-3)
for _ in range(2):
    p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad()
fusedwarm.AdamW([p], lr=1e-3).load_state_dict(opt.state_dict())
print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_fullgraph_names_the_step():
    """``fullgraph=True`` cannot include ``opt.step()``: dynamo's error gives fusedwarm's reason."""
    params, opt, _ = _setup("AdamW", "bf16-x16", "plain")
    _loss(params, _inputs(1)[0], opt).backward()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"fusedwarm runs optimizer\.step\(\) eagerly"):
        torch.compile(opt.step, fullgraph=True)()


class _RebindingAdamW(fusedwarm.AdamW):
    """Rebinds its bookkeeping at the end of each iteration, as the base class did when issue 13
    was found (``self._updated = {}``): dynamo dropped such assignments inside a traced step."""

    iterations = 0

    def _end_iteration(self) -> None:
        if self._iteration_open:
            self.iterations += 1
        super()._end_iteration()
        self._updated = {}
        self._skips = []


@pytest.mark.parametrize("how", ["opt.step", "train-backward_step"])
def test_subclass_rebinding_attributes(how):
    """A subclass that assigns attributes during step() keeps working under torch.compile."""
    if how == "opt.step":
        eager = _train("AdamW", "bf16-x16", "plain")
        params, compiled, _ = _setup("AdamW", "bf16-x16", "plain", _RebindingAdamW)
        step = torch.compile(compiled.step)
        for cs in _inputs():
            _loss(params, cs, compiled).backward()
            step()
            compiled.zero_grad()
    else:
        eager = _train("AdamW", "bf16-x16", "backward_step")
        compiled = _train("AdamW", "bf16-x16", "backward_step", torch.compile, cls=_RebindingAdamW)
    _assert_same(eager, compiled)
    assert compiled.iterations == STEPS


def test_accumulate_under_compile():
    """``with opt.accumulate(): loss.backward()`` inside a compiled function (backward_step=True)."""
    def run(wrap):
        params, opt, _ = _setup("SGD", "bf16-x16", "backward_step")

        def train(cs1, cs2):
            with opt.accumulate():
                _loss(params, cs1, opt).backward()
            _loss(params, cs2, opt).backward()
            opt.step()
            opt.zero_grad()

        fn = wrap(train)
        inputs = _inputs(2 * STEPS)
        for i in range(STEPS):
            fn(inputs[2 * i], inputs[2 * i + 1])
        return opt

    _assert_same(run(lambda f: f), run(torch.compile))


@pytest.mark.parametrize("route", ["config", "enable"])
def test_compiled_autograd_backward_step(route):
    """Compiled autograd with ``backward_step=True``, through ``torch._dynamo.config.compiled_autograd``
    (a compiled training step) and through ``compiled_autograd._enable`` (eager forward, compiled
    backward). The hooks run eagerly inside the compiled backward and update the full bucket (the
    (16, 8) tensor) there; compiled autograd drops the end-of-backward callback, so the small
    tensors' bucket is updated by ``step()``."""
    steps = 4
    eager = _train("AdamW", "bf16-x16", "backward_step", steps=steps)
    seen = []
    if route == "config":
        with torch._dynamo.config.patch(compiled_autograd=True):
            compiled = _train("AdamW", "bf16-x16", "backward_step", torch.compile, steps=steps)
    else:
        def after_backward(params, opt):
            seen.append(([int(opt.state[p]["step"]) if p in opt.state else 0 for p in params],
                         [p.grad is None for p in params]))

        with compiled_autograd._enable(torch.compile()):
            compiled = _train("AdamW", "bf16-x16", "backward_step", steps=steps, after_backward=after_backward)
        assert seen == [([i, i, i + 1], [False, False, True]) for i in range(steps)]
    assert counters["compiled_autograd"]["captures"] > 0, "compiled autograd did not run"
    _assert_same(eager, compiled, steps)


def test_compiled_autograd_fullgraph_names_the_hooks():
    """Compiled autograd with ``fullgraph=True`` cannot include the hooks; the error says what to do."""
    with pytest.raises(torch._dynamo.exc.Unsupported, match="backward_step hooks run eagerly: compile with "
                                                            "fullgraph=False"):
        with compiled_autograd._enable(torch.compile(fullgraph=True)):
            _train("AdamW", "bf16-x16", "backward_step", steps=1)
