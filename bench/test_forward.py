"""Forward pass (train mode): reference, bnkernels, torch, roofline; one group per case."""

import pytest

from bnkernels import _bench, reference


@pytest.mark.parametrize("impl", _bench.FORWARD_IMPLS)
def test_forward(bench_run, benchmark, data, threads, impl):
    run = bench_run("forward", impl)
    # bnkernels.forward takes its thread count from OpenMP: set it around the whole run
    with _bench.openmp_limit(threads):
        result = benchmark(run.fn)
    if impl == "bnkernels":
        case = data.case
        out, _ = reference.forward(
            data.x, data.gamma, data.beta, {"mode": "train", "eps": _bench.EPS}, axis=case.axis
        )
        run.check(result[:1], [out])
