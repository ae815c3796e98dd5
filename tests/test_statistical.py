"""Stochastic rounding is unbiased where it must be (DESIGN.md, "Rounding is unbiased").

With no extra bits the weight is written with stochastic rounding (SR), and bfloat16 states
always are: an update far below one ulp still moves the value in expectation, and an EMA with
beta2 = 0.999 does not stall. The bounds below come from the SR variance, computed from the
actual updates: rounding x, which lies a fraction phi of the way from its lower neighbour to the
upper one (spacing U), gives the upper one with probability phi, so the error has mean 0 and
variance U^2 phi (1 - phi); errors of different steps and elements are independent.
"""

from __future__ import annotations

import pytest
import torch

import fusedwarm
from fusedwarm import reference
from helpers import MASTER_RTOL, SIGMAS, V_RTOL, rel_err, seed_all

BF16_ULP = 2.0**-7  # bfloat16 spacing in [1, 2)


def master_ulp(dtype: torch.dtype, extra_bits: int) -> float:
    """Spacing of the master weight in [1, 2): the weight's mantissa plus the extra bits (capped at fp32's)."""
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    return 2.0 ** -min(mantissa + extra_bits, 23)


def sr_variance(x: torch.Tensor, ulp: float) -> torch.Tensor:
    """Variance of stochastically rounding x (float64) to the grid of spacing ulp."""
    phi = torch.frac(x / ulp).abs()
    return ulp**2 * phi * (1 - phi)


def test_sub_ulp_sgd_drift_tracks_reference():
    """SGD on bfloat16 weights in [1, 2) with lr * grad ~ 1e-3 ulp and gradients of one sign.

    Round-to-nearest (torch.optim.SGD on bfloat16 weights) never moves; fusedwarm with no extra
    bits follows the float32 reference's drift (about one ulp after 1000 steps) in the mean over
    elements, within SIGMAS standard errors of the SR noise, and its mean squared error is that
    noise (rms about one ulp per element); with 8 extra bits the same holds with a 2^-15 grid
    (rms about 0.05 ulp), and with 16 the master is the reference's.
    """
    seed_all("sub-ulp-drift")
    n, steps = 1 << 14, 1000
    lr = BF16_ULP * 1e-3
    init = (1.25 + 0.5 * torch.rand(n)).to(torch.bfloat16)

    fused = {}
    for k in (0, 8, 16):
        p = torch.nn.Parameter(init.clone())
        fused[k] = (p, fusedwarm.SGD([p], lr=lr, extra_bits=k, seed=10 + k))
    ref_param = torch.nn.Parameter(init.clone())
    ref = reference.SGD([ref_param], lr=lr)
    rtn_param = torch.nn.Parameter(init.clone())
    rtn = torch.optim.SGD([rtn_param], lr=lr)
    opts = [*fused.values(), (ref_param, ref), (rtn_param, rtn)]

    # Expected SR variance per element: the master sits on its grid before each step, so the
    # value to round is master - u with u = lr * g in float32 (the kernel's product).
    variance = {k: torch.zeros(n, dtype=torch.float64) for k in (0, 8)}
    lr32 = torch.tensor(lr, dtype=torch.float32)
    for _ in range(steps):
        g = (0.5 + torch.rand(n)).to(torch.bfloat16)  # fresh, always positive
        for p, opt in opts:
            p.grad = g.clone()
            opt.step()
        u = (lr32 * g.float()).double()
        for k in variance:
            variance[k] += sr_variance(u, master_ulp(torch.bfloat16, k))

    assert torch.equal(rtn_param.detach(), init), "round-to-nearest bfloat16 SGD moved: the test premise fails"
    ref_master = ref.master_weight(ref_param).double()
    drift = (init.double() - ref_master).mean()
    assert drift > 0.5 * BF16_ULP  # the reference really moved, by about one ulp
    for k, (p, opt) in fused.items():
        master = opt.master_weight(p).double()
        assert ((master >= 1) & (master < 2)).all()  # one binade: the ulp above holds
        err = master - ref_master
        if k == 16:
            assert rel_err(master, ref_master) <= MASTER_RTOL[(torch.bfloat16, 16, torch.float32)]
            continue
        v = variance[k]
        se_mean = float(v.sum().sqrt() / n)
        assert abs(float(err.mean())) <= SIGMAS * se_mean, (k, float(err.mean()) / BF16_ULP, se_mean / BF16_ULP)
        # The noise is SR's and no more: mean squared error = mean predicted variance.
        sq = err**2
        se_sq = float(sq.std() / n**0.5)
        assert abs(float(sq.mean() - v.mean())) <= SIGMAS * se_sq, (k, float(sq.mean()), float(v.mean()))


