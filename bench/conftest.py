"""pytest-benchmark suite: bnkernels against the NumPy reference, PyTorch and a roofline.

    pytest bench                          # time everything (several minutes)
    pytest bench --benchmark-disable      # run each benchmark once: keeps the suite alive
    pytest bench -k nhwc --bench-threads 1

The cases, the seeded data and the timed callables are those of
``python -m bnkernels bench`` (bnkernels._bench), so both time the same thing.
"""

import numpy as np
import pytest

import bnkernels
from bnkernels import _bench


def pytest_addoption(parser):
    parser.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help="threads for every implementation (default: the OpenMP default)",
    )


@pytest.fixture(scope="session")
def threads(request):
    n = request.config.getoption("--bench-threads")
    return n if n else bnkernels.max_threads()


# Session scope with one parameter per case: pytest groups the tests by case, so each
# case's arrays are built once and dropped before the next case's.
@pytest.fixture(scope="session", params=_bench.CASES, ids=lambda c: c.name)
def data(request):
    return _bench.CaseData(request.param)


@pytest.fixture(scope="session")
def torch_or_none():
    return _bench.import_torch()


def _close(got, want, dtype):
    """Largest error relative to the largest magnitude, within a dtype's tolerance."""
    # float16: the reference computes in float32 and rounds to float16 at every step
    tol = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 2e-3}.get(np.dtype(dtype), 1e-9)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want))) or 1.0
    err = float(np.max(np.abs(got - want))) / scale
    return err <= tol, err


class Run:
    """What one benchmark test needs: the callable, its group, and the sanity checks."""

    def __init__(self, benchmark, data, threads, pass_, impl, torch):
        case = data.case
        if impl == "torch" and torch is None:
            pytest.skip("torch is not installed")
        if torch is not None:
            torch.set_num_threads(threads)
        fns = (data.backward_fns if pass_ == "backward" else data.forward_fns)(threads, torch)
        self.fn = fns[impl]
        self.benchmark, self.data = benchmark, data
        benchmark.group = "%s %s" % (pass_, case.name)
        benchmark.extra_info.update(
            case=case.name,
            shape=list(case.shape),
            dtype=case.dtype,
            layout=case.layout,
            threads=threads,
            impl=impl,
            pass_=pass_,
        )

    def check(self, got, want):
        for name, g, w in zip(("first output", "dgamma", "dbeta"), got, want):
            ok, err = _close(g, w, self.data.case.dtype)
            assert ok, "bnkernels %s differs from the reference on %s: relative error %.1e" % (
                name,
                self.data.case.name,
                err,
            )


@pytest.fixture
def bench_run(benchmark, data, threads, torch_or_none):
    """bench_run(pass_, impl) -> Run for this test's case (skips torch when it is missing)."""
    return lambda pass_, impl: Run(benchmark, data, threads, pass_, impl, torch_or_none)
