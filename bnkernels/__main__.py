"""python -m bnkernels            version, OpenMP, self-check against the reference, timings
python -m bnkernels bench ...  the benchmark (see ``python -m bnkernels bench --help``)
mpiexec -n 2 python -m bnkernels --mpi
                               batch norm across processes: per-rank agreement with one
                               process, and the cost of the collectives"""

import importlib
import os
import platform
import sys
import time
from functools import partial

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


# the runtimes threadpoolctl knows as OpenMP, by file name
OPENMP_LIBS = ("libgomp", "libomp", "libiomp")
# the CPU features GCC's resolver wants before it picks the x86-64-v4 / -v3 clone
# (/proc/cpuinfo names; numpy's names in NUMPY_CPU_NAMES)
V4_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")
V3_FLAGS = ("avx2", "fma", "bmi2")
NUMPY_CPU_NAMES = {
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512vl": "AVX512VL",
    "avx512dq": "AVX512DQ",
    "avx512cd": "AVX512CD",
    "avx2": "AVX2",
    "fma": "FMA3",
    "bmi2": "BMI2",
}


def openmp_runtime():
    """The OpenMP runtime(s) loaded in this process: threadpoolctl's view, else /proc/self/maps."""
    if not _kernels.openmp_enabled():
        return "none (serial build)"
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        threadpool_info = None
    if threadpool_info is not None:
        libs = [i for i in threadpool_info() if i.get("internal_api") == "openmp"]
        if libs:
            return "; ".join(
                "%s %s at %s"
                % (i.get("prefix"), i.get("version") or "(version n/a)", i.get("filepath"))
                for i in libs
            )
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return "unknown (no threadpoolctl, no /proc/self/maps)"
    found = sorted(p for p in paths if os.path.basename(p).startswith(OPENMP_LIBS))
    if not found:
        return "unknown (none found in /proc/self/maps)"
    return "; ".join("%s at %s" % (os.path.basename(p).split(".so")[0], p) for p in found)


