"""Compiled batch-norm kernels (float32 and float64, OpenMP across channels).

Design
------
Batch norm is memory-bound: per channel it needs two reductions over all of the
channel's elements before any output can be written.  The kernels therefore cut
the work into tasks that fit in L2 and touch memory once per task when they can:

* rows layout: a (R, C) view, channels contiguous, any row stride (NC, NHWC,
  channels-last NCHW).  A task is a block of ``cb`` channels (256 bytes, four
  cache lines) over a chunk of rows.  The inner loops run across the channels
  of the block: unit stride, one independent accumulator per channel, so they
  vectorize without reassociating any sum.
* planar layout: a (N, C, L) view, each (n, c) plane of L contiguous (NCHW,
  (N, C) in Fortran order as N=1).  A task is one channel over a chunk of its
  N*L elements, walked plane by plane with NACC interleaved accumulators.

When a task holds every row (or element) of its channels ("fused"), the sums,
the per-channel coefficients and the output are done in one task while the
data is still in cache.  Otherwise each task writes partial sums, the partials
are combined per channel in chunk order, and a second parallel sweep writes the
output.  Chunk sizes depend on the shape and dtype only, never on the number of
threads, so results are bitwise identical for every ``n_threads``.

Sums are accumulated in float64 for both dtypes; ``x - mean`` is formed in
float64 too, which keeps float32 inputs with large offsets accurate.

Backward, per channel (``z`` is x, or xhat for a seed-style cache; ``m`` its
shift, ``q`` the scale from ``z - m`` to xhat, ``g = gamma * invstd``):

    sum_dy = sum(dy);  sum_dy_zm = sum(dy * (z - m))
    dbeta = sum_dy;    dgamma = q * sum_dy_zm
    dx = g*dy + B*(z - m) + Cc,  B = -g*k*sum_dy_zm/M,  Cc = -g*sum_dy/M  (train)
                                 B = Cc = 0                               (test)

Forward: chunk-local two-pass mean and M2 (exact mean for a constant channel,
M2 never negative), chunks merged in order with Chan's formula, then
out = gamma*invstd*(x - mean) + beta.
"""

cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int bn_max_threads(void) { return omp_get_max_threads(); }
    static int bn_has_openmp(void) { return 1; }
    #else
    static int bn_max_threads(void) { return 1; }
    static int bn_has_openmp(void) { return 0; }
    #endif
    #ifndef BNKERNELS_BUILD_FLAGS
    #define BNKERNELS_BUILD_FLAGS ""
    #endif
    static const char *bn_build_flags = BNKERNELS_BUILD_FLAGS;
    """
    int bn_max_threads() nogil
    int bn_has_openmp() nogil
    const char *bn_build_flags

cdef enum:
    NACC = 8                # interleaved accumulators for contiguous reductions
    BLOCK_BYTES = 256       # width of a channel block in the rows layout
    MAX_CB = 64             # BLOCK_BYTES / sizeof(float)
    TASK_BYTES = 1 << 20    # input bytes per task: fits in L2 next to its output
    SERIAL_ELEMS = 1 << 15  # below this many elements, one thread

CHANNEL_BLOCK_BYTES = BLOCK_BYTES
TASK_INPUT_BYTES = TASK_BYTES


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(bn_has_openmp())


def max_threads():
    """The OpenMP default thread count (OMP_NUM_THREADS, threadpoolctl)."""
    return bn_max_threads()


def build_flags():
    """The compiler flags the kernels were built with."""
    return bn_build_flags.decode()


# ---------------------------------------------------------------------------
# Work decomposition (shape and dtype only: never the thread count)
# ---------------------------------------------------------------------------

cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _rows_chunk(Py_ssize_t R, Py_ssize_t cb, Py_ssize_t itemsize,
                                   Py_ssize_t n_arrays) noexcept nogil:
    """Rows per task so that n_arrays blocks of cb channels take TASK_BYTES."""
    cdef Py_ssize_t rows = TASK_BYTES // (cb * itemsize * n_arrays)
    if rows < 1:
        rows = 1
    return R if rows > R else rows


cdef inline Py_ssize_t _plane_chunk(Py_ssize_t E, Py_ssize_t itemsize,
                                    Py_ssize_t n_arrays) noexcept nogil:
    """Elements of one channel per task."""
    cdef Py_ssize_t n = TASK_BYTES // (itemsize * n_arrays)
    return E if n > E else n


cdef inline int _n_threads(int requested, Py_ssize_t n_tasks, Py_ssize_t n_elems) noexcept nogil:
    cdef int nt = bn_max_threads() if requested <= 0 else requested
    if n_elems < SERIAL_ELEMS:
        return 1
    if nt > n_tasks:
        nt = <int>n_tasks
    return nt if nt > 0 else 1


def rows_plan(Py_ssize_t R, Py_ssize_t C, Py_ssize_t itemsize, Py_ssize_t n_arrays):
    """(cb, n_blocks, rows_per_chunk, n_chunks) of the rows layout (for tests)."""
    cdef Py_ssize_t cb = BLOCK_BYTES // itemsize
    cdef Py_ssize_t chunk = _rows_chunk(R, cb, itemsize, n_arrays)
    return cb, _cdiv(C, cb), chunk, _cdiv(R, chunk)


def planar_plan(Py_ssize_t E, Py_ssize_t itemsize, Py_ssize_t n_arrays):
    """(elements_per_chunk, n_chunks) of the planar layout (for tests)."""
    cdef Py_ssize_t chunk = _plane_chunk(E, itemsize, n_arrays)
    return chunk, _cdiv(E, chunk)


# ---------------------------------------------------------------------------
# Per-channel coefficients
# ---------------------------------------------------------------------------

cdef inline void _bwd_coefs(Py_ssize_t c, double sum_dy, double sum_dy_zm,
                            const double *q, const double *g, const double *k,
                            double inv_m, bint train,
                            floating *dgamma, floating *dbeta,
                            double *A, double *B, double *Cc) noexcept nogil:
    dbeta[c] = <floating>sum_dy
    dgamma[c] = <floating>(q[c] * sum_dy_zm)
    A[c] = g[c]
    if train:
        B[c] = -g[c] * k[c] * sum_dy_zm * inv_m
        Cc[c] = -g[c] * sum_dy * inv_m
    else:
        B[c] = 0.0
        Cc[c] = 0.0


cdef inline void _fwd_finish(Py_ssize_t c, double mean, double m2, Py_ssize_t M,
                             double eps, bint std_mode, const double *gamma,
                             double *mean_out, double *var_out, double *invstd_out,
                             double *G) noexcept nogil:
    cdef double var = m2 / M
    if var < 0.0:
        var = 0.0
    mean_out[c] = mean
    var_out[c] = var
    if std_mode:
        invstd_out[c] = 1.0 / (sqrt(var) + eps)
    else:
        invstd_out[c] = 1.0 / sqrt(var + eps)
    G[c] = gamma[c] * invstd_out[c]


cdef inline void _chan_merge(double *n_a, double *mean_a, double *m2_a,
                             double n_b, double mean_b, double m2_b) noexcept nogil:
    """Merge (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a) (Chan et al.)."""
    cdef double n = n_a[0] + n_b
    cdef double delta = mean_b - mean_a[0]
    if n_b == 0:
        return
    mean_a[0] = mean_a[0] + delta * (n_b / n)
    m2_a[0] = m2_a[0] + m2_b + delta * delta * (n_a[0] * n_b / n)
    n_a[0] = n


# ---------------------------------------------------------------------------
# Rows layout: (R, C), channel stride 1, row strides sz/sdy/sdx in elements
# ---------------------------------------------------------------------------

cdef void _rows_bwd_sums(const floating *z, const floating *dy, Py_ssize_t sz, Py_ssize_t sdy,
                         Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t cw,
                         const double *m, double *sum_dy, double *sum_dy_zm) noexcept nogil:
    """sum_dy[j] := sum_r dy[r, c0+j];  sum_dy_zm[j] := sum_r dy[r, c0+j]*(z[r, c0+j] - m[c0+j])"""
    cdef double s_dy[MAX_CB]
    cdef double s_zm[MAX_CB]
    cdef double mb[MAX_CB]
    cdef Py_ssize_t r, j
    cdef const floating *zr
    cdef const floating *dyr
    cdef double v
    for j in range(cw):
        s_dy[j] = 0.0
        s_zm[j] = 0.0
        mb[j] = m[c0 + j]
    for r in range(r0, r1):
        zr = z + r * sz + c0
        dyr = dy + r * sdy + c0
        for j in range(cw):
            v = dyr[j]
            s_dy[j] += v
            s_zm[j] += v * (zr[j] - mb[j])
    for j in range(cw):
        sum_dy[j] = s_dy[j]
        sum_dy_zm[j] = s_zm[j]


cdef void _rows_affine(const floating *z, const floating *dy, floating *out,
                       Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout,
                       Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t c0, Py_ssize_t cw,
                       const double *m, const double *A, const double *B,
                       const double *Cc) noexcept nogil:
    """out[r, c] := A[c]*dy[r, c] + B[c]*(z[r, c] - m[c]) + Cc[c]   (dy may be NULL: A ignored)"""
    cdef double ab[MAX_CB]
    cdef double bb[MAX_CB]
    cdef double cc[MAX_CB]
    cdef double mb[MAX_CB]
    cdef Py_ssize_t r, j
    cdef const floating *zr
    cdef const floating *dyr
    cdef floating *outr
    for j in range(cw):
        ab[j] = A[c0 + j]
        bb[j] = B[c0 + j]
        cc[j] = Cc[c0 + j]
        mb[j] = m[c0 + j]
    if dy == NULL:
        for r in range(r0, r1):
            zr = z + r * sz + c0
            outr = out + r * sout + c0
            for j in range(cw):
                outr[j] = <floating>(bb[j] * (zr[j] - mb[j]) + cc[j])
    else:
        for r in range(r0, r1):
            zr = z + r * sz + c0
            dyr = dy + r * sdy + c0
            outr = out + r * sout + c0
            for j in range(cw):
                outr[j] = <floating>(ab[j] * dyr[j] + bb[j] * (zr[j] - mb[j]) + cc[j])


cdef void _rows_moments(const floating *x, Py_ssize_t sx, Py_ssize_t r0, Py_ssize_t r1,
                        Py_ssize_t c0, Py_ssize_t cw, double *mean, double *m2) noexcept nogil:
    """Two-pass mean and sum of squared deviations of rows r0:r1, channels c0:c0+cw."""
    cdef double s[MAX_CB]
    cdef double d1[MAX_CB]
    cdef double d2[MAX_CB]
    cdef double m0[MAX_CB]
    cdef Py_ssize_t r, j
    cdef const floating *xr
    cdef double d
    cdef double n = r1 - r0
    for j in range(cw):
        s[j] = 0.0
        d1[j] = 0.0
        d2[j] = 0.0
    for r in range(r0, r1):
        xr = x + r * sx + c0
        for j in range(cw):
            s[j] += xr[j]
    for j in range(cw):
        m0[j] = s[j] / n
    for r in range(r0, r1):
        xr = x + r * sx + c0
        for j in range(cw):
            d = xr[j] - m0[j]
            d1[j] += d
            d2[j] += d * d
    for j in range(cw):
        # corrected two-pass: the mean is exact for a constant channel
        mean[j] = m0[j] + d1[j] / n
        m2[j] = d2[j] - d1[j] * d1[j] / n
        if m2[j] < 0.0:
            m2[j] = 0.0


cdef int _rows_backward(const floating *z, const floating *dy, floating *dx,
                        Py_ssize_t R, Py_ssize_t C, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sdx,
                        const double *m, const double *q, const double *g, const double *k,
                        bint train, floating *dgamma, floating *dbeta, int n_threads) noexcept nogil:
    cdef Py_ssize_t cb = BLOCK_BYTES // sizeof(floating)
    cdef Py_ssize_t n_blocks = _cdiv(C, cb)
    cdef Py_ssize_t chunk = _rows_chunk(R, cb, sizeof(floating), 2)
    cdef Py_ssize_t n_chunks = _cdiv(R, chunk)
    cdef Py_ssize_t n_tasks = n_blocks * n_chunks
    cdef int nt = _n_threads(n_threads, n_tasks, R * C)
    cdef double inv_m = 1.0 / R
    cdef double *A = <double *>malloc(3 * C * sizeof(double))
    cdef double *B
    cdef double *Cc
    cdef double *part = NULL
    cdef Py_ssize_t t, bi, ci, c0, cw, r0, r1, c, j
    cdef double s_dy, s_zm
    if A == NULL:
        return -1
    B = A + C
    Cc = B + C
    if n_chunks == 1:
        # fused: each block's rows stay in cache between the sums and dx
        for t in prange(n_blocks, schedule='static', num_threads=nt):
            c0 = t * cb
            cw = min(cb, C - c0)
            _rows_bwd_sums(z, dy, sz, sdy, 0, R, c0, cw, m, A + c0, B + c0)
            for j in range(c0, c0 + cw):
                _bwd_coefs(j, A[j], B[j], q, g, k, inv_m, train, dgamma, dbeta, A, B, Cc)
            _rows_affine(z, dy, dx, sz, sdy, sdx, 0, R, c0, cw, m, A, B, Cc)
    else:
        part = <double *>malloc(2 * n_chunks * C * sizeof(double))
        if part == NULL:
            free(A)
            return -1
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            bi = t // n_chunks
            ci = t % n_chunks
            c0 = bi * cb
            cw = min(cb, C - c0)
            r0 = ci * chunk
            r1 = min(R, r0 + chunk)
            _rows_bwd_sums(z, dy, sz, sdy, r0, r1, c0, cw, m,
                           part + ci * C + c0, part + (n_chunks + ci) * C + c0)
        for c in range(C):
            s_dy = 0.0
            s_zm = 0.0
            for ci in range(n_chunks):
                s_dy = s_dy + part[ci * C + c]
                s_zm = s_zm + part[(n_chunks + ci) * C + c]
            _bwd_coefs(c, s_dy, s_zm, q, g, k, inv_m, train, dgamma, dbeta, A, B, Cc)
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            bi = t // n_chunks
            ci = t % n_chunks
            c0 = bi * cb
            cw = min(cb, C - c0)
            r0 = ci * chunk
            r1 = min(R, r0 + chunk)
            _rows_affine(z, dy, dx, sz, sdy, sdx, r0, r1, c0, cw, m, A, B, Cc)
        free(part)
    free(A)
    return 0


cdef int _rows_forward(const floating *x, floating *out, Py_ssize_t R, Py_ssize_t C,
                       Py_ssize_t sx, Py_ssize_t sout, bint train, double eps, bint std_mode,
                       const double *gamma, const double *beta,
                       double *mean, double *var, double *invstd, int n_threads) noexcept nogil:
    """train: mean, var, invstd := batch statistics; always out := gamma*invstd*(x - mean) + beta"""
    cdef Py_ssize_t cb = BLOCK_BYTES // sizeof(floating)
    cdef Py_ssize_t n_blocks = _cdiv(C, cb)
    cdef Py_ssize_t chunk = _rows_chunk(R, cb, sizeof(floating), 1)
    cdef Py_ssize_t n_chunks = _cdiv(R, chunk) if train else 1
    cdef Py_ssize_t n_tasks = n_blocks * n_chunks
    cdef int nt = _n_threads(n_threads, n_tasks, R * C)
    cdef double *G = <double *>malloc(2 * C * sizeof(double))
    cdef double *dummy
    cdef double *part = NULL
    cdef Py_ssize_t t, bi, ci, c0, cw, r0, r1, c, j
    cdef double n_a, mean_a, m2_a
    if G == NULL:
        return -1
    dummy = G + C   # A of the affine pass, unused without dy
    for c in range(C):
        dummy[c] = 0.0
    if not train:
        for c in range(C):
            G[c] = gamma[c] * invstd[c]
        for t in prange(n_blocks, schedule='static', num_threads=nt):
            c0 = t * cb
            cw = min(cb, C - c0)
            _rows_affine(x, <const floating *>NULL, out, sx, 0, sout, 0, R, c0, cw, mean, dummy, G, beta)
    elif n_chunks == 1:
        for t in prange(n_blocks, schedule='static', num_threads=nt):
            c0 = t * cb
            cw = min(cb, C - c0)
            _rows_moments(x, sx, 0, R, c0, cw, mean + c0, var + c0)
            for j in range(c0, c0 + cw):
                _fwd_finish(j, mean[j], var[j], R, eps, std_mode, gamma, mean, var, invstd, G)
            _rows_affine(x, <const floating *>NULL, out, sx, 0, sout, 0, R, c0, cw, mean, dummy, G, beta)
    else:
        part = <double *>malloc(2 * n_chunks * C * sizeof(double))
        if part == NULL:
            free(G)
            return -1
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            bi = t // n_chunks
            ci = t % n_chunks
            c0 = bi * cb
            cw = min(cb, C - c0)
            r0 = ci * chunk
            r1 = min(R, r0 + chunk)
            _rows_moments(x, sx, r0, r1, c0, cw,
                          part + ci * C + c0, part + (n_chunks + ci) * C + c0)
        for c in range(C):
            n_a = min(chunk, R)
            mean_a = part[c]
            m2_a = part[n_chunks * C + c]
            for ci in range(1, n_chunks):
                _chan_merge(&n_a, &mean_a, &m2_a, min(chunk, R - ci * chunk),
                            part[ci * C + c], part[(n_chunks + ci) * C + c])
            _fwd_finish(c, mean_a, m2_a, R, eps, std_mode, gamma, mean, var, invstd, G)
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            bi = t // n_chunks
            ci = t % n_chunks
            c0 = bi * cb
            cw = min(cb, C - c0)
            r0 = ci * chunk
            r1 = min(R, r0 + chunk)
            _rows_affine(x, <const floating *>NULL, out, sx, 0, sout, r0, r1, c0, cw, mean, dummy, G, beta)
        free(part)
    free(G)
    return 0


# ---------------------------------------------------------------------------
# Planar layout: (N, C, L), each plane contiguous; strides sn/sc in elements.
# A channel's elements are numbered e = n*L + l; a task covers [e0, e1).
# ---------------------------------------------------------------------------

cdef inline double _tree8(const double *a) noexcept nogil:
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))


cdef void _plane_bwd_sums(const floating *z, const floating *dy,
                          Py_ssize_t szn, Py_ssize_t sdyn, Py_ssize_t L,
                          Py_ssize_t e0, Py_ssize_t e1, double m,
                          double *sum_dy, double *sum_dy_zm) noexcept nogil:
    cdef double a_dy[NACC]
    cdef double a_zm[NACC]
    cdef Py_ssize_t n, l0, l1, i, j, n8
    cdef const floating *zp
    cdef const floating *dyp
    cdef double v
    for j in range(NACC):
        a_dy[j] = 0.0
        a_zm[j] = 0.0
    n = e0 // L
    while n * L < e1:
        l0 = e0 - n * L if e0 > n * L else 0
        l1 = e1 - n * L if e1 - n * L < L else L
        zp = z + n * szn + l0
        dyp = dy + n * sdyn + l0
        n8 = (l1 - l0) // NACC * NACC
        for i in range(0, n8, 8):  # 8 == NACC
            for j in range(NACC):
                v = dyp[i + j]
                a_dy[j] += v
                a_zm[j] += v * (zp[i + j] - m)
        for i in range(n8, l1 - l0):
            v = dyp[i]
            a_dy[0] += v
            a_zm[0] += v * (zp[i] - m)
        n += 1
    sum_dy[0] = _tree8(a_dy)
    sum_dy_zm[0] = _tree8(a_zm)


cdef void _plane_affine(const floating *z, const floating *dy, floating *out,
                        Py_ssize_t szn, Py_ssize_t sdyn, Py_ssize_t soutn, Py_ssize_t L,
                        Py_ssize_t e0, Py_ssize_t e1, double m,
                        double a, double b, double cc) noexcept nogil:
    """out := a*dy + b*(z - m) + cc over elements e0:e1 of one channel (dy may be NULL)"""
    cdef Py_ssize_t n, l0, l1, i
    cdef const floating *zp
    cdef const floating *dyp
    cdef floating *op
    n = e0 // L
    while n * L < e1:
        l0 = e0 - n * L if e0 > n * L else 0
        l1 = e1 - n * L if e1 - n * L < L else L
        zp = z + n * szn
        op = out + n * soutn
        if dy == NULL:
            for i in range(l0, l1):
                op[i] = <floating>(b * (zp[i] - m) + cc)
        else:
            dyp = dy + n * sdyn
            for i in range(l0, l1):
                op[i] = <floating>(a * dyp[i] + b * (zp[i] - m) + cc)
        n += 1


cdef void _plane_moments(const floating *x, Py_ssize_t sxn, Py_ssize_t L,
                         Py_ssize_t e0, Py_ssize_t e1, double *mean, double *m2) noexcept nogil:
    cdef double acc[NACC]
    cdef double acc2[NACC]
    cdef Py_ssize_t n, l0, l1, i, j, n8
    cdef const floating *xp
    cdef double m0 = 0.0, d, d1, cnt = e1 - e0
    cdef int pass_
    for pass_ in range(2):
        for j in range(NACC):
            acc[j] = 0.0
            acc2[j] = 0.0
        n = e0 // L
        while n * L < e1:
            l0 = e0 - n * L if e0 > n * L else 0
            l1 = e1 - n * L if e1 - n * L < L else L
            xp = x + n * sxn + l0
            n8 = (l1 - l0) // NACC * NACC
            if pass_ == 0:
                for i in range(0, n8, 8):  # 8 == NACC
                    for j in range(NACC):
                        acc[j] += xp[i + j]
                for i in range(n8, l1 - l0):
                    acc[0] += xp[i]
            else:
                for i in range(0, n8, 8):  # 8 == NACC
                    for j in range(NACC):
                        d = xp[i + j] - m0
                        acc[j] += d
                        acc2[j] += d * d
                for i in range(n8, l1 - l0):
                    d = xp[i] - m0
                    acc[0] += d
                    acc2[0] += d * d
            n += 1
        if pass_ == 0:
            m0 = _tree8(acc) / cnt
    d1 = _tree8(acc)
    mean[0] = m0 + d1 / cnt
    m2[0] = _tree8(acc2) - d1 * d1 / cnt
    if m2[0] < 0.0:
        m2[0] = 0.0


cdef int _plane_backward(const floating *z, const floating *dy, floating *dx,
                         Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                         Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                         Py_ssize_t sdxn, Py_ssize_t sdxc,
                         const double *m, const double *q, const double *g, const double *k,
                         bint train, floating *dgamma, floating *dbeta, int n_threads) noexcept nogil:
    cdef Py_ssize_t E = N * L
    cdef Py_ssize_t chunk = _plane_chunk(E, sizeof(floating), 2)
    cdef Py_ssize_t n_chunks = _cdiv(E, chunk)
    cdef Py_ssize_t n_tasks = C * n_chunks
    cdef int nt = _n_threads(n_threads, n_tasks, E * C)
    cdef double inv_m = 1.0 / E
    cdef double *A = <double *>malloc((3 + 2 * n_chunks) * C * sizeof(double))
    cdef double *B
    cdef double *Cc
    cdef double *part
    cdef Py_ssize_t t, c, ci, e0
    cdef double s_dy, s_zm
    if A == NULL:
        return -1
    B = A + C
    Cc = B + C
    part = Cc + C
    if n_chunks == 1:
        for c in prange(C, schedule='static', num_threads=nt):
            _plane_bwd_sums(z + c * szc, dy + c * sdyc, szn, sdyn, L, 0, E, m[c], A + c, B + c)
            _bwd_coefs(c, A[c], B[c], q, g, k, inv_m, train, dgamma, dbeta, A, B, Cc)
            _plane_affine(z + c * szc, dy + c * sdyc, dx + c * sdxc, szn, sdyn, sdxn, L,
                          0, E, m[c], A[c], B[c], Cc[c])
    else:
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            c = t // n_chunks
            e0 = (t % n_chunks) * chunk
            _plane_bwd_sums(z + c * szc, dy + c * sdyc, szn, sdyn, L, e0, min(E, e0 + chunk),
                            m[c], part + 2 * t, part + 2 * t + 1)
        for c in range(C):
            s_dy = 0.0
            s_zm = 0.0
            for ci in range(n_chunks):
                s_dy = s_dy + part[2 * (c * n_chunks + ci)]
                s_zm = s_zm + part[2 * (c * n_chunks + ci) + 1]
            _bwd_coefs(c, s_dy, s_zm, q, g, k, inv_m, train, dgamma, dbeta, A, B, Cc)
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            c = t // n_chunks
            e0 = (t % n_chunks) * chunk
            _plane_affine(z + c * szc, dy + c * sdyc, dx + c * sdxc, szn, sdyn, sdxn, L,
                          e0, min(E, e0 + chunk), m[c], A[c], B[c], Cc[c])
    free(A)
    return 0


cdef int _plane_forward(const floating *x, floating *out, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                        Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t soutn, Py_ssize_t soutc,
                        bint train, double eps, bint std_mode,
                        const double *gamma, const double *beta,
                        double *mean, double *var, double *invstd, int n_threads) noexcept nogil:
    cdef Py_ssize_t E = N * L
    cdef Py_ssize_t chunk = _plane_chunk(E, sizeof(floating), 1)
    cdef Py_ssize_t n_chunks = _cdiv(E, chunk) if train else 1
    cdef Py_ssize_t n_tasks = C * n_chunks
    cdef int nt = _n_threads(n_threads, n_tasks, E * C)
    cdef double *G = <double *>malloc((1 + 2 * n_chunks) * C * sizeof(double))
    cdef double *part
    cdef Py_ssize_t t, c, ci, e0
    cdef double n_a, mean_a, m2_a
    if G == NULL:
        return -1
    part = G + C
    if not train:
        for c in prange(C, schedule='static', num_threads=nt):
            G[c] = gamma[c] * invstd[c]
            _plane_affine(x + c * sxc, <const floating *>NULL, out + c * soutc, sxn, 0, soutn, L,
                          0, E, mean[c], 0.0, G[c], beta[c])
    elif n_chunks == 1:
        for c in prange(C, schedule='static', num_threads=nt):
            _plane_moments(x + c * sxc, sxn, L, 0, E, mean + c, var + c)
            _fwd_finish(c, mean[c], var[c], E, eps, std_mode, gamma, mean, var, invstd, G)
            _plane_affine(x + c * sxc, <const floating *>NULL, out + c * soutc, sxn, 0, soutn, L,
                          0, E, mean[c], 0.0, G[c], beta[c])
    else:
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            c = t // n_chunks
            e0 = (t % n_chunks) * chunk
            _plane_moments(x + c * sxc, sxn, L, e0, min(E, e0 + chunk), part + 2 * t, part + 2 * t + 1)
        for c in range(C):
            n_a = min(chunk, E)
            mean_a = part[2 * c * n_chunks]
            m2_a = part[2 * c * n_chunks + 1]
            for ci in range(1, n_chunks):
                _chan_merge(&n_a, &mean_a, &m2_a, min(chunk, E - ci * chunk),
                            part[2 * (c * n_chunks + ci)], part[2 * (c * n_chunks + ci) + 1])
            _fwd_finish(c, mean_a, m2_a, E, eps, std_mode, gamma, mean, var, invstd, G)
        for t in prange(n_tasks, schedule='static', num_threads=nt):
            c = t // n_chunks
            e0 = (t % n_chunks) * chunk
            _plane_affine(x + c * sxc, <const floating *>NULL, out + c * soutc, sxn, 0, soutn, L,
                          e0, min(E, e0 + chunk), mean[c], 0.0, G[c], beta[c])
    free(G)
    return 0


# ---------------------------------------------------------------------------
# Python entry points.  The face (bnkernels._api) has validated everything:
# dtypes float32/float64 and equal, shapes, strides in elements, per-channel
# vectors float64 and contiguous, outputs allocated.
# ---------------------------------------------------------------------------

def backward_rows(cnp.ndarray z, cnp.ndarray dy, cnp.ndarray dx,            # IN, IN, OUT
                  Py_ssize_t R, Py_ssize_t C, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sdx,
                  cnp.ndarray m, cnp.ndarray q, cnp.ndarray g, cnp.ndarray k,  # IN (C,) float64
                  bint train, cnp.ndarray dgamma, cnp.ndarray dbeta,         # OUT (C,)
                  int n_threads):
    """Backward over a rows view (R, C); see the module docstring for the math."""
    cdef void *zp = cnp.PyArray_DATA(z)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef void *dgp = cnp.PyArray_DATA(dgamma)
    cdef void *dbp = cnp.PyArray_DATA(dbeta)
    cdef const double *mp = <const double *>cnp.PyArray_DATA(m)
    cdef const double *qp = <const double *>cnp.PyArray_DATA(q)
    cdef const double *gp = <const double *>cnp.PyArray_DATA(g)
    cdef const double *kp = <const double *>cnp.PyArray_DATA(k)
    cdef bint single = cnp.PyArray_TYPE(z) == cnp.NPY_FLOAT32
    cdef int rc
    with nogil:
        if single:
            rc = _rows_backward(<const float *>zp, <const float *>dyp, <float *>dxp,
                                R, C, sz, sdy, sdx, mp, qp, gp, kp, train,
                                <float *>dgp, <float *>dbp, n_threads)
        else:
            rc = _rows_backward(<const double *>zp, <const double *>dyp, <double *>dxp,
                                R, C, sz, sdy, sdx, mp, qp, gp, kp, train,
                                <double *>dgp, <double *>dbp, n_threads)
    if rc != 0:
        raise MemoryError()


def backward_planar(cnp.ndarray z, cnp.ndarray dy, cnp.ndarray dx,         # IN, IN, OUT
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                    Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                    Py_ssize_t sdxn, Py_ssize_t sdxc,
                    cnp.ndarray m, cnp.ndarray q, cnp.ndarray g, cnp.ndarray k,  # IN (C,) float64
                    bint train, cnp.ndarray dgamma, cnp.ndarray dbeta,       # OUT (C,)
                    int n_threads):
    """Backward over a planar view (N, C, L); see the module docstring for the math."""
    cdef void *zp = cnp.PyArray_DATA(z)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef void *dgp = cnp.PyArray_DATA(dgamma)
    cdef void *dbp = cnp.PyArray_DATA(dbeta)
    cdef const double *mp = <const double *>cnp.PyArray_DATA(m)
    cdef const double *qp = <const double *>cnp.PyArray_DATA(q)
    cdef const double *gp = <const double *>cnp.PyArray_DATA(g)
    cdef const double *kp = <const double *>cnp.PyArray_DATA(k)
    cdef bint single = cnp.PyArray_TYPE(z) == cnp.NPY_FLOAT32
    cdef int rc
    with nogil:
        if single:
            rc = _plane_backward(<const float *>zp, <const float *>dyp, <float *>dxp,
                                 N, C, L, szn, szc, sdyn, sdyc, sdxn, sdxc,
                                 mp, qp, gp, kp, train, <float *>dgp, <float *>dbp, n_threads)
        else:
            rc = _plane_backward(<const double *>zp, <const double *>dyp, <double *>dxp,
                                 N, C, L, szn, szc, sdyn, sdyc, sdxn, sdxc,
                                 mp, qp, gp, kp, train, <double *>dgp, <double *>dbp, n_threads)
    if rc != 0:
        raise MemoryError()


def forward_rows(cnp.ndarray x, cnp.ndarray out, Py_ssize_t R, Py_ssize_t C,   # IN, OUT
                 Py_ssize_t sx, Py_ssize_t sout, bint train, double eps, bint std_mode,
                 cnp.ndarray gamma, cnp.ndarray beta,                  # IN (C,) float64
                 cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd,  # OUT (train) / IN (test)
                 int n_threads):
    """Forward over a rows view (R, C): statistics (train) and out."""
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *op = cnp.PyArray_DATA(out)
    cdef const double *gp = <const double *>cnp.PyArray_DATA(gamma)
    cdef const double *bp = <const double *>cnp.PyArray_DATA(beta)
    cdef double *mp = <double *>cnp.PyArray_DATA(mean)
    cdef double *vp = <double *>cnp.PyArray_DATA(var)
    cdef double *ip = <double *>cnp.PyArray_DATA(invstd)
    cdef bint single = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef int rc
    with nogil:
        if single:
            rc = _rows_forward(<const float *>xp, <float *>op, R, C, sx, sout,
                               train, eps, std_mode, gp, bp, mp, vp, ip, n_threads)
        else:
            rc = _rows_forward(<const double *>xp, <double *>op, R, C, sx, sout,
                               train, eps, std_mode, gp, bp, mp, vp, ip, n_threads)
    if rc != 0:
        raise MemoryError()


def forward_planar(cnp.ndarray x, cnp.ndarray out, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                   Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t soutn, Py_ssize_t soutc,
                   bint train, double eps, bint std_mode,
                   cnp.ndarray gamma, cnp.ndarray beta,
                   cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd, int n_threads):
    """Forward over a planar view (N, C, L): statistics (train) and out."""
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *op = cnp.PyArray_DATA(out)
    cdef const double *gp = <const double *>cnp.PyArray_DATA(gamma)
    cdef const double *bp = <const double *>cnp.PyArray_DATA(beta)
    cdef double *mp = <double *>cnp.PyArray_DATA(mean)
    cdef double *vp = <double *>cnp.PyArray_DATA(var)
    cdef double *ip = <double *>cnp.PyArray_DATA(invstd)
    cdef bint single = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef int rc
    with nogil:
        if single:
            rc = _plane_forward(<const float *>xp, <float *>op, N, C, L, sxn, sxc, soutn, soutc,
                                train, eps, std_mode, gp, bp, mp, vp, ip, n_threads)
        else:
            rc = _plane_forward(<const double *>xp, <double *>op, N, C, L, sxn, sxc, soutn, soutc,
                                train, eps, std_mode, gp, bp, mp, vp, ip, n_threads)
    if rc != 0:
        raise MemoryError()


cdef void _stream_add(const floating *a, const floating *b, floating *out,
                      Py_ssize_t n, int nt) noexcept nogil:
    cdef Py_ssize_t i
    for i in prange(n, schedule='static', num_threads=nt):
        out[i] = a[i] + b[i]


def stream_add(cnp.ndarray a, cnp.ndarray b, cnp.ndarray out, int n_threads=0):
    """out := a + b over contiguous arrays of one dtype: the roofline pass (read two, write one)."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    cdef int nt = bn_max_threads() if n_threads <= 0 else n_threads
    if not (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_IS_C_CONTIGUOUS(b)
            and cnp.PyArray_IS_C_CONTIGUOUS(out)):
        raise ValueError("stream_add needs C-contiguous arrays")
    if cnp.PyArray_SIZE(b) != n or cnp.PyArray_SIZE(out) != n:
        raise ValueError("stream_add needs arrays of one size")
    if not (a.dtype == b.dtype == out.dtype):
        raise TypeError("stream_add needs arrays of one dtype")
    cdef void *ap = cnp.PyArray_DATA(a)
    cdef void *bp = cnp.PyArray_DATA(b)
    cdef void *op = cnp.PyArray_DATA(out)
    cdef int typ = cnp.PyArray_TYPE(a)
    if typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64:
        raise TypeError("stream_add supports float32 and float64")
    with nogil:
        if typ == cnp.NPY_FLOAT32:
            _stream_add(<const float *>ap, <const float *>bp, <float *>op, n, nt)
        else:
            _stream_add(<const double *>ap, <const double *>bp, <double *>op, n, nt)
