"""Inputs the face accepts and what it makes of them, beyond the error table of test_errors.py:
integer running statistics, seed-style caches with more keys, cached per-channel vectors in
other forms, the smallest eps, where the
BNKERNELS_L3_BYTES warning points, and the benchmark's output paths."""

import os
import subprocess
import sys

import numpy as np
import pytest

import bnkernels
from bnkernels import _bench

DTYPES = [np.float32, np.float64, np.float16]
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(bnkernels.__file__)))


def _batch(dtype, shape=(16, 4), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 2 + 3).astype(dtype)


# ---------------------------------------------------------------------------
# running statistics that are not floating point
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("given", ["lists", "int arrays"])
def test_integer_running_stats_become_floating_not_truncated(dtype, given):
    x = _batch(dtype)
    gamma, beta = np.ones(4, dtype), np.zeros(4, dtype)
    if given == "lists":
        p_int = {"mode": "train", "running_mean": [0, 0, 0, 0], "running_var": [1, 1, 1, 1]}
    else:
        p_int = {"mode": "train", "running_mean": np.zeros(4, np.int32)}
        p_int["running_var"] = np.ones(4, np.uint8)
    p_float = {
        "mode": "train",
        "running_mean": np.zeros(4, dtype),
        "running_var": np.ones(4, dtype),
    }
    for _ in range(2):
        out_int, _ = bnkernels.forward(x, gamma, beta, p_int)
        out_float, _ = bnkernels.forward(x, gamma, beta, p_float)
    assert np.array_equal(out_int, out_float)
    for key in ("running_mean", "running_var"):
        assert p_int[key].dtype == dtype, key
        assert np.array_equal(p_int[key], p_float[key]), key
    # two steps toward a batch mean near 3: about 0.57, which truncation would make 0
    assert np.all(p_int["running_mean"] > 0.4)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_integer_running_stats_in_test_mode(dtype):
    x = _batch(dtype)
    gamma, beta = np.ones(4, dtype), np.zeros(4, dtype)
    p_int = {"mode": "test", "running_mean": [3, 3, 3, 3], "running_var": [4, 4, 4, 4]}
    p_float = {"mode": "test", "running_mean": np.full(4, 3, dtype)}
    p_float["running_var"] = np.full(4, 4, dtype)
    out_int, _ = bnkernels.forward(x, gamma, beta, p_int)
    out_float, _ = bnkernels.forward(x, gamma, beta, p_float)
    assert np.array_equal(out_int, out_float)
    assert p_int["running_mean"] == [3, 3, 3, 3]  # test mode leaves bn_param alone


def test_real_numbers_of_any_kind_are_accepted():
    x = _batch(np.float64)
    want, _ = bnkernels.forward(x, np.ones(4), np.zeros(4), {"mode": "train", "eps": 0.5})
    for eps in (np.float32(0.5), np.float64(0.5)):
        got, cache = bnkernels.forward(x, np.ones(4), np.zeros(4), {"mode": "train", "eps": eps})
        assert np.array_equal(got, want) and type(cache["eps"]) is float
    for eps, momentum in ((1, 0), (np.int64(2), np.int8(1)), (3, np.float16(0.5))):
        p = {"mode": "train", "eps": eps, "momentum": momentum}
        bnkernels.forward(x, np.ones(4), np.zeros(4), p)
        assert p["running_mean"].dtype == np.float64


# ---------------------------------------------------------------------------
# eps > 0: finite results where eps = 0 gave NaN
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_smallest_eps_one_element_and_constant_channels_are_finite(dtype, eps_mode):
    # the smallest eps accepted: 1/eps is finite in float32 (float16 data) or float64
    eps = float(np.finfo(np.float32 if dtype == np.float16 else np.float64).tiny)
    for x in (_batch(dtype, (1, 4)), np.full((6, 4), 0.1, dtype)):
        gamma, beta = np.full(4, 0.5, dtype), np.full(4, 0.25, dtype)
        out, cache = bnkernels.forward(
            x, gamma, beta, {"mode": "train", "eps": eps, "eps_mode": eps_mode}
        )
        dy = np.ones_like(x) if len(x) > 1 else _batch(dtype, x.shape, seed=1)
        dx, dgamma, dbeta = bnkernels.backward(dy, cache)
        assert np.array_equal(out, np.broadcast_to(beta, x.shape))
        assert np.all(dx == 0) and np.all(dgamma == 0)
        assert np.array_equal(dbeta, dy.sum(axis=0, dtype=np.float64).astype(dtype))


# ---------------------------------------------------------------------------
# caches
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_seed_style_cache_with_more_keys_is_a_seed_style_cache(dtype):
    x = _batch(np.float64, (5, 3))
    mean, var = x.mean(axis=0), x.var(axis=0)
    denom = np.sqrt(var + 1e-5)
    seed = {
        "x_hat": ((x - mean) / denom).astype(dtype),
        "gamma": np.full(3, 1.5, dtype),
        "denom": denom.astype(dtype),
    }
    # what hand-written code often keeps besides: x and invstd, as forward's cache has
    more = dict(seed, x=x.astype(dtype), invstd=(1 / denom).astype(dtype), var=var)
    dout = _batch(dtype, (5, 3), seed=2)
    for got, want in zip(bnkernels.backward(dout, more), bnkernels.backward(dout, seed)):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("form", ["strided", "float32", "lists"])
