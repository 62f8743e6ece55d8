"""Time each pass's sweeps apart, against the benchmark's rooflines, in one process, taking turns.

    python scripts/passes.py CASE [CASE ...] [--threads N] [--seconds S]

For each benchmark case (names as ``python -m bnkernels bench`` lists them): the whole pass
and its two sweeps through the split-phase API, with the data of the benchmark:

    backward         bnkernels.backward
    backward sums    bnkernels.backward_reduce    (reads x and dy once)
    backward output  bnkernels.backward_apply     (reads x and dy again, writes dx)
    forward          bnkernels.forward, train mode
    forward stats    bnkernels.batch_stats        (reads x once)
    forward output   bnkernels.forward with the batch's own statistics (reads x, writes out)
    roofline         the benchmark's backward roofline: read x and dy, write a new array
    roofline mapped  the same into an array allocated once (no fresh pages)
    roofline fwd     the benchmark's forward roofline: read x, write a new array

The output sweeps write fresh arrays, as the whole passes do.  Printed: median ms of each
and its ratio to its pass's roofline.  Compare with ``scripts/traffic.c``, the traffic alone.
"""

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bnkernels  # noqa: E402
from bnkernels import _bench, _kernels  # noqa: E402


def calls(case, threads):
    """{name: callable} of one case's passes, sweeps and rooflines."""
    data = _bench.CaseData(case)
    x, dy, ax = data.x, data.dy, case.axis
    cache = data.bk_cache
    count = x.size // case.channels
    sum_dy, sum_dy_xmu = bnkernels.backward_reduce(dy, cache, num_threads=threads)
    stats = bnkernels.batch_stats(x, axis=ax, num_threads=threads)
    mapped = np.empty_like(x)
    param = {"mode": "train", "eps": _bench.EPS}
    g, b = data.gamma, data.beta
    with _bench.openmp_limit(threads):
        bnkernels.forward(x, g, b, dict(param), axis=ax)  # the forward's first call, warm
    return {
        "backward": lambda: bnkernels.backward(dy, cache, num_threads=threads),
        "backward sums": lambda: bnkernels.backward_reduce(dy, cache, num_threads=threads),
        "backward output": lambda: bnkernels.backward_apply(
            dy, cache, sum_dy, sum_dy_xmu, count, num_threads=threads
        ),
        "forward": lambda: bnkernels.forward(x, g, b, dict(param), axis=ax),
        "forward stats": lambda: bnkernels.batch_stats(x, axis=ax, num_threads=threads),
        "forward output": lambda: bnkernels.forward(x, g, b, dict(param), axis=ax, stats=stats),
        "roofline": lambda: _kernels.stream_add(x, dy, np.empty_like(x), threads),
        "roofline mapped": lambda: _kernels.stream_add(x, dy, mapped, threads),
        "roofline fwd": lambda: _kernels.stream_add(x, x, np.empty_like(x), threads),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("cases", nargs="+", metavar="CASE")
    p.add_argument("--threads", type=int, default=_kernels.max_threads())
    p.add_argument("--seconds", type=float, default=1.0, help="timing budget per call kind")
    args = p.parse_args(argv)
    known = {c.name: c for c in _bench.CASES}
    unknown = [name for name in args.cases if name not in known]
    if unknown:
        p.error("unknown case %s; cases: %s" % (", ".join(unknown), ", ".join(known)))
    budget = _bench.Budget(args.seconds, 5, 100000)
    print(
        "threads=%d, median ms, taking turns; x/roof: against the roofline of its pass"
        % args.threads
    )
    for name in args.cases:
        fns = calls(known[name], args.threads)
        with _bench.openmp_limit(args.threads):  # forward takes its threads from OpenMP
            t = _bench.measure_turns(fns, budget)
        print(name)
        for call, timing in t.items():
            roof = t["roofline fwd" if call.startswith("forward") else "roofline"].median
            print("  %-16s %9.3f   x/roof %.2f" % (call, timing.median * 1e3, timing.median / roof))


if __name__ == "__main__":
    main()
