"""What bad input gets: every error path of bnkernels.forward and bnkernels.backward.

ERROR_CASES is the single table of cases: (name, call, exc, match), where call is a
zero-argument callable that must raise exc with a message matching the regex match.
"""

import builtins
import json
import os
import signal
import subprocess
import sys
from typing import Callable, NamedTuple

import numpy as np
import pytest

import bnkernels


class ErrorCase(NamedTuple):
    name: str  # short human description of the bad input
    call: Callable[[], object]  # zero-argument callable that must raise
    exc: type[BaseException]  # the exception class it must raise
    match: str  # regex searched in the message


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def _x(shape=(2, 4), dtype=np.float64):
    return np.arange(np.prod(shape), dtype=np.float64).reshape(shape).astype(dtype) % 7 + 0.5


def _c(n=4, dtype=np.float64, value=1.0):
    return np.full(n, value, dtype=dtype)


def _fwd(x=None, gamma=None, beta=None, bn_param=None, **kw):
    """forward on x (default (2, 4) float64) with 4-channel gamma and beta unless given."""
    x = _x() if x is None else x
    dtype = x.dtype if x.dtype.kind == "f" else np.float64
    gamma = _c(4, dtype) if gamma is None else gamma
    beta = _c(4, dtype, 0.0) if beta is None else beta
    bn_param = {"mode": "train"} if bn_param is None else bn_param
    return lambda: bnkernels.forward(x, gamma, beta, bn_param, **kw)


def _cache(shape=(2, 4), dtype=np.float64, **bn):
    bn_param = {"mode": "train"}
    bn_param.update(bn)
    x = _x(shape, dtype)
    C = shape[1]
    return bnkernels.forward(x, _c(C, dtype), _c(C, dtype, 0.0), bn_param)[1]


def _seed_cache(shape=(5, 3), dtype=np.float64, **override):
    x = _x(shape, np.float64)
    denom = np.sqrt(x.var(axis=0) + 1e-5)
    cache = {
        "x_hat": ((x - x.mean(axis=0)) / denom).astype(dtype),
        "gamma": np.ones(shape[1], dtype),
        "denom": denom.astype(dtype),
    }
    cache.update(override)
    return cache


def _bwd(dout, cache, **kw):
    return lambda: bnkernels.backward(dout, cache, **kw)


def _without(d, *keys):
    return {k: v for k, v in d.items() if k not in keys}


_REPO = os.path.dirname(os.path.dirname(os.path.abspath(bnkernels.__file__)))

_CHILD = """
import json, sys
import numpy as np
import bnkernels
try:
{body}
except BaseException as e:
    print(json.dumps({{"type": type(e).__name__, "message": str(e)}}))
    sys.exit(0)
print(json.dumps({{"type": None}}))
"""


