"""The public face: validate cheaply, find the layout, dispatch to the kernels.

float32 and float64 run the compiled kernels; other float dtypes (float16,
longdouble) run :mod:`bnkernels.reference`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from . import _kernels, reference
from ._layout import choose

__all__ = ["forward", "backward"]

_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_SEED_KEYS = ("x_hat", "gamma", "denom")
_CACHE_KEYS = ("x", "mean", "var", "invstd", "gamma", "eps", "eps_mode", "mode", "axis")
_CACHE_KEY_SET = frozenset(_CACHE_KEYS)
_F64 = np.dtype(np.float64)


# ---------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------


def _float_dtype(name, a):
    if a.dtype.kind != "f":
        raise TypeError(
            "%s must be a floating-point array (float32 or float64 for the compiled "
            "kernels), got dtype %s" % (name, a.dtype)
        )


def _same_dtype(names, arrays):
    dtypes = [a.dtype for a in arrays]
    if dtypes.count(dtypes[0]) != len(dtypes):
        listing = ", ".join("%s %s" % (n, d) for n, d in zip(names, dtypes))
        raise TypeError("%s must share one dtype, got %s" % (" and ".join(names), listing))


def _channel_axis(axis, ndim):
    if ndim < 2:
        raise ValueError(
            "batch norm needs an array with ndim >= 2 (batch, channels, ...), got ndim %d" % ndim
        )
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError("axis must be an int, got %r" % (axis,))
    if not -ndim <= axis < ndim:
        raise ValueError("axis %d is out of range for an array with ndim %d" % (axis, ndim))
    if axis % ndim == 0:
        raise ValueError(
            "axis 0 is the batch axis; the channel axis is 1 or -1 (or another axis > 0)"
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


def _n_threads(num_threads):
    if num_threads is None:
        return 0
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError("num_threads must be None or a positive int, got %r" % (num_threads,))
    if num_threads < 1:
        raise ValueError("num_threads must be None or >= 1, got %d" % num_threads)
    return int(num_threads)


def _vec64(v, C, shape, name, keep=(_F64,)):
    """A per-channel vector for the kernels: as it is when it already is a contiguous (C,)
    array of a dtype in ``keep`` (the vectors forward() caches), else validated and
    converted to contiguous float64.  The kernels read gamma in float32 too."""
    if type(v) is np.ndarray and v.dtype in keep and v.shape == (C,) and v.flags.c_contiguous:
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
        and running.dtype in _KERNEL_DTYPES
        and running.flags.c_contiguous
    ):
        new = _kernels.running_update(running, stat, momentum)
        if new is not None:
            return new
    return (momentum * running + (1 - momentum) * stat).astype(running.dtype, copy=False)


def _to_layout(arrays, axis):
    """Layout shared by arrays[-1] (the output, compact) and the inputs, copying inputs that
    do not fit.  Returns (layout, arrays) or (None, arrays) if even the output does not fit."""
    lay = choose(arrays, axis)
    if lay is not None:
        return lay, arrays
    out = arrays[-1]
    if choose([out], axis) is None:
        return None, arrays
    fixed = []
    for a in arrays[:-1]:
        if choose([a, out], axis) is None:
            b = np.empty_like(out)
            b[...] = a
            a = b
        fixed.append(a)
    fixed.append(out)
    return choose(fixed, axis), fixed


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
) -> tuple[np.ndarray, dict[str, Any]]:
    """Batch normalization forward pass.

    Normalizes every channel of ``x`` over all the other axes, then scales and
    shifts it: ``out = gamma * xhat + beta``.

    Parameters
    ----------
    x : ndarray, shape (N, C, ...), or channels-last (N, ..., C) with ``axis=-1``
        The batch.  float32 and float64 run the compiled kernels; float16 and
        longdouble run :mod:`bnkernels.reference` and keep their dtype.  Any
        strides (channels-last, transposed, sliced); not modified, may be read-only.
    gamma, beta : ndarray, shape (C,), the dtype of x
        Scale and shift per channel.
    bn_param : dict
        The CS231n-style parameter dict, updated in place in train mode:

        - ``'mode'``: ``'train'`` (batch statistics) or ``'test'`` (running
          statistics); required.
        - ``'eps'``: float, default 1e-5.  ``'momentum'``: float, default 0.9.
        - ``'running_mean'``, ``'running_var'``: ndarray, shape (C,); zeros when
          missing.  In train mode replaced by
          ``momentum * running + (1 - momentum) * batch_stat`` (biased batch
          variance), in the dtype they had.
        - ``'eps_mode'``: ``'var'`` (default), ``xhat = (x - mean) / sqrt(var + eps)``;
          or ``'std'``, ``xhat = (x - mean) / (sqrt(var) + eps)``.
    axis : int, default 1
        The channel axis (any axis but 0, the batch axis); every other axis is
        reduced.  1 for (N, C, ...), -1 for channels-last arrays.

    Returns
    -------
    out : ndarray, the shape, dtype and memory layout of x
        ``gamma * xhat + beta``.
    cache : dict
        What :func:`backward` needs: ``'x'`` (the input itself, not a copy), the
        per-channel statistics ``'mean'``, ``'var'``, ``'invstd'`` (float64, shape
        (C,)), ``'gamma'``, ``'eps'``, ``'eps_mode'``, ``'mode'`` and ``'axis'``
        (normalized to a non-negative int).

    Raises
    ------
    TypeError
        x, gamma or beta is not a floating-point array, their dtypes differ, or
        ``bn_param`` is not a dict.
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
    x = np.asarray(x)
    ax = _channel_axis(axis, x.ndim)
    C = x.shape[ax]
    if x.size == 0:
        raise ValueError(
            "x is empty (shape %s): batch norm needs at least one element per channel" % (x.shape,)
        )
    gamma = _per_channel("gamma", gamma, C, x.shape)
    beta = _per_channel("beta", beta, C, x.shape)
    for name, a in (("x", x), ("gamma", gamma), ("beta", beta)):
        _float_dtype(name, a)
    _same_dtype(("x", "gamma", "beta"), (x, gamma, beta))
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
    eps = float(bn_param.get("eps", 1e-5))
    if not eps >= 0:
        raise ValueError("bn_param['eps'] must be >= 0, got %r" % (eps,))
    momentum = float(bn_param.get("momentum", 0.9))
    running_mean = bn_param.get("running_mean")
    running_var = bn_param.get("running_var")
    running_mean = (
        np.zeros(C, dtype=x.dtype)
        if running_mean is None
        else _per_channel("bn_param['running_mean']", running_mean, C, x.shape)
    )
    running_var = (
        np.zeros(C, dtype=x.dtype)
        if running_var is None
        else _per_channel("bn_param['running_var']", running_var, C, x.shape)
    )

    if x.dtype not in _KERNEL_DTYPES:
        bn_param.setdefault("running_mean", running_mean)
        bn_param.setdefault("running_var", running_var)
        return reference.forward(x, gamma, beta, bn_param, axis=ax)

    train = mode == "train"
    std_mode = eps_mode == "std"
    if train:
        mean = np.empty(C)
        var = np.empty(C)
        invstd = np.empty(C)
    else:
        mean = _f64(running_mean)
        var = _f64(running_var)
        invstd = 1.0 / (np.sqrt(var) + eps if std_mode else np.sqrt(var + eps))
    out = np.empty_like(x)
    lay, (xk, outk) = _to_layout([x, out], ax)
    if lay is None:
        xk, outk = _standard(x, ax), np.empty(np.moveaxis(x, ax, 1).shape, x.dtype)
        lay = choose([xk, outk], 1)
    _kernels.forward(
        lay, xk, outk, train, eps, std_mode, _f64(gamma), _f64(beta), mean, var, invstd, 0
    )
    if outk is not out:
        np.moveaxis(out, ax, 1)[...] = outk

    if train:
        bn_param["running_mean"] = _running(running_mean, mean, momentum)
        bn_param["running_var"] = _running(running_var, var, momentum)
    cache = {
        "x": x,
        "mean": mean,
        "var": var,
        "invstd": invstd,
        "gamma": gamma,
        "eps": eps,
        "eps_mode": eps_mode,
        "mode": mode,
        "axis": ax,
    }
    return out, cache


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------


