"""Block-quantized optimizer states and their random words, in plain PyTorch (DESIGN.md layer 6).

The reference of fusedwarm's 8-bit and 4-bit optimizer states (issue 16), written on integer views
of float32 values so that the fused kernels can be checked against it bit for bit. It never imports
the compiled extension.

**Blocks** (block-wise quantization, Dettmers et al. 2022, *8-bit Optimizers via Block-wise
Quantization*): a state of ``n`` elements (flattened in contiguous order) is cut into blocks of
``B`` consecutive elements (the last may be partial), ``B`` a power of two in [32, 2048]; each
block stores one float32 ``scale`` (its largest magnitude over the grid's largest value ``Qmax``)
and one code per element: ``n`` bytes for 8 bits, ``ceil(n / 2)`` bytes for 4 bits (element ``k``
in byte ``k >> 1``, low nibble for even ``k``, high nibble for odd ``k``).

**Codes**: a small float magnitude with ``EB`` exponent and ``MB`` mantissa bits (:class:`CodeFormat`),
with subnormals and no infinities. Magnitude code ``c``, ``F = c >> MB``, ``j = c & (2^MB - 1)``,
``emin = 2 - 2^EB`` decodes to ``(1 + j / 2^MB) 2^(F - 1 + emin)`` for ``F >= 1`` and to
``j 2^(emin - MB)`` for ``F = 0``; the largest value is ``Qmax = 2 - 2^-MB``. The "signed" kind
(first moments and momentum) adds a sign bit on top: E4M3 for 8 bits and E2M1 for 4 bits, whose grid
times 4 is the OCP Microscaling (MX) v1.0 FP4 grid 0, 0.5, 1, 1.5, 2, 3, 4, 6. The "unsigned" kind
(AdamW's second moment) spends that bit on range: E5M3 and E3M1, and never rounds a nonzero value
to the zero code ("zero excluded", after Li et al. 2023, *Memory Efficient Optimizers with 4-bit
States*), since ``1 / sqrt(v)`` of a zeroed ``v`` is an enormous step.

**Encoding** rounds stochastically (Zamirai et al. 2020) with one 32-bit random word per element,
so that EMAs with small ``1 - beta`` keep moving in expectation; a deterministic conversion uses
the word :data:`ROUND_HALF_UP` (round half up). The words come from the counter-based stream that
fusedwarm's bfloat16 states use (:func:`stream_key`, :func:`element_words`, :func:`state_words`):
Philox4x32-10 (Salmon et al. 2011, *Parallel Random Numbers: As Easy as 1, 2, 3*) keys each
(seed, tensor, step, 2^30-element block), and C. Wellons' lowbias32 hash turns an element's counter
into its words. All 32-bit arithmetic is done exactly in int64 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QUANT_DTYPES = {"int8": 8, "int4": 4}   # state_dtype -> bits per code
DEFAULT_BLOCK = {8: 256, 4: 128}        # bits -> default block size
MIN_BLOCK, MAX_BLOCK = 32, 2048
QUANT_MIN_NUMEL = 4096                  # smaller parameters keep unquantized states
ROUND_HALF_UP = 0x80000000              # the random word of deterministic conversions

_MASK32 = 0xFFFFFFFF
_FLT_MAX_BITS = 0x7F7FFFFF
_MIN_NORMAL_BITS = 0x00800000           # 2^-126
_RANDOM_BLOCK_BITS = 30                 # elements per random block: 2^30 (philox.cuh)


@dataclass(frozen=True)
class CodeFormat:
    """One code kind: ``bits`` per code, ``signed`` (a sign bit on top) or not, and its grid.

    ``EB``/``MB`` are the magnitude's exponent and mantissa bits, ``emin = 2 - 2^EB`` the exponent
    of the smallest normal value ``T = 2^emin``, ``qmax = 2 - 2^-MB`` the largest value, and
    ``drop = 23 - MB`` the float32 mantissa bits that rounding removes.
    """

    bits: int
    signed: bool

    @property
    def EB(self) -> int:
        return {(8, True): 4, (8, False): 5, (4, True): 2, (4, False): 3}[(self.bits, self.signed)]

    @property
    def MB(self) -> int:
        return {8: 3, 4: 1}[self.bits]

    @property
    def magnitude_bits(self) -> int:
        return self.EB + self.MB

    @property
    def emin(self) -> int:
        return 2 - 2**self.EB

    @property
    def qmax(self) -> float:
        return 2.0 - 2.0**-self.MB

    @property
    def drop(self) -> int:
        return 23 - self.MB


def code_format(bits: int, signed: bool) -> CodeFormat:
    """The code kind of ``bits`` (8 or 4) per code, signed or unsigned; ValueError otherwise."""
    if type(bits) is not int or bits not in DEFAULT_BLOCK:
        raise ValueError(f"Invalid bits: {bits!r} (expected 8 or 4)")
    return CodeFormat(bits, bool(signed))


def check_block(block: int | None, bits: int) -> int:
    """The block size: ``block``, or the default of ``bits`` (256 for 8, 128 for 4) when None.

    Raises ValueError unless it is a power of two in [32, 2048].
    """
    code_format(bits, True)
    if block is None:
        return DEFAULT_BLOCK[bits]
    if type(block) is not int or not MIN_BLOCK <= block <= MAX_BLOCK or block & (block - 1):
        raise ValueError(f"Invalid block size: {block!r} (expected a power of two from {MIN_BLOCK} to {MAX_BLOCK})")
    return block


def num_blocks(numel: int, block: int) -> int:
    """The number of scales of ``numel`` elements in blocks of ``block``: ceil(numel / block)."""
    return -(-numel // block)


def code_bytes(numel: int, bits: int) -> int:
    """The bytes of codes of ``numel`` elements: numel for 8 bits, ceil(numel / 2) for 4."""
    return numel if bits == 8 else -(-numel // 2)


# ---- float32 bit patterns as int64 in [0, 2^32) ------------------------------------------------

def _float_bits(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def _bits_float(b: Tensor) -> Tensor:
    b = b & _MASK32
    return torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)


def _f32(x: float, like: Tensor) -> Tensor:
    """``x`` as a float32 tensor shaped like ``like``: tensor-tensor ops, no scalar fast paths."""
    return torch.full(like.shape, x, dtype=torch.float32, device=like.device)


def _as_words(words: Tensor | None, n: int, device: torch.device) -> Tensor:
    if words is None:
        return torch.full((n,), ROUND_HALF_UP, dtype=torch.int64, device=device)
    if words.dtype not in (torch.int32, torch.int64) or words.numel() != n:
        raise ValueError(f"words: expected an int32 or int64 tensor of {n} elements, got "
                         f"{words.dtype} with {words.numel()}")
    return words.reshape(-1).to(torch.int64) & _MASK32


# ---- decode -------------------------------------------------------------------------------------

def decode_magnitude(c: Tensor, fmt: CodeFormat) -> Tensor:
    """The float32 grid value of magnitude codes ``c`` (integers in [0, 2^(EB+MB))): exact."""
    c = c.to(torch.int64)
    F, j = c >> fmt.MB, c & (2**fmt.MB - 1)
    normal = _bits_float(((F - 1 + fmt.emin + 127) << 23) | (j << fmt.drop))   # (1 + j/2^MB) 2^(F-1+emin)
    subnormal = j.to(torch.float32) * _f32(2.0 ** (fmt.emin - fmt.MB), j)        # j 2^(emin-MB)
    return torch.where(F >= 1, normal, subnormal)


def unpack_codes(codes: Tensor, numel: int, bits: int) -> Tensor:
    """The per-element codes (int64) of ``numel`` elements from their packed bytes."""
    b = codes.reshape(-1).to(torch.int64)
    if bits == 4:
        b = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1)
    return b[:numel]


def pack_codes(c: Tensor, bits: int) -> Tensor:
    """Per-element codes as bytes: one per byte (8 bits), or two (4 bits; even element low)."""
    if bits == 4:
        if c.numel() % 2:
            c = torch.cat([c, c.new_zeros(1)])
        c = c[0::2] | (c[1::2] << 4)
    return c.to(torch.uint8)


def dequantize(codes: Tensor, scales: Tensor, numel: int, bits: int, signed: bool, block: int | None = None) -> Tensor:
    """Decodes a block-quantized state to float32.

    Each element is ``value(c) * scale`` as one float32 multiply (round to nearest even), its code's
    sign bit (signed kind) then set as the float's sign bit, so code 0x80 decodes to -0.0.

    Args:
        codes: uint8, :func:`code_bytes` ``(numel, bits)`` bytes.
        scales: float32, :func:`num_blocks` ``(numel, block)`` entries.
        numel: the number of elements.
        bits, signed: the code kind (:func:`code_format`).
        block: the block size (None: the default of ``bits``).

    Returns:
        A float32 tensor of ``numel`` elements.
    """
    fmt = code_format(bits, signed)
    block = check_block(block, bits)
    if codes.dtype != torch.uint8 or codes.numel() != code_bytes(numel, bits):
        raise ValueError(f"codes: expected uint8 with {code_bytes(numel, bits)} bytes for {numel} {bits}-bit codes, "
                         f"got {codes.dtype} with {codes.numel()}")
    if scales.dtype != torch.float32 or scales.numel() != num_blocks(numel, block):
        raise ValueError(f"scales: expected float32 with {num_blocks(numel, block)} entries for {numel} elements in "
                         f"blocks of {block}, got {scales.dtype} with {scales.numel()}")
    c = unpack_codes(codes, numel, bits)
    sign = c >> fmt.magnitude_bits if fmt.signed else torch.zeros_like(c)
    value = decode_magnitude(c & (2**fmt.magnitude_bits - 1), fmt)
    scale = scales.reshape(-1).repeat_interleave(block)[:numel]
    return _bits_float(_float_bits(value * scale) | (sign << 31))


# ---- encode -------------------------------------------------------------------------------------

def round_to_grid(x: Tensor, words: Tensor, fmt: CodeFormat) -> Tensor:
    """Magnitude codes of ``x`` (float32 in [0, Qmax]), rounded stochastically with ``words``.

    The top ``drop`` bits of each word are added below the kept mantissa bits before truncating, so
    ``x`` rounds up with probability (its distance from the grid point below) / (the spacing).
    Below ``T = 2^emin`` the fixed spacing of the subnormals is made a mantissa spacing by adding
    ``T`` first (a float32 add, rounded to nearest even).
    """
    u = (words & _MASK32) >> (32 - fmt.drop)
    T = _f32(2.0**fmt.emin, x)
    normal = ((_float_bits(x) + u) >> fmt.drop) - ((127 + fmt.emin - 1) << fmt.MB)
    subnormal = ((_float_bits(x + T) + u) >> fmt.drop) - ((127 + fmt.emin) << fmt.MB)
    return torch.where(x >= T, normal, subnormal)


def quantize_block(values: Tensor, words: Tensor | None, bits: int, signed: bool,
                   block: int | None = None) -> tuple[Tensor, Tensor]:
    """Encodes float32 values block-wise with stochastic rounding (the spec of issue 16).

    Per block: the magnitudes saturated to FLT_MAX (so infinities and NaNs count as FLT_MAX), their
    maximum ``A' = max(A, 2^-126)``, ``scale = A' / Qmax`` and ``inv = Qmax / A'`` (float32
    divisions), ``x = min(|f| inv, Qmax)`` (a float32 multiply) rounded onto the grid with the
    element's random word (:func:`round_to_grid`); unsigned codes round nonzero magnitudes to at
    least code 1 (zero exclusion); signed codes take ``f``'s sign bit on top.

    Args:
        values: float32, any shape; encoded in flattened contiguous order.
        words: one 32-bit random word per element (int32 or int64 holding uint32 values), or None
            for a deterministic conversion (every word :data:`ROUND_HALF_UP`).
        bits, signed: the code kind (:func:`code_format`).
        block: the block size (None: the default of ``bits``).

    Returns:
        ``(codes, scales)``: uint8 codes (:func:`code_bytes` bytes) and float32 scales
        (:func:`num_blocks` entries).
    """
    fmt = code_format(bits, signed)
    block = check_block(block, bits)
    if values.dtype != torch.float32:
        raise ValueError(f"values: expected float32, got {values.dtype}")
    f = values.reshape(-1)
    n = f.numel()
    r = _as_words(words, n, f.device)
    fb = _float_bits(f)
    a = torch.clamp(fb & 0x7FFFFFFF, max=_FLT_MAX_BITS)   # saturated magnitude
    nb = num_blocks(n, block)
    # Non-negative floats order as their bit patterns: the block maximum is an integer maximum.
    padded = torch.cat([a, a.new_zeros(nb * block - n)]).reshape(nb, block)
    top = _bits_float(torch.clamp(padded.amax(dim=1), min=_MIN_NORMAL_BITS))
    qmax = _f32(fmt.qmax, top)
    scales = top / qmax
    inv = (qmax / top).repeat_interleave(block)[:n]
    x = torch.minimum(_bits_float(a) * inv, _f32(fmt.qmax, inv))
    c = round_to_grid(x, r, fmt)
    if fmt.signed:
        c = c | ((fb >> 31) << fmt.magnitude_bits)
    else:
        c = torch.where((c == 0) & (a != 0), torch.ones_like(c), c)
    return pack_codes(c, bits), scales


# ---- random words -------------------------------------------------------------------------------

def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 32 bits of ``a * b`` (both < 2^32), exactly in int64: b in 16-bit halves."""
    p_lo = a * (b & 0xFFFF)                 # < 2^48
    p_hi = a * (b >> 16)                    # < 2^48, weighs 2^16
    s = p_lo + ((p_hi & 0xFFFF) << 16)      # < 2^49
    return s & _MASK32, (p_hi >> 16) + (s >> 32)


