"""Piecewise-affine arithmetic (Kosson & Jaggi 2023): the compiled ops against the torch reference.

Bit-exact agreement with ``fusedwarm.reference.pam_*`` on millions of random bit patterns that
span the whole float32 range (NaNs, infinities and subnormals included) and on every pair of
special values; properties that follow from the definitions; the documented derivatives; the
PAM matmul and pam.Linear; errors; opcheck; and CUDA against CPU when a GPU is present.
"""

from __future__ import annotations

import math

import pytest
import torch

from fusedwarm import pam, reference
from helpers import seed_all

# Random bit patterns per op: all 2^32 patterns are equally likely, so every exponent, sign,
# NaN payload and subnormal shows up.
N_RANDOM = 1 << 21
# Relative error bounds of the definitions (Kosson & Jaggi 2023): PAM in [-1/9, 0], PAD in [0, 1/8].
PAM_REL = (-1.0 / 9.0, 0.0)
PAD_REL = (0.0, 1.0 / 8.0)
# Absolute slack on those bounds for the float64 computation of the relative error.
REL_SLACK = 1e-12

BINARY = ("mul", "div")
UNARY = ("sqrt", "exp2", "log2")
SPECIALS = [0.0, -0.0, 1e-45, -1e-45, 1e-39, 1.1754944e-38, -1.1754944e-38, 1.0, -1.0, 2.0, 0.5, 1.5, -3.0,
            3.4028235e38, -3.4028235e38, 1e30, 1e-30, 127.9, 128.0, -126.5, -150.0, float("inf"), float("-inf"),
            float("nan")]


@pytest.fixture(scope="module")
def ops():
    return pam._lib()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, *inputs: torch.Tensor) -> None:
    bad = _bits(got) != _bits(want)
    if bad.any():
        shown = [x.reshape(-1)[bad.reshape(-1)][:4].tolist() for x in inputs]
        raise AssertionError(f"{int(bad.sum())} results differ, inputs {shown}: got "
                             f"{got[bad][:4].tolist()}, reference {want[bad][:4].tolist()}")


def random_bits(n: int) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, (n,), dtype=torch.int64).to(torch.int32).view(torch.float32)


def random_normals(n: int, low: int = -60, high: int = 60) -> torch.Tensor:
    """Random normal floats with exponents in [low, high) and random signs and mantissas."""
    exponent = torch.randint(low, high, (n,), dtype=torch.int64)
    mantissa = torch.randint(0, 1 << 23, (n,), dtype=torch.int64)
    sign = torch.randint(0, 2, (n,), dtype=torch.int64) << 31
    bits = sign | ((exponent + 127) << 23) | mantissa
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


# ---- bit-exact against the reference ----------------------------------------------------------


@pytest.mark.parametrize("name", BINARY)
def test_binary_ops_match_reference_on_random_bits(ops, name):
    seed_all("pam-binary", name)
    a, b = random_bits(N_RANDOM), random_bits(N_RANDOM)
    assert_bits_equal(getattr(ops, f"pam_{name}")(a, b), getattr(reference, f"pam_{name}")(a, b), a, b)


