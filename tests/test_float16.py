"""float16 in the kernels: conversions, the accuracy bound, dtypes and thread invariance.

float16 data is widened exactly and summed in float64 as float32 data is (the same sums, bit
for bit).  The outputs are computed in float arithmetic from the float64 coefficients rounded
to float (the mean's low part a term of its own), and each is rounded to float16 once.  So
an output is within half a float16 ulp of the exact result of those coefficients plus
float's own error: 2**-21 of the terms (|gamma*xhat| + |beta|; dx: |a*dy| + |b*xhat| + |c|),
far below a float16 ulp of the terms (2**-11).  dgamma and dbeta, float64 sums, are rounded
once: within half a float16 ulp of the float64 result.
"""

import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import bnkernels
from bnhelpers import bits, channel_shape, exact_dx, make_inputs, openmp_threads, reference64
from bnkernels import _kernels

F16 = np.float16


@pytest.fixture(autouse=True, params=_kernels.F16_CODES)
def code(request):
    """Every test with each float16 conversion code of the kernels (widening the inputs,
    rounding the outputs): AVX-512, F16C with AVX2 and integer code, where the CPU has it."""
    before = _kernels.float16_code()
    if _kernels.float16_code(request.param) != request.param:
        _kernels.float16_code(before)
        pytest.skip("this CPU lacks the instructions of the %s code" % request.param)
    yield request.param
    _kernels.float16_code(before)


def test_float16_code_names_its_kinds():
    before = _kernels.float16_code()
    with pytest.raises(ValueError, match="kind must be one of"):
        _kernels.float16_code("sse")
    assert _kernels.float16_code() == before
    assert _kernels.float16_code("integer") == "integer"
    _kernels.float16_code(before)


def _same_halves(got, want):
    """Bitwise equal float16 arrays, NaNs compared as NaNs."""
    return (bits(got) == bits(want)) | (np.isnan(got) & np.isnan(want))


# test mode with gamma 1, beta 0 and 1/sqrt(var + eps) exactly 1 (var = 1 - eps, both
# powers of two apart): out = (x - mean) + 0, float64 arithmetic, rounded to float16
_EPS = 2.0**-20
_UNIT = {"mode": "test", "eps": _EPS}


def _shifted(x, mean):
    C = x.shape[1]
    p = dict(_UNIT, running_mean=np.asarray(mean, np.float64), running_var=np.full(C, 1 - _EPS))
    return bnkernels.forward(x, np.ones(C), np.zeros(C), p)[0]


def test_every_float16_converts_exactly_both_ways():
    # x - 0 over all 65536 bit patterns: widening and rounding back give x itself (NaNs
    # stay NaN; -0.0 becomes +0.0 by the added beta, as in float64)
    h = np.arange(1 << 16, dtype=np.uint16).view(F16).reshape(-1, 1)
    with np.errstate(invalid="ignore"):
        want = (h.astype(np.float64) - 0.0 + 0.0).astype(F16)
    assert _same_halves(_shifted(h, [0.0]), want).all()


@pytest.mark.parametrize("code", ["avx512", "f16c"], indirect=True)
def test_vector_and_integer_conversions_give_the_same_bits(code):
    """NaN payloads included: every bit pattern, shifted by means that round, tie and
    overflow, through the vector code and the integer code."""
    rng = np.random.default_rng(2)
    x = np.arange(1 << 16, dtype=np.uint16).view(F16).reshape(-1, 1).repeat(8, axis=1)
    mean = -rng.integers(0, 0x7C00, size=8, dtype=np.uint16).view(F16).astype(np.float64)
    mean[:3] = [0.0, -(2.0**-25), 65504.0]
    with np.errstate(invalid="ignore", over="ignore"):
        vector = _shifted(x, mean)
        _kernels.float16_code("integer")
        integer = _shifted(x, mean)
    assert np.array_equal(bits(vector), bits(integer))


