"""gamma, beta and the running statistics of any real dtype: which dtype comes out where.

The promotion rules, for x float16, float32 or float64 and parameters int64, float16,
float32 or float64:

- out and dx keep x's dtype;
- dgamma and dbeta have the parameters' floating dtype (x's for integer parameters);
- running statistics keep the floating dtype they have; missing or integer ones take the
  wider of x's and the parameters' dtypes.

Values are checked against bnkernels.reference run in float64 on the same values.
"""

import numpy as np
import pytest

import bnkernels
from bnhelpers import assert_close, make_inputs, reference64

X_DTYPES = [np.float16, np.float32, np.float64]
P_DTYPES = [np.int64, np.float16, np.float32, np.float64]
X_IDS = ["x16", "x32", "x64"]
P_IDS = ["p_int", "p16", "p32", "p64"]

# a result rounded to its dtype, relative to the largest magnitude
ROUNDED = {np.dtype(np.float16): 5e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
# float16 data runs the reference, whose forward statistics are float32
F16_STATS = 1e-5

SHAPES = [((7, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)]
SHAPE_IDS = ["2d", "nchw", "nhwc"]


def params(C, dtype, seed=4):
    """gamma, beta of a dtype: small integers, or floats of either sign."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        gamma = rng.integers(1, 4, C) * rng.choice([-1, 1], C)
        beta = rng.integers(-2, 3, C)
    else:
        gamma = rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C)
        beta = rng.standard_normal(C)
    return gamma.astype(dtype), beta.astype(dtype)


def param_dtype(x_dtype, p_dtype):
    """The dtype of dgamma and dbeta."""
    return np.dtype(x_dtype if np.dtype(p_dtype).kind == "i" else p_dtype)


def inputs(shape, axis, x_dtype, seed=3):
    x, _, _, dout = make_inputs(shape, axis, np.float64, seed=seed)
    return x.astype(x_dtype), dout.astype(x_dtype)


def grad_rtol(x_dtype, p):
    return max(ROUNDED[p], F16_STATS if x_dtype == np.float16 else 0.0)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("p_dtype", P_DTYPES, ids=P_IDS)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=X_IDS)
def test_promotion_table(x_dtype, p_dtype, shape, axis):
    x, dout = inputs(shape, axis, x_dtype)
    gamma, beta = params(shape[axis], p_dtype)
    p = param_dtype(x_dtype, p_dtype)
    stat = np.result_type(x_dtype, p)
    bn_param = {"mode": "train"}
    out, cache = bnkernels.forward(x, gamma, beta, bn_param, axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)

    assert out.dtype == x.dtype and dx.dtype == x.dtype
    assert dgamma.dtype == p and dbeta.dtype == p
    assert cache["gamma"].dtype == p
    assert bn_param["running_mean"].dtype == stat and bn_param["running_var"].dtype == stat
    assert bn_param["num_batches_tracked"] == 1

    want_out, _, want_param, want, _ = reference64(x, gamma, beta, {"mode": "train"}, dout, axis)
    assert_close(out, want_out, rtol=ROUNDED[x.dtype], what="out")
    assert_close(dx, want[0], rtol=ROUNDED[x.dtype], what="dx")
    assert_close(dgamma, want[1], rtol=grad_rtol(x_dtype, p), what="dgamma")
    assert_close(dbeta, want[2], rtol=grad_rtol(x_dtype, p), what="dbeta")
    for key in ("running_mean", "running_var"):
        rtol = grad_rtol(x_dtype, np.dtype(stat))
        assert_close(bn_param[key], want_param[key], rtol=rtol, what=key)


@pytest.mark.parametrize("p_dtype", P_DTYPES, ids=P_IDS)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=X_IDS)
def test_promotion_table_in_test_mode(x_dtype, p_dtype):
    shape, axis = (4, 3, 5, 6), 1
    x, dout = inputs(shape, axis, x_dtype, seed=5)
    gamma, beta = params(3, p_dtype, seed=6)
    running = {"running_mean": np.array([1, -2, 0]), "running_var": np.array([2, 1, 3])}
    bn_param = dict(running, mode="test", num_batches_tracked=7)
    out, cache = bnkernels.forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    p = param_dtype(x_dtype, p_dtype)
    assert out.dtype == x.dtype and dx.dtype == x.dtype
    assert dgamma.dtype == p and dbeta.dtype == p
    assert bn_param["num_batches_tracked"] == 7  # test mode counts nothing
    assert bn_param["running_mean"] is running["running_mean"]  # and replaces nothing

    want_out, _, _, want, _ = reference64(x, gamma, beta, dict(running, mode="test"), dout)
    assert_close(out, want_out, rtol=ROUNDED[x.dtype], what="out")
    assert_close(dx, want[0], rtol=ROUNDED[x.dtype], what="dx")
    assert_close(dgamma, want[1], rtol=grad_rtol(x_dtype, p), what="dgamma")
    assert_close(dbeta, want[2], rtol=grad_rtol(x_dtype, p), what="dbeta")


@pytest.mark.parametrize(
    "running_dtype", [None, np.int64, np.float16, np.float32, np.float64], ids=str
)
@pytest.mark.parametrize("p_dtype", [np.int32, np.float32, np.float64], ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=X_IDS)
def test_running_statistics_keep_a_floating_dtype(x_dtype, p_dtype, running_dtype):
    x, dout = inputs((20, 4), 1, x_dtype, seed=7)
    gamma, beta = params(4, p_dtype, seed=8)
    bn_param = {"mode": "train", "momentum": 0.5}
    if running_dtype is not None:
        bn_param["running_mean"] = np.array([1, 2, -3, 4]).astype(running_dtype)
        bn_param["running_var"] = np.array([3, 1, 2, 5]).astype(running_dtype)
    given = dict(bn_param)
    bnkernels.forward(x, gamma, beta, bn_param)
    if running_dtype is None or np.dtype(running_dtype).kind == "i":
        want_dtype = np.result_type(x_dtype, param_dtype(x_dtype, p_dtype))
    else:
        want_dtype = np.dtype(running_dtype)
    _, _, want_param, _, _ = reference64(x, gamma, beta, given, dout)
    for key in ("running_mean", "running_var"):
        assert bn_param[key].dtype == want_dtype, key
        rtol = grad_rtol(x_dtype, want_dtype)
        assert_close(bn_param[key], want_param[key], rtol=rtol, what=key)


@pytest.mark.parametrize("shape,axis", SHAPES, ids=SHAPE_IDS)
def test_float64_parameters_of_float32_data(shape, axis):
    """Mixed precision: float64 parameters holding float32 values give the same out and dx as
    float32 parameters, bit for bit, and dgamma, dbeta in float64, rounded once from the
    float64 sums (to float32 they are the float32 run's bits)."""
    x, dout = inputs(shape, axis, np.float32, seed=9)
    g32, b32 = params(shape[axis], np.float32, seed=10)
    g64, b64 = g32.astype(np.float64), b32.astype(np.float64)
    out32, cache32 = bnkernels.forward(x, g32, b32, {"mode": "train"}, axis=axis)
    out64, cache64 = bnkernels.forward(x, g64, b64, {"mode": "train"}, axis=axis)
    assert out64.dtype == np.float32 and out64.tobytes() == out32.tobytes()
    dx32, dg32, db32 = bnkernels.backward(dout, cache32)
    dx64, dg64, db64 = bnkernels.backward(dout, cache64)
    assert dx64.dtype == np.float32 and dx64.tobytes() == dx32.tobytes()
    assert dg64.dtype == db64.dtype == np.float64
    assert dg64.astype(np.float32).tobytes() == dg32.tobytes()
    assert db64.astype(np.float32).tobytes() == db32.tobytes()
    _, _, _, want, _ = reference64(x, g64, b64, {"mode": "train"}, dout, axis)
    assert_close(dg64, want[1], rtol=1e-12, what="dgamma")
    assert_close(db64, want[2], rtol=1e-12, what="dbeta")


def test_float32_parameters_of_float16_data():
    """PyTorch's mixed precision: float16 activations, float32 parameters and gradients."""
    x, dout = inputs((16, 6, 3, 3), 1, np.float16, seed=11)
    gamma, beta = params(6, np.float32, seed=12)
    bn_param = {"mode": "train"}
    out, cache = bnkernels.forward(x, gamma, beta, bn_param)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert (out.dtype, dx.dtype) == (np.float16, np.float16)
    assert (dgamma.dtype, dbeta.dtype) == (np.float32, np.float32)
    assert bn_param["running_var"].dtype == np.float32
    _, _, _, want, _ = reference64(x, gamma, beta, {"mode": "train"}, dout)
    assert_close(dgamma, want[1], rtol=F16_STATS, what="dgamma")
    assert_close(dbeta, want[2], rtol=F16_STATS, what="dbeta")


def test_longdouble_data_with_float64_parameters():
    x, dout = inputs((10, 3), 1, np.longdouble, seed=13)
    gamma, beta = params(3, np.float64, seed=14)
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert out.dtype == dx.dtype == np.longdouble
    assert dgamma.dtype == dbeta.dtype == np.float64
    _, _, _, want, _ = reference64(x, gamma, beta, {"mode": "train"}, dout)
    assert_close(dgamma, want[1], rtol=1e-12, what="dgamma")
    assert_close(dx, want[0], rtol=1e-12, what="dx")


def test_gamma_and_beta_of_different_floating_dtypes_promote():
    x, dout = inputs((12, 3), 1, np.float32, seed=15)
    gamma, beta = params(3, np.float16, seed=16)
    _, cache = bnkernels.forward(x, gamma, beta.astype(np.float64), {"mode": "train"})
    assert cache["gamma"].dtype == np.float64
    assert all(g.dtype == np.float64 for g in bnkernels.backward(dout, cache)[1:])
    # an integer gamma takes a floating beta's dtype
    _, cache = bnkernels.forward(x, np.array([1, 2, 3]), beta, {"mode": "train"})
    assert cache["gamma"].dtype == np.float16
    assert all(g.dtype == np.float16 for g in bnkernels.backward(dout, cache)[1:])


@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no_beta"])
@pytest.mark.parametrize("p_dtype", [np.float32, np.float64])
def test_byte_swapped_parameters_take_the_native_dtype(p_dtype, with_beta):
    """gamma (and beta) in the other byte order: the parameters' dtype is the native one
    (NumPy's promotion), and the results are those of native parameters."""
    x, dout = inputs((9, 4), 1, np.float64, seed=18)
    gamma, beta = params(4, p_dtype, seed=19)
    beta = beta if with_beta else None
    swapped = [p if p is None else p.astype(p.dtype.newbyteorder()) for p in (gamma, beta)]
    assert not swapped[0].dtype.isnative and np.array_equal(swapped[0], gamma)
    p1, p2 = {"mode": "train"}, {"mode": "train"}
    out, cache = bnkernels.forward(x, *swapped, p1)
    want_out, want_cache = bnkernels.forward(x, gamma, beta, p2)
    assert cache["gamma"].dtype == np.dtype(p_dtype) and cache["gamma"].dtype.isnative
    assert p1["running_mean"].dtype.isnative
    assert np.array_equal(out, want_out)
    for got, want in zip(bnkernels.backward(dout, cache), bnkernels.backward(dout, want_cache)):
        assert got.dtype == want.dtype and got.dtype.isnative
        assert np.array_equal(got, want)


def test_running_statistics_of_data_with_dtype_metadata_drop_it_as_numpy_promotion_does():
    dm = np.dtype(np.float64, metadata={"unit": "m"})
    x = np.arange(8.0).reshape(4, 2).astype(dm)
    param = {"mode": "train", "momentum": None}
    bnkernels.forward(x, None, None, param)
    for key in ("running_mean", "running_var"):
        assert param[key].dtype == np.float64 and param[key].dtype.metadata is None, key


def test_integer_parameters_as_a_list():
    """What NumPy code writes without thinking of dtypes: gamma = [3, 4, 5]."""
    x, dout = inputs((8, 3), 1, np.float32, seed=17)
    out, cache = bnkernels.forward(x, [3, 4, 5], [0, 1, 2], {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert out.dtype == dx.dtype == dgamma.dtype == dbeta.dtype == np.float32
    want_out, _, _, want, _ = reference64(
        x, np.array([3.0, 4, 5]), np.array([0.0, 1, 2]), {"mode": "train"}, dout
    )
    assert_close(out, want_out, rtol=1e-5, what="out")
    assert_close(dgamma, want[1], rtol=1e-5, what="dgamma")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_phase_gradients_in_the_parameters_dtype(dtype):
    """backward_apply and the per-slice path give dgamma, dbeta in the parameters' dtype."""
    x, dout = inputs((10, 4, 3), 1, dtype, seed=18)
    gamma, beta = params(4, np.float64 if dtype == np.float32 else np.float32, seed=19)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    want = bnkernels.backward(dout, cache)
    s1, s2 = bnkernels.backward_reduce(dout, cache)
    got = bnkernels.backward_apply(dout, cache, s1, s2, 30)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()
    assert got[1].dtype == gamma.dtype
