"""python -m bnkernels            version, OpenMP, self-check against the reference, timings
python -m bnkernels bench ...  the benchmark (see ``python -m bnkernels bench --help``)"""

import sys
import time

import numpy as np

import bnkernels
from bnkernels import _kernels, reference

# (shape, axis, dtype): small enough to check in a second, across the layouts
SELF_CHECK = [
    ((64, 100), 1, np.float64),
    ((32, 16, 14, 14), 1, np.float32),
    ((16, 14, 14, 24), -1, np.float32),
    ((8, 32, 28, 28), 1, np.float64),
]
TIMED = [((256, 512), 1, np.float32), ((32, 64, 56, 56), 1, np.float32)]
RTOL = {np.float32: 1e-4, np.float64: 1e-10}


def _median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _check(shape, axis, dtype, rng):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.standard_normal(C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"}, axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dy, cache)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    ref_out, ref_cache = reference.forward(x64, gamma.astype(np.float64), beta.astype(np.float64),
                                           {"mode": "train"}, axis=axis)
    ref = (ref_out,) + reference.backward_alt(dy64, ref_cache)
    worst = 0.0
    for got, want in zip((out, dx, dgamma, dbeta), ref):
        scale = np.max(np.abs(want)) or 1.0
        worst = max(worst, float(np.max(np.abs(got - want)) / scale))
    return worst, worst <= RTOL[dtype]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from bnkernels import _bench
        return _bench.main(argv[1:])
    if argv:
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    print("bnkernels %s  numpy %s" % (bnkernels.__version__, np.__version__))
    print("OpenMP: %s, %d threads by default" % (
        "on" if _kernels.openmp_enabled() else "off (serial build)", _kernels.max_threads()))
    print("build flags: %s" % _kernels.build_flags())
    rng = np.random.default_rng(0)
    ok = True
    print("self-check against bnkernels.reference (max relative error):")
    for shape, axis, dtype in SELF_CHECK:
        err, good = _check(shape, axis, dtype, rng)
        ok &= good
        print("  %-20s axis=%-2d %-8s %.1e  %s" % (shape, axis, np.dtype(dtype).name, err,
                                                   "ok" if good else "FAILED"))
    print("backward timings (median, ms):")
    for shape, axis, dtype in TIMED:
        x = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[axis]
        _, cache = bnkernels.forward(x, np.ones(C, dtype), np.zeros(C, dtype), {"mode": "train"},
                                     axis=axis)
        _, ref_cache = reference.forward(x, np.ones(C, dtype), np.zeros(C, dtype), {"mode": "train"},
                                         axis=axis)
        t_graph = _median_time(lambda: reference.backward_graph(dy, ref_cache), 5)
        t_alt = _median_time(lambda: reference.backward_alt(dy, ref_cache), 5)
        t_bk = _median_time(lambda: bnkernels.backward(dy, cache), 20)
        print("  %-20s %-8s graph %8.3f  alt %8.3f  bnkernels %7.3f   (%.0fx over alt)" % (
            shape, np.dtype(dtype).name, t_graph * 1e3, t_alt * 1e3, t_bk * 1e3, t_alt / t_bk))
    if not ok:
        print("SELF-CHECK FAILED: the compiled kernels disagree with the reference", file=sys.stderr)
        return 1
    print("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