def _passes(x, dy, axis):
    """Every output of forward and backward, train and test mode, plain and with the fused
    ReLU, the residual and both, as bit patterns."""
    C = x.shape[axis]
    g, b = np.linspace(0.5, 2, C).astype(F16), np.linspace(-1, 1, C).astype(F16)
    relu, residual = {"activation": "relu"}, {"residual": dy[::-1]}
    outs = []
    for mode in ("train", "test"):
        for fused in ({}, relu, residual, {**relu, **residual}):
            p = {"mode": mode, "running_mean": np.zeros(C), "running_var": np.ones(C)}
            out, cache = bnkernels.forward(x, g, b, p, axis=axis, **fused)
            outs += [out, *bnkernels.backward(dy, cache)]
    return [bits(o) for o in outs]


# rows narrower and wider than a widened run (512), tasks of rows wider than 512 (their
# float coefficients in a heap buffer), an odd number of rows of a width the sums take
# unstaged that is not a multiple of sixteen, short contiguous rows converted many to a run
# (also channels-last), planes shorter and longer than one and not a multiple of any vector
# width, NCHW planes taken as rows, planes whose tails of 7 and 11 fill some lanes of the
# F16C sums' second and third vectors
_PASS_CASES = [
    ((300, 37), 1),
    ((41, 300), 1),
    ((40, 1100), 1),
    ((2, 9000), 1),
    ((3000, 3), 1),
    ((8, 6, 6, 5), -1),
    ((4, 3, 700, 3), 1),
    ((6, 5, 7, 7), 1),
    ((20, 5, 7, 7), 1),
    ((4, 3, 535), 1),
    ((5, 2, 15, 5), 1),
    ((2, 40, 5, 7), 1),  # planar tasks of 3 channels: the sixteens that cross between planes
    ((2, 1040, 17), 1),  # planar tasks of 65 channels: more than one group of planes
]
_PASS_IDS = [str(c[0]) for c in _PASS_CASES]


