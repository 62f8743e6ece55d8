"""Resident memory stays flat over thousands of calls, successful and failing.

Every call gets fresh input arrays of >= 64 KiB, so a leaked reference to an
input, a leaked output or a leaked scratch buffer in the kernels costs at least
64 KiB a call: 5000 calls would add > 300 MiB, against a bound of a few MiB.
(RSS is meaningless under AddressSanitizer, whose quarantine holds freed memory:
the sanitizer run leaves this file out.)
"""

import ctypes
import functools
import gc
import os
import sys

import numpy as np
import pytest

import bnkernels

CALLS = 5000
WARMUP = 300
BOUND = 8 * 2**20  # bytes of RSS growth allowed over CALLS calls
HEAP_BOUND = 2**20  # bytes of malloc'd memory growth allowed: 200 bytes a call would exceed it
ARRAY_BYTES = 64 * 2**10


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)  # glibc >= 2.33
if _mallinfo2 is not None:
    _mallinfo2.restype = _Mallinfo2


def heap_in_use():
    """Bytes malloc has handed out and not had back (glibc), or None elsewhere.

    Exact where RSS is coarse: it sees a few hundred bytes of kernel scratch lost per call."""
    if _mallinfo2 is None:
        return None
    info = _mallinfo2()
    return info.uordblks + info.hblkhd


def assert_flat(step):
    for i in range(WARMUP):
        step(i)
    gc.collect()
    before, heap_before = rss(), heap_in_use()
    for i in range(CALLS):
        step(i)
    gc.collect()
    grown = rss() - before
    assert grown < BOUND, "RSS grew by %.1f MiB over %d calls" % (grown / 2**20, CALLS)
    if heap_before is not None:
        heap_grown = heap_in_use() - heap_before
        assert heap_grown < HEAP_BOUND, "malloc'd memory grew by %d bytes over %d calls" % (
            heap_grown,
            CALLS,
        )


# planar (N, C, L) float64 128 KiB; rows (R, C) float32 64 KiB with R past one row chunk
# (several chunks: the kernels' partial-sum scratch); channels-last float64 64 KiB; rows with
# 4096 channels float64 64 KiB (the per-channel scratch alone is 96 KiB)
SHAPES = [
    ((4, 8, 512), np.float64, 1),
    ((4100, 4), np.float32, 1),
    ((2, 8, 8, 64), np.float64, -1),
    ((2, 4096), np.float64, 1),
]


@functools.cache
def pool(shape, dtype):
    rng = np.random.default_rng(len(shape))
    return [rng.standard_normal(shape).astype(dtype) for _ in range(4)]


def fresh(shape, dtype, i):
    # a new array each call (copy of a pooled one), so a held reference keeps its 64+ KiB alive
    a = pool(shape, dtype)[i % 4].copy()
    assert a.nbytes >= ARRAY_BYTES
    return a


@pytest.mark.parametrize(
    "shape, dtype, axis", SHAPES, ids=["planar", "rows", "channels_last", "wide"]
)
def test_forward_backward_calls_do_not_leak(shape, dtype, axis):
    C = shape[axis]
    gamma, beta = np.ones(C, dtype), np.zeros(C, dtype)

    def step(i):
        x, dy = fresh(shape, dtype, i), fresh(shape, dtype, i + 1)
        param = {"mode": "train" if i % 3 else "test", "eps_mode": ("var", "std")[i % 2]}
        out, cache = bnkernels.forward(x, gamma, beta, param, axis=axis)
        dx, dgamma, dbeta = bnkernels.backward(dy, cache, num_threads=(None, 1, 2)[i % 3])
        del out, cache, dx, dgamma, dbeta
        # nothing kept a reference: only the local name and getrefcount's argument
        assert sys.getrefcount(x) == 2 and sys.getrefcount(dy) == 2

    assert_flat(step)


def test_seed_style_backward_does_not_leak():
    shape, D = (256, 64), 64

    def step(i):
        cache = {"x_hat": fresh(shape, np.float64, i), "gamma": np.ones(D), "denom": np.ones(D)}
        bnkernels.backward(fresh(shape, np.float64, i + 1), cache)

    assert_flat(step)


def _failing_calls(shape, dtype):
    """(exception, call(x, dy)) pairs: every validation branch that sees full-size arrays."""
    C = shape[1]
    g, b = np.ones(C, dtype), np.zeros(C, dtype)
    ok = lambda x: bnkernels.forward(x, g, b, {"mode": "train"})[1]
    return [
        (TypeError, lambda x, dy: bnkernels.forward(x.astype(np.int32), g, b, {"mode": "train"})),
        (TypeError, lambda x, dy: bnkernels.forward(x, g.astype(bool), b, {"mode": "train"})),
        (ValueError, lambda x, dy: bnkernels.forward(x, g[:-1], b, {"mode": "train"})),
        (ValueError, lambda x, dy: bnkernels.forward(x, g, b, {"mode": "eval"})),
        (ValueError, lambda x, dy: bnkernels.forward(x, g, b, {"mode": "train"}, axis=0)),
        (ValueError, lambda x, dy: bnkernels.backward(dy[:-1], ok(x))),
        (TypeError, lambda x, dy: bnkernels.backward(dy.astype(np.float32), ok(x))),
        (TypeError, lambda x, dy: bnkernels.backward(dy.astype(np.int64), ok(x))),
        (ValueError, lambda x, dy: bnkernels.backward(dy, ok(x), num_threads=0)),
        (ValueError, lambda x, dy: bnkernels.backward(dy, {"x": x, "invstd": np.ones(C)})),
        (
            ValueError,
            lambda x, dy: bnkernels.backward(
                dy, {"x_hat": x.reshape(2, -1, 4), "gamma": g, "denom": g}
            ),
        ),
    ]


def test_failing_calls_do_not_leak():
    shape, dtype = (128, 64), np.float64
    calls = _failing_calls(shape, dtype)

    def step(i):
        exc, call = calls[i % len(calls)]
        x, dy = fresh(shape, dtype, i), fresh(shape, dtype, i + 1)
        with pytest.raises(exc):
            call(x, dy)
        # the traceback is gone: nothing but x itself and getrefcount's argument
        assert sys.getrefcount(x) == 2

    assert_flat(step)


def _fails(step):
    try:
        assert_flat(step)
    except AssertionError as e:
        return str(e)
    return None


def test_a_leaked_array_would_be_seen():
    kept = []
    msg = _fails(lambda i: kept.append(np.ones(ARRAY_BYTES // 8)))
    kept.clear()
    assert msg is not None and "RSS grew" in msg


@pytest.mark.skipif(_mallinfo2 is None, reason="mallinfo2 is glibc's")
def test_a_leaked_scratch_buffer_would_be_seen():
    # what a kernel that forgot free() on a 256-byte per-channel buffer would do
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    kept = []
    msg = _fails(lambda i: kept.append(libc.malloc(256)))
    for p in kept:
        libc.free(p)
    assert msg is not None and "malloc'd memory grew" in msg
