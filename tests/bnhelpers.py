"""Shared helpers for the bnkernels tests: data, layouts, tolerances, gradients, threads."""

import contextlib
import ctypes
import os

import numpy as np

import bnkernels

KERNEL_DTYPES = (np.float32, np.float64)

# per-dtype relative tolerance for kernels vs the float64 reference; the absolute
# tolerance is this times the largest magnitude of the expected array
RTOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-10}


def channel_shape(ndim, axis, C):
    shape = [1] * ndim
    shape[axis] = C
    return tuple(shape)


def make_inputs(shape, axis=1, dtype=np.float64, seed=0, offset=1.0, scale=2.0):
    """x, gamma, beta, dout for one shape; x is shifted and scaled per channel."""
    rng = np.random.default_rng(seed)
    axis = axis % len(shape)
    C = shape[axis]
    bs = channel_shape(len(shape), axis, C)
    mu = rng.uniform(-offset, offset, C).reshape(bs)
    sd = rng.uniform(0.5, 1.5, C).reshape(bs) * scale
    x = (rng.standard_normal(shape) * sd + mu).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, C) * rng.choice([-1.0, 1.0], C)
    beta = rng.standard_normal(C)
    dout = rng.standard_normal(shape).astype(dtype)
    return x, gamma.astype(dtype), beta.astype(dtype), dout


def rel_error(a, b):
    """max(|a - b| / max(1e-8, |a| + |b|)), the CS231n gradient-check error."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))


def numerical_gradient(f, a, h=1e-5):
    """Centered differences of the scalar f() with respect to every entry of a (in place)."""
    grad = np.zeros(a.shape, dtype=np.float64)
    it = np.nditer(a, flags=["multi_index"], op_flags=["readwrite"])
    for _ in it:
        ix = it.multi_index
        old = a[ix]
        a[ix] = old + h
        fp = f()
        a[ix] = old - h
        fm = f()
        a[ix] = old
        grad[ix] = (fp - fm) / (2 * h)
    return grad


def assert_close(got, want, dtype=None, rtol=None, what=""):
    """got (kernel, any float dtype) against want (a float64 computation)."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, "%s: shape %s != %s" % (what, got.shape, want.shape)
    if rtol is None:
        rtol = RTOL[np.dtype(dtype if dtype is not None else got.dtype)]
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    atol = rtol * max(scale, 1e-30)
    g64 = got.astype(np.float64)
    bad = ~(np.abs(g64 - want) <= atol + rtol * np.abs(want))
    if np.any(bad):
        idx = np.argwhere(bad)[0]
        err = float(np.max(np.abs(g64 - want)))
        raise AssertionError(
            "%s: %d of %d entries differ beyond rtol=%g atol=%g; max abs err %g (scale %g); "
            "first at %s: got %r want %r"
            % (
                what,
                int(bad.sum()),
                bad.size,
                rtol,
                atol,
                err,
                scale,
                tuple(idx),
                g64[tuple(idx)],
                want[tuple(idx)],
            )
        )


def stride_order(a):
    """Axes sorted from the largest |stride| to the smallest (ties by axis), size-1 axes dropped."""
    axes = [i for i in range(a.ndim) if a.shape[i] > 1]
    return sorted(axes, key=lambda i: (-abs(a.strides[i]), i))


# ---------------------------------------------------------------------------
# memory layouts holding given values
# ---------------------------------------------------------------------------

LAYOUTS = (
    "c",  # C-contiguous
    "fortran",  # Fortran order
    "channels_last",  # the channel axis innermost in memory, same logical shape
    "sliced_channels",  # every other channel of a twice-as-wide array
    "sliced_batch",  # every other sample of a twice-as-long batch
    "reversed_batch",  # negative stride on axis 0
    "reversed_last",  # negative stride on the last axis
    "channels_outer",  # channel axis outermost in memory (no foldable layout)
)


def as_layout(a, layout, axis=1):
    """A view holding the values of ``a`` with the given memory layout."""
    axis = axis % a.ndim
    if layout == "c":
        return np.ascontiguousarray(a)
    if layout == "fortran":
        return np.asfortranarray(a)
    if layout == "channels_last":
        order = [i for i in range(a.ndim) if i != axis] + [axis]
        base = np.ascontiguousarray(np.transpose(a, order))
        return np.transpose(base, np.argsort(order))
    if layout == "channels_outer":
        order = [axis] + [i for i in range(a.ndim) if i != axis]
        base = np.ascontiguousarray(np.transpose(a, order))
        return np.transpose(base, np.argsort(order))
    if layout == "sliced_channels":
        shape = list(a.shape)
        shape[axis] *= 2
        base = np.full(shape, np.nan, dtype=a.dtype)
        sl = [slice(None)] * a.ndim
        sl[axis] = slice(None, None, 2)
        base[tuple(sl)] = a
        return base[tuple(sl)]
    if layout == "sliced_batch":
        shape = list(a.shape)
        shape[0] *= 2
        base = np.full(shape, np.nan, dtype=a.dtype)
        base[::2] = a
        return base[::2]
    if layout == "reversed_batch":
        return np.ascontiguousarray(a[::-1])[::-1]
    if layout == "reversed_last":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    raise ValueError(layout)