def _unpack(cache):
    """(z, axis, per-channel float64 (mean, scale, gamma, var), xhat_form, std_mode, train).

    z is the cached x, with mean and scale = invstd; or, for a seed-style cache, x_hat
    with mean 0 and scale = denom.  The kernels derive the coefficients from these.
    """
    if not isinstance(cache, dict):
        raise TypeError(
            "cache must be the dict returned by bnkernels.forward, got %s" % type(cache).__name__
        )
    if "x" in cache and "invstd" in cache:
        if not cache.keys() >= _CACHE_KEY_SET:
            missing = [key for key in _CACHE_KEYS if key not in cache]
            raise ValueError(
                "cache is missing %s; pass the cache bnkernels.forward returned"
                % ", ".join(map(repr, missing))
            )
        z = np.asarray(cache["x"])
        _float_dtype("cache['x']", z)
        ax = _channel_axis(cache["axis"], z.ndim)
        C = z.shape[ax]
        vecs = (
            _vec64(cache["mean"], C, z.shape, "cache['mean']"),
            _vec64(cache["invstd"], C, z.shape, "cache['invstd']"),
            _vec64(cache["gamma"], C, z.shape, "cache['gamma']", _KERNEL_DTYPES),
            _vec64(cache["var"], C, z.shape, "cache['var']"),
        )
        return (z, ax, vecs, False, cache["eps_mode"] == "std", cache["mode"] == "train")
    if all(key in cache for key in _SEED_KEYS):
        z = np.asarray(cache["x_hat"])
        _float_dtype("cache['x_hat']", z)
        if z.ndim != 2:
            raise ValueError(
                "a seed-style cache holds a (N, D) batch; cache['x_hat'] has shape %s" % (z.shape,)
            )
        C = z.shape[1]
        denom = _f64(_per_channel("cache['denom']", cache["denom"], C, z.shape))
        gamma = _f64(_per_channel("cache['gamma']", cache["gamma"], C, z.shape))
        zeros = np.zeros(C)
        return z, 1, [zeros, denom, gamma, zeros], True, False, True
    raise ValueError(
        "cache must come from bnkernels.forward (keys %s) or be a seed-style dict "
        "with keys %s" % (", ".join(_CACHE_KEYS), ", ".join(_SEED_KEYS))
    )