# Fractions of a master ulp to move by: halfway (a weight exactly between two neighbours), and
# others, all multiples of 2^-5 so that w - q ulp is exact in float32 for every mode.
FRACTIONS = (1 / 2, 1 / 4, 3 / 4, 1 / 32, 31 / 32, 11 / 32)


@pytest.mark.parametrize(
    "dtype, extra_bits",
    [(torch.bfloat16, 0), (torch.bfloat16, 8), (torch.float16, 0), (torch.float16, 8)],
    ids=["bf16-x0", "bf16-x8", "f16-x0", "f16-x8"],
)
def test_weight_rounding_is_unbiased(dtype, extra_bits):
    """One SGD step moves each master w (on its grid, |w| in [1, 2), both signs) by q ulp, q in
    FRACTIONS: it lands on one of the two neighbours of w - q ulp, the upper one with probability
    equal to the fraction, which the counts match within SIGMAS binomial standard errors."""
    seed_all("unbiased-weight", dtype, extra_bits)
    ulp = master_ulp(dtype, extra_bits)
    per_fraction = 1 << 15
    weight_ulp = master_ulp(dtype, 0)
    n = per_fraction * len(FRACTIONS)
    w = (1 + weight_ulp * torch.randint(1, int(1 / weight_ulp) - 1, (n,))) * torch.where(torch.rand(n) < 0.5, -1, 1)
    q = torch.tensor(FRACTIONS).repeat_interleave(per_fraction)
    g = q * torch.where(torch.rand(n) < 0.5, -1, 1)
    p = torch.nn.Parameter(w.to(dtype))
    assert torch.equal(p.detach().float(), w) and torch.equal(g.to(dtype).float(), g)
    opt = fusedwarm.SGD([p], lr=ulp, extra_bits=extra_bits, seed=99)
    p.grad = g.to(dtype)
    opt.step()

    x = w.double() - ulp * g.double()  # exact target
    lower = torch.floor(x / ulp) * ulp
    result = opt.master_weight(p).double()
    upper = result == lower + ulp
    assert (upper | (result == lower)).all(), "a result is not one of the two neighbours of its target"
    prob = (x - lower) / ulp
    # Grouped by sign too: rounding works on magnitudes, so a bias would have opposite signs for
    # positive and negative values and cancel in a mixed group.
    for fraction in FRACTIONS:
        for positive in (True, False):
            sel = (q == fraction) & ((x > 0) == positive)
            expected = float(prob[sel].sum())
            sd = float((prob[sel] * (1 - prob[sel])).sum().sqrt())
            observed = float(upper[sel].sum())
            count = int(sel.sum())
            assert abs(observed - expected) <= SIGMAS * sd, (fraction, positive, observed / count, expected / count)
    # Unbiased in magnitude over everything.
    bias = (result.abs() - x.abs()).sum()
    assert abs(float(bias)) <= SIGMAS * float(sr_variance(x, ulp).sum().sqrt())


