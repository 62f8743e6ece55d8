"""Conventions of PyTorch and of hand-written CS231n layers.

- gamma=None, beta=None: no affine transform (PyTorch's affine=False), with the gradients
  the parameters would have;
- bn_param['momentum'] = None: the cumulative average of the batches seen, counted in
  bn_param['num_batches_tracked'] (counted in train mode whatever the momentum);
- a seed-style cache {'x_hat', 'gamma', 'denom'} of any ndim, with an optional 'axis'.
"""

import numpy as np
import pytest

import bnkernels
from bnhelpers import as_layout, assert_close, make_inputs, numerical_gradient, rel_error
from bnkernels import reference
from dist_helpers import make_batch, run_threads

ALL_DTYPES = [np.float16, np.float32, np.float64]
ALL_IDS = ["float16", "float32", "float64"]
ROUNDED = {np.dtype(np.float16): 5e-3, np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def loss(out, dout):
    return float(np.sum(out * dout))


# ---------------------------------------------------------------------------
# no affine
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["both", "gamma", "beta"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
def test_none_is_ones_and_zeros(dtype, which):
    x, gamma, beta, dout = make_inputs((6, 4, 3, 5), 1, dtype, seed=1)
    ones, zeros = np.ones(4, dtype), np.zeros(4, dtype)
    g_none = None if which in ("both", "gamma") else gamma
    b_none = None if which in ("both", "beta") else beta
    g_full = ones if g_none is None else gamma
    b_full = zeros if b_none is None else beta
    p_none, p_full = {"mode": "train"}, {"mode": "train"}
    out, cache = bnkernels.forward(x, g_none, b_none, p_none)
    want_out, want_cache = bnkernels.forward(x, g_full, b_full, p_full)
    assert out.dtype == dtype and out.tobytes() == want_out.tobytes()
    assert p_none["running_var"].tobytes() == p_full["running_var"].tobytes()
    got = bnkernels.backward(dout, cache)
    want = bnkernels.backward(dout, want_cache)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), got, want):
        assert g.dtype == dtype, name
        assert g.tobytes() == w.tobytes(), name


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
def test_no_affine_numerical_gradients(mode, eps_mode):
    """dx of the normalization alone, and dgamma, dbeta: the gradients at gamma = 1, beta = 0."""
    x, _, _, dout = make_inputs((3, 2, 3, 2), 1, np.float64, seed=2)
    running = {"running_mean": np.array([0.3, -0.2]), "running_var": np.array([1.5, 0.7])}

    def fwd(x, gamma=None, beta=None):
        p = dict(running, mode=mode, eps_mode=eps_mode)
        return bnkernels.forward(x, gamma, beta, p)

    out, cache = fwd(x)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == np.float64
    g, b = np.ones(2), np.zeros(2)
    num_dx = numerical_gradient(lambda: loss(fwd(x)[0], dout), x)
    num_dg = numerical_gradient(lambda: loss(fwd(x, gamma=g)[0], dout), g)
    num_db = numerical_gradient(lambda: loss(fwd(x, beta=b)[0], dout), b)
    assert rel_error(dx, num_dx) < 1e-7
    assert rel_error(dgamma, num_dg) < 1e-7
    assert rel_error(dbeta, num_db) < 1e-7
    # and the reference agrees, gamma and beta None there too
    ref_out, ref_cache = reference.forward(
        x, None, None, dict(running, mode=mode, eps_mode=eps_mode)
    )
    assert_close(out, ref_out, rtol=1e-12, what="out")
    for fn in (reference.backward_alt, reference.backward_graph):
        for name, g_, w in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), fn(dout, ref_cache)):
            assert_close(g_, w, rtol=1e-12, what="%s vs %s" % (name, fn.__name__))


