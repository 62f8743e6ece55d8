"""Shared fixtures for the bnkernels tests; the helper functions live in bnhelpers.py."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bnkernels  # noqa: E402
from bnhelpers import openmp_threads  # noqa: E402


def pytest_report_header(config):
    try:
        import threadpoolctl  # noqa: F401

        limiter = "threadpoolctl"
    except ImportError:
        limiter = "omp_set_num_threads (threadpoolctl not installed)"
    return "bnkernels %s: OpenMP %s, %d threads by default; thread limits via %s" % (
        bnkernels.__version__,
        "on" if bnkernels.openmp_enabled() else "off",
        bnkernels.max_threads(),
        limiter,
    )


@pytest.fixture
def omp_threads():
    """The context manager that limits OpenMP threads (for forward, which has no num_threads)."""
    before = bnkernels.max_threads()
    yield openmp_threads
    assert bnkernels.max_threads() == before, "the OpenMP thread limit leaked out of the test"


@pytest.fixture(autouse=True)
def threads_uncapped(monkeypatch):
    """Lift the face's caps on threads (the CPUs this process may use, those the load
    leaves) for in-process tests:
    the thread-count tests ask for more threads than a small machine has (3, 8), so that
    more ways of sharing the tasks are compared.  tests/test_processes.py tests the cap, in
    fresh processes."""
    from bnkernels import _api

    monkeypatch.setattr(_api, "_usable_cpus", lambda: 1 << 10)
    monkeypatch.setattr(_api, "_cpus", 1 << 10)
    # and the load: in-process tests compare thread counts that must not shrink with it
    monkeypatch.setattr(_api, "_busy_cpus", lambda: 0)
