"""The block/chunk decomposition: exact cover, 64-bit sizes, results across chunk edges.

Arrays with more than 2**31 elements do not fit this machine, so the plan
helpers the kernels use (``rows_plan``, ``planar_plan``) are checked directly,
against exact Python-integer arithmetic, for sizes up to where the input of one
call would no longer have a byte count in a signed 64-bit integer.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnkernels
from bnkernels import _kernels, reference

MIN_BLOCK = _kernels.CHANNEL_BLOCK_BYTES  # narrowest channel block, bytes
TASK = _kernels.TASK_INPUT_BYTES  # input bytes a task aims for
WIDE_BLOCK = _kernels.WIDE_BLOCK_BYTES  # channel block of a chunked rows task, bytes
PARALLEL = _kernels.PARALLEL_MIN_ELEMS  # elements from which a call may use several threads
ITEMSIZES = (4, 8)  # float32, float64: the only dtypes the kernels run
N_ARRAYS = (1, 2)  # forward reads x; backward reads z and dy
INT64_MAX = 2**63 - 1


def fits(n_elems, itemsize, n_arrays):
    """Every input of one call together has a byte count that is a signed 64-bit integer."""
    return n_elems * itemsize * n_arrays <= INT64_MAX


def check_rows_plan(R, C, itemsize, n_arrays, L=1):
    """Rows of C channels of L contiguous columns each (L > 1: NCHW with small planes)."""
    cb, n_blocks, chunk, n_chunks = _kernels.rows_plan(R, C, itemsize, n_arrays, L)
    width = L * itemsize  # bytes of one channel in one row
    # channel blocks cover exactly C channels, the last one possibly partial
    assert 1 <= cb <= C
    assert n_blocks == -(-C // cb)  # exact integer ceil: nothing wrapped around
    assert (n_blocks - 1) * cb < C <= n_blocks * cb
    # row chunks cover exactly R rows, none empty
    assert 1 <= chunk <= R
    assert n_chunks == -(-R // chunk)
    assert (n_chunks - 1) * chunk < R <= n_chunks * chunk
    # chunks longer than their count: an even count, the last shorter by less than the count
    if 1 < n_chunks < chunk:
        assert n_chunks % 2 == 0 and R - (n_chunks - 1) * chunk > chunk - n_chunks
    # sensible sizes: a block is at least MIN_BLOCK bytes wide (or all channels) and its task's
    # input stays within TASK bytes (unless one row of a block is more); else a split channel
    # gets chunks of at least half a task, not slivers
    task_bytes = chunk * cb * width * n_arrays
    if C * width * R * n_arrays <= TASK and R * C * L >= PARALLEL:
        # all the data would fit one task, and the call may run threads: blocks that two
        # threads share evenly (their two halves differ by a quarter of the channels at
        # most), else one block whose rows split in two (one row stays one task)
        if n_blocks > 1:
            half = n_blocks // 2 * cb
            assert n_chunks == 1 and 4 * abs(C - 2 * half) <= C
        else:
            assert (n_chunks, chunk) == (min(R, 2), -(-R // 2))
            return cb, n_blocks, chunk, n_chunks
    if n_chunks > 1:
        # full rows of a block of up to WIDE_BLOCK bytes, as many rows as fit a task
        assert cb == min(C, max(1, WIDE_BLOCK // width))
        assert task_bytes >= TASK // 2
    else:
        assert cb >= min(C, max(1, MIN_BLOCK // width))
        if L > 1:
            # NCHW planes as rows: blocks of a multiple of 8 columns, rounded up where the task
            # budget allows, else down where that keeps the narrowest width; the backward's
            # from the narrowest block
            step = 8 // math.gcd(L, 8)
            fit = min(C, TASK // (R * width * n_arrays))
            narrowest = min(C, max(1, MIN_BLOCK // width))
            up, down = -(-cb // step) * step, cb // step * step
            assert cb % step == 0 or (up > fit and down < narrowest)
            if n_arrays > 1:
                up = -(-narrowest // step) * step
                assert cb == (up if up <= fit else narrowest)
    assert task_bytes <= max(TASK, cb * width * n_arrays)
    return cb, n_blocks, chunk, n_chunks


def check_planar_plan(N, C, L, itemsize, n_arrays):
    E = N * L
    cb, n_blocks, chunk, n_chunks = _kernels.planar_plan(N, C, L, itemsize, n_arrays)
    assert 1 <= cb <= C
    assert n_blocks == -(-C // cb)
    assert (n_blocks - 1) * cb < C <= n_blocks * cb
    assert 1 <= chunk <= E
    assert n_chunks == -(-E // chunk)
    assert (n_chunks - 1) * chunk < E <= n_chunks * chunk
    if 1 < n_chunks < chunk:
        assert n_chunks % 2 == 0 and E - (n_chunks - 1) * chunk > chunk - n_chunks
    task_bytes = chunk * cb * itemsize * n_arrays
    assert task_bytes <= TASK
    if n_chunks > 1:
        assert task_bytes >= TASK // 2
    return cb, n_blocks, chunk, n_chunks


BIG = [2**31 - 1, 2**31, 2**31 + 1, 2**32 + 7, 2**40 - 1, 2**40, 2**40 + 3, 2**50 + 1, 3**37]
SMALL = [1, 2, 63, 64, 65, 4095, 4096, 4097, 349525, 349526]
CHANNELS = [1, 3, 7, 31, 32, 33, 64, 65, 1000, 2048, 4097]

PLANES = [
    (1, 1),
    (2, 16),
    (1, 2**20),
    (3, 43691),
    (2**20, 1),
    (2**16, 2**16),
    (1, 2**31 + 1),
    (2**31 + 1, 1),
    (2**20, 2**20 + 1),
    (3, 2**40),
    (2**40 + 1, 5),
]


@pytest.mark.parametrize("L", [1, 7, 64, 511])
@pytest.mark.parametrize("n_arrays", N_ARRAYS)
@pytest.mark.parametrize("itemsize", ITEMSIZES)
def test_rows_plan_covers_rows_and_channels(itemsize, n_arrays, L):
    for R in SMALL + BIG:
        for C in CHANNELS:
            if fits(R * C * L, itemsize, n_arrays):
                check_rows_plan(R, C, itemsize, n_arrays, L)


@pytest.mark.parametrize("n_arrays", N_ARRAYS)
@pytest.mark.parametrize("itemsize", ITEMSIZES)
def test_planar_plan_covers_elements(itemsize, n_arrays):
    for N, L in PLANES:
        for C in [1, 2, 16, 17, 64, 1000]:
            if fits(N * L * C, itemsize, n_arrays):
                check_planar_plan(N, C, L, itemsize, n_arrays)


@pytest.mark.parametrize("itemsize", ITEMSIZES)
@pytest.mark.parametrize("n_arrays", N_ARRAYS)
def test_plans_at_the_largest_sizes(itemsize, n_arrays):
    top = INT64_MAX // (itemsize * n_arrays)  # most elements one call can be handed
    check_rows_plan(top, 1, itemsize, n_arrays)
    check_rows_plan(1, top, itemsize, n_arrays)
    check_rows_plan(top // 1000, 1000, itemsize, n_arrays)
    check_rows_plan(top // 511, 1, itemsize, n_arrays, 511)
    check_rows_plan(1, top // 511, itemsize, n_arrays, 511)
    check_planar_plan(1, 1, top, itemsize, n_arrays)
    check_planar_plan(top, 1, 1, itemsize, n_arrays)
    check_planar_plan(2**20, 2, top // 2**21, itemsize, n_arrays)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    itemsize=st.sampled_from(ITEMSIZES),
    n_arrays=st.sampled_from(N_ARRAYS),
    R=st.integers(1, 2**62),
    C=st.integers(1, 2**24),
    L=st.integers(1, 1024),
)
def test_rows_plan_any_size(R, C, itemsize, n_arrays, L):
    R = max(1, min(R, INT64_MAX // (C * L * itemsize * n_arrays)))
    if fits(R * C * L, itemsize, n_arrays):
        check_rows_plan(R, C, itemsize, n_arrays, L)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    itemsize=st.sampled_from(ITEMSIZES),
    n_arrays=st.sampled_from(N_ARRAYS),
    N=st.integers(1, 2**40),
    L=st.integers(1, 2**40),
    C=st.integers(1, 2**16),
)
def test_planar_plan_any_size(N, C, L, itemsize, n_arrays):
    L = max(1, min(L, INT64_MAX // (N * C * itemsize * n_arrays)))
    if fits(N * L * C, itemsize, n_arrays):
        check_planar_plan(N, C, L, itemsize, n_arrays)


@pytest.mark.parametrize("which", range(5))
def test_plans_refuse_sizes_that_are_not_positive(which):
    # (the face never asks for an empty plan; these would divide by zero)
    rows = [8, 4, 4, 1, 1]  # R, C, itemsize, n_arrays, L
    planar = [8, 4, 16, 4, 1]  # N, C, L, itemsize, n_arrays
    rows[which] = planar[which] = 0
    with pytest.raises(ValueError, match="must be positive, got 0"):
        _kernels.rows_plan(*rows)
    with pytest.raises(ValueError, match="must be positive, got 0"):
        _kernels.planar_plan(*planar)


@pytest.mark.parametrize("itemsize", ITEMSIZES)
@pytest.mark.parametrize("n_arrays", N_ARRAYS)
def test_rows_plan_splits_one_task_for_threads(itemsize, n_arrays):
    # all the data fits one task; a call that may run threads gets two chunks of half the
    # rows each (an odd count: the first has the extra row), a smaller one (one thread) a
    # single task
    C = 1024 // itemsize
    R = PARALLEL // C
    assert C * R * itemsize * n_arrays <= TASK
    assert _kernels.rows_plan(R, C, itemsize, n_arrays) == (C, 1, R // 2, 2)
    assert _kernels.rows_plan(R + 1, C, itemsize, n_arrays) == (C, 1, R // 2 + 1, 2)
    assert _kernels.rows_plan(R - 1, C, itemsize, n_arrays) == (C, 1, R - 1, 1)
    # a single row (one NCHW sample of one channel taken as a row) cannot be split
    assert check_rows_plan(1, 1, itemsize, n_arrays, PARALLEL) == (1, 1, 1, 1)
    # blocks that two threads would share unevenly: a full block and a narrow last one, or
    # three of one width; even ones stay
    for blocks in ((1, 1 / 2), (1, 1 / 8), (1, 1, 1)):
        C = int(sum(blocks) * 1024 // itemsize)
        R = TASK // (C * itemsize * n_arrays)
        assert check_rows_plan(R, C, itemsize, n_arrays) == (C, 1, -(-R // 2), 2), blocks
    C = 2048 // itemsize
    R = TASK // (C * itemsize * n_arrays)
    assert check_rows_plan(R, C, itemsize, n_arrays) == (C // 2, 2, R, 1)


# ---------------------------------------------------------------------------
# Results across chunk edges: shapes just past one chunk, with a ragged last
# chunk and (planar) chunks that start in the middle of a plane.
# ---------------------------------------------------------------------------


def _compare(x, axis, dy, eps_mode):
    param = {"mode": "train", "eps_mode": eps_mode}
    C = x.shape[axis]
    rng = np.random.default_rng(C)
    gamma = rng.uniform(0.5, 1.5, C).astype(x.dtype)
    beta = rng.standard_normal(C).astype(x.dtype)
    out, cache = bnkernels.forward(x, gamma, beta, dict(param), axis=axis)
    x64, g64, b64 = x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64)
    ref_out, ref_cache = reference.forward(x64, g64, b64, dict(param), axis=axis)
    tol = 2e-6 if x.dtype == np.float32 else 1e-11
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol * np.abs(ref_out).max())
    np.testing.assert_allclose(cache["mean"], ref_cache["mean"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cache["var"], ref_cache["var"], rtol=1e-10)
    results = [bnkernels.backward(dy, cache, num_threads=nt) for nt in (1, 2, 3)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            # the plan never depends on the thread count: bitwise equal
            assert np.array_equal(a, b)
    ref = reference.backward_alt(dy.astype(np.float64), ref_cache)
    for got, want in zip(results[0], ref):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


def _ragged(extents, plan, L=1):
    """The first of extents (rows, or samples of L elements) that plan(extent, n_arrays)
    splits into chunks with a shorter last one, for the forward's one array and the
    backward's two; planar (L > 1) chunks must also start inside a plane."""
    for e in extents:
        plans = [plan(e, n_arrays) for n_arrays in (1, 2)]
        if all(n > 1 and (e * L) % c != 0 and (L == 1 or c % L != 0) for _, _, c, n in plans):
            return e
    raise AssertionError("no extent gives ragged chunks")


