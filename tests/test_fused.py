"""Fused epilogues: forward(..., activation='relu', residual=r) and the backward of its cache.

The contract, as oneDNN's fuse_norm_relu / fuse_norm_add_relu and the CS231n conv-bn-relu
block:

- out = act(gamma * xhat + beta + residual), the residual term absent for None, act the
  identity for None; ReLU is ``0 where v <= 0 else v`` (NaN propagates, -0.0 becomes +0.0);
- the cache records 'activation', 'residual' (a bool) and 'out' (the returned out itself
  with 'relu', None otherwise); caches without these keys mean None, False, None;
- backward masks dout with the saved output, dy = 0 where out <= 0 else dout (0 at and
  below the kink, dout where out is NaN), and returns (dx, dgamma, dbeta), plus dresidual
  = dy as a new array when forward had a residual.

Tests of bnkernels.reference alone carry 'reference' in their names (``pytest -k
reference``); the tests of the compiled kernels compare them with it, 'the oracle'.
"""

import itertools

import numpy as np
import pytest

import bnkernels
from bnhelpers import as_layout, assert_close, bits, make_inputs, numerical_gradient, rel_error
from bnkernels import reference

f16, f32, f64 = np.float16, np.float32, np.float64

# (activation, with a residual): the three epilogues
EPILOGUES = {"relu": ("relu", False), "residual": (None, True), "residual-relu": ("relu", True)}

# relative tolerance of the compiled kernels against the oracle run in float64: float32
# as tests/test_vs_reference.py, float64 tight; float16 is rounded to 11 bits (a few ulps
# of the largest magnitude)
RTOL = {np.dtype(f16): 1e-2, np.dtype(f32): 1e-4, np.dtype(f64): 1e-12}

GRAD_NAMES = ("dx", "dgamma", "dbeta", "dresidual")

FORWARDS = {"kernels": bnkernels.forward, "reference": reference.forward}
BACKWARDS = {
    "kernels": bnkernels.backward,
    "reference.backward_alt": reference.backward_alt,
    "reference.backward_graph": reference.backward_graph,
}


def _residual(shape, dtype, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _relu_mask(out, dout):
    """What backward must pass through the ReLU: 0 where out <= 0, dout elsewhere (NaN too)."""
    return np.where(out <= 0, np.zeros((), dout.dtype), dout)


def _test_param(C, dtype, seed):
    rng = np.random.default_rng(seed)
    return {
        "running_mean": rng.standard_normal(C).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, C).astype(dtype),
    }


def _bn_param(mode, eps_mode, C, dtype, seed=0):
    p = {"mode": mode, "eps_mode": eps_mode}
    if mode == "test":
        p.update(_test_param(C, dtype, seed))
    return p


def _oracle(x, gamma, beta, bn_param, dout, axis, activation, residual, out=None):
    """reference.forward and both backwards on float64 copies of the inputs.

    With ``out`` (the output under test) the backward masks with it instead of the oracle's
    own output: the rule is the mask of the saved output, and a rounded output can be 0
    where the float64 one is a hair above it.
    """
    x64 = np.array(x, dtype=f64)
    p = dict(bn_param)
    for key in ("running_mean", "running_var"):
        if p.get(key) is not None:
            p[key] = np.array(p[key], dtype=f64)
    g = None if gamma is None else np.asarray(gamma, f64)
    b = None if beta is None else np.asarray(beta, f64)
    r = None if residual is None else np.array(residual, dtype=f64)
    r_out, r_cache = reference.forward(x64, g, b, p, axis=axis, activation=activation, residual=r)
    if activation == "relu" and out is not None:
        r_cache["out"] = np.array(out, dtype=f64)
    dy = np.array(dout, dtype=f64)
    return (
        r_out,
        r_cache,
        p,
        reference.backward_alt(dy, r_cache),
        reference.backward_graph(dy, r_cache),
    )


# ---------------------------------------------------------------------------
# numerical gradients, away from the ReLU's kink
# ---------------------------------------------------------------------------

# no pre-activation value within this of 0: a centered difference with h = 1e-5 moves a
# pre-activation by less than 1e-4 (|gamma| <= 1.5, invstd <= 1.5, |xhat| of a few), so
# the ReLU's branch never changes between the two evaluations
KINK_MARGIN = 1e-3
THRESHOLD = 1e-6

GRAD_SHAPES = {2: (6, 3), 4: (2, 3, 2, 3)}
GRAD_IMPLS = {
    "kernels": (bnkernels.forward, bnkernels.backward),
    "reference.backward_graph": (reference.forward, reference.backward_graph),
    "reference.backward_alt": (reference.forward, reference.backward_alt),
}
GRAD_GRID = list(
    itertools.product(
        GRAD_IMPLS, EPILOGUES, GRAD_SHAPES, (1, -1), ("var", "std"), ("train", "test")
    )
)


def _assert_grads(want, got, dtype):
    """Each gradient of got close to want's, at dtype's tolerance."""
    for name, g, w in zip(GRAD_NAMES, got, want):
        assert_close(g, w, rtol=RTOL[np.dtype(dtype)], what=name)


