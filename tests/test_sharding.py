"""Sharding changes no bit (DESIGN.md): the random stream keys an element by its index in the full tensor.

A step op given a tensor cut into shards, each with its ``element_offsets`` entry (the index of
its first element in the full tensor), writes the bits it writes for the whole tensor: in
stochastic-rounding modes every element's random word depends on that index only. Checked on the
CPU backend and on the CUDA backend (a GPU, else the emulated device), with shard boundaries that
split packs and tiles, and with offsets around a 2^30-element block of the random stream.
"""

from __future__ import annotations

import pytest
import torch

from fusedwarm import _ops

SEED = 0x51A2D
LR = 1e-2
N = 5000
CUTS = (0, 1234, 1235, 3001, N)  # uneven shards, one of a single element, none aligned to a pack
RULES = {
    "adamw": ("adamw_", ("exp_avgs", "exp_avg_sqs"), dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                                                          maximize=False)),
    "sgd_momentum": ("sgd_", ("momentum_buffers",), dict(momentum=0.9, dampening=0.0, weight_decay=1e-2,
                                                         nesterov=False, maximize=False)),
    "lion": ("lion_", ("exp_avgs",), dict(beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)),
}
# Modes whose writes round stochastically: weights without extra bits or with 8 (a 15-bit master),
# bfloat16 states; the random words decide bits in every one of them.
MODES = [(torch.bfloat16, 0, torch.bfloat16), (torch.bfloat16, 8, torch.float32), (torch.float16, 0, torch.bfloat16)]
BLOCK = 1 << 30  # elements per block of the random stream (philox.cuh, kRandomBlockBits)


def _tensors(rule, dtype, extra_bits, state_dtype, n, gen):
    _, states, _ = RULES[rule]
    t = {"params": torch.randn(n, generator=gen).to(dtype)}
    if extra_bits:
        t["extras"] = torch.randint(-100, 100, (n,), generator=gen).to(torch.int8)
    for name in states:
        t[name] = (torch.rand(n, generator=gen) * 1e-2 + 1e-6).to(state_dtype)
    return t


def _step(rule, t, grads, extra_bits, steps, offsets, tensor_id=7):
    """One step op over the shards in ``t`` (lists of tensors)."""
    op, states, hyper = RULES[rule]
    getattr(_ops.load(), op)(
        params=t["params"], grads=grads, extras=t.get("extras", []), **{s: t[s] for s in states}, steps=steps,
        tensor_ids=[tensor_id] * len(t["params"]), lr_tensor=None, lr=LR, extra_bits=extra_bits, seed=SEED,
        element_offsets=offsets, **hyper)


def _split(t: dict, cuts) -> dict:
    return {k: [v[a:b].clone() for a, b in zip(cuts, cuts[1:])] for k, v in t.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: f"{m[0]}-x{m[1]}-{m[2]}".replace("torch.", ""))
@pytest.mark.parametrize("rule", RULES)
def test_shards_with_offsets_write_the_whole_tensors_bits(rule, mode):
    dtype, extra_bits, state_dtype = mode
    gen = torch.Generator().manual_seed(3)
    init = _tensors(rule, dtype, extra_bits, state_dtype, N, gen)
    grads = [torch.randn(N, generator=gen).to(dtype) for _ in range(3)]
    whole = {k: [v.clone()] for k, v in init.items()}
    shards, unkeyed = _split(init, CUTS), _split(init, CUTS)
    for step, grad in enumerate(grads, 1):
        _step(rule, whole, [grad], extra_bits, [torch.tensor(step)], None)
        for t, offsets in ((shards, list(CUTS[:-1])), (unkeyed, None)):
            _step(rule, t, [grad[a:b] for a, b in zip(CUTS, CUTS[1:])], extra_bits,
                  [torch.tensor(step) for _ in CUTS[1:]], offsets)
    for name, (full,) in whole.items():
        assert torch.equal(_bits(torch.cat(shards[name])), _bits(full)), name
    # Without the offsets the later shards draw other random words: the check above can fail.
    assert not torch.equal(_bits(torch.cat(unkeyed["params"])), _bits(whole["params"][0]))


@pytest.mark.parametrize("rule", RULES)
def test_offsets_across_a_random_block_match_on_the_cuda_backend(rule, gpu):
    # Shards whose indices in the full tensor cross the 2^30-element boundary between two blocks of
    # the random stream (each block has its own key): the CPU and CUDA backends switch keys at the
    # same element.
    dtype, extra_bits, state_dtype = MODES[0]
    gen = torch.Generator().manual_seed(9)
    cuts = (0, 2500, 4099, 4100)
    offsets = [BLOCK - 1300, BLOCK + 1200, 3 * BLOCK - 1]
    cpu = _split(_tensors(rule, dtype, extra_bits, state_dtype, cuts[-1], gen), cuts)
    dev = {k: [gpu.to(t) for t in v] for k, v in cpu.items()}
    for step in range(1, 4):
        grads = [torch.randn(b - a, generator=gen).to(dtype) for a, b in zip(cuts, cuts[1:])]
        steps = [torch.tensor(step) for _ in grads]
        _step(rule, cpu, grads, extra_bits, steps, offsets)
        with gpu.run(sms=2, blocks_per_sm=1, order="shuffle"):
            _step(rule, dev, [gpu.to(g) for g in grads], extra_bits, [gpu.to(s) for s in steps], offsets)
    gpu.synchronize()
    for name in cpu:
        for i, (a, b) in enumerate(zip(cpu[name], dev[name])):
            assert torch.equal(_bits(a), _bits(b.cpu())), f"{name}[{i}]"


def test_element_offsets_are_checked():
    t = {"params": [torch.randn(4)], "exp_avgs": [torch.zeros(4)]}
    with pytest.raises(RuntimeError, match=r"element_offsets has 2 entries for 1 params"):
        _step("lion", t, [torch.randn(4)], 0, [torch.tensor(1)], [0, 4])
    with pytest.raises(RuntimeError, match=r"element_offsets\[0\] must be >= 0, got -1"):
        _step("lion", t, [torch.randn(4)], 0, [torch.tensor(1)], [-1])