@pytest.mark.parametrize("eps_mode", ["var", "std"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_results_across_chunk_edges(dtype, eps_mode):
    isz = np.dtype(dtype).itemsize
    C = MIN_BLOCK // isz + 3  # wider than the narrowest block
    chunk = _kernels.rows_plan(10**9, C, isz, 1)[2]
    R = _ragged(
        (k * chunk + 3 for k in range(1, 64)), lambda R, n: _kernels.rows_plan(R, C, isz, n)
    )
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((R, C)) * 2 + 5).astype(dtype)
    dy = rng.standard_normal((R, C)).astype(dtype)
    _compare(x, 1, dy, eps_mode)


@pytest.mark.parametrize("eps_mode", ["var", "std"])
def test_small_planes_results_across_chunk_edges(eps_mode):
    # NCHW with planes below the planar threshold runs as rows of C*L columns
    from bnkernels._layout import choose

    C, H, W = 3, 8, 8
    L = H * W
    chunk = _kernels.rows_plan(10**9, C, 4, 1, L)[2]
    N = _ragged(
        (k * chunk + 3 for k in range(1, 64)), lambda N, n: _kernels.rows_plan(N, C, 4, n, L)
    )
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((N, C, H, W)) * 2 + 3).astype(np.float32)
    dy = rng.standard_normal((N, C, H, W)).astype(np.float32)
    lay = choose([x, dy, np.empty_like(x)], 1)
    assert lay[0] == "rows" and lay[3] == L
    _compare(x, 1, dy, eps_mode)


