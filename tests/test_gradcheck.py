"""Numerical gradient checks (centered differences, float64) of the reference and the kernels.

The loss is sum(out * w) with a random w, so dout = w.
"""

import itertools

import numpy as np
import pytest

import bnkernels
from bnkernels import reference
from bnhelpers import make_inputs, numerical_gradient, rel_error, seed_forward

THRESHOLD = 1e-6

# one small shape per rank; with axis=-1 the last axis holds the channels
SHAPES = {2: (6, 3), 3: (3, 2, 4), 4: (2, 3, 2, 3), 5: (2, 2, 2, 2, 3)}

IMPLS = {
    "kernels": (bnkernels.forward, bnkernels.backward),
    "reference.backward_graph": (reference.forward, reference.backward_graph),
    "reference.backward_alt": (reference.forward, reference.backward_alt),
}

GRID = list(itertools.product(IMPLS, SHAPES, (1, -1), ("var", "std"), ("train", "test")))


def _running_stats(C, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(C), rng.uniform(0.5, 2.0, C)


def _check(forward, backward, x, gamma, beta, w, bn_param, axis, threshold=THRESHOLD):
    def loss():
        out, _ = forward(x, gamma, beta, dict(bn_param), axis=axis)
        return float(np.sum(out * w))

    _, cache = forward(x, gamma, beta, dict(bn_param), axis=axis)
    dx, dgamma, dbeta = backward(w, cache)
    errors = {
        "dx": rel_error(dx, numerical_gradient(loss, x)),
        "dgamma": rel_error(dgamma, numerical_gradient(loss, gamma)),
        "dbeta": rel_error(dbeta, numerical_gradient(loss, beta)),
    }
    worst = max(errors.values())
    assert worst < threshold, errors
    return errors


@pytest.mark.parametrize(
    "impl,ndim,axis,eps_mode,mode", GRID, ids=["-".join(map(str, g)) for g in GRID]
)
def test_gradient_matches_centered_differences(impl, ndim, axis, eps_mode, mode):
    forward, backward = IMPLS[impl]
    shape = SHAPES[ndim]
    x, gamma, beta, w = make_inputs(shape, axis, np.float64, seed=10 * ndim + (axis > 0))
    C = shape[axis]
    rm, rv = _running_stats(C, seed=ndim)
    bn_param = {"mode": mode, "eps_mode": eps_mode, "running_mean": rm, "running_var": rv}
    _check(forward, backward, x, gamma, beta, w, bn_param, axis)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.5])
@pytest.mark.parametrize("eps_mode", ["var", "std"])
def test_gradient_for_several_eps(eps, eps_mode):
    x, gamma, beta, w = make_inputs((5, 4), 1, np.float64, seed=7, scale=0.3)
    bn_param = {"mode": "train", "eps": eps, "eps_mode": eps_mode}
    _check(bnkernels.forward, bnkernels.backward, x, gamma, beta, w, bn_param, 1)


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_gradient_for_a_middle_channel_axis(axis):
    shape = (2, 3, 4, 2)
    x, gamma, beta, w = make_inputs(shape, axis, np.float64, seed=axis)
    _check(bnkernels.forward, bnkernels.backward, x, gamma, beta, w, {"mode": "train"}, axis)


@pytest.mark.parametrize(
    "backward",
    [bnkernels.backward, reference.backward_graph, reference.backward_alt],
    ids=["kernels", "reference.backward_graph", "reference.backward_alt"],
)
def test_gradient_with_seed_style_cache(backward):
    x, gamma, beta, w = make_inputs((7, 5), 1, np.float64, seed=3)
    eps = 1e-5

    def loss():
        return float(np.sum(seed_forward(x, gamma, beta, eps)[0] * w))

    _, cache = seed_forward(x, gamma, beta, eps)
    dx, dgamma, dbeta = backward(w, cache)
    assert rel_error(dx, numerical_gradient(loss, x)) < THRESHOLD
    assert rel_error(dgamma, numerical_gradient(loss, gamma)) < THRESHOLD
    assert rel_error(dbeta, numerical_gradient(loss, beta)) < THRESHOLD


def test_gradient_through_a_reference_cache():
    """bnkernels.backward on the cache of reference.forward matches the numerical gradient."""
    x, gamma, beta, w = make_inputs((3, 4, 5), 1, np.float64, seed=11)

    def loss():
        return float(np.sum(reference.forward(x, gamma, beta, {"mode": "train"})[0] * w))

    _, cache = reference.forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(w, cache)
    assert rel_error(dx, numerical_gradient(loss, x)) < THRESHOLD
    assert rel_error(dgamma, numerical_gradient(loss, gamma)) < THRESHOLD
    assert rel_error(dbeta, numerical_gradient(loss, beta)) < THRESHOLD


def test_loss_with_nonlinear_downstream():
    """dout that depends on out (loss = sum(sin(out) * w)) exercises the chain rule."""
    x, gamma, beta, w = make_inputs((4, 3, 5), 1, np.float64, seed=5)

    def loss():
        out, _ = bnkernels.forward(x, gamma, beta, {"mode": "train"})
        return float(np.sum(np.sin(out) * w))

    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(np.cos(out) * w, cache)
    assert rel_error(dx, numerical_gradient(loss, x)) < THRESHOLD
    assert rel_error(dgamma, numerical_gradient(loss, gamma)) < THRESHOLD
    assert rel_error(dbeta, numerical_gradient(loss, beta)) < THRESHOLD