def test_no_affine_gradients_take_a_given_parameters_dtype():
    x, _, beta, dout = make_inputs((8, 3), 1, np.float32, seed=3)
    _, cache = bnkernels.forward(x, None, beta.astype(np.float64), {"mode": "train"})
    assert cache["gamma"].dtype == np.float64 and np.all(cache["gamma"] == 1)
    _, dgamma, dbeta = bnkernels.backward(dout, cache)
    assert dgamma.dtype == dbeta.dtype == np.float64


def test_forward_cache_with_gamma_none():
    """A forward cache whose 'gamma' is None (edited by hand) means gamma = 1."""
    x, _, _, dout = make_inputs((9, 4), 1, np.float64, seed=4)
    _, cache = bnkernels.forward(x, None, None, {"mode": "train"})
    want = bnkernels.backward(dout, cache)
    got = bnkernels.backward(dout, dict(cache, gamma=None))
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()


# ---------------------------------------------------------------------------
# momentum None: the cumulative average
# ---------------------------------------------------------------------------


def batches(dtype, n=4, shape=(12, 3, 4), seed=5):
    rng = np.random.default_rng(seed)
    offsets = rng.uniform(-2, 2, (n, 1, shape[1], 1))
    return [(rng.standard_normal(shape) * (1 + i) + offsets[i]).astype(dtype) for i in range(n)]


def batch_stats64(x, axis=1):
    red = tuple(i for i in range(x.ndim) if i != axis)
    x = x.astype(np.float64)
    return x.mean(axis=red), x.var(axis=red)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
def test_cumulative_average_is_the_mean_of_the_batch_statistics(dtype):
    xs = batches(dtype)
    gamma, beta = np.ones(3, dtype), np.zeros(3, dtype)
    bn_param = {"mode": "train", "momentum": None}
    for k, x in enumerate(xs, 1):
        bnkernels.forward(x, gamma, beta, bn_param)
        assert bn_param["num_batches_tracked"] == k
        stats = [batch_stats64(b) for b in xs[:k]]
        want_mean = np.mean([s[0] for s in stats], axis=0)
        want_var = np.mean([s[1] for s in stats], axis=0)
        assert bn_param["running_mean"].dtype == dtype
        rtol = ROUNDED[np.dtype(dtype)]
        assert_close(bn_param["running_mean"], want_mean, rtol=rtol, what="mean %d" % k)
        assert_close(bn_param["running_var"], want_var, rtol=rtol, what="var %d" % k)


def test_cumulative_average_continues_from_the_count():
    """PyTorch's rule: running + (stat - running) / n, n the count after this batch."""
    x = batches(np.float64, n=1)[0]
    running_mean, running_var = np.array([1.0, -1.0, 0.5]), np.array([2.0, 0.5, 1.0])
    bn_param = {
        "mode": "train",
        "momentum": None,
        "num_batches_tracked": np.int64(4),
        "running_mean": running_mean,
        "running_var": running_var,
    }
    bnkernels.forward(x, None, None, bn_param)
    mean, var = batch_stats64(x)
    assert bn_param["num_batches_tracked"] == 5 and type(bn_param["num_batches_tracked"]) is int
    assert_close(bn_param["running_mean"], running_mean + (mean - running_mean) / 5, rtol=1e-14)
    assert_close(bn_param["running_var"], running_var + (var - running_var) / 5, rtol=1e-14)
    assert np.all(running_mean == [1.0, -1.0, 0.5])  # the old vectors are not modified


def test_first_batch_of_the_cumulative_average_is_the_batch():
    x = batches(np.float64, n=1)[0]
    bn_param = {"mode": "train", "momentum": None}
    _, cache = bnkernels.forward(x, None, None, bn_param)
    assert bn_param["running_mean"].tobytes() == cache["mean"].tobytes()
    assert bn_param["running_var"].tobytes() == cache["var"].tobytes()


