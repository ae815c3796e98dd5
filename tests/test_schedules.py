"""Warmup and learning-rate schedules computed in the fused update from the step counter.

The fused factors (csrc/include/fusedwarm/schedule.cuh, float32, exp and cos built from IEEE
operations) are checked against libm and against the independently written float64 formulas of
fusedwarm.reference, at the boundaries of every warmup and cooldown; fused optimizers are run
against the reference for thousands of steps, resumed from a state dict mid-warmup and
mid-cooldown, and stepped inside backward.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import fusedwarm
from fusedwarm import _ops, reference, schedules
from helpers import HYPER, feed_same_grads, make_pair, rel_err, seed_all

# The float32 factors against the float64 formulas: a few float32 ulp of a factor <= 1.
FACTOR_ATOL = 4e-7
# exp and cos(pi u) of schedule.cuh against libm (float64): max error in float32 ulp / absolute.
EXP_ULP = 2.0
COSPI_ATOL = 2e-7
# Long runs (LONG_STEPS) against the reference with an exact float32 master (16 extra bits, float32
# states): float32 rounding-order differences only, which grow with the number of steps.
LONG_STEPS = 3000
LONG_RTOL = 1e-5

BETA2 = 0.95  # short untuned warmups: 2 / (1 - beta2) = 40 updates


def _factors(steps, beta2=BETA2, **kw) -> torch.Tensor:
    return _ops.load().schedule_factors(torch.as_tensor(steps, dtype=torch.int64), beta2, **kw)


def _reference_factor(t: int, warmup="none", beta2=BETA2, warmup_steps=None, warmup_start=0.0, schedule=None):
    w, _ = reference.warmup_factor(warmup, t, beta2, warmup_steps, warmup_start)
    return w * reference.schedule_factor(schedule, t)


# ---- layer-1 math ------------------------------------------------------------------------------


def test_exp_matches_libm_within_ulps():
    seed_all("exp")
    x = torch.cat([-torch.rand(200_000) * 87, torch.tensor([0.0, -1e-30, -1e-7, -0.5, -1.0, -80.0, -87.0])])
    got = _ops.load().schedule_math(x, "exp_neg").double()
    want = torch.exp(x.double())
    ulp = (torch.nextafter(want.float(), torch.tensor(math.inf)).double() - want.float().double())
    err = ((got - want).abs() / ulp).max().item()
    assert err <= EXP_ULP, f"exp error {err:.2f} ulp"
    assert _ops.load().schedule_math(torch.tensor([0.0, -100.0]), "exp_neg").tolist() == [1.0, 0.0]


def test_cospi_matches_libm():
    seed_all("cospi")
    u = torch.cat([torch.rand(200_000), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1e-8, 1 - 2**-24])])
    got = _ops.load().schedule_math(u, "cospi").double()
    err = (got - torch.cos(math.pi * u.double())).abs().max().item()
    assert err <= COSPI_ATOL, f"cospi error {err:.3g}"
    assert _ops.load().schedule_math(torch.tensor([0.0, 0.5, 1.0]), "cospi").tolist() == [1.0, 0.0, -1.0]


# ---- factors at the boundaries -----------------------------------------------------------------

WSD = schedules.WSD(total_steps=400, decay_fraction=0.25, shape="1-sqrt", final_fraction=0.1).to_dict()
CASES = {
    "untuned": dict(warmup="untuned"),
    "untuned-exp": dict(warmup="untuned-exp"),
    "linear": dict(warmup="linear", warmup_steps=30, warmup_start=0.2),
    "radam": dict(warmup="radam"),
    "cosine": dict(schedule=schedules.Cosine(300, final_fraction=0.05).to_dict()),
    "wsd-1-sqrt": dict(warmup="untuned", schedule=WSD),
    "wsd-linear": dict(schedule=schedules.WSD(400, 0.25, "linear").to_dict()),
    "wsd-cosine": dict(warmup="linear", warmup_steps=10, schedule=schedules.WSD(400, 0.5, "cosine", 0.3).to_dict()),
}
# Step 0 (before any update: counts as 1), 1, around the warmups' ends (40, 30, 10), around the
# cooldowns' starts (300, 200) and ends (400, 300), far past them.
BOUNDARY_STEPS = [0, 1, 2, 5, 6, 9, 10, 11, 29, 30, 31, 39, 40, 41, 150, 199, 200, 201, 299, 300, 301, 350, 399,
                  400, 401, 10_000, 10**9]


def _op_kwargs(case: dict) -> dict:
    kw = {k: v for k, v in case.items() if k != "schedule"}
    return {**kw, **schedules.from_dict(case.get("schedule", {"name": "constant"})).op_args()}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_factors_match_closed_forms_at_boundaries(case):
    got = _factors(BOUNDARY_STEPS, **_op_kwargs(case))
    for t, row in zip(BOUNDARY_STEPS, got.tolist()):
        want = _reference_factor(max(t, 1), **case)
        assert row[2] == pytest.approx(want, abs=FACTOR_ATOL), f"step {t}: {row}"
        assert row[2] == row[0] * row[1]


def test_factors_hit_their_end_points_exactly():
    f = _factors([1, 39, 40, 41], warmup="untuned")[:, 0].tolist()
    assert f[0] == pytest.approx(1 / 40) and f[1] < 1.0 and f[2:] == [1.0, 1.0]
    f = _factors([1, 30, 31], warmup="linear", warmup_steps=30, warmup_start=0.2)[:, 0].tolist()
    assert f[0] == pytest.approx(0.2 + 0.8 / 30) and f[1:] == [1.0, 1.0]
    wsd = schedules.WSD(400, 0.25, "1-sqrt", 0.1).op_args()
    f = _factors([300, 301, 400, 401], **wsd)[:, 1].tolist()
    assert f[0] == 1.0 and f[1] < 1.0 and f[2:] == [pytest.approx(0.1), pytest.approx(0.1)]
    f = _factors([150, 300], **schedules.Cosine(300, 0.0).op_args())[:, 1].tolist()
    assert f == [pytest.approx(0.5, abs=FACTOR_ATOL), 0.0]


def test_radam_fallback_steps_and_rectification():
    """beta2 = 0.999: rho_t <= 5 for t <= 5 (momentum SGD), then r_t grows towards 1."""
    f = _factors(list(range(1, 8)) + [10**6], beta2=0.999, warmup="radam")
    assert f[:5, 3].tolist() == [0.0] * 5 and f[5:, 3].tolist() == [1.0] * 3
    assert f[:5, 0].tolist() == [1.0] * 5
    for t in (6, 7, 10**6):
        want, adaptive = reference.warmup_factor("radam", t, 0.999)
        assert adaptive and f[[6, 7, 10**6].index(t) + 5, 0].item() == pytest.approx(want, rel=1e-5)


# ---- long runs against the reference ------------------------------------------------------------

RUNS = {
    "adamw-untuned-wsd": ("AdamW", dict(warmup="untuned", schedule=schedules.WSD(LONG_STEPS, 0.2, "1-sqrt"))),
    "adamw-untuned-exp-cosine": ("AdamW", dict(warmup="untuned-exp", schedule=schedules.Cosine(LONG_STEPS, 0.1))),
    "adamw-linear-wsd-cosine": ("AdamW", dict(warmup="linear", warmup_steps=300, warmup_start=0.1,
                                              schedule=schedules.WSD(LONG_STEPS, 0.3, "cosine", 0.05))),
    "adamw-radam": ("AdamW", dict(warmup="radam", betas=(0.9, 0.999))),
    "adamw-v_init-grad-wsd-linear": ("AdamW", dict(v_init="grad", schedule=schedules.WSD(LONG_STEPS, 0.5, "linear"))),
    "sgd-linear-cosine": ("SGD", dict(warmup="linear", warmup_steps=100, schedule=schedules.Cosine(LONG_STEPS))),
    "lion-untuned-wsd": ("Lion", dict(schedule=schedules.WSD(LONG_STEPS, 0.2, "1-sqrt", 0.1))),
}


@pytest.mark.parametrize("name,kw", RUNS.values(), ids=RUNS.keys())
def test_long_run_matches_reference(name, kw):
    seed_all("long", name, repr(kw))
    fused, fp, ref, rp = make_pair(name, torch.bfloat16, [(7,), (5, 3)], 16, torch.float32, **kw)
    feed_same_grads([(fused, fp), (ref, rp)], LONG_STEPS)
    for p, q in zip(fp, rp):
        err = rel_err(fused.master_weight(p), ref.master_weight(q))
        assert err <= LONG_RTOL, f"master rel. error {err:.3g}"


def test_lr_scheduler_multiplies_on_top_of_the_schedule():
    """A torch.optim.lr_scheduler changes the group's lr; the built-in factors multiply it."""
    seed_all("lr-scheduler")
    fused, fp, ref, rp = make_pair("AdamW", torch.bfloat16, [(9,), (4, 4)], 16, torch.float32,
                                   schedule=schedules.WSD(300, 0.3, "cosine", 0.1))
    lambdas = [torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (1 + 0.01 * epoch)) for opt in (fused, ref)]
    for _ in range(300):
        feed_same_grads([(fused, fp), (ref, rp)], 1)
        for sched in lambdas:
            sched.step()
    for p, q in zip(fp, rp):
        err = rel_err(fused.master_weight(p), ref.master_weight(q))
        assert err <= LONG_RTOL, f"master rel. error {err:.3g}"