def _away_from_the_kink(shape, axis, mode, eps_mode, activation, with_residual, seed):
    """float64 inputs whose pre-activation is nowhere within KINK_MARGIN of 0, with both
    signs present (so that the mask both passes and stops gradient); drawn again until so."""
    C = shape[axis]
    for s in range(seed, seed + 200):
        x, gamma, beta, w = make_inputs(shape, axis, f64, seed=s)
        residual = _residual(shape, f64, seed=s + 1000) if with_residual else None
        bn_param = _bn_param(mode, eps_mode, C, f64, seed=s)
        v, _ = reference.forward(x, gamma, beta, dict(bn_param), axis=axis, residual=residual)
        if activation is None:
            return x, gamma, beta, w, residual, bn_param
        if np.min(np.abs(v)) > KINK_MARGIN and np.any(v < 0) and np.any(v > 0):
            return x, gamma, beta, w, residual, bn_param
    raise AssertionError("no draw keeps the pre-activation away from the ReLU's kink")


@pytest.mark.parametrize(
    "impl,epilogue,ndim,axis,eps_mode,mode",
    GRAD_GRID,
    ids=["-".join(map(str, g)) for g in GRAD_GRID],
)
def test_gradient_matches_centered_differences(impl, epilogue, ndim, axis, eps_mode, mode):
    forward, backward = GRAD_IMPLS[impl]
    activation, with_residual = EPILOGUES[epilogue]
    shape = GRAD_SHAPES[ndim]
    x, gamma, beta, w, residual, bn_param = _away_from_the_kink(
        shape, axis, mode, eps_mode, activation, with_residual, seed=10 * ndim + (axis > 0)
    )
    kw = {"axis": axis, "activation": activation, "residual": residual}

    def loss():
        out, _ = forward(x, gamma, beta, dict(bn_param), **kw)
        return float(np.sum(out * w))

    _, cache = forward(x, gamma, beta, dict(bn_param), **kw)
    grads = backward(w, cache)
    assert len(grads) == (4 if with_residual else 3)
    errors = {
        "dx": rel_error(grads[0], numerical_gradient(loss, x)),
        "dgamma": rel_error(grads[1], numerical_gradient(loss, gamma)),
        "dbeta": rel_error(grads[2], numerical_gradient(loss, beta)),
    }
    if with_residual:
        errors["dresidual"] = rel_error(grads[3], numerical_gradient(loss, residual))
    assert max(errors.values()) < THRESHOLD, errors


# ---------------------------------------------------------------------------
# the compiled kernels against the oracle: layouts, dtypes, modes
# ---------------------------------------------------------------------------

# (shape, axis, x's layout, the residual's, dout's); the layouts of tests/bnhelpers.py
LAYOUT_CASES = [
    ((37, 11), 1, "c", "c", "c"),  # 2D (N, C)
    ((37, 11), 1, "c", "fortran", "c"),  # a transposed (Fortran-order) residual
    ((3, 5, 6, 7), 1, "c", "c", "c"),  # NCHW
    ((3, 5, 6, 7), 1, "c", "channels_last", "c"),  # an NHWC array viewed as NCHW
    ((3, 5, 6, 7), 1, "channels_last", "c", "channels_last"),  # x the NHWC one
    ((3, 5, 6, 7), 1, "sliced_channels", "reversed_batch", "c"),  # non-contiguous x
    ((3, 6, 7, 5), -1, "c", "c", "c"),  # NHWC, axis=-1
    ((3, 6, 7, 5), -1, "c", "sliced_batch", "reversed_last"),  # a strided slice
    ((4, 6, 20), 1, "reversed_last", "channels_outer", "fortran"),
    ((8, 16, 14, 14), 1, "c", "channels_last", "c"),  # large enough to run in parallel
    ((20000, 3), 1, "c", "sliced_batch", "c"),  # many rows, chunked
]
LAYOUT_IDS = [
    "%s-axis%d-x_%s-r_%s-dout_%s" % (("x".join(map(str, c[0])),) + c[1:]) for c in LAYOUT_CASES
]
DTYPES = [f16, f32, f64]
DTYPE_IDS = ["float16", "float32", "float64"]