def _pass_inputs(shape, axis):
    """x and dy with NaN, infinities, signed zeros and subnormals in channel 0 only, so
    that the other channels' outputs stay finite and are compared as numbers."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal(shape) * 3).astype(F16)
    dy = rng.standard_normal(shape).astype(F16)
    first = np.moveaxis(dy, axis, 0)[0]
    specials = np.array([np.nan, np.inf, -np.inf, 2.0**-24, -(2.0**-20), 0.0, -0.0], F16)
    first.flat[: min(first.size, 21)] = np.resize(specials, min(first.size, 21))
    tiny = np.moveaxis(x, axis, 0)[1]
    tiny.flat[: min(tiny.size, 7)] = [2.0**-24] * 4 + [-(2.0**-17)] * 3
    return x, dy


@pytest.mark.parametrize("code", ["avx512", "f16c"], indirect=True)
@pytest.mark.parametrize("shape,axis", _PASS_CASES, ids=_PASS_IDS)
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_every_pass_gives_the_integer_codes_bits(code, shape, axis, offset):
    """The widened inputs and rounded outputs of every loop, NaN, infinities and subnormals
    among them, the same with the vector code (its output runs computed without staging,
    bn_h_affine) as with the integer code.  NaN where NaN, but not a NaN's sign and
    payload: where two NaNs meet (channel 0's coefficients are NaN, of either sign), which
    one an x86 operation returns follows its operand order, the compiler's choice.  The
    offset gives means whose low part (below float's precision) moves outputs across float16
    roundings."""
    x, dy = _pass_inputs(shape, axis)
    x = (x + F16(offset)).astype(F16)
    with np.errstate(invalid="ignore", over="ignore"):
        vector = _passes(x, dy, axis)
        _kernels.float16_code("integer")
        integer = _passes(x, dy, axis)
    for v, i in zip(vector, integer):
        assert _same_halves(v.view(F16), i.view(F16)).all()
    assert np.isfinite(np.moveaxis(integer[0].view(F16), axis, 0)[1:]).all()


@pytest.mark.parametrize("code", ["avx512", "f16c"], indirect=True)
@pytest.mark.parametrize("shape,axis", _PASS_CASES, ids=_PASS_IDS)
def test_test_mode_dx_does_not_read_x(code, shape, axis):
    """With running statistics dx = gamma*invstd*dy (masked by a fused ReLU's output): no
    term in x, so NaN and Inf in x stay out of it, with each code as with the integer code."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(shape).astype(F16)
    x.flat[::7], x.flat[3::11] = np.nan, np.inf
    dy = rng.standard_normal(shape).astype(F16)
    C = x.shape[axis]
    p = {"mode": "test", "running_mean": np.zeros(C), "running_var": np.ones(C)}
    g, b = np.linspace(0.5, 2, C).astype(F16), np.zeros(C, F16)

    def dxs():
        with np.errstate(invalid="ignore"):
            return [
                bnkernels.backward(dy, bnkernels.forward(x, g, b, dict(p), axis=axis, **f)[1])[0]
                for f in ({}, {"activation": "relu"}, {"residual": dy})
            ]

    vector = dxs()
    _kernels.float16_code("integer")
    for v, i in zip(vector, dxs()):
        assert np.isfinite(v).all()
        assert np.array_equal(bits(v), bits(i))


@pytest.mark.parametrize("shape,axis", [c for c in _PASS_CASES if c[1] == -1 or len(c[0]) == 2])
def test_contiguous_rows_give_strided_rows_bits(shape, axis):
    """Short contiguous rows are converted many to a run, strided ones a row at a time
    (with vector code, without staging): the same bits, NaN where NaN (its sign and payload
    as in test_every_pass_gives_the_integer_codes_bits)."""
    x, dy = _pass_inputs(shape, axis)

    def strided(a):  # the same values, rows two elements apart
        pad = [(0, 0)] * (a.ndim - 1) + [(0, 2)]
        return np.pad(a, pad)[..., : a.shape[-1]]

    assert not strided(x).flags.c_contiguous
    with np.errstate(invalid="ignore", over="ignore"):
        grouped = _passes(x, dy, axis)
        by_row = _passes(strided(x), strided(dy), axis)
    for g, r in zip(grouped, by_row):
        assert _same_halves(g.view(F16), r.view(F16)).all()


@pytest.mark.parametrize("shape,axis", _PASS_CASES, ids=_PASS_IDS)
def test_sums_are_float32_datas_sums(shape, axis):
    """The float64 statistics and sums of float16 data, widened in runs, equal bit for bit
    those of the same values as float32 data, read in place: every element in the same
    place of the same sum."""
    x, dy = (a.astype(np.float64) for a in _pass_inputs(shape, axis))
    x, dy = np.nan_to_num(x, posinf=2.0, neginf=-2.0), np.nan_to_num(dy, posinf=3.0, neginf=-3.0)
    C = x.shape[axis]
    sums = {}
    for dtype in (F16, np.float32):
        xd, dyd = x.astype(dtype), dy.astype(dtype)
        out = bnkernels.batch_stats(xd, axis=axis)[1:]
        p = {"mode": "train"}
        cache = bnkernels.forward(xd, np.ones(C, dtype), np.zeros(C, dtype), p, axis=axis)[1]
        sums[dtype] = [bits(v) for v in out + bnkernels.backward_reduce(dyd, cache)]
    for a, b in zip(sums[F16], sums[np.float32]):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("code", ["avx512"], indirect=True)
@pytest.mark.parametrize(
    "shape", [(4, 3, 700, 3), (3, 4, 1033), (3, 4, 37, 5), (2, 3, 8, 2), (5, 3, 11)]
)
def test_float32_planes_sum_alike_with_avx512_and_integer_code(code, shape):
    """The AVX-512 code also sums float32 planes (bn_f_sums, bn_f_moments): the same bits
    as the loops of _loops.h, which the integer code leaves them to.  Planes of 2100
    (moments and sums, a tail of 4), 1033 (a tail of 9, in the high eight lanes), 185 (sums
    only, a tail of 9), 16 and 11 elements (a tail alone); float32 values of 24 significant
    bits and many exponents, whose float64 sums round (float16's would sum exactly in any
    order), a NaN and an infinity in channel 0 (the other channels' sums carry the test)."""
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-12, 12, shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    dy[0, 0].flat[:2] = np.nan, np.inf
    C = shape[1]
    g, b = np.linspace(0.5, 2, C).astype(np.float32), np.zeros(C, np.float32)

    def outs():
        with np.errstate(invalid="ignore", over="ignore"):
            stats = bnkernels.batch_stats(x)[1:]
            out, cache = bnkernels.forward(x, g, b, {"mode": "train"})
            sums = bnkernels.backward_reduce(dy, cache)
            return [bits(v) for v in (*stats, *sums, out, *bnkernels.backward(dy, cache))]

    vector = outs()
    _kernels.float16_code("integer")
    for v, i in zip(vector, outs()):
        assert np.array_equal(v, i)


@pytest.mark.parametrize("code", ["avx512", "f16c"], indirect=True)
@pytest.mark.parametrize(
    "shape, axis",
    [
        ((5, 13), 1),
        ((4, 7), 1),
        ((3, 10), 1),
        ((4, 14), 1),
        ((3, 600), 1),
        ((3, 1030), 1),
        ((2, 3, 3, 13), 3),
        ((3, 4, 5, 7), 1),
        ((2, 3, 17), 1),
        ((2, 3, 12), 1),
        ((6, 2, 1, 1), 1),
    ],
)
def test_float32_outputs_alike_with_vector_and_integer_code(code, shape, axis):
    """The AVX-512 and the AVX2 code also write float32 outputs (bn_f_affine: rows, planes,
    plain or with the fused epilogue): the same bits as the loops of _loops.h, which the
    integer code leaves them to.  Rows of 13, 7, 10, 14 and 600 elements, planes of 35, 17,
    12 and 1 (tails of 1 to 7 elements, and none), rows of 1030 (bands: the loop of
    _loops.h either way), channels-last rows; train and test mode (dx without its term in x),
    a residual and a ReLU (dy masked by the saved output, -0.0 and NaN among it); values of
    many exponents, a NaN and an infinity in one channel, NaNs compared as NaNs (where two
    meet, x86 returns the one in the first operand, and the compiler orders the operands of
    a commutative operation as it likes)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2.0 ** rng.integers(-12, 12, shape) + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    res = rng.standard_normal(shape).astype(np.float32)
    res.flat[1], res.flat[2] = -0.0, np.nan
    lead = (0,) * (len(shape) - 1)
    x[lead[:axis] + (0,) + lead[axis:]] = np.nan
    dy[lead[:axis] + (0,) + lead[axis:]] = np.inf
    C = shape[axis]
    g = np.linspace(-1.5, 2, C).astype(np.float32)
    b = np.linspace(0.5, -1, C).astype(np.float32)

    def outs():
        got = []
        with np.errstate(invalid="ignore", over="ignore"):
            for mode in ("train", "test"):
                for extra in ({}, {"activation": "relu", "residual": res}):
                    param = {"mode": mode, "running_var": np.full(C, 0.75, np.float32)}
                    out, cache = bnkernels.forward(x, g, b, param, axis=axis, **extra)
                    got += [out, *bnkernels.backward(dy, cache)]
        return got

    vector = outs()
    _kernels.float16_code("integer")
    for v, i in zip(vector, outs()):
        assert np.array_equal(np.isnan(v), np.isnan(i))
        assert np.array_equal(bits(np.where(np.isnan(v), 0, v)), bits(np.where(np.isnan(i), 0, i)))


def test_rounding_matches_numpys_float_arithmetic():
    # (x - mean) * 1 + 0 with x and mean float16 values: one float subtraction (the mean is
    # a float, its low part 0), rounded to float16, exercising ties to even, subnormal
    # results, overflow to inf and NaN.  NumPy's float32 arithmetic is IEEE's, and its
    # float32 -> float16 cast rounds correctly, once.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << 16, size=(1 << 15, 64), dtype=np.uint16).view(F16)
    mean = -rng.integers(0, 0x7C00, size=64, dtype=np.uint16).view(F16).astype(np.float64)
    mean[:8] = -np.array([2.0**-24, 2.0**-15, 0.5, 1.0, 1024.0, 2048.0, 32768.0, 65504.0])
    f32 = np.float32
    with np.errstate(invalid="ignore", over="ignore"):
        want = ((x.astype(f32) - mean.astype(f32)) + f32(0.0)).astype(F16)
    assert _same_halves(_shifted(x, mean), want).all()


# float arithmetic's error, relative to the terms (the module's docstring; design.md derives it)
_FLOAT_ERR = 2.0**-21


def _within_bound(got, want, terms, what):
    """|got - want| <= half a float16 ulp of want + _FLOAT_ERR*terms, all in longdouble"""
    L = np.longdouble
    with np.errstate(over="ignore"):
        half_ulp = 0.5 * np.spacing(np.abs(want).astype(F16)).astype(L)
    bound = half_ulp + _FLOAT_ERR * terms
    err = np.abs(got.astype(L) - want)
    worst = np.argmax(err - bound)
    assert (err <= bound).all(), "%s: error %g > bound %g (half ulp %g) at %d" % (
        what,
        err.flat[worst],
        bound.flat[worst],
        half_ulp.flat[worst],
        worst,
    )


def _exact_out(x, cache, beta, axis):
    """The exact out = (gamma*invstd)*(x - mean) + beta of the forward's float64 statistics
    (cache), with |gamma*xhat| + |beta|, in longdouble"""
    L = np.longdouble
    bs = channel_shape(x.ndim, axis, x.shape[axis])
    s = cache["gamma"].astype(L).reshape(bs) * cache["invstd"].astype(L).reshape(bs)
    mean = cache["mean"].astype(L).reshape(bs)
    b = np.asarray(beta).astype(L).reshape(bs)
    t = s * (x.astype(L) - mean)
    return t + b, np.abs(t) + np.abs(b)


@pytest.mark.parametrize("axis", [1, -1])
def test_forward_with_given_statistics_within_the_bound(axis):
    # test mode, float64 parameters and running statistics, data with an offset: the
    # coefficients rounded to float, the mean's low part in the constant term
    rng = np.random.default_rng(1)
    shape = (64, 7, 9, 33) if axis == 1 else (64, 9, 33, 7)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 50 + 300).astype(F16)
    gamma, beta = rng.standard_normal(C) * 3, rng.standard_normal(C)
    mean, var = rng.standard_normal(C) + 300, rng.uniform(0.01, 2, C)
    p = {"mode": "test", "running_mean": mean, "running_var": var}
    out, cache = bnkernels.forward(x, gamma, beta, p, axis=axis)
    assert out.dtype == F16
    _within_bound(out, *_exact_out(x, cache, beta, axis), "out")


def _within_half_ulp(got, want, what):
    """|got - want| <= half a float16 ulp of want, plus the float64 reference's own error."""
    got = got.astype(np.float64)
    half_ulp = 0.5 * np.spacing(np.abs(want).astype(F16)).astype(np.float64)
    slack = 1e-12 * np.abs(want).max()
    err = np.abs(got - want)
    worst = np.argmax(err - half_ulp)
    assert (err <= half_ulp + slack).all(), "%s: error %g > half ulp %g at %d" % (
        what,
        err.flat[worst],
        half_ulp.flat[worst],
        worst,
    )


# shapes reaching every plan kind: small rows, NCHW planes as rows, channels-last, planar
# chunks (planes of 64 KiB and more), tall chunked rows, a strided view; rows a page apart
# (the sums take them in pairs, then a last one alone; a column tail past the runs)
CASES = [
    ((64, 32), 1),
    ((8, 16, 10, 10), 1),
    ((8, 10, 10, 16), -1),
    ((3, 5, 200, 200), 1),
    ((40000, 64), 1),
    ((6, 4, 384, 384), 1),
    ((7, 2100), 1),
]


def _check_outputs(x, beta, dout, out, cache, axis, grads):
    """out and dx within the bound of the kernels' own statistics and sums"""
    _within_bound(out, *_exact_out(x, cache, beta, axis), "out")
    sums = bnkernels.backward_reduce(dout, cache)
    train = cache["mode"] == "train"
    _within_bound(grads[0], *exact_dx(x, dout, cache, sums, axis, cache["eps_mode"], train), "dx")


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("shape,axis", CASES, ids=[str(c[0]) for c in CASES])
def test_outputs_within_the_bound(shape, axis, eps_mode, mode):
    x, gamma, beta, dout = make_inputs(shape, axis, F16, seed=3, offset=4.0)
    C = shape[axis]
    p = {"mode": mode, "eps_mode": eps_mode}
    if mode == "test":
        p["running_mean"] = np.linspace(-0.5, 0.5, C).astype(F16)
        p["running_var"] = np.linspace(1.0, 3.0, C).astype(F16)
    out, cache = bnkernels.forward(x, gamma, beta, dict(p), axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert all(a.dtype == F16 for a in (out, dx, dgamma, dbeta))
    _check_outputs(x, beta, dout, out, cache, axis, (dx,))
    _, _, _, (_, r_dgamma, r_dbeta), _ = reference64(x, gamma, beta, p, dout, axis)
    _within_half_ulp(dgamma, r_dgamma, "dgamma")
    _within_half_ulp(dbeta, r_dbeta, "dbeta")


def test_strided_and_channels_last_inputs():
    x, gamma, beta, dout = make_inputs((16, 12, 9, 9), 1, F16, seed=4)
    xs, ds = x[::2, :, ::2], dout[::2, :, ::2]  # sliced: neither layout fits, copies run
    out, cache = bnkernels.forward(xs, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(ds, cache)
    _check_outputs(xs, beta, ds, out, cache, 1, (dx,))


@pytest.mark.parametrize("shape,axis", [((1 << 16, 3), 1), ((64, 3, 32, 32), 1)])
def test_outputs_near_zero_with_a_large_offset(shape, axis):
    # 1000 everywhere but one 1000.5 per channel: the mean 1000 + 2**-17 lies closer to
    # 1000 than float's spacing there (2**-14), so the float mean is 1000, and most outputs,
    # s*(x - mean) with beta 0, are tiny beside s*mean.  An arithmetic that rounds at
    # the scale of s*mean (the mean folded into the shift: x*s + (beta - s*mean)), or drops
    # the term of the mean's low part, is wrong by far more than the bound there.
    x = np.full(shape, 1000.0, F16)
    first = [0] * x.ndim
    first[axis] = slice(None)
    x[tuple(first)] = 1000.5
    C = shape[axis]
    gamma, beta = np.linspace(0.5, 2.0, C), np.zeros(C)
    dout = make_inputs(shape, axis, F16, seed=8)[3]
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    assert cache["mean"][0] == 1000.0 + 2.0**-17
    assert np.abs(out.astype(np.float64)).min() > 0
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    _check_outputs(x, beta, dout, out, cache, axis, (dx,))


def test_float32_parameters_give_float32_gradients():
    # PyTorch's mixed precision: float16 activations, float32 parameters
    x, gamma, beta, dout = make_inputs((32, 8, 5, 5), 1, F16, seed=5)
    g32, b32 = gamma.astype(np.float32), beta.astype(np.float32)
    out, cache = bnkernels.forward(x, g32, b32, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert (out.dtype, dx.dtype, dgamma.dtype, dbeta.dtype) == (F16, F16, np.float32, np.float32)
    _, _, _, (_, r_dgamma, r_dbeta), _ = reference64(x, g32, b32, {"mode": "train"}, dout)
    _check_outputs(x, b32, dout, out, cache, 1, (dx,))
    np.testing.assert_allclose(dgamma, r_dgamma, rtol=1e-6, atol=1e-6 * np.abs(r_dgamma).max())
    np.testing.assert_allclose(dbeta, r_dbeta, rtol=1e-6, atol=1e-6 * np.abs(r_dbeta).max())


@pytest.mark.parametrize("shape,axis", CASES[2:], ids=[str(c[0]) for c in CASES[2:]])
def test_bitwise_the_same_for_any_thread_count(shape, axis):
    x, gamma, beta, dout = make_inputs(shape, axis, F16, seed=6)
    results = []
    for nt in (1, 2, 3):
        with openmp_threads(nt):
            out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
        grads = bnkernels.backward(dout, cache, num_threads=nt)
        results.append([bits(a) for a in (out, *grads)])
    for other in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], other))


def test_split_batch_passes_take_float16():
    # batch_stats, backward_reduce and backward_apply run the float16 kernels too
    x, gamma, beta, dout = make_inputs((40, 6, 4, 4), 1, F16, seed=7)
    count, mean, m2 = bnkernels.batch_stats(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(m2 / count, x64.var(axis=(0, 2, 3)), rtol=1e-12)
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    s1, s2 = bnkernels.backward_reduce(dout, cache)
    got = bnkernels.backward_apply(dout, cache, s1, s2, count)
    for a, b in zip(got, bnkernels.backward(dout, cache)):
        assert np.array_equal(bits(a), bits(b))


# malloc, except for blocks of exactly bn_fail_size bytes while it is not 0 (counted in
# bn_failures): preloaded into a child, it fails one allocation of the kernels on purpose
_FAILING_MALLOC = r"""
#include <stddef.h>
extern void *__libc_malloc(size_t);
size_t bn_fail_size = 0;
long bn_failures = 0;
void *malloc(size_t n)
{
    if (n != 0 && n == bn_fail_size) {
        __atomic_fetch_add(&bn_failures, 1, __ATOMIC_RELAXED);
        return NULL;
    }
    return __libc_malloc(n);
}
"""

_FALLBACK_CHILD = r"""
import ctypes, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import test_float16 as t
from bnkernels import _kernels
shim = ctypes.CDLL(sys.argv[2])
fail_size = ctypes.c_size_t.in_dll(shim, "bn_fail_size")
failures = ctypes.c_long.in_dll(shim, "bn_failures")
assert _kernels.float16_code(sys.argv[3]) == sys.argv[3]
x, dy = t._pass_inputs((2, 9000), 1)
with np.errstate(invalid="ignore", over="ignore"):
    fine = t._passes(x, dy, 1)
    fail_size.value = int(sys.argv[4])
    failing = t._passes(x, dy, 1)
    fail_size.value = 0
print(failures.value, all(np.array_equal(a, b) for a, b in zip(fine, failing)))
"""


def test_rows_wider_than_the_stack_give_the_same_bits_when_their_buffer_fails(code, tmp_path):
    """A float16 rows task of more than 512 columns takes its float coefficients from a
    heap buffer; should that malloc fail, its columns go 512 at a time over the rows, with
    the same bits.  A child with a malloc that fails exactly that buffer's size runs every
    pass of (2, 9000), whose tasks are 576 columns wide, both ways."""
    if os.environ.get("LD_PRELOAD"):  # the address sanitizer's runtime, say: it owns malloc
        pytest.skip("LD_PRELOAD is set already (%s)" % os.environ["LD_PRELOAD"])
    cb = _kernels.rows_plan(2, 9000, 2, 1)[0]
    assert cb > 512 and all(_kernels.rows_plan(2, 9000, 2, n)[0] == cb for n in (2, 3, 4))
    size = 4 * (-(-cb // 16) * 16) * 4  # 4 float arrays of the task's width padded to 16
    src, lib = tmp_path / "failing_malloc.c", tmp_path / "failing_malloc.so"
    src.write_text(_FAILING_MALLOC)
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    try:
        subprocess.run([cc, "-shared", "-fPIC", "-O1", str(src), "-o", str(lib)], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip("no C compiler to build the failing malloc: %s" % exc)
    env = dict(os.environ, LD_PRELOAD=str(lib))
    args = [os.path.dirname(os.path.abspath(__file__)), str(lib), code, str(size)]
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    n_failed, same = proc.stdout.split()
    assert int(n_failed) > 0  # the buffer was asked for, and refused
    assert same == "True"
