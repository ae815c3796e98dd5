"""The operator surface: ``torch.library.opcheck`` on every op, and the ops under ``torch.compile``.

opcheck runs each op for real and checks its schema (the mutation annotations match what the
kernel writes), its autograd registration, its fake kernel against the real one, and its
behaviour under AOTAutograd with dynamic shapes.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from fusedwarm import _ops

EXTRA_DTYPE = {16: torch.int16, 8: torch.int8}
HALF_EXTRA_RANGE = {(torch.bfloat16, 16): 2**15, (torch.bfloat16, 8): 2**7, (torch.float16, 16): 2**12,
                    (torch.float16, 8): 2**7}
SHAPES = [(37,), (3, 4), (2, 1, 5)]


@pytest.fixture(scope="module")
def ops():
    return _ops.load()


def step_inputs(dtype, extra_bits, state_dtype, num_states, seed):
    """Random, non-zero inputs of a fused step over tensors of several shapes."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    extras = []
    if dtype != torch.float32 and extra_bits:
        half = HALF_EXTRA_RANGE[(dtype, extra_bits)]  # the range the split can produce
        extras = [torch.randint(-half, half, s, generator=gen).to(EXTRA_DTYPE[extra_bits]) for s in SHAPES]
    states = []
    for j in range(num_states):
        # The last state of AdamW is a second moment: positive.
        make = (lambda s: torch.rand(s, generator=gen) + 0.1) if j == 1 else (lambda s: torch.randn(s, generator=gen))
        states.append([make(s).to(state_dtype) for s in SHAPES])
    steps = [torch.tensor(int(t)) for t in torch.randint(1, 50, (len(SHAPES),), generator=gen)]
    return params, grads, extras, states, steps, [3, 0, 7]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# bf16 weights + int16 extras + fp32 states; fp32 weights; no extra bits with bf16 states.
CASES = {
    "bf16-x16-sf32": (torch.bfloat16, 16, torch.float32),
    "f32-sf32": (torch.float32, 0, torch.float32),
    "bf16-x0-sbf16": (torch.bfloat16, 0, torch.bfloat16),
}
cases = pytest.mark.parametrize("case", list(CASES))


