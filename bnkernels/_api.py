"""The public face: validate cheaply, find the layout, dispatch to the kernels.

float16, float32 and float64 run the compiled kernels; longdouble runs
:mod:`bnkernels.reference`.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import time
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from . import _kernels, reference
from ._layout import choose

__all__ = ["forward", "backward"]

_KERNEL_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
# the dtypes the kernels read per-channel vectors (gamma) and running statistics in
_VECTOR_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_SEED_KEYS = ("x_hat", "gamma", "denom")
_EPILOGUE_KEYS = ("activation", "residual", "out")  # optional in either kind of cache
_CACHE_KEYS = ("x", "mean", "var", "invstd", "gamma", "eps", "eps_mode", "mode", "axis")
_CACHE_KEY_SET = frozenset(_CACHE_KEYS)
_F64 = np.dtype(np.float64)


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _float_dtype(name, a):
    if a.dtype.kind != "f":
        raise TypeError(
            "%s must be a floating-point array (float16, float32 or float64 for the compiled "
            "kernels), got dtype %s" % (name, a.dtype)
        )


def _real_dtype(name, a):
    """Parameters and running statistics may have any real dtype: integer or floating."""
    if a.dtype.kind not in "iuf":
        raise TypeError(
            "%s must be a floating-point (or integer) array, got dtype %s" % (name, a.dtype)
        )


def _param(name, v, C, shape):
    """gamma or beta: None (no affine: 1 and 0), else a (C,) array of a real dtype."""
    if v is None:
        return None
    if type(v) is np.ndarray and v.shape == (C,) and v.dtype.kind in "fiu":
        return v  # the common case, checked at once
    v = _per_channel(name, _array(name, v), C, shape)
    _real_dtype(name, v)
    return v


def _param_dtype(x, gamma, beta):
    """The parameters' dtype: the floating dtypes among gamma and beta, promoted; x's when
    neither is floating (integers, None).  forward caches gamma in it, and dgamma and dbeta
    come out in it."""
    if gamma is not None and beta is not None and gamma.dtype is beta.dtype:
        return _promote(gamma.dtype) if gamma.dtype.kind == "f" else x.dtype  # the common case
    floating = [p.dtype for p in (gamma, beta) if p is not None and p.dtype.kind == "f"]
    return _promote(*floating) if floating else x.dtype


def _promote(*dtypes):
    """np.result_type(*dtypes), at once where they are one native dtype without metadata
    (the common case; result_type costs half a microsecond, makes a byte-swapped dtype
    native and drops metadata)."""
    d = dtypes[0]
    if d.isnative and d.metadata is None and all(e is d for e in dtypes):
        return d
    return np.result_type(*dtypes)


def _grad_dtype(gamma, z):
    """The dtype of dgamma and dbeta: that of the cached gamma when it is floating (the
    parameters' dtype), else (integers, None) that of x."""
    return gamma.dtype if gamma is not None and gamma.dtype.kind == "f" else z.dtype


def _channel_axis(axis, ndim, key="axis", array="an array"):
    """The channel axis as a non-negative int; ``key`` names the axis argument in messages,
    ``array`` the array it indexes."""
    if type(axis) is int and 0 < axis < ndim:  # the common case, as forward caches it
        return axis
    if ndim < 2:
        raise ValueError(
            "batch norm needs %s with ndim >= 2 (batch, channels, ...), got ndim %d" % (array, ndim)
        )
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError("%s must be an int, got %r" % (key, axis))
    if not -ndim <= axis < ndim:
        raise ValueError("%s %d is out of range for %s with ndim %d" % (key, axis, array, ndim))
    if axis % ndim == 0:
        raise ValueError(
            "%s 0 is the batch axis; the channel axis is 1 or -1 (or another axis > 0)" % key
        )
    return int(axis) % ndim


def _per_channel(name, v, C, shape):
    v = np.asarray(v)
    if v.shape != (C,):
        raise ValueError(
            "%s must have shape (%d,) to match %d channels of x with shape %s, got %s"
            % (name, C, C, shape, v.shape)
        )
    return v


def _usable_cpus():
    """The CPUs this process may run on (its affinity mask where the OS has one), shared
    with the other processes an MPI launcher started on this machine: ranks that each ran
    a full team would take turns on the cores and stall in every barrier."""
    try:
        n = len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, n // _LOCAL_RANKS)


# what MPI launchers say of the ranks they started on this machine: MPICH and Intel MPI,
# Open MPI
_LOCAL_RANKS_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def _local_ranks():
    """Processes of this one's MPI job on this machine (1 outside one)."""
    for var in _LOCAL_RANKS_VARS:
        text = os.environ.get(var, "")
        if text.isdigit() and int(text) > 0:
            return int(text)
    return 1


# read once: a launcher sets these before the process starts, and looking them up in the
# environment at every call cost more than the rest of choosing its thread count
_LOCAL_RANKS = _local_ranks()
_cpus = _usable_cpus()  # read again whenever a call asks for more threads than this
_PARALLEL_MIN_ELEMS = int(_kernels.PARALLEL_MIN_ELEMS)
_forked = False  # this process was made by os.fork() (or is a descendant of one)


def _after_fork_in_child():
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _n_threads(num_threads, load=True, size=None):
    """The threads of one kernel call: num_threads, or the OpenMP default for None, capped
    at the CPUs this process may use.  1 in a forked process: GNU OpenMP's threads do not
    survive fork(), a call on one thread enters no OpenMP region, and the results are the
    same for every thread count.  The default (None) also leaves out the CPUs that other
    runnable tasks hold now (load; see _busy_cpus).  1 for a call of `size` elements that
    the kernels run on one thread anyway (below PARALLEL_MIN_ELEMS): small calls skip the
    look at the machine."""
    global _cpus
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
            raise TypeError("num_threads must be None or a positive int, got %r" % (num_threads,))
        if num_threads < 1:
            raise ValueError("num_threads must be None or >= 1, got %d" % num_threads)
    if size is not None and size < _PARALLEL_MIN_ELEMS:
        return 1
    n = _kernels.max_threads() if num_threads is None else int(num_threads)
    if _forked:
        return 1
    if n > _cpus:
        _cpus = _usable_cpus()
        n = min(n, _cpus)
    # (ranks of an MPI job already share the CPUs, and the others' busy-polling is load)
    if num_threads is None and load and n > 1 and _LOCAL_RANKS == 1:
        n = max(1, min(n, _cpus - _busy_cpus()))
    return n


# A team larger than the idle CPUs stalls: a thread that the OS has descheduled for
# another runnable task holds every other thread at the next barrier for a time slice
# (milliseconds, for calls of tens of microseconds).  The default thread count therefore
# leaves out the CPUs that other processes are running on: Linux's count of runnable
# tasks (/proc/loadavg) less this process's own (/proc/self/task: the caller, and idle
# OpenMP workers of this or another runtime, which spin for a while after a call), read
# at most every LOAD_PERIOD seconds.
LOAD_PERIOD = 0.02
_LOADAVG = "/proc/loadavg"
_TASKS = "/proc/self/task"
_load_at = -1.0
_load_busy = 0


def _own_running():
    """Threads of this process that are runnable now (state R)."""
    n = 0
    for tid in os.listdir(_TASKS):
        try:
            with open(os.path.join(_TASKS, tid, "stat")) as f:
                stat = f.read()
        except OSError:  # the thread has exited
            continue
        n += stat[stat.rindex(")") + 2 : stat.rindex(")") + 3] == "R"
    return n


def _busy_cpus():
    """CPUs that other processes' tasks ran on, recently; 0 if unknown."""
    global _load_at, _load_busy
    now = time.monotonic()
    if now - _load_at >= LOAD_PERIOD:
        try:
            with open(_LOADAVG) as f:
                running = int(f.read().split()[3].split("/")[0])
            _load_busy = max(0, running - max(1, _own_running()))
        except (OSError, ValueError, IndexError):
            _load_busy = 0
        _load_at = now
    return _load_busy


def _array(name: str, a: Any) -> np.ndarray:
    """np.asarray(a), refusing numpy.ma arrays (the kernels would ignore the mask).  No masked
    array can exist before numpy.ma is imported, so plain inputs cost a dict lookup."""
    ma = sys.modules.get("numpy.ma")
    if ma is not None and isinstance(a, ma.MaskedArray):
        raise TypeError(
            "%s is a masked array (numpy.ma): masked arrays are not supported, the mask would "
            "be ignored; pass .filled(value), or compress the masked entries out first" % name
        )
    return np.asarray(a)


def _real(name, v):
    """v as a float; a TypeError unless it is a real number (int, float, NumPy scalar;
    not bool, not str)."""
    if type(v) is float:
        return v
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(
            "%s must be a real number (int or float), got %r of type %s"
            % (name, v, type(v).__name__)
        )
    try:
        return float(v)
    except OverflowError:
        return math.inf


_F16 = np.dtype(np.float16)
_TINY32 = float(np.finfo(np.float32).tiny)
_TINY64 = float(np.finfo(np.float64).tiny)


def _eps(name, v, dtype):
    """eps as a float > 0 whose reciprocal is finite in float64, and in float32 for float16
    data (the precision of float16 needs none smaller, and the reference computes float16 in
    float32)."""
    eps = _real(name, v)
    least = _TINY32 if dtype == _F16 else _TINY64
    if not least <= eps < math.inf:
        raise ValueError(
            "%s must be a finite number > 0 (at least %.3g), got %r" % (name, least, eps)
        )
    return eps


def _running_stat(key, v, C, shape, dtype):
    """bn_param[key] as a (C,) array: zeros of ``dtype`` (the wider of x's and the
    parameters' dtypes) when missing or None; integers become ``dtype`` (a running statistic
    is never truncated); floating arrays keep their dtype; other dtypes are refused."""
    if v is None:
        return np.zeros(C, dtype=dtype)
    if type(v) is np.ndarray and v.shape == (C,) and v.dtype.kind == "f":
        return v  # as forward left it
    name = "bn_param[%r]" % key
    v = _per_channel(name, _array(name, v), C, shape)
    _real_dtype(name, v)
    if v.dtype.kind in "iu":
        return v.astype(dtype)
    return v


def _momentum(v):
    """bn_param['momentum'] as a float, or None for the cumulative average."""
    if v is None:
        return None
    momentum = _real("bn_param['momentum']", v)
    if not math.isfinite(momentum):
        raise ValueError(
            "bn_param['momentum'] must be a finite number or None, got %r" % (momentum,)
        )
    return momentum


def _batches_tracked(v):
    """bn_param['num_batches_tracked'] as an int (0 when missing or None)."""
    if v is None:
        return 0
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError("bn_param['num_batches_tracked'] must be an int >= 0, got %r" % (v,))
    if v < 0:
        raise ValueError("bn_param['num_batches_tracked'] must be an int >= 0, got %d" % v)
    return int(v)


def _kernel_vec(v, C, keep=(_F64,)):
    """Whether v is a per-channel vector the kernels take as it is: a contiguous (C,) array
    of a dtype in ``keep``, as forward() caches them.  The kernels read gamma in float32
    too."""
    return type(v) is np.ndarray and v.shape == (C,) and v.dtype in keep and v.flags.c_contiguous


def _vec64(v, C, shape, name, keep=(_F64,)):
    """A per-channel vector for the kernels: v itself if _kernel_vec, else validated and
    converted to contiguous float64."""
    if _kernel_vec(v, C, keep):
        return v
    return _f64(_per_channel(name, v, C, shape))


def _f64(v):
    return np.ascontiguousarray(v, dtype=np.float64)


def _running(running, stat, momentum):
    """momentum*running + (1 - momentum)*stat, a new array of running's dtype; the kernel
    module gives the same bits as this NumPy expression in one call instead of five, and
    leaves results that are not finite to NumPy (its overflow warnings, its errstate)."""
    if (
        type(running) is np.ndarray
        and running.dtype in _VECTOR_DTYPES
        and running.flags.c_contiguous
    ):
        new = _kernels.running_update(running, stat, momentum)
        if new is not None:
            return new
    return (momentum * running + (1 - momentum) * stat).astype(running.dtype, copy=False)


def _update_running(bn_param, running_mean, running_var, mean, var, momentum, tracked):
    """Train mode: bn_param gets the new running statistics and counts one more batch.
    momentum None: the cumulative average of the batches seen,
    running + (stat - running) / n with n = num_batches_tracked after counting this one."""
    n = tracked + 1
    for key, running, stat in (
        ("running_mean", running_mean, mean),
        ("running_var", running_var, var),
    ):
        if momentum is None:
            new = (running + (stat - running) / n).astype(running.dtype, copy=False)
        else:
            new = _running(running, stat, momentum)
        bn_param[key] = new
    bn_param["num_batches_tracked"] = n


def _to_layout(arrays, n_out, axis):
    """Layout shared by the last n_out >= 1 arrays (outputs of one layout, compact) and the
    others, copying inputs that do not fit.  Returns (layout, arrays) or (None, arrays) if
    even the outputs do not fit."""
    lay = choose(arrays, axis)
    if lay is not None:
        return lay, arrays
    k = len(arrays) - n_out
    ref = arrays[k:]
    if choose(ref, axis) is None:
        return None, arrays
    fixed = []
    for a in arrays[:k]:
        if choose([a] + ref, axis) is None:
            b = np.empty_like(ref[0])
            b[...] = a
            a = b
        fixed.append(a)
    fixed += ref
    return choose(fixed, axis), fixed


def _views(arrays, axis, out):
    """(layout, views) the kernels run on: the inputs `arrays` and the output `out` (an
    array, or a list of arrays of one shape and layout) as they are where they share a
    layout (inputs that do not fit copied into the outputs'), else C-contiguous copies of
    the inputs with the channel axis at 1 and, for the outputs, fresh arrays of that
    layout, which _copy_back returns to them."""
    outs = list(out) if isinstance(out, list) else [out]
    lay, views = _to_layout(list(arrays) + outs, len(outs), axis)
    if lay is None:
        views = [_standard(a, axis) for a in arrays]
        views += [np.empty(views[0].shape, o.dtype) for o in outs]
        lay = choose(views, 1)
    return lay, views


def _input_views(arrays, axis, like):
    """(layout, views) of inputs alone (a pass with no output array), chosen as if an output
    of ``like``'s shape and layout (np.empty_like(like)) were written: the same layout, plan
    and so the same bits as the passes that write one (backward_reduce as backward,
    batch_stats as forward)."""
    lay = choose(arrays, axis)
    if lay is not None:
        return lay, arrays
    lay, views = _views(arrays, axis, np.empty_like(like))
    return lay[:4] + (lay[4][:-1],), views[:-1]


def _copy_back(out, view, axis):
    """out := the kernels' output view, where _views gave out a stand-in."""
    if view is not out:
        np.moveaxis(out, axis, 1)[...] = view


def _standard(a, axis):
    """A C-contiguous copy of ``a`` with the channel axis moved to 1 (planar layout)."""
    return np.ascontiguousarray(np.moveaxis(a, axis, 1))


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------


def forward(
    x: npt.ArrayLike,
    gamma: npt.ArrayLike,
    beta: npt.ArrayLike,
    bn_param: dict[str, Any],
    *,
    axis: int = 1,
    activation: str | None = None,
    residual: npt.ArrayLike | None = None,
    comm: Any = None,
    stats: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Batch normalization forward pass.

    Normalizes every channel of ``x`` over all the other axes, then scales and
    shifts it: ``out = gamma * xhat + beta``.

    Parameters
    ----------
    x : ndarray, shape (N, C, ...), or channels-last (N, ..., C) with ``axis=-1``
        The batch.  float16, float32 and float64 run the compiled kernels;
        longdouble runs :mod:`bnkernels.reference` and keeps its dtype.  Any
        strides (channels-last, transposed, sliced); not modified, may be read-only.
    gamma, beta : ndarray, shape (C,), any real dtype, or None
        Scale and shift per channel; None stands for 1 (gamma) and 0 (beta), no
        affine transform.  Integer or floating, of x's dtype or another: the
        parameters' dtype is the floating dtypes among gamma and beta promoted
        (x's if neither is floating); they are taken in it, and :func:`backward`
        gives dgamma and dbeta in it (float32 parameters of float16 data get
        float32 gradients).  Booleans, complex numbers, objects and strings are
        refused.
    bn_param : dict
        The CS231n-style parameter dict, updated in place in train mode:

        - ``'mode'``: ``'train'`` (batch statistics) or ``'test'`` (running
          statistics); required.
        - ``'eps'``: a real number > 0, default 1e-5.
        - ``'momentum'``: a real number, default 0.9 (PyTorch's 0.1), or None for
          the cumulative average of all the batches seen.
        - ``'running_mean'``, ``'running_var'``: ndarray, shape (C,); zeros when
          missing.  In train mode replaced by
          ``momentum * running + (1 - momentum) * batch_stat`` (biased batch
          variance), or with ``momentum=None`` by
          ``running + (batch_stat - running) / num_batches_tracked``; in the
          floating dtype they had.  Missing or integer ones take the wider of x's
          and the parameters' dtypes (never truncated).
        - ``'num_batches_tracked'``: an int >= 0, default 0; every train-mode call
          counts its batch here, whatever the momentum (as PyTorch does).
        - ``'eps_mode'``: ``'var'`` (default), ``xhat = (x - mean) / sqrt(var + eps)``;
          or ``'std'``, ``xhat = (x - mean) / (sqrt(var) + eps)``.
    axis : int, default 1
        The channel axis (any axis but 0, the batch axis); every other axis is
        reduced.  1 for (N, C, ...), -1 for channels-last arrays.
    activation : None or 'relu', default None
        A fused ReLU after the normalization (and the residual):
        ``out = max(v, 0)``, 0 where v <= 0 (-0.0 becomes +0.0), NaN kept.
    residual : ndarray of x's shape and dtype, optional
        Added to ``gamma * xhat + beta`` before the activation, in the same pass
        (any strides); :func:`backward` then returns its gradient too.
    comm : MPI communicator, optional
        x is this rank's slice of a batch split across the ranks of ``comm`` (an
        mpi4py ``MPI.Comm``, or any object whose ``allgather(obj)`` returns every
        rank's ``obj`` in rank order).  The statistics and the running-statistics
        update are those of the whole batch; one ``allgather`` per call; the slice may
        be empty.  :func:`backward` of the cache reduces across the same ``comm``.
    stats : (count, mean, m2), optional
        The statistics of the whole batch x is part of, as :func:`batch_stats` and
        :func:`merge_stats` give them: x is normalized with them, in train-mode
        semantics (running statistics updated with them).  The cache records
        ``count``; its gradients come from :func:`backward_reduce` and
        :func:`backward_apply`.

    Returns
    -------
    out : ndarray, the shape, dtype and memory layout of x
        ``gamma * xhat + beta``, plus ``residual``, then the activation; in the
        kernels computed in float64 and rounded once.
    cache : dict
        What :func:`backward` needs: ``'x'`` (the input itself, not a copy), the
        per-channel statistics ``'mean'``, ``'var'``, ``'invstd'`` (shape (C,), float64;
        longdouble for longdouble x without ``comm`` or ``stats``), ``'gamma'`` (in the
        parameters' dtype; ones for None), ``'eps'``, ``'eps_mode'``, ``'mode'``,
        ``'axis'`` (normalized to a non-negative int), ``'activation'``,
        ``'residual'`` (a bool) and ``'out'``: with ``activation='relu'`` the returned
        ``out`` itself, not a copy, whose mask :func:`backward` applies (modifying
        ``out`` in place changes the gradient); else None.

    Raises
    ------
    TypeError
        x is not a floating-point array, gamma or beta not a real one, an array is
        a masked array (numpy.ma), ``bn_param`` is not a dict, or one of its values
        has the wrong type.
    ValueError
        x has ndim < 2 or no elements, ``axis`` is 0 or out of range, a per-channel
        array has the wrong shape, or ``bn_param`` holds an invalid value.

    See Also
    --------
    backward : The matching backward pass.
    bnkernels.reference.forward : The NumPy version it is tested against.

    Examples
    --------
    >>> import numpy as np, bnkernels
    >>> x = np.arange(12, dtype=np.float32).reshape(4, 3)
    >>> out, cache = bnkernels.forward(x, np.ones(3, np.float32), np.zeros(3, np.float32),
    ...                                {"mode": "train"})
    >>> out.shape, out.dtype
    ((4, 3), dtype('float32'))
    """
    if comm is not None:
        from . import _distributed

        # whatever fails on this rank, every rank of comm stops with an error, none waits
        return _distributed.collectively(
            comm,
            "forward",
            _forward,
            x,
            gamma,
            beta,
            bn_param,
            axis,
            comm,
            stats,
            activation,
            residual,
        )
    return _forward(x, gamma, beta, bn_param, axis, comm, stats, activation, residual)


def _activation(v):
    """Whether activation asks for a fused ReLU (None or 'relu')."""
    if v is None or (isinstance(v, str) and v == "relu"):
        return v is not None
    raise ValueError("activation must be None or 'relu', got %r" % (v,))


def _like_x(name, a, x):
    """An array of x's shape and dtype (a residual, a saved output), any strides."""
    a = _array(name, a)
    if a.shape != x.shape:
        raise ValueError("%s must have the shape of x, %s, got %s" % (name, x.shape, a.shape))
    if a.dtype != x.dtype:
        raise TypeError("%s must have the dtype of x, %s, got %s" % (name, x.dtype, a.dtype))
    return a


def _forward(x, gamma, beta, bn_param, axis, comm, stats, activation=None, residual=None):
    x = _array("x", x)
    relu = _activation(activation)
    ax = _channel_axis(axis, x.ndim)
    C = x.shape[ax]
    split = comm is not None or stats is not None  # x is a part of the batch
    if x.size == 0 and not (split and C > 0):
        raise ValueError(
            "x is empty (shape %s): batch norm needs at least one element per channel" % (x.shape,)
        )
    _float_dtype("x", x)
    if residual is not None:
        residual = _like_x("residual", residual, x)
    g_in = _param("gamma", gamma, C, x.shape)
    b_in = _param("beta", beta, C, x.shape)
    if not isinstance(bn_param, dict):
        raise TypeError("bn_param must be a dict, got %s" % type(bn_param).__name__)
    if "mode" not in bn_param:
        raise ValueError("bn_param['mode'] is required: 'train' or 'test'")
    mode = bn_param["mode"]
    if mode not in ("train", "test"):
        raise ValueError("bn_param['mode'] must be 'train' or 'test', got %r" % (mode,))
    eps_mode = bn_param.get("eps_mode", "var")
    if eps_mode not in ("var", "std"):
        raise ValueError("bn_param['eps_mode'] must be 'var' or 'std', got %r" % (eps_mode,))
    eps = _eps("bn_param['eps']", bn_param.get("eps", 1e-5), x.dtype)
    momentum = _momentum(bn_param.get("momentum", 0.9))
    tracked = _batches_tracked(bn_param.get("num_batches_tracked"))
    # gamma and beta are taken in the parameters' dtype; the cache keeps gamma in it
    pdtype = _param_dtype(x, g_in, b_in)
    scale = np.ones(C, pdtype) if g_in is None else g_in.astype(pdtype, copy=False)
    shift = None if b_in is None else b_in.astype(pdtype, copy=False)
    stat_dtype = _promote(x.dtype, pdtype)
    running_mean = _running_stat(
        "running_mean", bn_param.get("running_mean"), C, x.shape, stat_dtype
    )
    running_var = _running_stat("running_var", bn_param.get("running_var"), C, x.shape, stat_dtype)

    train = mode == "train"
    std_mode = eps_mode == "std"
    if x.dtype not in _KERNEL_DTYPES and not split:
        # the reference gets the checked values; bn_param is updated as in the kernels' path
        param = dict(bn_param, eps=eps, momentum=momentum, num_batches_tracked=tracked)
        param.update(running_mean=running_mean, running_var=running_var)
        result = reference.forward(
            x, scale, shift, param, axis=ax, activation=activation, residual=residual
        )
        if train:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                bn_param[key] = param[key]
        return result

    g64 = _f64(scale)
    b64 = np.zeros(C) if shift is None else _f64(shift)
    count = None
    if split:
        from . import _distributed

        count, mean, var = _distributed.whole_batch_stats(
            x,
            ax,
            comm,
            stats,
            _distributed.agreed("forward", C, x.dtype.str, ax, eps, eps_mode, mode),
        )
        if not train:  # the running statistics; comm only checked that the ranks agree
            mean, var = _f64(running_mean), _f64(running_var)
        invstd = _invstd(var, eps, std_mode)
    elif train:  # the kernels fill them in with the batch statistics
        mean, var, invstd = np.empty(C), np.empty(C), np.empty(C)
    else:
        mean, var = _f64(running_mean), _f64(running_var)
        invstd = _invstd(var, eps, std_mode)
    batch = train and not split  # statistics from x itself
    out = _normalize(x, ax, g64, b64, batch, eps, std_mode, mean, var, invstd, residual, relu)
    if train:
        _update_running(bn_param, running_mean, running_var, mean, var, momentum, tracked)
    epilogue = (activation, residual is not None, out if relu else None)
    cache = _forward_cache_dict(x, mean, var, invstd, scale, eps, eps_mode, mode, ax, epilogue)
    if split:
        cache["count"] = count
        if comm is not None:
            cache["comm"] = comm
    return out, cache


def _invstd(var, eps, std_mode):
    return 1.0 / (np.sqrt(var) + eps if std_mode else np.sqrt(var + eps))


def _normalize(
    x, ax, gamma, beta, train, eps, std_mode, mean, var, invstd, residual=None, relu=False
):
    """out = gamma*invstd*(x - mean) + beta, gamma and beta float64 (C,), plus residual, then
    max(out, 0) with relu (the fused epilogue); train: mean, var, invstd are first filled
    with the batch statistics.  Without train, x may be empty and of any floating dtype."""
    out = np.empty_like(x)
    if x.size == 0:
        return out
    if x.dtype not in _KERNEL_DTYPES:  # given statistics, a dtype without kernels
        shape = [1] * x.ndim
        shape[ax] = x.shape[ax]
        scale = (gamma * invstd).reshape(shape)
        v = scale * (x.astype(np.float64) - mean.reshape(shape)) + beta.reshape(shape)
        if residual is not None:
            v = v + residual
        out[...] = np.where(v <= 0, 0, v) if relu else v
        return out
    lay, views = _views([x] if residual is None else [x, residual], ax, out)
    xk, rk, outk = views[0], (views[1] if residual is not None else None), views[-1]
    nt = _n_threads(None, size=x.size)
    args = (gamma, beta, mean, var, invstd, nt, rk, relu)
    var_not_finite = _kernels.forward(lay, xk, outk, train, eps, std_mode, *args)
    if train and x.dtype == np.float64 and var_not_finite:
        if _rescaled_stats(x, ax, eps, std_mode, mean, var, invstd):
            _kernels.forward(lay, xk, outk, False, eps, std_mode, *args)
    _copy_back(out, outk, ax)
    return out


def _rescaled_stats(x, ax, eps, std_mode, mean, var, invstd):
    """The statistics of the channels whose variance overflowed, computed again from their
    data scaled by a power of two (exact); whether there were any.

    float64 data beyond about 1e154 makes the squares of the one-pass moments overflow
    although x - mean and xhat are representable.  Channels with data that is not finite
    keep their NaN.  The variance itself may not be representable (inf); invstd is."""
    bad = np.flatnonzero(~np.isfinite(var))
    xc = np.moveaxis(x, ax, 0)[bad].reshape(len(bad), -1)
    finite = np.isfinite(xc).all(axis=1)
    bad, xc = bad[finite], xc[finite]
    if not len(bad):
        return False
    scale = np.ldexp(1.0, np.frexp(np.max(np.abs(xc), axis=1))[1])  # powers of two >= max|x|
    xs = xc / scale[:, None]
    mean_s = xs.mean(axis=1)
    var_s = ((xs - mean_s[:, None]) ** 2).sum(axis=1) / xs.shape[1]
    with np.errstate(over="ignore"):
        mean[bad] = mean_s * scale
        var[bad] = var_s * scale * scale  # inf where the variance is beyond float64
        if std_mode:
            invstd[bad] = 1.0 / (np.sqrt(var_s) * scale + eps)
        else:
            invstd[bad] = 1.0 / (np.sqrt(var_s + eps / (scale * scale)) * scale)
    return True


# Below this invstd (data spread beyond ~1e77), the backward's coefficient of z - mean,
# of the order of invstd**2, would underflow: the call runs on data scaled by a power of
# two per channel instead, exactly.
_TINY_INVSTD = 2.0**-256


def _rescaled(b):
    """(backward inputs b with z / p and its statistics, 1/p), p per channel a power of two
    near 1/invstd where invstd is tiny (1 elsewhere), so that the scaled invstd is about
    1: dgamma and dbeta are the same, dx is the scaled one times 1/p."""
    mean, invstd, gamma, var = b.vecs
    tiny = (invstd > 0.0) & (invstd < _TINY_INVSTD)
    p = np.where(tiny, np.ldexp(1.0, -np.frexp(invstd)[1]), 1.0)  # in (1/(2*invstd), 1/invstd]
    shape = [1] * b.z.ndim
    shape[b.axis] = b.C
    invstd_s = invstd * p
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        var_s = var / (p * p)
        var_s = np.where(np.isfinite(var_s) | (invstd_s == 0.0), var_s, 1.0 / invstd_s**2)
    vecs = (mean / p, invstd_s, gamma, var_s)
    return b._replace(z=b.z / p.reshape(shape), vecs=vecs), (1.0 / p).reshape(shape)


def _forward_cache_dict(x, mean, var, invstd, gamma, eps, eps_mode, mode, ax, epilogue):
    """forward's cache; epilogue: (activation, whether a residual was added, the output
    backward masks with, held by reference, or None)."""
    activation, residual, out = epilogue
    return {
        "x": x,
        "mean": mean,
        "var": var,
        "invstd": invstd,
        "gamma": gamma,
        "eps": eps,
        "eps_mode": eps_mode,
        "mode": mode,
        "axis": ax,
        "activation": activation,
        "residual": residual,
        "out": out,
    }


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------


_VEC_KEYS = ("mean", "invstd", "gamma", "var")  # in the order the kernels take them
_VEC_NAMES = tuple("cache[%r]" % key for key in _VEC_KEYS)


def _forward_cache(cache):
    """_unpack for a complete forward cache, checked as strictly as forward's arguments and
    as cheaply: types, dtypes and shapes, never a pass over the data."""
    z = _array("cache['x']", cache["x"])
    _float_dtype("cache['x']", z)
    ax = _channel_axis(cache["axis"], z.ndim, "cache['axis']", "cache['x']")
    mode, eps_mode = cache["mode"], cache["eps_mode"]
    if mode not in ("train", "test"):
        raise ValueError("cache['mode'] must be 'train' or 'test', got %r" % (mode,))
    if eps_mode not in ("var", "std"):
        raise ValueError("cache['eps_mode'] must be 'var' or 'std', got %r" % (eps_mode,))
    _eps("cache['eps']", cache["eps"], z.dtype)
    C = z.shape[ax]
    mean, invstd, gamma, var = vs = [cache[key] for key in _VEC_KEYS]
    if gamma is None:  # no affine
        vs[2] = gamma = np.ones(C, z.dtype)
    if (
        _kernel_vec(mean, C)
        and _kernel_vec(invstd, C)
        and _kernel_vec(gamma, C, _VECTOR_DTYPES)
        and _kernel_vec(var, C)
    ):  # as forward cached them: nothing to check or convert
        vecs = (mean, invstd, gamma, var)
    else:
        vecs = _cached_vectors(cache, vs, z, ax)  # vs[i] as arrays
    grads = _grad_dtype(vs[2], z)
    y, residual = _cached_epilogue(cache, z)
    return z, ax, vecs, False, eps_mode == "std", mode == "train", grads, y, residual


def _cached_vectors(cache, vs, z, ax):
    """The cache's per-channel vectors vs (mean, invstd, gamma, var; replaced by arrays of
    them in place) for x z with channel axis ax, checked and converted for the kernels."""
    C = z.shape[ax]
    for i, name in enumerate(_VEC_NAMES):
        v = vs[i]
        if type(v) is np.ndarray and v.dtype.kind == "f" and v.shape == (C,):
            continue  # what forward cached
        vs[i] = v = _array(name, v)
        (_real_dtype if i == 2 else _float_dtype)(name, v)
        if v.ndim != 1:
            raise ValueError("%s must be a vector of shape (C,), got shape %s" % (name, v.shape))
    n = len(vs[0])
    if n != C and all(len(v) == n for v in vs):
        # the statistics agree with each other, not with x: name x or axis, whichever moved
        there = [a for a in range(1, z.ndim) if z.shape[a] == n]
        if there:
            raise ValueError(
                "cache['axis'] is %r, but the cached statistics are for %d channels, the "
                "length of axis %d of cache['x'] (shape %s)" % (cache["axis"], n, there[0], z.shape)
            )
        raise ValueError(
            "cache['x'] has shape %s, %d channels on axis %d, but the cached statistics are "
            "for %d channels: it is not the array forward normalized" % (z.shape, C, ax, n)
        )
    return (
        _vec64(vs[0], C, z.shape, _VEC_NAMES[0]),
        _vec64(vs[1], C, z.shape, _VEC_NAMES[1]),
        _vec64(vs[2], C, z.shape, _VEC_NAMES[2], _VECTOR_DTYPES),
        _vec64(vs[3], C, z.shape, _VEC_NAMES[3]),
    )


def _cached_epilogue(cache, z):
    """(the saved output of a fused ReLU or None, whether a residual was added) of a cache
    of either kind; missing keys mean neither."""
    y = None
    if _activation(cache.get("activation")):
        if cache.get("out") is None:
            raise ValueError(
                "cache['activation'] is 'relu' but cache['out'] is None: backward takes the "
                "ReLU's mask from the output forward returned"
            )
        y = _like_x("cache['out']", cache["out"], z)
    return y, bool(cache.get("residual", False))


def _unpack(cache):
    """(z, axis, per-channel float64 (mean, scale, gamma, var; gamma may stay float32),
    xhat_form, std_mode, train, the dtype of dgamma and dbeta, the saved output of a fused
    ReLU or None, whether forward added a residual).

    z is the cached x, with mean and scale = invstd; or, for a seed-style cache, x_hat
    with mean 0 and scale = denom.  The kernels derive the coefficients from these.
    """
    if not isinstance(cache, dict):
        raise TypeError(
            "cache must be the dict returned by bnkernels.forward, got %s; a hand-written "
            "forward can return this dict instead: {'x_hat': x_hat, 'gamma': gamma, "
            "'denom': np.sqrt(var + eps)}" % type(cache).__name__
        )
    complete = cache.keys() >= _CACHE_KEY_SET
    if not complete and all(key in cache for key in _SEED_KEYS):
        # a seed-style cache, whatever else it holds (hand-written code may keep x, invstd...)
        z = _array("cache['x_hat']", cache["x_hat"])
        _float_dtype("cache['x_hat']", z)
        ax = _channel_axis(cache.get("axis", 1), z.ndim, "cache['axis']", "cache['x_hat']")
        C = z.shape[ax]
        denom = _per_channel("cache['denom']", _array("cache['denom']", cache["denom"]), C, z.shape)
        gamma = _param("cache['gamma']", cache["gamma"], C, z.shape)
        g = (
            np.ones(C)
            if gamma is None
            else _vec64(gamma, C, z.shape, "cache['gamma']", _VECTOR_DTYPES)
        )
        zeros = np.zeros(C)
        grads = _grad_dtype(gamma, z)
        y, residual = _cached_epilogue(cache, z)
        return z, ax, (zeros, _f64(denom), g, zeros), True, False, True, grads, y, residual
    if "x" in cache and "invstd" in cache:
        if not complete:
            missing = [key for key in _CACHE_KEYS if key not in cache]
            raise ValueError(
                "cache is missing %s; pass the cache bnkernels.forward returned"
                % ", ".join(map(repr, missing))
            )
        return _forward_cache(cache)
    raise ValueError(
        "cache must come from bnkernels.forward (keys %s) or be a seed-style dict "
        "with keys %s" % (", ".join(_CACHE_KEYS), ", ".join(_SEED_KEYS))
    )


class _BackwardInputs(NamedTuple):
    z: np.ndarray  # the cached x, or x_hat
    axis: int
    C: int
    # mean, scale, gamma, var: a 4-tuple so mypy can count the kernels' arguments
    vecs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    xhat_form: bool
    std_mode: bool
    train: bool
    dout: np.ndarray
    n_threads: int
    batch_count: int | None  # elements per channel of the batch of the statistics, if given
    grad_dtype: np.dtype  # of dgamma and dbeta: the parameters' dtype
    y: np.ndarray | None  # the saved output of a fused ReLU: dy is masked where y <= 0
    residual: bool  # forward added a residual: its gradient (the masked dy) is returned too


def _backward_inputs(dout, cache, num_threads, allow_empty=False) -> _BackwardInputs:
    """backward's arguments, checked; allow_empty for a part of a batch split across
    processes (an empty part still joins in)."""
    z, ax, vecs, xhat_form, std_mode, train, grad_dtype, y, residual = _unpack(cache)
    dout = _array("dout", dout)
    _float_dtype("dout", dout)
    if dout.shape != z.shape:
        raise ValueError(
            "dout has shape %s but the cached input has shape %s" % (dout.shape, z.shape)
        )
    if dout.dtype != z.dtype:
        raise TypeError(
            "dout and the cache must share one dtype, got dout %s and cache %s"
            % (dout.dtype, z.dtype)
        )
    C = z.shape[ax]
    if dout.size == 0 and not (allow_empty and C > 0):
        raise ValueError(
            "dout is empty (shape %s): batch norm needs at least one element per "
            "channel" % (dout.shape,)
        )
    count = cache.get("count") if not xhat_form else None
    nt = _n_threads(num_threads, size=dout.size)
    return _BackwardInputs(
        z, ax, C, vecs, xhat_form, std_mode, train, dout, nt, count, grad_dtype, y, residual
    )


def backward(
    dout: npt.ArrayLike,
    cache: dict[str, Any],
    *,
    num_threads: int | None = None,
) -> tuple[np.ndarray, ...]:
    """Batch normalization backward pass: the gradients of the loss for x, gamma, beta.

    Parameters
    ----------
    dout : ndarray, the shape and dtype of the forward input x
        Upstream gradient dL/dout, of the activation's output after a fused ReLU
        (then taken as 0 where the cached out <= 0).  Any strides; not modified, may
        be read-only.
        float16, float32 and float64 run the compiled kernels; longdouble runs
        :func:`bnkernels.reference.backward_alt` (a cache with ``comm``: the same closed
        form in float64).
    cache : dict
        The cache :func:`forward` (or :func:`bnkernels.reference.forward`) returned.
        Or a seed-style dict, as hand-written CS231n code can keep it:
        ``{'x_hat': x_hat, 'gamma': gamma, 'denom': np.sqrt(var + eps)}``, x_hat of
        the shape of dout, gamma (or None) and denom of shape (C,), and optionally
        ``'axis'``, the channel axis of x_hat (default 1: (N, D) and NCHW need
        none), and a fused epilogue's ``'activation'``, ``'residual'`` and ``'out'``
        as :func:`forward` records them; other keys are ignored.
    num_threads : int or None, default None
        OpenMP threads for this call.  None uses the OpenMP default, which
        ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits(n,
        user_api="openmp")`` control.  Capped at the CPUs this process may use; 1 in
        a forked process (GNU OpenMP's threads do not survive ``os.fork``).  The
        results are bitwise identical for every thread count.

    Returns
    -------
    dx : ndarray, the shape, dtype and memory layout of dout
        The gradient dL/dx.
    dgamma : ndarray, shape (C,)
        The gradient dL/dgamma, in the parameters' dtype: that of the cached gamma
        when it is floating, else (integers, None) that of dout; rounded once from
        the float64 sum, whatever that dtype (one pass either way).
    dbeta : ndarray, shape (C,), the dtype of dgamma
        The gradient dL/dbeta.  With gamma and beta None (no affine), dgamma and
        dbeta are the gradients they would have at 1 and 0.
    dresidual : ndarray, the shape, dtype and memory layout of dout
        Only when forward added a residual: its gradient, dout masked by the ReLU
        (dout itself without one), a new array.

    Raises
    ------
    TypeError
        ``cache`` is not a dict (the message shows the seed-style dict to build),
        dout is not a floating-point array, its dtype
        differs from the cached input's, an array is a masked array (numpy.ma), a
        cached value has the wrong type, or ``num_threads`` is not an int.
    ValueError
        The cache is incomplete, of neither kind or inconsistent (its statistics do
        not fit ``cache['x']`` and ``cache['axis']``), dout's shape differs from the
        cached input's, dout is empty, ``num_threads < 1``, or the cache holds the
        statistics of a larger batch (``forward(..., stats=...)``: use
        :func:`backward_reduce` and :func:`backward_apply`).

    See Also
    --------
    forward : The forward pass that makes the cache.
    bnkernels.reference.backward_graph, bnkernels.reference.backward_alt :
        The NumPy versions it is tested against.

    Notes
    -----
    Train mode, with M elements per channel and d the denominator of xhat::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma/d * (dy - dbeta/M - xhat * dgamma * k/M)

    with k = 1 for ``eps_mode='var'`` and k = d/sqrt(var) for ``'std'`` (0 where
    var = 0); dy is dout, or after a fused ReLU 0 where out <= 0 and dout elsewhere.
    Test mode (running statistics, constants of the graph): ``dx = gamma/d * dy``.
    Sums are accumulated in float64 for float32 and float16 input too.

    Examples
    --------
    >>> import numpy as np, bnkernels
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4))
    >>> out, cache = bnkernels.forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    >>> dx, dgamma, dbeta = bnkernels.backward(np.ones_like(out), cache)
    >>> dx.shape, dgamma.shape
    ((8, 3, 4, 4), (3,))
    """
    if isinstance(cache, dict) and cache.get("comm") is not None:
        from . import _distributed

        comm = cache["comm"]
        return _distributed.collectively(
            comm, "backward", _distributed.sync_backward, comm, dout, cache, num_threads
        )
    b = _backward_inputs(dout, cache, num_threads)
    if b.batch_count is not None and b.batch_count != b.dout.size // b.C:
        raise ValueError(
            "the cache holds the statistics of a batch of %d elements per channel, and dout "
            "has %d: for a batch split across processes use backward_reduce, then "
            "backward_apply with the sums of every part" % (b.batch_count, b.dout.size // b.C)
        )
    if b.dout.dtype not in _KERNEL_DTYPES:
        if b.xhat_form:  # the seed keys alone: the reference tells the kinds apart by others
            seed = {key: cache[key] for key in _SEED_KEYS + _EPILOGUE_KEYS if key in cache}
            cache = dict(seed, axis=b.axis)
        return reference.backward_alt(b.dout, cache)
    if not b.xhat_form and b.z.dtype == np.float64:
        invstd = b.vecs[1]
        if _kernels.any_between(invstd, 0.0, _TINY_INVSTD):
            scaled, factor = _rescaled(b)
            grads = _backward(scaled)
            grads[0][...] *= factor
            return grads
    return _backward(b)


def _backward(b):
    """backward of checked inputs b (a dtype of the kernels)."""
    dx, dres, lay, (zk, dyk, yk, dxk, dresk) = _backward_views(b)
    dgamma, dbeta = _grad_arrays(b)
    _kernels.backward(
        lay,
        zk,
        dyk,
        dxk,
        *b.vecs,
        b.xhat_form,
        b.std_mode,
        b.train,
        dgamma,
        dbeta,
        b.n_threads,
        yk,
        dresk,
    )
    return _backward_outputs(b, dx, dres, dxk, dresk, dgamma, dbeta)


def _backward_arrays(b):
    """The arrays a backward of checked inputs b reads, in the kernels' order: z, dy and the
    saved output of a fused ReLU."""
    return [b.z, b.dout] + ([b.y] if b.y is not None else [])


def _backward_views(b):
    """(dx, dresidual or None, layout, views (z, dy, y or None, dx, dresidual or None)) of
    checked backward inputs b: the arrays the kernels run on."""
    dx = np.empty_like(b.dout)
    dres = np.empty_like(b.dout) if b.residual else None
    inputs = _backward_arrays(b)
    lay, views = _views(inputs, b.axis, [dx] if dres is None else [dx, dres])
    yk = views[2] if b.y is not None else None
    dresk = views[-1] if dres is not None else None
    return dx, dres, lay, (views[0], views[1], yk, views[len(inputs)], dresk)


def _grad_arrays(b):
    """dgamma and dbeta for the kernels to write, rounded once from the float64 sums: in
    the parameters' dtype where the kernels store it (float16, float32, float64), else in
    float64, which _backward_outputs converts (exactly, to longdouble)."""
    dtype = b.grad_dtype if b.grad_dtype in _KERNEL_DTYPES else _F64
    return np.empty(b.C, dtype), np.empty(b.C, dtype)


def _backward_outputs(b, dx, dres, dxk, dresk, dgamma, dbeta):
    """backward's result from the kernels' output views: (dx, dgamma, dbeta), and dresidual
    when forward added a residual; dgamma and dbeta in the parameters' dtype."""
    dgamma = dgamma.astype(b.grad_dtype, copy=False)
    dbeta = dbeta.astype(b.grad_dtype, copy=False)
    _copy_back(dx, dxk, b.axis)
    if dres is None:
        return dx, dgamma, dbeta
    _copy_back(dres, dresk, b.axis)
    return dx, dgamma, dbeta, dres
