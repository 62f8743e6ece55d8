"""Batch norm over a batch split across processes: the split-phase functions, and the
synchronized forward/backward with ranks run as threads (tests/test_mpi.py runs the same
checks under mpiexec)."""

import numpy as np
import pytest

import bnkernels
from dist_helpers import (
    EPS,
    RankErrors,
    check_ranks,
    make_batch,
    run_threads,
    step_on_rank,
)

LAYOUTS = ["nchw", "nhwc", "2d"]
DTYPES = [np.float32, np.float64]


# ---------------------------------------------------------------------------
# split-phase functions in one process
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES + [np.float16])
def test_batch_stats_match_forward(layout, dtype):
    x, _, gamma, beta, axis, _ = make_batch(layout, [9], dtype)
    count, mean, m2 = bnkernels.batch_stats(x, axis=axis)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    assert count == x.size // x.shape[axis]
    assert mean.dtype == m2.dtype == np.float64
    if dtype == np.float16:  # the NumPy fallback
        np.testing.assert_allclose(mean, cache["mean"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m2 / count, cache["var"], rtol=1e-5)
    else:  # the forward's own pass: the same bits
        assert mean.tobytes() == cache["mean"].tobytes()
        var = m2 / count
        assert var.tobytes() == cache["var"].tobytes()


def test_batch_stats_of_an_empty_slice():
    count, mean, m2 = bnkernels.batch_stats(np.empty((0, 3, 4, 4)))
    assert count == 0
    assert mean.shape == m2.shape == (3,) and not mean.any() and not m2.any()


def test_merge_stats_is_the_whole_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 5)) * 3 + 7
    parts = [x[:3], x[3:3], x[3:11], x[11:]]  # one empty part
    stats = [bnkernels.batch_stats(p) for p in parts]
    count, mean, m2 = bnkernels.merge_stats(
        [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats]
    )
    assert count == 20
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(m2, ((x - x.mean(axis=0)) ** 2).sum(axis=0), rtol=1e-12)
    # parts with count 0 are neutral, wherever they stand
    again = bnkernels.merge_stats(
        [0, stats[0][0], 0, stats[2][0], stats[3][0]],
        [np.full(5, np.nan), stats[0][1], np.zeros(5), stats[2][1], stats[3][1]],
        [np.full(5, np.nan), stats[0][2], np.zeros(5), stats[2][2], stats[3][2]],
    )
    assert again[0] == count
    assert again[1].tobytes() == mean.tobytes() and again[2].tobytes() == m2.tobytes()