def test_reference_radam_is_torch_radam():
    """The reference's warmup='radam' (weight decay 0) is torch.optim.RAdam, fallback steps included."""
    seed_all("radam-torch")
    init = torch.randn(64)
    ours, theirs = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    ref = reference.AdamW([ours], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup="radam")
    torch_opt = torch.optim.RAdam([theirs], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, foreach=False)
    feed_same_grads([(ref, [ours]), (torch_opt, [theirs])], 200)
    assert rel_err(ours, theirs) <= 1e-6


# ---- defaults --------------------------------------------------------------------------------


def test_default_warmup_is_untuned_and_none_is_plain():
    """AdamW and Lion warm up by default (2 / (1 - beta2) updates); SGD's default is no warmup."""
    seed_all("defaults")
    for name, length in (("AdamW", 2 / (1 - HYPER["AdamW"]["betas"][1])), ("Lion", 2 / (1 - HYPER["Lion"]["betas"][1]))):
        opt = getattr(fusedwarm, name)([torch.nn.Parameter(torch.randn(3))], **HYPER[name])
        assert opt.param_groups[0]["warmup"] == "untuned"
        assert opt.last_factors()[0]["warmup"].item() == pytest.approx(1 / length)
    results = []
    for warmup in ("untuned", "none"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(50, dtype=torch.bfloat16))
        opt = fusedwarm.SGD([p], seed=1, warmup=warmup, **HYPER["SGD"])
        for _ in range(5):
            p.grad = torch.randn(50).to(torch.bfloat16)
            opt.step()
        results.append(opt.master_weight(p))
    assert torch.equal(results[0], results[1])


