"""Batch norm over a batch split across ranks, checked against one process on the whole.

Shared by tests/test_distributed.py (ranks as threads of one process, ThreadComm) and
tests/mpi_ranks.py (ranks as MPI processes, run under mpiexec).
"""

import threading

import numpy as np

import bnkernels

EPS = 1e-5
# float64 to 1e-12 relative; float32 within its documented bound (a few ulps of the
# result's terms), checked here as 1e-5 of the largest magnitude
RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}


class ThreadComm:
    """The one method of an MPI communicator bnkernels uses, for ranks that are threads."""

    def __init__(self, shared, rank):
        self._shared = shared
        self._rank = rank

    def allgather(self, obj):
        slots, barrier = self._shared
        slots[self._rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out


def run_threads(size, fn):
    """fn(comm, rank) on `size` threads, one rank each; the results, or raise the first
    exception (with every rank's exceptions attached)."""
    shared = ([None] * size, threading.Barrier(size, timeout=60))
    results = [None] * size
    errors = [None] * size

    def target(rank):
        try:
            results[rank] = fn(ThreadComm(shared, rank), rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors[rank] = exc

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if any(t.is_alive() for t in threads):
        raise TimeoutError("a rank did not finish")
    if any(e is not None for e in errors):
        raise RankErrors(errors)
    return results


class RankErrors(Exception):
    def __init__(self, errors):
        super().__init__("; ".join("rank %d: %r" % (r, e) for r, e in enumerate(errors)))
        self.errors = errors


def make_batch(layout, sizes, dtype, seed=0):
    """The whole batch and its slices: `sizes` samples per rank (0 allowed), along axis 0.

    layout: 'nchw', 'nhwc' (channels last, axis=-1) or '2d'."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    shape = {"nchw": (n, 6, 5, 4), "nhwc": (n, 5, 4, 6), "2d": (n, 7)}[layout]
    axis = -1 if layout == "nhwc" else 1
    C = shape[axis]
    scale = rng.uniform(0.5, 3.0, C)
    offset = rng.uniform(-2.0, 2.0, C)
    bshape = [1] * len(shape)
    bshape[axis] = C
    x = (rng.standard_normal(shape) * scale.reshape(bshape) + offset.reshape(bshape)).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.uniform(-0.5, 0.5, C).astype(dtype)
    bounds = np.cumsum([0] + list(sizes))
    slices = [(bounds[r], bounds[r + 1]) for r in range(len(sizes))]
    return x, dout, gamma, beta, axis, slices


def close(a, b, dtype):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(b))) if b.size else 1.0)
    return a.shape == b.shape and (
        a.size == 0 or float(np.max(np.abs(a - b))) <= RTOL[np.dtype(dtype)] * scale
    )


def step_on_rank(comm, rank, x, dout, gamma, beta, axis, slices, mode="train"):
    """One synchronized forward + backward on this rank's slice."""
    lo, hi = slices[rank]
    param = {"mode": mode, "eps": EPS, "momentum": 0.9}
    if mode == "test":
        C = x.shape[axis]
        param["running_mean"] = np.linspace(-1, 1, C)
        param["running_var"] = np.linspace(0.5, 2, C)
    out, cache = bnkernels.forward(x[lo:hi], gamma, beta, param, axis=axis, comm=comm)
    dx, dgamma, dbeta = bnkernels.backward(dout[lo:hi], cache)
    return out, dx, dgamma, dbeta, param["running_mean"], param["running_var"]


def whole_batch(x, dout, gamma, beta, axis, mode="train"):
    param = {"mode": mode, "eps": EPS, "momentum": 0.9}
    if mode == "test":
        C = x.shape[axis]
        param["running_mean"] = np.linspace(-1, 1, C)
        param["running_var"] = np.linspace(0.5, 2, C)
    out, cache = bnkernels.forward(x, gamma, beta, param, axis=axis)
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)
    return out, dx, dgamma, dbeta, param["running_mean"], param["running_var"]


def check_ranks(results, x, dout, gamma, beta, axis, slices, mode="train"):
    """Every rank's results against one process on the whole batch; a list of failures."""
    ref = whole_batch(x, dout, gamma, beta, axis, mode)
    failures = []
    for rank, res in enumerate(results):
        lo, hi = slices[rank]
        out, dx, dgamma, dbeta, rmean, rvar = res
        if not close(out, ref[0][lo:hi], x.dtype):
            failures.append("rank %d: out" % rank)
        if not close(dx, ref[1][lo:hi], x.dtype):
            failures.append("rank %d: dx" % rank)
        for name, got, want in (
            ("dgamma", dgamma, ref[2]),
            ("dbeta", dbeta, ref[3]),
            ("running_mean", rmean, ref[4]),
            ("running_var", rvar, ref[5]),
        ):
            if not close(got, want, x.dtype):
                failures.append("rank %d: %s" % (rank, name))
    # every rank bitwise the same per-channel results
    for i, name in ((2, "dgamma"), (3, "dbeta"), (4, "running_mean"), (5, "running_var")):
        first = np.asarray(results[0][i])
        for rank, res in enumerate(results[1:], 1):
            if np.asarray(res[i]).tobytes() != first.tobytes():
                failures.append("rank %d: %s differs from rank 0's" % (rank, name))
    return failures