def test_merge_stats_of_nothing():
    count, mean, m2 = bnkernels.merge_stats(np.array([0, 0]), np.zeros((2, 3)), np.zeros((2, 3)))
    assert count == 0 and mean.shape == (3,)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (([1.5], [[0.0]], [[0.0]]), TypeError, "count must be a 1-d array of ints"),
        (([-1], [[0.0]], [[0.0]]), ValueError, "count must be >= 0"),
        (([1, 2], [[0.0]], [[0.0]]), ValueError, "shape \\(P, C\\) with P = 2"),
    ],
)
def test_merge_stats_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        bnkernels.merge_stats(*args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("params", ["data", "float64", "float16"])
def test_reduce_then_apply_is_backward_bit_for_bit(layout, dtype, mode, params):
    """Also with parameters of another dtype: the fused backward stores dgamma and dbeta in
    it, the split passes too."""
    x, dout, gamma, beta, axis, _ = make_batch(layout, [11], dtype)
    if params != "data":
        gamma, beta = gamma.astype(params), beta.astype(params)
    param = {
        "mode": mode,
        "running_mean": np.zeros(x.shape[axis]),
        "running_var": np.ones(x.shape[axis]),
    }
    _, cache = bnkernels.forward(x, gamma, beta, param, axis=axis)
    want = bnkernels.backward(dout, cache)
    s1, s2 = bnkernels.backward_reduce(dout, cache)
    assert s1.dtype == s2.dtype == np.float64
    got = bnkernels.backward_apply(dout, cache, s1, s2, x.size // x.shape[axis])
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


def test_reduce_then_apply_with_a_seed_style_cache():
    x, dout, gamma, beta, axis, _ = make_batch("2d", [13], np.float64)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train", "eps": EPS})
    seed = {
        "x_hat": (x - cache["mean"]) * cache["invstd"],
        "gamma": gamma,
        "denom": 1 / cache["invstd"],
    }
    want = bnkernels.backward(dout, seed)
    s1, s2 = bnkernels.backward_reduce(dout, seed)
    got = bnkernels.backward_apply(dout, seed, s1, s2, x.shape[0])
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()


def test_forward_with_given_stats_is_forward_bit_for_bit():
    x, _, gamma, beta, axis, _ = make_batch("nchw", [8], np.float32)
    p1, p2 = {"mode": "train"}, {"mode": "train"}
    want, wcache = bnkernels.forward(x, gamma, beta, p1, axis=axis)
    stats = bnkernels.batch_stats(x, axis=axis)
    got, gcache = bnkernels.forward(x, gamma, beta, p2, axis=axis, stats=stats)
    assert got.tobytes() == want.tobytes()
    for key in ("mean", "var", "invstd"):
        assert gcache[key].tobytes() == wcache[key].tobytes()
    for key in ("running_mean", "running_var"):
        assert p1[key].tobytes() == p2[key].tobytes()


def test_split_phase_on_an_empty_slice():
    x, dout, gamma, beta, axis, _ = make_batch("nchw", [6], np.float64)
    stats = bnkernels.batch_stats(x, axis=axis)
    empty = x[:0]
    out, cache = bnkernels.forward(empty, gamma, beta, {"mode": "train"}, stats=stats)
    assert out.shape == empty.shape
    s1, s2 = bnkernels.backward_reduce(dout[:0], cache)
    assert not s1.any() and not s2.any()
    _, full = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    t1, t2 = bnkernels.backward_reduce(dout, full)
    dx, dgamma, dbeta = bnkernels.backward_apply(dout[:0], cache, t1, t2, stats[0])
    _, wg, wb = bnkernels.backward(dout, full)
    assert dx.shape == empty.shape
    assert dgamma.tobytes() == wg.tobytes() and dbeta.tobytes() == wb.tobytes()


def test_single_process_calls_still_refuse_empty_input():
    with pytest.raises(ValueError, match="empty"):
        bnkernels.forward(np.empty((0, 3)), np.ones(3), np.zeros(3), {"mode": "train"})


def test_backward_of_a_cache_with_a_larger_batch_needs_the_split_phase():
    x, dout, gamma, beta, axis, _ = make_batch("2d", [10], np.float64)
    stats = bnkernels.batch_stats(x)
    _, cache = bnkernels.forward(x[:4], gamma, beta, {"mode": "train"}, stats=stats)
    with pytest.raises(ValueError, match="backward_reduce"):
        bnkernels.backward(dout[:4], cache)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"stats": (3, np.zeros(7))}, ValueError, "stats must be"),
        ({"stats": (0, np.zeros(7), np.zeros(7))}, ValueError, "count"),
        ({"stats": (5, np.zeros(6), np.zeros(7))}, ValueError, "stats"),
        ({"comm": object()}, TypeError, "comm must be an MPI communicator"),
        ({"stats": {"count": 5}}, TypeError, "stats must be a tuple"),
        ({"stats": (4, np.zeros(7), np.zeros(7))}, ValueError, "at least this slice's 5"),
        ({"stats": (5, np.zeros(7, bool), np.zeros(7))}, TypeError, "stats' mean must be"),
        ({"stats": (5, np.zeros(7), np.zeros(7)), "mode": "test"}, ValueError, "train mode"),
    ],
)
def test_forward_split_phase_errors(kwargs, exc, match):
    x, _, gamma, beta, axis, _ = make_batch("2d", [5], np.float64)
    param = {"mode": kwargs.pop("mode", "train")}
    with pytest.raises(exc, match=match):
        bnkernels.forward(x, gamma, beta, param, **kwargs)


def test_backward_apply_errors():
    x, dout, gamma, beta, axis, _ = make_batch("2d", [5], np.float64)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    s1, s2 = bnkernels.backward_reduce(dout, cache)
    with pytest.raises(ValueError, match="count"):
        bnkernels.backward_apply(dout, cache, s1, s2, 2)
    with pytest.raises(TypeError, match="count must be an int"):
        bnkernels.backward_apply(dout, cache, s1, s2, 5.0)
    with pytest.raises(ValueError, match="sum_dy"):
        bnkernels.backward_apply(dout, cache, s1[:3], s2, 5)


# ---------------------------------------------------------------------------
# synchronized, ranks as threads
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", [[4, 4], [1, 6, 2], [5, 0, 3]])
@pytest.mark.parametrize("mode", ["train", "test"])
def test_synchronized_matches_the_whole_batch(layout, dtype, sizes, mode):
    x, dout, gamma, beta, axis, slices = make_batch(layout, sizes, dtype, seed=len(sizes))
    results = run_threads(
        len(sizes),
        lambda comm, rank: step_on_rank(comm, rank, x, dout, gamma, beta, axis, slices, mode),
    )
    assert check_ranks(results, x, dout, gamma, beta, axis, slices, mode) == []


