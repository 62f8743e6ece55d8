"""Data-parallel training with a synchronized batch norm, over MPI.

    mpiexec -n 2 python examples/data_parallel.py [--steps 20]

The network: BatchNorm -> Sigmoid -> MSE loss, on data of shape (samples, channels, H*W),
trained by gradient descent on the batch norm's scale w and shift beta.  Every rank holds
a slice of each batch (here uneven ones); batch norm uses the statistics and the
gradient sums of the whole batch (``comm=``), so every step is that of one process
training on the whole batch.  Each rank also runs that one-process training and reports
the largest difference of the parameters after each step.
"""

import argparse
import sys

import numpy as np
from mpi4py import MPI

import bnkernels

EPS = 1e-5
LR = 0.5


def sigmoid(y):
    return 1.0 / (1.0 + np.exp(-y))


def step(x, t, w, beta, n_total, comm=None):
    """One training step on x (a slice of the batch when comm is given); returns the new
    parameters and this slice's summed squared error."""
    y, cache = bnkernels.forward(x, w, beta, {"mode": "train", "eps": EPS}, axis=1, comm=comm)
    z = sigmoid(y)
    dz = 2.0 / n_total * (z - t)  # d(mean squared error)/dz over the whole batch
    dy = dz * z * (1.0 - z)
    _, dw, dbeta = bnkernels.backward(dy, cache)
    return w - LR * dw, beta - LR * dbeta, float(np.sum((z - t) ** 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()

    rng = np.random.default_rng(0)  # the same data on every rank
    samples, channels, hw = 12, 3, 16
    w = rng.uniform(0.5, 1.5, channels)
    beta = rng.uniform(-0.5, 0.5, channels)
    w1, beta1 = w.copy(), beta.copy()  # the one-process run
    # uneven slices: rank r holds r + 1 parts of the batch
    cuts = np.cumsum([0] + [r + 1 for r in range(size)])
    bounds = (cuts * samples) // cuts[-1]
    lo, hi = bounds[rank], bounds[rank + 1]

    worst = 0.0
    for k in range(args.steps):
        x = rng.standard_normal((samples, channels, hw)) * 2.0 + 1.0
        t = rng.uniform(0.0, 1.0, x.shape)
        w, beta, sse = step(x[lo:hi], t[lo:hi], w, beta, x.size, comm)
        w1, beta1, sse1 = step(x, t, w1, beta1, x.size)
        loss = sum(comm.allgather(sse)) / x.size
        diff = max(np.max(np.abs(w - w1)), np.max(np.abs(beta - beta1)))
        worst = max(worst, diff)
        if rank == 0:
            print(
                "step %2d  loss %.6f  (one process %.6f)  max |param difference| %.1e"
                % (k, loss, sse1 / x.size, diff)
            )
    ok = worst <= 1e-12
    if rank == 0:
        verdict = "same as one process" if ok else "DIFFERENT from one process"
        print("%d ranks, %d steps: %s (max difference %.1e)" % (size, args.steps, verdict, worst))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