def backward(
    dout: npt.ArrayLike,
    cache: dict[str, Any],
    *,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch normalization backward pass: the gradients of the loss for x, gamma, beta.

    Parameters
    ----------
    dout : ndarray, the shape and dtype of the forward input x
        Upstream gradient dL/dout.  Any strides; not modified, may be read-only.
        float32 and float64 run the compiled kernels; float16 and longdouble run
        :func:`bnkernels.reference.backward_alt`.
    cache : dict
        The cache :func:`forward` (or :func:`bnkernels.reference.forward`) returned.
        Or a seed-style dict for a (N, D) batch, as hand-written CS231n code keeps
        it: ``'x_hat'`` (shape (N, D)), ``'gamma'`` and ``'denom'``
        (= ``sqrt(var + eps)``), both shape (D,); other keys are ignored.
    num_threads : int or None, default None
        OpenMP threads for this call.  None uses the OpenMP default, which
        ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits(n,
        user_api="openmp")`` control.  The results are bitwise identical for every
        thread count.

    Returns
    -------
    dx : ndarray, the shape, dtype and memory layout of dout
        The gradient dL/dx.
    dgamma : ndarray, shape (C,), the dtype of dout
        The gradient dL/dgamma.
    dbeta : ndarray, shape (C,), the dtype of dout
        The gradient dL/dbeta.

    Raises
    ------
    TypeError
        ``cache`` is not a dict, dout is not a floating-point array, its dtype
        differs from the cached input's, or ``num_threads`` is not an int.
    ValueError
        The cache is incomplete or of neither kind, dout's shape differs from the
        cached input's, dout is empty, or ``num_threads < 1``.

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
    var = 0).  Test mode (running statistics, constants of the graph):
    ``dx = gamma/d * dy``.  Sums are accumulated in float64 for float32 input too.

    Examples
    --------
    >>> import numpy as np, bnkernels
    >>> x = np.random.default_rng(0).standard_normal((8, 3, 4, 4))
    >>> out, cache = bnkernels.forward(x, np.ones(3), np.zeros(3), {"mode": "train"})
    >>> dx, dgamma, dbeta = bnkernels.backward(np.ones_like(out), cache)
    >>> dx.shape, dgamma.shape
    ((8, 3, 4, 4), (3,))
    """
    # mean, scale, gamma, var: typed as a 4-tuple so mypy can count the kernels' arguments
    vecs: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    z, ax, vecs, xhat_form, std_mode, train = _unpack(cache)
    dout = np.asarray(dout)
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
    if dout.size == 0:
        raise ValueError(
            "dout is empty (shape %s): batch norm needs at least one element per "
            "channel" % (dout.shape,)
        )
    nt = _n_threads(num_threads)
    if dout.dtype not in _KERNEL_DTYPES:
        return reference.backward_alt(dout, cache)

    C = z.shape[ax]
    dx = np.empty_like(dout)
    dgamma = np.empty(C, dtype=dout.dtype)
    dbeta = np.empty(C, dtype=dout.dtype)
    lay, (zk, dyk, dxk) = _to_layout([z, dout, dx], ax)
    if lay is None:
        zk, dyk = _standard(z, ax), _standard(dout, ax)
        dxk = np.empty_like(dyk)
        lay = choose([zk, dyk, dxk], 1)
    _kernels.backward(lay, zk, dyk, dxk, *vecs, xhat_form, std_mode, train, dgamma, dbeta, nt)
    if dxk is not dx:
        np.moveaxis(dx, ax, 1)[...] = dxk
    return dx, dgamma, dbeta
