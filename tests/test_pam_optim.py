"""``arithmetic="pam"`` on the fused optimizers against the reference's PAM optimizers.

Given the same gradient stream, the fused optimizer with 16 extra bits and float32 states holds,
bit for bit, the reference's float32 master after 200 steps: both evaluate the per-step scalars
in float32 in the same order and every per-element multiply, divide and sqrt with the same PA
operations (Kosson & Jaggi 2023). Modes with fewer bits or bfloat16 states add stochastic
rounding noise and are held to helpers.MASTER_RTOL, like the IEEE path.
"""

from __future__ import annotations

import pytest
import torch

import fusedwarm
from helpers import MASTER_RTOL, feed_same_grads, make_pair, mode_id, rel_err, seed_all

STEPS = 200
SHAPES = [(), (7,), (33, 17), (65, 257)]
EXACT_MODES = [(torch.float32, 16, torch.float32), (torch.bfloat16, 16, torch.float32)]
NOISY_MODES = [(torch.float16, 16, torch.float32), (torch.bfloat16, 8, torch.bfloat16),
               (torch.bfloat16, 0, torch.bfloat16)]
VARIANTS = {
    "AdamW": dict(),
    "SGD": dict(momentum=0.0, nesterov=False),
    "SGD-momentum": dict(momentum=0.9, dampening=0.5, nesterov=False),
    "SGD-nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True),
    "Lion": dict(),
}


def _run(variant: str, mode, steps: int = STEPS, **overrides):
    name = variant.split("-")[0]
    dtype, extra_bits, state_dtype = mode
    seed_all("pam-optim", variant, mode)
    fused, fp, ref, rp = make_pair(name, dtype, SHAPES, extra_bits, state_dtype, arithmetic="pam",
                                   **{**VARIANTS[variant], **overrides})
    feed_same_grads([(fused, fp), (ref, rp)], steps)
    return fused, fp, ref, rp


@pytest.mark.parametrize("mode", EXACT_MODES, ids=mode_id)
@pytest.mark.parametrize("variant", VARIANTS)
def test_pam_matches_reference_bit_for_bit(variant, mode):
    fused, fp, ref, rp = _run(variant, mode, maximize=variant == "Lion")
    for p, q in zip(fp, rp):
        master, expected = fused.master_weight(p), ref.master_weight(q)
        assert torch.equal(master.view(torch.int32), expected.view(torch.int32)), rel_err(master, expected)


@pytest.mark.parametrize("mode", NOISY_MODES, ids=mode_id)
@pytest.mark.parametrize("variant", ("AdamW", "SGD-nesterov", "Lion"))
def test_pam_with_rounding_stays_within_tolerance(variant, mode):
    fused, fp, ref, rp = _run(variant, mode)
    # MASTER_RTOL's measure: over all tensors together (the 0-d scalar can pass near zero).
    fused_master = torch.cat([fused.master_weight(p).flatten() for p in fp])
    ref_master = torch.cat([ref.master_weight(q).flatten() for q in rp])
    assert rel_err(fused_master, ref_master) <= MASTER_RTOL[mode]


def test_pam_differs_from_ieee_and_is_stored_in_groups():
    seed_all("pam-vs-ieee")
    init = torch.randn(300)
    pams = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [fusedwarm.AdamW([pams[0]], arithmetic="pam"), fusedwarm.AdamW([pams[1]])]
    assert opts[0].param_groups[0]["arithmetic"] == "pam" and opts[1].param_groups[0]["arithmetic"] == "ieee"
    feed_same_grads(list(zip(opts, [[p] for p in pams])), 5)
    assert not torch.equal(pams[0], pams[1])
    # Close all the same: each PA operation is within 1/8 of the exact one.
    assert rel_err(pams[0] - init, pams[1] - init) < 0.3


def test_pam_float16_decode_is_exact():
    """A zero-size step re-stores every float16 weight, subnormals included, unchanged: the
    multiply-free rebias of float16 values (pam_scale_pow2) is exact."""
    bits = torch.arange(0, 0x7C00, dtype=torch.int32)
    # -0 is left out: -0 - (+0) is +0 in IEEE arithmetic, whatever the policy.
    bits = torch.cat([bits, bits[1:] | 0x8000]).to(torch.int16)
    p = torch.nn.Parameter(bits.view(torch.float16).clone())
    opt = fusedwarm.SGD([p], lr=0.0, arithmetic="pam", extra_bits=16, state_dtype=torch.float32)
    p.grad = torch.randn(p.shape).to(torch.float16)
    opt.step()
    assert torch.equal(p.detach().view(torch.int16), bits)


@pytest.mark.parametrize("name", ("AdamW", "SGD", "Lion"))
def test_invalid_arithmetic_is_rejected(name):
    with pytest.raises(ValueError, match="Invalid arithmetic: 'fast'"):
        getattr(fusedwarm, name)([torch.nn.Parameter(torch.randn(3))], arithmetic="fast")
    with pytest.raises(ValueError, match="Invalid arithmetic"):
        getattr(fusedwarm.reference, name)([torch.nn.Parameter(torch.randn(3))], arithmetic="fast")
    opt = getattr(fusedwarm, name)([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="Invalid arithmetic"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "arithmetic": "PAM"})


def test_op_rejects_unknown_arithmetic():
    p = torch.randn(4)
    with pytest.raises(RuntimeError, match="arithmetic must be 'ieee' or 'pam', got 'x'"):
        fusedwarm._ops.load().sgd_([p], [torch.randn(4)], [], [], [torch.ones((), dtype=torch.int64)], [0], None,
                                   0.1, 0, 1, 0.0, 0.0, 0.0, False, False, "x")


@pytest.mark.parametrize("mode", EXACT_MODES + NOISY_MODES, ids=mode_id)
def test_pam_cuda_matches_cpu(mode, gpu):
    dtype, extra_bits, state_dtype = mode
    seed_all("pam-cuda-optim", mode)
    init = [torch.randn(s) for s in SHAPES]
    gen = torch.Generator().manual_seed(3)
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in range(20)]
    runs = []
    for device, context in gpu.sides(sms=2, blocks_per_sm=1, order="shuffle"):
        params = [torch.nn.Parameter(t.to(device=device, dtype=dtype, copy=True)) for t in init]
        opt = fusedwarm.AdamW(params, extra_bits=extra_bits, state_dtype=state_dtype, seed=7, arithmetic="pam")
        with context:
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.to(device=p.device, dtype=p.dtype)
                opt.step()
        runs.append((opt, params))
    for (p, q) in zip(runs[0][1], runs[1][1]):
        assert torch.equal(runs[0][0].master_weight(p), runs[1][0].master_weight(q).cpu())
