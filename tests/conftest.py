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