@pytest.mark.parametrize(
    "shape,f16,f32",
    [
        ((64, 8, 14, 14), "planar", "rows"),  # float16 keeps planes of 128 or more planar
        ((64, 8, 7, 7), "rows", "rows"),
        ((16, 8, 7, 7), "rows", "rows"),
        ((8, 8, 7, 7), "planar", "planar"),
        ((64, 8, 24, 24), "planar", "planar"),
    ],
)
def test_small_planes_as_rows_by_dtype(shape, f16, f32):
    from bnkernels._layout import choose

    for dtype, kind in ((np.float16, f16), (np.float32, f32), (np.float64, f32)):
        x = np.empty(shape, dtype)
        assert choose([x, x], 1)[0] == kind, dtype
        # the same kind from the strides where the arrays are not C-contiguous
        v = np.empty(shape[:1] + (shape[1] + 1,) + shape[2:], dtype)[:, 1:]
        assert choose([v, v], 1)[0] == kind, dtype


@pytest.mark.parametrize("eps_mode", ["var", "std"])
def test_planar_results_across_chunk_edges(eps_mode):
    L = 43691  # a prime: chunks start in the middle of a plane
    C = 2
    chunk = _kernels.planar_plan(10**6, C, L, 8, 1)[2]
    N = _ragged(range(chunk // L + 1, 64), lambda N, n: _kernels.planar_plan(N, C, L, 8, n), L)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((N, C, L)) * 3 - 1).astype(np.float64)
    dy = rng.standard_normal((N, C, L)).astype(np.float64)
    _compare(x, 1, dy, eps_mode)


# ---------------------------------------------------------------------------
# Degenerate extents: the plans divide by the extent, so an empty batch must be
# rejected before it reaches them.  Run in a child: a division by zero in C
# kills the interpreter (SIGFPE) instead of raising.
# ---------------------------------------------------------------------------

EMPTY_BACKWARD = {
    "seed_cache_no_rows": """
x = np.ones((0, 3))
bnkernels.backward(x, {"x_hat": x, "gamma": np.ones(3), "denom": np.ones(3)})
""",
    "seed_cache_no_channels": """
x = np.ones((4, 0))
bnkernels.backward(x, {"x_hat": x, "gamma": np.ones(0), "denom": np.ones(0)})
""",
    "forward_style_cache_empty_batch": """
x = np.ones((0, 3, 20))
bnkernels.backward(x, {"x": x, "mean": np.zeros(3), "var": np.ones(3), "invstd": np.ones(3),
                       "gamma": np.ones(3), "eps": 1e-5, "eps_mode": "var", "mode": "train",
                       "axis": 1})
""",
}


@pytest.mark.parametrize("name", list(EMPTY_BACKWARD))
def test_backward_rejects_an_empty_batch(name):
    code = (
        "import numpy as np, bnkernels\n"
        "try:\n"
        + "".join("    " + line + "\n" for line in EMPTY_BACKWARD[name].strip().splitlines())
        + "except ValueError as e:\n    print('ValueError:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, "child died (exit %d): %s" % (proc.returncode, proc.stderr[-2000:])
    assert proc.stdout.startswith("ValueError:"), proc.stdout + proc.stderr[-2000:]
