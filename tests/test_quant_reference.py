"""The float32 reference of block-quantized optimizer states (issue 16), on its own.

:mod:`fusedwarm.reference.quant` against the spec written out a second way (float64 tables of the
code grids, pure-Python Philox and lowbias32, the published Random123 known answers), and the
reference optimizers with ``state_dtype="int8"`` / ``"int4"``. Nothing here needs the compiled
extension; the fused kernels are checked against these functions elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedwarm import reference
from fusedwarm.reference import quant
from helpers import seed_all

# Stochastic rounding: |mean of N roundings - x| may be this many standard deviations of the mean
# (spacing / (2 sqrt(N)) at most), plus the bias of 16-bit random words (2^-16 of the spacing).
SR_SIGMAS = 5.0
SR_SAMPLES = 1024
# Training: final loss of the quantized-state reference over the float32-state reference's.
TRAIN_LOSS_RATIO = {"int8": 1.01, "int4": 1.05}

# (bits, signed) -> (exponent bits, mantissa bits) of the magnitude, as the spec lists them.
SPEC_EB_MB = {(8, True): (4, 3), (8, False): (5, 3), (4, True): (2, 1), (4, False): (3, 1)}
FORMATS = list(SPEC_EB_MB)
FORMAT_IDS = [f"{b}bit-{'signed' if s else 'unsigned'}" for b, s in FORMATS]
MASK32 = 0xFFFFFFFF
FLT_MAX = torch.finfo(torch.float32).max


def grid64(bits: int, signed: bool) -> torch.Tensor:
    """The magnitude of every magnitude code, from the spec's formula with math.ldexp, in float64."""
    eb, mb = SPEC_EB_MB[(bits, signed)]
    emin = 2 - 2**eb
    values = []
    for c in range(2 ** (eb + mb)):
        f, j = divmod(c, 2**mb)
        values.append(math.ldexp(1 + j / 2**mb, f - 1 + emin) if f else math.ldexp(j, emin - mb))
    return torch.tensor(values, dtype=torch.float64)


def magnitude_bits(bits: int, signed: bool) -> int:
    return bits - 1 if signed else bits


def default_block(bits: int) -> int:
    return 256 if bits == 8 else 128


