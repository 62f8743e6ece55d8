"""Compare this tree's kernels bit for bit with another build of them.

    python scripts/bits.py OTHER [--l3 BYTES ...] [--threads N ...] [--float16-code KIND]

OTHER is a directory holding a built ``bnkernels`` package (a checkout of another commit
after ``python setup.py build_ext --inplace``).  For every L3 size given (the plans depend
on it; each runs in a child process with ``BNKERNELS_L3_BYTES`` pinned; 1 forces streaming
stores for every float64 output) and every thread count, both builds run forward and
backward over the benchmark grid and a set of odd shapes that reach every plan kind (fused,
chunked, narrow tall blocks, L3 share, write only, NCHW planes taken as rows), in the
three dtypes, train and test mode, 'var' and 'std', x and seed-style caches, with and
without a fused residual and ReLU, contiguous and strided; with --float16-code, both with
the vector code of that kind (the widest the CPU has by default).  It prints one line per
difference and exits 1 if there is any.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (layout, shape, axis): layout says how x is laid out in memory before the call
GRID = [
    ("2d", (256, 512), 1),
    ("2d", (4096, 1024), 1),
    ("2d", (8192, 2048), 1),
    ("2d", (262144, 32), 1),
    ("2d", (512, 8192), 1),
    ("c", (32, 64, 56, 56), 1),
    ("c", (64, 256, 14, 14), 1),
    ("c", (128, 512, 7, 7), 1),
    ("c", (8, 32, 112, 112), 1),
    ("c", (32, 56, 56, 64), -1),
    ("c", (64, 14, 14, 256), -1),
]
ODD = [
    ("2d", (1, 7), 1),
    ("2d", (3, 33), 1),
    ("2d", (100, 100), 1),
    ("2d", (600, 200), 1),
    ("2d", (4096, 32), 1),
    ("2d", (2048, 600), 1),
    ("2d", (200000, 16), 1),
    ("2d", (64, 65536), 1),
    ("f", (300, 70), 1),  # (N, C) in Fortran order: planar with N = 1
    ("c", (2, 8, 512, 512), 1),  # planar, chunked channels
    ("c", (4, 64, 128, 128), 1),  # planar, channels for the L3 share
    ("c", (64, 32, 3, 3), 1),  # NCHW small planes taken as rows
    ("c", (5, 3, 1, 1), 1),
    ("c", (16, 24, 14, 14), 1),
    ("last", (8, 96, 28, 28), 1),  # NCHW view of channels-last memory
    ("strided", (64, 48, 10, 10), 1),  # every other sample
    ("c", (16, 14, 14, 24), -1),
    ("c", (3, 5, 7, 9, 11), 1),
]

CHILD = r"""
import hashlib, json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import bnkernels
cases, threads = json.loads(sys.argv[2]), json.loads(sys.argv[3])
if sys.argv[4]:
    bnkernels._kernels.float16_code(sys.argv[4])


def make(layout, shape, dtype, rng):
    if layout == "f":
        return np.asfortranarray(rng.standard_normal(shape)).astype(dtype, order="F")
    if layout == "last":
        n, c, h, w = shape
        a = rng.standard_normal((n, h, w, c)).astype(dtype)
        return a.transpose(0, 3, 1, 2)
    if layout == "strided":
        n = shape[0]
        return rng.standard_normal((2 * n,) + tuple(shape[1:])).astype(dtype)[::2]
    return (3.0 + rng.standard_normal(shape)).astype(dtype)


out = {}
for layout, shape, axis in cases:
    for dtype in (np.float16, np.float32, np.float64):
        rng = np.random.default_rng(len(shape) * 1000 + shape[-1])
        x = make(layout, shape, dtype, rng)
        dy = make(layout, shape, dtype, rng)
        C = x.shape[axis]
        g = (1.0 + 0.1 * rng.standard_normal(C)).astype(dtype)
        b = (0.1 * rng.standard_normal(C)).astype(dtype)
        for eps_mode in ("var", "std"):
            for nt in threads:
                h = hashlib.sha256()
                param = {"mode": "train", "eps": 1e-5, "eps_mode": eps_mode}
                y, cache = bnkernels.forward(x, g, b, param, axis=axis)
                h.update(np.ascontiguousarray(y).tobytes())
                for k in ("running_mean", "running_var"):
                    h.update(np.ascontiguousarray(param[k]).tobytes())
                for r in bnkernels.backward(dy, cache, num_threads=nt):
                    h.update(np.ascontiguousarray(r).tobytes())
                test = dict(param, mode="test")
                y2, cache2 = bnkernels.forward(x, g, b, test, axis=axis)
                h.update(np.ascontiguousarray(y2).tobytes())
                for r in bnkernels.backward(dy, cache2, num_threads=nt):
                    h.update(np.ascontiguousarray(r).tobytes())
                # the fused epilogue: a residual and a ReLU, and their backward
                y3, cache3 = bnkernels.forward(
                    x, g, b, dict(param), axis=axis, activation="relu", residual=dy
                )
                h.update(np.ascontiguousarray(y3).tobytes())
                for r in bnkernels.backward(dy, cache3, num_threads=nt):
                    h.update(np.ascontiguousarray(r).tobytes())
                if x.ndim == 2 and axis == 1 and eps_mode == "var":
                    seed = {"x_hat": cache["x"], "gamma": g, "denom": 1.0 / cache["invstd"]}
                    for r in bnkernels.backward(dy, seed, num_threads=nt):
                        h.update(np.ascontiguousarray(r).tobytes())
                key = "%s %s %s %s nt=%d" % (layout, "x".join(map(str, shape)),
                                             np.dtype(dtype).name, eps_mode, nt)
                out[key] = h.hexdigest()
print(json.dumps(out))
"""


def digests(tree, l3, cases, threads, float16_code):
    env = dict(os.environ, BNKERNELS_L3_BYTES=str(l3))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            tree,
            json.dumps(cases),
            json.dumps(threads),
            float16_code or "",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tree,
    )
    if proc.returncode != 0:
        sys.exit("%s failed:\n%s" % (tree, proc.stderr))
    return json.loads(proc.stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("other", help="directory of another built checkout")
    ap.add_argument(
        "--l3",
        type=int,
        nargs="+",
        default=[1, 8 << 20, 32 << 20],
        help="BNKERNELS_L3_BYTES values (default: 1, 8 MiB, 32 MiB)",
    )
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--quick", action="store_true", help="the odd shapes only")
    ap.add_argument(
        "--float16-code",
        choices=("integer", "f16c", "avx512"),
        help="both builds' vector code of this kind (bnkernels._kernels.float16_code; "
        "default: the widest the CPU has)",
    )
    args = ap.parse_args(argv)
    cases = ODD if args.quick else GRID + ODD
    n_diff = n_all = 0
    for l3 in args.l3:
        mine = digests(ROOT, l3, cases, args.threads, args.float16_code)
        theirs = digests(os.path.abspath(args.other), l3, cases, args.threads, args.float16_code)
        for key in mine:
            n_all += 1
            if mine[key] != theirs.get(key):
                n_diff += 1
                print("differs: L3=%d %s" % (l3, key))
        # thread invariance within this tree
        by_case = {}
        for key, dig in mine.items():
            by_case.setdefault(key.rsplit(" nt=", 1)[0], set()).add(dig)
        for case, digs in by_case.items():
            if len(digs) > 1:
                n_diff += 1
                print("thread counts differ: L3=%d %s" % (l3, case))
    print("%d of %d digests differ" % (n_diff, n_all))
    return 1 if n_diff else 0


if __name__ == "__main__":
    sys.exit(main())
