"""Pure NumPy batch normalization: the oracle the compiled kernels are tested against.

This module never imports the compiled kernels. It follows the conventions of the
CS231n assignment: a ``bn_param`` dict, a cache dict, channel axis ``axis`` (every
other axis is reduced).  Arithmetic runs in the input dtype, as hand-written NumPy
code does (float16 input is computed in float32 and rounded back); the backward runs
in the cached gamma's dtype where that is wider, and gives dgamma and dbeta in it
(the parameters' dtype: float32 parameters of float16 data get float32 gradients).
gamma=None and beta=None stand for 1 and 0.

A fused epilogue may follow the normalization, as in a conv-bn-relu block or a residual
block's bn-add-relu: an optional residual of x's shape is added and an optional ReLU
applied, both in the work dtype before the final rounding.

Functions
---------
forward(x, gamma, beta, bn_param, *, axis=1, activation=None, residual=None) -> (out, cache)
backward_graph(dout, cache) -> (dx, dgamma, dbeta) or (dx, dgamma, dbeta, dresidual)
    the staged computational-graph backward, gate by gate
backward_alt(dout, cache) -> (dx, dgamma, dbeta) or (dx, dgamma, dbeta, dresidual)
    the simplified closed form

Math, per channel with M reduced elements, mean mu and biased variance var:

    eps_mode 'var':  xhat = (x - mu) / sqrt(var + eps)
    eps_mode 'std':  xhat = (x - mu) / (sqrt(var) + eps)
    out    = act(gamma * xhat + beta + residual)
    dy     = 0 where out <= 0 else dout    (activation 'relu'; dy = dout without it)
    dresidual = dy
    dbeta  = sum(dy)
    dgamma = sum(dy * xhat)
    dx     = gamma / d * (dy - dbeta/M - xhat * dgamma * k / M)

with d the denominator of xhat and k = 1 ('var') or k = d / sqrt(var) ('std';
k = 0 where var = 0, the subgradient of sqrt at 0).  In 'test' mode mu and var
are the running statistics, constants of the graph, and dx = gamma / d * dy.

The residual term is absent without a residual, act the identity without an activation.
ReLU is ``0 where v <= 0 else v``: NaN propagates (NaN <= 0 is false) and -0.0 becomes
+0.0.  Its gradient is masked by the saved output, as PyTorch's threshold_backward: 0
where out <= 0 (the kink, where the output is exactly 0, and below), dout where out > 0
or out is NaN.
"""

import numpy as np

__all__ = ["forward", "backward_graph", "backward_alt"]

EPS_MODES = ("var", "std")
ACTIVATIONS = (None, "relu")


def _work_dtype(dtype):
    # float16 sums lose too much; everything else is computed in its own dtype
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def _bshape(ndim, axis, c):
    shape = [1] * ndim
    shape[axis] = c
    return tuple(shape)


def _param_dtype(x, gamma, beta):
    # the floating dtypes among gamma and beta, promoted; x's when neither is floating
    floating = [np.asarray(p).dtype for p in (gamma, beta) if p is not None]
    floating = [d for d in floating if d.kind == "f"]
    return np.result_type(*floating) if floating else x.dtype


def _grad_dtype(gamma, dout):
    # dgamma and dbeta: the dtype of the cached gamma when floating, else that of dout
    return gamma.dtype if gamma is not None and gamma.dtype.kind == "f" else dout.dtype


def _check_activation(activation, name="activation"):
    # None or one of the names; only strings are compared, so an array is refused, not broadcast
    if not (activation is None or (isinstance(activation, str) and activation in ACTIVATIONS)):
        raise ValueError("%s must be None or 'relu', got %r" % (name, activation))
    return activation


def _relu(v):
    # 0 where v <= 0: NaN stays NaN (the comparison is false), -0.0 becomes +0.0
    return np.where(v <= 0, v.dtype.type(0), v)


def _relu_gate(dout, out):
    # the gradient through the ReLU, masked by its saved output: 0 at and below the
    # kink, dout where out > 0 or out is NaN (PyTorch's threshold_backward)
    return np.where(np.asarray(out) <= 0, dout.dtype.type(0), dout)


def _epilogue(cache):
    """The fused epilogue a cache records: (activation, residual, out).

    Caches without the keys (hand-built ones, seed-style ones) have none: None, False, None.
    """
    activation = _check_activation(cache.get("activation"), "cache['activation']")
    out = cache.get("out")
    if activation == "relu" and out is None:
        raise ValueError("cache['activation'] is 'relu' but cache['out'] is None")
    return activation, bool(cache.get("residual", False)), out


