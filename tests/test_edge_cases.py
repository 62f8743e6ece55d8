"""Edge cases: one element per channel, constant channels, NaN/Inf, read-only and untouched
inputs, output layouts, float16/longdouble through the reference, running statistics,
test mode."""

import numpy as np
import pytest

import bnkernels
from bnkernels import _kernels, reference
from bnhelpers import (
    as_layout,
    assert_close,
    channel_shape,
    make_inputs,
    numerical_gradient,
    reference64,
    rel_error,
    stride_order,
)

KERNEL_DTYPES = [np.float32, np.float64]
DT_IDS = ["float32", "float64"]
IMPLS = {
    "kernels": (bnkernels.forward, bnkernels.backward),
    "reference": (reference.forward, reference.backward_alt),
    "reference.graph": (reference.forward, reference.backward_graph),
}


# ---------------------------------------------------------------------------
# one element per channel (M = 1)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    "shape,axis",
    [((1, 7), 1), ((1, 5, 1, 1), 1), ((1, 1, 1, 6), -1), ((1, 3000), 1), ((1, 4, 1), 1)],
)
def test_single_element_per_channel(shape, axis, impl, dtype, eps_mode):
    forward, backward = IMPLS[impl]
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=1)
    bn_param = {"mode": "train", "eps_mode": eps_mode}
    out, cache = forward(x, gamma, beta, bn_param, axis=axis)
    bs = channel_shape(len(shape), axis, shape[axis])
    # xhat = 0, so out = beta exactly
    assert np.all(np.isfinite(out))
    assert np.array_equal(out, np.broadcast_to(beta.reshape(bs), shape))
    dx, dgamma, dbeta = backward(dout, cache)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dgamma)) and np.all(np.isfinite(dbeta))
    assert np.all(dx == 0), dx
    assert np.all(dgamma == 0), dgamma
    assert_close(dbeta, dout.astype(np.float64).reshape(-1), dtype, what="dbeta")
    assert np.all(np.isfinite(bn_param["running_var"]))
    np.testing.assert_allclose(bn_param["running_var"], 0.0)


def test_single_element_gradient_is_numerically_zero():
    x, gamma, beta, w = make_inputs((1, 4), 1, np.float64, seed=2)

    def loss():
        return float(np.sum(bnkernels.forward(x, gamma, beta, {"mode": "train"})[0] * w))

    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(w, cache)
    assert rel_error(dx, numerical_gradient(loss, x)) < 1e-8
    assert rel_error(dgamma, numerical_gradient(loss, gamma)) < 1e-8
    assert rel_error(dbeta, numerical_gradient(loss, beta)) < 1e-8


# ---------------------------------------------------------------------------
# a constant channel (M > 1, variance 0)
# ---------------------------------------------------------------------------

CONST_SHAPES = [
    ((16, 4), 1),
    ((4, 3, 5, 5), 1),
    ((3, 5, 5, 4), -1),
    ((40000, 3), 1),
    ((2, 3, 300, 300), 1),
]