def test_one_rank_is_bit_for_bit_the_local_call():
    x, dout, gamma, beta, axis, slices = make_batch("nchw", [7], np.float32)
    (got,) = run_threads(
        1, lambda comm, rank: step_on_rank(comm, rank, x, dout, gamma, beta, axis, slices)
    )
    param = {"mode": "train", "eps": EPS, "momentum": 0.9}
    out, cache = bnkernels.forward(x, gamma, beta, param, axis=axis)
    want = (out, *bnkernels.backward(dout, cache), param["running_mean"], param["running_var"])
    for g, w in zip(got, want):
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


@pytest.mark.parametrize(
    "which, match",
    [
        ("channels", "disagree on the channels"),
        ("dtype", "disagree on the dtype"),
        ("eps", "disagree on the eps"),
        ("eps_mode", "disagree on the eps mode"),
        ("mode", "disagree on the mode"),
    ],
)
def test_ranks_that_disagree_all_get_an_error(which, match):
    def fn(comm, rank):
        x = np.random.default_rng(rank).standard_normal(
            (4, 6 if which != "channels" or rank == 0 else 5)
        )
        param = {"mode": "train", "eps": 1e-5, "eps_mode": "var"}
        if rank == 1:
            if which == "dtype":
                x = x.astype(np.float32)
            if which == "eps":
                param["eps"] = 1e-3
            if which == "eps_mode":
                param["eps_mode"] = "std"
            if which == "mode":
                param["mode"] = "test"
        C = x.shape[1]
        g, b = np.ones(C, x.dtype), np.zeros(C, x.dtype)
        out, cache = bnkernels.forward(x, g, b, param, comm=comm)
        return bnkernels.backward(np.ones_like(x), cache)

    with pytest.raises(RankErrors) as info:
        run_threads(2, fn)
    assert all(isinstance(e, ValueError) and match in str(e) for e in info.value.errors)


def test_an_empty_batch_on_every_rank_is_an_error():
    def fn(comm, rank):
        x = np.empty((0, 3))
        return bnkernels.forward(x, np.ones(3), np.zeros(3), {"mode": "train"}, comm=comm)

    with pytest.raises(RankErrors) as info:
        run_threads(2, fn)
    assert all("empty on every rank" in str(e) for e in info.value.errors)


def test_sums_and_statistics_only_on_the_l3_share_plan():
    # planar channels of 2 MiB each, 8 of them: with a 64 MiB L3 and one thread the plan
    # runs both sweeps of a block back to back, which passes without a write must not use
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, bnkernels as bk\n"
        "x = np.random.default_rng(0).standard_normal((2, 8, 1 << 17))\n"
        "dy = np.random.default_rng(1).standard_normal(x.shape)\n"
        "count, mean, m2 = bk.batch_stats(x, num_threads=1)\n"
        "xc = np.moveaxis(x, 1, 0).reshape(8, -1)\n"
        "assert count == xc.shape[1]\n"
        "assert np.allclose(mean, xc.mean(1), rtol=1e-12, atol=1e-15)\n"
        "assert np.allclose(m2, ((xc - xc.mean(1)[:, None]) ** 2).sum(1), rtol=1e-12)\n"
        "_, cache = bk.forward(x, np.ones(8), np.zeros(8), {'mode': 'train'})\n"
        "s1, s2 = bk.backward_reduce(dy, cache, num_threads=1)\n"
        "assert np.allclose(s1, np.moveaxis(dy, 1, 0).reshape(8, -1).sum(1), rtol=1e-12)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, BNKERNELS_L3_BYTES=str(64 << 20))
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_an_error_on_one_rank_stops_every_rank(where):
    # a check that fails on rank 1 before the collective: rank 0 must not wait for it
    def fn(comm, rank):
        x = np.random.default_rng(rank).standard_normal((4, 3))
        param = {"mode": "train", "eps": -1.0 if (rank == 1 and where == "forward") else 1e-5}
        out, cache = bnkernels.forward(x, np.ones(3), np.zeros(3), param, comm=comm)
        dout = np.ones((5, 3) if rank == 1 else (4, 3))
        return bnkernels.backward(dout, cache)

    with pytest.raises(RankErrors) as info:
        run_threads(2, fn)
    errors = info.value.errors
    assert all(isinstance(e, ValueError) for e in errors), errors
    assert "bn_param['eps']" in str(errors[1]) or "dout has shape" in str(errors[1])
    assert "failed on rank 1" in str(errors[0]), errors[0]
