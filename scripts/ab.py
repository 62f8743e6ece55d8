"""Time this tree's bnkernels against another build of it, in one process, taking turns.

    python scripts/ab.py OTHER [--cases PATTERN] [--shape LAYOUT:SHAPE:DTYPE ...]
                               [--pass PASS] [--threads N] [--seconds S]
                               [--params DTYPE] [--float16-code KIND] [--other-l3 BYTES]

OTHER is a directory holding a built ``bnkernels`` package (a checkout of another commit
after ``python setup.py build_ext --inplace``).  Both packages are imported side by side
(the other one under the name ``bnkernels_other``), fed the same seeded arrays of the
benchmark cases, and called in turns with the roofline pass, the first place rotating,
as ``python -m bnkernels bench`` does; the shared machine's drift then hits all of them
alike.  Printed per case: the median times and this/other (below 1: this tree is faster).
This tree's package is the one Python imports (run from the checkout, or installed).
``--other-l3 BYTES`` loads the other build with its plans pinned to that L3 size, so that a
build of this same commit shows what the L3-dependent plans change.
``--shape`` times shapes outside the grid instead, e.g. ``--shape 2d:512x256:float32
nhwc:8x28x28x96:float64`` (layouts as in the grid: 2d, nchw, nhwc).  ``--params``
gives gamma and beta another dtype than the data's (mixed precision).
"""

import argparse
import importlib.util
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bnkernels  # noqa: E402
from bnkernels import _bench, _kernels  # noqa: E402


