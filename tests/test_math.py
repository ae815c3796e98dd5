"""The math header (bits.cuh, philox.cuh), checked through the compiled ops and the optimizers.

* Philox4x32-10 against the Random123 known-answer vectors, and the uniformity of its output.
* The random bytes that stochastic rounding actually uses, recovered from the outside by
  replaying the same step (same seed, step, tensor, element) with different rounding fractions.
* The split master weight: values written through a real optimizer step, read back with
  ``master_weight``, and the visible weight and extra bits compared with the rule in bits.cuh
  (visible = round to nearest, ties away from zero; extra = master pattern - visible << D).

The encode path is reached exactly: an SGD step with lr = a, gradient -1 (or +1), no momentum
and no weight decay from a zero weight computes 0 - a * (-1) = a in float32 with no rounding, so
the value written into the master is exactly the float32 ``a`` (one param group per value, since
lr is per group).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fusedwarm
from fusedwarm import _ops

SIGMAS = 5.0  # statistical checks: a false alarm is a < 1e-6 event per check


@pytest.fixture(scope="module")
def ops():
    return _ops.load()


def chi2_bounds(dof: int, z: float = 4.75) -> tuple[float, float]:
    """Two-sided acceptance interval of a chi-square statistic (Wilson-Hilferty), ~1e-6 per tail."""
    c = 2.0 / (9.0 * dof)
    return dof * (1 - c - z * math.sqrt(c)) ** 3, dof * (1 - c + z * math.sqrt(c)) ** 3


def chi2_uniform(samples: torch.Tensor, bins: int) -> float:
    counts = torch.bincount(samples.reshape(-1).to(torch.int64), minlength=bins).double()
    expected = samples.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def assert_uniform_bytes(samples: torch.Tensor, what: str) -> None:
    lo, hi = chi2_bounds(255)
    stat = chi2_uniform(samples, 256)
    assert lo < stat < hi, f"{what}: chi-square {stat:.1f} over 256 byte values outside ({lo:.1f}, {hi:.1f})"


# ---- float32 bit patterns, as int64 holding uint32 ------------------------------------------------------


def f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def bits_f32(b: torch.Tensor) -> torch.Tensor:
    b = b & 0xFFFFFFFF
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def u16_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def random_finite_f32(n: int, gen: torch.Generator, max_exponent: int = 254) -> torch.Tensor:
    """Arbitrary positive float32 magnitude patterns: every exponent field 0..max_exponent (so
    subnormals included), random mantissas, no zero, no inf/NaN."""
    exponent = torch.randint(0, max_exponent + 1, (n,), generator=gen)
    mantissa = torch.randint(0, 2**23, (n,), generator=gen)
    mantissa = torch.where((exponent == 0) & (mantissa == 0), torch.ones_like(mantissa), mantissa)
    return (exponent << 23) | mantissa


# ---- Philox4x32-10 --------------------------------------------------------------------------------------

# Random123's kat_vectors for philox4x32_10: (counter, key, expected output).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox_key(k0: int, k1: int) -> int:
    """The op's int64 key: k0 | k1 << 32, as a signed 64-bit integer."""
    key = k0 | (k1 << 32)
    return key - 2**64 if key >= 2**63 else key


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(ops, counter, key, expected):
    counters = torch.tensor([counter], dtype=torch.int64)
    out = ops.philox4x32(counters, philox_key(*key))
    assert out.dtype == torch.int64 and out.shape == (1, 4)
    got = tuple(int(v) for v in out[0])
    assert got == expected, f"got {' '.join(f'{v:08x}' for v in got)}"


