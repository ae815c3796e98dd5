"""Block-quantized optimizer states (state_dtype="int8"/"int4"; csrc/include/fusedwarm/quant.cuh)
against the independent reference quantizers (fusedwarm.reference.quant), bit for bit.

The fused step with quantized states is checked as a pipeline: a twin optimizer with float32
states is given the decoded states before every step, and the quantized optimizer's new codes
and scales must be the reference's block encoding of the twin's new float32 states with the
step's random words, its weights the twin's (fp32 compute both), except in blocks with a
non-finite gradient, which keep everything. The emulated CUDA device must give the same bits.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fusedwarm
from fusedwarm.reference import quant as rq
from helpers import seed_all

# 4,096 elements and more are quantized; the odd sizes leave partial blocks and an odd nibble.
SIZES = [(33, 129), (4097,), (100,)]
BITS = {"int8": 8, "int4": 4}
# The quantized EMAs after 2,000 steps (test_quantized_ema_statistics), per bits: the relative error
# of the sum of v over the elements (bias), and the median element's relative error of sqrt(v) and
# of m relative to sqrt(v) (tracking). Stochastic rounding keeps v unbiased, but each step's
# rounding error decays only by beta2 = 0.999, so one element's v wanders by about two code
# spacings (3 mantissa bits: measured 8% on sqrt(v) for 8-bit codes, 20% for 4-bit; bfloat16
# states 1.2%).
EMA_SUM_RTOL = {8: 0.01, 4: 0.02}
EMA_SQRT_V_RTOL = {8: 0.12, 4: 0.30}
EMA_M_RTOL = {8: 0.02, 4: 0.20}


def _values(n: int) -> torch.Tensor:
    """Fresh values over many binades, both signs, with a few exact powers of two."""
    v = torch.randn(n) * torch.exp2(torch.randint(-30, 10, (n,)).float())
    v[:: 97] = torch.exp2(torch.randint(-20, 5, v[::97].shape).float())
    return v


def _words(n: int) -> torch.Tensor:
    return torch.randint(-2**31, 2**31, (n,), dtype=torch.int64).to(torch.int32)


@pytest.mark.parametrize("block", [32, 256, 2048])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_reference(bits, signed, block):
    """The fused encoder and decoder (quantize_states / dequantize_states ops) equal the reference's."""
    seed_all("quantize", bits, signed, block)
    ops = fusedwarm._ops.load()
    n = 3 * block + 7
    values = _values(n)
    values[5] = float("inf")
    values[block + 3] = float("nan")
    words = _words(n)
    codes, scales = ops.quantize_states(values, words, bits, signed, block)
    ref_codes, ref_scales = rq.quantize_block(values, words.to(torch.int64) & 0xFFFFFFFF, bits, signed, block)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales.view(torch.int32), ref_scales.view(torch.int32))
    decoded = ops.dequantize_states(codes, scales, n, bits, signed, block)
    expected = rq.dequantize(codes, scales, n, bits, signed, block)
    assert torch.equal(decoded.view(torch.int32), expected.view(torch.int32))


def _make(state_dtype, rule, dtype, extra_bits, seed=11, **options):
    seed_all("quantized-params", rule, str(dtype))
    params = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SIZES]
    kw = dict(lr=1e-2, seed=seed, state_dtype=state_dtype, **options)
    if dtype != torch.float32:
        kw["extra_bits"] = extra_bits
    if rule == "SGD":
        kw["momentum"] = 0.9
    if rule == "AdamW":
        kw["warmup"] = "none"
    return params, getattr(fusedwarm, rule)(params, **kw)


def _state_names(opt):
    return [n for n in opt._op_states if n in opt._state_names(opt.param_groups[0])]