@pytest.mark.parametrize("momentum", [0.9, None])
def test_train_mode_counts_batches_whatever_the_momentum(momentum):
    xs = batches(np.float32, n=3)
    bn_param = {"mode": "train", "momentum": momentum}
    for x in xs:
        bnkernels.forward(x, None, None, bn_param)
    assert bn_param["num_batches_tracked"] == 3
    bn_param["mode"] = "test"
    before = dict(bn_param)
    bnkernels.forward(xs[0], None, None, bn_param)
    assert bn_param == before


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
def test_cumulative_average_matches_the_reference(dtype):
    xs = batches(dtype, n=3)
    gamma, beta = np.ones(3, dtype), np.zeros(3, dtype)
    p_face = {"mode": "train", "momentum": None}
    p_ref = {"mode": "train", "momentum": None}
    for x in xs:
        bnkernels.forward(x, gamma, beta, p_face)
        reference.forward(x.astype(np.float64), gamma, beta, p_ref)
    assert p_face["num_batches_tracked"] == p_ref["num_batches_tracked"] == 3
    rtol = max(ROUNDED[np.dtype(dtype)], 1e-5 if dtype == np.float16 else 0)
    for key in ("running_mean", "running_var"):
        assert_close(p_face[key], p_ref[key], rtol=rtol, what=key)


def test_cumulative_average_across_ranks():
    """forward(..., comm=) and forward(..., stats=) update and count as one process does."""
    steps = [make_batch("nchw", [3, 4], np.float64, seed=s) for s in (1, 2)]
    _, _, gamma, beta, axis, slices = steps[0]

    def rank_fn(comm, rank):
        lo, hi = slices[rank]
        p = {"mode": "train", "momentum": None}
        for x, *_ in steps:
            bnkernels.forward(x[lo:hi], gamma, beta, p, axis=axis, comm=comm)
        return p

    whole = {"mode": "train", "momentum": None}
    split = {"mode": "train", "momentum": None}
    for x, *_ in steps:
        bnkernels.forward(x, gamma, beta, whole, axis=axis)
        stats = bnkernels.batch_stats(x, axis=axis)
        bnkernels.forward(x[:2], gamma, beta, split, axis=axis, stats=stats)
    for p in run_threads(2, rank_fn) + [split]:
        assert p["num_batches_tracked"] == 2
        for key in ("running_mean", "running_var"):
            assert_close(p[key], whole[key], rtol=1e-12, what=key)


# ---------------------------------------------------------------------------
# seed-style caches of any ndim
# ---------------------------------------------------------------------------