def test_philox_batch_matches_rows(ops):
    """A batch gives each row the answer it gets alone, and changing any word changes everything."""
    gen = torch.Generator().manual_seed(1)
    counters = torch.randint(0, 2**32, (64, 4), generator=gen, dtype=torch.int64)
    key = philox_key(0xA4093822, 0x299F31D0)
    batch = ops.philox4x32(counters, key)
    for i in (0, 17, 63):
        assert torch.equal(batch[i], ops.philox4x32(counters[i:i + 1], key)[0])
    assert int(batch.min()) >= 0 and int(batch.max()) < 2**32
    for word in range(4):
        flipped = counters.clone()
        flipped[:, word] ^= 1
        assert (ops.philox4x32(flipped, key) != batch).all(dim=1).float().mean() > 0.99
    for k in (key ^ 1, key ^ (1 << 40)):  # low and high key word
        assert (ops.philox4x32(counters, k) != batch).all(dim=1).float().mean() > 0.99


def test_philox_output_bytes_are_uniform(ops):
    """Chi-square over each of the 16 output byte positions, for structured counters (a
    sequential element index, a tensor id and a step) under a few keys."""
    n = 8192
    index = torch.arange(n, dtype=torch.int64)
    outputs = []
    for tensor_id, step, key in [(0, 1, 0), (3, 1, 12345), (3, 2, 12345), (1, 7, philox_key(0xDEADBEEF, 0xFFFFFFFF))]:
        counters = torch.stack([index, torch.zeros_like(index), torch.full_like(index, tensor_id),
                                torch.full_like(index, step)], dim=1)
        outputs.append(ops.philox4x32(counters, key))
    words = torch.cat(outputs)  # [4n, 4]
    byte_columns = torch.stack([(words[:, w] >> (8 * b)) & 0xFF for w in range(4) for b in range(4)], dim=1)
    for col in range(16):
        assert_uniform_bytes(byte_columns[:, col], f"word {col // 4} byte {col % 4}")
    assert_uniform_bytes(byte_columns, "all bytes")


# ---- the random bytes stochastic rounding uses ---------------------------------------------------------------


def recover_rounding_bytes(seed: int, step: int, values: torch.Tensor) -> torch.Tensor:
    """The top byte of the random word that rounds each element of ``values`` (one row per tensor,
    bfloat16 in [1, 2) in magnitude) at optimizer step ``step``, found from the outside.

    With extra_bits=0 an SGD step writing |v| + k/256 ulp rounds up iff the top byte t of the
    element's random word satisfies t >= 256 - k (floor(q / 2^s + rnd / 2^32) for any resolution of
    rnd that is at least 8 bits). Replaying the same step (fresh optimizer, same seed, tensor, step
    and element) with a binary search on k recovers t exactly.
    """
    sign = torch.sign(values.float())
    lo = torch.ones(values.shape, dtype=torch.int64)
    hi = torch.full(values.shape, 256, dtype=torch.int64)
    for _ in range(8):
        mid = (lo + hi) // 2
        params = [nn.Parameter(row.clone()) for row in values]
        opt = fusedwarm.SGD(params, lr=0.0, momentum=0.0, weight_decay=0.0, extra_bits=0, seed=seed)
        for _ in range(step - 1):  # lr = 0: the weights stay exactly as they are
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
        opt.param_groups[0]["lr"] = 1.0
        for p, s, k in zip(params, sign, mid):
            p.grad = (-s * k.float() * 2.0**-15).to(torch.bfloat16)  # exact: k < 256
        opt.step()
        moved = torch.stack([p.detach().float().abs() for p in params]) - values.float().abs()
        assert torch.all((moved == 0) | (moved == 2.0**-7)), "rounding did not go to a neighbour"
        up = moved > 0
        active = lo < hi
        hi = torch.where(active & up, mid, hi)
        lo = torch.where(active & ~up, mid + 1, lo)
    assert torch.equal(lo, hi)
    return 256 - lo