def _with_constant_channel(shape, axis, dtype, c=1, value=0.1):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=3)
    idx = [slice(None)] * len(shape)
    idx[axis % len(shape)] = c
    x[tuple(idx)] = value
    return x, gamma, beta, dout, tuple(idx)


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,axis", CONST_SHAPES)
def test_constant_channel(shape, axis, dtype, eps_mode):
    x, gamma, beta, dout, idx = _with_constant_channel(shape, axis, dtype)
    c = 1
    bn_param = {"mode": "train", "eps_mode": eps_mode}
    out, cache = bnkernels.forward(x, gamma, beta, bn_param, axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    for name, a in (
        ("out", out),
        ("dx", dx),
        ("dgamma", dgamma),
        ("dbeta", dbeta),
        ("running_var", bn_param["running_var"]),
    ):
        assert np.all(np.isfinite(a)), name
    # xhat = 0 on the constant channel: out = beta there, and the statistics are exact
    assert cache["var"][c] == 0
    np.testing.assert_allclose(out[idx], beta[c], rtol=0, atol=1e-6 * abs(beta[c]))
    np.testing.assert_allclose(dgamma[c], 0, atol=1e-6 * np.abs(dout[idx]).sum())

    # the train-mode gradient is not zero: gamma/d * (dy - mean(dy)) with var = 0
    eps = 1e-5
    d = np.sqrt(eps) if eps_mode == "var" else eps
    dy = dout[idx].astype(np.float64)
    want = gamma[c] / d * (dy - dy.mean())
    assert_close(
        dx[idx],
        want,
        dtype,
        rtol=1e-4 if dtype == np.float32 else 1e-8,
        what="dx on the constant channel",
    )

    r_out, _, _, r_alt, r_graph = reference64(
        x, gamma, beta, {"mode": "train", "eps_mode": eps_mode}, dout, axis
    )
    rtol = 1e-4 if dtype == np.float32 else 1e-8
    assert_close(out, r_out, rtol=rtol, what="out")
    for r in (r_alt, r_graph):
        assert_close(dx, r[0], rtol=rtol, what="dx")
        assert_close(dbeta, r[2], rtol=rtol, what="dbeta")
        others = [i for i in range(shape[axis]) if i != c]
        assert_close(dgamma[others], r[1][others], rtol=rtol, what="dgamma")


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape,axis", [((6, 3), 1), ((2, 3, 2, 2), 1), ((2, 2, 2, 3), -1)])
def test_constant_channel_gradient_matches_numerical(impl, shape, axis):
    """eps_mode 'var': the loss is smooth at var = 0, so centered differences apply."""
    forward, backward = IMPLS[impl]
    x, gamma, beta, w, idx = _with_constant_channel(shape, axis, np.float64, value=0.7)

    def loss():
        return float(np.sum(forward(x, gamma, beta, {"mode": "train"}, axis=axis)[0] * w))

    _, cache = forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    dx, dgamma, dbeta = backward(w, cache)
    num_dx = numerical_gradient(loss, x, h=1e-6)
    assert rel_error(dx, num_dx) < 1e-5
    assert np.abs(dx[idx]).max() > 1.0  # gamma/sqrt(eps) * (dy - mean dy): large, not zero
    assert rel_error(dbeta, numerical_gradient(loss, beta)) < 1e-6
    others = [i for i in range(shape[axis]) if i != 1]
    assert rel_error(dgamma[others], numerical_gradient(loss, gamma)[others]) < 1e-6


def test_all_channels_constant():
    x = np.full((10, 4, 3), 2.5)
    gamma, beta = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.1, 0.2, 0.3, 0.4])
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    assert np.array_equal(out, np.broadcast_to(beta[None, :, None], x.shape))
    dout = np.random.default_rng(0).standard_normal(x.shape)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert np.all(np.isfinite(dx))
    assert np.array_equal(dgamma, np.zeros(4))
    dy_mean = dout.mean(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(
        dx, gamma[None, :, None] / np.sqrt(1e-5) * (dout - dy_mean), rtol=1e-9, atol=1e-9
    )


# ---------------------------------------------------------------------------
# NaN / Inf stay in their channel
# ---------------------------------------------------------------------------

BAD_SHAPES = [
    ((50, 6), 1),
    ((4, 6, 5, 5), 1),
    ((3, 5, 5, 6), -1),
    ((40000, 6), 1),
    ((2, 6, 200, 200), 1),
]


def _poison(a, axis, c, value):
    b = a.copy()
    idx = [0] * a.ndim
    idx[axis % a.ndim] = c
    idx[-1 if axis % a.ndim != a.ndim - 1 else 0] = 1
    b[tuple(idx)] = value
    return b


def _channel(a, axis, cs):
    return np.take(a, cs, axis=axis)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,axis", BAD_SHAPES)
def test_nonfinite_input_stays_in_its_channel(shape, axis, dtype, value):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=4)
    c = 2
    C = shape[axis]
    others = [i for i in range(C) if i != c]
    bad = _poison(x, axis, c, value)
    p_bad, p_good = {"mode": "train"}, {"mode": "train"}
    out_b, cache_b = bnkernels.forward(bad, gamma, beta, p_bad, axis=axis)
    out_g, cache_g = bnkernels.forward(x, gamma, beta, p_good, axis=axis)
    dx_b, dg_b, db_b = bnkernels.backward(dout, cache_b)
    dx_g, dg_g, db_g = bnkernels.backward(dout, cache_g)

    assert not np.all(np.isfinite(_channel(out_b, axis, [c])))
    for name, b, g in (("out", out_b, out_g), ("dx", dx_b, dx_g)):
        b_o, g_o = _channel(b, axis, others), _channel(g, axis, others)
        assert np.all(np.isfinite(b_o)), name
        assert np.array_equal(b_o, g_o), "%s of the clean channels changed" % name
    for name, b, g in (
        ("dgamma", dg_b, dg_g),
        ("dbeta", db_b, db_g),
        ("running_mean", p_bad["running_mean"], p_good["running_mean"]),
        ("running_var", p_bad["running_var"], p_good["running_var"]),
    ):
        assert np.all(np.isfinite(b[others])), name
        assert np.array_equal(b[others], g[others]), name

    # and the clean channels agree with a computation that never saw the bad channel
    x_o = _channel(x, axis, others)
    out_o, cache_o = bnkernels.forward(
        x_o, gamma[others], beta[others], {"mode": "train"}, axis=axis
    )
    dx_o, dg_o, db_o = bnkernels.backward(_channel(dout, axis, others), cache_o)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    assert_close(_channel(out_b, axis, others), out_o.astype(np.float64), rtol=rtol, what="out")
    assert_close(_channel(dx_b, axis, others), dx_o.astype(np.float64), rtol=rtol, what="dx")
    assert_close(dg_b[others], dg_o.astype(np.float64), rtol=rtol, what="dgamma")
    assert_close(db_b[others], db_o.astype(np.float64), rtol=rtol, what="dbeta")


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("shape,axis", BAD_SHAPES)
def test_nonfinite_dout_stays_in_its_channel(shape, axis, dtype, value):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=5)
    c = 4
    others = [i for i in range(shape[axis]) if i != c]
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    bad = _poison(dout, axis, c, value)
    dx_b, dg_b, db_b = bnkernels.backward(bad, cache)
    dx_g, dg_g, db_g = bnkernels.backward(dout, cache)
    assert not np.isfinite(db_b[c])
    assert np.all(np.isfinite(_channel(dx_b, axis, others)))
    assert np.array_equal(_channel(dx_b, axis, others), _channel(dx_g, axis, others))
    assert np.array_equal(dg_b[others], dg_g[others])
    assert np.array_equal(db_b[others], db_g[others])


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_nan_in_gamma_and_beta_stays_in_its_channel(dtype):
    x, gamma, beta, dout = make_inputs((20, 5, 7), 1, dtype, seed=6)
    g_bad, b_bad = gamma.copy(), beta.copy()
    g_bad[1] = np.nan
    b_bad[3] = np.inf
    out_b, cache_b = bnkernels.forward(x, g_bad, b_bad, {"mode": "train"})
    out_g, cache_g = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    ok = [0, 2, 4]
    assert np.array_equal(out_b[:, ok], out_g[:, ok])
    assert np.all(np.isnan(out_b[:, 1])) and np.all(np.isinf(out_b[:, 3]))
    dx_b = bnkernels.backward(dout, cache_b)[0]
    dx_g = bnkernels.backward(dout, cache_g)[0]
    assert np.array_equal(dx_b[:, [0, 2, 3, 4]], dx_g[:, [0, 2, 3, 4]])


