"""Results are bitwise identical for every thread count.

backward takes num_threads; forward follows the OpenMP default, limited here through
threadpoolctl (user_api="openmp").
"""

import numpy as np
import pytest

import bnkernels
from bnhelpers import make_inputs

THREADS = (1, 2, 3, 8)

# (shape, axis, dtype): big enough to run in parallel and to be split into chunks
CASES = [
    ((262144, 8), 1, np.float32),  # rows layout, many row chunks
    ((2, 3, 400, 400), 1, np.float32),  # planar, planes split into chunks
    ((2, 3, 400, 400), 1, np.float64),
    ((2, 2, 1024, 1024), 1, np.float32),  # planes longer than any one task
    ((64, 1000), 1, np.float64),  # rows, many channel blocks
    ((2048, 600), 1, np.float64),  # chunked float64 rows swept in wide blocks (512 + 88)
    ((1024, 2048), 1, np.float32),  # 8 MiB of rows, several blocks: output faulted in first
    ((8, 40, 40, 96), -1, np.float32),  # channels-last, chunked rows
    ((601, 200), 1, np.float32),  # one task of all the data, split in two chunks (301 + 300)
    ((500, 384), 1, np.float32),  # forward: blocks 256 + 128 would be uneven, so two chunks
]
IDS = ["%s-axis%d-%s" % ("x".join(map(str, s)), a, np.dtype(d).name) for s, a, d in CASES]


def _forward_with_threads(omp_threads, n, x, gamma, beta, bn_param, axis):
    with omp_threads(n):
        assert bnkernels.max_threads() == n, "the OpenMP thread limit did not take effect"
        p = dict(bn_param)
        out, cache = bnkernels.forward(x, gamma, beta, p, axis=axis)
    return out, cache, p


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("shape,axis,dtype", CASES, ids=IDS)
def test_forward_bitwise_identical_across_threads(omp_threads, shape, axis, dtype, eps_mode):
    x, gamma, beta, _ = make_inputs(shape, axis, dtype, seed=1, offset=50.0)
    bn_param = {"mode": "train", "eps_mode": eps_mode}
    results = [
        _forward_with_threads(omp_threads, n, x, gamma, beta, bn_param, axis) for n in THREADS
    ]
    out1, cache1, p1 = results[0]
    for n, (out, cache, p) in zip(THREADS[1:], results[1:]):
        assert np.array_equal(out, out1), "forward out differs with %d threads" % n
        for key in ("mean", "var", "invstd"):
            assert np.array_equal(cache[key], cache1[key]), "cache %s differs with %d threads" % (
                key,
                n,
            )
        for key in ("running_mean", "running_var"):
            assert np.array_equal(p[key], p1[key]), "%s differs with %d threads" % (key, n)


@pytest.mark.parametrize("shape,axis,dtype", CASES, ids=IDS)
def test_forward_test_mode_bitwise_identical_across_threads(omp_threads, shape, axis, dtype):
    x, gamma, beta, _ = make_inputs(shape, axis, dtype, seed=2)
    C = shape[axis]
    bn_param = {
        "mode": "test",
        "running_mean": np.linspace(-1, 1, C).astype(dtype),
        "running_var": np.linspace(0.5, 2, C).astype(dtype),
    }
    outs = [
        _forward_with_threads(omp_threads, n, x, gamma, beta, bn_param, axis)[0] for n in THREADS
    ]
    for n, out in zip(THREADS[1:], outs[1:]):
        assert np.array_equal(out, outs[0]), "test-mode out differs with %d threads" % n


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("shape,axis,dtype", CASES, ids=IDS)
def test_backward_bitwise_identical_across_num_threads(shape, axis, dtype, mode):
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=3, offset=20.0)
    C = shape[axis]
    bn_param = {"mode": mode, "running_mean": np.zeros(C, dtype), "running_var": np.ones(C, dtype)}
    _, cache = bnkernels.forward(x, gamma, beta, bn_param, axis=axis)
    first = bnkernels.backward(dout, cache, num_threads=THREADS[0])
    for n in THREADS[1:]:
        got = bnkernels.backward(dout, cache, num_threads=n)
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, first):
            assert np.array_equal(a, b), "%s differs between 1 and %d threads" % (name, n)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backward_default_threads_follow_openmp_limit_bitwise(omp_threads, dtype):
    """num_threads=None under different OpenMP limits equals num_threads=1."""
    x, gamma, beta, dout = make_inputs((3, 2, 400, 400), 1, dtype, seed=4)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    want = bnkernels.backward(dout, cache, num_threads=1)
    for n in THREADS:
        with omp_threads(n):
            got = bnkernels.backward(dout, cache)
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, want):
            assert np.array_equal(a, b), "%s differs under an OpenMP limit of %d" % (name, n)


def test_backward_seed_style_cache_bitwise_identical_across_num_threads():
    x, gamma, _, dout = make_inputs((262144, 8), 1, np.float32, seed=5)
    mu = x.mean(axis=0)
    denom = np.sqrt(x.var(axis=0) + 1e-5)
    cache = {"x_hat": (x - mu) / denom, "gamma": gamma, "denom": denom}
    first = bnkernels.backward(dout, cache, num_threads=1)
    for n in THREADS[1:]:
        got = bnkernels.backward(dout, cache, num_threads=n)
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, first):
            assert np.array_equal(a, b), "%s differs between 1 and %d threads" % (name, n)


def test_backward_mixed_layouts_bitwise_identical_across_num_threads():
    """x channels-last, dout planar: the copy path is thread-invariant too."""
    x_nhwc, gamma, beta, _ = make_inputs((4, 200, 200, 6), -1, np.float32, seed=6)
    x = x_nhwc.transpose(0, 3, 1, 2)
    dout = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=1)
    first = bnkernels.backward(dout, cache, num_threads=1)
    for n in THREADS[1:]:
        got = bnkernels.backward(dout, cache, num_threads=n)
        for name, a, b in zip(("dx", "dgamma", "dbeta"), got, first):
            assert np.array_equal(a, b), "%s differs between 1 and %d threads" % (name, n)