# ---------------------------------------------------------------------------
# OpenMP thread limits for forward (which has no num_threads argument)
# ---------------------------------------------------------------------------


def _loaded_openmp():
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "/" in line}
    for p in sorted(paths):
        name = os.path.basename(p)
        if name.startswith(("libgomp", "libomp", "libiomp")):
            return ctypes.CDLL(p)
    raise RuntimeError("no OpenMP runtime is loaded in this process")


@contextlib.contextmanager
def openmp_threads(n):
    """Limit OpenMP to n threads: threadpoolctl when installed, else the runtime itself."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n, user_api="openmp"):
            yield
        return
    lib = _loaded_openmp()
    old = lib.omp_get_max_threads()
    lib.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        lib.omp_set_num_threads(old)


def train_param(**kw):
    p = {"mode": "train"}
    p.update(kw)
    return p


def reference64(x, gamma, beta, bn_param, dout, axis=1):
    """Reference forward and both backwards on float64 copies."""
    x64 = np.array(x, dtype=np.float64)
    p = dict(bn_param)
    for key in ("running_mean", "running_var"):
        if p.get(key) is not None:
            p[key] = np.array(p[key], dtype=np.float64)
    out, cache = bnkernels.reference.forward(
        x64, np.asarray(gamma, np.float64), np.asarray(beta, np.float64), p, axis=axis
    )
    dy = np.array(dout, dtype=np.float64)
    return (
        out,
        cache,
        p,
        bnkernels.reference.backward_alt(dy, cache),
        bnkernels.reference.backward_graph(dy, cache),
    )


def bits(a):
    """The bits of a as unsigned integers of its itemsize (bytes, on a last axis, for other
    itemsizes: longdouble), so that -0.0 and +0.0 and NaN payloads count as different."""
    a = np.ascontiguousarray(a)
    if a.itemsize in (1, 2, 4, 8):
        return a.view(np.dtype("u%d" % a.itemsize))
    return a.view(np.uint8).reshape(a.shape + (a.itemsize,))


def seed_forward(x, gamma, beta, eps=1e-5):
    """The forward pass of seed note 000 for (N, D) x, as hand-written CS231n code has it:
    out and its dict cache, computed in the dtype of x."""
    sample_mean = np.mean(x, axis=0)
    sample_var = np.var(x, axis=0)
    denom = np.sqrt(sample_var + eps)
    x_hat = (x - sample_mean) / denom
    out = gamma * x_hat + beta
    cache = {
        "x_hat": x_hat,
        "mu": sample_mean,
        "var": sample_var,
        "denom": denom,
        "gamma": gamma,
        "beta": beta,
        "x": x,
    }
    return out, cache


def exact_dx(x, dy, cache, sums, axis, eps_mode, train):
    """The exact dx = a*dy + b*xhat + c of the kernels' float64 statistics (cache) and sums
    (backward_reduce's), in longdouble, with |a*dy| + |b*xhat| + |c|."""
    L = np.longdouble
    C = x.shape[axis]
    bshape = channel_shape(x.ndim, axis, C)
    M = L(x.size // C)
    r = cache["invstd"].astype(L).reshape(bshape)
    a = cache["gamma"].astype(L).reshape(bshape) * r
    mean = cache["mean"].astype(L).reshape(bshape)
    zm = x.astype(L) - mean
    dyl = dy.astype(L)
    if not train:
        return a * dyl, np.abs(a * dyl)
    sum_dy, sum_dy_zm = (s.astype(L).reshape(bshape) for s in sums)
    var = cache["var"].astype(L).reshape(bshape)
    s = r if eps_mode == "var" else 1 / np.sqrt(var)  # d(invstd)/d(var) over invstd**2
    c = -a * sum_dy / M
    bz = -a * s * sum_dy_zm / M * r  # b*xhat = bz*(z - mean)
    terms = np.abs(a * dyl) + np.abs(bz * zm) + np.abs(c)
    return a * dyl + c + bz * zm, terms