def test_stochastic_rounding_bytes_are_uniform_and_independent():
    gen = torch.Generator().manual_seed(2)
    n_tensors, n = 3, 2048
    magnitudes = 1.0 + torch.randint(0, 128, (n_tensors, n), generator=gen) / 128.0
    signs = torch.where(torch.rand(n_tensors, n, generator=gen) < 0.5, -1.0, 1.0)
    values = (magnitudes * signs).to(torch.bfloat16)
    seeds = (987654321, 987654321 + 2**32)  # differ only in the high key word
    recovered = {(seed, step): recover_rounding_bytes(seed, step, values) for seed in seeds for step in (1, 3)}

    everything = torch.stack(list(recovered.values()))
    assert_uniform_bytes(everything, "all recovered bytes")
    for key, b in recovered.items():
        assert_uniform_bytes(b, f"seed {key[0]}, step {key[1]}")

    # Streams of different tensors, steps, seeds and neighbouring elements must be unrelated:
    # equal bytes about 1 time in 256 (8 of 2048), not systematically.
    def matches(a, b):
        return int((a == b).sum())

    limit = 40
    for (seed, step), b in recovered.items():
        assert matches(b[0], b[1]) < limit and matches(b[1], b[2]) < limit, "tensors share a stream"
        assert matches(b[:, 1:], b[:, :-1]) < limit * n_tensors, "neighbouring elements share bytes"
    for seed in seeds:
        assert matches(recovered[(seed, 1)], recovered[(seed, 3)]) < limit * n_tensors, "steps share a stream"
    for step in (1, 3):
        assert matches(recovered[(seeds[0], step)], recovered[(seeds[1], step)]) < limit * n_tensors, \
            "the seed's high 32 bits do not matter"

    # The same replay gives the same bytes: the rounding is a pure function of (seed, step, tensor, element).
    assert torch.equal(recover_rounding_bytes(seeds[0], 1, values[:1, :256]), recovered[(seeds[0], 1)][:1, :256])


# ---- the split master weight ----------------------------------------------------------------------------------


def write_masters(magnitudes: torch.Tensor, dtype: torch.dtype, extra_bits: int, replicas: int = 1, seed: int = 0):
    """One SGD step per value (one group each) that writes the exact float32 master +a into the
    first ``replicas`` elements and -a into the rest. Returns (masters, weights, extras) stacked
    as [values, 2 * replicas] (extras is None without extra bits)."""
    params, groups = [], []
    for a in bits_f32(magnitudes).tolist():
        p = nn.Parameter(torch.zeros(2 * replicas, dtype=dtype))  # start: master 0, so step = 0 - a * g
        params.append(p)
        groups.append({"params": [p], "lr": a})
    opt = fusedwarm.SGD(groups, momentum=0.0, weight_decay=0.0, extra_bits=extra_bits, seed=seed)
    grad = torch.cat([-torch.ones(replicas), torch.ones(replicas)]).to(dtype)
    for p in params:
        p.grad = grad.clone()
    opt.step()
    masters = torch.stack([opt.master_weight(p) for p in params])
    weights = torch.stack([p.detach() for p in params])
    extras = torch.stack([opt.state[p]["extra"] for p in params]).to(torch.int64) if extra_bits else None
    return masters, weights, extras


def signed(magnitudes: torch.Tensor, replicas: int) -> torch.Tensor:
    """Expected float32 patterns [+a] * replicas + [-a] * replicas per value."""
    m = magnitudes[:, None].expand(-1, replicas)
    return torch.cat([m, m | 0x80000000], dim=1)


def split_rule(x_bits: torch.Tensor, d: int, to_pattern) -> tuple[torch.Tensor, torch.Tensor]:
    """bits.cuh's split of a master: magnitude pattern X -> (visible pattern, extra bits)."""
    sign = (x_bits >> 31) & 1
    big_x = to_pattern(x_bits & 0x7FFFFFFF)
    top = (big_x + (1 << (d - 1))) >> d
    return (sign << 15) | top, big_x - (top << d)


EDGE_F32 = [0x00000001, 0x00000002, 0x00007FFF, 0x00008000, 0x00018000, 0x007FFFFF, 0x00800000, 0x00808000,
            0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F7FFFFF, 0x3F800001, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF]


