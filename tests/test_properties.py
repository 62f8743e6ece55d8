"""Property-based comparison of the compiled kernels with the NumPy reference.

Random ndim, shapes (with size-1 dims), channel axis, dtype, memory layout
(permuted memory order incl. channels-last, stepped slices, negative strides),
eps mode and train/test mode.  The reference runs in float64 on the same input
values, so the tolerances only have to absorb the final rounding to the input
dtype and a different summation order.

Profiles (environment variable BNKERNELS_HYPOTHESIS_PROFILE):
  quick (default)  a few hundred examples in all, derandomized: same run every time
  long             thousands of examples per test, random seeds
  asan             few examples, for the sanitizer build (it is ~10x slower)
"""

import os

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import bnkernels
from bnkernels import reference
from bnkernels._layout import choose

settings.register_profile(
    "bnkernels.quick",
    max_examples=300,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "bnkernels.long",
    max_examples=5000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "bnkernels.asan",
    max_examples=25,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile(
    "bnkernels." + os.environ.get("BNKERNELS_HYPOTHESIS_PROFILE", "quick")
)

# error allowed, as a fraction of the magnitude of the terms that make up a value
TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-11}

# size limits per ndim keep an example (with a stepped base up to 2**ndim larger) small
MAX_DIM = {2: 48, 3: 14, 4: 7, 5: 5}
MIN_PLANE = 512  # elements per (n, c) plane from which NCHW-like arrays run the planar kernel
# (planes of 128..511 elements need 64 rows to run as rows; the examples stay below 128)
MIN_ROWS = 16  # and below it, how many rows (n) they need to run as rows of C*L columns


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------


@st.composite
def layouts(draw, ndim, axis):
    """(perm, steps, flips): memory order of the axes, slice step and reversal per axis."""
    kind = draw(st.sampled_from(["contiguous", "channels_last", "any"]))
    if kind == "contiguous":
        return tuple(range(ndim)), (1,) * ndim, (False,) * ndim
    perm = list(draw(st.permutations(range(ndim))))
    if kind == "channels_last":
        perm.remove(axis)
        perm.append(axis)
    steps = tuple(draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=ndim, max_size=ndim)))
    flips = tuple(draw(st.lists(st.booleans(), min_size=ndim, max_size=ndim)))
    return tuple(perm), steps, flips


def make_array(rng, shape, layout, dtype, loc=0.0, scale=1.0):
    """A view of ``shape`` whose strides follow ``layout``; values ~ N(loc, scale)."""
    perm, steps, flips = layout
    base = rng.normal(loc, scale, [shape[p] * steps[p] for p in perm]).astype(dtype)
    view = base.transpose(np.argsort(perm))  # memory axis j is logical axis perm[j]
    view = view[tuple(slice(None, None, -s if f else s) for s, f in zip(steps, flips))]
    assert view.shape == tuple(shape)
    return view


