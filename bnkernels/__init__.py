"""bnkernels: compiled CPU kernels for batch normalization, for NumPy code.

    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)

``bnkernels.reference`` holds the pure NumPy implementations the kernels are
tested against.
"""

from . import reference
from ._api import backward, forward
from ._kernels import max_threads, openmp_enabled
from ._version import __version__

__all__ = ["forward", "backward", "reference", "openmp_enabled", "max_threads", "__version__"]
