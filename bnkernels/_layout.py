"""Memory layouts the kernels run on, read from shapes and strides (no copies).

rows:    each row holds C channels of L contiguous elements, channel c at columns
         c*L:(c+1)*L; every other axis folds into one row stride.  L = 1 for (N, C),
         (N, H, W, C) with axis=-1, x_nhwc.transpose(0, 3, 1, 2); L = H*W for NCHW
         with small planes.  View (R, C*L) with one row stride per array.
planar:  the axes after the channel axis fold into one contiguous run of L
         elements, the axes before it into one stride: (N, C, H, W) with large planes.
         View (N, C, L) with strides (sn, sc) per array.

Strides are returned in elements.  Every array of one call must fit the same
layout (each with its own strides); otherwise the caller copies.
"""

from math import prod

# NCHW planes shorter than ROWS_MAX_PLANE run faster as rows of C*L columns (when planes
# are adjacent), given enough rows to pay for spreading per-channel vectors over the
# columns: ROWS_MIN_N, or ROWS_MIN_N_SHORT for planes shorter than ROWS_SHORT_PLANE,
# whose short runs slow the planar loops most (measured: 14x14 planes with 16-32 images
# are faster planar, 7x7 planes as rows).  float16, whose output sweeps are bound by
# their arithmetic, not by memory, takes only the short ones as rows: a row's element
# loads its coefficients where a plane's run holds them in registers (measured: 14x14 and
# 28x28 planes faster planar, 7x7 as rows).
ROWS_MAX_PLANE = 512
ROWS_MIN_N = 64
ROWS_SHORT_PLANE = 128
ROWS_MIN_N_SHORT = 16


def small_planes_as_rows(N, L, itemsize):
    """Whether N planes of L elements of itemsize bytes run as rows of C*L columns."""
    if L < ROWS_SHORT_PLANE:
        return N >= ROWS_MIN_N_SHORT
    return itemsize > 2 and L < ROWS_MAX_PLANE and N >= ROWS_MIN_N


def _fold(dims):
    """(count, stride) of dims [(n, s), ...] that fold into one, else None."""
    for (_n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    if not dims:
        return 1, 0
    return prod(n for n, _ in dims), dims[-1][1]


def rows_strides(a, axis):
    """Row stride in elements of the (R, C) view of ``a``, or None."""
    isz = a.itemsize
    if a.shape[axis] > 1 and a.strides[axis] != isz:
        return None
    dims = [(n, s) for i, (n, s) in enumerate(zip(a.shape, a.strides)) if i != axis and n != 1]
    folded = _fold(dims)
    if folded is None or folded[1] % isz:
        return None
    return folded[1] // isz


def planar_strides(a, axis):
    """(N, L, sn, sc) in elements of the (N, C, L) view of ``a``, or None."""
    isz = a.itemsize
    shape, strides = a.shape, a.strides
    inner = [(n, s) for n, s in zip(shape[axis + 1 :], strides[axis + 1 :]) if n != 1]
    outer = [(n, s) for n, s in zip(shape[:axis], strides[:axis]) if n != 1]
    if inner and inner[-1][1] != isz:
        return None
    fin, fout = _fold(inner), _fold(outer)
    if fin is None or fout is None:
        return None
    L = fin[0]
    N, sn = fout
    if N > 1 and sn == L * isz:
        # the outer axis continues the run: (N, C) in Fortran order is one run per channel
        N, L, sn = 1, N * L, 0
    if sn % isz or strides[axis] % isz:
        return None
    return N, L, sn // isz, strides[axis] // isz


def choose(arrays, axis):
    """The layout all ``arrays`` (one shape) share.

    Returns ("rows", R, C, L, [row stride, ...]), ("planar", N, C, L, [(sn, sc), ...]) or None.
    """
    a0 = arrays[0]
    C = a0.shape[axis]
    for a in arrays:
        if not a.flags.c_contiguous:
            break
    else:  # the common case, from the shape alone, without looking at every stride
        L = prod(a0.shape[axis + 1 :])
        N = a0.size // (C * L)
        if L == 1 or small_planes_as_rows(N, L, a0.itemsize):
            return ("rows", N, C, L, [C * L] * len(arrays))
        return ("planar", N, C, L, [(C * L, L)] * len(arrays))
    planar = [planar_strides(a, axis) for a in arrays]
    if all(p is not None for p in planar) and all(p[:2] == planar[0][:2] for p in planar):
        N, L = planar[0][0], planar[0][1]
        if L > 1 and not small_planes_as_rows(N, L, a0.itemsize):
            return ("planar", N, C, L, [p[2:] for p in planar])
        if all(p[3] == L or C == 1 for p in planar):
            # adjacent planes: each n is one row of C*L contiguous elements
            return ("rows", N, C, L, [p[2] for p in planar])
    rows = [rows_strides(a, axis) for a in arrays]
    if all(r is not None for r in rows):
        return ("rows", a0.size // C, C, 1, rows)
    if all(p is not None for p in planar) and all(p[:2] == planar[0][:2] for p in planar):
        N, L = planar[0][0], planar[0][1]
        return ("planar", N, C, L, [p[2:] for p in planar])
    return None