def _check(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def _mutates(op, args):
    """Runs the op on a deep copy of args and returns whether the first tensor list changed."""
    before = copy.deepcopy(args)
    after = copy.deepcopy(args)
    op(*after)
    return any(not torch.equal(a, b) for a, b in zip(before[0], after[0]))


@pytest.mark.parametrize("case,lr_as_tensor", [(c, False) for c in CASES] + [("bf16-x16-sf32", True)],
                         ids=list(CASES) + ["bf16-x16-sf32-lr_tensor"])
def test_opcheck_adamw(ops, case, lr_as_tensor):
    dtype, extra_bits, state_dtype = CASES[case]
    params, grads, extras, states, steps, ids = step_inputs(dtype, extra_bits, state_dtype, 2, seed=1)
    lr_tensor = torch.tensor(3e-2) if lr_as_tensor else None
    args = (params, grads, extras, states[0], states[1], steps, ids, lr_tensor, 0.0 if lr_as_tensor else 3e-2,
            extra_bits, 1234, 0.9, 0.99, 1e-8, 0.1, False)
    assert _mutates(ops.adamw_.default, args)
    _check(ops.adamw_.default, args)


@cases
def test_grad_scales_multiply_the_gradient_and_nonfinite_counts_skips(ops, case):
    """grad_scales[i] multiplies tensor i's gradient (a power of two: exactly as scaling the
    gradient beforehand); nonfinite[i] gains the number of elements skipped in tensor i."""
    dtype, extra_bits, state_dtype = CASES[case]
    params, grads, extras, states, steps, ids = step_inputs(dtype, extra_bits, state_dtype, 2, seed=4)
    grads[1].view(-1)[:3] = float("inf")
    grads[2].view(-1)[5] = float("nan")
    scales = torch.tensor([0.25, 4.0, 1.0])
    counts = torch.tensor([7, 0, 0])
    hyper = (0.9, 0.99, 1e-8, 0.1, False)
    scaled = copy.deepcopy((params, [g * s for g, s in zip(grads, scales.tolist())], extras, *states, steps))
    ops.adamw_(*scaled[:5], scaled[5], ids, None, 3e-2, extra_bits, 1234, *hyper)
    args = (params, grads, extras, states[0], states[1], steps, ids, None, 3e-2, extra_bits, 1234, *hyper)
    _check(ops.adamw_.default, copy.deepcopy(args) + ("ieee", scales, counts.clone()))
    ops.adamw_(*args, grad_scales=scales, nonfinite=counts)
    for got, want in zip(params + states[0] + states[1], scaled[0] + scaled[3] + scaled[4]):
        assert torch.equal(bits(got), bits(want))
    assert counts.tolist() == [7, 3, 1]
    with pytest.raises(RuntimeError, match=r"grad_scales must be a contiguous Float tensor of shape \[3\]"):
        ops.adamw_(*args, grad_scales=scales[:2])
    with pytest.raises(RuntimeError, match=r"nonfinite must be a contiguous Long tensor of shape \[3\]"):
        ops.adamw_(*args, nonfinite=counts.int())


# Each op's call on (params, grads, extras, states, steps, ids) with maximize as given: AdamW,
# SGD with momentum (no dampening, no Nesterov) and Lion.
MAXIMIZE_CALLS = {
    "adamw": (2, lambda ops, p, g, x, s, t, i, eb, mx: ops.adamw_(p, g, x, s[0], s[1], t, i, None, 3e-2, eb, 77, 0.9,
                                                               0.99, 1e-8, 0.1, mx)),
    "sgd_momentum": (1, lambda ops, p, g, x, s, t, i, eb, mx: ops.sgd_(p, g, x, s[0], t, i, None, 5e-2, eb, 77, 0.9,
                                                                    0.0, 1e-3, False, mx)),
    "lion": (1, lambda ops, p, g, x, s, t, i, eb, mx: ops.lion_(p, g, x, s[0], t, i, None, 1e-2, eb, 77, 0.9, 0.99,
                                                             0.1, mx)),
}


@cases
@pytest.mark.parametrize("rule", list(MAXIMIZE_CALLS))
def test_maximize_on_negated_gradients_is_the_same_step(ops, case, rule):
    """maximize=True on -g gives the bits of maximize=False on g. Without maximize (and gradient
    scales of 1) the CPU backend runs its element loop compiled for plain scalars (update.cuh),
    with maximize the general one: this holds the two to the same results."""
    dtype, extra_bits, state_dtype = CASES[case]
    num_states, call = MAXIMIZE_CALLS[rule]
    params, grads, extras, states, steps, ids = step_inputs(dtype, extra_bits, state_dtype, num_states, seed=9)
    plain = copy.deepcopy((params, grads, extras, states, steps))
    call(ops, *plain, ids, extra_bits, False)
    call(ops, params, [-g for g in grads], extras, states, steps, ids, extra_bits, True)
    for got, want in zip(params + extras + sum(states, []), plain[0] + plain[2] + sum(plain[3], [])):
        assert torch.equal(bits(got), bits(want))


@cases
def test_nonfinite_gradients_in_some_spans(ops, case):
    """The CPU loop scans the gradients of each span of 1024 elements first and updates a span
    whose scaled gradients are all finite without testing each element; in a span with a
    non-finite one, those elements are put back afterwards. Over three tensors of 3000 elements
    (non-finite gradients in the middle span only; gradients that overflow only once scaled, in
    the first and last span; none), every element equals its update in a twin whose bad gradients
    are finite, except the bad ones, which keep their storage, and nonfinite counts exactly them."""
    dtype, extra_bits, state_dtype = CASES[case]
    gen = torch.Generator().manual_seed(9)
    n = 3000
    params = [torch.randn(n, generator=gen).to(dtype) for _ in range(3)]
    grads = [torch.randn(n, generator=gen) for _ in range(3)]
    extras = ([torch.randint(-2**15, 2**15, (n,), generator=gen).to(torch.int16) for _ in range(3)]
              if extra_bits else [])
    states = [[torch.randn(n, generator=gen).to(state_dtype) for _ in range(3)],
              [(torch.rand(n, generator=gen) + 0.1).to(state_dtype) for _ in range(3)]]
    steps = [torch.tensor(5) for _ in range(3)]
    scales = torch.tensor([1.0, 2.0**100, 0.5])
    bad = [torch.tensor([1100, 1500, 2047]), torch.tensor([3, 1023, 2048, 2999]), torch.tensor([], dtype=torch.long)]
    twin_grads = [g.clone().to(dtype) for g in grads]
    grads[0][bad[0]] = torch.tensor([float("inf"), float("nan"), float("-inf")])
    grads[1][bad[1]] = 2.0**30  # finite, but 2^130 once scaled
    grads = [g.to(dtype) for g in grads]
    twin = copy.deepcopy((params, extras, states))
    before = copy.deepcopy((params, extras, states))
    counts = torch.zeros(3, dtype=torch.int64)
    hyper = (0.9, 0.99, 1e-8, 0.1, False)
    ops.adamw_(params, grads, extras, states[0], states[1], steps, [0, 1, 2], None, 3e-2, extra_bits, 1234, *hyper,
               grad_scales=scales, nonfinite=counts)
    ops.adamw_(twin[0], twin_grads, twin[1], twin[2][0], twin[2][1], copy.deepcopy(steps), [0, 1, 2], None, 3e-2,
               extra_bits, 1234, *hyper, grad_scales=scales, nonfinite=torch.zeros(3, dtype=torch.int64))
    assert counts.tolist() == [len(b) for b in bad]
    for lists in ((params, twin[0], before[0]), (extras, twin[1], before[1]), (states[0], twin[2][0], before[2][0]),
                  (states[1], twin[2][1], before[2][1])):
        for t, (got, want, old) in enumerate(zip(*lists)):
            keep = torch.zeros(n, dtype=torch.bool)
            keep[bad[t]] = True
            assert torch.equal(bits(got)[keep], bits(old)[keep]), f"tensor {t}: a skipped element changed"
            assert torch.equal(bits(got)[~keep], bits(want)[~keep]), f"tensor {t}: an updated element differs"
            assert not torch.equal(bits(got)[~keep], bits(old)[~keep]), f"tensor {t}: nothing was updated"


@cases
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True)], ids=["no_momentum", "nesterov"])
def test_opcheck_sgd(ops, case, momentum, nesterov):
    dtype, extra_bits, state_dtype = CASES[case]
    params, grads, extras, states, steps, ids = step_inputs(dtype, extra_bits, state_dtype, 1, seed=2)
    buffers = states[0] if momentum else []
    args = (params, grads, extras, buffers, steps, ids, None, 5e-2, extra_bits, 99, momentum, 0.0, 1e-3, nesterov,
            False)
    assert _mutates(ops.sgd_.default, args)
    _check(ops.sgd_.default, args)


