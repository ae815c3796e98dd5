"""Fused optimizers against the float32 reference, given the same gradient stream.

DESIGN.md, "Extra bits are exact": with 16 extra bits and float32 states the master weight *is*
the reference's float32 master (up to float32 rounding-order differences); with fewer bits or
bfloat16 states it stays within the per-mode tolerance MASTER_RTOL. In every mode the weight the
model sees is the round-to-nearest (ties away from zero) of the master.
"""

from __future__ import annotations

import pytest
import torch

import fusedwarm
from fusedwarm import reference
from helpers import (
    HYPER,
    MASTER_RTOL,
    MODES,
    OPTIMIZERS,
    feed_same_grads,
    make_pair,
    mode_id,
    rel_err,
    round_nearest_away,
    seed_all,
)

STEPS = 200
ROUNDING_CHECK_EVERY = 50

# A 0-d scalar, a one-element tensor, odd element counts, and one tensor larger than the CPU
# backend's parallel grain (16384 elements), so that several chunks update one tensor.
SHAPES = [(), (1,), (7,), (33, 17), (3, 5, 11), (65, 257)]

SGD_VARIANTS = {
    "plain": dict(momentum=0.0, nesterov=False),
    "momentum-dampening": dict(momentum=0.9, dampening=0.5, nesterov=False),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True),
}

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(_INT_VIEW[t.dtype])