def _denominator(var, eps, eps_mode):
    if eps_mode == "var":
        return np.sqrt(var + eps)
    return np.sqrt(var) + eps


def forward(x, gamma, beta, bn_param, *, axis=1, activation=None, residual=None):
    """Batch normalization forward pass in NumPy; the contract of :func:`bnkernels.forward`.

    Arithmetic runs in the dtype of ``x`` (float16 in float32, rounded back), the
    residual add and the ReLU included, and nothing is validated beyond ``'mode'``,
    ``'eps_mode'`` and ``activation``: this is the oracle, kept as plain as
    hand-written NumPy code.

    Parameters
    ----------
    x : ndarray, shape (N, C, ...), or channels-last (N, ..., C) with ``axis=-1``
        Any floating dtype, any strides.
    gamma, beta : ndarray, shape (C,), any real dtype, or None (1 and 0)
        Scale and shift per channel, cast to the work dtype.  The parameters' dtype is
        that of the floating ones among them, promoted (x's if neither is floating).
    bn_param : dict
        ``'mode'`` (``'train'`` or ``'test'``, required), ``'eps'`` (1e-5),
        ``'momentum'`` (0.9), ``'eps_mode'`` (``'var'`` or ``'std'``),
        ``'running_mean'`` and ``'running_var'`` (shape (C,); when missing, zeros of
        the wider of x's and the parameters' dtypes), ``'num_batches_tracked'`` (0).
        In train mode the running statistics are replaced by
        ``momentum * running + (1 - momentum) * batch_stat`` (biased variance), or
        with ``momentum=None`` by ``running + (batch_stat - running) / n``, n the
        batches seen; ``'num_batches_tracked'`` counts the batch either way.
    axis : int, default 1
        The channel axis; every other axis is reduced.
    activation : None or 'relu', default None
        Applied last: ``relu(v) = 0 where v <= 0 else v`` (NaN propagates, -0.0
        becomes +0.0); None is the identity.
    residual : ndarray of x's shape and dtype, or None
        Added to ``gamma * xhat + beta`` before the activation, in the work dtype; any
        strides.  Not validated here (a broadcastable shape would broadcast).

    Returns
    -------
    out : ndarray, the shape and dtype of x
        ``act(gamma * xhat + beta + residual)``, the residual term absent when None.
    cache : dict
        ``'x'`` (the input, not a copy), ``'mean'``, ``'var'``, ``'invstd'`` (shape
        (C,), the work dtype), ``'gamma'`` (in the parameters' dtype; ones for None),
        ``'eps'``, ``'eps_mode'``, ``'mode'``,
        ``'axis'`` (non-negative), ``'activation'`` (None or ``'relu'``),
        ``'residual'`` (bool: whether a residual was added) and ``'out'`` (the
        returned ``out`` itself, not a copy, with ``activation='relu'``, whose mask
        the backward needs; None otherwise).  Accepted by :func:`bnkernels.backward`
        too.

    Raises
    ------
    KeyError
        ``bn_param`` has no ``'mode'``.
    ValueError
        ``'mode'``, ``'eps_mode'`` or ``activation`` has an unknown value.
    """
    x = np.asarray(x)
    axis = axis % x.ndim
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    eps_mode = bn_param.get("eps_mode", "var")
    if mode not in ("train", "test"):
        raise ValueError("bn_param['mode'] must be 'train' or 'test', got %r" % (mode,))
    if eps_mode not in EPS_MODES:
        raise ValueError("bn_param['eps_mode'] must be 'var' or 'std', got %r" % (eps_mode,))
    _check_activation(activation)
    c = x.shape[axis]
    wt = _work_dtype(x.dtype)
    red = tuple(i for i in range(x.ndim) if i != axis)
    bs = _bshape(x.ndim, axis, c)
    xw = x.astype(wt, copy=False)
    pdtype = _param_dtype(x, gamma, beta)
    gamma = np.ones(c, pdtype) if gamma is None else np.asarray(gamma).astype(pdtype)
    beta = np.zeros(c, pdtype) if beta is None else np.asarray(beta)
    running_mean = bn_param.get("running_mean")
    running_var = bn_param.get("running_var")
    if running_mean is None:
        running_mean = np.zeros(c, dtype=np.result_type(x.dtype, pdtype))
    if running_var is None:
        running_var = np.zeros(c, dtype=np.result_type(x.dtype, pdtype))

    if mode == "train":
        mean = xw.mean(axis=red)
        var = ((xw - mean.reshape(bs)) ** 2).mean(axis=red)
        n = (bn_param.get("num_batches_tracked") or 0) + 1
        for key, running, stat in (
            ("running_mean", running_mean, mean),
            ("running_var", running_var, var),
        ):
            running = np.asarray(running)
            if running.dtype.kind != "f":  # integer running statistics are never truncated
                running = running.astype(np.result_type(x.dtype, pdtype))
            stat = stat.astype(running.dtype)
            if momentum is None:  # the cumulative average of the n batches seen
                bn_param[key] = running + (stat - running) / n
            else:
                bn_param[key] = momentum * running + (1 - momentum) * stat
        bn_param["num_batches_tracked"] = n
    else:
        mean = np.asarray(running_mean, dtype=wt)
        var = np.asarray(running_var, dtype=wt)
    invstd = 1 / _denominator(var, wt.type(eps), eps_mode)
    xhat = (xw - mean.reshape(bs)) * invstd.reshape(bs)
    out = np.asarray(gamma, dtype=wt).reshape(bs) * xhat + np.asarray(beta, dtype=wt).reshape(bs)
    if residual is not None:
        out = out + np.asarray(residual).astype(wt, copy=False)
    if activation == "relu":
        out = _relu(out)
    out = out.astype(x.dtype, copy=False)
    cache = {
        "x": x,
        "mean": mean,
        "var": var,
        "invstd": invstd,
        "gamma": gamma,
        "eps": eps,
        "eps_mode": eps_mode,
        "mode": mode,
        "axis": axis,
        "activation": activation,
        "residual": residual is not None,
        # backward masks with the output itself: held by reference, never copied
        "out": out if activation == "relu" else None,
    }
    return out, cache


