"""The BatchNorm -> Sigmoid -> MSE network of seed note 002, with bnkernels.backward.

x has shape (samples, channels, H*W); BatchNorm normalizes each channel over samples and
elements with eps = 1e-5; z = sigmoid(y); L = mean((z - t)**2) over every element.
"""

import numpy as np
import pytest

import bnkernels
from bnkernels import reference
from bnhelpers import assert_close, numerical_gradient, rel_error

EPS = 1e-5


def _data(dtype=np.float64, shape=(4, 3, 5 * 6), seed=0):
    rng = np.random.default_rng(seed)
    Ns, Nc, Nk = shape
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, (1, Nc, 1)) + rng.uniform(
        -2, 2, (1, Nc, 1)
    )
    w = rng.uniform(0.5, 1.5, Nc) * rng.choice([-1.0, 1.0], Nc)
    beta = rng.uniform(-0.5, 0.5, Nc)
    t = rng.uniform(0.0, 1.0, shape)
    return x.astype(dtype), w.astype(dtype), beta.astype(dtype), t.astype(dtype)


def _sigmoid(y):
    return 1.0 / (1.0 + np.exp(-y))


def _loss(x, w, beta, t, forward=bnkernels.forward):
    y, _ = forward(x, w, beta, {"mode": "train", "eps": EPS}, axis=1)
    z = _sigmoid(y)
    return float(np.mean((z - t) ** 2))


def _gradients(x, w, beta, t):
    """Forward through the network, then backpropagate with bnkernels.backward."""
    y, cache = bnkernels.forward(x, w, beta, {"mode": "train", "eps": EPS}, axis=1)
    z = _sigmoid(y)
    dL_dz = 2.0 / z.size * (z - t)  # MSE gradient
    dL_dy = (dL_dz * z * (1 - z)).astype(x.dtype)  # sigmoid gradient
    dx, dw, dbeta = bnkernels.backward(dL_dy, cache)
    return y, dL_dy, dx, dw, dbeta


def _closed_form(x, w, beta, dL_dy):
    """dL/dx, dL/dw, dL/dbeta written out as in the note (with sqrt(var + eps))."""
    Ns, Nc, Nk = x.shape
    Ni = Ns * Nk
    xc = np.moveaxis(x, 1, 0).reshape(Nc, Ni)
    g = np.moveaxis(dL_dy, 1, 0).reshape(Nc, Ni)
    mu = xc.mean(axis=1, keepdims=True)
    var = ((xc - mu) ** 2).mean(axis=1, keepdims=True)
    sd = np.sqrt(var + EPS)
    wc = w[:, None]
    y_minus_beta = wc * (xc - mu) / sd
    dw = np.sum(g * y_minus_beta / wc, axis=1)
    dbeta = np.sum(g, axis=1)
    dx = (
        wc / sd * g
        - wc / (Ni * sd) * np.sum(g, axis=1, keepdims=True)
        - y_minus_beta / (Ni * wc * sd) * np.sum(y_minus_beta * g, axis=1, keepdims=True)
    )
    dx = np.moveaxis(dx.reshape(Nc, Ns, Nk), 0, 1)
    return dx, dw, dbeta


@pytest.mark.parametrize("shape", [(4, 3, 30), (1, 2, 12), (6, 1, 9), (3, 5, 1)])
def test_network_gradients_match_numerical(shape):
    x, w, beta, t = _data(np.float64, shape, seed=sum(shape))
    _, _, dx, dw, dbeta = _gradients(x, w, beta, t)

    def loss():
        return _loss(x, w, beta, t)

    assert rel_error(dx, numerical_gradient(loss, x)) < 1e-6
    assert rel_error(dw, numerical_gradient(loss, w)) < 1e-6
    assert rel_error(dbeta, numerical_gradient(loss, beta)) < 1e-6


def test_network_gradients_match_the_notes_closed_form():
    x, w, beta, t = _data(np.float64, (8, 4, 49), seed=1)
    _, dL_dy, dx, dw, dbeta = _gradients(x, w, beta, t)
    want_dx, want_dw, want_dbeta = _closed_form(x, w, beta, dL_dy)
    assert_close(dx, want_dx, np.float64, what="dx")
    assert_close(dw, want_dw, np.float64, what="dw")
    assert_close(dbeta, want_dbeta, np.float64, what="dbeta")


def test_network_forward_matches_reference_loss():
    x, w, beta, t = _data(np.float64, (5, 3, 16), seed=2)
    assert _loss(x, w, beta, t) == pytest.approx(_loss(x, w, beta, t, reference.forward), rel=1e-12)


def test_network_float32_close_to_float64():
    x, w, beta, t = _data(np.float64, (16, 8, 64), seed=3)
    _, _, dx64, dw64, db64 = _gradients(x, w, beta, t)
    x32, w32, b32, t32 = (a.astype(np.float32) for a in (x, w, beta, t))
    _, _, dx32, dw32, db32 = _gradients(x32, w32, b32, t32)
    assert dx32.dtype == np.float32 and dw32.dtype == np.float32 and db32.dtype == np.float32
    assert_close(dx32, dx64, rtol=1e-3, what="dx")
    assert_close(dw32, dw64, rtol=1e-3, what="dw")
    assert_close(db32, db64, rtol=1e-3, what="dbeta")


def test_gradient_step_lowers_the_loss():
    x, w, beta, t = _data(np.float64, (8, 3, 25), seed=4)
    losses = [_loss(x, w, beta, t)]
    for _ in range(5):
        _, _, dx, dw, dbeta = _gradients(x, w, beta, t)
        lr = 0.5
        x = x - lr * dx
        w = w - lr * dw
        beta = beta - lr * dbeta
        losses.append(_loss(x, w, beta, t))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