@cases
def test_opcheck_lion(ops, case):
    dtype, extra_bits, state_dtype = CASES[case]
    params, grads, extras, states, steps, ids = step_inputs(dtype, extra_bits, state_dtype, 1, seed=3)
    args = (params, grads, extras, states[0], steps, ids, None, 1e-2, extra_bits, 5, 0.9, 0.99, 0.1, True)
    assert _mutates(ops.lion_.default, args)
    _check(ops.lion_.default, args)


@pytest.mark.parametrize("dtype,extra_bits", [(torch.bfloat16, 16), (torch.bfloat16, 8), (torch.float16, 16),
                                              (torch.float32, 0)],
                         ids=["bf16-x16", "bf16-x8", "f16-x16", "f32"])
def test_opcheck_master_weight(ops, dtype, extra_bits):
    gen = torch.Generator().manual_seed(4)
    param = torch.randn(6, 5, generator=gen).to(dtype)
    if extra_bits:
        half = HALF_EXTRA_RANGE[(dtype, extra_bits)]
        extra = torch.randint(-half, half, (6, 5), generator=gen).to(EXTRA_DTYPE[extra_bits])
    else:
        extra = torch.empty(0, dtype=torch.int8)
    out = ops.master_weight(param, extra, extra_bits)
    assert out.dtype == torch.float32 and out.shape == param.shape
    if extra_bits:
        assert not torch.equal(out, param.float()), "the extra bits must change the master"
    else:
        assert torch.equal(out, param.float()), "without extra bits the master is the weight"
    _check(ops.master_weight.default, (param, extra, extra_bits))


def test_opcheck_philox4x32(ops):
    gen = torch.Generator().manual_seed(5)
    counters = torch.randint(0, 2**32, (9, 4), generator=gen, dtype=torch.int64)
    _check(ops.philox4x32.default, (counters, 0x0123456789ABCDEF))
    _check(ops.philox4x32.default, (counters, -2))  # a key with the top bit set


def _have_cxx() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="this torch has no torch.compile")
@pytest.mark.skipif(not _have_cxx(), reason="torch.compile's inductor backend needs a C++ compiler on the CPU")
def test_ops_under_torch_compile_fullgraph(ops):
    """A compiled (fullgraph, inductor) function calling the step op and master_weight gives the same
    bits as eager, including the in-place updates of params, extra bits and states."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile (dynamo) is not supported on this Python/platform")
    torch._dynamo.reset()

    def step_and_read(params, grads, extras, buffers, steps):
        ops.sgd_(params, grads, extras, buffers, steps, [0, 1, 2], None, 0.25, 8, 77, 0.9, 0.0, 1e-2, True, False)
        return [ops.master_weight(p, e, 8) * 2 for p, e in zip(params, extras)]

    params, grads, extras, states, steps, _ = step_inputs(torch.bfloat16, 8, torch.bfloat16, 1, seed=6)
    eager_args = copy.deepcopy((params, grads, extras, states[0], steps))
    compiled_args = copy.deepcopy(eager_args)
    expected = step_and_read(*eager_args)
    got = torch.compile(step_and_read, fullgraph=True)(*compiled_args)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    for name, xs, ys in zip(("params", "grads", "extras", "buffers", "steps"), eager_args, compiled_args):
        for x, y in zip(xs, ys):
            assert x.dtype == y.dtype and torch.equal(bits(x), bits(y)), name
    assert not torch.equal(eager_args[0][0], params[0]), "the step must have changed the weights"