def _mul32(x: Tensor, k: int) -> Tensor:
    """``x * k mod 2^32`` for x, k < 2^32, exactly in int64."""
    return _mulhilo32(k, x)[0]


def philox4x32_10(counter: tuple, key: tuple) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 with 10 rounds (Salmon et al. 2011), elementwise over int64 tensors or ints.

    Args:
        counter: four 32-bit words (ints or int64 tensors, broadcast together).
        key: two 32-bit words.

    Returns:
        The four output words as int64 tensors in [0, 2^32).
    """
    c0, c1, c2, c3 = (torch.as_tensor(v, dtype=torch.int64) & _MASK32 for v in counter)
    k0, k1 = (torch.as_tensor(v, dtype=torch.int64) & _MASK32 for v in key)
    for _ in range(10):
        lo0, hi0 = _mulhilo32(0xD2511F53, c0)
        lo1, hi1 = _mulhilo32(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + 0x9E3779B9) & _MASK32
        k1 = (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def lowbias32(x: Tensor) -> Tensor:
    """C. Wellons' lowbias32 hash (hash-prospector, 2018) of 32-bit words held in int64."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def stream_key(seed: int, tensor_id: int, step: int, block: int) -> int:
    """The random key of one tensor, step and 2^30-element block: Philox4x32-10 of the counter
    (tensor_id, step low, step high, block) under the key (seed low, seed high), first word."""
    if not 0 <= seed < 2**64 or not 0 <= step < 2**64 or not 0 <= tensor_id < 2**32 or not 0 <= block < 2**32:
        raise ValueError(f"stream_key: out of range (seed={seed}, tensor_id={tensor_id}, step={step}, block={block})")
    out = philox4x32_10((tensor_id, step & _MASK32, step >> 32, block), (seed & _MASK32, seed >> 32))
    return int(out[0])