@pytest.mark.parametrize("extra_bits", [16, 8, 0])
@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
@pytest.mark.parametrize("rule", ["AdamW", "Lion", "SGD"])
def test_step_matches_reference_encoding(rule, state_dtype, extra_bits):
    """Weights, codes and scales after each step = the float32-state twin's step, encoded by the reference."""
    bits = BITS[state_dtype]
    block = rq.DEFAULT_BLOCK[bits]
    dtype = torch.bfloat16
    qp, q = _make(state_dtype, rule, dtype, extra_bits)
    fp, f = _make(torch.float32, rule, dtype, extra_bits)
    names = _state_names(q)
    seed_all("quantized-step", rule, state_dtype, extra_bits)
    for step in range(1, 6):
        grads = [torch.randn(p.shape).to(dtype) for p in qp]
        grads[0].view(-1)[700] = float("inf") if step == 3 else grads[0].view(-1)[700]
        before = {}
        for i, (a, b) in enumerate(zip(qp, fp)):
            with torch.no_grad():
                b.copy_(a)
            sq = q.state.get(a)
            if sq:
                before[i] = {k: v.clone() for k, v in sq.items()}
                f.state[b] = {k: v.clone() for k, v in sq.items() if k in ("step", "extra")}
                for j, n in enumerate(names):
                    if a.numel() >= rq.QUANT_MIN_NUMEL:
                        f.state[b][n] = rq.dequantize(sq[n], sq[n + "_scale"], a.numel(), bits, j == 0,
                                                      block).view(a.shape)
                    else:
                        f.state[b][n] = sq[n].float()
            before.setdefault(i, None)
            a.grad, b.grad = grads[i], grads[i].clone()
        old_weights = [p.detach().clone() for p in qp]
        q.step()
        f.step()
        assert int(q.nonfinite_count()) == (1 if step == 3 else 0)
        for i, (a, b) in enumerate(zip(qp, fp)):
            if a.numel() < rq.QUANT_MIN_NUMEL:
                continue
            n = a.numel()
            finite = torch.isfinite(grads[i].float()).view(-1)
            block_of = torch.arange(n) // block
            bad = torch.zeros(rq.num_blocks(n, block), dtype=torch.int64).index_add_(
                0, block_of, (~finite).to(torch.int64)) > 0
            elem_bad = bad[block_of]
            lossy = rq.weight_is_lossy(dtype, extra_bits)
            words = rq.state_words(q.param_groups[0]["seed"], q._ids[id(a)], step, n, lossy)
            expected_w = torch.where(elem_bad, old_weights[i].view(-1), b.detach().view(-1))
            assert torch.equal(a.detach().view(-1).view(torch.int16), expected_w.view(torch.int16)), (i, step)
            for j, name in enumerate(names):
                codes, scales = rq.quantize_block(f.state[b][name].view(-1), words[j], bits, j == 0, block)
                if before[i] is not None:  # a skipped block keeps its codes and scale
                    old_codes = rq.unpack_codes(before[i][name], n, bits)
                    new_codes = torch.where(elem_bad, old_codes, rq.unpack_codes(codes, n, bits))
                    codes = rq.pack_codes(new_codes, bits)
                    scales = torch.where(bad, before[i][name + "_scale"], scales)
                assert torch.equal(q.state[a][name], codes), (name, i, step)
                scale_bits = q.state[a][name + "_scale"].view(torch.int32)
                assert torch.equal(scale_bits, scales.view(torch.int32)), (name, step)


