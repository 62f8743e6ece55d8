"""Peak memory of a call: the output and a few per-channel vectors, nothing x-sized more.

NumPy reports its data allocations to tracemalloc, so the peak traced memory
during a call is what the call allocated at its worst moment.  (The kernels'
own scratch is plain malloc, invisible here; it is per-channel sized and
test_leaks.py checks it is freed.)
"""

import gc
import os
import tracemalloc

import numpy as np
import pytest

import bnkernels
from bnkernels._layout import choose


def peak_during(call):
    """(result, peak bytes traced during the call above what was live before it)."""
    call()  # warm: lazy imports and first-call caches are not the call's cost
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak - base


def slack(C):
    # ~a dozen (C,) float64 vectors (statistics, float64 gamma/beta/coefficients, running
    # stats) plus dicts and small objects; an extra x-sized array is thousands of times more
    return 16 * 8 * C + 16 * 2**10


CASES = {
    # name: (memory shape, axis, transpose to the logical shape, expected layout)
    "rows": ((8192, 128), 1, None, "rows"),
    "planar": ((16, 64, 32, 32), 1, None, "planar"),
    "small_planes": ((64, 32, 8, 8), 1, None, "rows"),  # NCHW, planes run as column groups
    "channels_last": ((16, 32, 32, 64), -1, None, "rows"),
    "channels_last_as_nchw": ((16, 32, 32, 64), 1, (0, 3, 1, 2), "rows"),
}


def _inputs(name, dtype):
    shape, axis, perm, layout = CASES[name]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if perm is not None:
        x, dy = x.transpose(perm), dy.transpose(perm)
    # the case must really run that kernel without copying its inputs
    lay = choose([x, dy, np.empty_like(dy)], axis % x.ndim)
    assert lay is not None and lay[0] == layout
    C = x.shape[axis]
    return x, dy, np.ones(C, dtype), np.zeros(C, dtype), axis, C


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("name", list(CASES))
def test_forward_allocates_out_and_a_lean_cache(name, mode, dtype):
    x, dy, gamma, beta, axis, C = _inputs(name, dtype)
    param = {"mode": mode, "running_mean": np.zeros(C, dtype), "running_var": np.ones(C, dtype)}
    (out, cache), peak = peak_during(
        lambda: bnkernels.forward(x, gamma, beta, dict(param), axis=axis)
    )
    assert peak >= out.nbytes  # the measurement sees NumPy's allocations
    assert peak <= out.nbytes + slack(C), "forward peak %d bytes, out is %d" % (peak, out.nbytes)
    # the cache keeps x itself and (C,) float64 statistics: nothing x-sized of its own
    assert cache["x"] is x
    for key in ("mean", "var", "invstd"):
        assert cache[key].shape == (C,) and cache[key].dtype == np.float64
    big = [k for k, v in cache.items() if isinstance(v, np.ndarray) and v.size > C and k != "x"]
    assert not big


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_allocates_dx_and_no_more(name, mode, dtype):
    x, dy, gamma, beta, axis, C = _inputs(name, dtype)
    _, cache = bnkernels.forward(x, gamma, beta, {"mode": mode}, axis=axis)
    (dx, dgamma, dbeta), peak = peak_during(lambda: bnkernels.backward(dy, cache))
    assert dx.strides == dy.strides  # dx in dout's layout, so no reordering copy either
    assert peak >= dx.nbytes
    assert peak <= dx.nbytes + slack(C), "backward peak %d bytes, dx is %d" % (peak, dx.nbytes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_seed_style_backward_allocates_dx_and_no_more(dtype):
    rng = np.random.default_rng(4)
    N, D = 8192, 128
    cache = {
        "x_hat": rng.standard_normal((N, D)).astype(dtype),
        "gamma": np.ones(D, dtype),
        "denom": np.ones(D, dtype),
    }
    dy = rng.standard_normal((N, D)).astype(dtype)
    (dx, _, _), peak = peak_during(lambda: bnkernels.backward(dy, cache))
    assert dx.nbytes <= peak <= dx.nbytes + slack(D)


WIDE = """
import json, os, sys
import numpy as np
import bnkernels

def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

C = int(sys.argv[1])
x = np.random.default_rng(0).standard_normal((2, C)).astype(np.float32)
dy = np.ones_like(x)
g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
bnkernels.backward(dy, bnkernels.forward(x, g, b, {"mode": "train"})[1])  # warm
param = {"mode": "train"}
reset_peak()
before = rss()[0]
out, cache = bnkernels.forward(x, g, b, param)
fwd = rss()[1] - before
reset_peak()
before = rss()[0]
grads = bnkernels.backward(dy, cache)
bwd = rss()[1] - before
print(json.dumps([fwd, bwd]))
"""


def _can_reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="RSS means nothing under AddressSanitizer (quarantine, shadow memory)",
)
def test_wide_input_scratch_is_bounded_by_the_work_in_flight():
    # 2 rows of 4 million channels: a task holds a block of channels, so the kernels' own
    # scratch is per task and per thread; what a call allocates is its outputs (and the
    # forward's per-channel vectors), not ~40 more bytes per channel
    import json
    import subprocess
    import sys

    C = 4_000_000
    proc = subprocess.run(
        [sys.executable, "-c", WIDE, str(C)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    fwd, bwd = json.loads(proc.stdout)
    f32, f64 = 4 * C, 8 * C
    slack = 8 << 20
    # backward: dx (2 rows) and dgamma, dbeta
    assert bwd <= 2 * f32 + 2 * f32 + slack, bwd / C
    # forward: out, the cache's mean, var, invstd, the new running statistics, and gamma
    # and beta as float64
    assert fwd <= 2 * f32 + 3 * f64 + 2 * f32 + 2 * f64 + slack, fwd / C