def test_bf16_extra16_master_is_exact_float32():
    gen = torch.Generator().manual_seed(3)
    magnitudes = torch.cat([random_finite_f32(400, gen), torch.tensor(EDGE_F32)])
    masters, weights, extras = write_masters(magnitudes, torch.bfloat16, 16)
    expected = signed(magnitudes, 1)
    got = f32_bits(masters)
    bad = (got != expected).nonzero()
    assert bad.numel() == 0, (f"{len(bad)} masters differ, e.g. wrote {int(expected[tuple(bad[0])]):08x}, read "
                              f"{int(got[tuple(bad[0])]):08x}")
    visible, extra = split_rule(expected, 16, lambda x: x)
    assert torch.equal(u16_bits(weights), visible), "the bf16 weight is not round-to-nearest-ties-away of the master"
    assert torch.equal(extras, extra), "the extra bits are not master - (weight << 16)"
    # Away from ties (low 16 bits exactly 0x8000) that is torch's own round-to-nearest cast.
    not_tie = (expected & 0xFFFF) != 0x8000
    assert torch.equal(weights[not_tie], bits_f32(expected).to(torch.bfloat16)[not_tie])
    assert bool(((expected & 0xFFFF) == 0x8000).any()), "the edge cases must include ties"


def test_bf16_extra16_decode_of_any_split_is_exact(ops):
    """master_weight(weight, extra) inverts the split for arbitrary float32 values, without a step."""
    gen = torch.Generator().manual_seed(4)
    magnitudes = torch.cat([random_finite_f32(100_000, gen), torch.tensor(EDGE_F32)])
    signs = torch.randint(0, 2, magnitudes.shape, generator=gen) << 31
    x = magnitudes | signs
    visible, extra = split_rule(x, 16, lambda m: m)
    weight = torch.where(visible >= 2**15, visible - 2**16, visible).to(torch.int16).view(torch.bfloat16)
    out = ops.master_weight(weight, extra.to(torch.int16), 16)
    assert torch.equal(f32_bits(out), x)


def test_bf16_extra8_master_rounds_stochastically_to_15_bits():
    """extra_bits=8: the master has 15 mantissa bits; writing x gives one of its two neighbours on
    that grid (x itself if it is on the grid), up with probability equal to the dropped fraction."""
    gen = torch.Generator().manual_seed(5)
    replicas = 2048
    magnitudes = random_finite_f32(48, gen, max_exponent=253)
    magnitudes = torch.cat([magnitudes, torch.tensor([0x3F800080, 0x00000001, 0x000000FF, 0x3FC00100])])
    masters, weights, extras = write_masters(magnitudes, torch.bfloat16, 8, replicas=replicas, seed=11)
    got = f32_bits(masters)
    sign = (got >> 31) & 1
    assert torch.equal(sign, (signed(magnitudes, replicas) >> 31) & 1)
    mag = got & 0x7FFFFFFF
    floor = (magnitudes & ~0xFF)[:, None]
    assert torch.all((mag & 0xFF) == 0), "the master must lie on the 15-bit grid"
    assert torch.all((mag == floor) | (mag == floor + 0x100)), "the master must be a grid neighbour of x"
    frac = (magnitudes & 0xFF).double() / 256
    ups = (mag != floor).double().sum(dim=1)
    trials = 2 * replicas
    sd = torch.sqrt(trials * frac * (1 - frac))
    assert torch.all((ups - trials * frac).abs() <= SIGMAS * sd + 1), "stochastic rounding is biased"
    assert torch.all(ups[frac == 0] == 0)
    z = (ups - trials * frac).sum() / torch.sqrt((trials * frac * (1 - frac)).sum())
    assert abs(float(z)) < SIGMAS, f"pooled rounding bias z = {float(z):.2f}"
    visible, extra = split_rule(got, 8, lambda m: m >> 8)
    assert torch.equal(u16_bits(weights), visible), "the bf16 weight is not round-to-nearest-ties-away of the master"
    assert torch.equal(extras, extra)


def _f16_pattern(m: torch.Tensor) -> torch.Tensor:
    """Magnitude pattern with fp16's 5 exponent bits and 23 mantissa bits of a normal-range float32."""
    return m - ((127 - 15) << 23)


