"""Many Python threads at once: bitwise the serial results, and the GIL is released.

The GIL tests raise the interpreter's switch interval so that a thread holding
the GIL keeps it until it blocks or releases it.  Then "another thread ran
Python code during the call" is a yes/no fact, not a timing: if the kernels
held the GIL, the counting thread could not advance at all during a call, and
two calls on two threads could never overlap.
"""

import contextlib
import os
import sys
import threading
import time

import numpy as np
import pytest

import bnkernels

N_THREADS = 8
# scales the repetitions of the stress tests (the sanitizer build's quick run lowers it)
STRESS = float(os.environ.get("BNKERNELS_STRESS", "1"))
ROUNDS = 6
JOIN_TIMEOUT = 120.0  # only bounds a hang; nothing asserts on time


# ---------------------------------------------------------------------------
# workloads: one per thread, covering both layouts, both dtypes and the copy path
# ---------------------------------------------------------------------------


def _arrays(seed, shape, dtype, axis):
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return x, dy, gamma, beta


def _workloads():
    work = []
    # (shape, dtype, axis, view, bn_param extras, num_threads)
    specs = [
        ((4096, 48), np.float32, 1, None, {}, None),  # rows, several row chunks
        ((8, 16, 32, 32), np.float64, 1, None, {"eps_mode": "std"}, 2),  # planar
        ((8, 16, 16, 24), np.float32, -1, None, {}, 1),  # channels-last rows
        ((6, 12, 20, 40), np.float64, 1, "step", {}, 3),  # stepped view: copied
        ((6, 20, 20, 12), np.float32, 1, "nhwc", {}, None),  # NHWC memory seen as NCHW
        ((300, 70), np.float64, 1, "fortran", {}, 2),  # (N, C) in Fortran order: planar
        ((4, 10, 30, 30), np.float32, 1, "flip", {"mode": "test"}, 1),  # negative strides
        ((3000, 20), np.float64, 1, None, {"momentum": 0.5}, None),
    ]
    for seed, (shape, dtype, axis, view, extra, nt) in enumerate(specs):
        x, dy, gamma, beta = _arrays(seed, shape, dtype, axis)
        if view == "step":
            x = np.repeat(x, 2, axis=3)[..., ::2]
        elif view == "nhwc":
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        elif view == "fortran":
            x, dy = np.asfortranarray(x), np.asfortranarray(dy)
        elif view == "flip":
            x, dy = x[::-1, :, ::-1], dy[:, ::-1]
        C = shape[axis]
        param = {
            "mode": "train",
            **extra,
            "running_mean": np.linspace(-1, 1, C).astype(dtype),
            "running_var": np.linspace(0.5, 2, C).astype(dtype),
        }
        work.append((x, dy, gamma, beta, axis, param, nt))
    return work


def _run(x, dy, gamma, beta, axis, param, nt):
    param = dict(param)  # forward stores running stats back: one dict per call
    out, cache = bnkernels.forward(x, gamma, beta, param, axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dy, cache, num_threads=nt)
    return [
        out,
        param["running_mean"],
        param["running_var"],
        cache["mean"],
        cache["var"],
        cache["invstd"],
        dx,
        dgamma,
        dbeta,
    ]


