"""bnkernels: compiled CPU kernels for batch normalization, for NumPy code.

    out, cache = bnkernels.forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = bnkernels.backward(dout, cache)

For a batch split across processes: ``forward(..., comm=comm)`` over MPI, or the
split-phase functions ``batch_stats``, ``merge_stats``, ``backward_reduce`` and
``backward_apply``.  ``bnkernels.reference`` holds the pure NumPy implementations the kernels are
tested against.
"""

from ._version import __version__


def _import_kernels():
    """The compiled module: this package's own or, in a source tree without one (Python run
    in a checkout's root finds the tree first), that of an installed build of the same
    version elsewhere on sys.path, whose directory then joins ``__path__``."""
    import importlib
    import os
    import re
    import sys
    from importlib.machinery import PathFinder

    name = __name__ + "._kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        missing = err
    here = os.path.dirname(os.path.realpath(__file__))
    for entry in sys.path:
        spec = PathFinder.find_spec(__name__, [entry])
        for other in (spec and spec.submodule_search_locations) or ():
            try:
                with open(os.path.join(other, "_version.py")) as f:
                    version = re.search(r"__version__\s*=\s*[\"']([^\"']*)", f.read())
            except OSError:
                continue
            if (
                os.path.realpath(other) != here
                and version
                and version.group(1) == __version__
                and PathFinder.find_spec(name, [other]) is not None
            ):
                __path__.append(other)
                return importlib.import_module(name)
    raise ImportError(
        "bnkernels is being imported from a source tree without its compiled kernels (%s); "
        "build them with `pip install -e .` (or `python setup.py build_ext --inplace`), or run "
        "from outside the source tree" % here
    ) from missing


_kernels = _import_kernels()

from . import _api, reference  # noqa: E402
from ._api import backward, forward  # noqa: E402
from ._distributed import backward_apply, backward_reduce, batch_stats, merge_stats  # noqa: E402

__all__ = [
    "forward",
    "backward",
    "batch_stats",
    "merge_stats",
    "backward_reduce",
    "backward_apply",
    "reference",
    "openmp_enabled",
    "max_threads",
    "__version__",
]


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
    inputs, or shapes with fewer tasks than threads, use fewer.  Every count, default or
    requested, is capped at the CPUs this process may use (``os.sched_getaffinity``),
    and is 1 in a process made by ``os.fork()`` (a 'fork' multiprocessing worker):
    GNU OpenMP's threads do not survive a fork.  A call with the default also leaves
    out the CPUs that other runnable tasks hold at the time (``/proc/loadavg``): a
    thread the OS deschedules would stall its whole team.

    Returns
    -------
    int
        The default thread count, >= 1; always 1 for a serial build.
    """
    return _api._n_threads(None, load=False)
