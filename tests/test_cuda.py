"""The CUDA backend matches the CPU backend bit for bit (DESIGN.md, "Backends agree bit for bit").

Each test runs the same steps of an op on CPU tensors and on twins of them on the CUDA backend
(the ``gpu`` fixture: a GPU, else the emulated device), from the same fresh random values, seed,
tensor ids, step counters and learning rate, then compares every parameter, extra-bits and state
tensor by bit pattern, NaN included. The tensor lists mix sizes that exercise the kernel's edges:
empty tensors, tails shorter than one 8-element pack, tensors spanning several tiles, and tensors
whose data pointer is not 16-byte aligned (scalar path); some weights are infinite or NaN, so that
updates produce NaN. The emulated device runs with exactly one resident block and with several
in shuffled order. The default run covers every rule x weight format x state dtype x arithmetic;
the slow group adds the full product with both lr modes and orders, and large tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fusedwarm._ops as fw_ops

STEPS = 5
SEED = 0x5EED_F00D_2468_ACE1
LR = 1e-2
# The emulated device's shapes (a GPU ignores them): exactly one resident block, so one block walks
# every tile; several blocks, shuffled, so blocks cross from one tensor to the next in any order.
EMU_SHAPES = {
    "one_block": dict(sms=1, blocks_per_sm=1),
    "blocks_shuffled": dict(sms=3, blocks_per_sm=2, order="shuffle", seed=11),
}

# Rule -> (op, number of state lists, hyperparameters). SGD runs with momentum 0 (no state) and
# with Nesterov momentum and dampening (one state); maximize is switched on somewhere.
OPS = {
    "adamw": ("adamw_", 2, dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, maximize=False)),
    "sgd": ("sgd_", 0, dict(momentum=0.0, dampening=0.0, weight_decay=1e-2, nesterov=False, maximize=True)),
    "sgd_momentum": ("sgd_", 1, dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=True, maximize=False)),
    "lion": ("lion_", 1, dict(beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=True)),
}
STATE_ARGS = {"adamw_": ("exp_avgs", "exp_avg_sqs"), "sgd_": ("momentum_buffers",), "lion_": ("exp_avgs",)}

# (param dtype, extra_bits): float32 is its own master; half formats keep 0, 8 or 16 extra bits.
PARAMS = [
    (torch.float32, 0),
    (torch.bfloat16, 0),
    (torch.bfloat16, 8),
    (torch.bfloat16, 16),
    (torch.float16, 0),
    (torch.float16, 8),
    (torch.float16, 16),
]
STATE_DTYPES = (torch.float32, torch.bfloat16)
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
BIT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

# (numel, element offset of the param, element offset of the grad): offsets of 1 and 3 leave the
# data pointer off 16-byte alignment for every dtype. 4099 spans three 2048-element tiles.
SIZES = [(0, 0, 0), (1, 0, 0), (7, 0, 0), (8, 0, 0), (1023, 0, 0), (1025, 0, 0), (4099, 0, 0), (2053, 1, 0),
         (515, 0, 3)]
# Gradients with non-finite entries (skipped elements): (tensor index, element index, value).
NONFINITE = [(4, 3, float("inf")), (4, 500, float("nan")), (6, 4098, float("-inf")), (7, 17, float("nan"))]
# Weights that are not finite, so that updates compute inf - inf or 0 * inf: (tensor index,
# element index, value or bit pattern). A bit pattern is a NaN with the sign set and a payload,
# which x86 arithmetic passes through and a GPU does not; every backend stores the canonical NaN.
NONFINITE_WEIGHTS = [(5, 0, float("-inf")), (5, 9, float("inf")), (6, 100, "nan-payload"), (8, 3, float("nan"))]
NAN_PAYLOAD = {torch.float32: -0x3F_FFFF, torch.bfloat16: -0x3F, torch.float16: -0x1FF}  # 0xFFC00001, 0xFFC1, 0xFE01


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _case_id(rule: str, dtype: torch.dtype, extra_bits: int, state_dtype: torch.dtype) -> str:
    param = _dtype_name(dtype) if dtype == torch.float32 else f"{_dtype_name(dtype)}-k{extra_bits}"
    return f"{rule}-{param}-state_{_dtype_name(state_dtype)}"


def _cases(full: bool):
    """Every rule x weight format x state dtype x arithmetic; the full product adds lr modes and shapes.

    The quick set takes one lr mode and one emulated shape per case, alternating, so each appears.
    """
    cases = []
    for rule, (_, num_states, _) in OPS.items():
        for dtype, extra_bits in PARAMS:
            for state_dtype in STATE_DTYPES if num_states else STATE_DTYPES[:1]:
                ident = _case_id(rule, dtype, extra_bits, state_dtype)
                for arithmetic in ("ieee", "pam"):
                    combos = [(m, sh) for m in ("float", "tensor") for sh in EMU_SHAPES]
                    if not full:
                        combos = [combos[len(cases) % len(combos)]]
                    for mode, shape in combos:
                        cases.append(pytest.param(rule, dtype, extra_bits, state_dtype, arithmetic, mode, shape,
                                                  id=f"{ident}-{arithmetic}-lr_{mode}-{shape}"))
    return cases


@pytest.fixture(scope="module")
def ops():
    return fw_ops.load()


def _place(values: torch.Tensor, offset: int, device) -> torch.Tensor:
    """A copy of the 1-D `values` on `device`, starting `offset` elements into a fresh buffer."""
    buf = torch.empty(values.numel() + offset, dtype=values.dtype, device=device)
    out = buf[offset:]
    out.copy_(values)
    return out


def _twin(t: torch.Tensor, device) -> torch.Tensor:
    return _place(t, t.storage_offset(), device)


@dataclass
class StepTensors:
    params: list[torch.Tensor]
    extras: list[torch.Tensor]
    states: list[list[torch.Tensor]]
    steps: list[torch.Tensor]
    lr: torch.Tensor

    def twin(self, device) -> StepTensors:
        return StepTensors(
            [_twin(t, device) for t in self.params],
            [_twin(t, device) for t in self.extras],
            [[_twin(t, device) for t in state] for state in self.states],
            [t.to(device, copy=True) for t in self.steps],
            self.lr.to(device, copy=True),
        )

    def named(self):
        """(name, tensor) for everything a step writes."""
        yield from ((f"params[{i}]", t) for i, t in enumerate(self.params))
        yield from ((f"extras[{i}]", t) for i, t in enumerate(self.extras))
        for j, state in enumerate(self.states):
            yield from ((f"states[{j}][{i}]", t) for i, t in enumerate(state))


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.full_like(x, 0.5), x)


def _state_values(j: int, n: int, gen) -> torch.Tensor:
    # State 1 is AdamW's second moment, which is >= 0; the others take either sign.
    if j == 1:
        return torch.rand(n, generator=gen) * 1e-2 + 1e-6
    return _nonzero(torch.randn(n, generator=gen) * 1e-1)


def _nonfinite_weights(params, dtype, nonfinite_weights):
    for i, k, value in nonfinite_weights:
        if value == "nan-payload":
            params[i].view(BIT_VIEW[dtype])[k] = NAN_PAYLOAD[dtype]
        else:
            params[i][k] = value


def _make(sizes, dtype, extra_bits, state_dtype, num_states, gen, nonfinite_weights=()) -> StepTensors:
    params = [_place(_nonzero(torch.randn(n, generator=gen).to(dtype)), off, "cpu") for n, off, _ in sizes]
    _nonfinite_weights(params, dtype, nonfinite_weights)
    extras = []
    if dtype != torch.float32 and extra_bits > 0:
        mb = MANTISSA_BITS[dtype]
        half = 1 << (min(mb + extra_bits, 23) - mb - 1)  # the extra bits lie in [-half, half)
        ext_dtype = torch.int16 if extra_bits == 16 else torch.int8
        extras = [
            _place(torch.randint(-half, half, (n,), generator=gen).to(ext_dtype), off, "cpu") for n, off, _ in sizes
        ]
    states = [
        [_place(_state_values(j, n, gen).to(state_dtype), off, "cpu") for n, off, _ in sizes] for j in range(num_states)
    ]
    steps = [torch.tensor(int(s), dtype=torch.int64) for s in torch.randint(0, 20, (len(sizes),), generator=gen)]
    return StepTensors(params, extras, states, steps, torch.tensor([LR], dtype=torch.float32))


def _grads(sizes, dtype, nonfinite, gen) -> list[torch.Tensor]:
    grads = [_nonzero(torch.randn(n, generator=gen) * 1e-1) for n, _, _ in sizes]
    for i, k, value in nonfinite:
        grads[i][k] = value
    return [_place(g.to(dtype), off, "cpu") for g, (_, _, off) in zip(grads, sizes)]


def _step(ops, rule, t: StepTensors, grads, tensor_ids, extra_bits, lr_mode, arithmetic):
    name, num_states, hyper = OPS[rule]
    states = dict(zip(STATE_ARGS[name], t.states)) if num_states else {"momentum_buffers": []}
    for s in t.steps:
        s += 1
    getattr(ops, name)(
        params=t.params,
        grads=grads,
        extras=t.extras,
        **states,
        steps=t.steps,
        tensor_ids=tensor_ids,
        lr_tensor=t.lr if lr_mode == "tensor" else None,
        lr=LR,
        extra_bits=extra_bits,
        seed=SEED,
        arithmetic=arithmetic,
        **hyper,
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.cpu()
    return t.view(BIT_VIEW[t.dtype]) if t.dtype in BIT_VIEW else t


def _run_and_compare(ops, gpu, rule, dtype, extra_bits, state_dtype, lr_mode, sizes, nonfinite, gen,
                     arithmetic="ieee", shape="blocks_shuffled", nonfinite_weights=()) -> StepTensors:
    num_states = OPS[rule][1]
    cpu = _make(sizes, dtype, extra_bits, state_dtype, num_states, gen, nonfinite_weights)
    cuda = cpu.twin(gpu.device)
    tensor_ids = torch.randperm(1 << 20, generator=gen)[: len(sizes)].mul(4093).tolist()
    for i in range(STEPS):
        # A warmup schedule kept on the device: the kernel must read lr when it runs.
        cpu.lr.fill_(LR * (i + 1) / STEPS)
        cuda.lr.fill_(LR * (i + 1) / STEPS)
        grads = _grads(sizes, dtype, nonfinite, gen)
        _step(ops, rule, cpu, grads, tensor_ids, extra_bits, lr_mode, arithmetic)
        with gpu.run(**EMU_SHAPES[shape]):
            _step(ops, rule, cuda, [_twin(g, gpu.device) for g in grads], tensor_ids, extra_bits, lr_mode, arithmetic)
    gpu.synchronize()
    for (name, a), (_, b) in zip(cpu.named(), cuda.named()):
        ba, bb = _bits(a), _bits(b)
        assert torch.equal(ba, bb), f"{name}: {int((ba != bb).sum())} of {a.numel()} elements differ from the CPU"
    return cpu


@pytest.mark.parametrize("rule,dtype,extra_bits,state_dtype,arithmetic,lr_mode,shape", _cases(full=False))
def test_cuda_matches_cpu(ops, gpu, rule, dtype, extra_bits, state_dtype, arithmetic, lr_mode, shape):
    gen = torch.Generator().manual_seed(20240611)
    _run_and_compare(ops, gpu, rule, dtype, extra_bits, state_dtype, lr_mode, SIZES, NONFINITE, gen, arithmetic,
                     shape, NONFINITE_WEIGHTS)


@pytest.mark.slow
@pytest.mark.parametrize("rule,dtype,extra_bits,state_dtype,arithmetic,lr_mode,shape", _cases(full=True))
def test_cuda_matches_cpu_full(ops, gpu, rule, dtype, extra_bits, state_dtype, arithmetic, lr_mode, shape):
    gen = torch.Generator().manual_seed(19)
    _run_and_compare(ops, gpu, rule, dtype, extra_bits, state_dtype, lr_mode, SIZES, NONFINITE, gen, arithmetic,
                     shape, NONFINITE_WEIGHTS)


CANONICAL_NAN = {torch.float32: 0x7FC0_0000, torch.bfloat16: 0x7FC0, torch.float16: 0x7E00}


@pytest.mark.parametrize("dtype,extra_bits", [(torch.float32, 0), (torch.bfloat16, 16), (torch.bfloat16, 0),
                                              (torch.float16, 8)])
def test_nan_results_are_the_canonical_nan(ops, gpu, dtype, extra_bits):
    # SGD with weight decay on an infinite weight computes inf - inf; on a NaN weight with a payload,
    # NaN. Both backends store the canonical (positive quiet) NaN, not the processor's own.
    gen = torch.Generator().manual_seed(5)
    sizes = [(64, 0, 0)]
    weights = [(0, 0, float("-inf")), (0, 1, float("inf")), (0, 2, "nan-payload"), (0, 3, float("nan"))]
    cpu = _run_and_compare(ops, gpu, "sgd", dtype, extra_bits, torch.float32, "float", sizes, [], gen,
                           nonfinite_weights=weights)
    # With extra bits, an infinite visible weight is the master's rounding, not an infinite master.
    checked = 4 if extra_bits == 0 else 2
    assert _bits(cpu.params[0])[4 - checked:4].tolist() == [CANONICAL_NAN[dtype]] * checked


@pytest.mark.parametrize(
    "rule,dtype,extra_bits,state_dtype",
    [
        pytest.param(*case, id=_case_id(*case))
        for case in [
            ("adamw", torch.bfloat16, 0, torch.bfloat16),
            ("adamw", torch.float16, 16, torch.float32),
            ("lion", torch.bfloat16, 8, torch.bfloat16),
            ("sgd_momentum", torch.float32, 0, torch.float32),
        ]
    ],
)
def test_cuda_matches_cpu_large(ops, gpu, rule, dtype, extra_bits, state_dtype):
    # Two large tensors around many small ones (some misaligned): more tiles than resident
    # blocks, so blocks walk several tiles and cross from one tensor to the next.
    gen = torch.Generator().manual_seed(7)
    small = [(int(n), int(n) % 2, int(n) % 3) for n in torch.randint(1, 3000, (40,), generator=gen)]
    sizes = [((1 << 20) + 3, 0, 0), *small, (3 * (1 << 20) + 1, 0, 0)]
    nonfinite = [(0, 12345, float("nan")), (len(sizes) - 1, (3 << 20), float("inf"))]
    _run_and_compare(ops, gpu, rule, dtype, extra_bits, state_dtype, "tensor", sizes, nonfinite, gen)


def test_cuda_all_empty(ops, gpu):
    # Nothing to launch: the call must return without error.
    params = [torch.empty(0, device=gpu.device, dtype=torch.bfloat16) for _ in range(3)]
    states = [torch.empty(0, device=gpu.device) for _ in params]
    steps = [torch.ones((), dtype=torch.int64, device=gpu.device) for _ in params]
    grads = [p.clone() for p in params]
    with gpu.run():
        ops.lion_(params, grads, [], states, steps, [0, 1, 2], None, LR, 0, SEED, 0.9, 0.99, 0.0, False)
    gpu.synchronize()