# ---------------------------------------------------------------------------
# read-only inputs; inputs never modified
# ---------------------------------------------------------------------------

ALL_DTYPES = [np.float16, np.float32, np.float64, np.longdouble]
ALL_IDS = ["float16", "float32", "float64", "longdouble"]


def _readonly(*arrays):
    for a in arrays:
        a.setflags(write=False)
    return arrays


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
@pytest.mark.parametrize(
    "shape,axis,layout",
    [
        ((6, 4, 5, 5), 1, "c"),
        ((6, 5, 5, 4), -1, "c"),
        ((9, 7), 1, "fortran"),
        ((6, 4, 5, 5), 1, "reversed_last"),
    ],
)
def test_read_only_inputs(shape, axis, layout, dtype, mode):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=7)
    x, dout = as_layout(x, layout, axis), as_layout(dout, layout, axis)
    C = shape[axis]
    rm, rv = np.linspace(-1, 1, C).astype(dtype), np.linspace(0.5, 1.5, C).astype(dtype)
    _readonly(x, gamma, beta, dout, rm, rv)
    bn_param = {"mode": mode, "running_mean": rm, "running_var": rv}
    out, cache = bnkernels.forward(x, gamma, beta, bn_param, axis=axis)
    for v in cache.values():
        if isinstance(v, np.ndarray) and v.flags.writeable:
            v.setflags(write=False)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert out.dtype == dtype and dx.dtype == dtype
    assert out.flags.writeable and dx.flags.writeable
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_read_only_seed_style_cache(dtype):
    x, gamma, _, dout = make_inputs((30, 6), 1, dtype, seed=8)
    denom = np.sqrt(x.var(axis=0) + 1e-5)
    cache = {"x_hat": (x - x.mean(axis=0)) / denom, "gamma": gamma, "denom": denom}
    _readonly(dout, *cache.values())
    want = bnkernels.backward(dout.copy(), {k: v.copy() for k, v in cache.items()})
    got = bnkernels.backward(dout, cache)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


def _snapshot(obj):
    """Deep copy of dicts and arrays, remembering array strides."""
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return (obj.copy(), obj.strides)
    return obj