@pytest.mark.parametrize("name", BINARY)
def test_binary_ops_match_reference_on_near_boundary_exponents(ops, name):
    """Operands whose results land on the underflow and overflow thresholds."""
    seed_all("pam-boundary", name)
    a = random_normals(N_RANDOM // 4, -126, 128)
    b = random_normals(N_RANDOM // 4, -126, 128)
    assert_bits_equal(getattr(ops, f"pam_{name}")(a, b), getattr(reference, f"pam_{name}")(a, b), a, b)


@pytest.mark.parametrize("name", UNARY)
def test_unary_ops_match_reference(ops, name):
    seed_all("pam-unary", name)
    x = torch.cat([random_bits(N_RANDOM), torch.randn(N_RANDOM // 4) * 100, torch.tensor(SPECIALS)])
    assert_bits_equal(getattr(ops, f"pam_{name}")(x), getattr(reference, f"pam_{name}")(x), x)


@pytest.mark.parametrize("name", BINARY)
def test_special_value_pairs(ops, name):
    s = torch.tensor(SPECIALS)
    a, b = s.repeat_interleave(len(SPECIALS)), s.repeat(len(SPECIALS))
    got = getattr(ops, f"pam_{name}")(a, b)
    assert_bits_equal(got, getattr(reference, f"pam_{name}")(a, b), a, b)
    # The documented edge cases, directly.
    nan_expected = a.isnan() | b.isnan()
    tiny_a, tiny_b = a.abs() < 1.1754944e-38, b.abs() < 1.1754944e-38
    if name == "mul":
        nan_expected |= (a.isinf() & tiny_b) | (b.isinf() & tiny_a)
        zero = (tiny_a | tiny_b) & ~nan_expected
        inf = (a.isinf() | b.isinf()) & ~nan_expected
    else:
        nan_expected |= (tiny_a & tiny_b) | (a.isinf() & b.isinf())
        zero = (tiny_a | b.isinf()) & ~nan_expected
        inf = (a.isinf() | tiny_b) & ~nan_expected
    assert torch.equal(got.isnan(), nan_expected)
    assert (_bits(got[nan_expected]) == 0x7FC00000).all()
    assert (got[zero] == 0).all() and (got[inf].isinf()).all()
    signed = ~nan_expected
    assert torch.equal(got[signed].signbit(), (a.signbit() ^ b.signbit())[signed])


def test_unary_edge_cases(ops):
    x = torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("inf"), float("-inf"), float("nan"), -2.0, 4.0])
    sqrt, log2, exp2 = ops.pam_sqrt(x), ops.pam_log2(x), ops.pam_exp2(x)
    assert _bits(sqrt[:4]).tolist() == [0, -(2**31), 0, -(2**31)]
    assert sqrt[4] == float("inf") and sqrt[5:8].isnan().all() and sqrt[8] == 2.0
    assert (log2[:4] == float("-inf")).all() and log2[4] == float("inf") and log2[5:8].isnan().all()
    assert log2[8] == 2.0
    assert (exp2[:4] == 1.0).all() and exp2[4] == float("inf") and _bits(exp2[5:6]).item() == 0
    assert exp2[6].isnan() and exp2[7] == 0.25
    # exp2 underflows to +0 below 2^-126 and overflows to inf from 128 on.
    edges = ops.pam_exp2(torch.tensor([-126.0, -126.5, 128.0]))
    assert edges.tolist() == [2.0**-126, 0.0, float("inf")]


# ---- properties ---------------------------------------------------------------------------------


def test_mul_by_one_and_powers_of_two_is_exact(ops):
    seed_all("pam-pow2")
    x = random_normals(1 << 16, -60, 60)
    assert_bits_equal(ops.pam_mul(x, torch.ones_like(x)), x, x)
    k = torch.randint(-60, 60, x.shape)
    p2 = torch.pow(2.0, k.double()).float()
    assert_bits_equal(ops.pam_mul(x, p2), (x.double() * p2.double()).float(), x, p2)
    assert_bits_equal(ops.pam_div(x, p2), (x.double() / p2.double()).float(), x, p2)


def test_mul_is_commutative_and_div_inverts_it(ops):
    seed_all("pam-commute")
    a, b = random_bits(1 << 18), random_bits(1 << 18)
    assert_bits_equal(ops.pam_mul(a, b), ops.pam_mul(b, a), a, b)
    a, b = random_normals(1 << 18, -60, 60), random_normals(1 << 18, -60, 60)
    assert_bits_equal(ops.pam_div(ops.pam_mul(a, b), b), a, a, b)


def test_error_bounds(ops):
    seed_all("pam-bounds")
    a, b = random_normals(1 << 18, -60, 60), random_normals(1 << 18, -60, 60)
    rel_mul = ops.pam_mul(a, b).double() / (a.double() * b.double()) - 1
    rel_div = ops.pam_div(a, b).double() / (a.double() / b.double()) - 1
    assert PAM_REL[0] - REL_SLACK <= rel_mul.min() and rel_mul.max() <= PAM_REL[1] + REL_SLACK
    assert PAD_REL[0] - REL_SLACK <= rel_div.min() and rel_div.max() <= PAD_REL[1] + REL_SLACK
    # The bounds are attained (close to): the worst case is at Ma = Mb = 1/2 for PAM.
    assert rel_mul.min() < PAM_REL[0] + 1e-3 and rel_div.max() > PAD_REL[1] - 1e-3


def test_mul_is_monotone_in_magnitude(ops):
    seed_all("pam-monotone")
    a = random_normals(1 << 16, -60, 60).abs().sort().values
    for b in random_normals(8, -60, 60).tolist():
        out = ops.pam_mul(a, torch.full_like(a, b)).abs()
        assert (out[1:] >= out[:-1]).all()


def test_exp2_and_log2_are_exact_on_integers(ops):
    k = torch.arange(-126, 128, dtype=torch.float32)
    assert torch.equal(ops.pam_exp2(k), torch.pow(2.0, k.double()).float())
    assert torch.equal(ops.pam_log2(torch.pow(2.0, k.double()).float()), k)


def test_sqrt_is_exact_on_even_powers_of_two(ops):
    k = torch.arange(-63, 64, dtype=torch.float64)
    assert torch.equal(ops.pam_sqrt(torch.pow(2.0, 2 * k).float()), torch.pow(2.0, k).float())


# ---- the Python API -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_compute_through_float32(dtype):
    seed_all("pam-half", dtype)
    a, b = torch.randn(64, 3).to(dtype), torch.randn(3).to(dtype)
    got = pam.mul(a, b)
    assert got.dtype == dtype
    assert torch.equal(got, reference.pam_mul(a.float(), b.float()).to(dtype))
    assert torch.equal(pam.sqrt(a.abs()), reference.pam_sqrt(a.abs().float()).to(dtype))


def test_scalars_and_broadcasting():
    seed_all("pam-broadcast")
    a = torch.randn(4, 1, 5) + 3
    b = torch.randn(3, 1) + 3
    assert torch.equal(pam.mul(a, b), reference.pam_mul(a, b))
    assert torch.equal(pam.div(2.5, a), reference.pam_div(torch.tensor(2.5), a))
    assert torch.equal(pam.mul(a, 0.75), reference.pam_mul(a, torch.tensor(0.75)))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: pam.mul(torch.ones(3, dtype=torch.int32), torch.ones(3)), TypeError, "dtype torch.int32"),
        (lambda: pam.mul(torch.ones(3), torch.ones(3, dtype=torch.bfloat16)), TypeError, "same dtype"),
        (lambda: pam.mul(torch.ones(3), torch.ones(4)), ValueError, "do not broadcast"),
        (lambda: pam.div(torch.ones(3), torch.ones(3, device="meta")), ValueError, "is on meta"),
        (lambda: pam.mul("x", torch.ones(3)), TypeError, "must be a tensor"),
        (lambda: pam.sqrt(torch.ones(3, dtype=torch.float64)), TypeError, "dtype torch.float64"),
        (lambda: pam.matmul(torch.ones(3, 4), torch.ones(5, 2)), ValueError, r"\(4 != 5\)"),
        (lambda: pam.matmul(torch.ones(3), torch.ones(3, 2)), ValueError, "must be 2-D"),
        (lambda: pam.matmul(torch.ones(3, 4, dtype=torch.float16), torch.ones(4, 2)), TypeError, "same dtype"),
        (lambda: pam.Linear(4, 2)(torch.ones(3, 5)), ValueError, "last dimension 4"),
        (lambda: pam._lib().pam_mul(torch.ones(3), torch.ones(2)), RuntimeError, "same shape"),
        (lambda: pam._lib().pam_exp2(torch.ones(3, dtype=torch.float16)), RuntimeError, "must be float32"),
        (lambda: pam._lib().pam_matmul(torch.ones(3, 4), torch.ones(3, 4)), RuntimeError, "cannot be multiplied"),
    ],
    ids=["int-dtype", "mixed-dtype", "broadcast", "device", "not-tensor", "float64", "matmul-shape", "matmul-1d",
         "matmul-dtype", "linear-shape", "op-shape", "op-dtype", "op-matmul-shape"],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---- autograd: the documented derivatives ------------------------------------------------------------------


def test_elementwise_derivatives():
    seed_all("pam-grad")
    a = (torch.rand(50) + 0.5).requires_grad_()
    b = (torch.rand(50) + 0.5).requires_grad_()
    g = torch.randn(50)
    R = reference
    ln2 = torch.tensor(math.log(2.0))

    def grads(out):
        a.grad = b.grad = None
        out.backward(g)
        return a.grad, b.grad

    ga, gb = grads(pam.mul(a, b))
    assert torch.equal(ga, R.pam_mul(g, b.detach())) and torch.equal(gb, R.pam_mul(g, a.detach()))
    y = pam.div(a, b).detach()
    ga, gb = grads(pam.div(a, b))
    assert torch.equal(ga, R.pam_div(g, b.detach())) and torch.equal(gb, -R.pam_div(R.pam_mul(g, y), b.detach()))
    y = pam.sqrt(a).detach()
    ga, _ = grads(pam.sqrt(a))
    assert torch.equal(ga, R.pam_div(g, 2 * y))
    y = pam.exp2(a).detach()
    ga, _ = grads(pam.exp2(a))
    assert torch.equal(ga, R.pam_mul(R.pam_mul(g, y), ln2))
    ga, _ = grads(pam.log2(a))
    assert torch.equal(ga, R.pam_div(g, R.pam_mul(a.detach(), ln2)))


# ---- matmul and Linear ----------------------------------------------------------------------------------------

MATMUL_SHAPES = [(1, 1, 1), (5, 0, 3), (17, 33, 9), (64, 40, 70)]


@pytest.mark.parametrize("m,k,n", MATMUL_SHAPES, ids=lambda s: str(s))
def test_matmul_matches_sequential_reference(m, k, n):
    seed_all("pam-matmul", m, k, n)
    a, b = torch.randn(m, k), torch.randn(k, n)
    assert_bits_equal(pam.matmul(a, b), reference.pam_matmul(a, b), a)
    assert torch.equal(pam.matmul(a.t().contiguous().t(), b), pam.matmul(a, b))  # strides do not matter


def test_linear_forward_and_backward_are_the_documented_pam_products():
    seed_all("pam-linear")
    layer = pam.Linear(24, 10)
    x = torch.randn(3, 7, 24, requires_grad=True)
    y = layer(x)
    assert y.shape == (3, 7, 10)
    x2 = x.detach().reshape(-1, 24)
    W = layer.weight.detach()
    assert torch.equal(y.detach().reshape(-1, 10), reference.pam_matmul(x2, W.t().contiguous()) + layer.bias.detach())
    gy = torch.randn_like(y)
    y.backward(gy)
    gy2 = gy.reshape(-1, 10)
    assert torch.equal(x.grad.reshape(-1, 24), reference.pam_matmul(gy2, W))
    assert torch.equal(layer.weight.grad, reference.pam_matmul(x2.t().contiguous(), gy2).t())
    assert torch.equal(layer.bias.grad, gy2.sum(0))
    # Close to the float32 gradients: each PAM product is within 1/9 of the exact one.
    ref = torch.nn.Linear(24, 10)
    ref.load_state_dict(layer.state_dict())
    xr = x.detach().clone().requires_grad_()
    ref(xr).backward(gy)
    assert (x.grad - xr.grad).abs().max() <= 0.2 * (gy.abs() @ W.abs()).max()


def test_linear_is_a_drop_in_for_torch_linear():
    seed_all("pam-dropin")
    layer = pam.Linear(6, 3, bias=False, dtype=torch.bfloat16)
    assert isinstance(layer, torch.nn.Linear) and layer.bias is None
    assert layer(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- operator surface ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ("pam_mul", "pam_div", "pam_sqrt", "pam_exp2", "pam_log2", "pam_matmul"))
def test_opcheck(ops, name):
    seed_all("pam-opcheck", name)
    if name == "pam_matmul":
        args = (torch.randn(5, 3, requires_grad=True), torch.randn(3, 4, requires_grad=True))
    elif name in ("pam_mul", "pam_div"):
        args = (torch.randn(4, 5) + 3, torch.randn(4, 5) + 3)
    else:
        args = (torch.rand(4, 5) + 0.5,)
    result = torch.library.opcheck(getattr(ops, name).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ---- CUDA ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BINARY + UNARY)
def test_cuda_elementwise_matches_cpu(ops, gpu, name):
    seed_all("pam-cuda", name)
    a, b = random_bits(N_RANDOM), random_bits(N_RANDOM)
    args = (a, b) if name in BINARY else (a,)
    op = getattr(ops, f"pam_{name}")
    with gpu.run(order="shuffle"):
        got = op(*[gpu.to(t) for t in args])
    assert_bits_equal(got.cpu(), op(*args), a)


@pytest.mark.parametrize("m,k,n", MATMUL_SHAPES + [(129, 257, 65)], ids=lambda s: str(s))
def test_cuda_matmul_matches_cpu(gpu, m, k, n):
    seed_all("pam-cuda-matmul", m, k, n)
    a, b = torch.randn(m, k), torch.randn(k, n)
    with gpu.run(order="shuffle"):
        got = pam.matmul(gpu.to(a), gpu.to(b))
    assert_bits_equal(got.cpu(), pam.matmul(a, b), a)


def test_cuda_matmul_nonfinite_sums_are_the_canonical_nan(gpu):
    # Random bit patterns: infinities and NaNs of every sign and payload in both operands, so sums
    # become inf - inf and NaN; both backends store the one canonical NaN.
    seed_all("pam-cuda-matmul-nan")
    a, b = random_bits(37 * 29).reshape(37, 29), random_bits(29 * 41).reshape(29, 41)
    with gpu.run(sms=1, blocks_per_sm=1, order="reverse"):
        got = pam.matmul(gpu.to(a), gpu.to(b)).cpu()
    want = pam.matmul(a, b)
    assert torch.isnan(want).any()
    assert_bits_equal(got, want, a)
    assert (want[torch.isnan(want)].view(torch.int32) == 0x7FC0_0000).all()


@pytest.mark.slow
def test_cuda_matmul_more_row_tiles_than_grid_y_allows(gpu):
    # pam.Linear flattens batch x sequence into rows: more than 65535 16-row tiles must work (rows
    # are on grid.x; grid.y, limited to 65535, takes the column tiles).
    seed_all("pam-cuda-matmul-rows")
    a, b = torch.randn(16 * 65535 + 17, 3), torch.randn(3, 2)
    with gpu.run():
        got = pam.matmul(gpu.to(a), gpu.to(b))
    assert_bits_equal(got.cpu(), pam.matmul(a, b), a)