# ---- logging, checkpoints, backward step ------------------------------------------------------


def test_last_factors_are_what_the_update_used():
    seed_all("last-factors")
    p = torch.nn.Parameter(torch.randn(16))
    q = torch.nn.Parameter(torch.randn(16))
    sched = schedules.WSD(50, 0.4, "cosine", 0.2)
    opt = fusedwarm.AdamW([{"params": [p]}, {"params": [q], "lr": 3e-3, "warmup": "none"}], lr=1e-3,
                          betas=(0.9, 0.95), schedule=sched)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)
    for t in range(1, 46):
        p.grad, q.grad = torch.randn(16), torch.randn(16)
        opt.step()
        factors = opt.last_factors()
        for group, f in zip(opt.param_groups, factors):
            want = _reference_factor(t, warmup=group["warmup"], schedule=sched.to_dict())
            assert f["lr"].device == p.device and f["lr"].shape == ()
            assert f["warmup"].item() * f["schedule"].item() == pytest.approx(want, abs=FACTOR_ATOL)
            assert f["lr"].item() == pytest.approx(group["lr"] * want, rel=1e-6)
        lr_sched.step()


@pytest.mark.parametrize("resume_at", [20, 170], ids=["mid-warmup", "mid-cooldown"])
def test_state_dict_resume_is_bit_identical(resume_at):
    """Resuming through torch.save / torch.load(weights_only=True) continues the schedule exactly."""
    seed_all("resume", resume_at)
    init = torch.randn(40)
    grads = [torch.randn(40).to(torch.bfloat16) for _ in range(200)]

    def make(param):
        return fusedwarm.AdamW([param], lr=1e-2, betas=(0.9, 0.95), seed=3, warmup="untuned",
                               schedule=schedules.WSD(200, 0.3, "1-sqrt", 0.1))

    def run(opt, param, grads_):
        for g in grads_:
            param.grad = g.clone()
            opt.step()

    straight = torch.nn.Parameter(init.to(torch.bfloat16))
    opt = make(straight)
    run(opt, straight, grads)
    first = torch.nn.Parameter(init.to(torch.bfloat16))
    opt1 = make(first)
    run(opt1, first, grads[:resume_at])
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    resumed = torch.nn.Parameter(first.detach().clone())
    opt2 = fusedwarm.AdamW([resumed], lr=1e-2, betas=(0.9, 0.95), seed=3)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.param_groups[0]["schedule"] == schedules.WSD(200, 0.3, "1-sqrt", 0.1).to_dict()
    run(opt2, resumed, grads[resume_at:])
    assert torch.equal(opt2.master_weight(resumed), opt.master_weight(straight))


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_backward_step_with_schedule_is_bit_identical(name):
    seed_all("backward-schedule", name)
    x = torch.randn(12, 8)
    kw = dict(warmup="linear", warmup_steps=3, warmup_start=0.1, schedule=schedules.WSD(6, 0.5, "cosine", 0.1))
    runs = []
    for backward_step in (False, True):
        torch.manual_seed(1)
        layer = torch.nn.Linear(8, 4).to(torch.bfloat16)
        opt = getattr(fusedwarm, name)(layer.parameters(), seed=2, backward_step=backward_step,
                                       **{**HYPER[name], **kw})
        for _ in range(8):
            layer(x.to(torch.bfloat16)).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append([opt.master_weight(p) for p in layer.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kw,match", [
    ("AdamW", dict(warmup="cosine"), "Invalid warmup"),
    ("AdamW", dict(warmup="linear"), "warmup_steps"),
    ("AdamW", dict(warmup="linear", warmup_steps=0), "warmup_steps"),
    ("AdamW", dict(warmup="untuned", warmup_steps=10), "only used with warmup='linear'"),
    ("AdamW", dict(warmup="linear", warmup_steps=10, warmup_start=1.5), "warmup_start"),
    ("AdamW", dict(v_init="ones"), "v_init"),
    ("AdamW", dict(v_init="grad", warmup="radam"), "choose one"),
    ("AdamW", dict(warmup="radam", betas=(0.9, 0.5)), "beta2 > 0.6"),
    ("AdamW", dict(schedule="cosine"), "Invalid schedule"),
    ("AdamW", dict(schedule={"name": "wsd", "total_steps": 10, "decay_fraction": 2.0}), "decay_fraction"),
    ("SGD", dict(warmup="radam"), "SGD does not support warmup='radam'"),
    ("SGD", dict(warmup="untuned-exp"), "SGD does not support warmup='untuned-exp'"),
    ("Lion", dict(warmup="radam"), "Lion does not support warmup='radam'"),
])
def test_bad_options_raise(name, kw, match):
    with pytest.raises(ValueError, match=match):
        getattr(fusedwarm, name)([torch.nn.Parameter(torch.randn(3))], **kw)


