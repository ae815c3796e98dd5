"""The optimizer step inside the backward pass (``backward_step=True``).

The central check is bit identity: the same model, data and seed trained with
``backward_step=True`` and ``backward_step=False`` must end in the same bits (weights, extra bits,
states), whatever the bucket size, because the fused kernel computes each tensor from its own step
and random stream. Then the torch.optim semantics (schedulers, accumulation, clipping, loss scaling,
checkpoints) and the errors that guard against double updates.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch
from torch import nn

import fusedwarm
from helpers import HYPER, OPTIMIZERS, seed_all
from test_conventions import assert_bits_equal

# (param dtype, extra_bits, state dtype): the main mode, the stochastic-rounding mode, float32.
MODES = [(torch.bfloat16, 16, torch.bfloat16), (torch.bfloat16, 0, torch.bfloat16), (torch.float32, 16, torch.float32)]
MODE_IDS = ["bf16-x16", "bf16-x0", "f32"]
ITERS = 4


class TinyNet(nn.Module):
    """Embedding, two linear layers with a frozen one in between, and a head tied to the embedding."""

    def __init__(self, dtype: torch.dtype, vocab: int = 23, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.frozen = nn.Linear(2 * dim, 2 * dim)
        self.frozen.requires_grad_(False)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.unused = nn.Linear(dim, dim)  # gets no gradient: must stay untouched
        self.to(dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        h = self.fc2(torch.tanh(self.frozen(torch.tanh(self.fc1(h))))) + h
        return h @ self.emb.weight.t()  # the embedding is used twice (shared weight)


def make_model(dtype: torch.dtype, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(dtype)


def batches(n: int, seed: int, batch: int = 8, vocab: int = 23):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (batch, 5), generator=gen), torch.randint(0, vocab, (batch, 5), generator=gen))
            for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def new_opt(name: str, model: nn.Module, mode, **kw) -> fusedwarm.FusedOptimizer:
    _, extra_bits, state_dtype = mode
    return getattr(fusedwarm, name)(model.parameters(), **{**HYPER[name], "extra_bits": extra_bits,
                                                             "state_dtype": state_dtype, "seed": 5, **kw})


def train(name: str, mode, iters: int = ITERS, data_seed: int = 1, **kw):
    """Trains a fresh TinyNet; returns (model, optimizer)."""
    model = make_model(mode[0])
    opt = new_opt(name, model, mode, **kw)
    for x, y in batches(iters, data_seed):
        loss_of(model, x, y).backward()
        if opt.backward_step:
            assert all(p.grad is None for p in model.parameters()), "a gradient was left behind"
        opt.step()
        opt.zero_grad()
    return model, opt


def assert_same_training(a, b) -> None:
    (ma, oa), (mb, ob) = a, b
    for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
        assert_bits_equal(pa, pb, name)
        sa, sb = oa.state.get(pa, {}), ob.state.get(pb, {})
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert_bits_equal(sa[key], sb[key], f"{name}.{key}")


opt_names = pytest.mark.parametrize("name", OPTIMIZERS)
modes = pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)


# ---- same bits as the ordinary step ---------------------------------------------------------------


@opt_names
@modes
@pytest.mark.parametrize("bucket_cap_mb", [25.0, 1e-3], ids=["one-bucket", "tiny-buckets"])
def test_backward_step_is_bit_identical_to_step(name, mode, bucket_cap_mb):
    plain = train(name, mode)
    inside = train(name, mode, backward_step=True, bucket_cap_mb=bucket_cap_mb)
    assert_same_training(plain, inside)
    model, opt = inside
    assert opt.state[model.emb.weight]["step"].item() == ITERS  # shared weight: one update per iteration
    assert model.unused.weight not in opt.state and model.frozen.weight not in opt.state


def test_frozen_and_gradless_parameters_are_untouched():
    model = make_model(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = new_opt("AdamW", model, MODES[0], backward_step=True)
    for x, y in batches(2, 3):
        loss_of(model, x, y).backward()
        opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n.split(".")[0] in ("emb", "fc1", "fc2")), n


def _record_launches(monkeypatch, opt) -> list[int]:
    """Records the number of tensors of each fused call ``opt`` makes."""
    sizes: list[int] = []
    original = opt._launch

    def launch(gi, params, grads):
        sizes.append(len(params))
        original(gi, params, grads)

    monkeypatch.setattr(opt, "_launch", launch)
    return sizes


@pytest.mark.parametrize("bucket_cap_mb,expected", [(25.0, "one"), (2e-3, "several")])
def test_ready_gradients_share_launches(monkeypatch, bucket_cap_mb, expected):
    model = make_model(torch.bfloat16)
    opt = new_opt("AdamW", model, MODES[0], backward_step=True, bucket_cap_mb=bucket_cap_mb)
    sizes = _record_launches(monkeypatch, opt)
    x, y = batches(1, 0)[0]
    loss_of(model, x, y).backward()
    # 5 tensors get a gradient (one group, one dtype). Far below the cap they make one launch at
    # the end of backward; with a cap of ~1000 bf16 values, buckets flush when full.
    assert sum(sizes) == 5
    assert (sizes == [5]) if expected == "one" else (len(sizes) > 1 and max(sizes) > 1), sizes
    opt.step()


# ---- torch.optim semantics ---------------------------------------------------------------------


@opt_names
def test_lr_scheduler_drives_the_in_backward_optimizer(name):
    runs = []
    for backward_step in (False, True):
        model = make_model(torch.bfloat16)
        opt = new_opt(name, model, MODES[0], backward_step=backward_step)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + 3 * i))
        lrs = []
        for x, y in batches(ITERS, 2):
            loss_of(model, x, y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        runs.append((model, opt))
    assert lrs[-1] < HYPER[name]["lr"] / 5
    assert_same_training(*runs)


@opt_names
def test_accumulate_keeps_gradients_then_steps_on_the_last_micro_batch(name):
    mode = MODES[0]
    data = batches(3 * ITERS, 4)
    results = []
    for backward_step in (False, True):
        model = make_model(mode[0])
        opt = new_opt(name, model, mode, backward_step=backward_step)
        for it in range(ITERS):
            micro = data[3 * it:3 * it + 3]
            with opt.accumulate():
                for x, y in micro[:-1]:
                    (loss_of(model, x, y) / 3).backward()
            assert all(p.grad is not None for p in (model.fc1.weight, model.emb.weight))
            x, y = micro[-1]
            (loss_of(model, x, y) / 3).backward()
            opt.step()
            opt.zero_grad()
        results.append((model, opt))
    assert_same_training(*results)


def test_accumulated_micro_batches_match_one_large_batch():
    """float32 weights: accumulating 3 micro-batches equals one batch of 3x, up to summation order."""
    mode = MODES[2]
    data = batches(3, 6)
    big = make_model(mode[0])
    opt_big = new_opt("AdamW", big, mode)
    x = torch.cat([d[0] for d in data])
    y = torch.cat([d[1] for d in data])
    loss_of(big, x, y).backward()
    opt_big.step()

    acc = make_model(mode[0])
    opt_acc = new_opt("AdamW", acc, mode, backward_step=True)
    with opt_acc.accumulate():
        for xb, yb in data[:-1]:
            (loss_of(acc, xb, yb) / 3).backward()
    (loss_of(acc, *data[-1]) / 3).backward()
    opt_acc.step()
    for (n, a), b in zip(acc.named_parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_step_updates_gradients_accumulated_without_a_final_backward():
    runs = []
    for backward_step in (False, True):
        model = make_model(torch.bfloat16)
        opt = new_opt("AdamW", model, MODES[0], backward_step=backward_step)
        with opt.accumulate():
            for x, y in batches(2, 8):
                loss_of(model, x, y).backward()
        opt.step()
        runs.append((model, opt))
    assert all(p.grad is None for p in runs[1][0].parameters())
    assert_same_training(*runs)


# ---- clipping and loss scaling ------------------------------------------------------------------


@opt_names
@pytest.mark.parametrize("clip", ["tensor", "lagged", "lagged-tensor"])
def test_clipping_modes_are_bit_identical_in_and_out_of_backward(name, clip):
    mode = MODES[2]
    runs = [train(name, mode, max_grad_norm=0.05, clip=clip, backward_step=bs, bucket_cap_mb=1e-3)
            for bs in (False, True)]
    assert_same_training(*runs)
    norm = runs[1][1].last_grad_norm()
    assert torch.isfinite(norm) and norm > 0.05  # the clipping was active


def test_exact_global_clipping_in_backward_raises_and_explains():
    with pytest.raises(ValueError, match=r"clip='tensor'.*clip='lagged'.*backward_step=False"):
        fusedwarm.AdamW(make_model(torch.bfloat16).parameters(), max_grad_norm=1.0, backward_step=True)


def _reference_clipped_training(clip: str, max_norm: float):
    """float32 weights, clipping done by hand with torch.nn.utils, then an unclipped fused step."""
    model = make_model(torch.float32)
    opt = new_opt("AdamW", model, MODES[2])
    coef, known = 1.0, False
    for x, y in batches(ITERS, 1):
        loss_of(model, x, y).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if clip == "global":
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif clip == "lagged":  # the previous iteration's coefficient
            for p in params:
                p.grad.mul_(coef)
            coef = min(1.0, max_norm / (float(norm) + 1e-6))
        else:  # lagged-tensor: that, never above a tensor's own; first iteration max_norm / sqrt(T) each
            tensors = len(list(model.parameters()))
            for p in params:
                own = float(p.grad.norm())
                limit = min(coef, max_norm / (own + 1e-6)) if known else max_norm / (own * tensors**0.5 + 1e-6)
                p.grad.mul_(min(1.0, limit))
            coef, known = min(1.0, max_norm / (float(norm) + 1e-6)), True
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("clip,backward_step", [("global", False), ("lagged", True), ("lagged-tensor", True)])
def test_global_and_lagged_clipping_match_torch_clip_grad_norm(clip, backward_step):
    expected = _reference_clipped_training(clip, 0.05)
    model, _ = train("AdamW", MODES[2], max_grad_norm=0.05, clip=clip, backward_step=backward_step)
    for (n, a), b in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_per_tensor_clipping_bounds_each_tensor():
    """With SGD (no momentum, no decay), a clipped step moves each tensor by at most lr * max_norm."""
    model = make_model(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = fusedwarm.SGD(model.parameters(), lr=1.0, max_grad_norm=0.01, clip="tensor", backward_step=True)
    x, y = batches(1, 9)[0]
    loss_of(model, x, y).backward()
    opt.step()
    moved = [float((p.detach() - before[n]).norm()) for n, p in model.named_parameters()]
    assert max(moved) <= 0.01 * (1 + 1e-5) and max(moved) > 0.009


def test_nonfinite_gradient_is_skipped_and_reported():
    model = make_model(torch.bfloat16)
    opt = fusedwarm.AdamW([{"params": list(model.parameters()),
                            "param_names": [n for n, _ in model.named_parameters()]}],
                          state_dtype=torch.bfloat16, seed=5, backward_step=True)
    x, y = batches(2, 10)[0]
    loss_of(model, x, y).backward()
    opt.step()
    assert int(opt.nonfinite_count()) == 0 and opt.nonfinite_params() == {}
    w = model.fc1.weight
    snap = {"w": w.detach().clone(), **{k: v.clone() for k, v in opt.state[w].items()}}
    def poison(g: torch.Tensor) -> torch.Tensor:
        g = g.clone()
        g[3, 4] = float("inf")
        return g

    handle = w.register_hook(poison)
    loss_of(model, x, y).backward()
    opt.step()
    handle.remove()
    assert int(opt.nonfinite_count()) == 1
    assert opt.nonfinite_params() == {f"parameter 'fc1.weight' (group 0, index 1, shape {tuple(w.shape)}, "
                                      f"dtype torch.bfloat16)": 1}
    for key in ("w", "extra", "exp_avg", "exp_avg_sq"):
        now = w if key == "w" else opt.state[w][key]
        assert_bits_equal(now[3, 4], snap[key][3, 4], f"{key}[3, 4]")
        assert not torch.equal(now, snap[key]), f"{key}: the finite elements were not updated"


def test_float16_training_with_a_dynamic_loss_scale():
    """float16 weights and gradients with loss_scale="dynamic": the first scales (2^16) overflow the
    float16 gradients, those elements are skipped and the scale halves on the device until the
    gradients fit; training then tracks the float32 run."""
    seed_all("fp16-loss-scale")
    w_true = torch.randn(1, 32)
    xs = torch.randn(64, 32)
    ys = xs @ w_true.t()

    def run(dtype, **kw):
        torch.manual_seed(0)
        model = nn.Linear(32, 1, bias=False).to(dtype)
        opt = fusedwarm.AdamW(model.parameters(), lr=0.1, weight_decay=0.0, state_dtype=torch.float32, seed=1,
                              backward_step=True, warmup="none", **kw)
        scales, skipped = [], []
        for _ in range(ITERATIONS):
            loss = (model(xs.to(dtype)).float() - ys).square().mean()
            scale = opt.loss_scale if opt.loss_scale is not None else torch.ones(())
            scales.append(float(scale))  # opt.step() updates the scale in place
            (loss * scale).backward()
            opt.step()
            skipped.append(int(opt.nonfinite_count()))
        return float((model.weight.detach().float() - w_true).norm()), scales, skipped

    ITERATIONS = 100
    start = float(w_true.norm())
    ref_err, _, _ = run(torch.float32)
    err, scales, skipped = run(torch.float16, loss_scale="dynamic")
    assert scales[0] == 2.0**16 and skipped[0] > 0
    assert min(scales) < 2.0**16 and skipped[-1] == 0
    # Measured: |w - w_true| goes from 5.3 to 0.028 (float32) and 0.027 (float16).
    assert ref_err < start / 50 and err < start / 50, (err, ref_err, start)


def test_constant_loss_scale_divides_the_gradient():
    runs = []
    for scale in (None, 64.0):
        model = make_model(torch.float32)
        opt = new_opt("SGD", model, MODES[2], loss_scale=scale, backward_step=True)
        for x, y in batches(2, 11):
            (loss_of(model, x, y) * (scale or 1.0)).backward()
            opt.step()
        runs.append((model, opt))
    # Multiplying by 64 and dividing by 64 are exact in float32 (powers of two).
    assert_same_training(*runs)


# ---- errors and life cycle ------------------------------------------------------------------------


def test_backward_twice_without_step_raises_and_changes_nothing():
    model = make_model(torch.bfloat16)
    opt = new_opt("AdamW", model, MODES[0], backward_step=True)
    x, y = batches(1, 12)[0]
    loss = loss_of(model, x, y)
    loss.backward(retain_graph=True)
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"second gradient in one iteration.*retain_graph=True.*opt.step\(\)"):
        loss.backward()
    for n, p in model.named_parameters():
        assert_bits_equal(p, snap[n], n)
    opt.zero_grad()
    opt.step()  # ends the iteration: the next backward updates again
    loss_of(model, x, y).backward()
    assert not torch.equal(model.fc1.weight, snap["fc1.weight"])


def test_second_optimizer_over_the_same_parameters_raises():
    model = make_model(torch.bfloat16)
    opt = new_opt("AdamW", model, MODES[0], backward_step=True)
    with pytest.raises(TypeError, match=r"already updated in the backward pass by another AdamW"):
        fusedwarm.SGD(model.parameters())
    opt.close()
    fusedwarm.SGD(model.parameters())  # allowed once the hooks are gone


def test_close_restores_plain_autograd():
    model = make_model(torch.bfloat16)
    opt = new_opt("Lion", model, MODES[0], backward_step=True)
    opt.close()
    assert not opt.backward_step
    x, y = batches(1, 13)[0]
    snap = model.fc1.weight.detach().clone()
    loss_of(model, x, y).backward()
    assert model.fc1.weight.grad is not None and torch.equal(model.fc1.weight, snap)
    opt.step()
    assert not torch.equal(model.fc1.weight, snap)
    opt.close()  # twice is harmless


def test_invalid_driver_options_raise():
    params = make_model(torch.bfloat16).parameters
    for kw, match in [({"backward_step": 1}, "backward_step"), ({"bucket_cap_mb": 0}, "bucket_cap_mb"),
                      ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"clip": "row"}, "clip"),
                      ({"loss_scale": 0.0}, "loss_scale"), ({"loss_scale": "auto"}, "loss_scale")]:
        with pytest.raises(ValueError, match=match):
            fusedwarm.AdamW(params(), **kw)


# ---- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_resumes_bit_identically(name):
    kw = dict(backward_step=True, max_grad_norm=0.05, clip="lagged", loss_scale="dynamic")
    data = batches(6, 14)

    def iterate(model, opt, chunk):
        for x, y in chunk:
            (loss_of(model, x, y) * opt.loss_scale).backward()
            opt.step()

    model, opt = make_model(torch.bfloat16), None
    opt = new_opt(name, model, MODES[1], **kw)
    iterate(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    iterate(model, opt, data[3:])

    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model2 = make_model(torch.bfloat16, seed=1)
    model2.load_state_dict(saved["model"])
    opt2 = getattr(fusedwarm, name)(model2.parameters(), **kw)
    opt2.load_state_dict(saved["opt"])
    iterate(model2, opt2, data[3:])
    assert_same_training((model, opt), (model2, opt2))
    for key in ("loss_scale", "clip_coef", "last_grad_norm"):
        assert_bits_equal(opt._scalars()[key], opt2._scalars()[key], key)


def test_deepcopy_of_model_and_optimizer_keeps_stepping_in_backward():
    model = make_model(torch.bfloat16)
    opt = new_opt("AdamW", model, MODES[1], backward_step=True)
    data = batches(4, 15)
    for x, y in data[:2]:
        loss_of(model, x, y).backward()
        opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (model2, opt2)):
        for x, y in data[2:]:
            loss_of(m, x, y).backward()
            assert all(p.grad is None for p in m.parameters())
            o.step()
    assert_same_training((model, opt), (model2, opt2))


# ---- memory ------------------------------------------------------------------------------------


def test_no_full_set_of_gradients_is_ever_alive():
    """A deep stack of layers: the bytes of ``.grad`` alive during backward stay below one bucket
    plus one tensor, far below the full gradient set (which backward_step=False holds)."""
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64) for _ in range(16)]
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())]).to(torch.bfloat16)
    params = list(model.parameters())
    full = sum(p.numel() * p.element_size() for p in params)
    cap_mb = 0.02  # ~ 2.5 of the 16 weight matrices
    x = torch.randn(8, 64, dtype=torch.bfloat16)

    def peak_grad_bytes(backward_step: bool) -> int:
        opt = fusedwarm.AdamW(params, backward_step=backward_step, bucket_cap_mb=cap_mb)
        peak = [0]

        def measure(_):
            peak[0] = max(peak[0], sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None))

        handles = [p.register_post_accumulate_grad_hook(measure) for p in params]
        model(x).float().square().mean().backward()
        measure(None)
        opt.step()
        opt.zero_grad()
        for h in handles:
            h.remove()
        opt.close()
        return peak[0]

    inside = peak_grad_bytes(True)
    outside = peak_grad_bytes(False)
    assert outside == full
    largest = max(p.numel() * p.element_size() for p in params)
    assert inside <= cap_mb * 2**20 + largest and inside < full / 3, (inside, full)


# ---- CUDA ------------------------------------------------------------------------------------------


@opt_names
def test_cuda_backward_step_is_bit_identical_to_step(name, gpu):
    # The CPU backend's step, then the CUDA backend's step and step in backward: all three equal.
    runs = []
    launches = gpu.launches()
    for device, backward_step, context in (("cpu", False, contextlib.nullcontext()),
                                           (gpu.device, False, gpu.run(sms=2, blocks_per_sm=1, order="shuffle")),
                                           (gpu.device, True, gpu.run(sms=2, blocks_per_sm=1, order="shuffle"))):
        torch.manual_seed(0)
        model = make_model(torch.bfloat16).to(device)
        opt = new_opt(name, model, MODES[0], backward_step=backward_step, bucket_cap_mb=1e-3)
        with context:
            for x, y in batches(ITERS, 1):
                loss_of(model, x.to(device), y.to(device)).backward()
                opt.step()
                opt.zero_grad()
        runs.append((model, opt))
    assert_same_training(runs[1], runs[2])
    for (name, p_cpu), p_gpu in zip(runs[0][0].named_parameters(), runs[1][0].parameters()):
        assert_bits_equal(p_cpu, p_gpu.cpu(), name)
        for key, value in runs[0][1].state[p_cpu].items():
            assert_bits_equal(value, runs[1][1].state[p_gpu][key].cpu(), f"{name}.{key}")
    assert launches is None or gpu.launches() > launches


# ---- sharded parameters ----------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_unsupported_dtensor_placements_are_rejected_with_a_clear_error():
    """FSDP2's Shard(0) DTensors are supported (tests/test_fsdp.py); other shardings are refused, saying why."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        fusedwarm.AdamW([nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))])
        p = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(1)]))
        with pytest.raises(TypeError, match=r"is a DTensor with placement Shard\(dim=1\); fusedwarm supports Shard\(0\)"):
            fusedwarm.AdamW([p])
        mesh2 = init_device_mesh("cpu", (1, 1))
        q = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh2, [Shard(0), Shard(0)]))
        with pytest.raises(TypeError, match=r"2-dimensional device mesh"):
            fusedwarm.AdamW([q])
    finally:
        dist.destroy_process_group()
