"""threadpoolctl limits the kernels' OpenMP threads.

The kernels read omp_get_max_threads() at every call, so a limit set through the OpenMP
runtime they are linked against reaches them.  These tests check that threadpoolctl finds
that very runtime (the system libgomp for a local build, the vendored copy in a repaired
wheel), that a limit shows in bnkernels.max_threads(), and that it leaves results unchanged.
"""

import ctypes
import ctypes.util
import os

import numpy as np
import pytest

import bnkernels
from bnkernels import _kernels

threadpoolctl = pytest.importorskip("threadpoolctl")

pytestmark = pytest.mark.skipif(
    not bnkernels.openmp_enabled(), reason="serial build: no OpenMP runtime to limit"
)


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _dladdr():
    # in libc since glibc 2.34, in libdl before
    for name in (None, ctypes.util.find_library("dl")):
        try:
            fn = ctypes.CDLL(name).dladdr
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        fn.restype = ctypes.c_int
        return fn
    pytest.skip("dladdr is not available")


def kernels_openmp_library():
    """Path of the library that gives the compiled module its omp_get_max_threads.

    dlsym on the module's own handle searches the module and then its dependencies, so
    this is the runtime the kernels call, wherever it was loaded from.
    """
    module = ctypes.CDLL(_kernels.__file__)
    address = ctypes.cast(module.omp_get_max_threads, ctypes.c_void_p).value
    info = _DlInfo()
    assert _dladdr()(address, ctypes.byref(info)), "dladdr found no library for the symbol"
    return os.path.realpath(info.dli_fname.decode())


def test_threadpool_info_lists_the_kernels_openmp_runtime():
    lib = kernels_openmp_library()
    openmp = [i for i in threadpoolctl.threadpool_info() if i["internal_api"] == "openmp"]
    listed = {os.path.realpath(i["filepath"]): i for i in openmp}
    assert lib in listed, "threadpoolctl lists %s, not the kernels' %s" % (sorted(listed), lib)
    assert listed[lib]["prefix"] in ("libgomp", "libomp", "libiomp")
    assert listed[lib]["num_threads"] == bnkernels.max_threads()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_limit_sets_max_threads_and_is_undone(n):
    before = bnkernels.max_threads()
    with threadpoolctl.threadpool_limits(n, user_api="openmp"):
        assert bnkernels.max_threads() == n
        assert _kernels.max_threads() == n
    assert bnkernels.max_threads() == before


# (shape, axis, dtype): large enough for many tasks, so an unlimited call runs in parallel
CASES = [
    ((32, 16, 56, 56), 1, np.float32),  # planar
    ((16, 8, 8, 256), -1, np.float32),  # channels-last rows
    ((4096, 96), 1, np.float64),  # (N, C) rows
    ((8, 64, 9, 9), 1, np.float64),  # small NCHW planes
]
IDS = ["x".join(map(str, s)) + "-axis%d-%s" % (a, np.dtype(d).name) for s, a, d in CASES]


def _run(x, gamma, beta, dout, axis):
    p = {"mode": "train", "running_mean": np.zeros_like(gamma), "running_var": np.ones_like(gamma)}
    out, cache = bnkernels.forward(x, gamma, beta, p, axis=axis)
    stats = (cache["mean"], cache["var"], p["running_mean"], p["running_var"])
    return (out, *stats, *bnkernels.backward(dout, cache))


@pytest.mark.parametrize("shape,axis,dtype", CASES, ids=IDS)
def test_results_bitwise_equal_inside_and_outside_the_limit(shape, axis, dtype):
    rng = np.random.default_rng(11)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 5).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    gamma = rng.standard_normal(C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    outside = _run(x, gamma, beta, dout, axis)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert bnkernels.max_threads() == 1
        inside = _run(x, gamma, beta, dout, axis)
    # more threads than this machine may have cores: still the same bits
    with threadpoolctl.threadpool_limits(4, user_api="openmp"):
        wide = _run(x, gamma, beta, dout, axis)
    names = ("out", "mean", "var", "running_mean", "running_var", "dx", "dgamma", "dbeta")
    for name, a, b, c in zip(names, outside, inside, wide):
        assert a.dtype == b.dtype and np.array_equal(a, b), "%s differs under a limit of 1" % name
        assert np.array_equal(a, c), "%s differs under a limit of 4" % name
