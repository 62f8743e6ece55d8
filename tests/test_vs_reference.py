"""The compiled kernels against bnkernels.reference over shapes, dtypes, modes and layouts.

float32 kernel results are compared with the reference run on float64 copies of the same
inputs; float64 with the reference in float64.
"""

import numpy as np
import pytest

import bnkernels
from bnkernels import reference
from bnhelpers import (
    LAYOUTS,
    as_layout,
    assert_close,
    make_inputs,
    reference64,
    seed_forward,
    stride_order,
)

DTYPES = [np.float32, np.float64]

# (shape, axis): tiny to medium, odd sizes, C = 1, large C, M = 1, partial channel
# blocks, row and plane counts big enough to be split into several chunks
SHAPES = [
    ((2, 3), 1),
    ((1, 5), 1),  # M = 1
    ((1, 3000), 1),  # M = 1, large C
    ((9, 1), 1),  # C = 1
    ((5, 3000), 1),  # large C
    ((33, 17), 1),
    ((300, 70), 1),  # more channels than one block, a partial block
    ((20000, 3), 1),  # many rows: chunked rows layout
    ((64, 1000), 1),
    ((7, 1030), 1),  # rows a page apart: output rows in pairs, a last one, a column tail
    ((50, 120), 1),  # sums in register blocks of 64, 32, 16 and 8 columns
    ((600, 1030), 1),  # chunked rows: wide sums, two rows a sweep, an odd chunk's last row
    ((4, 3, 5), 1),
    ((7, 1, 13), 1),  # C = 1, planar
    ((1, 3, 1), 1),  # M = 1, 3D
    ((3, 5, 7, 9), 1),
    ((8, 16, 14, 14), 1),
    ((1, 4, 1, 1), 1),  # M = 1, 4D
    ((1, 6, 5, 4), 1),  # N = 1, M > 1
    ((3, 2, 300, 300), 1),  # long planes: chunked planar layout
    ((2, 3, 4, 5, 6), 1),
    ((4, 6, 7, 5), -1),  # channels-last NHWC
    ((2, 3, 4, 5, 70), -1),  # channels-last 5D with a partial block
    ((5, 4, 6, 3), 2),  # a middle channel axis
]


def _ids(shapes):
    return ["%s-axis%d" % ("x".join(map(str, s)), a) for s, a in shapes]


def _compare(x, gamma, beta, dout, bn_param, axis, dtype):
    """Kernel forward + backward vs the float64 reference; returns the kernel results."""
    p_kernel = dict(bn_param)
    out, cache = bnkernels.forward(x, gamma, beta, p_kernel, axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    r_out, r_cache, p_ref, r_alt, r_graph = reference64(x, gamma, beta, bn_param, dout, axis)

    for name, a in (("out", out), ("dx", dx), ("dgamma", dgamma), ("dbeta", dbeta)):
        assert a.dtype == dtype, "%s has dtype %s, expected %s" % (name, a.dtype, np.dtype(dtype))
    assert out.shape == x.shape and dx.shape == x.shape
    C = x.shape[axis]
    assert dgamma.shape == (C,) and dbeta.shape == (C,)

    assert_close(out, r_out, dtype, what="out")
    assert_close(dx, r_alt[0], dtype, what="dx vs backward_alt")
    assert_close(dgamma, r_alt[1], dtype, what="dgamma vs backward_alt")
    assert_close(dbeta, r_alt[2], dtype, what="dbeta vs backward_alt")
    assert_close(dx, r_graph[0], dtype, what="dx vs backward_graph")
    assert_close(dgamma, r_graph[1], dtype, what="dgamma vs backward_graph")
    assert_close(dbeta, r_graph[2], dtype, what="dbeta vs backward_graph")
    assert_close(cache["mean"], r_cache["mean"], dtype, what="cache mean")
    assert_close(cache["var"], r_cache["var"], dtype, what="cache var")
    for key in ("running_mean", "running_var"):
        assert p_kernel[key].shape == (C,)
        assert_close(p_kernel[key], p_ref[key], dtype, what=key)
    return out, cache, dx, dgamma, dbeta


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", SHAPES, ids=_ids(SHAPES))
def test_train_matches_reference(shape, axis, dtype, eps_mode):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=len(shape) + shape[0])
    _compare(x, gamma, beta, dout, {"mode": "train", "eps_mode": eps_mode}, axis, dtype)