def pack(codes: list[int], bits: int) -> torch.Tensor:
    """Per-element codes packed as the spec says, one element at a time."""
    if bits == 8:
        return torch.tensor(codes, dtype=torch.uint8)
    out = [0] * ((len(codes) + 1) // 2)
    for k, c in enumerate(codes):
        out[k >> 1] |= c if k % 2 == 0 else c << 4
    return torch.tensor(out, dtype=torch.uint8)


def random_words(n: int) -> torch.Tensor:
    return torch.randint(0, 2**32, (n,), dtype=torch.int64)


def f32_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


def codes_from_grid(mags: torch.Tensor, signs: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    return mags | (signs << magnitude_bits(bits, signed)) if signed else mags


# ---- code grids and decoding -----------------------------------------------------------------

@pytest.mark.parametrize("bits,signed", FORMATS, ids=FORMAT_IDS)
def test_grid_is_increasing_up_to_qmax(bits, signed):
    grid = grid64(bits, signed)
    _, mb = SPEC_EB_MB[(bits, signed)]
    assert grid[0] == 0 and bool((grid[1:] > grid[:-1]).all())
    assert grid[-1] == 2 - 2.0**-mb == quant.code_format(bits, signed).qmax


def test_4bit_signed_grid_is_mxfp4_over_4():
    assert (grid64(4, True) * 4).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("bits,signed", FORMATS, ids=FORMAT_IDS)
def test_decode_every_code(bits, signed):
    """Every code in blocks of random scales (down to the smallest scale, 2^-126 / Qmax, whose
    products are subnormal): value x scale rounded once to float32, the sign bit set on top."""
    seed_all("decode", bits, signed)
    block = default_block(bits)
    qmax = 2 - 2.0 ** -SPEC_EB_MB[(bits, signed)][1]
    scales = torch.cat([torch.tensor([2.0**-126 / qmax, FLT_MAX / qmax]),
                        torch.exp2(torch.empty(6).uniform_(-120, 120)) * torch.empty(6).uniform_(1, 2)]).float()
    n = block * len(scales)
    c = torch.arange(n) % 2**bits
    expected_mag = grid64(bits, signed)[c & (2 ** magnitude_bits(bits, signed) - 1)]
    expected = (expected_mag * scales.double().repeat_interleave(block)).float()
    if signed:
        expected = torch.where(c >> magnitude_bits(bits, signed) == 1, -expected, expected)
    got = quant.dequantize(pack(c.tolist(), bits), scales, n, bits, signed, block)
    assert got.dtype == torch.float32 and got.shape == (n,)
    assert torch.equal(f32_bits(got), f32_bits(expected))


def test_signed_zero_code_with_sign_decodes_to_negative_zero():
    got = quant.dequantize(torch.tensor([0x80] + [0] * 31, dtype=torch.uint8), torch.tensor([3.0]), 32, 8, True, 32)
    assert f32_bits(got)[0] == f32_bits(torch.tensor(-0.0))


# ---- encoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed", FORMATS, ids=FORMAT_IDS)
def test_round_trip_of_grid_values_is_exact(bits, signed):
    """Grid values times a power-of-two scale (each block holding the largest code) encode to their
    own codes under any random words, and decode to themselves."""
    seed_all("round trip", bits, signed)
    block, nb = default_block(bits), 12
    n = block * nb - block // 2 - 1  # a partial last block, odd n
    mbits = magnitude_bits(bits, signed)
    mags = torch.randint(0, 2**mbits, (n,))
    mags[torch.arange(nb) * block + torch.randint(0, block // 2, (nb,))] = 2**mbits - 1
    signs = torch.randint(0, 2, (n,))
    exps = torch.randint(-100, 100, (nb,))
    scale = torch.exp2(exps.double())
    values = grid64(bits, signed)[mags] * scale.repeat_interleave(block)[:n]
    if signed:
        values = torch.where(signs == 1, -values, values)
    values = values.float()
    codes, scales = quant.quantize_block(values, random_words(n), bits, signed, block)
    assert torch.equal(codes, pack(codes_from_grid(mags, signs, bits, signed).tolist(), bits))
    assert torch.equal(scales, scale.float())
    assert torch.equal(f32_bits(quant.dequantize(codes, scales, n, bits, signed, block)), f32_bits(values))


@pytest.mark.parametrize("word_kind", ["full", "state0", "state1"])
@pytest.mark.parametrize("bits,signed", FORMATS, ids=FORMAT_IDS)
def test_stochastic_rounding_is_unbiased(bits, signed, word_kind):
    """Values spread log-uniformly over every binade, the subnormal range included, each rounded
    SR_SAMPLES times in blocks anchored by Qmax (so scale = 1): every result is a grid neighbour, and
    the mean is the value. ``state0``/``state1`` use the 16 random bits the optimizer states get."""
    seed_all("unbiased", bits, signed, word_kind)
    block = default_block(bits)
    grid = grid64(bits, signed)
    qmax, smallest = float(grid[-1]), float(grid[1])
    # Unsigned codes exclude zero: below the smallest nonzero value rounding is biased on purpose.
    low = smallest if not signed else smallest / 8
    x = torch.exp(torch.empty(block - 1).uniform_(math.log(low), math.log(qmax))).float()
    if signed:
        x = torch.where(torch.rand(block - 1) < 0.5, -x, x)
    values = torch.cat([torch.tensor([qmax]), x]).repeat(SR_SAMPLES)
    words = random_words(values.numel())
    if word_kind == "state0":
        words = words & 0xFFFF0000
    elif word_kind == "state1":
        words = (words << 16) & MASK32
    codes, scales = quant.quantize_block(values, words, bits, signed, block)
    assert bool((scales == 1).all())
    got = quant.dequantize(codes, scales, values.numel(), bits, signed, block).double()
    got = got.reshape(SR_SAMPLES, block)[:, 1:]
    mag = x.double().abs()
    lower = grid[torch.searchsorted(grid, mag, right=True) - 1]
    upper = grid[torch.searchsorted(grid, mag, right=False)]
    sign = torch.where(x < 0, -1.0, 1.0).double()
    assert bool(((got == sign * lower) | (got == sign * upper)).all())
    spacing = upper - lower
    tol = SR_SIGMAS * spacing / (2 * math.sqrt(SR_SAMPLES)) + spacing * 2.0**-16
    assert bool(((got.mean(0) - x.double()).abs() <= tol).all())


def test_int32_words_are_uint32_bit_patterns():
    """Words may come as int32 holding uint32 bit patterns (as the fused ops take them)."""
    seed_all("int32 words")
    values, words = torch.randn(1000), random_words(1000)
    as_int32 = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    for bits, signed in FORMATS:
        a = quant.quantize_block(values, words, bits, signed, 64)
        b = quant.quantize_block(values, as_int32, bits, signed, 64)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic_conversion_rounds_half_up():
    """words=None is the word 0x80000000: a value halfway between grid points rounds up, a value
    one float32 ulp below the midpoint rounds down (scale 1: each block also holds Qmax). Normal
    codes only: below 2^emin the spec first rounds x + 2^emin to float32, which can carry a value
    one ulp below the midpoint onto it."""
    seed_all("half up")
    grid = grid64(8, True).float()
    k = torch.randint(8, len(grid) - 1, (31,))
    mid = ((grid[k].double() + grid[k + 1].double()) / 2).float()
    below = torch.nextafter(mid, torch.zeros(()))
    values = torch.cat([torch.tensor([grid[-1]]), mid, torch.tensor([grid[-1]]), below])
    codes, _ = quant.quantize_block(values, None, 8, True, 32)
    assert torch.equal(codes[1:32].long(), k + 1) and torch.equal(codes[33:].long(), k)


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_exclusion_of_unsigned_codes(bits):
    """Unsigned codes round nonzero magnitudes far below the grid to code 1, never 0 (Li et al.
    2023); zero stays 0. Signed codes round them to 0 (words 0 round down), keeping the sign bit."""
    seed_all("zero exclusion", bits)
    n = 64
    tiny = torch.randn(n) * 1e-25
    tiny[0], tiny[1], tiny[2] = 1.0, 0.0, 1e-45  # the block maximum, a zero, the smallest subnormal
    zero_words = torch.zeros(n, dtype=torch.int64)
    for words in (zero_words, random_words(n)):
        codes, _ = quant.quantize_block(tiny, words, bits, False, 64)
        c = quant.unpack_codes(codes, n, bits)
        assert c[1] == 0 and bool((c[2:] == 1).all())
    codes, _ = quant.quantize_block(tiny, zero_words, bits, True, 64)
    c = quant.unpack_codes(codes, n, bits)
    assert torch.equal(c[1:], (tiny[1:] < 0).long() << (bits - 1))


@pytest.mark.parametrize("bits,signed", FORMATS, ids=FORMAT_IDS)
def test_inf_and_nan_saturate_to_flt_max(bits, signed):
    """Infinities and NaNs count as FLT_MAX: their block's scale is FLT_MAX / Qmax, they take the
    code of FLT_MAX (with their sign bit, signed kind), and the rest of the block rounds to 0 (1 for
    unsigned codes). inv = Qmax / FLT_MAX is subnormal, so FLT_MAX inv falls a little below Qmax:
    with words 0 (round down) it takes the code below the largest."""
    seed_all("saturate", bits, signed)
    block = 32
    values = torch.randn(4 * block)
    specials = torch.tensor([math.inf, -math.inf, math.nan, -math.nan])
    where = torch.arange(4) * block + torch.randint(0, block, (4,))
    values[where] = specials
    codes, scales = quant.quantize_block(values, torch.zeros(values.numel(), dtype=torch.int64), bits, signed, block)
    grid = grid64(bits, signed)
    qmax = float(grid[-1])
    assert torch.equal(scales, torch.full((4,), FLT_MAX / qmax, dtype=torch.float64).float())
    inv = torch.tensor(qmax / FLT_MAX).float()
    assert inv < torch.finfo(torch.float32).tiny  # subnormal
    x = FLT_MAX * inv.double()  # exact in float64 (24 x 24 bits), a float32 value
    mag = int(torch.searchsorted(grid, x, right=True)) - 1
    assert mag == 2 ** magnitude_bits(bits, signed) - 2
    c = quant.unpack_codes(codes, values.numel(), bits)
    special_sign = (f32_bits(specials) < 0).long()
    assert torch.equal(c[where], codes_from_grid(torch.full((4,), mag), special_sign, bits, signed))
    others = torch.ones(values.numel(), dtype=torch.bool)
    others[where] = False
    top = 2 ** magnitude_bits(bits, signed) - 1
    assert bool(((c[others] & top) == (0 if signed else 1)).all())
    decoded = quant.dequantize(codes, scales, values.numel(), bits, signed, block)
    assert bool((decoded[where].abs() == (grid[mag] * scales[0].double()).float()).all())
    ones = torch.full((values.numel(),), MASK32, dtype=torch.int64)  # round up: onto Qmax
    c = quant.unpack_codes(quant.quantize_block(values, ones, bits, signed, block)[0], values.numel(), bits)
    assert bool(((c[where] & top) == top).all())


@pytest.mark.parametrize("block", [32, 64, 512, 2048])
@pytest.mark.parametrize("bits,signed", FORMATS, ids=FORMAT_IDS)
def test_scales_are_block_maxima_over_qmax(bits, signed, block):
    """One scale per block of consecutive elements (the last one partial): its largest magnitude
    over Qmax; a block of zeros gets 2^-126 / Qmax and codes 0 (signed -0.0: the sign bit only)."""
    seed_all("scales", bits, signed, block)
    n = 3 * block + 5
    values = torch.randn(n) * torch.exp2(torch.randint(-20, 20, (n,)).float())
    values[block:2 * block] = -0.0 if signed else 0.0
    codes, scales = quant.quantize_block(values, random_words(n), bits, signed, block)
    qmax = float(grid64(bits, signed)[-1])
    maxima = torch.stack([values[i:i + block].abs().max() for i in range(0, n, block)]).double()
    maxima[1] = 2.0**-126
    assert torch.equal(scales, (maxima / qmax).float())
    c = quant.unpack_codes(codes, n, bits)[block:2 * block]
    assert bool((c == (1 << magnitude_bits(bits, signed) if signed else 0)).all())
    decoded = quant.dequantize(codes, scales, n, bits, signed, block)[block:2 * block]
    assert torch.equal(f32_bits(decoded), f32_bits(values[block:2 * block]))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_4bit_nibbles_with_odd_element_count(signed):
    """Element k's code is in byte k >> 1, the low nibble for even k and the high one for odd k; the
    unused high nibble of the last byte of an odd count is 0."""
    seed_all("nibbles", signed)
    n = 3 * 128 + 77
    mbits = magnitude_bits(4, signed)
    mags = torch.randint(1, 2**mbits, (n,))
    mags[torch.arange(4) * 128] = 2**mbits - 1
    signs = torch.randint(0, 2, (n,))
    values = (grid64(4, signed)[mags] * torch.where((signs == 1) & signed, -1.0, 1.0).double()).float()
    codes, scales = quant.quantize_block(values, random_words(n), 4, signed, 128)
    expected = codes_from_grid(mags, signs, 4, signed).tolist()
    assert codes.numel() == (n + 1) // 2
    for k in torch.randint(0, n, (64,)).tolist() + [n - 1]:
        byte = int(codes[k >> 1])
        assert (byte & 0xF if k % 2 == 0 else byte >> 4) == expected[k]
    assert int(codes[-1]) >> 4 == 0
    assert torch.equal(quant.dequantize(codes, scales, n, 4, signed, 128), values)


def test_invalid_formats_and_shapes_raise():
    values = torch.randn(64)
    for bits in (2, 6, 16, 8.0):
        with pytest.raises(ValueError, match="bits"):
            quant.quantize_block(values, None, bits, True)
    for block in (16, 100, 4096, 256.0):
        with pytest.raises(ValueError, match="block size"):
            quant.quantize_block(values, None, 8, True, block)
    with pytest.raises(ValueError, match="float32"):
        quant.quantize_block(values.double(), None, 8, True)
    with pytest.raises(ValueError, match="words"):
        quant.quantize_block(values, random_words(63), 8, True)
    codes, scales = quant.quantize_block(values, None, 4, False, 32)
    with pytest.raises(ValueError, match="codes"):
        quant.dequantize(codes, scales, 64, 8, False, 32)
    with pytest.raises(ValueError, match="scales"):
        quant.dequantize(codes, scales, 64, 4, False, 64)


# ---- random words -----------------------------------------------------------------------------

def philox_py(counter, key):
    """Philox4x32-10 in Python integers, written from Salmon et al. 2011."""
    def mulhilo(a, b):
        p = a * b
        return p >> 32, p & MASK32
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        hi0, lo0 = mulhilo(0xD2511F53, c0)
        hi1, lo1 = mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def lowbias32_py(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


# Random123's published known answers for philox4x32_10 (kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(v) for v in quant.philox4x32_10(counter, key)) == expected
    assert philox_py(counter, key) == expected


def test_philox_and_lowbias32_elementwise_match_python_integers():
    seed_all("philox elementwise")
    words = random_words(6 * 64).reshape(6, 64)
    out = quant.philox4x32_10(tuple(words[:4]), tuple(words[4:]))
    hashed = quant.lowbias32(words[0])
    for i in range(0, 64, 7):
        assert tuple(int(o[i]) for o in out) == philox_py(tuple(int(w) for w in words[:4, i]),
                                                          tuple(int(w) for w in words[4:, i]))
        assert int(hashed[i]) == lowbias32_py(int(words[0, i]))


def test_element_words_follow_the_stream_spec():
    """Key per (seed, tensor, step, 2^30-element block); counter = key + offset in the block; word j
    = lowbias32(counter + j 2^30): checked across random-block boundaries, with 64-bit seed and step."""
    seed_all("element words")
    seed = int(torch.randint(0, 2**62, ())) * 4 + 3  # above 2^32: both key words matter
    tensor_id, step = 5, 2**33 + 7
    indices = torch.tensor([0, 1, 2**30 - 1, 2**30, 2**30 + 1, 3 * 2**30 + 12345, 12345])
    got = quant.element_words(seed, tensor_id, step, indices, 4)
    for i, index in enumerate(indices.tolist()):
        key = philox_py((tensor_id, step & MASK32, step >> 32, index >> 30), (seed & MASK32, seed >> 32))[0]
        assert quant.stream_key(seed, tensor_id, step, index >> 30) == key
        counter = (key + (index & (2**30 - 1))) & MASK32
        for j in range(4):
            assert int(got[j, i]) == lowbias32_py((counter + j * 2**30) & MASK32)
    assert torch.equal(quant.element_words(seed, tensor_id, step, 10, 2), quant.element_words(
        seed, tensor_id, step, torch.arange(10), 2))


# ---- reference optimizers with quantized states -----------------------------------------------

RULES = {
    "AdamW": dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0),
    "SGD": dict(lr=1e-2, momentum=0.9),
    "Lion": dict(lr=1e-3, betas=(0.9, 0.99)),
}
STATES = {"AdamW": ("exp_avg", "exp_avg_sq"), "SGD": ("momentum_buffer",), "Lion": ("exp_avg",)}
WEIGHTS = [(torch.float32, 16, False), (torch.bfloat16, 16, False), (torch.bfloat16, 8, True),
           (torch.bfloat16, 0, True), (torch.float16, 16, True)]
WEIGHT_IDS = ["f32", "bf16x16", "bf16x8", "bf16x0", "f16x16"]


def first_step_states(name: str, g: torch.Tensor) -> list[torch.Tensor]:
    """The float32 states after the first step from zero states, in the reference's own operations."""
    hyper = RULES[name]
    if name == "SGD":
        return [g.clone()]
    beta1, beta2 = hyper["betas"]
    if name == "Lion":
        return [torch.zeros_like(g).mul_(beta2).add_((1 - beta2) * g)]
    return [torch.zeros_like(g).mul_(beta1).add_((1 - beta1) * g),
            torch.zeros_like(g).mul_(beta2).add_((1 - beta2) * g * g)]


@pytest.mark.parametrize("dtype,extra_bits,lossy", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("name", list(RULES))
def test_state_codes_use_the_word_after_the_weights(name, dtype, extra_bits, lossy):
    """After one step the codes are quantize_block of the rule's float32 states with the element
    words of this tensor's id (its index in the optimizer, across groups) and step 1: word 1 when
    the weight is lossy, else word 0; its high half for state 0, its low half for state 1."""
    seed_all("words", name, dtype, extra_bits)
    small, big = torch.nn.Parameter(torch.randn(7).to(dtype)), torch.nn.Parameter(torch.randn(40, 130).to(dtype))
    other = torch.nn.Parameter(torch.randn(8).to(dtype))
    opt = getattr(reference, name)([small], **RULES[name], extra_bits=extra_bits, state_dtype="int8", seed=1234)
    opt.add_param_group({"params": [other, big]})
    big.grad = torch.randn(big.shape).to(dtype)
    opt.step()
    assert quant.weight_is_lossy(dtype, extra_bits) == lossy
    words = quant.element_words(1234, 2, 1, big.numel(), 2)  # tensor id 2, step 1
    values = first_step_states(name, big.grad.float().reshape(-1))
    for state_word, expected in ((int(lossy), True), (int(not lossy), False)):
        w = words[state_word]
        for i, state_name in enumerate(STATES[name]):
            r = w & 0xFFFF0000 if i == 0 else (w << 16) & MASK32
            codes, scales = quant.quantize_block(values[i], r, 8, i == 0)
            assert torch.equal(opt.state[big][state_name + "_scale"], scales)
            assert torch.equal(opt.state[big][state_name], codes) == expected, (state_name, state_word)


@pytest.mark.parametrize("state_dtype,block", [("int8", None), ("int4", None), ("int4", 64), ("int8", 2048)])
def test_state_layout_and_zero_start(state_dtype, block):
    """Parameters of >= 4096 elements keep codes and block scales (codes 0 and scales 0 before any
    update: a step whose gradients are all NaN changes nothing), smaller ones float32 states."""
    bits = quant.QUANT_DTYPES[state_dtype]
    block_size = block or default_block(bits)
    big, small = torch.nn.Parameter(torch.randn(4097)), torch.nn.Parameter(torch.randn(4095))
    opt = reference.AdamW([big, small], lr=1e-2, state_dtype=state_dtype, state_block=block, seed=0)
    before = big.detach().clone()
    big.grad = torch.full_like(big, math.nan)
    small.grad = torch.randn_like(small)
    opt.step()
    s = opt.state[big]
    assert torch.equal(big, before)
    for name in ("exp_avg", "exp_avg_sq"):
        assert s[name].dtype == torch.uint8 and s[name].shape == (quant.code_bytes(4097, bits),)
        assert s[name + "_scale"].dtype == torch.float32 and s[name + "_scale"].shape == (-(-4097 // block_size),)
        assert not s[name].any() and not s[name + "_scale"].any()
        assert opt.state[small][name].dtype == torch.float32 and opt.state[small][name].shape == small.shape


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_nonfinite_gradient_leaves_its_whole_block_untouched(state_dtype):
    """A non-finite gradient skips every element of its block (master, weight, codes, scale) and
    nothing else (weight decay moves every other master element); a small (float32-state) parameter
    still skips only the element."""
    seed_all("nonfinite", state_dtype)
    bits = quant.QUANT_DTYPES[state_dtype]
    block = default_block(bits)
    big, small = torch.nn.Parameter(torch.randn(20, 410)), torch.nn.Parameter(torch.randn(100))
    opt = reference.AdamW([big, small], lr=1e-2, state_dtype=state_dtype, seed=7, warmup="none")
    for _ in range(2):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        opt.step()
    s = opt.state[big]
    before = {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
    before_small = opt.master_weight(small)
    g = torch.randn_like(big)
    g.view(-1)[5 * block + 17] = math.inf
    g.view(-1)[9 * block] = -math.nan
    g.view(-1)[-1] = -math.inf  # the partial last block
    big.grad, small.grad = g, torch.randn_like(small)
    small.grad[3] = math.nan
    opt.step()
    nb = -(-big.numel() // block)
    skipped = torch.zeros(nb, dtype=torch.bool)
    skipped[[5, 9, nb - 1]] = True
    elem = skipped.repeat_interleave(block)[:big.numel()]
    byte = skipped.repeat_interleave(block * bits // 8)[:quant.code_bytes(big.numel(), bits)]
    master = s["master"].reshape(-1)
    assert torch.equal(master[elem], before["master"].reshape(-1)[elem])
    assert bool((master[~elem] != before["master"].reshape(-1)[~elem]).all())
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(s[name][byte], before[name][byte])
        assert torch.equal(s[name + "_scale"][skipped], before[name + "_scale"][skipped])
        assert bool((s[name + "_scale"][~skipped] != before[name + "_scale"][~skipped]).all())
    changed = opt.master_weight(small) != before_small
    assert not changed[3] and bool(changed[torch.arange(100) != 3].all())


@pytest.mark.parametrize("state_dtype", ["int8", "int4"])
def test_quantized_adamw_trains_close_to_float32_states(state_dtype):
    """Noisy least squares with a 4096-element weight: the loss after training with quantized
    states is within TRAIN_LOSS_RATIO of training with float32 states, near the noise floor."""
    seed_all("train", state_dtype)
    x = torch.randn(128, 64)
    target = x @ torch.randn(64, 64) / math.sqrt(64) + 0.5 * torch.randn(128, 64)
    init = torch.randn(64, 64) * 0.1
    losses = {}
    for states in (None, state_dtype):
        w = torch.nn.Parameter(init.clone())
        opt = reference.AdamW([w], lr=1e-2, weight_decay=0.0, warmup="none", state_dtype=states, seed=11)
        for _ in range(80):
            w.grad = torch.autograd.grad(((x @ w - target) ** 2).mean(), w)[0]
            opt.step()
        with torch.no_grad():
            losses[states] = float(((x @ w - target) ** 2).mean())
    assert opt.state[w]["exp_avg"].dtype == torch.uint8  # the last run's states are quantized
    with torch.no_grad():
        initial = float(((x @ init - target) ** 2).mean())
    assert losses[None] < 0.1 * initial
    assert losses[state_dtype] <= TRAIN_LOSS_RATIO[state_dtype] * losses[None]


def test_optimizer_options_raise():
    p = torch.nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match="seed"):
        reference.AdamW([p], state_dtype="int8")
    with pytest.raises(ValueError, match="block size"):
        reference.SGD([p], momentum=0.9, state_dtype="int4", state_block=100, seed=0)
    with pytest.raises(ValueError, match="state_block"):
        reference.Lion([p], state_block=256)
    opt = reference.Lion([p], state_dtype="int8", seed=0)
    with pytest.raises(ValueError, match="block size"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8))], "state_block": 4096})
    assert len(opt.param_groups) == 1
