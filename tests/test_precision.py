"""float32 accuracy where naive float32 code breaks down.

The oracle is the reference run in float64 on the very same float32 values, so
any error is the kernels' own: the input is exact, only the result's final
rounding to float32 is allowed for.  Shapes cover both layouts, fused tasks and
several chunks (the chunk merge), so every summation path is exercised.
"""

import numpy as np
import pytest

import bnkernels
from bnhelpers import exact_dx
from bnkernels import _kernels, reference

RTOL = 1e-4

# (shape, axis): rows fused, rows in several row chunks, planar fused, planar in several chunks,
# channels-last
_ROWS_CHUNK = _kernels.rows_plan(10**9, 3, 4, 1)[2]
_PLANE_CHUNK = _kernels.planar_plan(10**6, 2, 1000, 4, 1)[2]
SHAPES = {
    "rows": ((512, 24), 1),
    "rows_chunked": ((_ROWS_CHUNK * 5 + 5, 3), 1),  # too tall for a narrow fused task too
    "planar": ((4, 3, 24, 24), 1),
    "small_planes": ((16, 3, 10, 10), 1),  # short NCHW planes, 16 images: rows of C*L columns
    "planar_chunked": ((_PLANE_CHUNK // 1000 + 1, 2, 1000), 1),
    "channels_last": ((8, 10, 10, 5), -1),
}


def test_shapes_reach_the_chunked_paths():
    for name, isz_arrays in [("rows_chunked", 1), ("rows_chunked", 2)]:
        (R, C), _ = SHAPES[name]
        assert _kernels.rows_plan(R, C, 4, isz_arrays)[3] > 1
    (N, C, L), _ = SHAPES["planar_chunked"]
    for n_arrays in (1, 2):
        assert _kernels.planar_plan(N, C, L, 4, n_arrays)[3] > 1
    (R, C), _ = SHAPES["rows"]
    assert _kernels.rows_plan(R, C, 4, 1)[3] == 1
    from bnkernels._layout import choose

    for name, kind in [
        ("planar", "planar"),
        ("small_planes", "rows"),
        ("planar_chunked", "planar"),
        ("rows_chunked", "rows"),
    ]:
        shape, axis = SHAPES[name]
        x = np.empty(shape, np.float32)
        assert choose([x, x], axis)[0] == kind, name


def _bshape(shape, axis):
    """The shape a per-channel vector takes to broadcast against an array of `shape`."""
    return tuple(n if i == axis % len(shape) else 1 for i, n in enumerate(shape))


def f64(a):
    return np.asarray(a, dtype=np.float64)


def assert_rel(name, got, want):
    """Within RTOL of the float64 result, relative to the array's magnitude."""
    got = np.asarray(got)
    assert got.dtype == np.float32, name
    assert np.all(np.isfinite(got)), "%s has inf/NaN" % name
    scale = np.abs(want).max()
    err = np.abs(f64(got) - want).max()
    assert err <= RTOL * scale, "%s: max error %.3g, %.3g relative (want <= %g)" % (
        name,
        err,
        err / scale,
        RTOL,
    )


def run_both(x, dy, axis, eps_mode, mode="train", gamma=None, beta=None, running=None):
    """(compiled results, float64 reference results), forward and backward."""
    C = x.shape[axis]
    rng = np.random.default_rng(C)
    gamma = rng.uniform(0.5, 1.5, C).astype(np.float32) if gamma is None else gamma
    beta = rng.standard_normal(C).astype(np.float32) if beta is None else beta
    param = {"mode": mode, "eps_mode": eps_mode}
    if running is not None:
        param["running_mean"], param["running_var"] = running
    out, cache = bnkernels.forward(x, gamma, beta, dict(param), axis=axis)
    grads = bnkernels.backward(dy, cache)
    ref_param = {k: (f64(v) if isinstance(v, np.ndarray) else v) for k, v in param.items()}
    ref_out, ref_cache = reference.forward(f64(x), f64(gamma), f64(beta), ref_param, axis=axis)
    ref_grads = reference.backward_alt(f64(dy), ref_cache)
    return (out, cache, grads), (ref_out, ref_cache, ref_grads)


def check_all(got, want):
    (out, cache, (dx, dgamma, dbeta)), (ref_out, ref_cache, (rdx, rdgamma, rdbeta)) = got, want
    assert_rel("out", out, ref_out)
    # the mean to double precision of the data's magnitude (it may itself be ~0)
    scale = np.abs(ref_cache["mean"]) + np.sqrt(ref_cache["var"])
    np.testing.assert_allclose(cache["mean"], ref_cache["mean"], rtol=0, atol=1e-12 * scale.max())
    np.testing.assert_allclose(cache["var"], ref_cache["var"], rtol=1e-9)
    assert_rel("dx", dx, rdx)
    assert_rel("dgamma", dgamma, rdgamma)
    assert_rel("dbeta", dbeta, rdbeta)


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize(
    "loc, std",
    [(1e4, 1.0), (0.0, 1e-3**0.5), (1e4, 1e-3**0.5), (-3e4, 0.1)],
    ids=["offset1e4", "var1e-3", "offset1e4-var1e-3", "offset-3e4"],
)
@pytest.mark.parametrize("layout", list(SHAPES))
def test_large_offset_and_tiny_variance(layout, loc, std, eps_mode):
    shape, axis = SHAPES[layout]
    rng = np.random.default_rng(11)
    # per-channel offsets around loc, so channels differ
    C = shape[axis]
    bshape = _bshape(shape, axis)
    offsets = loc * (1 + 0.01 * np.arange(C)).reshape(bshape)
    x = (offsets + std * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    check_all(*run_both(x, dy, axis, eps_mode))


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_large_offset_in_test_mode(layout, eps_mode):
    shape, axis = SHAPES[layout]
    rng = np.random.default_rng(12)
    C = shape[axis]
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    running = (
        (1e4 + rng.standard_normal(C)).astype(np.float32),
        rng.uniform(0.5, 2, C).astype(np.float32),
    )
    check_all(*run_both(x, dy, axis, eps_mode, mode="test", running=running))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_constant_channel_has_zero_variance_and_zero_xhat(layout, eps_mode, dtype):
    shape, axis = SHAPES[layout]
    C = shape[axis]
    bshape = _bshape(shape, axis)
    # 0.1, 1e4+0.1, ...: not representable, so a sum-then-divide mean is off by rounding
    values = np.array([0.1, 1e4 + 0.1, -7.3, 1 / 3, 3e-5] * C, dtype=dtype)[:C]
    x = np.broadcast_to(values.reshape(bshape), shape).copy()
    gamma = np.linspace(0.5, 2, C).astype(dtype)
    beta = np.linspace(-1, 1, C).astype(dtype)
    out, cache = bnkernels.forward(
        x, gamma, beta, {"mode": "train", "eps_mode": eps_mode}, axis=axis
    )
    assert np.all(cache["var"] >= 0)
    assert np.all(cache["var"] == 0), cache["var"]
    assert np.array_equal(cache["mean"], values.astype(np.float64))
    # xhat is exactly 0, so out is exactly beta
    assert np.array_equal(out, np.broadcast_to(beta.reshape(bshape), shape))
    dy = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = bnkernels.backward(dy, cache)
    assert np.all(dgamma == 0)
    assert np.all(np.isfinite(dx))


@pytest.mark.parametrize("layout", list(SHAPES))
def test_variance_never_negative_near_constant(layout):
    # a huge offset with spread below float32 resolution: var must come out >= 0, never < 0
    shape, axis = SHAPES[layout]
    rng = np.random.default_rng(6)
    x = (np.float32(1e4) + rng.integers(-1, 2, shape) * np.spacing(np.float32(1e4))).astype(
        np.float32
    )
    for eps_mode in ("var", "std"):
        out, cache = bnkernels.forward(
            x,
            np.ones(x.shape[axis], np.float32),
            np.zeros(x.shape[axis], np.float32),
            {"mode": "train", "eps_mode": eps_mode, "eps": 1e-30},  # a negative var gives NaN
            axis=axis,
        )
        assert np.all(cache["var"] >= 0)
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("dy_scale", [1.0, 1e30])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_huge_values_do_not_overflow(layout, eps_mode, dy_scale):
    # x ~ 1e30 in float32: x**2 overflows float32, not the true result
    shape, axis = SHAPES[layout]
    rng = np.random.default_rng(7)
    x = (1e30 * rng.standard_normal(shape) + 2e30).astype(np.float32)
    dy = (dy_scale * rng.standard_normal(shape)).astype(np.float32)
    assert np.all(np.isfinite(x)) and np.all(np.isfinite(dy))
    got, want = run_both(x, dy, axis, eps_mode)
    for name, w in [
        ("out", want[0]),
        ("dx", want[2][0]),
        ("dgamma", want[2][1]),
        ("dbeta", want[2][2]),
    ]:
        # the true results fit in float32, so finite float32 answers exist
        assert np.all(np.abs(w) < np.finfo(np.float32).max), name
    check_all(got, want)


@pytest.mark.parametrize("layout", list(SHAPES))
def test_huge_values_in_test_mode(layout):
    shape, axis = SHAPES[layout]
    C = shape[axis]
    rng = np.random.default_rng(8)
    x = (1e30 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    running = (
        (1e29 * rng.standard_normal(C)).astype(np.float32),
        np.full(C, 1e38, np.float32),
    )  # std 1e19: xhat ~ 1e11
    got, want = run_both(x, dy, axis, "var", mode="test", running=running)
    for w in (want[0],) + tuple(want[2]):
        assert np.all(np.abs(w) < np.finfo(np.float32).max)
    check_all(got, want)


# The float32 forward output is computed in float64 and rounded once: within half an ulp of
# the exact value (2**-24 relative), up to float64's own error (1e-9 of the terms here).
_F32_REGIMES = {  # (loc, std) of the data
    "unit": (0.0, 1.0),
    "offset1e4": (1e4, 1.0),
    "offset1e4-var1e-3": (1e4, 1e-3**0.5),
    "spread-near-resolution": (1e4, 3 * np.spacing(np.float32(1e4))),
    "offset-3e4-std1e3": (-3e4, 1e3),
    "huge": (3e24, 1e18),  # variance 1e36: the running variance still fits float32
}


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("regime", list(_F32_REGIMES))
@pytest.mark.parametrize("layout", list(SHAPES))
def test_float32_forward_output_is_rounded_once(layout, regime, mode):
    shape, axis = SHAPES[layout]
    loc, std = _F32_REGIMES[regime]
    C = shape[axis]
    rng = np.random.default_rng(21)
    x = (loc + std * rng.standard_normal(shape)).astype(np.float32)
    gamma = rng.uniform(-2, 2, C).astype(np.float32)
    beta = (rng.standard_normal(C) * 3).astype(np.float32)
    param = {"mode": mode}
    if mode == "test":
        param["running_mean"] = (loc + std * rng.standard_normal(C)).astype(np.float32)
        param["running_var"] = (std**2 * rng.uniform(0.5, 2, C)).astype(np.float32)
    ref_param = {k: (f64(v) if isinstance(v, np.ndarray) else v) for k, v in param.items()}
    out, _ = bnkernels.forward(x, gamma, beta, param, axis=axis)
    want, _ = reference.forward(f64(x), f64(gamma), f64(beta), ref_param, axis=axis)
    bshape = _bshape(shape, axis)
    b = f64(beta).reshape(bshape)
    bound = 2.0**-24 * np.abs(want) + 1e-9 * (np.abs(want - b) + np.abs(b))
    err = np.abs(f64(out) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), "error %g > bound %g at %s" % (err[worst], bound[worst], worst)


@pytest.mark.parametrize("layout", list(SHAPES))
def test_values_whose_deviation_overflows_float32(layout):
    # x = +-3e38: x - mean reaches 4.5e38, beyond float32, while xhat (about +-1.7) is small
    shape, axis = SHAPES[layout]
    rng = np.random.default_rng(22)
    x = np.where(rng.random(shape) < 0.25, 3e38, -3e38).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    with np.errstate(over="ignore"):  # the running variance (~1e77) does not fit float32
        got, want = run_both(x, dy, axis, "var")
    for name, w in [
        ("out", want[0]),
        ("dx", want[2][0]),
        ("dgamma", want[2][1]),
        ("dbeta", want[2][2]),
    ]:
        assert np.all(np.isfinite(w)), name
    check_all(got, want)


# dx element by element.  The kernels form dx = a*dy + b*xhat + c per channel (a = gamma*invstd;
# b and c from the float64 sums, which backward_reduce returns with backward's bits) in
# float64, rounded once: float32's dx is within half an ulp of the exact value plus
# float64's own error, at most twelve roundings (2**-53 each) of |a*dy| + |b*xhat| + |c|.  The
# exact value is taken in longdouble (64-bit significand on x86-64), from the float64
# statistics and sums themselves.  "cancel" makes dy nearly a*xhat + c, so that dx is near
# zero out of large terms; "shifted" adds a large mean to dy, so that c dominates.
_DX_BOUND64 = 12 * 2.0**-53  # eleven in eps_mode "std" (see docs/design.md), plus one
_DY_REGIMES = ("noise", "cancel", "shifted")


@pytest.mark.skipif(
    np.finfo(np.longdouble).nmant < 63, reason="needs an 80-bit longdouble for the exact dx"
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dy_regime", _DY_REGIMES)
@pytest.mark.parametrize("regime", list(_F32_REGIMES))
@pytest.mark.parametrize("layout", list(SHAPES))
def test_dx_elementwise_bound(layout, regime, dy_regime, eps_mode, mode, dtype):
    shape, axis = SHAPES[layout]
    loc, std = _F32_REGIMES[regime]
    C = shape[axis]
    rng = np.random.default_rng(23)
    x = (loc + std * rng.standard_normal(shape)).astype(dtype)
    gamma = rng.uniform(-2, 2, C).astype(dtype)
    param = {"mode": mode, "eps_mode": eps_mode}
    if mode == "test":
        param["running_mean"] = (loc + std * rng.standard_normal(C)).astype(dtype)
        param["running_var"] = (std**2 * rng.uniform(0.5, 2, C)).astype(dtype)
    _, cache = bnkernels.forward(x, gamma, np.zeros(C, dtype), param, axis=axis)
    bshape = _bshape(shape, axis)
    xhat = (f64(x) - cache["mean"].reshape(bshape)) * cache["invstd"].reshape(bshape)
    noise = rng.standard_normal(shape)
    if dy_regime == "cancel":
        dy = 3.0 * xhat + 5.0 + 1e-4 * noise
    elif dy_regime == "shifted":
        dy = 1e3 + noise
    else:
        dy = noise
    dy = dy.astype(dtype)
    dx = bnkernels.backward(dy, cache)[0]
    sums = bnkernels.backward_reduce(dy, cache)
    want, terms = exact_dx(x, dy, cache, sums, axis, eps_mode, mode == "train")
    bound = _DX_BOUND64 * terms
    if dtype == np.float32:
        bound = bound + np.spacing(np.abs(want).astype(np.float32)).astype(np.longdouble) / 2
    err = np.abs(dx.astype(np.longdouble) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), "error %g > bound %g at %s (terms %g)" % (
        err[worst],
        bound[worst],
        worst,
        terms[worst],
    )
