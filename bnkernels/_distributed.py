"""Batch norm over a batch split across processes.

Each process holds a slice of the batch.  The forward needs the statistics of the whole
batch and the backward its two per-channel sums; both are made of per-slice parts that
merge exactly.  The split-phase functions expose the parts, so that any engine can move
them:

    count, mean, m2 = batch_stats(x)                  # this slice
    count, mean, m2 = merge_stats(counts, means, m2s)  # all slices, in slice order
    out, cache = forward(x, gamma, beta, bn_param, stats=(count, mean, m2))
    sum_dy, sum_dy_xmu = backward_reduce(dout, cache)  # this slice
    ... add the slices' sums, in slice order ...
    dx, dgamma, dbeta = backward_apply(dout, cache, sum_dy, sum_dy_xmu, count)

``forward(..., comm=comm)`` and ``backward(dout, cache)`` of its cache do the same over an
MPI communicator (mpi4py), with one collective per pass: ``comm.allgather``, which gives
every rank every rank's part in rank order.  Every rank merges them in that order, so
every rank gets bitwise the same statistics and gradients.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _api, _kernels

__all__ = ["batch_stats", "merge_stats", "backward_reduce", "backward_apply"]


# ---------------------------------------------------------------------------
# the split-phase functions
# ---------------------------------------------------------------------------


def batch_stats(
    x: npt.ArrayLike, *, axis: int = 1, num_threads: int | None = None
) -> tuple[int, np.ndarray, np.ndarray]:
    """Per-channel element count, mean and M2 of a batch (or of a slice of one).

    One pass over ``x``, the forward's own: a shifted sum per task, the tasks merged in a
    fixed order, so the result is bitwise the same for any thread count.

    Parameters
    ----------
    x : ndarray, shape (N, C, ...), or channels-last with ``axis=-1``
        The slice; may be empty (N = 0).
    axis : int, default 1
        The channel axis.
    num_threads : int or None
        OpenMP threads, as for :func:`bnkernels.backward`.

    Returns
    -------
    count : int
        Elements per channel (``x.size // C``).
    mean : ndarray, float64, shape (C,)
        The per-channel mean (0 where count is 0).
    m2 : ndarray, float64, shape (C,)
        The per-channel sum of squared deviations from the mean; the biased variance is
        ``m2 / count``.
    """
    x = _api._array("x", x)
    _api._float_dtype("x", x)
    ax = _api._channel_axis(axis, x.ndim)
    nt = _api._n_threads(num_threads, size=x.size)
    C = x.shape[ax]
    count = x.size // C if C else 0
    mean, m2 = np.zeros(C), np.zeros(C)
    if count == 0:
        return 0, mean, m2
    if x.dtype in _api._KERNEL_DTYPES:
        lay, (xk,) = _api._input_views([x], ax, x)
        _kernels.batch_stats(lay, xk, mean, m2, nt)
    else:
        xc = np.moveaxis(x, ax, 0).reshape(C, -1).astype(np.float64)
        mean = xc.mean(axis=1)
        m2 = ((xc - mean[:, None]) ** 2).sum(axis=1)
    return count, mean, m2


def merge_stats(
    count: npt.ArrayLike, mean: npt.ArrayLike, m2: npt.ArrayLike
) -> tuple[int, np.ndarray, np.ndarray]:
    """Merge P parts' statistics (as :func:`batch_stats` gives them) into the whole's.

    Parameters
    ----------
    count : array of int, shape (P,)
        Elements per channel of each part (>= 0).
    mean, m2 : array, shape (P, C)
        Each part's per-channel mean and sum of squared deviations.

    Returns
    -------
    count : int
    mean, m2 : ndarray, float64, shape (C,)

    Notes
    -----
    The parts are merged in index order with Chan, Golub and LeVeque's pairwise formula,
    the one the kernels use between their tasks, so the result is deterministic; a part
    with count 0 changes nothing.
    """
    counts = np.asarray(count)
    means = np.asarray(mean, dtype=np.float64)
    m2s = np.asarray(m2, dtype=np.float64)
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise TypeError("count must be a 1-d array of ints (one per part), got %r" % (count,))
    if np.any(counts < 0):
        raise ValueError("count must be >= 0, got %s" % (counts,))
    P = counts.shape[0]
    if means.ndim != 2 or means.shape[0] != P or m2s.shape != means.shape:
        raise ValueError(
            "mean and m2 must have shape (P, C) with P = %d parts, got %s and %s"
            % (P, means.shape, m2s.shape)
        )
    n_a = 0
    mean_a = np.zeros(means.shape[1])
    m2_a = np.zeros(means.shape[1])
    for p in range(P):
        n_b = int(counts[p])
        if n_b == 0:
            continue
        if n_a == 0:
            n_a, mean_a, m2_a = n_b, means[p].copy(), m2s[p].copy()
            continue
        n = float(n_a + n_b)
        delta = means[p] - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2s[p] + delta * delta * (float(n_a) * n_b / n)
        n_a += n_b
    return n_a, mean_a, m2_a


def backward_reduce(
    dout: npt.ArrayLike, cache: dict[str, Any], *, num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The backward's per-channel sums over this slice: one read of dout and x.

    Returns
    -------
    sum_dy : ndarray, float64, shape (C,)
        ``sum(dout)`` per channel.
    sum_dy_xmu : ndarray, float64, shape (C,)
        ``sum(dout * (x - mean))`` per channel, with the cache's mean (for a seed-style
        cache, ``sum(dout * x_hat)``).

    The sums of all slices, added in slice order, go to :func:`backward_apply`.  An empty
    slice gives zeros.
    """
    return _reduce(_api._backward_inputs(dout, cache, num_threads, allow_empty=True))


def _reduce(b):
    """sum_dy, sum_dy_zm of prepared backward inputs b."""
    sum_dy, sum_dy_zm = np.zeros(b.C), np.zeros(b.C)
    if b.dout.size == 0:
        return sum_dy, sum_dy_zm
    if b.dout.dtype in _api._KERNEL_DTYPES:
        lay, views = _api._input_views(_api._backward_arrays(b), b.axis, b.dout)
        yk = views[2] if b.y is not None else None
        _kernels.backward_reduce(
            lay, views[0], views[1], b.vecs[0], sum_dy, sum_dy_zm, b.n_threads, yk
        )
    else:
        z = np.moveaxis(b.z, b.axis, 0).reshape(b.C, -1).astype(np.float64)
        dy = np.moveaxis(_masked(b), b.axis, 0).reshape(b.C, -1).astype(np.float64)
        sum_dy = dy.sum(axis=1)
        sum_dy_zm = (dy * (z - b.vecs[0][:, None])).sum(axis=1)
    return sum_dy, sum_dy_zm


def backward_apply(
    dout: npt.ArrayLike,
    cache: dict[str, Any],
    sum_dy: npt.ArrayLike,
    sum_dy_xmu: npt.ArrayLike,
    count: int,
    *,
    num_threads: int | None = None,
) -> tuple[np.ndarray, ...]:
    """The backward's element-wise pass, given the sums and count of the whole batch.

    Parameters
    ----------
    dout, cache
        As for :func:`bnkernels.backward`; this slice's.
    sum_dy, sum_dy_xmu : array, shape (C,)
        The sums of every slice (:func:`backward_reduce`), added.
    count : int
        Elements per channel of the whole batch.

    Returns
    -------
    dx : ndarray, the shape and dtype of dout (empty for an empty slice)
    dgamma, dbeta : ndarray, shape (C,)
        The gradients of the whole batch, the same on every slice, in the parameters'
        dtype.
    dresidual : ndarray, the shape and dtype of dout; only after a fused residual
        dout after the ReLU's mask, as :func:`bnkernels.backward` returns it.
    """
    b = _api._backward_inputs(dout, cache, num_threads, allow_empty=True)
    s1 = _api._f64(_api._per_channel("sum_dy", sum_dy, b.C, b.z.shape))
    s2 = _api._f64(_api._per_channel("sum_dy_xmu", sum_dy_xmu, b.C, b.z.shape))
    count = _whole_count("count", count, b.dout.size // b.C if b.C else 0)
    return _apply(b, s1, s2, count)


def _whole_count(name, count, local):
    """count, the elements per channel of a whole batch, as an int: at least 1 and at least
    the `local` of this slice."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError("%s must be an int, got %r" % (name, count))
    if count < max(local, 1):
        raise ValueError(
            "%s (%d) must be the elements per channel of the whole batch: at least "
            "this slice's %d and at least 1" % (name, count, local)
        )
    return int(count)


def _masked(b):
    """dout masked by a fused ReLU's saved output (where it is <= 0), as the kernels do."""
    if b.y is None:
        return b.dout
    return np.where(b.y <= 0, np.zeros((), b.dout.dtype), b.dout)


def _apply(b, s1, s2, count):
    """dx, dgamma, dbeta (and dresidual after a fused residual) of prepared backward inputs
    b from the whole batch's sums."""
    mean, scale, gamma, var = b.vecs
    q = 1.0 if b.xhat_form else scale  # xhat = (z - mean) * q
    if b.dout.size and b.dout.dtype in _api._KERNEL_DTYPES:
        dx, dres, lay, (zk, dyk, yk, dxk, dresk) = _api._backward_views(b)
        dgamma, dbeta = _api._grad_arrays(b)
        _kernels.backward_apply(
            lay,
            zk,
            dyk,
            dxk,
            *b.vecs,
            b.xhat_form,
            b.std_mode,
            b.train,
            s1,
            s2,
            count,
            dgamma,
            dbeta,
            b.n_threads,
            yk,
            dresk,
        )
        return _api._backward_outputs(b, dx, dres, dxk, dresk, dgamma, dbeta)
    # no kernel: an empty slice, or a dtype the kernels do not take (longdouble); dgamma
    # and dbeta in the parameters' dtype, rounded once from float64, as the kernels do
    dgamma = (q * s2).astype(b.grad_dtype)
    dbeta = s1.astype(b.grad_dtype)
    dx = np.empty_like(b.dout)
    dy = _masked(b)
    if b.dout.size:
        r = 1.0 / scale if b.xhat_form else scale
        if b.xhat_form:
            k = 1.0
        elif b.std_mode:
            sd = np.sqrt(var)
            k = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
        else:
            k = r
        A = gamma * r
        if b.train:
            inv_m = 1.0 / count
            Cc = -s1 * inv_m
            S = (-A * k * s2 * inv_m) * q
        else:
            Cc = np.zeros(b.C)
            S = np.zeros(b.C)
        shape = [1] * b.dout.ndim
        shape[b.axis] = b.C

        def per_channel(v):
            return np.reshape(v, shape)

        zm = b.z.astype(np.float64) - per_channel(mean)
        dx[...] = per_channel(A) * (dy.astype(np.float64) + per_channel(Cc)) + per_channel(S) * zm
    if b.residual:
        return dx, dgamma, dbeta, np.array(dy, copy=True)
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------
# across processes: one allgather per pass
# ---------------------------------------------------------------------------

# what every rank must agree on, by name, in the order checked
_AGREE = ("pass", "channels", "dtype", "axis", "eps", "eps_mode", "mode")


def agreed(*values):
    """The _AGREE fields of a call, given in that order (what every rank must say alike)."""
    return dict(zip(_AGREE, values))


def _check_comm(comm):
    if not callable(getattr(comm, "allgather", None)):
        raise TypeError(
            "comm must be an MPI communicator (mpi4py's MPI.Comm, or any object with "
            "allgather(obj) returning every rank's obj in rank order), got %s; "
            "pip install 'bnkernels[mpi]' for mpi4py" % type(comm).__name__
        )


# whether this thread's current synchronized call has joined its collective (ranks that
# are threads of one process, in the tests, each have their own)
_joined = threading.local()


def collectively(comm, pass_, fn, *args):
    """fn(*args), a synchronized pass that joins one allgather of comm.  If it fails on this
    rank before joining, this rank joins with its error, so that every rank raises (the
    others "failed on rank r") instead of waiting forever for it."""
    _check_comm(comm)
    _joined.done = False
    try:
        return fn(*args)
    except Exception as exc:
        if not _joined.done:
            _joined.done = True
            comm.allgather(({"pass": pass_, "error": "%s: %s" % (type(exc).__name__, exc)}, None))
        raise


def _allgather(comm, meta, payload):
    """Every rank's payload, in rank order, after checking that every rank's meta (a dict
    of the _AGREE fields) is the same: a mismatch raises the same ValueError on every rank
    rather than a hang or a wrong answer, and so does an error on any rank."""
    _joined.done = True
    parts = comm.allgather((meta, payload))
    for rank, (m, _) in enumerate(parts):
        if "error" in m and "error" not in meta:
            raise ValueError(
                "batch norm failed on rank %d of comm (%s), so on every rank" % (rank, m["error"])
            )
    for key in _AGREE:
        seen = [m.get(key) for m, _ in parts]
        if any(v != seen[0] for v in seen):
            listing = ", ".join("rank %d: %r" % (r, v) for r, v in enumerate(seen))
            raise ValueError(
                "the ranks of comm disagree on the %s of batch norm (%s); every rank must "
                "call it alike" % (key.replace("_", " "), listing)
            )
    return [p for _, p in parts]


def _check_stats(stats, x, C):
    """(count, mean, m2) of forward's stats argument for x, checked."""
    if not isinstance(stats, (tuple, list)):
        raise TypeError(
            "stats must be a tuple (count, mean, m2) as batch_stats and merge_stats give "
            "it, got %s" % type(stats).__name__
        )
    if len(stats) != 3:
        raise ValueError("stats must be (count, mean, m2), got %d items" % len(stats))
    count, mean, m2 = stats
    count = _whole_count("stats' count", count, x.size // C)
    vecs = []
    for name, v in (("stats' mean", mean), ("stats' m2", m2)):
        v = _api._per_channel(name, _api._array(name, v), C, x.shape)
        _api._float_dtype(name, v)
        vecs.append(_api._f64(v))
    return count, vecs[0], vecs[1]


def whole_batch_stats(x, axis, comm, stats, meta):
    """(count, mean, var) of the whole batch that x is a part of: from stats, or gathered
    from every rank of comm with one allgather.  In test mode mean and var are None (the
    running statistics serve) and comm still gathers once, to check that the ranks agree.
    meta: the forward's agreed() fields."""
    C = meta["channels"]
    train = meta["mode"] == "train"
    if comm is not None and stats is not None:
        raise ValueError("give forward comm or stats, not both")
    if stats is not None:
        if not train:
            raise ValueError(
                "stats are the batch's statistics, for train mode; in test mode the running "
                "statistics serve (bn_param['mode'] is 'test')"
            )
        count, mean, m2 = _check_stats(stats, x, C)
    else:  # (comm checked by collectively, which every call with a comm goes through)
        local = batch_stats(x, axis=axis) if train else (x.size // C, None, None)
        parts = _allgather(comm, meta, local)
        counts = np.array([p[0] for p in parts], dtype=np.int64)
        if int(counts.sum()) == 0:
            raise ValueError("the batch is empty on every rank of comm")
        if not train:
            return int(counts.sum()), None, None
        count, mean, m2 = merge_stats(counts, [p[1] for p in parts], [p[2] for p in parts])
    var = m2 / count
    var[var < 0.0] = 0.0  # as the kernels clamp it
    return count, mean, var


def sync_backward(comm, dout, cache, num_threads):
    """backward over the whole batch: every rank's sums gathered with one allgather and
    added in rank order on every rank (comm checked by collectively)."""
    b = _api._backward_inputs(dout, cache, num_threads, allow_empty=True)
    meta = agreed(
        "backward",
        b.C,
        b.dout.dtype.str,
        b.axis,
        cache.get("eps"),
        cache.get("eps_mode"),
        cache.get("mode"),
    )
    local = _reduce(b)
    count = b.dout.size // b.C
    parts = _allgather(comm, meta, (count, local[0], local[1]))
    total = sum(p[0] for p in parts)
    if total == 0:
        raise ValueError("the batch is empty on every rank of comm")
    s1, s2 = parts[0][1], parts[0][2]
    for _, a1, a2 in parts[1:]:
        s1 = s1 + a1
        s2 = s2 + a2
    return _apply(b, s1, s2, total)