TEST_MODE_SHAPES = [
    ((6, 4), 1),
    ((1, 3000), 1),
    ((3, 5, 7, 9), 1),
    ((4, 6, 7, 5), -1),
    ((2, 3, 4, 5, 6), 1),
    ((2000, 40), 1),
    ((7, 1030), 1),
]


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", TEST_MODE_SHAPES, ids=_ids(TEST_MODE_SHAPES))
def test_test_mode_matches_reference(shape, axis, dtype, eps_mode):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=3)
    C = shape[axis]
    rng = np.random.default_rng(C)
    bn_param = {
        "mode": "test",
        "eps_mode": eps_mode,
        "eps": 1e-3,
        "running_mean": rng.standard_normal(C).astype(dtype),
        "running_var": rng.uniform(0.1, 3.0, C).astype(dtype),
    }
    before = {k: np.copy(bn_param[k]) for k in ("running_mean", "running_var")}
    _compare(x, gamma, beta, dout, bn_param, axis, dtype)
    for k, v in before.items():
        np.testing.assert_array_equal(bn_param[k], v)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_running_stats_with_momentum_and_existing_values(dtype):
    x, gamma, beta, dout = make_inputs((16, 5, 3, 3), 1, dtype, seed=8)
    rng = np.random.default_rng(1)
    bn_param = {
        "mode": "train",
        "momentum": 0.7,
        "eps": 1e-4,
        "running_mean": rng.standard_normal(5).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, 5).astype(dtype),
    }
    _compare(x, gamma, beta, dout, bn_param, 1, dtype)


# ---------------------------------------------------------------------------
# memory layouts
# ---------------------------------------------------------------------------

