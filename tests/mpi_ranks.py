"""Run under mpiexec: every rank checks the synchronized passes against one process on
the whole batch (tests/test_mpi.py starts it; prints 'ok N' on rank 0 when all pass)."""

import sys

import numpy as np
from mpi4py import MPI

import bnkernels
from dist_helpers import EPS, check_ranks, make_batch, step_on_rank

comm = MPI.COMM_WORLD
size, rank = comm.Get_size(), comm.Get_rank()
failures = []
n_checks = 0
for layout in ("nchw", "nhwc", "2d"):
    for dtype in (np.float32, np.float64):
        for sizes in (
            [3] * size,
            [2 * r + 1 for r in range(size)],
            [0] + [4] * (size - 1) if size > 1 else [5],
        ):
            for mode in ("train", "test"):
                x, dout, gamma, beta, axis, slices = make_batch(layout, sizes, dtype, seed=size)
                mine = step_on_rank(comm, rank, x, dout, gamma, beta, axis, slices, mode)
                results = comm.allgather(mine)
                failures += [
                    "%s %s %s %s: %s" % (layout, np.dtype(dtype).name, sizes, mode, f)
                    for f in check_ranks(results, x, dout, gamma, beta, axis, slices, mode)
                ]
                n_checks += 1

# the split-phase functions driven by hand over MPI
x, dout, gamma, beta, axis, slices = make_batch("nchw", [2 + r for r in range(size)], np.float64)
lo, hi = slices[rank]
parts = comm.allgather(bnkernels.batch_stats(x[lo:hi], axis=axis))
stats = bnkernels.merge_stats(
    np.array([p[0] for p in parts]), [p[1] for p in parts], [p[2] for p in parts]
)
out, cache = bnkernels.forward(x[lo:hi], gamma, beta, {"mode": "train", "eps": EPS}, stats=stats)
sums = comm.allgather(bnkernels.backward_reduce(dout[lo:hi], cache))
s1 = sum(s[0] for s in sums[1:]) + sums[0][0]
s2 = sum(s[1] for s in sums[1:]) + sums[0][1]
dx, dgamma, dbeta = bnkernels.backward_apply(dout[lo:hi], cache, s1, s2, stats[0])
want_out, wcache = bnkernels.forward(x, gamma, beta, {"mode": "train", "eps": EPS}, axis=axis)
wdx, wdg, wdb = bnkernels.backward(dout, wcache)
for name, got, want in (
    ("out", out, want_out[lo:hi]),
    ("dx", dx, wdx[lo:hi]),
    ("dgamma", dgamma, wdg),
    ("dbeta", dbeta, wdb),
):
    if not np.allclose(got, want, rtol=1e-12, atol=1e-12):
        failures.append("split-phase by hand: %s" % name)
n_checks += 1

# ranks that disagree get an error, every one of them (with more than one rank)
if size > 1:
    C = 4 if rank == 0 else 5
    try:
        bnkernels.forward(np.ones((3, C)), np.ones(C), np.zeros(C), {"mode": "train"}, comm=comm)
        failures.append("disagreeing channel counts were accepted")
    except ValueError as exc:
        if "disagree on the channels" not in str(exc):
            failures.append("unexpected message: %s" % exc)
    n_checks += 1

everyone = comm.allgather(failures)
if rank == 0:
    bad = [f for r, fs in enumerate(everyone) for f in ("rank %d: %s" % (r, f) for f in fs)]
    print("\n".join(bad) if bad else "ok %d" % n_checks)
    sys.stdout.flush()
comm.Barrier()
sys.exit(1 if any(everyone) else 0)