def _offset_copy(t: torch.Tensor, device, offset: int) -> torch.Tensor:
    """A copy of ``t`` on ``device`` that starts ``offset`` elements into a fresh buffer."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=device)
    out = buf[offset:].view(t.shape)
    out.copy_(t)
    return out


def _run(state_dtype, rule, device, context, steps=4, misaligned=False, **options):
    params, opt = _make(state_dtype, rule, torch.bfloat16, 8, **options)
    # Misaligned: weights one element into their buffers, so the kernels take their scalar path.
    params = [torch.nn.Parameter(_offset_copy(p.detach(), device, 1 if misaligned else 0)) for p in params]
    opt = type(opt)(params, **{k: v for k, v in opt.defaults.items()})
    seed_all("quantized-device", rule, state_dtype)
    with context:
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape).bfloat16().to(device)
            if step == 2:
                params[0].grad.view(-1)[100] = float("nan")
            opt.step()
    return params, opt


@pytest.mark.parametrize("case", [
    dict(state_dtype="int8", rule="AdamW"),
    dict(state_dtype="int4", rule="AdamW", state_block=64),
    dict(state_dtype="int8", rule="Lion"),
    dict(state_dtype="int4", rule="SGD"),
    dict(state_dtype="int8", rule="AdamW", update_control="row", update_norm=0.01),
    dict(state_dtype="int4", rule="AdamW", arithmetic="pam"),
    dict(state_dtype="int8", rule="AdamW", misaligned=True),
    dict(state_dtype="int4", rule="Lion", misaligned=True),
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_cuda_matches_cpu(gpu, case):
    """The CUDA kernels (block-cooperative tiles, shared-memory maxima) = the CPU backend, bit for bit
    (on the emulated device: several resident blocks, threads in shuffled order)."""
    (cpu, cpu_context), (dev, dev_context) = gpu.sides(sms=2, blocks_per_sm=1, order="shuffle")
    a, oa = _run(device=cpu, context=cpu_context, **case)
    launches = gpu.launches()
    b, ob = _run(device=dev, context=dev_context, **case)
    assert launches is None or gpu.launches() > launches  # the emulated device ran the steps
    for p, r in zip(a, b):
        assert torch.equal(p.view(torch.int16), r.cpu().view(torch.int16))
        for k, v in oa.state[p].items():
            w = ob.state[r][k].cpu()
            assert torch.equal(v.view(torch.uint8) if v.dim() else v, w.view(torch.uint8) if w.dim() else w), k


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_quantized_ema_statistics(state_dtype):
    """v with beta2 = 0.999 over 2,000 steps: unbiased in the mean, and each element tracks the fp32 EMA.

    lr = 0 keeps the weights fixed, so the states see a stationary gradient stream; the float64 EMA
    of the same gradients is the reference.
    """
    bits = BITS[state_dtype]
    seed_all("ema", state_dtype)
    p = torch.nn.Parameter(torch.randn(8192).bfloat16())
    opt = fusedwarm.AdamW([p], lr=0.0, betas=(0.9, 0.999), weight_decay=0.0, state_dtype=state_dtype, seed=5)
    scale = torch.exp2(torch.randint(-2, 3, (8192,)).float())  # element-wise gradient scales over 4 binades
    v = torch.zeros(8192, dtype=torch.float64)
    m = torch.zeros(8192, dtype=torch.float64)
    for _ in range(2000):
        g = (torch.randn(8192) * scale).bfloat16()
        p.grad = g
        opt.step()
        gd = g.double()
        v.mul_(0.999).add_(0.001 * gd * gd)
        m.mul_(0.9).add_(0.1 * gd)
    st = opt.state[p]
    vq = rq.dequantize(st["exp_avg_sq"], st["exp_avg_sq_scale"], 8192, bits, False, rq.DEFAULT_BLOCK[bits]).double()
    mq = rq.dequantize(st["exp_avg"], st["exp_avg_scale"], 8192, bits, True, rq.DEFAULT_BLOCK[bits]).double()
    # Unbiased: the quantized v summed over elements (a sum of many independent rounding errors)
    # matches the exact EMA's sum.
    assert abs(vq.sum() / v.sum() - 1) < EMA_SUM_RTOL[bits]
    # Tracking: the median element's error of sqrt(v) (what the update divides by), and of m
    # relative to sqrt(v) (the scale of the update).
    assert ((vq.sqrt() - v.sqrt()).abs() / v.sqrt()).median() < EMA_SQRT_V_RTOL[bits]
    assert ((mq - m).abs() / v.sqrt()).median() < EMA_M_RTOL[bits]


def test_state_dict_is_compact_and_resumes_bit_identically():
    qp, q = _make("int8", "AdamW", torch.bfloat16, 16)
    seed_all("resume")
    grads = [[torch.randn(p.shape).bfloat16() for p in qp] for _ in range(5)]

    def run(params, opt, gs):
        for g in gs:
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()

    run(qp, q, grads[:3])
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    state = q.state[qp[0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].numel() == qp[0].numel()
    assert state["exp_avg_scale"].numel() == -(-qp[0].numel() // 256)
    weights = [p.detach().clone() for p in qp]
    run(qp, q, grads[3:])
    rp, r = _make("int8", "AdamW", torch.bfloat16, 16)
    with torch.no_grad():
        for p, w in zip(rp, weights):
            p.copy_(w)
    buf.seek(0)
    r.load_state_dict(torch.load(buf))
    run(rp, r, grads[3:])
    for a, b in zip(qp, rp):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))
        for k in q.state[a]:
            assert torch.equal(q.state[a][k], r.state[b][k]), k


@pytest.mark.parametrize("source,target", [("int8", "int4"), ("int4", torch.float32), (torch.bfloat16, "int8"),
                                           ("int8", "int8-block64")])
def test_load_converts_between_state_dtypes(source, target):
    """Loading into another state dtype (or block size) decodes and re-encodes to nearest."""
    sp, s = _make(source, "AdamW", torch.bfloat16, 16)
    seed_all("convert", str(source), str(target))
    for _ in range(3):
        for p in sp:
            p.grad = torch.randn(p.shape).bfloat16()
        s.step()
    block = None
    if target == "int8-block64":
        target, block = "int8", 64
    tp, t = _make(target, "AdamW", torch.bfloat16, 16, state_block=block)
    t.load_state_dict(s.state_dict())
    p, q = sp[0], tp[0]
    n = p.numel()

    def values(opt, param, name, dtype, blk):
        st = opt.state[param]
        if dtype in BITS:
            return rq.dequantize(st[name], st[name + "_scale"], n, BITS[dtype], name == "exp_avg", blk)
        return st[name].float().view(-1)

    for name in ("exp_avg", "exp_avg_sq"):
        src = values(s, p, name, source, rq.DEFAULT_BLOCK.get(BITS.get(source, 0)))
        dst = values(t, q, name, target, block or rq.DEFAULT_BLOCK.get(BITS.get(target, 0)))
        tol = 0.2 if target == "int4" else 0.04
        assert ((dst - src).abs().max() / src.abs().max()) < tol
    for _ in range(2):
        for x in tp:
            x.grad = torch.randn(x.shape).bfloat16()
        t.step()
    assert all(torch.isfinite(x.float()).all() for x in tp)


def test_small_tensors_keep_default_states_and_bytes_are_counted():
    qp, q = _make("int8", "AdamW", torch.bfloat16, 0)
    for p in qp:
        p.grad = torch.randn_like(p)
    q.step()
    assert q.state[qp[2]]["exp_avg"].dtype == torch.bfloat16  # 100 elements: below 4,096
    b = q.state_bytes()
    n_big = sum(p.numel() for p in qp[:2])
    blocks = sum(-(-p.numel() // 256) for p in qp[:2])
    assert b["states"] == 2 * n_big + 2 * 2 * qp[2].numel()
    assert b["scales"] == 2 * 4 * blocks
    assert b["extra_bits"] == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(state_dtype="int2"), "Invalid state_dtype"),
    (dict(state_dtype="int8", state_block=100), "Invalid state_block"),
    (dict(state_dtype="int8", state_block=4096), "Invalid state_block"),
    (dict(state_dtype=torch.bfloat16, state_block=256), "only used with quantized states"),
])
def test_bad_quantization_options(kwargs, message):
    p = torch.nn.Parameter(torch.randn(64, 64))
    with pytest.raises(ValueError, match=message):
        fusedwarm.AdamW([p], **kwargs)


def test_op_rejects_bad_block_and_codes():
    ops = fusedwarm._ops.load()
    with pytest.raises(RuntimeError, match="block must be a power of two"):
        ops.quantize_states(torch.randn(10), torch.zeros(10, dtype=torch.int32), 8, True, 48)
    with pytest.raises(RuntimeError, match="need 5 uint8 codes"):
        ops.dequantize_states(torch.zeros(10, dtype=torch.uint8), torch.ones(1), 10, 4, True, 32)


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_backward_step_equals_step(state_dtype):
    """Quantized states updated inside backward() (buckets mixing quantized and small tensors) = step()."""
    seed_all("quantized-backward", state_dtype)
    base = torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.GELU(), torch.nn.Linear(80, 8)).bfloat16()
    data = [(torch.randn(16, 96).bfloat16(), torch.randn(16, 8).bfloat16()) for _ in range(4)]
    runs = []
    for in_backward in (False, True):
        model = copy.deepcopy(base)
        opt = fusedwarm.AdamW(model.parameters(), lr=1e-2, extra_bits=8, state_dtype=state_dtype, seed=9,
                              backward_step=in_backward, bucket_cap_mb=0.01)
        for x, y in data:
            loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
            loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append((model, opt))
    (a, oa), (b, ob) = runs
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
        for k, v in oa.state[p].items():
            assert torch.equal(v, ob.state[q][k]), k
    assert oa.state[a[0].weight]["exp_avg"].dtype == torch.uint8  # 7,680 elements: quantized
    assert oa.state[a[0].bias]["exp_avg"].dtype == torch.bfloat16