def test_bf16_state_rounding_is_unbiased():
    """A bfloat16 momentum buffer is the stochastic rounding of its float32 update.

    SGD momentum, step 1 sets buf = g (exact), step 2 computes buf' = 0.9 buf + g2 in float32 as
    the kernel does; the stored bfloat16 is one of buf''s two neighbours, unbiased in the mean.
    """
    seed_all("unbiased-state")
    n = 1 << 17
    p = torch.nn.Parameter(torch.randn(n).to(torch.bfloat16))
    opt = fusedwarm.SGD([p], lr=1e-3, momentum=0.9, extra_bits=16, state_dtype=torch.bfloat16, seed=4)
    g1, g2 = torch.randn(n).to(torch.bfloat16), torch.randn(n).to(torch.bfloat16)
    p.grad = g1
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert torch.equal(buf, g1)
    exact = torch.tensor(0.9, dtype=torch.float32) * buf.float() + g2.float()
    p.grad = g2
    opt.step()
    stored = opt.state[p]["momentum_buffer"].float()
    # The bfloat16 neighbours of `exact`: its truncation (toward zero) and the next one out.
    toward = (exact.view(torch.int32) & -65536).view(torch.float32)
    outward = torch.where(exact < 0, -torch.inf, torch.inf).to(torch.bfloat16)
    away = torch.nextafter(toward.to(torch.bfloat16), outward).float()
    assert ((stored == toward) | (stored == away)).all()
    spacing = (away.double() - toward.double()).abs()
    phi = (exact.double() - toward.double()).abs() / spacing
    variance = spacing**2 * phi * (1 - phi)
    # In magnitude: a rounding bias would have opposite signs for positive and negative values.
    bias = (stored.double().abs() - exact.double().abs()).sum()
    assert abs(float(bias)) <= SIGMAS * float(variance.sum().sqrt())
    # The rounding is really stochastic: both neighbours occur where the target is between them.
    between = (phi > 0.25) & (phi < 0.75)
    assert (stored[between] == away[between]).float().mean() > 0.3
    assert (stored[between] == toward[between]).float().mean() > 0.3


@pytest.mark.parametrize("extra_bits", [0, 16])
def test_adamw_bf16_second_moment_does_not_stall(extra_bits):
    """AdamW, beta2 = 0.999, bfloat16 states, 2000 steps of fresh random gradients.

    The bfloat16 v stays within V_RTOL of the float32 reference's v (mean over elements of
    |v / v_ref - 1|), with a mean ratio within SIGMAS standard errors of 1 (SR is unbiased, and
    this EMA is linear in its stored value). Round-to-nearest bfloat16 v, emulated in torch, is
    off by several times V_RTOL: its small increments (1 - beta2) (g^2 - v) fall below half an
    ulp and are lost, which is what stochastic rounding prevents.
    """
    seed_all("adamw-v", extra_bits)
    n, steps, betas = 8192, 2000, (0.9, 0.999)
    init = torch.randn(n).to(torch.bfloat16)
    p = torch.nn.Parameter(init.clone())
    opt = fusedwarm.AdamW([p], lr=1e-3, betas=betas, weight_decay=0.0, extra_bits=extra_bits,
                          state_dtype=torch.bfloat16, seed=21)
    q = torch.nn.Parameter(init.clone())
    ref = reference.AdamW([q], lr=1e-3, betas=betas, weight_decay=0.0)
    v_nearest = torch.zeros(n, dtype=torch.bfloat16)
    for _ in range(steps):
        g = torch.randn(n).to(torch.bfloat16)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        v_nearest = (betas[1] * v_nearest.float() + (1 - betas[1]) * g.float() ** 2).to(torch.bfloat16)
    v_ref = ref.state[q]["exp_avg_sq"].double()
    ratio = opt.state[p]["exp_avg_sq"].double() / v_ref
    assert float((ratio - 1).abs().mean()) <= V_RTOL
    assert abs(float(ratio.mean()) - 1) <= SIGMAS * float(ratio.std()) / n**0.5
    nearest_err = float((v_nearest.double() / v_ref - 1).abs().mean())
    assert nearest_err > 2 * V_RTOL, f"round-to-nearest bf16 v is off by only {nearest_err:.3f}: the test shows nothing"
