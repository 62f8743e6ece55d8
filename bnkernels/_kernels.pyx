"""Compiled batch-norm kernels (float32 and float64, OpenMP across channels).

Design
------
Batch norm is memory-bound: per channel it needs two reductions over all of the
channel's elements before any output can be written.  The work is cut into tasks
(a block of channels x a range of their elements) sized from the shape and dtype,
so that a task's inputs fit in L2 (TASK_BYTES):

* rows layout: a (R, C) view, channels contiguous, any row stride (NC, NHWC,
  channels-last NCHW).  Inner loops run across the channels of a row: unit
  stride, one float64 accumulator per channel, no reassociated sum.
* planar layout: a (N, C, L) view, each (n, c) plane of L contiguous (NCHW,
  (N, C) in Fortran order as N=1).  A task walks, plane by plane, the planes of
  its channels, which are adjacent in memory for NCHW: short planes still make
  long runs.  Each run is reduced in BN_LANES interleaved float64 accumulators.

Fused: when one task holds all of its channels' data, it does the sums, the
per-channel coefficients and the output in one go while the data is cached, so
memory sees one read of each input and one write (a call whose channels all fit
one task gets two, for two threads).  Tall rows data that cannot
give an L2-sized task a wide block gets narrow blocks (NARROW_BLOCK_ELEMS
columns) of all rows, up to an L3 share (BIG_TASK_BYTES), where the L3 is large.
Otherwise (very tall data) tasks write partial sums, which are combined per
channel in chunk order, and a second sweep writes the output row by row, each
thread walking its tasks backwards so the last data it read is still in cache.
Planar channels split into chunks but within a quarter of the L3 are instead
taken whole by one thread, both sweeps back to back (same partials, same order).
float64 outputs of STREAM_OUTPUT_BYTES (the L3 size) or more are written with
streaming stores, which neither read the lines first nor evict the inputs.

Tasks depend on the shape, the dtype and the L3 size (L3_BYTES, fixed at load),
never on the thread count, and every sum runs in a fixed order: results are
bitwise identical for any ``n_threads``.
Sums are float64 for both dtypes, and ``x - mean`` is formed in float64, which
keeps float32 inputs with large offsets accurate.

The innermost loops are C (``_loops.h``) so they can carry ``restrict`` and
``omp simd``; they are compiled for AVX-512, AVX2 and baseline x86-64 and the
best is chosen when the module loads (all give the same bits: no FMA
contraction).  This module owns the decomposition, the threads and the math
per channel.

Backward, per channel (``z`` is x, or xhat for a seed-style cache)::

    sum_dy = sum(dy);  sum_dy_zm = sum(dy * (z - mean))
    dbeta = sum_dy;    dgamma = q * sum_dy_zm
    dx = A*(dy + Cc) + S*(z - mean)    (see _bwd_coefs)

Forward: task-local mean and M2 in one pass over x - K, K the channel's first
element (the mean is exact for a constant channel, M2 never negative), tasks
merged in order with Chan's formula, then out = gamma*invstd*(x - mean) + beta.
"""

import os