def _in_threads(target, n):
    """Run target(i) on n threads released together; re-raise the first failure."""
    barrier = threading.Barrier(n)
    errors = []

    def body(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # reported from the main thread below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    if errors:
        raise errors[0]


def _assert_bitwise(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert np.array_equal(g, w), "result %d differs from the serial run" % i


def test_threads_on_different_inputs_get_serial_results():
    work = _workloads()
    serial = [_run(*w) for w in work]

    def target(i):
        for r in range(ROUNDS):
            j = (i + r) % len(work)  # every thread meets several workloads
            _assert_bitwise(_run(*work[j]), serial[j])

    _in_threads(target, N_THREADS)


@pytest.mark.parametrize("which", [0, 1, 5])
def test_threads_on_shared_inputs_get_serial_results(which):
    x, dy, gamma, beta, axis, param, _ = _workloads()[which]
    snapshot = [a.copy() for a in (x, dy, gamma, beta, param["running_mean"], param["running_var"])]
    out, cache = bnkernels.forward(x, gamma, beta, dict(param), axis=axis)
    want_fwd = [out, cache["mean"], cache["var"], cache["invstd"]]
    want_bwd = list(bnkernels.backward(dy, cache, num_threads=1))
    thread_counts = [None, 1, 2, 3]

    def target(i):
        for r in range(ROUNDS):
            # the same cache dict and the same arrays, from every thread
            got = bnkernels.backward(dy, cache, num_threads=thread_counts[(i + r) % 4])
            _assert_bitwise(got, want_bwd)
            o, c = bnkernels.forward(x, gamma, beta, dict(param), axis=axis)
            _assert_bitwise([o, c["mean"], c["var"], c["invstd"]], want_fwd)

    _in_threads(target, N_THREADS)
    # inputs, shared running stats and the shared cache are read, never written
    for a, b in zip((x, dy, gamma, beta, param["running_mean"], param["running_var"]), snapshot):
        assert np.array_equal(a, b)
    assert cache["x"] is x


# ---------------------------------------------------------------------------
# OpenMP threads inside one call: every call gives the serial result
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def omp_threads(n):
    """OpenMP's default team size for calls from this thread (forward has no num_threads)."""
    import ctypes

    lib = ctypes.CDLL("libgomp.so.1")  # the runtime the extension loaded
    old = lib.omp_get_max_threads()
    lib.omp_set_num_threads(n)
    try:
        yield
    finally:
        lib.omp_set_num_threads(old)


# (shape, axis, dtype, calls): several tasks per call, fused and split rows and planes.  Many
# calls of small ones give threads many task boundaries to cross at the same moment.
TEAM_CASES = {
    "rows_blocks_f32": ((64, 1024), 1, np.float32, 1500),
    "rows_blocks_f64": ((256, 256), 1, np.float64, 1500),
    "planar_f64": ((2, 16, 1024), 1, np.float64, 1500),
    "channels_last_f32": ((4, 8, 8, 512), -1, np.float32, 500),
    "rows_chunked_f64": ((20000, 67), 1, np.float64, 30),
    "planar_chunked_f32": ((5, 2, 700000), 1, np.float32, 20),
}


@pytest.mark.skipif(not bnkernels.openmp_enabled(), reason="serial build: no team of threads")
@pytest.mark.parametrize("case", list(TEAM_CASES))
def test_every_call_of_a_team_gives_the_serial_result(case):
    shape, axis, dtype, calls = TEAM_CASES[case]
    calls = max(10, int(calls * STRESS))
    x, dy, gamma, beta = _arrays(3, shape, dtype, axis)
    param = {"mode": "train"}
    with omp_threads(1):
        want_out, cache = bnkernels.forward(x, gamma, beta, dict(param), axis=axis)
    want = [want_out, cache["mean"], cache["var"], cache["invstd"]]
    want_bwd = bnkernels.backward(dy, cache, num_threads=1)
    bad_fwd = bad_bwd = 0
    for _ in range(calls):
        # two threads: the most task boundaries crossed at the same moment (more threads than
        # cores mostly wait in the runtime's barrier)
        nt = 2
        with omp_threads(nt):
            out, c = bnkernels.forward(x, gamma, beta, dict(param), axis=axis)
        bad_fwd += not all(
            np.array_equal(a, b) for a, b in zip([out, c["mean"], c["var"], c["invstd"]], want)
        )
        got = bnkernels.backward(dy, cache, num_threads=nt)
        bad_bwd += not all(np.array_equal(a, b) for a, b in zip(got, want_bwd))
    assert (bad_fwd, bad_bwd) == (0, 0), (
        "%d of %d forward and %d of %d backward calls differ from the 1-thread result"
        % (bad_fwd, calls, bad_bwd, calls)
    )


# ---------------------------------------------------------------------------
# the GIL
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def sticky_gil():
    """A thread keeps the GIL until it blocks or releases it (no forced switches)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        time.sleep(0.02)  # let waiting threads re-enter the GIL wait with the new interval
        yield
    finally:
        sys.setswitchinterval(old)


class Counter(threading.Thread):
    """Counts in pure Python, sleeping briefly now and then so the GIL can be handed back."""

    def __init__(self):
        super().__init__(daemon=True)
        self.count = 0
        self.stop = False

    def run(self):
        while not self.stop:
            for _ in range(100):
                self.count += 1
            time.sleep(1e-5)


@contextlib.contextmanager
def counting():
    c = Counter()
    c.start()
    while c.count == 0:
        time.sleep(1e-3)
    try:
        with sticky_gil():
            yield c
    finally:
        c.stop = True
        c.join(JOIN_TIMEOUT)


def progress_during(counter, call, attempts):
    """Counter steps made while ``call`` ran, summed over attempts (stops at the first progress)."""
    total = 0
    for _ in range(attempts):
        c0 = counter.count
        call()
        total += counter.count - c0
        if total:
            break
    return total


def _big(layout, dtype=np.float64):
    rng = np.random.default_rng(7)
    if layout == "rows":
        shape, axis = (65536, 64), 1
    else:
        shape, axis = (32, 64, 32, 32), 1
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    gamma, beta = np.ones(C, dtype), np.zeros(C, dtype)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    return x, dy, gamma, beta, axis, cache


def test_harness_sees_a_call_that_holds_the_gil():
    # the method must be able to fail: a C loop that keeps the GIL shows no progress
    with counting() as c:
        assert progress_during(c, lambda: sum(range(2_000_000)), attempts=3) == 0


@pytest.mark.parametrize("layout", ["rows", "planar"])
@pytest.mark.parametrize("which", ["forward", "backward"])
def test_python_thread_runs_during_a_kernel_call(which, layout):
    x, dy, gamma, beta, axis, cache = _big(layout)
    if which == "forward":
        call = lambda: bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    else:
        call = lambda: bnkernels.backward(dy, cache, num_threads=1)
    call()  # warm: first-call allocations happen outside the measured calls
    with counting() as c:
        # with the GIL held through the call every attempt would count exactly 0
        assert progress_during(c, call, attempts=50) > 0


def test_two_single_threaded_backward_calls_overlap():
    x, dy, gamma, beta, axis, cache = _big("planar")
    spans = [[], []]
    barrier = threading.Barrier(2)

    def worker(i):
        barrier.wait()
        for _ in range(8):
            t0 = time.perf_counter()
            bnkernels.backward(dy, cache, num_threads=1)
            spans[i].append((t0, time.perf_counter()))

    with sticky_gil():
        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert len(spans[0]) == len(spans[1]) == 8
    # a GIL-holding kernel would run one thread's 8 calls back to back: no interval could
    # start inside another thread's interval
    overlaps = sum(a0 < b1 and b0 < a1 for a0, a1 in spans[0] for b0, b1 in spans[1])
    assert overlaps > 0