def test_cached_vectors_in_another_form_give_the_same_gradients(dtype, form):
    """The cache's statistics (mean, invstd, var) as forward made them, or replaced by
    strided views, float32 arrays (exact for these values) or lists, and gamma by a strided
    view (its dtype is the gradients'): the same bits.  The kernels take forward's own
    vectors as they are and convert the others."""
    x = _batch(dtype, (16, 8))
    gamma = np.linspace(0.5, 2.0, 8).astype(dtype)
    out, cache = bnkernels.forward(x, gamma, np.zeros(8, dtype), {"mode": "train"})
    other = dict(cache, gamma=np.repeat(cache["gamma"], 2)[::2])
    for key in ("mean", "invstd", "var"):
        v = np.asarray(cache[key], np.float64)
        if form == "float32":
            v = v.astype(np.float32).astype(np.float64)
            cache[key] = v
            other[key] = v.astype(np.float32)
        elif form == "strided":
            other[key] = np.repeat(v, 2)[::2]
            assert not other[key].flags.c_contiguous
        else:
            other[key] = v.tolist()
    dout = _batch(dtype, (16, 8), seed=4)
    for got, want in zip(bnkernels.backward(dout, other), bnkernels.backward(dout, cache)):
        assert got.dtype == want.dtype
        assert np.array_equal(got, want)


# ---------------------------------------------------------------------------
# the BNKERNELS_L3_BYTES warning names the user's import
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    ["import bnkernels", "importlib.import_module('bnkernels')", "import bnkernels._api"],
)
def test_l3_warning_points_at_the_users_import(tmp_path, statement):
    script = tmp_path / "user_code.py"
    script.write_text(
        "import importlib\nimport warnings\nwarnings.simplefilter('always')\n%s\n" % statement
    )
    env = dict(os.environ, BNKERNELS_L3_BYTES="lots")
    env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("%s:4: RuntimeWarning: BNKERNELS_L3_BYTES" % script), proc.stderr


# ---------------------------------------------------------------------------
# the benchmark checks where it will write before it runs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_bench_refuses_unwritable_output_paths_before_running(
    monkeypatch, tmp_path, capsys, option, where
):
    def run_case(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output paths were checked")

    monkeypatch.setattr(_bench, "run_case", run_case)
    monkeypatch.setattr(_bench, "import_torch", lambda: None)
    path = str(tmp_path / "no" / "such" / "out.json") if where == "missing directory" else "."
    with pytest.raises(SystemExit) as exit_info:
        _bench.main(["--quick", option, path])
    assert exit_info.value.code == 2
    assert "%s %s cannot be written" % (option, path) in capsys.readouterr().err


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("shape", [(64, 5), (8, 5, 3, 3), (6, 3, 40, 40)])
def test_float64_beyond_1e154_is_normalized_not_nan(eps_mode, shape):
    # the squares of the one-pass moments overflow beyond ~1e154, though x - mean and xhat
    # are representable: out, dx, dgamma, dbeta must be those of the same data scaled down
    # (eps far below the variance either way)
    rng = np.random.default_rng(sum(shape))
    base = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    C = shape[1]
    g, b = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
    for scale in (1e200, -1e300):
        x = base * scale
        param = {"mode": "train", "eps_mode": eps_mode}
        out, cache = bnkernels.forward(x, g, b, param)
        ref_out, ref_cache = bnkernels.forward(
            base * np.sign(scale), g, b, {"mode": "train", "eps": 1e-300, "eps_mode": eps_mode}
        )
        dx, dgamma, dbeta = bnkernels.backward(dy, cache)
        ref_dx, ref_dgamma, ref_dbeta = bnkernels.backward(dy, ref_cache)
        assert np.isfinite(out).all() and np.isfinite(dx).all()
        np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx * abs(scale), ref_dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dgamma, ref_dgamma, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dbeta, ref_dbeta, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cache["invstd"] * abs(scale), ref_cache["invstd"], rtol=1e-12)


def test_float64_beyond_1e154_with_a_non_finite_value_stays_nan():
    x = np.full((4, 2), 1e200)
    x[::2] *= -1
    x[0, 1] = np.inf
    out, _ = bnkernels.forward(x, np.ones(2), np.zeros(2), {"mode": "train"})
    np.testing.assert_allclose(out[:, 0], [-1, 1, -1, 1], rtol=1e-12)
    assert np.isnan(out[:, 1]).all()


def test_the_reference_does_not_truncate_integer_running_statistics_either():
    from bnkernels import reference

    x = np.array([[0.0, 1.0], [1.2, 3.6]])
    got, want = {}, {}
    for fn, param in ((bnkernels.forward, got), (reference.forward, want)):
        param.update(
            mode="train", momentum=0.0, running_mean=np.array([0, 0]), running_var=np.array([0, 0])
        )
        fn(x, np.ones(2), np.zeros(2), param)
    for key in ("running_mean", "running_var"):
        assert want[key].dtype.kind == "f"
        np.testing.assert_allclose(got[key], want[key], rtol=1e-15)
        np.testing.assert_allclose(want[key], [0.6, 2.3] if key == "running_mean" else [0.36, 1.69])


@pytest.mark.parametrize(
    "x_dtype, p_dtype", [(np.float16, np.float32), (np.float32, np.float64), (np.float64, None)]
)
def test_integer_running_statistics_take_the_same_dtype_in_the_reference(x_dtype, p_dtype):
    """The wider of x's and the parameters' dtypes, in the kernels and the reference alike."""
    from bnkernels import reference

    x = np.array([[0.0, 1.0], [1.25, 3.5]], dtype=x_dtype)
    gamma = None if p_dtype is None else np.ones(2, p_dtype)
    got, want = {}, {}
    for fn, param in ((bnkernels.forward, got), (reference.forward, want)):
        param.update(mode="train", running_mean=np.array([0, 0]), running_var=np.array([0, 0]))
        fn(x, gamma, None, param)
    for key in ("running_mean", "running_var"):
        assert got[key].dtype == want[key].dtype == np.result_type(x_dtype, p_dtype or x_dtype)