def _assert_unchanged(obj, snap, what):
    if isinstance(snap, dict):
        assert isinstance(obj, dict) and set(obj) == set(snap), what
        for k in snap:
            _assert_unchanged(obj[k], snap[k], "%s[%r]" % (what, k))
    elif isinstance(obj, np.ndarray):
        copy, strides = snap
        assert obj.strides == strides and obj.dtype == copy.dtype, what
        assert np.array_equal(obj, copy, equal_nan=True), "%s was modified" % what
    else:
        assert obj == snap, "%s changed from %r to %r" % (what, snap, obj)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
@pytest.mark.parametrize(
    "x_layout,dout_layout",
    [
        ("c", "c"),
        ("channels_last", "c"),
        ("sliced_channels", "reversed_batch"),
        ("fortran", "channels_outer"),
    ],
)
def test_inputs_are_not_modified(dtype, x_layout, dout_layout):
    x0, gamma, beta, dout0 = make_inputs((5, 6, 4, 3), 1, dtype, seed=9)
    x, dout = as_layout(x0, x_layout), as_layout(dout0, dout_layout)
    rm, rv = np.full(6, 0.5, dtype), np.full(6, 2.0, dtype)
    bn_param = {"mode": "train", "running_mean": rm, "running_var": rv, "momentum": 0.8}
    inputs = {"x": x, "gamma": gamma, "beta": beta, "running_mean": rm, "running_var": rv}
    snap_in = _snapshot(inputs)
    out, cache = bnkernels.forward(x, gamma, beta, bn_param)
    _assert_unchanged(inputs, snap_in, "forward input")
    assert not np.shares_memory(out, x)

    snap_cache = _snapshot(cache)
    snap_dout = _snapshot(dout)
    first = bnkernels.backward(dout, cache)
    second = bnkernels.backward(dout, cache)
    _assert_unchanged(cache, snap_cache, "cache")
    _assert_unchanged(dout, snap_dout, "dout")
    assert not np.shares_memory(first[0], dout)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------
# output memory layout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_channels_last_in_channels_last_out(dtype):
    x, gamma, beta, dout = make_inputs((3, 8, 9, 5), -1, dtype, seed=10)
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=-1)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert out.flags.c_contiguous and dx.flags.c_contiguous

    xv, dv = x.transpose(0, 3, 1, 2), dout.transpose(0, 3, 1, 2)
    out_v, cache_v = bnkernels.forward(xv, gamma, beta, {"mode": "train"}, axis=1)
    dx_v = bnkernels.backward(dv, cache_v)[0]
    assert out_v.shape == xv.shape and dx_v.shape == dv.shape
    assert out_v.transpose(0, 2, 3, 1).flags.c_contiguous
    assert dx_v.transpose(0, 2, 3, 1).flags.c_contiguous
    assert out_v.strides == xv.strides and dx_v.strides == dv.strides


@pytest.mark.parametrize(
    "dtype", KERNEL_DTYPES + [np.float16, np.longdouble], ids=DT_IDS + ["float16", "longdouble"]
)
def test_fortran_order_2d(dtype):
    x, gamma, beta, dout = make_inputs((40, 6), 1, dtype, seed=11)
    xf, df = np.asfortranarray(x), np.asfortranarray(dout)
    out, cache = bnkernels.forward(xf, gamma, beta, {"mode": "train"})
    assert out.flags.f_contiguous
    dx = bnkernels.backward(df, cache)[0]
    assert dx.flags.f_contiguous
    # dx follows dout, not x
    dx_c = bnkernels.backward(np.ascontiguousarray(dout), cache)[0]
    assert dx_c.flags.c_contiguous and not dx_c.flags.f_contiguous
    rtol = {np.dtype(np.float16): 5e-3, np.dtype(np.float32): 1e-5}.get(np.dtype(dtype), 1e-12)
    assert_close(dx, dx_c.astype(np.float64), rtol=rtol, what="dx")


@pytest.mark.parametrize(
    "dout_layout",
    ["c", "fortran", "channels_last", "channels_outer", "sliced_batch", "reversed_batch"],
)
@pytest.mark.parametrize("x_layout", ["c", "channels_last", "sliced_channels"])
def test_dx_follows_dout_layout(x_layout, dout_layout):
    x0, gamma, beta, dout0 = make_inputs((4, 5, 6, 7), 1, np.float32, seed=12)
    x, dout = as_layout(x0, x_layout), as_layout(dout0, dout_layout)
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    assert stride_order(out) == stride_order(x)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert stride_order(dx) == stride_order(dout)
    assert all(s > 0 for s in dx.strides) and all(s > 0 for s in out.strides)
    # compact: no gaps
    assert (
        dx.flags.c_contiguous
        or dx.flags.f_contiguous
        or np.prod(dx.shape) * dx.itemsize == max(abs(s) * n for s, n in zip(dx.strides, dx.shape))
    )
    for v in (dgamma, dbeta):
        assert v.shape == (5,) and v.dtype == np.float32 and v.flags.c_contiguous