def assert_states_equal(a: dict, b: dict) -> None:
    """Two optimizer states hold the same tensors, bit for bit and dtype for dtype."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), f"state '{key}' differs"


def assert_visible_is_rounded_master(opt, params, extra_bits: int) -> None:
    """Each weight is, bit for bit, its master rounded to nearest with ties away from zero.

    Ties (a master exactly halfway between two representable weights, about one element in 2^16
    with 16 extra bits) are where fusedwarm and torch's ties-to-even cast differ; the expected
    weight is computed exactly by round_nearest_away rather than tolerated.
    """
    for p in params:
        master = opt.master_weight(p)
        if p.dtype == torch.float32 or extra_bits == 0:
            # No extra bits: the weight is its own master.
            assert torch.equal(_bits(master), _bits(p.float()))
            continue
        expected = round_nearest_away(master, p.dtype)
        mismatch = _bits(p) != _bits(expected)
        assert not mismatch.any(), (
            f"{int(mismatch.sum())} weights of shape {tuple(p.shape)} are not the rounded master, e.g. "
            f"weight {p.detach()[mismatch][:3].tolist()} vs master {master[mismatch][:3].tolist()}"
        )


def check_against_reference(name: str, mode, **overrides) -> None:
    """Runs the fused optimizer and its reference for STEPS steps; checks masters and rounding.

    The error is MASTER_RTOL's measure over all the tensors together: max |fused - reference|
    over every element, relative to the largest reference weight. (Per tensor it would be
    meaningless for the 0-d scalar, whose value can pass near zero.)
    """
    dtype, extra_bits, state_dtype = mode
    fused, fused_params, ref, ref_params = make_pair(
        name, dtype, SHAPES, extra_bits=extra_bits, state_dtype=state_dtype, seed=1234, **overrides
    )
    for _ in range(STEPS // ROUNDING_CHECK_EVERY):
        feed_same_grads([(fused, fused_params), (ref, ref_params)], ROUNDING_CHECK_EVERY)
        assert_visible_is_rounded_master(fused, fused_params, extra_bits)
    fused_master = torch.cat([fused.master_weight(p).flatten() for p in fused_params])
    ref_master = torch.cat([ref.master_weight(q).flatten() for q in ref_params])
    err = rel_err(fused_master, ref_master)
    assert err <= MASTER_RTOL[mode], f"{name} {mode_id(mode)} {overrides}: master rel. error {err:.3g}"


def test_round_nearest_away_helper():
    """The expected-rounding helper itself: ties go away from zero, everything else as torch."""
    ulp = 2.0**-7  # bfloat16 spacing in [1, 2)
    x = torch.tensor([1 + ulp / 2, -(1 + ulp / 2), 1 + 3 * ulp / 2, 1 + ulp / 4, 1 + 3 * ulp / 4, 0.0, -0.0])
    expected = torch.tensor([1 + ulp, -(1 + ulp), 1 + 2 * ulp, 1.0, 1 + ulp, 0.0, -0.0], dtype=torch.bfloat16)
    assert torch.equal(_bits(round_nearest_away(x, torch.bfloat16)), _bits(expected))
    # Cross-check with the bit formula of bits.cuh for bfloat16, top = (|x| + 2^15) >> 16, on
    # random patterns with forced ties (low 16 bits exactly 0x8000) mixed in.
    seed_all("round-helper")
    raw = torch.randint(-(2**31), 2**31, (1 << 16,), dtype=torch.int64)
    raw[::4] = (raw[::4] & ~0xFFFF) | 0x8000
    raw = raw[(raw & 0x7F800000) != 0x7F800000]  # finite values only
    x = raw.to(torch.int32).view(torch.float32)
    magnitude = raw & 0x7FFFFFFF
    top = ((magnitude + 0x8000) >> 16) | ((raw >> 16) & 0x8000)
    formula = torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16).view(torch.bfloat16)
    assert torch.equal(_bits(round_nearest_away(x, torch.bfloat16)), _bits(formula))
    # float16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
    half = torch.tensor([1 + 2.0**-11, -(1 + 2.0**-11)])
    assert round_nearest_away(half, torch.float16).tolist() == [1 + 2.0**-10, -(1 + 2.0**-10)]


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_master_matches_reference(name, mode):
    """200 steps of fresh random gradients: master within MASTER_RTOL (1e-6 with 16 extra bits and fp32 states)."""
    seed_all("master", name, mode_id(mode))
    check_against_reference(name, mode)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_sgd_variants_match_reference(variant, mode):
    """SGD without momentum, with momentum and dampening, and Nesterov: master within MASTER_RTOL."""
    seed_all("sgd", variant, mode_id(mode))
    check_against_reference("SGD", mode, **SGD_VARIANTS[variant])


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_maximize_matches_reference(name, mode):
    """maximize=True against the reference's maximize=True: master within MASTER_RTOL."""
    seed_all("maximize", name, mode_id(mode))
    check_against_reference(name, mode, maximize=True)


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_maximize_is_minimizing_negated_gradient(name, mode):
    """maximize=True on g is bit for bit maximize=False on -g (same seed, so same rounding bits),
    and differs from maximize=False on g."""
    dtype, extra_bits, state_dtype = mode
    seed_all("maximize-negated", name, mode_id(mode))
    init = [torch.randn(s).to(dtype) for s in SHAPES]
    runs = []
    for maximize, grad_sign in ((True, 1.0), (False, -1.0), (False, 1.0)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = getattr(fusedwarm, name)(params, extra_bits=extra_bits, state_dtype=state_dtype, seed=7,
                                       maximize=maximize, **HYPER[name])
        runs.append((opt, params, grad_sign))
    for _ in range(20):
        grads = [torch.randn(s).to(dtype) for s in SHAPES]
        for opt, params, grad_sign in runs:
            for p, g in zip(params, grads):
                p.grad = g * grad_sign
            opt.step()
    (opt_max, max_params, _), (opt_neg, neg_params, _), (_, min_params, _) = runs
    for p_max, p_neg, p_min in zip(max_params, neg_params, min_params):
        assert torch.equal(_bits(p_max), _bits(p_neg))
        assert_states_equal(opt_max.state[p_max], opt_neg.state[p_neg])
    assert not torch.equal(max_params[-1], min_params[-1])


@pytest.mark.parametrize("mode", MODES, ids=mode_id)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tensor_lr_is_bit_identical_to_float_lr(name, mode):
    """lr as a one-element tensor (float32 or float64, shape () or (1,)), also changed in place
    between steps as a schedule would, gives exactly the bits of the same float lr."""
    dtype, extra_bits, state_dtype = mode
    seed_all("tensor-lr", name, mode_id(mode))
    hyper = dict(HYPER[name])
    lr = hyper.pop("lr") * 1.37  # not a power of two, not exactly representable in float32
    init = [torch.randn(s).to(dtype) for s in SHAPES]
    lr_tensors = [torch.tensor(lr), torch.tensor([lr], dtype=torch.float64)]
    runs = []
    for lr_arg in [lr, *lr_tensors]:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = getattr(fusedwarm, name)(params, lr=lr_arg, extra_bits=extra_bits, state_dtype=state_dtype, seed=3,
                                       **hyper)
        runs.append((opt, params))
    for step in range(30):
        if step == 15:
            runs[0][0].param_groups[0]["lr"] = lr / 3
            for t in lr_tensors:
                t.fill_(lr / 3)
        grads = [torch.randn(s).to(dtype) for s in SHAPES]
        for opt, params in runs:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    float_opt, float_params = runs[0]
    for opt, params in runs[1:]:
        for p, q in zip(float_params, params):
            assert torch.equal(_bits(p), _bits(q))
            assert_states_equal(float_opt.state[p], opt.state[q])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("extra_bits", [16, 8], ids=["x16", "x8"])
def test_ties_round_away_from_zero(dtype, extra_bits):
    """A master exactly halfway between two weights shows the neighbour away from zero.

    SGD with lr = 1 moves w in [1, 2) by exactly half a weight ulp (representable in the master
    with 8 or 16 extra bits), so the master is a tie; round-to-nearest-even would keep w on every
    other element.
    """
    seed_all("ties", dtype, extra_bits)
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    n = 4097
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
    w = sign * (1 + torch.randint(0, int(1 / ulp) - 1, (n,)) * ulp)
    p = torch.nn.Parameter(w.to(dtype))
    opt = fusedwarm.SGD([p], lr=1.0, extra_bits=extra_bits, seed=5)
    p.grad = (-sign * ulp / 2).to(dtype)
    opt.step()
    tie = w + sign * ulp / 2
    assert torch.equal(opt.master_weight(p), tie)
    expected = w + sign * ulp
    assert torch.equal(p.detach(), expected.to(dtype))
    assert not torch.equal(tie.to(dtype), expected.to(dtype))  # ties-to-even would differ
    assert_visible_is_rounded_master(opt, [p], extra_bits)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_reference_matches_torch_optim(name):
    """The reference is the anchor: on float32 weights, without warmup, it is torch.optim's update."""
    seed_all("torch", name)
    variants = [dict(maximize=False), dict(maximize=True)]
    if name == "SGD":
        variants += [dict(v, maximize=False) for v in SGD_VARIANTS.values()]
    for overrides in variants:
        kw = {**HYPER[name], **overrides}
        init = [torch.randn(s) for s in SHAPES]
        ref_params = [torch.nn.Parameter(t.clone()) for t in init]
        torch_params = [torch.nn.Parameter(t.clone()) for t in init]
        ref = getattr(reference, name)(ref_params, warmup="none", **kw)
        torch_opt = getattr(torch.optim, name)(torch_params, foreach=False, **kw)
        feed_same_grads([(ref, ref_params), (torch_opt, torch_params)], STEPS)
        for p, q in zip(ref_params, torch_params):
            assert rel_err(p, q) <= MASTER_RTOL[(torch.float32, 16, torch.float32)], overrides


def test_lion_sign_near_zero_matches_reference():
    """Lion steps by lr * sign(c), c = b1 m + (1 - b1) g: where c is within rounding of zero, any
    difference from the reference in how c is computed becomes a full 2 lr difference in the
    weight, far above the 1e-6 acceptance. The second gradient is chosen to make c ~ 0."""
    seed_all("lion-near-zero")
    betas = (0.9, 0.99)
    n = 4096
    init = torch.randn(n)
    fused_param, ref_param = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    fused = fusedwarm.Lion([fused_param], lr=1e-4, betas=betas, extra_bits=16, state_dtype=torch.float32, seed=1)
    ref = reference.Lion([ref_param], lr=1e-4, betas=betas)
    g1 = torch.randn(n)
    fused_param.grad, ref_param.grad = g1.clone(), g1.clone()
    fused.step()
    ref.step()
    g2 = -betas[0] * ref.state[ref_param]["exp_avg"] / (1 - betas[0])
    fused_param.grad, ref_param.grad = g2.clone(), g2.clone()
    fused.step()
    ref.step()
    err = rel_err(fused.master_weight(fused_param), ref.master_weight(ref_param))
    assert err <= MASTER_RTOL[(torch.float32, 16, torch.float32)], f"master rel. error {err:.3g}"