@pytest.mark.parametrize("args,match", [
    (dict(total_steps=-1), "Invalid total_steps"),
    (dict(total_steps=10, decay_fraction=-0.1), "Invalid decay_fraction"),
    (dict(total_steps=10, shape="step"), "Invalid shape"),
    (dict(total_steps=10, final_fraction=1.1), "Invalid final_fraction"),
])
def test_bad_schedules_raise(args, match):
    with pytest.raises(ValueError, match=match):
        schedules.WSD(**args)


def test_bad_param_group_schedule_raises():
    opt = fusedwarm.AdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="Invalid total_steps"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "schedule": {"name": "cosine",
                                                                                          "total_steps": 0}})


@pytest.mark.parametrize("op,kw,match", [
    ("adamw_", dict(warmup="bogus"), "warmup must be"),
    ("adamw_", dict(decay_shape="step", total_steps=5, decay_steps=5), "decay_shape must be"),
    ("adamw_", dict(decay_shape="linear", total_steps=5, decay_steps=6), "decay_steps must be in"),
    ("adamw_", dict(total_steps=-3), "total_steps must be >= 0"),
    ("adamw_", dict(decay_shape="linear", total_steps=5, decay_steps=5, final_fraction=2.0), "final_fraction"),
    ("adamw_", dict(warmup="linear"), "warmup_steps > 0"),
    ("adamw_", dict(v_init="ones"), "v_init must be"),
    ("sgd_", dict(warmup="untuned"), "derives its length from beta2"),
    ("lion_", dict(warmup="radam"), "rectifies Adam's second moment"),
])
def test_op_rejects_bad_schedule_arguments(op, kw, match):
    p = torch.randn(4)
    common = dict(params=[p], grads=[torch.randn(4)], extras=[], steps=[torch.ones((), dtype=torch.int64)],
                  tensor_ids=[0], lr_tensor=None, lr=1e-3, extra_bits=16, seed=0)
    hyper = {
        "adamw_": dict(exp_avgs=[torch.zeros(4)], exp_avg_sqs=[torch.zeros(4)], beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=0.0, maximize=False),
        "sgd_": dict(momentum_buffers=[], momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False),
        "lion_": dict(exp_avgs=[torch.zeros(4)], beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False),
    }[op]
    before = p.clone()
    with pytest.raises(RuntimeError, match=match):
        getattr(_ops.load(), op)(**common, **hyper, **kw)
    assert torch.equal(p, before)