def test_f16_extra16_master_is_exact_in_fp16_normal_range():
    gen = torch.Generator().manual_seed(6)
    # Exponents 2^-14 .. 2^15 (fp16's normal range and the top binade up to the master's own limit).
    exponent = torch.randint(127 - 14, 127 + 16, (400,), generator=gen)
    magnitudes = (exponent << 23) | torch.randint(0, 2**23, (400,), generator=gen)
    edges = torch.tensor([0x38800000, 0x38800001, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FFFFF, 0x3C001000,
                          0x3C003000])  # 2^-14, 65504, the 65520 overflow tie, 65535.99, ties at 1.0
    magnitudes = torch.cat([magnitudes, edges])
    masters, weights, extras = write_masters(magnitudes, torch.float16, 16)
    expected = signed(magnitudes, 1)
    assert torch.equal(f32_bits(masters), expected), "fp16 + 16 extra bits must hold float32 values exactly"
    visible, extra = split_rule(expected, 13, _f16_pattern)
    assert torch.equal(u16_bits(weights), visible), "the fp16 weight is not round-to-nearest-ties-away of the master"
    assert torch.equal(extras, extra)
    assert torch.all((extra >= -(2**12)) & (extra < 2**12))
    # Away from ties that is torch's round-to-nearest cast (inf from 65520 up, for both).
    not_tie = (expected & 0x1FFF) != 0x1000
    assert torch.equal(weights[not_tie], bits_f32(expected).to(torch.float16)[not_tie])


def test_f16_overflow_gives_inf():
    magnitudes = torch.tensor([0x47800000, 0x47C35000, 0x7E967699, 0x7F7FFFFF])  # 65536, 1e5, 1e38, max float
    masters, weights, extras = write_masters(magnitudes, torch.float16, 16)
    assert torch.equal(masters, torch.tensor([[math.inf, -math.inf]] * 4))
    assert torch.equal(weights, torch.tensor([[math.inf, -math.inf]] * 4, dtype=torch.float16))
    assert torch.all(extras == 0)


def test_f16_extra16_below_normal_range_rounds_to_the_exponent_floor():
    """Below 2^-14 the fp16 master keeps fp16's exponent floor: a grid of 2^-37, stochastically
    rounded (x far below the grid step becomes 0 or 2^-37)."""
    gen = torch.Generator().manual_seed(7)
    replicas = 1024
    exponent = torch.randint(127 - 45, 127 - 14, (24,), generator=gen)
    magnitudes = (exponent << 23) | torch.randint(1, 2**23, (24,), generator=gen)
    magnitudes = torch.cat([magnitudes, torch.tensor([0x2B000000, 0x2B400000])])  # 2^-41 (p = 1/16), 1.5 * 2^-41
    masters, weights, extras = write_masters(magnitudes, torch.float16, 16, replicas=replicas, seed=3)
    x = bits_f32(magnitudes).double()[:, None]
    m = masters.double().abs()
    step = 2.0**-37
    assert torch.all(torch.remainder(m, step) == 0), "masters below fp16's normal range lie on the 2^-37 grid"
    assert torch.all((m == torch.floor(x / step) * step) | (m == torch.ceil(x / step) * step))
    frac = (x / step - torch.floor(x / step))[:, 0]
    ups = (m > x).double().sum(dim=1)
    trials = 2 * replicas
    sd = torch.sqrt(trials * frac * (1 - frac))
    assert torch.all((ups - trials * frac).abs() <= SIGMAS * sd + 1), "stochastic rounding is biased"
    assert torch.equal((f32_bits(masters) >> 31) & 1, (signed(magnitudes, replicas) >> 31) & 1), "sign lost"
    # The visible weight is the round-to-nearest-ties-away of the master (an fp16 subnormal or 0);
    # the master's pattern at the exponent floor counts units of 2^-37.
    visible, extra = split_rule(f32_bits(masters), 13, lambda mb: (bits_f32(mb).double() / step).long())
    assert torch.equal(u16_bits(weights), visible)
    assert torch.equal(extras, extra)