def element_words(seed: int, tensor_id: int, step: int, indices: Tensor | int, count: int = 1) -> Tensor:
    """The first ``count`` random words (at most 4) of elements of a tensor at one step.

    Element ``index`` has the counter ``stream_key(seed, tensor_id, step, index >> 30) +
    (index & (2^30 - 1))`` (mod 2^32), and word ``j`` is ``lowbias32(counter + j 2^30)``.

    Args:
        seed, tensor_id, step: as for :func:`stream_key` (``step`` is 1 at the first step).
        indices: the elements' indices in the full tensor (an int64 tensor), or an element count
            ``n`` for the indices 0 .. n - 1.
        count: how many words per element.

    Returns:
        int64 tensor of shape ``(count, len(indices))`` with values in [0, 2^32).
    """
    if not 1 <= count <= 4:
        raise ValueError(f"element_words: count must be 1 to 4, got {count}")
    if isinstance(indices, int):
        indices = torch.arange(indices, dtype=torch.int64)
    indices = indices.reshape(-1).to(torch.int64)
    blocks = indices >> _RANDOM_BLOCK_BITS
    keys = torch.zeros_like(indices)
    for b in torch.unique(blocks).tolist():
        keys = torch.where(blocks == b, stream_key(seed, tensor_id, step, b), keys)
    counters = (keys + (indices & (2**_RANDOM_BLOCK_BITS - 1))) & _MASK32
    return torch.stack([lowbias32(counters + (j << _RANDOM_BLOCK_BITS)) for j in range(count)])


def weight_is_lossy(dtype: torch.dtype, extra_bits: int) -> bool:
    """Whether writing a float32 master into a weight of ``dtype`` with ``extra_bits`` can drop bits
    (and so takes the element's first random word): all but float32 and bfloat16 with 16 extra bits."""
    return not (dtype == torch.float32 or (dtype == torch.bfloat16 and extra_bits == 16))


def state_words(seed: int, tensor_id: int, step: int, numel: int, lossy_weight: bool,
                device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The random words that round the two states of a tensor's elements at one step.

    The states share the word after the weight's (word 1 if the weight is lossy, see
    :func:`weight_is_lossy`, else word 0): state 0 rounds with its high half (``W & 0xFFFF0000``),
    state 1 with its low half (``W << 16``), as fusedwarm's bfloat16 states do.

    Returns:
        ``(words of state 0, words of state 1)``, int64 tensors of ``numel`` elements on ``device``.
    """
    indices = torch.arange(numel, dtype=torch.int64, device=device)
    w = element_words(seed, tensor_id, step, indices, 2 if lossy_weight else 1)[-1]
    return w & 0xFFFF0000, (w << 16) & _MASK32