def load_other(directory, l3=None):
    """The bnkernels package found in ``directory``, imported as ``bnkernels_other``; with
    l3, its plans assume an L3 of l3 bytes."""
    init = os.path.join(directory, "bnkernels", "__init__.py")
    if not os.path.exists(init):
        sys.exit("no bnkernels package in %s" % directory)
    spec = importlib.util.spec_from_file_location(
        "bnkernels_other", init, submodule_search_locations=[os.path.dirname(init)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bnkernels_other"] = module
    saved = os.environ.get("BNKERNELS_L3_BYTES")
    if l3 is not None:
        os.environ["BNKERNELS_L3_BYTES"] = str(l3)
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            os.environ.pop("BNKERNELS_L3_BYTES", None)
        else:
            os.environ["BNKERNELS_L3_BYTES"] = saved
    if os.path.realpath(module.__file__) == os.path.realpath(bnkernels.__file__):
        sys.exit("%s is this tree's package" % directory)
    return module


def case_fns(data, pass_, threads, other, params=None):
    """{name: callable} of one case: this tree, the other build, the roofline; gamma and
    beta in the dtype params (None: the data's)."""
    x, dy, g, b, axis = data.x, data.dy, data.gamma, data.beta, data.case.axis
    if params is not None:
        g, b = g.astype(params), b.astype(params)
    roof_b = dy if pass_ in ("backward", "fused-backward") else x
    train = {"mode": "train", "eps": _bench.EPS}
    fused = {"activation": "relu", "residual": dy}
    fns = {}
    for name, pkg in (("this", bnkernels), ("other", other)):
        if pass_ in ("backward", "fused-backward"):
            extra = fused if pass_ == "fused-backward" else {}
            cache = pkg.forward(x, g, b, dict(train), axis=axis, **extra)[1]
            fns[name] = lambda pkg=pkg, cache=cache: pkg.backward(dy, cache, num_threads=threads)
        elif pass_ == "fused-forward":
            fns[name] = lambda pkg=pkg: pkg.forward(x, g, b, dict(train), axis=axis, **fused)
        elif pass_ in ("test", "test-backward"):  # with running statistics
            p = {"mode": "test", "eps": _bench.EPS, "running_mean": g, "running_var": b * b + 1}
            if pass_ == "test":
                fns[name] = lambda pkg=pkg, p=p: pkg.forward(x, g, b, dict(p), axis=axis)
            else:
                cache = pkg.forward(x, g, b, dict(p), axis=axis)[1]
                fns[name] = lambda pkg=pkg, c=cache: pkg.backward(dy, c, num_threads=threads)
        else:
            fns[name] = lambda pkg=pkg: pkg.forward(x, g, b, dict(train), axis=axis)
    fns["roofline"] = lambda: _kernels.stream_add(x, roof_b, np.empty_like(x), threads)
    return fns


def shape_case(spec):
    """A benchmark case from 'layout:AxBx...:dtype'."""
    try:
        layout, dims, dtype = spec.split(":")
        shape = tuple(int(v) for v in dims.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected layout:AxB[x...]:dtype, got %r" % spec) from None
    if layout not in ("2d", "nchw", "nhwc") or dtype not in ("float16", "float32", "float64"):
        raise argparse.ArgumentTypeError(
            "layout 2d, nchw or nhwc and dtype float16, float32 or float64, got %r" % spec
        )
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError("a shape of two or more positive sizes, got %r" % spec)
    return _bench.Case("%s-%s-f%s" % (layout, dims, dtype[5:]), layout, shape, dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", help="a directory with another built bnkernels package")
    p.add_argument("--cases", help="case patterns, as for python -m bnkernels bench")
    p.add_argument(
        "--shape",
        nargs="+",
        type=shape_case,
        metavar="LAYOUT:SHAPE:DTYPE",
        help="shapes outside the grid, e.g. 2d:512x256:float32",
    )
    p.add_argument(
        "--pass",
        dest="passes",
        choices=(
            "backward",
            "forward",
            "test",
            "test-backward",
            "fused-forward",
            "fused-backward",
            "both",
        ),
        default="backward",
        help="backward and forward in train mode (both: the two); test, test-backward: with "
        "running statistics; fused-*: with a ReLU and a residual (train mode)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads (default: the OpenMP default); forward follows the default",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=1.0,
        help="time budget per implementation and case (default 1)",
    )
    p.add_argument(
        "--params",
        choices=("float16", "float32", "float64"),
        help="gamma and beta in this dtype (default: the data's)",
    )
    p.add_argument(
        "--float16-code",
        choices=("avx512", "f16c", "integer"),
        help="float16 conversions of this kind in both builds (default: the widest the CPU has)",
    )
    p.add_argument(
        "--other-l3",
        type=int,
        metavar="BYTES",
        help="the L3 size the other build's plans assume (BNKERNELS_L3_BYTES while it loads; "
        "this tree's keeps its own): a build of this very commit then shows what the "
        "L3-dependent plans change",
    )
    args = p.parse_args(argv)
    other = load_other(args.other, args.other_l3)
    print("L3 the plans assume: this %d, other %d" % (_kernels.L3_BYTES, other._kernels.L3_BYTES))
    if args.float16_code:
        print("float16 code: %s" % _kernels.float16_code(args.float16_code))
        other._kernels.float16_code(args.float16_code)
    threads = args.threads or _kernels.max_threads()
    if args.shape:
        cases = args.shape
    else:
        cases = _bench.select_cases(args.cases) if args.cases else list(_bench.CASES)
    budget = _bench.Budget(args.seconds, 7, 5000)
    passes = ("backward", "forward") if args.passes == "both" else (args.passes,)
    print(
        "this: %s\nother: %s\nthreads=%d, median ms, taking turns"
        % (os.path.dirname(bnkernels.__file__), os.path.dirname(other.__file__), threads)
    )
    print(
        "%-8s %-24s %9s %9s %9s %10s" % ("pass", "case", "this", "other", "roofline", "this/other")
    )
    for case in cases:
        data = _bench.CaseData(case)
        for pass_ in passes:
            t = _bench.measure_turns(case_fns(data, pass_, threads, other, args.params), budget)
            print(
                "%-8s %-24s %9.3f %9.3f %9.3f %10.2f"
                % (
                    pass_,
                    case.name,
                    t["this"].median * 1e3,
                    t["other"].median * 1e3,
                    t["roofline"].median * 1e3,
                    t["this"].median / t["other"].median,
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