# ---------------------------------------------------------------------------
# float16 runs the kernels and longdouble the reference; both keep their dtype
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize(
    "dtype,rtol", [(np.float16, 5e-3), (np.longdouble, 1e-12)], ids=["float16", "longdouble"]
)
@pytest.mark.parametrize("shape,axis", [((16, 5), 1), ((4, 3, 6, 6), 1), ((4, 6, 6, 3), -1)])
def test_reference_dtypes_keep_their_dtype(shape, axis, dtype, rtol, eps_mode, mode):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=13)
    C = shape[axis]
    bn_param = {"mode": mode, "eps_mode": eps_mode}
    if mode == "test":
        bn_param["running_mean"] = np.linspace(-0.5, 0.5, C).astype(dtype)
        bn_param["running_var"] = np.linspace(1.0, 3.0, C).astype(dtype)
    p = dict(bn_param)
    out, cache = bnkernels.forward(x, gamma, beta, p, axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    for name, a in (
        ("out", out),
        ("dx", dx),
        ("dgamma", dgamma),
        ("dbeta", dbeta),
        ("running_mean", p["running_mean"]),
        ("running_var", p["running_var"]),
    ):
        assert a.dtype == dtype, "%s has dtype %s" % (name, a.dtype)
    r_out, _, p_ref, r_alt, _ = reference64(x, gamma, beta, bn_param, dout, axis)
    assert_close(out, r_out, rtol=rtol, what="out")
    assert_close(dx, r_alt[0], rtol=rtol, what="dx")
    assert_close(dgamma, r_alt[1], rtol=rtol, what="dgamma")
    assert_close(dbeta, r_alt[2], rtol=rtol, what="dbeta")
    assert_close(p["running_mean"], p_ref["running_mean"], rtol=rtol, what="running_mean")
    assert_close(p["running_var"], p_ref["running_var"], rtol=rtol, what="running_var")

    if dtype == np.float16:  # the kernels ran: tests/test_float16.py checks their bound
        return
    # it is the reference that ran
    p2 = dict(bn_param)
    ref_out, ref_cache = reference.forward(x, gamma, beta, p2, axis=axis)
    assert np.array_equal(out, ref_out)
    for a, b in zip((dx, dgamma, dbeta), reference.backward_alt(dout, ref_cache)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "dtype,rtol", [(np.float16, 5e-3), (np.longdouble, 1e-12)], ids=["float16", "longdouble"]
)
def test_reference_dtypes_with_seed_style_cache(dtype, rtol):
    x, gamma, _, dout = make_inputs((20, 4), 1, dtype, seed=14)
    x64 = x.astype(np.float64)
    denom = np.sqrt(x64.var(axis=0) + 1e-5)
    xhat = (x64 - x64.mean(axis=0)) / denom
    cache = {"x_hat": xhat.astype(dtype), "gamma": gamma, "denom": denom.astype(dtype)}
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert dx.dtype == dtype and dgamma.dtype == dtype and dbeta.dtype == dtype
    want = reference.backward_alt(
        dout.astype(np.float64), {k: v.astype(np.float64) for k, v in cache.items()}
    )
    for a, b, name in zip((dx, dgamma, dbeta), want, ("dx", "dgamma", "dbeta")):
        assert_close(a, b, rtol=rtol, what=name)


def test_longdouble_keeps_its_extra_precision():
    """Values that differ only beyond float64 precision stay distinct in longdouble."""
    if np.finfo(np.longdouble).nmant <= np.finfo(np.float64).nmant:
        pytest.skip("longdouble is no wider than float64 on this platform")
    step = np.longdouble(2.0) ** -58
    col = np.longdouble(1) + np.arange(8, dtype=np.longdouble) * step
    assert np.all(col.astype(np.float64) == 1.0)
    x = np.stack([col, -col], axis=1)
    gamma = np.ones(2, dtype=np.longdouble)
    beta = np.zeros(2, dtype=np.longdouble)
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train", "eps": 1e-300})
    assert out.dtype == np.longdouble
    # exact standardization of 0..7: distinct values with unit variance
    k = np.arange(8, dtype=np.longdouble)
    want = (k - k.mean()) / np.sqrt(((k - k.mean()) ** 2).mean())
    np.testing.assert_allclose(out[:, 0].astype(np.float64), want.astype(np.float64), rtol=1e-3)
    np.testing.assert_allclose(out[:, 1].astype(np.float64), -want.astype(np.float64), rtol=1e-3)


# ---------------------------------------------------------------------------
# running statistics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
@pytest.mark.parametrize("shape,axis", [((12, 4), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1)])
def test_running_stats_created_and_updated(shape, axis, dtype):
    x, gamma, beta, _ = make_inputs(shape, axis, dtype, seed=16, offset=3.0)
    C = shape[axis]
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=red), x64.var(axis=red)
    tol = {np.dtype(np.float16): 2e-3}.get(np.dtype(dtype), 1e-6)

    bn_param = {"mode": "train"}
    bnkernels.forward(x, gamma, beta, bn_param, axis=axis)
    rm, rv = bn_param["running_mean"], bn_param["running_var"]
    assert rm.shape == (C,) and rv.shape == (C,)
    assert rm.dtype == dtype and rv.dtype == dtype
    np.testing.assert_allclose(rm.astype(np.float64), 0.1 * mean, rtol=tol, atol=tol)
    # the biased (ddof=0) variance, not the unbiased one
    np.testing.assert_allclose(rv.astype(np.float64), 0.1 * var, rtol=tol, atol=tol)
    M = x.size // C
    assert not np.allclose(rv.astype(np.float64), 0.1 * var * M / (M - 1), rtol=tol, atol=0)

    # a second step with another momentum folds into the stored statistics
    bn_param["momentum"] = 0.5
    x2 = (x64 * 2 + 1).astype(dtype)
    bnkernels.forward(x2, gamma, beta, bn_param, axis=axis)
    x2_64 = x2.astype(np.float64)
    np.testing.assert_allclose(
        bn_param["running_mean"].astype(np.float64),
        0.5 * rm.astype(np.float64) + 0.5 * x2_64.mean(axis=red),
        rtol=tol,
        atol=tol,
    )
    np.testing.assert_allclose(
        bn_param["running_var"].astype(np.float64),
        0.5 * rv.astype(np.float64) + 0.5 * x2_64.var(axis=red),
        rtol=tol,
        atol=tol,
    )