# ---- operator surface --------------------------------------------------------------------------


def test_schedule_ops_pass_opcheck():
    steps = torch.randint(0, 500, (3, 5))
    for op, args in [
        (_ops.load().schedule_factors.default, (steps, 0.99)),
        (_ops.load().schedule_math.default, (-torch.rand(17) * 50, "exp_neg")),
        (_ops.load().schedule_math.default, (torch.rand(17), "cospi")),
    ]:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    kw = dict(warmup="radam", **schedules.WSD(400, 0.5, "cosine", 0.1).op_args())
    result = torch.library.opcheck(_ops.load().schedule_factors.default, (steps, 0.99), kw)
    assert all(v == "SUCCESS" for v in result.values()), result
    assert _factors(steps, 0.99, **kw).shape == (3, 5, 4)


def test_step_op_with_schedule_passes_opcheck():
    seed_all("opcheck-schedule")
    n = 37
    args = ([torch.randn(n).bfloat16()], [torch.randn(n).bfloat16()], [torch.randint(-100, 100, (n,), dtype=torch.int16)],
            [torch.randn(n) * 0.1], [torch.rand(n) * 0.1], [torch.tensor(3)], [0], None, 1e-3, 16, 7, 0.9, 0.99,
            1e-8, 0.1, False)
    kw = dict(warmup="linear", warmup_steps=10, warmup_start=0.1, v_init="grad",
              **schedules.WSD(20, 0.5, "1-sqrt", 0.1).op_args())
    result = torch.library.opcheck(_ops.load().adamw_.default, args, kw)
    assert all(v == "SUCCESS" for v in result.values()), result


