"""Backward pass: graph (baseline), alt, bnkernels, torch, roofline; one group per case."""

import pytest

from bnkernels import _bench, reference


@pytest.mark.parametrize("impl", _bench.BACKWARD_IMPLS)
def test_backward(bench_run, benchmark, data, impl):
    run = bench_run("backward", impl)
    result = benchmark(run.fn)
    if impl == "bnkernels":
        # once per case, outside the timed calls: a fast wrong answer is no result
        run.check(result, reference.backward_alt(data.dy, data.ref_cache))