def cpu_flags():
    """The CPU features this module asks about, as a set of /proc/cpuinfo names, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        feats = importlib.import_module("numpy._core._multiarray_umath").__cpu_features__
    except (ImportError, AttributeError):
        return None
    found = {name for name, key in NUMPY_CPU_NAMES.items() if feats.get(key)}
    if "BMI2" not in feats and "avx2" in found:
        found.add("bmi2")  # older numpy lists no BMI2; every AVX2 CPU has it
    return found


def simd_clone(targets=None, flags=None, machine=None):
    """Which compiled variant of the inner loops this CPU runs."""
    targets = _kernels.simd_targets() if targets is None else targets
    machine = platform.machine() if machine is None else machine
    if "chosen at load" not in targets or machine.lower() not in ("x86_64", "amd64"):
        return "as compiled"
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return "unknown (no /proc/cpuinfo, no numpy CPU features)"
    if all(f in flags for f in V3_FLAGS + V4_FLAGS):
        return "x86-64-v4 (AVX-512)"
    if all(f in flags for f in V3_FLAGS):
        return "x86-64-v3 (AVX2)"
    return "x86-64 (baseline)"


def build_report():
    """Lines describing how the kernels were built and what they run on here."""
    return [
        "build flags: %s" % _kernels.build_flags(),
        "OpenMP runtime: %s" % openmp_runtime(),
        "SIMD: %s; this CPU runs %s; float16 conversions: %s code"
        % (_kernels.simd_targets(), simd_clone(), _kernels.float16_code()),
        "caches: %s; plans assume an L3 of %s (float64 outputs from %s written with"
        " streaming stores)"
        % (cache_report(), _kib(_kernels.L3_BYTES), _kib(_kernels.STREAM_OUTPUT_BYTES)),
    ]


def _kib(n):
    if not n:
        return "unknown size"
    return "%d MiB" % (n >> 20) if n % (1 << 20) == 0 else "%d KiB" % (n >> 10)


def cache_report():
    """L2 and L3 sizes one core sees, as detected."""
    l2, l3 = _kernels.cache_bytes()
    return "L2 %s, L3 %s" % (_kib(l2), _kib(l3))


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
    ref_out, ref_cache = reference.forward(
        x64, gamma.astype(np.float64), beta.astype(np.float64), {"mode": "train"}, axis=axis
    )
    ref = (ref_out,) + reference.backward_alt(dy64, ref_cache)
    worst = _rel_error(zip((out, dx, dgamma, dbeta), ref))
    return worst, worst <= RTOL[dtype]


def _rel_error(pairs):
    """The largest error of (got, want) pairs, each relative to want's largest magnitude;
    NaN if any is (a NaN output fails the check)."""
    worst = 0.0
    for got, want in pairs:
        scale = float(np.max(np.abs(want), initial=0.0)) or 1.0
        err = float(np.max(np.abs(got - want), initial=0.0)) / scale
        if not err <= worst and worst == worst:  # a NaN, once seen, stays
            worst = err
    return worst


# the per-rank slice of the MPI self-check's timed step
MPI_TIMED = ((32, 64, 28, 28), np.float32)


def mpi_check():
    """Under mpiexec: each rank normalizes a slice of one batch with comm=MPI.COMM_WORLD and
    checks it against one process on the whole batch; then the synchronized step is timed
    against the local one on the same slice (the collectives' cost)."""
    try:
        from mpi4py import MPI
    except ImportError:
        print("--mpi needs mpi4py: pip install 'bnkernels[mpi]'", file=sys.stderr)
        return 2
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    rng = np.random.default_rng(0)  # the same batch on every rank
    lines = []
    for shape, axis, dtype in SELF_CHECK:
        n = max(shape[0], size)
        full = (n,) + shape[1:]
        x = (rng.standard_normal(full) * 3 + 2).astype(dtype)
        dy = rng.standard_normal(full).astype(dtype)
        C = full[axis]
        g, b = np.ones(C, dtype), np.zeros(C, dtype)
        lo, hi = n * rank // size, n * (rank + 1) // size
        out, cache = bnkernels.forward(x[lo:hi], g, b, {"mode": "train"}, axis=axis, comm=comm)
        dx, dgamma, dbeta = bnkernels.backward(dy[lo:hi], cache)
        ref_out, ref_cache = bnkernels.forward(x, g, b, {"mode": "train"}, axis=axis)
        rdx, rdg, rdb = bnkernels.backward(dy, ref_cache)
        err = _rel_error(((out, ref_out[lo:hi]), (dx, rdx[lo:hi]), (dgamma, rdg), (dbeta, rdb)))
        same = comm.allgather(dgamma.tobytes() + dbeta.tobytes())
        ok = err <= RTOL[dtype] and all(s == same[0] for s in same)
        lines.append(
            "  %-20s %-8s rows %d:%d  %.1e  %s"
            % (full, np.dtype(dtype).name, lo, hi, err, "ok" if ok else "FAILED")
        )
    everyone = comm.allgather(lines)
    shape, dtype = MPI_TIMED
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    g, b = np.ones(shape[1], dtype), np.zeros(shape[1], dtype)

    def local_step():
        bnkernels.backward(dy, bnkernels.forward(x, g, b, {"mode": "train"})[1])

    def synced_step():
        bnkernels.backward(dy, bnkernels.forward(x, g, b, {"mode": "train"}, comm=comm)[1])

    times = {}
    for name, fn in (("local", local_step), ("synchronized", synced_step)) * 2:
        comm.Barrier()
        times[name] = _median_time(fn, 20)
    failed = any("FAILED" in line for rl in everyone for line in rl)
    if rank == 0:
        print(
            "bnkernels %s over MPI: %d ranks (%s)"
            % (bnkernels.__version__, size, MPI.Get_library_version().splitlines()[0])
        )
        print("synchronized forward + backward against one process on the whole batch:")
        for r, rl in enumerate(everyone):
            for line in rl:
                print("  rank %d%s" % (r, line))
        print(
            "all %d ranks agree with one process, and with each other: %s"
            % (size, "no" if failed else "yes")
        )
        print(
            "a training step on a %s %s slice per rank (median ms): local %.3f, synchronized"
            " %.3f, collectives %.3f"
            % (
                shape,
                np.dtype(dtype).name,
                times["local"] * 1e3,
                times["synchronized"] * 1e3,
                (times["synchronized"] - times["local"]) * 1e3,
            )
        )
    return 1 if failed else 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from bnkernels import _bench

        return _bench.main(argv[1:])
    if argv == ["--mpi"]:
        return mpi_check()
    if argv:
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    print("bnkernels %s  numpy %s" % (bnkernels.__version__, np.__version__))
    print(
        "OpenMP: %s, %d threads by default"
        % ("on" if _kernels.openmp_enabled() else "off (serial build)", _kernels.max_threads())
    )
    for line in build_report():
        print(line)
    rng = np.random.default_rng(0)
    ok = True
    print("self-check against bnkernels.reference (max relative error):")
    for shape, axis, dtype in SELF_CHECK:
        err, good = _check(shape, axis, dtype, rng)
        ok &= good
        print(
            "  %-20s axis=%-2d %-8s %.1e  %s"
            % (shape, axis, np.dtype(dtype).name, err, "ok" if good else "FAILED")
        )
    print("backward timings (median, ms):")
    for shape, axis, dtype in TIMED:
        x = rng.standard_normal(shape).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        C = shape[axis]
        _, cache = bnkernels.forward(
            x, np.ones(C, dtype), np.zeros(C, dtype), {"mode": "train"}, axis=axis
        )
        _, ref_cache = reference.forward(
            x, np.ones(C, dtype), np.zeros(C, dtype), {"mode": "train"}, axis=axis
        )
        t_graph = _median_time(partial(reference.backward_graph, dy, ref_cache), 5)
        t_alt = _median_time(partial(reference.backward_alt, dy, ref_cache), 5)
        t_bk = _median_time(partial(bnkernels.backward, dy, cache), 20)
        print(
            "  %-20s %-8s graph %8.3f  alt %8.3f  bnkernels %7.3f   (%.0fx over alt)"
            % (shape, np.dtype(dtype).name, t_graph * 1e3, t_alt * 1e3, t_bk * 1e3, t_alt / t_bk)
        )
    if not ok:
        print(
            "SELF-CHECK FAILED: the compiled kernels disagree with the reference", file=sys.stderr
        )
        return 1
    print("self-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