def seed_forward(x, gamma, beta, axis=1, eps=1e-5):
    """A hand-written train-mode forward (CS231n's spatial batch norm without the reshape)
    and the seed-style cache it builds."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    mu = x.mean(axis=red, keepdims=True)
    var = x.var(axis=red, keepdims=True)
    denom = np.sqrt(var + eps)
    x_hat = (x - mu) / denom
    out = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    cache = {"x_hat": x_hat, "gamma": gamma, "denom": denom.reshape(-1)}
    if axis != 1:
        cache["axis"] = axis
    return out, cache


@pytest.mark.parametrize(
    "shape,axis", [((3, 2, 3, 2), 1), ((2, 3, 2, 3), -1), ((4, 3, 5), 1), ((2, 2, 3, 2, 2), 1)]
)
def test_seed_cache_of_any_ndim_numerical_gradients(shape, axis):
    x, gamma, beta, dout = make_inputs(shape, axis, np.float64, seed=6)
    _, cache = seed_forward(x, gamma, beta, axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    num_dx = numerical_gradient(lambda: loss(seed_forward(x, gamma, beta, axis)[0], dout), x)
    num_dg = numerical_gradient(lambda: loss(seed_forward(x, gamma, beta, axis)[0], dout), gamma)
    num_db = numerical_gradient(lambda: loss(seed_forward(x, gamma, beta, axis)[0], dout), beta)
    assert rel_error(dx, num_dx) < 1e-7
    assert rel_error(dgamma, num_dg) < 1e-7
    assert rel_error(dbeta, num_db) < 1e-7
    for fn in (reference.backward_alt, reference.backward_graph):
        for name, g, w in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), fn(dout, cache)):
            assert_close(g, w, rtol=1e-12, what="%s vs %s" % (name, fn.__name__))
            w_num = {"dx": num_dx, "dgamma": num_dg, "dbeta": num_db}[name]
            assert rel_error(w, w_num) < 1e-7, (name, fn.__name__)


@pytest.mark.parametrize("layout", ["c", "fortran", "channels_last", "sliced_batch"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=ALL_IDS)
def test_seed_cache_nchw_equals_forward_cache(dtype, layout):
    """An NCHW seed-style cache gives what bnkernels.forward's cache gives, in any layout."""
    x, gamma, beta, dout = make_inputs((8, 5, 6, 7), 1, np.float64, seed=7)
    _, seed = seed_forward(x, gamma, beta)
    seed = {
        "x_hat": as_layout(seed["x_hat"].astype(dtype), layout),
        "gamma": gamma.astype(dtype),
        "denom": seed["denom"].astype(dtype),
    }
    dout = as_layout(dout.astype(dtype), layout)
    dx, dgamma, dbeta = bnkernels.backward(dout, seed)
    assert dx.dtype == dgamma.dtype == dbeta.dtype == dtype
    _, cache = reference.forward(x, gamma, beta, {"mode": "train"})
    want = reference.backward_alt(dout.astype(np.float64), cache)
    rtol = ROUNDED[np.dtype(dtype)] * (10 if dtype == np.float32 else 1)
    for name, g, w in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), want):
        assert_close(g, w, rtol=max(rtol, 1e-10), what=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seed_cache_split_phase(dtype):
    """backward_reduce and backward_apply take a 4-D seed-style cache too."""
    x, gamma, beta, dout = make_inputs((6, 3, 4, 5), -1, np.float64, seed=8)
    _, seed = seed_forward(x, gamma, beta, axis=-1)
    seed = {k: np.asarray(v, dtype) if k != "axis" else v for k, v in seed.items()}
    dout = dout.astype(dtype)
    want = bnkernels.backward(dout, seed)
    s1, s2 = bnkernels.backward_reduce(dout, seed)
    got = bnkernels.backward_apply(dout, seed, s1, s2, 6 * 3 * 4)
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()


def test_seed_cache_with_gamma_none():
    x, gamma, beta, dout = make_inputs((5, 3, 2, 2), 1, np.float64, seed=9)
    _, seed = seed_forward(x, np.ones(3), np.zeros(3))
    want = bnkernels.backward(dout, seed)
    got = bnkernels.backward(dout, dict(seed, gamma=None))
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()
    got16 = bnkernels.backward(
        dout.astype(np.float16), {k: np.asarray(v, np.float16) for k, v in seed.items()}
    )
    assert all(g.dtype == np.float16 for g in got16)


def test_tuple_cache_message_builds_a_working_cache():
    """The dict the TypeError shows, built from a hand-written forward, works."""
    x, gamma, beta, dout = make_inputs((6, 4, 3, 3), 1, np.float64, seed=10)
    eps = 1e-5
    mu, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    x_hat = (x - mu[:, None, None]) / np.sqrt(var + eps)[:, None, None]
    with pytest.raises(TypeError) as err:
        bnkernels.backward(dout, (x, x_hat, gamma, mu, var))
    shown = str(err.value).split("instead: ")[1]
    cache = eval(shown, {"np": np}, {"x_hat": x_hat, "gamma": gamma, "var": var, "eps": eps})
    _, want_cache = bnkernels.forward(x, gamma, beta, {"mode": "train", "eps": eps})
    for g, w in zip(bnkernels.backward(dout, cache), bnkernels.backward(dout, want_cache)):
        assert_close(g, w, rtol=1e-10)