def _numpy_running(running, stat, momentum):
    """The CS231n update as NumPy evaluates it, the definition the face must match."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (momentum * running + (1 - momentum) * stat).astype(running.dtype, copy=False)


@pytest.mark.parametrize("momentum", [0.9, 0.99, 0.1, 0.0, 1.0, 1 / 3])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_running_update_is_numpys_expression_bitwise(dtype, momentum):
    rng = np.random.default_rng(19)
    big = 1e38 if dtype == np.float32 else 1e300
    for exp in (-300, -40, -1, 0, 5, 30, 300):
        running = (rng.standard_normal(37) * 10.0 ** min(exp, 30)).astype(dtype)
        stat = np.clip(rng.standard_normal(37) * 10.0**exp, -big, big)
        stat[0] = 1e-45  # a float32 subnormal
        got = _kernels.running_update(running, stat, momentum)
        want = _numpy_running(running, stat, momentum)
        assert got.dtype == want.dtype and got is not running
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), exp
    # a result that is not finite (inf, NaN, beyond float32) is left to NumPy
    for bad in (np.inf, np.nan, 4e38):
        stat = np.ones(5)
        stat[2] = bad
        want = _numpy_running(np.ones(5, dtype), stat, momentum)
        got = _kernels.running_update(np.ones(5, dtype), stat, momentum)
        assert got is None if not np.all(np.isfinite(want)) else np.array_equal(got, want)


def test_running_stats_overflow_warns_as_numpy_does():
    x = np.array([[3e38], [-3e38], [-3e38], [-3e38]], np.float32)
    p = {"mode": "train"}
    with pytest.warns(RuntimeWarning, match="overflow"):
        _, cache = bnkernels.forward(x, np.ones(1, np.float32), np.zeros(1, np.float32), p)
    assert np.isinf(p["running_var"][0])
    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        bnkernels.forward(x, np.ones(1, np.float32), np.zeros(1, np.float32), {"mode": "train"})


@pytest.mark.parametrize(
    "kind", ["contiguous", "strided", "float64 for float32 x", "float16", "default"]
)
def test_forward_running_stats_bitwise_numpys_update(kind):
    rng = np.random.default_rng(20)
    x = (rng.standard_normal((50, 6)) * 3 + 1).astype(np.float32)
    gamma, beta = np.ones(6, np.float32), np.zeros(6, np.float32)
    base = rng.standard_normal(12)
    running = {
        "contiguous": base[:6].astype(np.float32),
        "strided": base.astype(np.float32)[::2],
        "float64 for float32 x": base[:6].copy(),
        "float16": base[:6].astype(np.float16),
        "default": np.zeros(6, np.float32),
    }[kind]
    p = {"mode": "train", "momentum": 0.7}
    if kind != "default":
        p["running_mean"], p["running_var"] = running, running + 2
    before_mean, before_var = running.copy(), (running + 2) if kind != "default" else running
    _, cache = bnkernels.forward(x, gamma, beta, p)
    for name, old, stat in (
        ("running_mean", before_mean, cache["mean"]),
        ("running_var", before_var, cache["var"]),
    ):
        want = _numpy_running(old, stat, 0.7)
        assert p[name].dtype == want.dtype, name
        assert np.array_equal(p[name].view(np.uint8), want.view(np.uint8)), name


def test_running_update_rejects_what_it_cannot_do():
    r32, s = np.zeros(4, np.float32), np.zeros(4)
    with pytest.raises(TypeError, match="float32 and float64"):
        _kernels.running_update(np.zeros(4, np.float16), s, 0.9)
    with pytest.raises(TypeError, match="float64 stat"):
        _kernels.running_update(r32, s.astype(np.float32), 0.9)
    with pytest.raises(TypeError, match="float64 stat"):
        _kernels.running_update(r32, np.zeros(5), 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        _kernels.running_update(np.zeros(8, np.float32)[::2], s, 0.9)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_defaults_eps_and_momentum(dtype):
    """eps defaults to 1e-5 (visible on a batch with variance ~1e-6), momentum to 0.9."""
    rng = np.random.default_rng(17)
    x = (rng.standard_normal((200, 3)) * 1e-3).astype(dtype)
    gamma, beta = np.ones(3, dtype), np.zeros(3, dtype)
    p_default, p_explicit = {"mode": "train"}, {"mode": "train", "eps": 1e-5, "momentum": 0.9}
    out_d, _ = bnkernels.forward(x, gamma, beta, p_default)
    out_e, _ = bnkernels.forward(x, gamma, beta, p_explicit)
    assert np.array_equal(out_d, out_e)
    assert np.array_equal(p_default["running_mean"], p_explicit["running_mean"])
    assert np.array_equal(p_default["running_var"], p_explicit["running_var"])
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    assert_close(out_d, want, dtype, what="out with the default eps")
    out_other, _ = bnkernels.forward(x, gamma, beta, {"mode": "train", "eps": 1e-8})
    assert not np.allclose(out_other, out_d, rtol=1e-2)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_eps_modes_follow_their_formulas(dtype):
    x, gamma, beta, _ = make_inputs((30, 4, 5), 1, dtype, seed=18, scale=0.2)
    eps = 0.05
    x64 = x.astype(np.float64)
    mu = x64.mean(axis=(0, 2), keepdims=True)
    var = x64.var(axis=(0, 2), keepdims=True)
    g = gamma.astype(np.float64)[None, :, None]
    b = beta.astype(np.float64)[None, :, None]
    for eps_mode, denom in (("var", np.sqrt(var + eps)), ("std", np.sqrt(var) + eps)):
        out, cache = bnkernels.forward(
            x, gamma, beta, {"mode": "train", "eps": eps, "eps_mode": eps_mode}
        )
        assert_close(out, g * (x64 - mu) / denom + b, dtype, what="out eps_mode=%s" % eps_mode)
    out_var, _ = bnkernels.forward(x, gamma, beta, {"mode": "train", "eps": eps})
    out_std, _ = bnkernels.forward(x, gamma, beta, {"mode": "train", "eps": eps, "eps_mode": "std"})
    assert not np.allclose(out_var, out_std, rtol=1e-3)


# ---------------------------------------------------------------------------
# test mode
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize(
    "shape,axis",
    # rows, NCHW planes as rows, channels-last, planar, chunked planar, tall chunked rows
    [
        ((10, 4), 1),
        ((6, 4, 5, 5), 1),
        ((6, 5, 5, 4), -1),
        ((3, 4, 64, 64), 1),
        ((2, 4, 400, 400), 1),
        ((40000, 8), 1),
    ],
)
def test_test_mode_dx_does_not_read_x(shape, axis, dtype):
    # with running statistics dx = gamma/d * dy: a NaN or Inf in x leaves dx finite there, as
    # in the reference and PyTorch's eval-mode backward (dgamma of its channel is NaN)
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=21)
    C = shape[axis]
    idx = [0] * len(shape)
    idx[axis % len(shape)] = 1
    x[tuple(idx)] = np.nan
    idx[axis % len(shape)] = 2
    x[tuple(idx)] = np.inf
    p = {"mode": "test", "running_mean": np.zeros(C), "running_var": np.full(C, 2.0)}
    _, cache = bnkernels.forward(x, gamma, beta, dict(p), axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    scale = gamma.astype(np.float64) * (1.0 / np.sqrt(2.0 + 1e-5))  # as the kernels form it
    bs = channel_shape(len(shape), axis, C)
    t = np.float32 if dtype == np.float16 else np.float64  # float16's output arithmetic
    want = (scale.astype(t).reshape(bs) * (dout.astype(t) + t(0.0))).astype(dtype)
    assert np.array_equal(dx, want)
    assert np.isfinite(dbeta).all() and np.isnan(dgamma[1]) and np.isfinite(dgamma[[0, 3]]).all()


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
@pytest.mark.parametrize(
    "shape,axis", [((10, 4), 1), ((3, 4, 6, 5), 1), ((3, 6, 5, 4), -1), ((1, 4), 1)]
)
def test_test_mode_uses_running_stats(shape, axis, dtype, eps_mode):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=19)
    C = shape[axis]
    bs = channel_shape(len(shape), axis, C)
    rng = np.random.default_rng(20)
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.2, 2.0, C).astype(dtype)
    eps = 1e-3
    bn_param = {
        "mode": "test",
        "eps": eps,
        "eps_mode": eps_mode,
        "running_mean": rm,
        "running_var": rv,
    }
    out, cache = bnkernels.forward(x, gamma, beta, bn_param, axis=axis)
    assert np.array_equal(bn_param["running_mean"], rm)
    assert np.array_equal(bn_param["running_var"], rv)

    rm64, rv64 = rm.astype(np.float64).reshape(bs), rv.astype(np.float64).reshape(bs)
    d = np.sqrt(rv64 + eps) if eps_mode == "var" else np.sqrt(rv64) + eps
    xhat = (x.astype(np.float64) - rm64) / d
    g64 = gamma.astype(np.float64).reshape(bs)
    assert_close(out, g64 * xhat + beta.astype(np.float64).reshape(bs), dtype, what="out")

    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    dy = dout.astype(np.float64)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    assert_close(dx, dy * g64 / d, dtype, what="dx")
    assert_close(dgamma, (dy * xhat).sum(axis=red), dtype, what="dgamma")
    assert_close(dbeta, dy.sum(axis=red), dtype, what="dbeta")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_test_mode_is_per_sample(dtype):
    """Test mode does not look at the batch: a sub-batch gives bitwise the same rows."""
    x, gamma, beta, dout = make_inputs((64, 8, 9), 1, dtype, seed=21)
    bn = {
        "mode": "test",
        "running_mean": np.linspace(-1, 1, 8).astype(dtype),
        "running_var": np.linspace(0.5, 2, 8).astype(dtype),
    }
    out, cache = bnkernels.forward(x, gamma, beta, dict(bn))
    out_part, cache_part = bnkernels.forward(x[5:9], gamma, beta, dict(bn))
    assert np.array_equal(out[5:9], out_part)
    dx = bnkernels.backward(dout, cache)[0]
    dx_part = bnkernels.backward(np.ascontiguousarray(dout[5:9]), cache_part)[0]
    assert np.array_equal(dx[5:9], dx_part)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_test_mode_without_running_stats_uses_zeros(dtype):
    x, gamma, beta, _ = make_inputs((6, 3), 1, dtype, seed=22)
    out, _ = bnkernels.forward(x, gamma, beta, {"mode": "test"})
    want = gamma.astype(np.float64) * x.astype(np.float64) / np.sqrt(1e-5) + beta.astype(np.float64)
    assert_close(out, want, dtype, what="out")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=DT_IDS)
def test_train_then_test_round_trip(dtype):
    """After many train steps on one batch, test mode approaches train mode on it."""
    x, gamma, beta, _ = make_inputs((64, 5), 1, dtype, seed=23)
    bn_param = {"mode": "train", "momentum": 0.5}
    for _ in range(60):
        out_train, _ = bnkernels.forward(x, gamma, beta, bn_param)
    bn_param["mode"] = "test"
    out_test, _ = bnkernels.forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(out_test, out_train, rtol=1e-4, atol=1e-4)


def test_numpy_integer_axis():
    x, gamma, beta, dout = make_inputs((3, 4, 5, 6), -1, np.float64, seed=24)
    out_a, cache_a = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=np.int64(-1))
    out_b, cache_b = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=3)
    assert np.array_equal(out_a, out_b)
    for a, b in zip(bnkernels.backward(dout, cache_a), bnkernels.backward(dout, cache_b)):
        assert np.array_equal(a, b)