def _check_against_oracle(x, gamma, beta, bn_param, dout, axis, activation, residual):
    """Kernel forward and backward vs the oracle; the kernels' results."""
    dtype = x.dtype
    rtol = RTOL[dtype]
    x_before = np.copy(x)
    r_before = None if residual is None else np.copy(residual)
    p_kernel = dict(bn_param)
    out, cache = bnkernels.forward(
        x, gamma, beta, p_kernel, axis=axis, activation=activation, residual=residual
    )
    grads = bnkernels.backward(dout, cache)
    r_out, _, p_ref, r_alt, r_graph = _oracle(
        x, gamma, beta, bn_param, dout, axis, activation, residual, out
    )

    assert out.dtype == dtype and out.shape == x.shape
    assert np.array_equal(x, x_before, equal_nan=True), "forward modified x"
    if residual is not None:
        assert np.array_equal(residual, r_before, equal_nan=True), "forward modified residual"
    assert_close(out, r_out, rtol=rtol, what="out")
    assert len(grads) == (4 if residual is not None else 3)
    for fn, want in (("backward_alt", r_alt), ("backward_graph", r_graph)):
        assert len(want) == len(grads)
        for name, g, w in zip(GRAD_NAMES, grads, want):
            assert_close(g, w, rtol=rtol, what="%s vs %s" % (name, fn))
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    if residual is not None:
        dres = grads[3]
        assert dres.dtype == dtype and dres.shape == x.shape
        # no arithmetic: the masked dout exactly
        want = _relu_mask(out, dout) if activation == "relu" else dout
        assert np.array_equal(dres, want), "dresidual is not the masked dout"
    if bn_param["mode"] == "train":
        for key in ("running_mean", "running_var"):
            assert_close(p_kernel[key], p_ref[key], rtol=rtol, what=key)
    return out, cache, grads


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis,x_layout,r_layout,dout_layout", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_kernels_match_the_oracle(
    shape, axis, x_layout, r_layout, dout_layout, dtype, mode, eps_mode, epilogue
):
    activation, with_residual = EPILOGUES[epilogue]
    x0, gamma, beta, dout0 = make_inputs(shape, axis, dtype, seed=len(shape) + shape[0])
    x = as_layout(x0, x_layout, axis)
    dout = as_layout(dout0, dout_layout, axis)
    residual = None
    if with_residual:
        residual = as_layout(_residual(shape, dtype, seed=shape[-1]), r_layout, axis)
    bn_param = _bn_param(mode, eps_mode, shape[axis], dtype, seed=3)
    _check_against_oracle(x, gamma, beta, bn_param, dout, axis, activation, residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_backward_of_rows_wider_than_a_block(dtype):
    # tall rows of 1100 channels: a chunked plan whose tasks hold whole rows, wider than the
    # 512 columns of one wide block, in chunks of an odd number of rows; their sums, masked
    # by the ReLU here, go a pair of rows at a time across the blocks
    shape = (2001, 1100)
    cb, _, chunk, n_chunks = bnkernels._kernels.rows_plan(*shape, np.dtype(dtype).itemsize, 3)
    assert cb == shape[1] and n_chunks > 1 and chunk % 2 == 1, "not the plan this test is for"
    x, gamma, beta, dout = make_inputs(shape, 1, dtype, seed=7)
    _check_against_oracle(x, gamma, beta, {"mode": "train"}, dout, 1, "relu", None)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("none", ["gamma", "beta", "both"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis", [((9, 4), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1)])
def test_kernels_match_the_oracle_without_affine(shape, axis, dtype, none, epilogue):
    activation, with_residual = EPILOGUES[epilogue]
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=7)
    gamma = None if none in ("gamma", "both") else gamma
    beta = None if none in ("beta", "both") else beta
    residual = _residual(shape, dtype, seed=8) if with_residual else None
    _check_against_oracle(x, gamma, beta, {"mode": "train"}, dout, axis, activation, residual)


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("dtype", [f32, f64], ids=["float32", "float64"])
def test_fused_caches_are_interchangeable(dtype, epilogue):
    """bnkernels.backward takes reference.forward's fused cache, and the reference backwards
    take bnkernels.forward's."""
    activation, with_residual = EPILOGUES[epilogue]
    x, gamma, beta, dout = make_inputs((5, 6, 4, 3), 1, dtype, seed=13)
    residual = _residual(x.shape, dtype, seed=14) if with_residual else None
    kw = {"activation": activation, "residual": residual}
    out_k, cache_k = bnkernels.forward(x, gamma, beta, {"mode": "train"}, **kw)
    out_r, cache_r = reference.forward(x, gamma, beta, {"mode": "train"}, **kw)
    for name, out, cache, backward in (
        ("bnkernels.backward(reference cache)", out_r, cache_r, bnkernels.backward),
        ("backward_alt(kernel cache)", out_k, cache_k, reference.backward_alt),
        ("backward_graph(kernel cache)", out_k, cache_k, reference.backward_graph),
    ):
        truth = _oracle(x, gamma, beta, {"mode": "train"}, dout, 1, activation, residual, out)[3]
        got = backward(dout, cache)
        assert len(got) == len(truth)
        for part, g, w in zip(GRAD_NAMES, got, truth):
            assert g.dtype == dtype
            # the reference in float32 carries float32 statistics: a looser bound there
            rtol = 2e-3 if dtype == f32 else 1e-10
            assert_close(g, w, rtol=rtol, what="%s %s" % (name, part))


# ---------------------------------------------------------------------------
# the reference alone
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize(
    "shape,axis,x_layout,r_layout,dout_layout", LAYOUT_CASES[:9], ids=LAYOUT_IDS[:9]
)
def test_graph_and_alt_agree_reference(
    shape, axis, x_layout, r_layout, dout_layout, mode, dtype, epilogue
):
    """The two reference backwards agree on fused caches, and the layouts do not matter."""
    activation, with_residual = EPILOGUES[epilogue]
    x0, gamma, beta, dout0 = make_inputs(shape, axis, dtype, seed=5)
    r0 = _residual(shape, dtype, seed=6) if with_residual else None
    bn_param = _bn_param(mode, "var", shape[axis], dtype, seed=1)
    kw = {"axis": axis, "activation": activation}
    out0, cache0 = reference.forward(x0, gamma, beta, dict(bn_param), residual=r0, **kw)
    x = as_layout(x0, x_layout, axis)
    dout = as_layout(dout0, dout_layout, axis)
    r = None if r0 is None else as_layout(r0, r_layout, axis)
    out, cache = reference.forward(x, gamma, beta, dict(bn_param), residual=r, **kw)
    rtol = RTOL[np.dtype(dtype)] * (10 if dtype == f32 else 1)
    assert out.dtype == dtype
    assert_close(out, out0.astype(f64), rtol=rtol, what="out layout vs contiguous")
    alt = reference.backward_alt(dout, cache)
    graph = reference.backward_graph(dout, cache)
    alt0 = reference.backward_alt(dout0, cache0)
    assert len(alt) == len(graph) == len(alt0) == (4 if with_residual else 3)
    for name, a, g, a0 in zip(GRAD_NAMES, alt, graph, alt0):
        assert a.dtype == g.dtype == dtype
        assert_close(g, a.astype(f64), rtol=rtol, what="%s graph vs alt" % name)
        assert_close(a, a0.astype(f64), rtol=rtol, what="%s layout vs contiguous" % name)
    if with_residual:
        want = _relu_mask(out, dout) if activation == "relu" else dout
        assert np.array_equal(alt[3], want) and np.array_equal(graph[3], want)


def test_epilogue_is_the_composition_reference():
    """float64: the fused output is the plain one plus the residual, then the ReLU."""
    x, gamma, beta, _ = make_inputs((7, 4, 3), 1, f64, seed=3)
    r = _residual(x.shape, f64, seed=4)
    plain, _ = reference.forward(x, gamma, beta, {"mode": "train"})
    added, _ = reference.forward(x, gamma, beta, {"mode": "train"}, residual=r)
    relu, _ = reference.forward(x, gamma, beta, {"mode": "train"}, activation="relu")
    both, _ = reference.forward(x, gamma, beta, {"mode": "train"}, activation="relu", residual=r)
    assert np.array_equal(bits(added), bits(plain + r))
    assert np.array_equal(bits(relu), bits(np.where(plain <= 0, 0.0, plain)))
    assert np.array_equal(bits(both), bits(np.where(plain + r <= 0, 0.0, plain + r)))
    assert np.any(plain < 0) and np.any(plain + r < 0)


def test_float16_epilogue_is_rounded_once_reference():
    """float16 x: the residual add runs in float32 before the one rounding to float16.

    beta = 1000.3 and residual = -1000: in float32 the sum is 0.2998..., which float16
    holds to 4 digits; adding after a first rounding (1000.3 -> 1000.5) would give 0.5.
    """
    x = make_inputs((8, 2), 1, f16, seed=1)[0]
    gamma = np.zeros(2, f32)
    beta = np.full(2, 1000.3, f32)
    r = np.full(x.shape, -1000.0, f16)
    for activation in (None, "relu"):
        out, _ = reference.forward(
            x, gamma, beta, {"mode": "train"}, activation=activation, residual=r
        )
        assert out.dtype == f16
        assert np.all(out == f16(f32(1000.3) - f32(1000.0))), out
        assert not np.any(out == 0.5)


def test_plain_cache_records_no_epilogue_reference():
    x, gamma, beta, dout = make_inputs((6, 3, 2), 1, f64, seed=2)
    out, cache = reference.forward(x, gamma, beta, {"mode": "train"})
    assert cache["activation"] is None and cache["residual"] is False and cache["out"] is None
    assert len(reference.backward_alt(dout, cache)) == 3
    assert len(reference.backward_graph(dout, cache)) == 3


@pytest.mark.parametrize("impl", list(BACKWARDS), ids=list(BACKWARDS))
def test_cache_without_the_epilogue_keys(impl):
    """A cache without 'activation', 'residual', 'out' (hand-built, older) has no epilogue."""
    backward = BACKWARDS[impl]
    x, gamma, beta, dout = make_inputs((6, 3, 2), 1, f64, seed=2)
    _, cache = reference.forward(x, gamma, beta, {"mode": "train"})
    bare = {k: v for k, v in cache.items() if k not in ("activation", "residual", "out")}
    want = backward(dout, cache)
    got = backward(dout, bare)
    assert len(got) == len(want) == 3
    for name, g, w in zip(GRAD_NAMES, got, want):
        assert np.array_equal(bits(g), bits(w)), name
    # a seed-style cache has none either
    seed = {"x_hat": (x - cache["mean"][:, None]) * cache["invstd"][:, None], "gamma": gamma}
    seed["denom"] = 1 / cache["invstd"]
    assert len(backward(dout, seed)) == 3


@pytest.mark.parametrize("activation", ["sigmoid", "ReLU", "none", ""])
def test_unknown_activation_is_refused_reference(activation):
    x, gamma, beta, _ = make_inputs((4, 3), 1, f64)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        reference.forward(x, gamma, beta, {"mode": "train"}, activation=activation)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_float32_parameters_of_float16_data_reference(epilogue):
    activation, with_residual = EPILOGUES[epilogue]
    x, _, _, dout = make_inputs((16, 6, 3, 3), 1, f16, seed=11)
    _, gamma, beta, _ = make_inputs((16, 6, 3, 3), 1, f32, seed=12)
    residual = _residual(x.shape, f16, seed=13) if with_residual else None
    kw = {"activation": activation, "residual": residual}
    out, cache = reference.forward(x, gamma, beta, {"mode": "train"}, **kw)
    assert out.dtype == f16 and cache["gamma"].dtype == f32
    _, _, _, want, _ = _oracle(
        x, gamma, beta, {"mode": "train"}, dout, 1, activation, residual, out
    )
    for backward in (reference.backward_alt, reference.backward_graph):
        got = backward(dout, cache)
        assert len(got) == (4 if with_residual else 3)
        assert [g.dtype for g in got] == [f16, f32, f32, f16][: len(got)]
        for name, g, w in zip(GRAD_NAMES, got, want):
            assert_close(g, w, rtol=RTOL[np.dtype(f16)], what="%s %s" % (backward.__name__, name))


# ---------------------------------------------------------------------------
# the return arity, dresidual a new array, the cache's 'out'
# ---------------------------------------------------------------------------

ARITY_IMPLS = {
    "kernels": (bnkernels.forward, bnkernels.backward),
    "reference.backward_alt": (reference.forward, reference.backward_alt),
    "reference.backward_graph": (reference.forward, reference.backward_graph),
}


@pytest.mark.parametrize("with_residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("activation", [None, "relu"], ids=["identity", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", list(ARITY_IMPLS), ids=list(ARITY_IMPLS))
def test_arity_dresidual_and_cache(impl, dtype, activation, with_residual):
    forward, backward = ARITY_IMPLS[impl]
    x, gamma, beta, dout = make_inputs((4, 3, 5), 1, dtype, seed=9)
    residual = _residual(x.shape, dtype, seed=10) if with_residual else None
    out, cache = forward(
        x, gamma, beta, {"mode": "train"}, activation=activation, residual=residual
    )
    assert cache["activation"] == activation
    assert isinstance(cache["residual"], bool) and cache["residual"] == with_residual
    if activation == "relu":
        assert cache["out"] is out, "the cache holds out itself, not a copy"
    else:
        assert cache["out"] is None
    grads = backward(dout, cache)
    assert isinstance(grads, tuple)
    assert len(grads) == (4 if with_residual else 3)
    if with_residual:
        dres = grads[3]
        assert dres.dtype == x.dtype and dres.shape == x.shape
        # a new array: the caller may update it in place without touching dout
        for name, other in (("dout", dout), ("out", out), ("residual", residual), ("x", x)):
            assert not np.shares_memory(dres, other), "dresidual shares memory with %s" % name
        for name, g in zip(GRAD_NAMES, grads[:3]):
            assert not np.shares_memory(dres, g), "dresidual shares memory with %s" % name


# ---------------------------------------------------------------------------
# ReLU semantics: never negative, no -0.0, NaN propagates, the kink's gradient is 0
# ---------------------------------------------------------------------------

IMPL_IDS = ["kernels", "reference"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", IMPL_IDS)
def test_relu_output_is_never_negative_nor_minus_zero(impl, dtype):
    forward = FORWARDS[impl]
    x, gamma, beta, _ = make_inputs((50, 4, 3), 1, dtype, seed=3)
    r = _residual(x.shape, dtype, seed=4)
    for residual in (None, r):
        out, _ = forward(x, gamma, beta, {"mode": "train"}, activation="relu", residual=residual)
        assert np.all(out >= 0), "ReLU output has negative values"
        assert np.any(out == 0) and np.any(out > 0)
        assert not np.any(np.signbit(out)), "ReLU output has -0.0"

    # gamma = 0 and beta = -0.0: the pre-activation is a signed zero, -0.0 where xhat < 0
    gamma0 = np.zeros(4, dtype)
    beta0 = np.full(4, -0.0, dtype)
    minus0 = np.full(x.shape, -0.0, dtype)
    for residual in (None, minus0):
        out, _ = forward(x, gamma0, beta0, {"mode": "train"}, activation="relu", residual=residual)
        assert np.all(out == 0) and not np.any(np.signbit(out)), "relu(-0.0) must be +0.0"
    if impl == "reference":  # the identity keeps the signed zeros: the case is not vacuous
        plain, _ = forward(x, gamma0, beta0, {"mode": "train"}, residual=minus0)
        assert np.any(np.signbit(plain))


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", IMPL_IDS)
def test_relu_propagates_nan_from_x(impl, dtype, mode):
    """A NaN in x poisons its channel's statistics (train) or its element (test); ReLU keeps
    NaN, and the backward passes dout where out is NaN (dbeta of that channel is finite)."""
    forward = FORWARDS[impl]
    backward = BACKWARDS["kernels" if impl == "kernels" else "reference.backward_alt"]
    x, gamma, beta, dout = make_inputs((12, 4, 5), 1, dtype, seed=6)
    x[3, 2, 1] = np.nan
    r = _residual(x.shape, dtype, seed=7)
    bn_param = _bn_param(mode, "var", 4, dtype, seed=2)
    out, cache = forward(x, gamma, beta, dict(bn_param), activation="relu", residual=r)
    grads = backward(dout, cache)
    r_out, _, _, want, _ = _oracle(x, gamma, beta, bn_param, dout, 1, "relu", r, out)

    nan_out = np.isnan(r_out)
    if mode == "train":
        assert np.all(nan_out[:, 2]) and not np.any(nan_out[:, [0, 1, 3]])
    else:
        assert nan_out.sum() == 1 and nan_out[3, 2, 1]
    assert np.array_equal(np.isnan(out), nan_out), "NaN of x did not propagate as the oracle's"
    assert np.all(out[~nan_out] >= 0)
    # where out is NaN the mask passes dout
    assert np.array_equal(grads[3][nan_out], dout[nan_out])
    for name, g, w in zip(GRAD_NAMES, grads, want):
        # test mode: dx = gamma/d * dy reads no x, so the NaN element's dx is finite too
        assert np.array_equal(np.isnan(g), np.isnan(w)), "%s: NaN unlike the oracle's" % name
        finite = ~np.isnan(w)
        assert_close(g[finite], w[finite], rtol=RTOL[np.dtype(dtype)], what=name)
    if mode == "train":
        assert np.isfinite(grads[2][2]), "dbeta of the NaN channel is the sum of dout"
        assert_close(grads[2][2:3], [np.sum(dout[:, 2].astype(f64))], rtol=RTOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", IMPL_IDS)
def test_relu_propagates_nan_from_residual(impl, dtype):
    """A NaN in the residual reaches its output element only, and its gradient is dout."""
    forward = FORWARDS[impl]
    backward = BACKWARDS["kernels" if impl == "kernels" else "reference.backward_graph"]
    x, gamma, beta, dout = make_inputs((12, 4, 5), 1, dtype, seed=6)
    r = _residual(x.shape, dtype, seed=7)
    r[5, 1, 4] = np.nan
    out, cache = forward(x, gamma, beta, {"mode": "train"}, activation="relu", residual=r)
    nan_out = np.isnan(out)
    assert nan_out.sum() == 1 and nan_out[5, 1, 4]
    dx, dgamma, dbeta, dres = backward(dout, cache)
    assert dres[5, 1, 4] == dout[5, 1, 4]
    for name, g in (("dx", dx), ("dgamma", dgamma), ("dbeta", dbeta), ("dresidual", dres)):
        assert np.all(np.isfinite(g)), "%s is not finite: the NaN output passes dout" % name
    want = _oracle(x, gamma, beta, {"mode": "train"}, dout, 1, "relu", r, out)[3]
    _assert_grads(want, (dx, dgamma, dbeta, dres), dtype)


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", IMPL_IDS)
def test_relu_gradient_is_zero_at_the_kink(impl, dtype, mode):
    """gamma = 0: the pre-activation is beta + residual exactly; where the residual is -beta
    it is exactly 0, the kink, and the gradient there is 0 (as below it)."""
    forward = FORWARDS[impl]
    backward = BACKWARDS["kernels" if impl == "kernels" else "reference.backward_alt"]
    x, _, beta, dout = make_inputs((10, 3, 4), 1, dtype, seed=8)
    gamma = np.zeros(3, dtype)
    rng = np.random.default_rng(9)
    r = rng.choice([-1.0, 0.5, 2.0], size=x.shape).astype(dtype)  # below, above, far above
    kink = rng.random(x.shape) < 0.4
    r[kink] = np.broadcast_to(-beta[:, None], x.shape)[kink]
    bn_param = _bn_param(mode, "var", 3, dtype, seed=4)
    out, cache = forward(x, gamma, beta, dict(bn_param), activation="relu", residual=r)
    v = beta[:, None].astype(f64) + r.astype(f64)  # exact in float64
    assert np.array_equal(out, np.where(v <= 0, 0, v).astype(dtype))
    assert np.all(out[kink] == 0) and not np.any(np.signbit(out))
    dx, dgamma, dbeta, dres = backward(dout, cache)
    assert np.all(dres[kink] == 0), "the gradient at the kink is 0"
    assert np.array_equal(dres, _relu_mask(out, dout))
    want = _oracle(x, gamma, beta, bn_param, dout, 1, "relu", r, out)[3]
    _assert_grads(want, (dx, dgamma, dbeta, dres), dtype)
    assert_close(
        dbeta,
        np.sum(np.where(out > 0, dout, 0).astype(f64), axis=(0, 2)),
        rtol=RTOL[np.dtype(dtype)],
        what="dbeta",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", IMPL_IDS)
def test_relu_test_mode_dx_is_zero_where_out_is_zero(impl, dtype):
    """Test mode: dx = gamma/d * dy elementwise, so it is 0 wherever the ReLU output is 0."""
    forward = FORWARDS[impl]
    backward = BACKWARDS["kernels" if impl == "kernels" else "reference.backward_graph"]
    x, gamma, beta, dout = make_inputs((10, 3, 4), 1, dtype, seed=8)
    bn_param = _bn_param("test", "var", 3, dtype, seed=5)
    out, cache = forward(x, gamma, beta, dict(bn_param), activation="relu")
    dx = backward(dout, cache)[0]
    assert np.any(out == 0) and np.any(out > 0)
    assert np.all(dx[out == 0] == 0)
    assert np.all(dx[out > 0] != 0)


# ---------------------------------------------------------------------------
# bitwise identical for every thread count
# ---------------------------------------------------------------------------

# (shape, axis, the residual's layout): parallel and chunked paths
THREAD_CASES = [
    ((64, 32, 8, 8), 1, "channels_last"),  # NCHW, 1 << 17 elements
    ((40000, 64), 1, "reversed_batch"),  # tall rows
    ((4, 3, 128, 128), 1, "c"),  # planar, big planes
    ((64, 8, 8, 32), -1, "c"),  # NHWC
]
THREAD_IDS = ["%s-axis%d-r_%s" % ("x".join(map(str, s)), a, r) for s, a, r in THREAD_CASES]


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,axis,r_layout", THREAD_CASES, ids=THREAD_IDS)
def test_fused_bitwise_identical_across_threads(
    omp_threads, shape, axis, r_layout, dtype, epilogue
):
    activation, with_residual = EPILOGUES[epilogue]
    x, gamma, beta, dout = make_inputs(shape, axis, dtype, seed=1, offset=5.0)
    residual = None
    if with_residual:
        residual = as_layout(_residual(shape, dtype, seed=2), r_layout, axis)
    kw = {"axis": axis, "activation": activation, "residual": residual}
    results = []
    for n in (1, 2):
        with omp_threads(n):
            assert bnkernels.max_threads() == n, "the OpenMP thread limit did not take effect"
            p = {"mode": "train"}
            out, cache = bnkernels.forward(x, gamma, beta, p, **kw)
        results.append((out, cache, p))
    (out1, cache1, p1), (out2, cache2, p2) = results
    assert np.array_equal(bits(out1), bits(out2)), "forward out differs with 2 threads"
    for key in ("mean", "var", "invstd"):
        assert np.array_equal(bits(cache1[key]), bits(cache2[key])), key
    for key in ("running_mean", "running_var"):
        assert np.array_equal(bits(p1[key]), bits(p2[key])), key

    one = bnkernels.backward(dout, cache1, num_threads=1)
    two = bnkernels.backward(dout, cache1, num_threads=2)
    assert len(one) == len(two) == (4 if with_residual else 3)
    for name, a, b in zip(GRAD_NAMES, one, two):
        assert np.array_equal(bits(a), bits(b)), "%s differs between 1 and 2 threads" % name
    if activation == "relu":
        assert np.any(out1 == 0) and np.any(out1 > 0)


# ---------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_float32_parameters_of_float16_data(epilogue):
    """float16 activations, float32 parameters: dgamma and dbeta float32, dx and dresidual
    float16, the values of the oracle."""
    activation, with_residual = EPILOGUES[epilogue]
    x, _, _, dout = make_inputs((16, 6, 3, 3), 1, f16, seed=11)
    _, gamma, beta, _ = make_inputs((16, 6, 3, 3), 1, f32, seed=12)
    residual = _residual(x.shape, f16, seed=13) if with_residual else None
    bn_param = {"mode": "train"}
    out, cache = bnkernels.forward(
        x, gamma, beta, bn_param, activation=activation, residual=residual
    )
    grads = bnkernels.backward(dout, cache)
    assert out.dtype == f16 and bn_param["running_var"].dtype == f32
    assert [g.dtype for g in grads] == [f16, f32, f32, f16][: len(grads)]
    assert len(grads) == (4 if with_residual else 3)
    r_out, _, _, want, _ = _oracle(
        x, gamma, beta, {"mode": "train"}, dout, 1, activation, residual, out
    )
    assert_close(out, r_out, rtol=RTOL[np.dtype(f16)], what="out")
    _assert_grads(want, grads, f16)
    # and the reference's own backward on the kernels' cache
    for name, g, w in zip(GRAD_NAMES, grads, reference.backward_alt(dout, cache)):
        assert g.dtype == w.dtype
        assert_close(g, w.astype(f64), rtol=RTOL[np.dtype(f16)], what="%s vs backward_alt" % name)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ["sigmoid", "ReLU", "none", ""])
def test_unknown_activation_is_refused(activation, dtype):
    x, gamma, beta, _ = make_inputs((4, 3), 1, dtype)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        bnkernels.forward(x, gamma, beta, {"mode": "train"}, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape",
    [(4, 3, 2), (3, 4), (1, 3), (3,), (4, 3, 1)],
    ids=["3d", "transposed", "row", "1d", "trailing1"],
)
def test_residual_of_another_shape_is_refused(shape, dtype):
    """Never broadcast: a (1, C) row or a (C,) vector is refused as any other shape."""
    x, gamma, beta, _ = make_inputs((4, 3), 1, dtype)
    with pytest.raises(ValueError, match="residual"):
        bnkernels.forward(x, gamma, beta, {"mode": "train"}, residual=np.ones(shape, dtype))


@pytest.mark.parametrize(
    "x_dtype,r_dtype",
    [(f32, f64), (f64, f32), (f16, f32), (f32, f16), (f64, np.int64)],
    ids=["x32-r64", "x64-r32", "x16-r32", "x32-r16", "x64-rint"],
)
def test_residual_of_another_dtype_is_refused(x_dtype, r_dtype):
    x, gamma, beta, _ = make_inputs((4, 3), 1, x_dtype)
    with pytest.raises(TypeError, match="residual") as info:
        bnkernels.forward(x, gamma, beta, {"mode": "train"}, residual=np.ones(x.shape, r_dtype))
    # a forward without the keyword raises a TypeError naming it too: not this one
    assert "unexpected keyword argument" not in str(info.value)


# ---------------------------------------------------------------------------
# the same bits whichever way a batch is run: with or without a residual, one process or
# a communicator, one backward or its split passes, in layouts no array shares with another
# ---------------------------------------------------------------------------


class _OneRank:
    """A communicator of one rank: allgather returns [obj]."""

    def allgather(self, obj):
        return [obj]


def _same_bits(a, b):
    return np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape,axis",
    [((40000, 8), 1), ((4, 3, 300, 300), 1), ((16, 9, 9, 64), -1)],  # chunked rows, planar
    ids=["tall", "planar", "nhwc"],
)
def test_a_residual_leaves_the_statistics_bits(shape, axis, dtype):
    # the statistics depend on x alone: a residual (a second array in the output sweep)
    # must not change the plan of the sums, nor may the path through a communicator
    x, gamma, beta, _ = make_inputs(shape, axis, dtype, seed=31)
    r = _residual(shape, dtype, seed=32)
    kw = {"axis": axis}
    plain_p, fused_p, comm_p = ({"mode": "train"} for _ in range(3))
    _, plain = bnkernels.forward(x, gamma, beta, plain_p, **kw)
    out, fused = bnkernels.forward(x, gamma, beta, fused_p, residual=r, activation="relu", **kw)
    out_c, comm = bnkernels.forward(
        x, gamma, beta, comm_p, residual=r, activation="relu", comm=_OneRank(), **kw
    )
    for key in ("mean", "var", "invstd"):
        assert _same_bits(plain[key], fused[key]), key
        assert _same_bits(plain[key], comm[key]), key
    for key in ("running_mean", "running_var"):
        assert _same_bits(plain_p[key], fused_p[key]) and _same_bits(plain_p[key], comm_p[key])
    assert _same_bits(out, out_c)


def _layout_case(name, rng):
    """(x, dout, axis) whose layouts no single array layout fits: the face copies."""
    if name == "nhwc-reversed-dout":
        shape = (16, 9, 9, 64)
        return rng.standard_normal(shape), rng.standard_normal(shape)[::-1].copy()[::-1], -1
    return (
        np.asfortranarray(rng.standard_normal((50, 100))),
        rng.standard_normal((50, 200))[:, ::2],
        1,
    )


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("case", ["nhwc-reversed-dout", "fortran-x-sliced-dout"])
def test_split_passes_and_comm_are_backward_bitwise_in_any_layout(case, activation):
    x, dout, axis = _layout_case(case, np.random.default_rng(33))
    C = x.shape[axis]
    p = {"mode": "train"}
    out, cache = bnkernels.forward(x, None, None, dict(p), axis=axis, activation=activation)
    want = bnkernels.backward(dout, cache)
    s1, s2 = bnkernels.backward_reduce(dout, cache)
    split = bnkernels.backward_apply(dout, cache, s1, s2, dout.size // C)
    out_c, cache_c = bnkernels.forward(
        x, None, None, dict(p), axis=axis, activation=activation, comm=_OneRank()
    )
    assert _same_bits(out, out_c)
    synced = bnkernels.backward(dout, cache_c)
    for name, w, a, b in zip(GRAD_NAMES, want, split, synced):
        assert _same_bits(w, a), "backward_reduce + backward_apply: " + name
        assert _same_bits(w, b), "backward over a communicator: " + name


def test_a_seed_style_cache_takes_the_epilogue_keys():
    # as the reference does: a hand-built cache of x_hat, gamma, denom plus the epilogue's
    # keys masks dout by out and returns the residual's gradient
    x, gamma, beta, dout = make_inputs((20, 5), 1, f64, seed=34)
    r = _residual(x.shape, f64, seed=35)
    out, c = bnkernels.forward(x, gamma, beta, {"mode": "train"}, activation="relu", residual=r)
    xhat = (x - c["mean"]) * c["invstd"]
    seed = {"x_hat": xhat, "gamma": gamma, "denom": 1 / c["invstd"]}
    seed.update(activation="relu", residual=True, out=out)
    got = bnkernels.backward(dout, seed)
    want = reference.backward_alt(dout, dict(seed))
    assert len(got) == len(want) == 4
    for name, g, w in zip(GRAD_NAMES, got, want):
        assert_close(g, w, rtol=1e-12, what=name)


def test_relu_cache_without_its_output_is_refused_plainly():
    x, gamma, beta, dout = make_inputs((6, 4), 1, f64, seed=36)
    _, c = bnkernels.forward(x, gamma, beta, {"mode": "train"}, activation="relu")
    c["out"] = None
    with pytest.raises(ValueError, match=r"cache\['out'\] is None"):
        bnkernels.backward(dout, c)