# ---- CUDA --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_cuda_factors_match_cpu_bit_for_bit(case, gpu):
    steps = torch.arange(0, 1200)
    cpu = _factors(steps, **_op_kwargs(case))
    with gpu.run(order="shuffle"):
        got = _factors(gpu.to(steps), **_op_kwargs(case))
    assert torch.equal(cpu.view(torch.int32), got.cpu().view(torch.int32))


CUDA_RUNS = {
    "adamw-radam-wsd": ("AdamW", dict(warmup="radam", betas=(0.9, 0.999), schedule=schedules.WSD(40, 0.5))),
    "adamw-v_init-untuned-exp-cosine": ("AdamW", dict(v_init="grad", warmup="untuned-exp",
                                                      schedule=schedules.Cosine(40, 0.1))),
    "sgd-linear-wsd-cosine": ("SGD", dict(warmup="linear", warmup_steps=7, schedule=schedules.WSD(40, 0.3, "cosine"))),
    "lion-untuned-wsd-linear": ("Lion", dict(schedule=schedules.WSD(40, 0.3, "linear", 0.2))),
}


@pytest.mark.parametrize("name,kw", CUDA_RUNS.values(), ids=CUDA_RUNS.keys())
def test_cuda_optimizer_with_schedule_matches_cpu(name, kw, gpu):
    seed_all("cuda-schedule", name, repr(kw))
    init = torch.randn(3000)
    grads = [torch.randn(3000).to(torch.bfloat16) for _ in range(45)]
    masters = []
    for device, context in gpu.sides(sms=1, blocks_per_sm=1):
        p = torch.nn.Parameter(init.to(device, torch.bfloat16, copy=True))
        opt = getattr(fusedwarm, name)([p], **{**HYPER[name], **kw, "seed": 9})
        with context:
            for g in grads:
                p.grad = g.to(device)
                opt.step()
        masters.append(opt.master_weight(p).cpu())
    assert torch.equal(masters[0].view(torch.int32), masters[1].view(torch.int32))


def test_cuda_last_factors_never_sync(gpu):
    gpu.require_hardware("torch.cuda.set_sync_debug_mode watches real device-to-host copies")
    p = torch.nn.Parameter(torch.randn(100, device="cuda"))
    opt = fusedwarm.AdamW([p], lr=torch.tensor(1e-3, device="cuda"), schedule=schedules.Cosine(100))
    p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        factors = opt.last_factors()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.is_cuda for t in factors[0].values())
    assert factors[0]["warmup"].item() == pytest.approx(1 / 2000)


@pytest.mark.parametrize("name", ["AdamW", "SGD", "Lion"])
def test_cuda_graph_replay_equals_eager(name, gpu):
    """A captured step (tensor lr, built-in warmup and WSD) replayed equals eager steps, bit for bit."""
    gpu.require_hardware("CUDA graphs capture and replay real streams")
    seed_all("graph", name)
    init = torch.randn(1000)
    grads = [torch.randn(1000).to(torch.bfloat16) for _ in range(30)]
    kw = {**HYPER[name], "lr": torch.tensor(HYPER[name]["lr"], device="cuda"), "warmup": "linear",
          "warmup_steps": 10, "schedule": schedules.WSD(25, 0.4, "1-sqrt", 0.1), "seed": 4}
    eager = torch.nn.Parameter(init.to("cuda", torch.bfloat16))
    opt_e = getattr(fusedwarm, name)([eager], **kw)
    for g in grads:
        eager.grad = g.cuda()
        opt_e.step()
    graphed = torch.nn.Parameter(init.to("cuda", torch.bfloat16))
    opt_g = getattr(fusedwarm, name)([graphed], **kw)
    graphed.grad = grads[0].cuda()
    opt_g.step()  # creates the state outside the capture
    static_grad = graphed.grad
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.step()
    for g in grads[1:]:
        static_grad.copy_(g.cuda())
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(opt_g.master_weight(graphed), opt_e.master_weight(eager))