def _isolated(src):
    """Run src in a child interpreter (it may crash the process); re-raise what it raised."""

    def call():
        body = "\n".join("    " + line for line in src.strip().splitlines())
        env = dict(os.environ)
        env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD.format(body=body)],
            cwd=_REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode < 0:
            raise RuntimeError(
                "the process crashed: killed by %s; stderr: %s"
                % (signal.Signals(-proc.returncode).name, proc.stderr[-500:])
            )
        if proc.returncode != 0:
            raise RuntimeError("the child exited with %d: %s" % (proc.returncode, proc.stderr))
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["type"] is None:
            return None
        cls = getattr(builtins, report["type"], None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            raise cls(report["message"])
        raise RuntimeError("%s: %s" % (report["type"], report["message"]))

    return call


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------

f32, f64, f16 = np.float32, np.float64, np.float16

ERROR_CASES = [
    # --- forward: dtypes
    ErrorCase(
        "x is an integer array",
        _fwd(x=np.ones((2, 4), np.int64)),
        TypeError,
        r"x must be a floating-point array.*int64",
    ),
    ErrorCase(
        "x is a complex array",
        _fwd(x=np.ones((2, 4), np.complex128)),
        TypeError,
        r"x must be a floating-point array.*complex128",
    ),
    ErrorCase(
        "x is an object array",
        _fwd(x=np.ones((2, 4), object)),
        TypeError,
        r"x must be a floating-point array.*object",
    ),
    ErrorCase(
        "x is a boolean array",
        _fwd(x=np.ones((2, 4), bool)),
        TypeError,
        r"x must be a floating-point array.*bool",
    ),
    ErrorCase(
        "gamma is a boolean array",
        _fwd(gamma=np.ones(4, bool)),
        TypeError,
        r"gamma must be a floating-point \(or integer\) array.*bool",
    ),
    ErrorCase(
        "beta is a complex array",
        _fwd(beta=np.ones(4, np.complex64)),
        TypeError,
        r"beta must be a floating-point \(or integer\) array.*complex64",
    ),
    ErrorCase(
        "gamma is an object array",
        _fwd(gamma=np.ones(4, object)),
        TypeError,
        r"gamma must be a floating-point \(or integer\) array.*object",
    ),
    ErrorCase(
        "beta holds strings",
        _fwd(beta=np.array(list("0000"))),
        TypeError,
        r"beta must be a floating-point \(or integer\) array.*<U1",
    ),
    ErrorCase(
        "float16 gamma is a boolean array",
        _fwd(x=_x(dtype=f16), gamma=np.ones(4, bool), beta=_c(4, f32)),
        TypeError,
        r"gamma must be a floating-point \(or integer\) array.*bool",
    ),
    ErrorCase(
        "x is a masked array",
        _fwd(x=np.ma.masked_greater(_x(), 5)),
        TypeError,
        r"x is a masked array \(numpy\.ma\).*\.filled\(value\)",
    ),
    # --- forward: shapes and axis
    ErrorCase(
        "gamma length differs from the channel count",
        _fwd(gamma=_c(3)),
        ValueError,
        r"gamma must have shape \(4,\).*\(2, 4\).*got \(3,\)",
    ),
    ErrorCase(
        "beta length differs from the channel count",
        _fwd(beta=_c(5)),
        ValueError,
        r"beta must have shape \(4,\).*\(2, 4\).*got \(5,\)",
    ),
    ErrorCase(
        "gamma is 2-D (1, C)",
        _fwd(gamma=np.ones((1, 4))),
        ValueError,
        r"gamma must have shape \(4,\).*got \(1, 4\)",
    ),
    ErrorCase(
        "gamma sized for channels-last but axis=1",
        _fwd(x=_x((2, 3, 5, 6)), gamma=_c(6), beta=_c(6), axis=1),
        ValueError,
        r"gamma must have shape \(3,\).*\(2, 3, 5, 6\).*got \(6,\)",
    ),
    ErrorCase(
        "axis beyond the last axis",
        _fwd(x=_x((2, 3, 4, 4)), axis=4),
        ValueError,
        r"axis 4 is out of range.*ndim 4",
    ),
    ErrorCase(
        "negative axis beyond the first axis",
        _fwd(x=_x((2, 3, 4, 4)), axis=-5),
        ValueError,
        r"axis -5 is out of range.*ndim 4",
    ),
    ErrorCase("axis 0 (the batch axis)", _fwd(axis=0), ValueError, r"axis 0 is the batch axis"),
    ErrorCase("axis is a float", _fwd(axis=1.0), TypeError, r"axis must be an int, got 1\.0"),
    ErrorCase("x is 1-D", _fwd(x=np.ones(4)), ValueError, r"ndim >= 2.*got ndim 1"),
    ErrorCase("x is a 0-D scalar", _fwd(x=np.array(1.0)), ValueError, r"ndim >= 2.*got ndim 0"),
    ErrorCase(
        "empty batch (N = 0)", _fwd(x=np.ones((0, 4))), ValueError, r"x is empty \(shape \(0, 4\)\)"
    ),
    ErrorCase(
        "empty batch of images (N = 0, NCHW)",
        _fwd(x=np.ones((0, 3, 4, 4)), gamma=_c(3), beta=_c(3)),
        ValueError,
        r"x is empty \(shape \(0, 3, 4, 4\)\)",
    ),
    ErrorCase(
        "no channels (C = 0)",
        _fwd(x=np.ones((5, 0)), gamma=_c(0), beta=_c(0)),
        ValueError,
        r"x is empty \(shape \(5, 0\)\)",
    ),
    ErrorCase(
        "empty spatial axis (H = 0)",
        _fwd(x=np.ones((2, 3, 0, 4)), gamma=_c(3), beta=_c(3)),
        ValueError,
        r"x is empty \(shape \(2, 3, 0, 4\)\)",
    ),
    ErrorCase(
        "empty float16 batch",
        _fwd(x=np.ones((0, 4), f16), gamma=_c(4, f16), beta=_c(4, f16)),
        ValueError,
        r"x is empty \(shape \(0, 4\)\)",
    ),
    # --- forward: bn_param
    ErrorCase(
        "bn_param is not a dict",
        _fwd(bn_param=[("mode", "train")]),
        TypeError,
        r"bn_param must be a dict, got list",
    ),
    ErrorCase(
        "bn_param has no 'mode'",
        _fwd(bn_param={"eps": 1e-5}),
        ValueError,
        r"bn_param\['mode'\] is required",
    ),
    ErrorCase(
        "bn_param 'mode' is not 'train' or 'test'",
        _fwd(bn_param={"mode": "training"}),
        ValueError,
        r"bn_param\['mode'\] must be 'train' or 'test', got 'training'",
    ),
    ErrorCase(
        "bn_param 'mode' is None",
        _fwd(bn_param={"mode": None}),
        ValueError,
        r"bn_param\['mode'\] must be 'train' or 'test', got None",
    ),
    ErrorCase(
        "bn_param 'mode' is invalid for float16 x",
        _fwd(x=_x(dtype=f16), gamma=_c(4, f16), beta=_c(4, f16), bn_param={"mode": "eval"}),
        ValueError,
        r"bn_param\['mode'\] must be 'train' or 'test', got 'eval'",
    ),
    ErrorCase(
        "bn_param 'eps_mode' is not 'var' or 'std'",
        _fwd(bn_param={"mode": "train", "eps_mode": "sqrt"}),
        ValueError,
        r"bn_param\['eps_mode'\] must be 'var' or 'std', got 'sqrt'",
    ),
    ErrorCase(
        "bn_param 'eps' is 0",
        _fwd(bn_param={"mode": "train", "eps": 0}),
        ValueError,
        r"bn_param\['eps'\] must be a finite number > 0.*got 0\.0",
    ),
    ErrorCase(
        "bn_param 'eps' is negative",
        _fwd(bn_param={"mode": "train", "eps": -1e-5}),
        ValueError,
        r"bn_param\['eps'\] must be a finite number > 0.*got -1e-05",
    ),
    ErrorCase(
        "bn_param 'eps' is NaN",
        _fwd(bn_param={"mode": "test", "eps": float("nan")}),
        ValueError,
        r"bn_param\['eps'\] must be a finite number > 0.*got nan",
    ),
    ErrorCase(
        "bn_param 'eps' is a string",
        _fwd(bn_param={"mode": "train", "eps": "1e-5"}),
        TypeError,
        r"bn_param\['eps'\] must be a real number.*'1e-5' of type str",
    ),
    ErrorCase(
        "bn_param 'momentum' is NaN",
        _fwd(bn_param={"mode": "train", "momentum": float("nan")}),
        ValueError,
        r"bn_param\['momentum'\] must be a finite number or None, got nan",
    ),
    ErrorCase(
        "bn_param 'num_batches_tracked' is a float",
        _fwd(bn_param={"mode": "train", "num_batches_tracked": 2.0}),
        TypeError,
        r"bn_param\['num_batches_tracked'\] must be an int >= 0, got 2\.0",
    ),
    ErrorCase(
        "bn_param 'num_batches_tracked' is negative",
        _fwd(bn_param={"mode": "train", "momentum": None, "num_batches_tracked": -1}),
        ValueError,
        r"bn_param\['num_batches_tracked'\] must be an int >= 0, got -1",
    ),
    ErrorCase(
        "bn_param 'momentum' is a string",
        _fwd(bn_param={"mode": "train", "momentum": "0.9"}),
        TypeError,
        r"bn_param\['momentum'\] must be a real number.*'0\.9' of type str",
    ),
    ErrorCase(
        "bn_param 'running_mean' holds strings",
        _fwd(bn_param={"mode": "train", "running_mean": np.array(list("0000"))}),
        TypeError,
        r"bn_param\['running_mean'\] must be a floating-point \(or integer\) array.*<U1",
    ),
    ErrorCase(
        "bn_param 'running_var' is a boolean array",
        _fwd(bn_param={"mode": "test", "running_var": np.ones(4, bool)}),
        TypeError,
        r"bn_param\['running_var'\] must be a floating-point \(or integer\).*bool",
    ),
    ErrorCase(
        "bn_param 'running_var' is a masked array",
        _fwd(bn_param={"mode": "train", "running_var": np.ma.array(_c(4), mask=[0, 1, 0, 0])}),
        TypeError,
        r"bn_param\['running_var'\] is a masked array \(numpy\.ma\)",
    ),
    ErrorCase(
        "bn_param 'running_mean' has the wrong length",
        _fwd(bn_param={"mode": "train", "running_mean": _c(3)}),
        ValueError,
        r"running_mean'\] must have shape \(4,\).*got \(3,\)",
    ),
    ErrorCase(
        "bn_param 'running_var' has the wrong length",
        _fwd(bn_param={"mode": "test", "running_var": _c(5)}),
        ValueError,
        r"running_var'\] must have shape \(4,\).*got \(5,\)",
    ),
    # --- forward: the fused epilogue
    ErrorCase(
        "activation is not None or 'relu'",
        _fwd(activation="sigmoid"),
        ValueError,
        r"activation must be None or 'relu'",
    ),
    ErrorCase(
        "residual shape differs from x",
        _fwd(residual=np.ones((2, 3))),
        ValueError,
        r"residual",
    ),
    ErrorCase(
        "residual dtype differs from x",
        _fwd(residual=np.ones((2, 4), f32)),
        TypeError,
        r"residual.*float32",
    ),
    # --- backward: dout
    ErrorCase(
        "dout shape differs from x",
        _bwd(np.ones((3, 4)), _cache((2, 4))),
        ValueError,
        r"dout has shape \(3, 4\) but the cached input has shape \(2, 4\)",
    ),
    ErrorCase(
        "dout is the transpose of x",
        _bwd(np.ones((4, 2)), _cache((2, 4))),
        ValueError,
        r"dout has shape \(4, 2\) but the cached input has shape \(2, 4\)",
    ),
    ErrorCase(
        "dout dtype differs from the cache",
        _bwd(np.ones((2, 4), f32), _cache((2, 4), f64)),
        TypeError,
        r"dout float32 and cache float64",
    ),
    ErrorCase(
        "float64 dout with a float32 cache",
        _bwd(np.ones((2, 4), f64), _cache((2, 4), f32)),
        TypeError,
        r"dout float64 and cache float32",
    ),
    ErrorCase(
        "float16 dout with a float32 cache",
        _bwd(np.ones((2, 4), f16), _cache((2, 4), f32)),
        TypeError,
        r"dout float16 and cache float32",
    ),
    ErrorCase(
        "dout is an integer array",
        _bwd(np.ones((2, 4), np.int64), _cache()),
        TypeError,
        r"dout must be a floating-point array.*int64",
    ),
    ErrorCase(
        "dout is a complex array",
        _bwd(np.ones((2, 4), np.complex128), _cache()),
        TypeError,
        r"dout must be a floating-point array.*complex128",
    ),
    ErrorCase(
        "dout is a masked array",
        _bwd(np.ma.masked_less(np.ones((2, 4)), 0), _cache()),
        TypeError,
        r"dout is a masked array \(numpy\.ma\)",
    ),
    # --- backward: num_threads
    ErrorCase(
        "num_threads is 0",
        _bwd(np.ones((2, 4)), _cache(), num_threads=0),
        ValueError,
        r"num_threads must be None or >= 1, got 0",
    ),
    ErrorCase(
        "num_threads is negative",
        _bwd(np.ones((2, 4)), _cache(), num_threads=-2),
        ValueError,
        r"num_threads must be None or >= 1, got -2",
    ),
    ErrorCase(
        "num_threads is 0 with float16",
        _bwd(np.ones((2, 4), f16), _cache((2, 4), f16), num_threads=0),
        ValueError,
        r"num_threads must be None or >= 1, got 0",
    ),
    ErrorCase(
        "num_threads is a float",
        _bwd(np.ones((2, 4)), _cache(), num_threads=2.0),
        TypeError,
        r"num_threads must be None or a positive int, got 2\.0",
    ),
    ErrorCase(
        "num_threads is a bool",
        _bwd(np.ones((2, 4)), _cache(), num_threads=True),
        TypeError,
        r"num_threads must be None or a positive int, got True",
    ),
    # --- backward: the cache
    ErrorCase(
        "cache is a tuple (a hand-written forward's)",
        _bwd(np.ones((2, 4)), (np.ones((2, 4)), np.ones(4))),
        TypeError,
        r"cache must be the dict returned by bnkernels.forward, got tuple.*"
        r"\{'x_hat': x_hat, 'gamma': gamma, 'denom': np\.sqrt\(var \+ eps\)\}",
    ),
    ErrorCase(
        "cache is None",
        _bwd(np.ones((2, 4)), None),
        TypeError,
        r"cache must be the dict returned by bnkernels.forward, got NoneType.*"
        r"\{'x_hat': x_hat, 'gamma': gamma, 'denom': np\.sqrt\(var \+ eps\)\}",
    ),
    ErrorCase(
        "forward cache missing 'mean' and 'axis'",
        _bwd(np.ones((2, 4)), _without(_cache(), "mean", "axis")),
        ValueError,
        r"cache is missing 'mean', 'axis'",
    ),
    ErrorCase(
        "cache of neither kind",
        _bwd(np.ones((2, 4)), {"x": np.ones((2, 4))}),
        ValueError,
        r"cache must come from bnkernels.forward.*seed-style dict",
    ),
    ErrorCase(
        "seed-style cache without 'denom'",
        _bwd(np.ones((5, 3)), _without(_seed_cache(), "denom")),
        ValueError,
        r"seed-style dict with keys x_hat, gamma, denom",
    ),
    ErrorCase(
        "seed-style cache with a 1-D x_hat",
        _bwd(np.ones(5), _seed_cache(x_hat=np.ones(5))),
        ValueError,
        r"batch norm needs cache\['x_hat'\] with ndim >= 2.*got ndim 1",
    ),
    ErrorCase(
        "seed-style cache 'axis' is 0",
        _bwd(np.ones((5, 3, 2)), _seed_cache(x_hat=np.ones((5, 3, 2)), axis=0)),
        ValueError,
        r"cache\['axis'\] 0 is the batch axis",
    ),
    ErrorCase(
        "seed-style cache 'axis' beyond x_hat's axes",
        _bwd(np.ones((5, 2, 3)), _seed_cache(x_hat=np.ones((5, 2, 3)), axis=3)),
        ValueError,
        r"cache\['axis'\] 3 is out of range for cache\['x_hat'\] with ndim 3",
    ),
    ErrorCase(
        "seed-style cache of a channels-last x_hat without 'axis'",
        _bwd(np.ones((5, 2, 3)), _seed_cache(x_hat=np.ones((5, 2, 3)))),
        ValueError,
        r"cache\['denom'\] must have shape \(2,\).*\(5, 2, 3\).*got \(3,\)",
    ),
    ErrorCase(
        "seed-style cache 'gamma' is a boolean array",
        _bwd(np.ones((5, 3)), _seed_cache(gamma=np.ones(3, bool))),
        TypeError,
        r"cache\['gamma'\] must be a floating-point \(or integer\) array.*bool",
    ),
    ErrorCase(
        "seed-style cache 'denom' has the wrong length",
        _bwd(np.ones((5, 3)), _seed_cache(denom=np.ones(4))),
        ValueError,
        r"cache\['denom'\] must have shape \(3,\).*\(5, 3\).*got \(4,\)",
    ),
    ErrorCase(
        "seed-style cache 'gamma' has the wrong length",
        _bwd(np.ones((5, 3)), _seed_cache(gamma=np.ones(2))),
        ValueError,
        r"cache\['gamma'\] must have shape \(3,\).*got \(2,\)",
    ),
    ErrorCase(
        "seed-style cache 'x_hat' is an integer array",
        _bwd(np.ones((5, 3)), _seed_cache(x_hat=np.ones((5, 3), np.int64))),
        TypeError,
        r"cache\['x_hat'\] must be a floating-point array.*int64",
    ),
    ErrorCase(
        "dout dtype differs from a seed-style cache",
        _bwd(np.ones((5, 3), f32), _seed_cache(dtype=f64)),
        TypeError,
        r"dout float32 and cache float64",
    ),
    ErrorCase(
        "dout shape differs from a seed-style cache",
        _bwd(np.ones((6, 3)), _seed_cache()),
        ValueError,
        r"dout has shape \(6, 3\) but the cached input has shape \(5, 3\)",
    ),
    ErrorCase(
        "cache 'x' is a masked array",
        _bwd(np.ones((2, 4)), dict(_cache(), x=np.ma.masked_greater(_x(), 5))),
        TypeError,
        r"cache\['x'\] is a masked array \(numpy\.ma\)",
    ),
    ErrorCase(
        "cache 'mode' is not 'train' or 'test'",
        _bwd(np.ones((2, 4)), dict(_cache(), mode="bogus")),
        ValueError,
        r"cache\['mode'\] must be 'train' or 'test', got 'bogus'",
    ),
    ErrorCase(
        "cache 'eps_mode' is not 'var' or 'std'",
        _bwd(np.ones((2, 4)), dict(_cache(), eps_mode="bogus")),
        ValueError,
        r"cache\['eps_mode'\] must be 'var' or 'std', got 'bogus'",
    ),
    ErrorCase(
        "cache 'eps' is 0",
        _bwd(np.ones((2, 4)), dict(_cache(), eps=0.0)),
        ValueError,
        r"cache\['eps'\] must be a finite number > 0.*got 0\.0",
    ),
    ErrorCase(
        "cache 'x' has another shape",
        _bwd(np.ones((2, 5)), dict(_cache(), x=_x((2, 5)))),
        ValueError,
        r"cache\['x'\] has shape \(2, 5\).*statistics are for 4 channels",
    ),
    ErrorCase(
        "cache 'axis' changed",
        _bwd(np.ones((2, 3, 4, 4)), dict(_cache((2, 3, 4, 4)), axis=2)),
        ValueError,
        r"cache\['axis'\] is 2.*3 channels, the length of axis 1 of cache\['x'\]",
    ),
    ErrorCase(
        "cache 'axis' is 0",
        _bwd(np.ones((2, 4)), dict(_cache(), axis=0)),
        ValueError,
        r"cache\['axis'\] 0 is the batch axis",
    ),
    ErrorCase(
        "cache 'gamma' is a complex array",
        _bwd(np.ones((2, 4)), dict(_cache(), gamma=np.ones(4, np.complex128))),
        TypeError,
        r"cache\['gamma'\] must be a floating-point \(or integer\) array.*complex128",
    ),
    ErrorCase(
        "cache 'mean' is an integer array",
        _bwd(np.ones((2, 4)), dict(_cache(), mean=np.zeros(4, np.int64))),
        TypeError,
        r"cache\['mean'\] must be a floating-point array.*int64",
    ),
    # --- backward: empty batches
    ErrorCase(
        "seed-style cache with an empty batch (N = 0)",
        _isolated("""
cache = {"x_hat": np.zeros((0, 3)), "gamma": np.ones(3), "denom": np.ones(3)}
bnkernels.backward(np.zeros((0, 3)), cache)
"""),
        ValueError,
        r"dout is empty \(shape \(0, 3\)\)",
    ),
    ErrorCase(
        "float16 seed-style cache with an empty batch (N = 0)",
        _bwd(
            np.zeros((0, 3), f16),
            {"x_hat": np.zeros((0, 3), f16), "gamma": np.ones(3, f16), "denom": np.ones(3, f16)},
        ),
        ValueError,
        r"dout is empty \(shape \(0, 3\)\)",
    ),
    ErrorCase(
        "seed-style cache with no channels (D = 0)",
        _isolated("""
cache = {"x_hat": np.zeros((5, 0)), "gamma": np.ones(0), "denom": np.ones(0)}
bnkernels.backward(np.zeros((5, 0)), cache)
"""),
        ValueError,
        r"dout is empty \(shape \(5, 0\)\)",
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.name for c in ERROR_CASES])
def test_error(case):
    with pytest.raises(case.exc, match=case.match):
        case.call()


def test_error_case_names_are_unique_and_readable():
    names = [c.name for c in ERROR_CASES]
    assert len(names) == len(set(names))
    for c in ERROR_CASES:
        assert c.name and c.name == c.name.strip() and "\n" not in c.name
        assert callable(c.call)
        assert isinstance(c.exc, type) and issubclass(c.exc, Exception)
        assert c.match