def _unpack(dout, cache):
    """Normalize a forward() cache or a seed-style dict cache.

    Returns (wt, grads, axis, red, bs, M, train, eps_mode, gamma, xmu, xhat, denom, var):
    arrays in the work dtype, per-channel ones shaped to broadcast; grads is the dtype of
    dgamma and dbeta.
    """
    dout = np.asarray(dout)
    gamma = cache["gamma"]
    gamma = None if gamma is None else np.asarray(gamma)
    grads = _grad_dtype(gamma, dout)
    wt = _work_dtype(np.result_type(dout.dtype, grads))
    if "x_hat" in cache and "invstd" not in cache:
        # seed style: x_hat, gamma, denom = sqrt(var + eps), the channels on 'axis' (1)
        xhat = np.asarray(cache["x_hat"], dtype=wt)
        axis = cache.get("axis", 1) % xhat.ndim
        c = xhat.shape[axis]
        bs = _bshape(xhat.ndim, axis, c)
        denom = np.asarray(cache["denom"], dtype=wt).reshape(bs)
        xmu = xhat * denom
        var = None
        train, eps_mode = True, "var"
    else:
        x = np.asarray(cache["x"], dtype=wt)
        axis = cache["axis"] % x.ndim
        c = x.shape[axis]
        bs = _bshape(x.ndim, axis, c)
        train = cache["mode"] == "train"
        eps_mode = cache["eps_mode"]
        var = np.asarray(cache["var"], dtype=wt).reshape(bs)
        denom = _denominator(var, wt.type(cache["eps"]), eps_mode)
        xmu = x - np.asarray(cache["mean"], dtype=wt).reshape(bs)
        xhat = xmu / denom
    gamma = np.ones(bs, wt) if gamma is None else gamma.astype(wt).reshape(bs)
    red = tuple(i for i in range(xhat.ndim) if i != axis)
    m = xhat.size // c
    return wt, grads, axis, red, bs, m, train, eps_mode, gamma, xmu, xhat, denom, var


