"""bnkernels: compiled CPU kernels for batch normalization, for NumPy code.

    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)

``bnkernels.reference`` holds the pure NumPy implementations the kernels are
tested against.
"""

from . import _kernels, reference
from ._api import backward, forward
from ._version import __version__

__all__ = ["forward", "backward", "reference", "openmp_enabled", "max_threads", "__version__"]


# Thin wrappers rather than re-exports: the compiled functions' own docstrings are one-liners,
# and these are the ones help() shows.
def openmp_enabled() -> bool:
    """Whether the kernels were compiled with OpenMP.

    Returns
    -------
    bool
        True when the kernels can run on several threads; False for a serial build
        (no OpenMP in the compiler, or ``BNKERNELS_NO_OPENMP=1`` at build time),
        which gives the same results on one core.

    See Also
    --------
    max_threads : How many threads the kernels would use now.
    """
    return _kernels.openmp_enabled()


def max_threads() -> int:
    """The most OpenMP threads a kernel call uses by default, read now.

    The kernels ask the OpenMP runtime at every call (``omp_get_max_threads``), so
    this follows ``OMP_NUM_THREADS`` and, at run time,
    ``threadpoolctl.threadpool_limits(n, user_api="openmp")``::

        with threadpool_limits(1, user_api="openmp"):
            bnkernels.max_threads()    # 1, and the kernels run on one thread

    ``bnkernels.backward(..., num_threads=n)`` overrides it for one call.  Small
    inputs, or shapes with fewer tasks than threads, use fewer.

    Returns
    -------
    int
        The default thread count, >= 1; always 1 for a serial build.
    """
    return _kernels.max_threads()