cimport numpy as cnp
from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport isfinite, sqrt
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
    #include <unistd.h>
    #include <stdint.h>
    #if defined(__SSE2__)
    #include <emmintrin.h>
    #endif
    /* bytes of the L2 (level 2) or L3 (level 3) data cache as the C library reports it; 0 if unknown */
    static long bn_cache_bytes(int level) {
    #if defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
        long v = sysconf(level == 3 ? _SC_LEVEL3_CACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
        return v > 0 ? v : 0;
    #else
        (void)level;
        return 0;
    #endif
    }
    #ifndef BNKERNELS_BUILD_FLAGS
    #define BNKERNELS_BUILD_FLAGS ""
    #endif
    static const char *bn_build_flags = BNKERNELS_BUILD_FLAGS;

    #define BN_LANES 16
    #define BN_PREFETCH_ROWS 8
    #define BN_SIMD _Pragma("omp simd")
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BN_NO_CLONES)
    #define BN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
    static const char *bn_simd_targets = "x86-64-v4 (AVX-512), x86-64-v3 (AVX2), x86-64 (SSE2): chosen at load";
    #else
    #define BN_CLONES
    static const char *bn_simd_targets = "as compiled (no runtime dispatch)";
    #endif
    #if defined(__GNUC__)
    #define bn_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
    #else
    #define bn_prefetch(p) ((void)(p))
    #endif

    /* fixed-order sum of BN_LANES partial sums */
    static inline double bn_tree(const double *a) {
        double s[8];
        int j;
        for (j = 0; j < 8; j++) s[j] = a[j] + a[j + 8];
        return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }

    /* the part [l0, l1) of plane n (elements n*L .. n*L+L-1) inside [e0, e1) */
    static inline void bn_span(Py_ssize_t n, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1,
                               Py_ssize_t *l0, Py_ssize_t *l1) {
        *l0 = e0 > n * L ? e0 - n * L : 0;
        *l1 = e1 - n * L < L ? e1 - n * L : L;
    }

    #define BN_T float
    #define BN_FN(name) name##_f
    #include "_loops.h"
    #undef BN_T
    #undef BN_FN
    #define BN_T double
    #define BN_FN(name) name##_d
    #define BN_F64
    #include "_loops.h"
    #undef BN_F64
    #undef BN_T
    #undef BN_FN
    """
    int bn_max_threads() nogil
    long bn_cache_bytes(int level) nogil
    int bn_has_openmp() nogil
    const char *bn_build_flags
    const char *bn_simd_targets
    void bn_rows_sums_f(const float *z, const float *dy, Py_ssize_t sz, Py_ssize_t sdy,
                        Py_ssize_t nrows, Py_ssize_t cw, const double *m,
                        double *s_dy, double *s_zm) nogil
    void bn_rows_sums_d(const double *z, const double *dy, Py_ssize_t sz, Py_ssize_t sdy,
                        Py_ssize_t nrows, Py_ssize_t cw, const double *m,
                        double *s_dy, double *s_zm) nogil
    void bn_rows_affine_f(const float *z, const float *dy, float *out,
                          Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nrows,
                          Py_ssize_t cw, const double *m, const double *S, const double *A,
                          const double *Cc, int stream) nogil
    void bn_rows_affine_d(const double *z, const double *dy, double *out,
                          Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nrows,
                          Py_ssize_t cw, const double *m, const double *S, const double *A,
                          const double *Cc, int stream) nogil
    void bn_rows_centered_f(const float *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw,
                            const double *m0, double *d1, double *d2) nogil
    void bn_rows_centered_d(const double *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw,
                            const double *m0, double *d1, double *d2) nogil
    void bn_plane_sums_f(const float *z, const float *dy, Py_ssize_t szn, Py_ssize_t szc,
                         Py_ssize_t sdyn, Py_ssize_t sdyc, Py_ssize_t L, Py_ssize_t e0,
                         Py_ssize_t e1, Py_ssize_t cw, const double *m,
                         double *s_dy, double *s_zm) nogil
    void bn_plane_sums_d(const double *z, const double *dy, Py_ssize_t szn, Py_ssize_t szc,
                         Py_ssize_t sdyn, Py_ssize_t sdyc, Py_ssize_t L, Py_ssize_t e0,
                         Py_ssize_t e1, Py_ssize_t cw, const double *m,
                         double *s_dy, double *s_zm) nogil
    void bn_plane_affine_f(const float *z, const float *dy, float *out,
                           Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                           Py_ssize_t soutn, Py_ssize_t soutc, Py_ssize_t L, Py_ssize_t e0,
                           Py_ssize_t e1, Py_ssize_t cw, const double *m, const double *S,
                           const double *A, const double *Cc, int stream) nogil
    void bn_plane_affine_d(const double *z, const double *dy, double *out,
                           Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                           Py_ssize_t soutn, Py_ssize_t soutc, Py_ssize_t L, Py_ssize_t e0,
                           Py_ssize_t e1, Py_ssize_t cw, const double *m, const double *S,
                           const double *A, const double *Cc, int stream) nogil
    void bn_plane_moments_f(const float *x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L,
                            Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw,
                            double *mean, double *m2, double *d1) nogil
    void bn_plane_moments_d(const double *x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L,
                            Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw,
                            double *mean, double *m2, double *d1) nogil
    void bn_stream_add_f(const float *a, const float *b, float *out, Py_ssize_t n) nogil
    void bn_stream_add_d(const double *a, const double *b, double *out, Py_ssize_t n) nogil

cdef enum:
    LINE_BYTES = 64           # cache line
    MIN_BLOCK_BYTES = 1024    # narrowest channel block of a fused rows task
    SEGMENT_BYTES = 1024      # preferred width of a forward rows task's block
    WIDE_BLOCK_BYTES = 16384  # channel block of a chunked rows task (full rows up to this)
    TASK_BYTES = 1 << 20      # input bytes of one task: its second sweep hits L2 (1-2 MiB L2s)
    NARROW_BLOCK_ELEMS = 64   # narrowest fused rows block (columns) when all rows must fit
    PAR_TASKS = 16            # forward rows: aim for this many fused tasks when the data allows
    SERIAL_ELEMS = 1 << 15    # below this many elements, one thread
    SCRATCH = 4               # per-column vectors a rows task spreads (m, S, A, Cc)
    PREFAULT_BYTES = 4 << 20  # outputs from this size are faulted in before the tasks run
    PAGE_BYTES = 4096


_MAX_CACHE_BYTES = 1 << 62   # anything larger is not a cache size (and would not fit Py_ssize_t)


def _sysfs_size(text):
    """Bytes of a sysfs cache size such as '512K' or '8192K'; None if it is not one."""
    text = text.strip()
    unit = 1
    for suffix, bytes_ in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            unit = bytes_
            text = text[:len(text) - 1]
    if not text.isdigit():
        return None
    value = int(text) * unit
    return value if 0 < value <= _MAX_CACHE_BYTES else None


def _cache_bytes(int level, base="/sys/devices/system/cpu/cpu0/cache"):
    """Bytes of the level-2 or level-3 cache one core sees; 0 if unknown.

    Linux's sysfs (``base``) gives the share of a core's group (the C library may report a
    whole package's L3); where sysfs can be read it alone decides, entries it cannot parse
    being skipped.  The C library is asked only where there is no sysfs."""
    try:
        names = sorted(os.listdir(base))
    except OSError:
        value = bn_cache_bytes(level)
        return value if 0 < value <= _MAX_CACHE_BYTES else 0
    for name in names:
        if not name.startswith("index"):
            continue
        try:
            with open(os.path.join(base, name, "level")) as f:
                lv = int(f.read())
            with open(os.path.join(base, name, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(base, name, "size")) as f:
                size = _sysfs_size(f.read())
        except (OSError, ValueError):
            continue
        if lv == level and kind in ("Data", "Unified") and size is not None:
            return size
    return 0


def _l3_bytes():
    """The L3 size the plans assume: BNKERNELS_L3_BYTES if set (to pin the plans, and so
    the bits, across machines), else what _cache_bytes finds."""
    text = os.environ.get("BNKERNELS_L3_BYTES", "").strip()
    if text:
        value = int(text) if text.isdigit() else -1
        if 0 <= value <= _MAX_CACHE_BYTES:
            return value
        import warnings
        warnings.warn("BNKERNELS_L3_BYTES=%r is not a byte count from 0 to 2**62; ignored" % text,
                      RuntimeWarning, stacklevel=2)
    return _cache_bytes(3)


cdef Py_ssize_t _big_task_bytes(Py_ssize_t l3):
    """Input bytes of a narrow fused rows task at most: 4 MiB (an eighth of the L3, so
    that both cores' tasks stay there between their two sweeps) where the L3 has 32 MiB
    or more; 0, no such tasks, below that or when its size is unknown.  Measured: on a
    32 MiB L3 they beat chunked full rows; on an 8 MiB one 1 MiB tasks lost to them by
    1.4-2.6x in six of seven shapes (their strided rows alias in the caches)."""
    return (4 << 20) if l3 >= (32 << 20) else 0


# fixed when the module loads: plans depend on the shape, the dtype and the L3 size,
# never on the thread count
L3_BYTES = _l3_bytes()
cdef Py_ssize_t BIG_TASK_BYTES = _big_task_bytes(L3_BYTES)
# input bytes of a planar channel block whose two sweeps may run back to back from L3
cdef Py_ssize_t L3_SHARE_BYTES = L3_BYTES // 4
# float64 outputs of at least this many bytes are written with streaming stores (results
# are the same either way): the L3 size, 32 MiB where it is unknown
STREAM_OUTPUT_BYTES = L3_BYTES if L3_BYTES > 0 else 32 << 20
cdef Py_ssize_t STREAM_BYTES = STREAM_OUTPUT_BYTES


cdef inline bint _streams(Py_ssize_t n_elems, Py_ssize_t itemsize) noexcept nogil:
    """Whether an output of n_elems writes with streaming stores: float64 from STREAM_BYTES
    (float32 sweeps are bound by their conversions; streaming measured no gain there)."""
    return itemsize == 8 and n_elems * itemsize >= STREAM_BYTES


cdef inline bint _rows_streams(Py_ssize_t R, Py_ssize_t C, Py_ssize_t L,
                               Py_ssize_t itemsize) noexcept nogil:
    """_streams for a rows output; NCHW planes taken as rows (L > 1) do not stream: NCHW 7x7
    float64 measured 1.14-1.26x slower with two threads (faster with one), where (N, C) and
    NHWC rows gained."""
    return L == 1 and _streams(R * C, itemsize)

CHANNEL_BLOCK_BYTES = MIN_BLOCK_BYTES
TASK_INPUT_BYTES = TASK_BYTES
NARROW_BLOCK_COLUMNS = NARROW_BLOCK_ELEMS
BIG_TASK_INPUT_BYTES = BIG_TASK_BYTES
PARALLEL_MIN_ELEMS = SERIAL_ELEMS


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(bn_has_openmp())


def max_threads():
    """The OpenMP default thread count (OMP_NUM_THREADS, threadpoolctl)."""
    return bn_max_threads()


def cache_bytes():
    """(L2, L3) cache sizes in bytes as one core sees them (0: unknown)."""
    return _cache_bytes(2), _cache_bytes(3)


def build_flags():
    """The compiler flags the kernels were built with."""
    return bn_build_flags.decode()


def simd_targets():
    """The instruction sets the inner loops were compiled for."""
    return bn_simd_targets.decode()


# ---------------------------------------------------------------------------
# Work decomposition: from the shape and dtype only, never the thread count
# ---------------------------------------------------------------------------

cdef struct Plan:
    Py_ssize_t cb         # channels per task
    Py_ssize_t n_blocks
    Py_ssize_t chunk      # rows (rows layout) or elements of a channel (planar) per task
    Py_ssize_t n_chunks   # 1: fused, each task holds all of its channels' data
    Py_ssize_t n_tasks    # n_blocks * n_chunks, block-major


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef inline Py_ssize_t _clamp(Py_ssize_t v, Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    return lo if v < lo else (hi if v > hi else v)


cdef Plan _rows_plan(Py_ssize_t R, Py_ssize_t C, Py_ssize_t L, Py_ssize_t isz,
                     Py_ssize_t n_arrays) noexcept nogil:
    """Rows of C channels of L contiguous columns each (L = 1 but for small NCHW planes)."""
    cdef Plan p
    cdef Py_ssize_t width = L * isz                    # bytes of one channel in a row
    cdef Py_ssize_t line = max(1, LINE_BYTES // width)  # channels per cache line
    cdef Py_ssize_t min_cb = max(1, MIN_BLOCK_BYTES // width)
    cdef Py_ssize_t fit = TASK_BYTES // max(1, R * width * n_arrays)   # channels whose rows fit
    cdef Py_ssize_t narrow = min(C, max(1, NARROW_BLOCK_ELEMS // L))
    if fit >= min(C, min_cb):
        if n_arrays > 1 and L > 1:
            # backward over NCHW planes taken as rows: the narrowest block, measured faster
            # than wider ones (NCHW 7x7), as more tasks share the work
            p.cb = min(C, min_cb)
        else:
            # wide enough for long unit-stride runs, narrow enough for PAR_TASKS tasks and the
            # budget; the backward of (64, 65536) float64 took 0.74-0.80 the time of the
            # narrowest block (a few rows of 256 KiB stride, whose short runs alias in the caches)
            p.cb = max(_cdiv(_cdiv(C, PAR_TASKS), line) * line, _cdiv(SEGMENT_BYTES, width))
            p.cb = _clamp(p.cb, min_cb, max(min_cb, fit // line * line))
            p.cb = min(p.cb, C)
        if p.cb == C and C >= 4 * line and R * C * L >= SERIAL_ELEMS:
            # one block would leave the other cores idle: two, of two cache lines per row or
            # more (0.58-0.74 of the time for (512, 256) to (2048, 64) float32; four, of
            # narrower runs, were slower again, and (4096, 32) split into single lines varied
            # from 0.71 to 1.11)
            p.cb = _cdiv(_cdiv(C, 2), line) * line
        p.chunk = R
    elif R * narrow * width * n_arrays <= BIG_TASK_BYTES:
        # tall: a narrow block of all rows still fits a share of L3; its second sweep reads L3
        p.cb = narrow
        p.chunk = R
    else:
        p.cb = min(C, max(1, WIDE_BLOCK_BYTES // width))
        p.chunk = max(1, TASK_BYTES // (p.cb * width * n_arrays))
    p.n_blocks = _cdiv(C, p.cb)
    p.n_chunks = _cdiv(R, p.chunk)
    p.n_tasks = p.n_blocks * p.n_chunks
    return p


cdef Plan _planar_plan(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t isz,
                       Py_ssize_t n_arrays) noexcept nogil:
    cdef Plan p
    cdef Py_ssize_t E = N * L
    cdef Py_ssize_t fit = TASK_BYTES // max(1, E * isz * n_arrays)   # whole channels that fit a task
    if fit >= 1:
        p.cb = _clamp(_cdiv(C, PAR_TASKS), 1, fit)
        p.chunk = E
    else:
        p.cb = 1
        p.chunk = TASK_BYTES // (isz * n_arrays)
    p.n_blocks = _cdiv(C, p.cb)
    p.n_chunks = _cdiv(E, p.chunk)
    p.n_tasks = p.n_blocks * p.n_chunks
    return p


def rows_plan(Py_ssize_t R, Py_ssize_t C, Py_ssize_t itemsize, Py_ssize_t n_arrays,
              Py_ssize_t L=1):
    """(channels_per_block, n_blocks, rows_per_chunk, n_chunks) of the rows layout."""
    cdef Plan p = _rows_plan(R, C, L, itemsize, n_arrays)
    return p.cb, p.n_blocks, p.chunk, p.n_chunks


def planar_plan(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t itemsize, Py_ssize_t n_arrays):
    """(channels_per_block, n_blocks, elements_per_chunk, n_chunks) of the planar layout."""
    cdef Plan p = _planar_plan(N, C, L, itemsize, n_arrays)
    return p.cb, p.n_blocks, p.chunk, p.n_chunks


cdef inline int _n_threads(int requested, Py_ssize_t n_tasks, Py_ssize_t n_elems) noexcept nogil:
    cdef int nt = bn_max_threads() if requested <= 0 else requested
    if n_elems < SERIAL_ELEMS:
        return 1
    if nt > n_tasks:
        nt = <int>n_tasks
    return nt if nt > 0 else 1


cdef struct Span:
    Py_ssize_t c0, cw   # channels [c0, c0 + cw)
    Py_ssize_t i0, i1   # rows (rows layout) or elements of each channel (planar) [i0, i1)
    Py_ssize_t ci       # chunk index


cdef inline Span _task(const Plan *p, Py_ssize_t t, Py_ssize_t C, Py_ssize_t extent) noexcept nogil:
    """The channels and rows/elements of task t.  Returned by value: inside prange,
    variables written through pointers would be shared between threads."""
    cdef Span sp
    cdef Py_ssize_t bi = t // p.n_chunks
    sp.ci = t - bi * p.n_chunks
    sp.c0 = bi * p.cb
    sp.cw = min(p.cb, C - sp.c0)
    sp.i0 = sp.ci * p.chunk
    sp.i1 = min(extent, sp.i0 + p.chunk)
    return sp


cdef inline Py_ssize_t _share(Py_ssize_t n, int tid, int nt) noexcept nogil:
    """Start of thread tid's contiguous share of n tasks."""
    return n * tid // nt


# ---------------------------------------------------------------------------
# Per-channel coefficients
# ---------------------------------------------------------------------------

cdef struct Coefs:
    # per-channel inputs of the backward, float64 (C,)
    const double *mean     # shift of z: the batch (or running) mean; zeros for xhat
    const double *scale    # invstd; for a seed-style cache (z = xhat) denom = 1/invstd
    const void *gamma      # float64, or float32 (the data's dtype: forward's cache as it is)
    bint gamma_single
    const double *var      # read in 'std' eps mode only
    bint xhat_form         # z is xhat, not x
    bint std_mode          # xhat = (x - mean) / (sqrt(var) + eps)
    bint train             # batch statistics (else running: mean, var are constants)


cdef inline void _bwd_coefs(Py_ssize_t c, double sum_dy, double sum_dy_zm, const Coefs *cf,
                            double inv_m, floating *dgamma, floating *dbeta,
                            double *A, double *S, double *Cc) noexcept nogil:
    """dx = A*(dy + Cc) + S*(z - mean) for channel c; and dgamma, dbeta.

    With r = invstd and xhat = (z - mean)*Q:  dgamma = Q*sum_dy_zm,  A = gamma*r,
    Cc = -sum_dy/M,  S = B*Q with B = -A*kq*sum_dy_zm/M, where kq*xhat is the variance
    term: kq = r ('var'), 1/sqrt(var) ('std'; 0 at var = 0, the subgradient of sqrt),
    1 when z is xhat (then Q = 1).
    """
    cdef double r, s, q, b
    if cf.xhat_form:
        r = 1.0 / cf.scale[c]
        q = 1.0
        s = 1.0
    else:
        r = cf.scale[c]
        q = r
        if cf.std_mode:
            s = sqrt(cf.var[c])
            s = 1.0 / s if s > 0.0 else 0.0
        else:
            s = r
    dbeta[c] = <floating>sum_dy
    dgamma[c] = <floating>(q * sum_dy_zm)
    if cf.gamma_single:
        A[c] = (<const float *>cf.gamma)[c] * r
    else:
        A[c] = (<const double *>cf.gamma)[c] * r
    if cf.train:
        b = -A[c] * s * sum_dy_zm * inv_m
        Cc[c] = -sum_dy * inv_m   # dy - mean(dy) first: exact 0 when M = 1
    else:
        b = 0.0
        Cc[c] = 0.0
    S[c] = b * q   # finite in float64 whatever the scale


cdef void _bwd_merge(const double *part, Py_ssize_t n_chunks, Py_ssize_t C,
                     Py_ssize_t c0, Py_ssize_t c1, const Coefs *cf, double inv_m,
                     floating *dgamma, floating *dbeta,
                     double *A, double *S, double *Cc) noexcept nogil:
    """_bwd_coefs of channels c0..c1-1 from their chunks' partial sums in part, added in chunk
    order.  Read chunk by chunk, across the channels: a channel's partials lie C apart, and
    read down that stride they share one cache set when C is a power of two (2048 channels:
    12 ms more per call).  A and S hold the running sums until _bwd_coefs overwrites them."""
    cdef Py_ssize_t c, ci
    for c in range(c0, c1):
        A[c] = 0.0
        S[c] = 0.0
    for ci in range(n_chunks):
        for c in range(c0, c1):
            A[c] = A[c] + part[ci * C + c]
            S[c] = S[c] + part[(n_chunks + ci) * C + c]
    for c in range(c0, c1):
        _bwd_coefs(c, A[c], S[c], cf, inv_m, dgamma, dbeta, A, S, Cc)


cdef inline void _fwd_finish(Py_ssize_t c, double mean, double m2, Py_ssize_t M,
                             double eps, bint std_mode, const double *gamma,
                             double *mean_out, double *var_out, double *invstd_out,
                             double *scale_out) noexcept nogil:
    """Channel c's mean, var, invstd from its mean and M2 over M elements, and the output's
    slope gamma*invstd."""
    cdef double var = m2 / M
    if var < 0.0:
        var = 0.0
    mean_out[c] = mean
    var_out[c] = var
    if std_mode:
        invstd_out[c] = 1.0 / (sqrt(var) + eps)
    else:
        invstd_out[c] = 1.0 / sqrt(var + eps)
    scale_out[c] = gamma[c] * invstd_out[c]


cdef void _fwd_merge(const double *part, Py_ssize_t n_chunks, Py_ssize_t chunk,
                     Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1, Py_ssize_t E, double eps,
                     bint std_mode, const double *gamma, double *mean, double *var,
                     double *invstd, double *scale) noexcept nogil:
    """Channels c0..c1-1's statistics from their chunks' (mean, M2) in part, merged in chunk
    order, chunk by chunk across the channels (as _bwd_merge); chunks of ``chunk`` of a
    channel's E elements (the last one shorter).  mean and var hold the running (mean, M2)
    until _fwd_finish overwrites them."""
    cdef double n_a = min(chunk, E)
    cdef double n_b, n_c
    cdef Py_ssize_t c, ci
    for c in range(c0, c1):
        mean[c] = part[c]
        var[c] = part[n_chunks * C + c]
    for ci in range(1, n_chunks):
        n_b = min(chunk, E - ci * chunk)
        for c in range(c0, c1):
            n_c = n_a
            _chan_merge(&n_c, &mean[c], &var[c], n_b, part[ci * C + c],
                        part[(n_chunks + ci) * C + c])
        n_a = n_a + n_b
    for c in range(c0, c1):
        _fwd_finish(c, mean[c], var[c], E, eps, std_mode, gamma, mean, var, invstd, scale)


cdef inline void _chan_merge(double *n_a, double *mean_a, double *m2_a,
                             double n_b, double mean_b, double m2_b) noexcept nogil:
    """Merge (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a) (Chan, Golub, LeVeque)."""
    cdef double n = n_a[0] + n_b
    cdef double delta = mean_b - mean_a[0]
    mean_a[0] = mean_a[0] + delta * (n_b / n)
    m2_a[0] = m2_a[0] + m2_b + delta * delta * (n_a[0] * n_b / n)
    n_a[0] = n


# ---------------------------------------------------------------------------
# A fresh output (a new NumPy array of some MiB) is untouched memory: its pages
# are mapped and zeroed by the kernel at the first write to each.  Tasks write
# their output in blocks spread over the whole array, so the first task of every
# thread would fault in nearly all of it, serially and long before most of it is
# written, and its zeroed lines would be evicted before use.  Writing one element
# per page first, each thread over its own contiguous share, faults the pages in
# parallel and in order.  Nothing is read from the output; the tasks overwrite it.
# ---------------------------------------------------------------------------

cdef void _prefault(floating *out, Py_ssize_t n_outer, Py_ssize_t s_outer,
                    Py_ssize_t n_inner, Py_ssize_t s_inner, Py_ssize_t width,
                    int nt) noexcept nogil:
    """Write 0 to one element per page of the runs out[o*s_outer + i*s_inner + (0..width)],
    o < n_outer, i < n_inner, the runs shared out to nt threads in order; only for outputs of
    PREFAULT_BYTES or more and more than one thread."""
    cdef Py_ssize_t n_runs = n_outer * n_inner
    cdef Py_ssize_t step = PAGE_BYTES // sizeof(floating)
    cdef Py_ssize_t k, j
    cdef floating *run
    cdef int tid
    if nt < 2 or n_runs * width * <Py_ssize_t>sizeof(floating) < PREFAULT_BYTES:
        return
    for tid in prange(nt, schedule='static', num_threads=nt):
        for k in range(_share(n_runs, tid, nt), _share(n_runs, tid + 1, nt)):
            run = out + (k // n_inner) * s_outer + (k % n_inner) * s_inner
            j = 0
            while j < width:
                run[j] = 0
                j = j + step


# ---------------------------------------------------------------------------
# Rows layout: (R, C), channel stride 1, row strides in elements.
# A task: channels [c0, c0+cw) x rows [r0, r1).  Inner loops run across the
# channels of one row: unit stride, one accumulator per channel.
# ---------------------------------------------------------------------------

cdef inline void _rows_sums(const floating *z, const floating *dy, Py_ssize_t sz, Py_ssize_t sdy,
                            Py_ssize_t nrows, Py_ssize_t cw, const double *m,
                            double *sum_dy, double *sum_dy_zm) noexcept nogil:
    if floating is float:
        bn_rows_sums_f(z, dy, sz, sdy, nrows, cw, m, sum_dy, sum_dy_zm)
    else:
        bn_rows_sums_d(z, dy, sz, sdy, nrows, cw, m, sum_dy, sum_dy_zm)


cdef inline void _rows_affine(const floating *z, const floating *dy, floating *out,
                              Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout,
                              Py_ssize_t nrows, Py_ssize_t cw, const double *m, const double *S,
                              const double *A, const double *Cc, bint stream) noexcept nogil:
    if floating is float:
        bn_rows_affine_f(z, dy, out, sz, sdy, sout, nrows, cw, m, S, A, Cc, stream)
    else:
        bn_rows_affine_d(z, dy, out, sz, sdy, sout, nrows, cw, m, S, A, Cc, stream)


cdef inline void _rows_centered(const floating *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw,
                                const double *m0, double *d1, double *d2) noexcept nogil:
    if floating is float:
        bn_rows_centered_f(x, sx, nrows, cw, m0, d1, d2)
    else:
        bn_rows_centered_d(x, sx, nrows, cw, m0, d1, d2)


# A rows task covers channels [c0, c0+cw): columns [c0*L, (c0+cw)*L) of each row.
# The C loops work per column; these helpers spread per-channel vectors over the
# columns and fold per-column sums back into channels (in column order).  `scratch`
# holds SCRATCH*cw*L doubles, one buffer per thread.

cdef inline void _spread(const double *v, Py_ssize_t cw, Py_ssize_t L, double *out) noexcept nogil:
    cdef Py_ssize_t c, l
    for c in range(cw):
        for l in range(L):
            out[c * L + l] = v[c]


cdef inline void _fold(const double *v, Py_ssize_t cw, Py_ssize_t L, double *out) noexcept nogil:
    cdef Py_ssize_t c, l
    cdef double s
    for c in range(cw):
        s = 0.0
        for l in range(L):
            s = s + v[c * L + l]
        out[c] = s


cdef void _rows_task_sums(const floating *z, const floating *dy, Py_ssize_t sz, Py_ssize_t sdy,
                          Py_ssize_t nrows, Py_ssize_t cw, Py_ssize_t L, const double *m,
                          double *sum_dy, double *sum_dy_zm, double *scratch) noexcept nogil:
    """sum_dy[c], sum_dy_zm[c] of channels 0:cw of the task (pointers at its first column)"""
    cdef Py_ssize_t cols = cw * L
    if L == 1:
        _rows_sums(z, dy, sz, sdy, nrows, cw, m, sum_dy, sum_dy_zm)
        return
    _spread(m, cw, L, scratch)
    _rows_sums(z, dy, sz, sdy, nrows, cols, scratch, scratch + cols, scratch + 2 * cols)
    _fold(scratch + cols, cw, L, sum_dy)
    _fold(scratch + 2 * cols, cw, L, sum_dy_zm)


cdef void _rows_task_affine(const floating *z, const floating *dy, floating *out,
                            Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nrows,
                            Py_ssize_t cw, Py_ssize_t L, const double *m, const double *S,
                            const double *A, const double *Cc, double *scratch,
                            bint stream) noexcept nogil:
    """out := A*(dy + Cc) + S*(z - m) per channel over the task; S*(z - m) + Cc without dy
    (then A is not read); stream: with streaming stores"""
    cdef Py_ssize_t cols = cw * L
    if L == 1:
        _rows_affine(z, dy, out, sz, sdy, sout, nrows, cw, m, S, A, Cc, stream)
        return
    _spread(m, cw, L, scratch)
    _spread(S, cw, L, scratch + cols)
    _spread(Cc, cw, L, scratch + 2 * cols)
    if dy != NULL:
        _spread(A, cw, L, scratch + 3 * cols)
    _rows_affine(z, dy, out, sz, sdy, sout, nrows, cols, scratch, scratch + cols,
                 scratch + 3 * cols, scratch + 2 * cols, stream)


cdef void _rows_task_moments(const floating *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw,
                             Py_ssize_t L, double *mean, double *m2, double *scratch) noexcept nogil:
    """Mean and M2 of channels 0:cw over the task's nrows*L elements each, in one pass.

    Sums run over x - K with K the channel's first element (shifted data): no cancellation
    unless the data sits many standard deviations from K, the mean of a constant channel
    is exact and its M2 exactly 0; M2 is clamped at 0.
    """
    cdef Py_ssize_t cols = cw * L, c
    cdef double n = nrows * L
    cdef double d1
    for c in range(cw):
        mean[c] = x[c * L]
    _spread(mean, cw, L, scratch)
    _rows_centered(x, sx, nrows, cols, scratch, scratch + cols, scratch + 2 * cols)
    _fold(scratch + 2 * cols, cw, L, m2)
    _fold(scratch + cols, cw, L, scratch)
    for c in range(cw):
        d1 = scratch[c]
        mean[c] = mean[c] + d1 / n
        m2[c] = m2[c] - d1 * d1 / n
        if m2[c] < 0.0:
            m2[c] = 0.0


cdef int _rows_backward(const floating *z, const floating *dy, floating *dx,
                        Py_ssize_t R, Py_ssize_t C, Py_ssize_t L,
                        Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sdx,
                        const Coefs *cf, floating *dgamma, floating *dbeta, int n_threads) noexcept nogil:
    cdef Plan p = _rows_plan(R, C, L, sizeof(floating), 2)
    cdef int nt = _n_threads(n_threads, p.n_tasks, R * C * L)
    cdef bint stream = _rows_streams(R, C, L, sizeof(floating))
    cdef double inv_m = 1.0 / (R * L)
    cdef const double *m = cf.mean
    cdef double *A = <double *>malloc((3 + 2 * p.n_chunks) * C * sizeof(double))
    cdef double *S
    cdef double *Cc
    cdef double *part
    cdef double *scratch
    cdef Span sp
    cdef int tid, failed = 0
    cdef Py_ssize_t t, c0, cw, r0, r1, c, ci, o_z, o_dy
    if A == NULL:
        return -1
    S = A + C
    Cc = S + C
    part = Cc + C    # [n_chunks, C] partial sum_dy, then [n_chunks, C] partial sum_dy_zm
    if p.n_blocks > 1:
        _prefault(dx, R, sdx, 1, 0, C * L, nt)
    for tid in prange(nt, schedule='static', num_threads=nt):
        scratch = <double *>malloc(SCRATCH * p.cb * L * sizeof(double))
        if scratch == NULL:
            failed += 1
        else:
            for t in range(_share(p.n_tasks, tid, nt), _share(p.n_tasks, tid + 1, nt)):
                sp = _task(&p, t, C, R)
                c0 = sp.c0
                cw = sp.cw
                r0 = sp.i0
                r1 = sp.i1
                o_z = r0 * sz + c0 * L
                o_dy = r0 * sdy + c0 * L
                ci = sp.ci
                _rows_task_sums(z + o_z, dy + o_dy, sz, sdy, r1 - r0, cw, L, m + c0,
                                part + ci * C + c0, part + (p.n_chunks + ci) * C + c0, scratch)
                if p.n_chunks == 1:
                    # fused: the block's data is still in cache for dx
                    for c in range(c0, c0 + cw):
                        _bwd_coefs(c, part[c], part[C + c], cf, inv_m, dgamma, dbeta, A, S, Cc)
                    _rows_task_affine(z + o_z, dy + o_dy, dx + r0 * sdx + c0 * L, sz, sdy, sdx,
                                      r1 - r0, cw, L, m + c0, S + c0, A + c0, Cc + c0, scratch, stream)
            free(scratch)
    if p.n_chunks > 1 and not failed:
        _bwd_merge(part, p.n_chunks, C, 0, C, cf, inv_m, dgamma, dbeta, A, S, Cc)
        for tid in prange(nt, schedule='static', num_threads=nt):
            scratch = <double *>malloc(SCRATCH * p.cb * L * sizeof(double))
            if scratch == NULL:
                failed += 1
            else:
                # each thread walks its own tasks backwards: the last ones read are still cached
                t = _share(p.n_tasks, tid + 1, nt) - 1
                while t >= _share(p.n_tasks, tid, nt):
                    sp = _task(&p, t, C, R)
                    c0 = sp.c0
                    cw = sp.cw
                    r0 = sp.i0
                    r1 = sp.i1
                    _rows_task_affine(z + r0 * sz + c0 * L, dy + r0 * sdy + c0 * L,
                                      dx + r0 * sdx + c0 * L, sz, sdy, sdx, r1 - r0, cw, L,
                                      m + c0, S + c0, A + c0, Cc + c0, scratch, stream)
                    t = t - 1
                free(scratch)
    free(A)
    return -1 if failed else 0


cdef int _rows_forward(const floating *x, floating *out, Py_ssize_t R, Py_ssize_t C, Py_ssize_t L,
                       Py_ssize_t sx, Py_ssize_t sout, bint train, double eps, bint std_mode,
                       const double *gamma, const double *beta,
                       double *mean, double *var, double *invstd, int n_threads) noexcept nogil:
    """train: mean, var, invstd := batch statistics; then out := gamma*invstd*(x - mean) + beta"""
    cdef Plan p = _rows_plan(R, C, L, sizeof(floating), 1)
    cdef int nt
    cdef bint stream = _rows_streams(R, C, L, sizeof(floating))
    cdef double *part = <double *>malloc((2 * p.n_chunks + 1) * C * sizeof(double))
    cdef double *scale
    cdef double *scratch
    cdef Span sp
    cdef int tid, failed = 0
    cdef Py_ssize_t t, c0, cw, r0, r1, c, ci
    if part == NULL:
        return -1
    # part: [n_chunks, C] chunk means, then [n_chunks, C] chunk M2; then scale = gamma*invstd
    scale = part + 2 * p.n_chunks * C
    if not train:   # elementwise: any block of whole rows will do
        p.chunk = R
        p.n_chunks = 1
        p.n_tasks = p.n_blocks
        for c in range(C):
            scale[c] = gamma[c] * invstd[c]
    nt = _n_threads(n_threads, p.n_tasks, R * C * L)
    if p.n_blocks > 1:
        _prefault(out, R, sout, 1, 0, C * L, nt)
    for tid in prange(nt, schedule='static', num_threads=nt):
        scratch = <double *>malloc(SCRATCH * p.cb * L * sizeof(double))
        if scratch == NULL:
            failed += 1
        else:
            for t in range(_share(p.n_tasks, tid, nt), _share(p.n_tasks, tid + 1, nt)):
                sp = _task(&p, t, C, R)
                c0 = sp.c0
                cw = sp.cw
                r0 = sp.i0
                r1 = sp.i1
                ci = sp.ci
                if train:
                    _rows_task_moments(x + r0 * sx + c0 * L, sx, r1 - r0, cw, L,
                                       part + ci * C + c0, part + (p.n_chunks + ci) * C + c0,
                                       scratch)
                if train and p.n_chunks == 1:
                    for c in range(c0, c0 + cw):
                        _fwd_finish(c, part[c], part[C + c], R * L, eps, std_mode, gamma,
                                    mean, var, invstd, scale)
                if not train or p.n_chunks == 1:
                    _rows_task_affine(x + r0 * sx + c0 * L, <const floating *>NULL,
                                      out + r0 * sout + c0 * L, sx, 0, sout, r1 - r0, cw, L,
                                      mean + c0, scale + c0, NULL, beta + c0, scratch, stream)
            free(scratch)
    if train and p.n_chunks > 1 and not failed:
        # chunks of p.chunk rows are chunks of p.chunk*L elements of each channel
        _fwd_merge(part, p.n_chunks, p.chunk * L, C, 0, C, R * L, eps, std_mode, gamma, mean,
                   var, invstd, scale)
        for tid in prange(nt, schedule='static', num_threads=nt):
            scratch = <double *>malloc(SCRATCH * p.cb * L * sizeof(double))
            if scratch == NULL:
                failed += 1
            else:
                t = _share(p.n_tasks, tid + 1, nt) - 1
                while t >= _share(p.n_tasks, tid, nt):
                    sp = _task(&p, t, C, R)
                    c0 = sp.c0
                    cw = sp.cw
                    r0 = sp.i0
                    r1 = sp.i1
                    _rows_task_affine(x + r0 * sx + c0 * L, <const floating *>NULL,
                                      out + r0 * sout + c0 * L, sx, 0, sout, r1 - r0, cw, L,
                                      mean + c0, scale + c0, NULL, beta + c0, scratch, stream)
                    t = t - 1
                free(scratch)
    free(part)
    return -1 if failed else 0


# ---------------------------------------------------------------------------
# Planar layout: (N, C, L), each (n, c) plane of L contiguous; strides in elements.
# A channel's elements are numbered e = n*L + l.  A task: channels [c0, c0+cw) x
# elements [e0, e1); for each n it walks the planes of its channels, which are
# adjacent in memory for NCHW, so small planes still make long runs.
# ---------------------------------------------------------------------------

cdef inline void _plane_sums(const floating *z, const floating *dy, Py_ssize_t szn, Py_ssize_t szc,
                             Py_ssize_t sdyn, Py_ssize_t sdyc, Py_ssize_t L, Py_ssize_t e0,
                             Py_ssize_t e1, Py_ssize_t cw, const double *m,
                             double *sum_dy, double *sum_dy_zm) noexcept nogil:
    if floating is float:
        bn_plane_sums_f(z, dy, szn, szc, sdyn, sdyc, L, e0, e1, cw, m, sum_dy, sum_dy_zm)
    else:
        bn_plane_sums_d(z, dy, szn, szc, sdyn, sdyc, L, e0, e1, cw, m, sum_dy, sum_dy_zm)


cdef inline void _plane_affine(const floating *z, const floating *dy, floating *out,
                               Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                               Py_ssize_t soutn, Py_ssize_t soutc, Py_ssize_t L, Py_ssize_t e0,
                               Py_ssize_t e1, Py_ssize_t cw, const double *m, const double *S,
                               const double *A, const double *Cc, bint stream) noexcept nogil:
    if floating is float:
        bn_plane_affine_f(z, dy, out, szn, szc, sdyn, sdyc, soutn, soutc, L, e0, e1, cw,
                          m, S, A, Cc, stream)
    else:
        bn_plane_affine_d(z, dy, out, szn, szc, sdyn, sdyc, soutn, soutc, L, e0, e1, cw,
                          m, S, A, Cc, stream)


cdef inline void _plane_moments(const floating *x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L,
                                Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw,
                                double *mean, double *m2, double *d1) noexcept nogil:
    if floating is float:
        bn_plane_moments_f(x, sxn, sxc, L, e0, e1, cw, mean, m2, d1)
    else:
        bn_plane_moments_d(x, sxn, sxc, L, e0, e1, cw, mean, m2, d1)


cdef int _plane_backward(const floating *z, const floating *dy, floating *dx,
                         Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                         Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                         Py_ssize_t sdxn, Py_ssize_t sdxc,
                         const Coefs *cf, floating *dgamma, floating *dbeta, int n_threads) noexcept nogil:
    cdef Py_ssize_t E = N * L
    cdef Plan p = _planar_plan(N, C, L, sizeof(floating), 2)
    cdef int nt = _n_threads(n_threads, p.n_tasks, E * C)
    cdef bint stream = _streams(E * C, sizeof(floating))
    cdef double inv_m = 1.0 / E
    cdef const double *m = cf.mean
    cdef double *A = <double *>malloc((3 + 2 * p.n_chunks) * C * sizeof(double))
    cdef double *S
    cdef double *Cc
    cdef double *part
    cdef Span sp
    cdef int tid
    cdef Py_ssize_t t, c0, cw, e0, e1, c, ci, bi
    if A == NULL:
        return -1
    S = A + C
    Cc = S + C
    part = Cc + C    # [n_chunks, C] partial sum_dy, then [n_chunks, C] partial sum_dy_zm
    if N > 1:
        _prefault(dx, N, sdxn, C, sdxc, L, nt)
    if p.n_chunks == 1:
        for tid in prange(nt, schedule='static', num_threads=nt):
            for t in range(_share(p.n_tasks, tid, nt), _share(p.n_tasks, tid + 1, nt)):
                sp = _task(&p, t, C, E)
                c0 = sp.c0
                cw = sp.cw
                e0 = sp.i0
                e1 = sp.i1
                _plane_sums(z + c0 * szc, dy + c0 * sdyc, szn, szc, sdyn, sdyc, L, e0, e1, cw, m + c0,
                            part + c0, part + C + c0)
                for c in range(c0, c0 + cw):
                    _bwd_coefs(c, part[c], part[C + c], cf, inv_m, dgamma, dbeta, A, S, Cc)
                _plane_affine(z + c0 * szc, dy + c0 * sdyc, dx + c0 * sdxc, szn, szc, sdyn, sdyc,
                              sdxn, sdxc, L, e0, e1, cw, m + c0, S + c0, A + c0, Cc + c0, stream)
    elif p.n_blocks >= 4 * nt and E * <Py_ssize_t>sizeof(floating) * 2 * p.cb <= L3_SHARE_BYTES:
        # Channels too long for one L2-sized task but short enough for a share of L3: each
        # thread takes whole channels and runs both sweeps of one back to back, the second
        # reading L3, not memory.  The same chunk partials, combined in the same order as
        # below: the same bits.
        for tid in prange(nt, schedule='static', num_threads=nt):
            for bi in range(_share(p.n_blocks, tid, nt), _share(p.n_blocks, tid + 1, nt)):
                for ci in range(p.n_chunks):
                    sp = _task(&p, bi * p.n_chunks + ci, C, E)
                    _plane_sums(z + sp.c0 * szc, dy + sp.c0 * sdyc, szn, szc, sdyn, sdyc, L,
                                sp.i0, sp.i1, sp.cw, m + sp.c0,
                                part + ci * C + sp.c0, part + (p.n_chunks + ci) * C + sp.c0)
                _bwd_merge(part, p.n_chunks, C, bi * p.cb, min(C, bi * p.cb + p.cb), cf, inv_m,
                           dgamma, dbeta, A, S, Cc)
                t = bi * p.n_chunks + p.n_chunks - 1
                while t >= bi * p.n_chunks:
                    sp = _task(&p, t, C, E)
                    c0 = sp.c0
                    _plane_affine(z + c0 * szc, dy + c0 * sdyc, dx + c0 * sdxc, szn, szc, sdyn, sdyc,
                                  sdxn, sdxc, L, sp.i0, sp.i1, sp.cw, m + c0, S + c0, A + c0, Cc + c0, stream)
                    t = t - 1
    else:
        for tid in prange(nt, schedule='static', num_threads=nt):
            for t in range(_share(p.n_tasks, tid, nt), _share(p.n_tasks, tid + 1, nt)):
                sp = _task(&p, t, C, E)
                c0 = sp.c0
                cw = sp.cw
                e0 = sp.i0
                e1 = sp.i1
                ci = sp.ci
                _plane_sums(z + c0 * szc, dy + c0 * sdyc, szn, szc, sdyn, sdyc, L, e0, e1, cw, m + c0,
                            part + ci * C + c0, part + (p.n_chunks + ci) * C + c0)
        _bwd_merge(part, p.n_chunks, C, 0, C, cf, inv_m, dgamma, dbeta, A, S, Cc)
        for tid in prange(nt, schedule='static', num_threads=nt):
            t = _share(p.n_tasks, tid + 1, nt) - 1
            while t >= _share(p.n_tasks, tid, nt):
                sp = _task(&p, t, C, E)
                c0 = sp.c0
                cw = sp.cw
                e0 = sp.i0
                e1 = sp.i1
                _plane_affine(z + c0 * szc, dy + c0 * sdyc, dx + c0 * sdxc, szn, szc, sdyn, sdyc,
                              sdxn, sdxc, L, e0, e1, cw, m + c0, S + c0, A + c0, Cc + c0, stream)
                t = t - 1
    free(A)
    return 0


cdef int _plane_forward(const floating *x, floating *out, Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                        Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t soutn, Py_ssize_t soutc,
                        bint train, double eps, bint std_mode,
                        const double *gamma, const double *beta,
                        double *mean, double *var, double *invstd, int n_threads) noexcept nogil:
    cdef Py_ssize_t E = N * L
    cdef Plan p = _planar_plan(N, C, L, sizeof(floating), 1)
    cdef int nt
    cdef bint stream = _streams(E * C, sizeof(floating))
    cdef double *part = <double *>malloc((3 * p.n_chunks + 1) * C * sizeof(double))
    cdef double *scale
    cdef Span sp
    cdef int tid
    cdef Py_ssize_t t, c0, cw, e0, e1, c, ci, bi
    if part == NULL:
        return -1
    # part: [n_chunks, C] means, [n_chunks, C] M2, [n_chunks, C] scratch; scale = gamma*invstd
    scale = part + 3 * p.n_chunks * C
    if not train and p.n_chunks > 1:   # elementwise: whole channels per task are fine
        p.cb = 1
        p.chunk = E
        p.n_chunks = 1
        p.n_blocks = C
        p.n_tasks = C
    nt = _n_threads(n_threads, p.n_tasks, E * C)
    if N > 1:
        _prefault(out, N, soutn, C, soutc, L, nt)
    if not train:
        for c in range(C):
            scale[c] = gamma[c] * invstd[c]
        for tid in prange(nt, schedule='static', num_threads=nt):
            for t in range(_share(p.n_tasks, tid, nt), _share(p.n_tasks, tid + 1, nt)):
                sp = _task(&p, t, C, E)
                c0 = sp.c0
                cw = sp.cw
                e0 = sp.i0
                e1 = sp.i1
                _plane_affine(x + c0 * sxc, <const floating *>NULL, out + c0 * soutc, sxn, sxc, 0, 0,
                              soutn, soutc, L, e0, e1, cw, mean + c0, scale + c0, NULL, beta + c0, stream)
    elif p.n_chunks == 1:
        for tid in prange(nt, schedule='static', num_threads=nt):
            for t in range(_share(p.n_tasks, tid, nt), _share(p.n_tasks, tid + 1, nt)):
                sp = _task(&p, t, C, E)
                c0 = sp.c0
                cw = sp.cw
                e0 = sp.i0
                e1 = sp.i1
                _plane_moments(x + c0 * sxc, sxn, sxc, L, e0, e1, cw, mean + c0, var + c0, part + c0)
                for c in range(c0, c0 + cw):
                    _fwd_finish(c, mean[c], var[c], E, eps, std_mode, gamma, mean, var, invstd,
                                scale)
                _plane_affine(x + c0 * sxc, <const floating *>NULL, out + c0 * soutc, sxn, sxc, 0, 0,
                              soutn, soutc, L, e0, e1, cw, mean + c0, scale + c0, NULL, beta + c0, stream)
    elif p.n_blocks >= 4 * nt and E * <Py_ssize_t>sizeof(floating) * p.cb <= L3_SHARE_BYTES:
        # whole channels per thread, both sweeps back to back (as in _plane_backward): the
        # same chunk statistics merged in the same order as below
        for tid in prange(nt, schedule='static', num_threads=nt):
            for bi in range(_share(p.n_blocks, tid, nt), _share(p.n_blocks, tid + 1, nt)):
                for ci in range(p.n_chunks):
                    sp = _task(&p, bi * p.n_chunks + ci, C, E)
                    _plane_moments(x + sp.c0 * sxc, sxn, sxc, L, sp.i0, sp.i1, sp.cw,
                                   part + ci * C + sp.c0, part + (p.n_chunks + ci) * C + sp.c0,
                                   part + (2 * p.n_chunks + ci) * C + sp.c0)
                _fwd_merge(part, p.n_chunks, p.chunk, C, bi * p.cb, min(C, bi * p.cb + p.cb), E,
                           eps, std_mode, gamma, mean, var, invstd, scale)
                t = bi * p.n_chunks + p.n_chunks - 1
                while t >= bi * p.n_chunks:
                    sp = _task(&p, t, C, E)
                    c0 = sp.c0
                    _plane_affine(x + c0 * sxc, <const floating *>NULL, out + c0 * soutc, sxn, sxc,
                                  0, 0, soutn, soutc, L, sp.i0, sp.i1, sp.cw, mean + c0, scale + c0,
                                  NULL, beta + c0, stream)
                    t = t - 1
    else:
        for tid in prange(nt, schedule='static', num_threads=nt):
            for t in range(_share(p.n_tasks, tid, nt), _share(p.n_tasks, tid + 1, nt)):
                sp = _task(&p, t, C, E)
                c0 = sp.c0
                cw = sp.cw
                e0 = sp.i0
                e1 = sp.i1
                ci = sp.ci
                _plane_moments(x + c0 * sxc, sxn, sxc, L, e0, e1, cw, part + ci * C + c0,
                               part + (p.n_chunks + ci) * C + c0,
                               part + (2 * p.n_chunks + ci) * C + c0)
        _fwd_merge(part, p.n_chunks, p.chunk, C, 0, C, E, eps, std_mode, gamma, mean, var,
                   invstd, scale)
        for tid in prange(nt, schedule='static', num_threads=nt):
            t = _share(p.n_tasks, tid + 1, nt) - 1
            while t >= _share(p.n_tasks, tid, nt):
                sp = _task(&p, t, C, E)
                c0 = sp.c0
                cw = sp.cw
                e0 = sp.i0
                e1 = sp.i1
                _plane_affine(x + c0 * sxc, <const floating *>NULL, out + c0 * soutc, sxn, sxc, 0, 0,
                              soutn, soutc, L, e0, e1, cw, mean + c0, scale + c0, NULL, beta + c0, stream)
                t = t - 1
    free(part)
    return 0


# ---------------------------------------------------------------------------
# Python entry points.  The face (bnkernels._api) has validated everything:
# dtypes float32/float64 and equal, shapes, strides in elements, per-channel
# vectors float64 and contiguous, outputs allocated.
# ---------------------------------------------------------------------------

cdef Coefs _coefs(cnp.ndarray mean, cnp.ndarray scale, cnp.ndarray gamma, cnp.ndarray var,
                  bint xhat_form, bint std_mode, bint train):
    cdef Coefs cf
    cf.mean = <const double *>cnp.PyArray_DATA(mean)
    cf.scale = <const double *>cnp.PyArray_DATA(scale)
    cf.gamma = cnp.PyArray_DATA(gamma)
    cf.gamma_single = cnp.PyArray_TYPE(gamma) == cnp.NPY_FLOAT32
    cf.var = <const double *>cnp.PyArray_DATA(var)
    cf.xhat_form = xhat_form
    cf.std_mode = std_mode
    cf.train = train
    return cf


def backward_rows(cnp.ndarray z, cnp.ndarray dy, cnp.ndarray dx,            # IN, IN, OUT
                  Py_ssize_t R, Py_ssize_t C, Py_ssize_t L,
                  Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sdx,
                  cnp.ndarray mean, cnp.ndarray scale, cnp.ndarray gamma, cnp.ndarray var,
                  bint xhat_form, bint std_mode, bint train,               # IN (C,) float64*
                  cnp.ndarray dgamma, cnp.ndarray dbeta, int n_threads):   # OUT (C,)
    """Backward over a rows view (R, C*L): channel c owns columns c*L:(c+1)*L of each row.

    See _bwd_coefs for the per-channel inputs (*gamma may also be float32).
    """
    cdef Coefs cf = _coefs(mean, scale, gamma, var, xhat_form, std_mode, train)
    cdef void *zp = cnp.PyArray_DATA(z)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef void *dgp = cnp.PyArray_DATA(dgamma)
    cdef void *dbp = cnp.PyArray_DATA(dbeta)
    cdef bint single = cnp.PyArray_TYPE(z) == cnp.NPY_FLOAT32
    cdef int rc
    if R <= 0 or C <= 0 or L <= 0:
        raise ValueError("empty input: every channel needs at least one element")
    with nogil:
        if single:
            rc = _rows_backward(<const float *>zp, <const float *>dyp, <float *>dxp,
                                R, C, L, sz, sdy, sdx, &cf, <float *>dgp, <float *>dbp, n_threads)
        else:
            rc = _rows_backward(<const double *>zp, <const double *>dyp, <double *>dxp,
                                R, C, L, sz, sdy, sdx, &cf, <double *>dgp, <double *>dbp, n_threads)
    if rc != 0:
        raise MemoryError()


def backward_planar(cnp.ndarray z, cnp.ndarray dy, cnp.ndarray dx,         # IN, IN, OUT
                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t L,
                    Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                    Py_ssize_t sdxn, Py_ssize_t sdxc,
                    cnp.ndarray mean, cnp.ndarray scale, cnp.ndarray gamma, cnp.ndarray var,
                    bint xhat_form, bint std_mode, bint train,             # IN (C,) float64
                    cnp.ndarray dgamma, cnp.ndarray dbeta, int n_threads):  # OUT (C,)
    """Backward over a planar view (N, C, L); see _bwd_coefs for the per-channel inputs
    (gamma may also be float32)."""
    cdef Coefs cf = _coefs(mean, scale, gamma, var, xhat_form, std_mode, train)
    cdef void *zp = cnp.PyArray_DATA(z)
    cdef void *dyp = cnp.PyArray_DATA(dy)
    cdef void *dxp = cnp.PyArray_DATA(dx)
    cdef void *dgp = cnp.PyArray_DATA(dgamma)
    cdef void *dbp = cnp.PyArray_DATA(dbeta)
    cdef bint single = cnp.PyArray_TYPE(z) == cnp.NPY_FLOAT32
    cdef int rc
    if N * L <= 0 or C <= 0:
        raise ValueError("empty input: every channel needs at least one element")
    with nogil:
        if single:
            rc = _plane_backward(<const float *>zp, <const float *>dyp, <float *>dxp,
                                 N, C, L, szn, szc, sdyn, sdyc, sdxn, sdxc,
                                 &cf, <float *>dgp, <float *>dbp, n_threads)
        else:
            rc = _plane_backward(<const double *>zp, <const double *>dyp, <double *>dxp,
                                 N, C, L, szn, szc, sdyn, sdyc, sdxn, sdxc,
                                 &cf, <double *>dgp, <double *>dbp, n_threads)
    if rc != 0:
        raise MemoryError()


def forward_rows(cnp.ndarray x, cnp.ndarray out, Py_ssize_t R, Py_ssize_t C, Py_ssize_t L,
                 Py_ssize_t sx, Py_ssize_t sout, bint train, double eps, bint std_mode,
                 cnp.ndarray gamma, cnp.ndarray beta,                  # IN (C,) float64
                 cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd,  # OUT (train) / IN (test)
                 int n_threads):
    """Forward over a rows view (R, C*L): statistics (train) and out."""
    cdef void *xp = cnp.PyArray_DATA(x)
    cdef void *op = cnp.PyArray_DATA(out)
    cdef const double *gp = <const double *>cnp.PyArray_DATA(gamma)
    cdef const double *bp = <const double *>cnp.PyArray_DATA(beta)
    cdef double *mp = <double *>cnp.PyArray_DATA(mean)
    cdef double *vp = <double *>cnp.PyArray_DATA(var)
    cdef double *ip = <double *>cnp.PyArray_DATA(invstd)
    cdef bint single = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef int rc
    if R <= 0 or C <= 0 or L <= 0:
        raise ValueError("empty input: every channel needs at least one element")
    with nogil:
        if single:
            rc = _rows_forward(<const float *>xp, <float *>op, R, C, L, sx, sout,
                               train, eps, std_mode, gp, bp, mp, vp, ip, n_threads)
        else:
            rc = _rows_forward(<const double *>xp, <double *>op, R, C, L, sx, sout,
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
    if N * L <= 0 or C <= 0:
        raise ValueError("empty input: every channel needs at least one element")
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
    cdef int tid
    cdef Py_ssize_t lo, hi
    for tid in prange(nt, schedule='static', num_threads=nt):
        lo = _share(n, tid, nt)
        hi = _share(n, tid + 1, nt)
        if floating is float:
            bn_stream_add_f(a + lo, b + lo, out + lo, hi - lo)
        else:
            bn_stream_add_d(a + lo, b + lo, out + lo, hi - lo)


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


def running_update(cnp.ndarray running, cnp.ndarray stat, double momentum):
    """momentum*running + (1 - momentum)*stat as a new array of running's dtype, rounded as
    NumPy rounds that expression: for float32 ``running`` the first product is float32 and the
    sum float64, rounded to float32 once (float64 throughout for float64).  ``running`` float32
    or float64 and ``stat`` float64, both contiguous and of one length.  None if a result is
    not finite: the caller then lets NumPy evaluate it, with the warnings (or errors) its
    ``np.errstate`` asks for.  Saves the face five NumPy calls per vector."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(running), c
    cdef int typ = cnp.PyArray_TYPE(running)
    if typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64:
        raise TypeError("running_update supports float32 and float64 running arrays")
    if cnp.PyArray_TYPE(stat) != cnp.NPY_FLOAT64 or cnp.PyArray_SIZE(stat) != n:
        raise TypeError("running_update needs a float64 stat of the running array's length")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(running) and cnp.PyArray_IS_C_CONTIGUOUS(stat)):
        raise ValueError("running_update needs contiguous arrays")
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, dims, typ, 0)
    cdef const double *s = <const double *>cnp.PyArray_DATA(stat)
    cdef double rest = 1.0 - momentum
    cdef float m32 = <float>momentum   # NumPy casts the Python float to the array's dtype
    cdef const float *rf
    cdef float *of
    cdef const double *rd
    cdef double *od
    cdef bint finite = True
    if typ == cnp.NPY_FLOAT32:
        rf = <const float *>cnp.PyArray_DATA(running)
        of = <float *>cnp.PyArray_DATA(out)
        for c in range(n):
            of[c] = <float>(<double>(m32 * rf[c]) + rest * s[c])
            finite = finite and isfinite(of[c])
    else:
        rd = <const double *>cnp.PyArray_DATA(running)
        od = <double *>cnp.PyArray_DATA(out)
        for c in range(n):
            od[c] = momentum * rd[c] + rest * s[c]
            finite = finite and isfinite(od[c])
    return out if finite else None