def backward_graph(dout, cache):
    """Batch normalization backward through the staged computational graph, gate by gate.

    The way the CS231n notes build it: every node of the forward graph (per channel,
    broadcast over the reduced axes) gets its upstream gradient in turn::

        xmu = x - mu;  var = mean(xmu**2);  denom = sqrt(var + eps) or sqrt(var) + eps;
        invd = 1/denom;  xhat = xmu * invd;  y = gamma * xhat + beta;
        s = y + residual;  out = relu(s)

    The fused epilogue's gates come first: the ReLU passes dout where it fired (out > 0,
    or NaN) and 0 elsewhere; the add hands the same gradient to both its inputs, y and
    the residual.

    Parameters
    ----------
    dout : ndarray, the shape of the cached input
        Upstream gradient dL/dout of the activation's output, any floating dtype;
        arithmetic runs in its dtype, or the cached gamma's if wider (float16 in float32).
    cache : dict
        The cache :func:`forward` or :func:`bnkernels.forward` returned, or a
        seed-style dict: ``'x_hat'`` (the shape of dout), ``'gamma'`` (or None) and
        ``'denom'`` (= ``sqrt(var + eps)``), both shape (C,), and optionally
        ``'axis'``, the channel axis of x_hat (default 1).  ``'activation'``,
        ``'residual'`` and ``'out'`` describe the fused epilogue; missing, they mean
        None, False and None (none).

    Returns
    -------
    dx : ndarray, the shape and dtype of dout
        The gradient dL/dx.
    dgamma, dbeta : ndarray, shape (C,)
        The gradients dL/dgamma and dL/dbeta, in the dtype of the cached gamma when
        it is floating, else in that of dout.
    dresidual : ndarray, the shape and dtype of dout; only when ``cache['residual']``
        The gradient dL/dresidual: dout after the ReLU's mask, a new array (never
        dout itself).

    See Also
    --------
    backward_alt : The same gradients from the simplified closed form.
    """
    dtype = np.asarray(dout).dtype
    activation, residual, out = _epilogue(cache)
    wt, grads, axis, red, bs, m, train, eps_mode, gamma, xmu, xhat, denom, var = _unpack(
        dout, cache
    )
    ds = np.asarray(dout, dtype=wt)
    if activation == "relu":
        ds = _relu_gate(ds, out)  # out = relu(s)
    dy = ds  # s = y + residual: the add gate copies the gradient to y ...
    dresidual = ds  # ... and to the residual

    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    dxhat = dy * gamma
    invd = 1 / denom
    dxmu = dxhat * invd  # through xhat = xmu * invd, first branch
    if train:
        dinvd = (dxhat * xmu).sum(axis=red).reshape(bs)  # xhat = xmu * invd, second branch
        ddenom = -dinvd / denom**2  # invd = 1 / denom
        if eps_mode == "var":
            dvar = 0.5 * ddenom / denom  # denom = sqrt(var + eps)
        else:
            std = np.sqrt(var)  # denom = std + eps;  std = sqrt(var)
            with np.errstate(divide="ignore", invalid="ignore"):
                dvar = np.where(std > 0, 0.5 * ddenom / std, 0)
        dsq = dvar / m  # var = mean(sq)
        dxmu = dxmu + 2 * xmu * dsq  # sq = xmu**2, branches add
        dmu = -dxmu.sum(axis=red).reshape(bs)  # xmu = x - mu
        dx = dxmu + dmu / m  # mu = mean(x), branches add
    else:
        dx = dxmu
    return _gradients(dtype, grads, dx, dgamma, dbeta, dresidual if residual else None)


def backward_alt(dout, cache):
    """Batch normalization backward from the simplified closed form.

    Per channel, with M reduced elements and d the denominator of xhat, train mode::

        dx = gamma/d * (dy - sum(dy)/M - xhat * sum(dy*xhat) * k/M)

    with k = 1 for ``eps_mode='var'`` and k = d/sqrt(var) for ``'std'`` (0 where
    var = 0); test mode: ``dx = gamma/d * dy``.  After a fused epilogue dy is dout
    masked by the ReLU's saved output, ``dy = 0 where out <= 0 else dout`` (dout
    without an activation), and ``dresidual = dy``.

    Parameters and returns are those of :func:`backward_graph`.

    See Also
    --------
    backward_graph : The same gradients, gate by gate.
    bnkernels.backward : The compiled version.
    """
    dtype = np.asarray(dout).dtype
    activation, residual, out = _epilogue(cache)
    wt, grads, axis, red, bs, m, train, eps_mode, gamma, xmu, xhat, denom, var = _unpack(
        dout, cache
    )
    dy = np.asarray(dout, dtype=wt)
    if activation == "relu":
        dy = _relu_gate(dy, out)

    dbeta = dy.sum(axis=red)
    dgamma = (dy * xhat).sum(axis=red)
    if not train:
        dx = gamma / denom * dy
    else:
        if eps_mode == "var":
            k = 1
        else:
            std = np.sqrt(var)
            with np.errstate(divide="ignore", invalid="ignore"):
                k = np.where(std > 0, denom / std, 0)
        dx = gamma / (m * denom) * (m * dy - dbeta.reshape(bs) - xhat * (dgamma.reshape(bs) * k))
    return _gradients(dtype, grads, dx, dgamma, dbeta, dy if residual else None)


def _gradients(dtype, grads, dx, dgamma, dbeta, dresidual):
    """(dx, dgamma, dbeta[, dresidual]): dx and dresidual in dout's dtype, dgamma and dbeta
    in ``grads``; dresidual, when there is one, always a new array (astype copies), never
    dout itself."""
    grad = (dx.astype(dtype, copy=False), dgamma.astype(grads), dbeta.astype(grads))
    if dresidual is not None:
        grad += (dresidual.astype(dtype),)
    return grad