# (7, 1030): rows a page apart, whose output sweep pairs rows, with each array's own strides
LAYOUT_SHAPES = [
    ((3, 5, 6, 7), 1),
    ((37, 11), 1),
    ((4, 6, 20), 1),
    ((3, 4, 5, 6), -1),
    ((7, 1030), 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("dout_layout", LAYOUTS)
@pytest.mark.parametrize("x_layout", LAYOUTS)
@pytest.mark.parametrize("shape,axis", LAYOUT_SHAPES, ids=_ids(LAYOUT_SHAPES))
def test_layouts_match_reference(shape, axis, x_layout, dout_layout, dtype):
    x0, gamma, beta, dout0 = make_inputs(shape, axis, dtype, seed=21)
    x = as_layout(x0, x_layout, axis)
    dout = as_layout(dout0, dout_layout, axis)
    assert np.array_equal(x, x0) and np.array_equal(dout, dout0)
    out, _, dx, _, _ = _compare(x, gamma, beta, dout, {"mode": "train"}, axis, dtype)
    assert stride_order(out) == stride_order(x), (out.strides, x.strides)
    assert stride_order(dx) == stride_order(dout), (dx.strides, dout.strides)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_channels_last_array_and_its_nchw_view_agree(dtype):
    """x_nhwc with axis=-1 and x_nhwc.transpose(0, 3, 1, 2) with axis=1 are one computation."""
    x_nhwc, gamma, beta, dy_nhwc = make_inputs((4, 9, 10, 12), -1, dtype, seed=4)
    out_a, cache_a = bnkernels.forward(x_nhwc, gamma, beta, {"mode": "train"}, axis=-1)
    dx_a, dg_a, db_a = bnkernels.backward(dy_nhwc, cache_a)

    x_view = x_nhwc.transpose(0, 3, 1, 2)
    out_b, cache_b = bnkernels.forward(x_view, gamma, beta, {"mode": "train"}, axis=1)
    dx_b, dg_b, db_b = bnkernels.backward(dy_nhwc.transpose(0, 3, 1, 2), cache_b)

    assert np.array_equal(out_a.transpose(0, 3, 1, 2), out_b)
    assert np.array_equal(dx_a.transpose(0, 3, 1, 2), dx_b)
    assert np.array_equal(dg_a, dg_b) and np.array_equal(db_a, db_b)
    assert out_b.transpose(0, 2, 3, 1).flags.c_contiguous
    assert dx_b.transpose(0, 2, 3, 1).flags.c_contiguous

    # and the planar (NCHW-contiguous) computation agrees to rounding
    x_nchw = np.ascontiguousarray(x_view)
    out_c, cache_c = bnkernels.forward(x_nchw, gamma, beta, {"mode": "train"}, axis=1)
    dx_c, dg_c, db_c = bnkernels.backward(
        np.ascontiguousarray(dy_nhwc.transpose(0, 3, 1, 2)), cache_c
    )
    assert_close(out_c, out_b.astype(np.float64), dtype, what="out planar vs rows")
    assert_close(dx_c, dx_b.astype(np.float64), dtype, what="dx planar vs rows")
    assert_close(dg_c, dg_b.astype(np.float64), dtype, what="dgamma planar vs rows")
    assert_close(db_c, db_b.astype(np.float64), dtype, what="dbeta planar vs rows")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_large_strided_views(dtype):
    """Sliced and reversed views of arrays big enough for chunked, parallel work."""
    base, gamma, beta, dout = make_inputs((2, 4, 720, 720), 1, dtype, seed=2)
    for view in (base[::-1], base[:, :, ::-1], base[:, ::2], base[..., ::3]):
        n, C, h, w = view.shape
        _compare(view, gamma[:C], beta[:C], dout[:n, :C, :h, :w], {"mode": "train"}, 1, dtype)


# ---------------------------------------------------------------------------
# caches are interchangeable; the seed-style dict cache
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_caches_are_interchangeable(dtype, eps_mode, mode):
    x, gamma, beta, dout = make_inputs((5, 6, 4, 3), 1, dtype, seed=13)
    bn = {
        "mode": mode,
        "eps_mode": eps_mode,
        "running_mean": np.linspace(-1, 1, 6).astype(dtype),
        "running_var": np.linspace(0.5, 2, 6).astype(dtype),
    }
    out_k, cache_k = bnkernels.forward(x, gamma, beta, dict(bn))
    out_r, cache_r = reference.forward(x, gamma, beta, dict(bn))
    assert_close(out_k, out_r.astype(np.float64), dtype, what="out")
    from_kernel_cache = bnkernels.backward(dout, cache_k)
    from_ref_cache = bnkernels.backward(dout, cache_r)
    ref_on_kernel_cache = reference.backward_alt(dout, cache_k)
    graph_on_kernel_cache = reference.backward_graph(dout, cache_k)
    truth = reference64(x, gamma, beta, bn, dout)[3]
    for name, got in (
        ("bnkernels.backward(cache of bnkernels.forward)", from_kernel_cache),
        ("bnkernels.backward(cache of reference.forward)", from_ref_cache),
        ("reference.backward_alt(cache of bnkernels.forward)", ref_on_kernel_cache),
        ("reference.backward_graph(cache of bnkernels.forward)", graph_on_kernel_cache),
    ):
        for part, g, w in zip(("dx", "dgamma", "dbeta"), got, truth):
            assert g.dtype == dtype
            # the reference in float32 carries float32 statistics: a looser bound there
            assert_close(
                g, w, rtol=2e-3 if dtype == np.float32 else 1e-10, what="%s %s" % (name, part)
            )


SEED_SHAPES = [(2, 3), (1, 4), (17, 1), (64, 100), (5, 3000), (20000, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SEED_SHAPES, ids=["x".join(map(str, s)) for s in SEED_SHAPES])
def test_seed_style_cache_matches_reference(shape, dtype):
    x, gamma, beta, dout = make_inputs(shape, 1, dtype, seed=31)
    _, cache = seed_forward(x, gamma, beta)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert dx.dtype == dtype and dgamma.dtype == dtype and dbeta.dtype == dtype
    cache64 = {k: np.asarray(v, dtype=np.float64) for k, v in cache.items()}
    dy64 = dout.astype(np.float64)
    for fn in (reference.backward_alt, reference.backward_graph):
        want = fn(dy64, cache64)
        assert_close(dx, want[0], dtype, what="dx vs %s" % fn.__name__)
        assert_close(dgamma, want[1], dtype, what="dgamma vs %s" % fn.__name__)
        assert_close(dbeta, want[2], dtype, what="dbeta vs %s" % fn.__name__)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_seed_style_cache_equals_forward_cache_gradient(dtype):
    """The same batch through a seed-style cache and through bnkernels.forward's cache."""
    x, gamma, beta, dout = make_inputs((50, 7), 1, dtype, seed=5)
    minimal = {
        k: v
        for k, v in seed_forward(
            x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)
        )[1].items()
        if k in ("x_hat", "gamma", "denom")
    }
    minimal["x_hat"] = minimal["x_hat"].astype(dtype)
    got = bnkernels.backward(dout, minimal)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    want = bnkernels.backward(dout, cache)
    for part, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert_close(g, w.astype(np.float64), dtype, what=part)