@st.composite
def problems(draw):
    dtype = np.dtype(draw(st.sampled_from([np.float32, np.float64])))
    ndim = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, MAX_DIM[ndim])) for _ in range(ndim)]
    axis = draw(st.integers(1, ndim - 1))
    size = draw(st.sampled_from(["small", "small", "many_channels", "big_planes", "small_planes"]))
    if size == "many_channels":
        # past one channel block (32 float64 / 64 float32 channels) and ragged
        shape[axis] = draw(st.integers(1, 70))
        for i in range(ndim):
            if i != axis:
                shape[i] = min(shape[i], 3)
    elif size == "big_planes" and axis < ndim - 1:
        # planes of >= 512 elements run the planar kernel (smaller ones run as rows of C*L)
        shape[-1] = draw(st.integers(MIN_PLANE, 2 * MIN_PLANE + 50))
        shape = [min(n, 2) if i != axis and i != ndim - 1 else n for i, n in enumerate(shape)]
        shape[axis] = min(shape[axis], 6)
    elif size == "small_planes" and axis < ndim - 1:
        # enough rows for small planes to run as rows of C*L columns
        shape[0] = draw(st.integers(MIN_ROWS, 3 * MIN_ROWS))
        shape = [min(n, 3) if 0 < i != axis else n for i, n in enumerate(shape)]
    return {
        "dtype": dtype,
        "shape": tuple(shape),
        "axis": axis,
        "axis_arg": draw(st.sampled_from([axis, axis - ndim])),  # 1 and -1 style
        "x_layout": draw(layouts(ndim, axis)),
        "dy_layout": draw(st.one_of(st.none(), layouts(ndim, axis))),  # None: as x
        "mode": draw(st.sampled_from(["train", "test"])),
        "eps_mode": draw(st.sampled_from(["var", "std"])),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "momentum": draw(st.sampled_from([0.9, 0.5, 0.0])),
        "running": draw(st.booleans()),  # pass running stats, or let them default to zeros
        "loc": draw(st.sampled_from([0.0, 3.0, -20.0])),
        "num_threads": draw(st.sampled_from([None, 1, 2, 3])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------


def assert_close(name, got, want, scale, dtype):
    """|got - want| <= tol * scale elementwise; ``scale`` broadcasts against want."""
    got = np.asarray(got)
    assert got.dtype == dtype, (name, got.dtype, dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), name
    err = np.abs(got.astype(np.float64) - want)
    bound = TOL[dtype] * (np.asarray(scale) + np.abs(want)) + np.finfo(np.float64).tiny
    bad = err > bound
    assert not bad.any(), "%s: %d of %d elements off, worst error %.3g where bound %.3g" % (
        name,
        bad.sum(),
        bad.size,
        err.max(),
        bound.flat[np.argmax(err - bound)],
    )


def same_memory_order(a, like):
    """a's strides rank the axes as np.empty_like(like) would (the output keeps x's layout)."""
    ref = np.empty_like(like)
    key = lambda arr: [
        i for i in np.argsort([abs(s) for s in arr.strides], kind="stable") if arr.shape[i] > 1
    ]
    return key(a) == key(ref)


@settings(PROFILE)
@given(problems())
def test_forward_backward_match_reference(p):
    rng = np.random.default_rng(p["seed"])
    dtype, shape, axis = p["dtype"], p["shape"], p["axis"]
    C = shape[axis]
    red = tuple(i for i in range(len(shape)) if i != axis)
    bshape = tuple(C if i == axis else 1 for i in range(len(shape)))

    x = make_array(rng, shape, p["x_layout"], dtype, loc=p["loc"], scale=rng.uniform(0.5, 2))
    dy = make_array(rng, shape, p["dy_layout"] or p["x_layout"], dtype)
    gamma = rng.uniform(0.5, 2.0, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    param = {
        "mode": p["mode"],
        "eps_mode": p["eps_mode"],
        "eps": p["eps"],
        "momentum": p["momentum"],
    }
    if p["running"]:
        param["running_mean"] = rng.standard_normal(C).astype(dtype)
        param["running_var"] = rng.uniform(0.1, 2.0, C).astype(dtype)
    ref_param = {
        k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in param.items()
    }
    f64 = lambda a: a.astype(np.float64)

    lay = choose([x, np.empty_like(x)], axis)
    event(
        "layout: %s"
        % (
            "copied"
            if lay is None
            else "rows, L > 1"
            if lay[0] == "rows" and lay[3] > 1
            else lay[0]
        )
    )
    out, cache = bnkernels.forward(x, gamma, beta, param, axis=p["axis_arg"])
    ref_out, ref_cache = reference.forward(f64(x), f64(gamma), f64(beta), ref_param, axis=axis)

    assert same_memory_order(out, x)
    assert cache["x"] is x  # the lean cache holds the input itself
    xhat = (f64(x) - ref_cache["mean"].reshape(bshape)) * ref_cache["invstd"].reshape(bshape)
    out_scale = np.abs(f64(gamma)).reshape(bshape) * np.abs(xhat).max(
        axis=red, keepdims=True
    ) + np.abs(f64(beta)).reshape(bshape)
    assert_close("out", out, ref_out, out_scale, dtype)
    for key in ("mean", "var", "invstd"):
        # statistics are float64 whatever the input dtype: no rounding to the input dtype;
        # the mean is accurate to the spread of the data (it may itself be ~0)
        assert cache[key].dtype == np.float64 and cache[key].shape == (C,)
        scale = np.sqrt(ref_cache["var"]) if key == "mean" else 0.0
        assert_close(key, cache[key], ref_cache[key], scale, np.dtype(np.float64))
    for key in ("running_mean", "running_var") if p["mode"] == "train" else ():
        want = ref_param[key]
        assert_close(key, param[key], want, np.abs(want).max(), param[key].dtype)

    dx, dgamma, dbeta = bnkernels.backward(dy, cache, num_threads=p["num_threads"])
    ref_dx, ref_dgamma, ref_dbeta = reference.backward_alt(f64(dy), ref_cache)

    assert same_memory_order(dx, dy)
    dy64 = np.abs(f64(dy))
    # dx = gamma*invstd*(dy - mean(dy) - xhat*mean(dy*xhat)*k): its terms are ~ g*|dy|max
    g = np.abs(f64(gamma) * ref_cache["invstd"]).reshape(bshape)
    assert_close(
        "dx", dx, ref_dx, g * dy64.max(axis=red, keepdims=True) * (1 + np.abs(xhat).max()), dtype
    )
    assert_close("dgamma", dgamma, ref_dgamma, (dy64 * np.abs(xhat)).sum(axis=red), dtype)
    assert_close("dbeta", dbeta, ref_dbeta, dy64.sum(axis=red), dtype)


@st.composite
def seed_problems(draw):
    return {
        "dtype": np.dtype(draw(st.sampled_from([np.float32, np.float64]))),
        "shape": (draw(st.integers(1, 300)), draw(st.integers(1, 100))),
        "x_layout": draw(layouts(2, 1)),
        "dy_layout": draw(layouts(2, 1)),
        "num_threads": draw(st.sampled_from([None, 1, 2])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(PROFILE)
@given(seed_problems())
def test_seed_style_cache_matches_reference(p):
    # the (N, D) cache of the classic assignment: x_hat, gamma, denom = sqrt(var + eps)
    rng = np.random.default_rng(p["seed"])
    dtype, (N, D) = p["dtype"], p["shape"]
    x_hat = make_array(rng, (N, D), p["x_layout"], dtype)
    dy = make_array(rng, (N, D), p["dy_layout"], dtype)
    gamma = rng.uniform(0.5, 2.0, D).astype(dtype)
    denom = rng.uniform(0.1, 3.0, D).astype(dtype)
    cache = {"x_hat": x_hat, "gamma": gamma, "denom": denom}
    dx, dgamma, dbeta = bnkernels.backward(dy, cache, num_threads=p["num_threads"])
    ref_cache = {k: v.astype(np.float64) for k, v in cache.items()}
    ref_dx, ref_dgamma, ref_dbeta = reference.backward_alt(dy.astype(np.float64), ref_cache)
    dy64, xh64 = np.abs(dy.astype(np.float64)), np.abs(x_hat.astype(np.float64))
    g = np.abs(gamma.astype(np.float64) / denom)
    assert_close("dx", dx, ref_dx, g * dy64.max(axis=0) * (1 + xh64.max()), dtype)
    assert_close("dgamma", dgamma, ref_dgamma, (dy64 * xh64).sum(axis=0), dtype)
    assert_close("dbeta", dbeta, ref_dbeta, dy64.sum(axis=0), dtype)


def test_layout_strategy_reaches_every_kernel_path():
    # guards the generator above: its layouts must reach planar, rows (plain and with small
    # planes as column groups) and the copy fallback
    rng = np.random.default_rng(0)
    seen = set()
    for shape, layout in [
        ((2, 3, 2, MIN_PLANE), ((0, 1, 2, 3), (1,) * 4, (False,) * 4)),  # NCHW, big planes
        ((MIN_ROWS, 5, 2, 3), ((0, 1, 2, 3), (1,) * 4, (False,) * 4)),  # NCHW, small planes
        ((4, 5, 6, 7), ((0, 2, 3, 1), (1,) * 4, (False,) * 4)),  # channels-last
        ((4, 5, 6, 7), ((0, 1, 2, 3), (1, 1, 2, 1), (False,) * 4)),  # stepped H
        ((2, 3, 2, MIN_PLANE), ((0, 1, 2, 3), (1,) * 4, (True,) + (False,) * 3)),
    ]:  # N reversed
        x = make_array(rng, shape, layout, np.float32)
        lay = choose([x, np.empty_like(x)], 1)
        seen.add(None if lay is None else (lay[0], lay[0] == "rows" and lay[3] > 1))
    assert seen == {("planar", False), ("rows", True), ("rows", False), None}
