"""Compiled batch-norm kernels (float16, float32 and float64, OpenMP across channels).

Design (docs/design.md has the whole of it)
------
Batch norm is memory-bound: per channel it needs two reductions over all of the
channel's elements before any output can be written.  Two layouts cover every input:

* rows: a (R, C*L) view, channels contiguous within a row (NC, NHWC, channels-last
  NCHW; NCHW with small planes as L columns per channel), any row stride;
* planar: a (N, C, L) view, each (n, c) plane of L contiguous (NCHW).

A call is cut into tasks (a block of channels x a range of their elements) by a plan
that depends on the shape, the dtype and the L3 size, never on the thread count.  One
driver (``_run``) runs every pass over its tasks; a pass is three task functions
(a ``Work``): *reduce* a task into per-channel partial sums, *finish* channels (merge
their partials into coefficients), *write* a task's output.  The driver picks the
schedule:

* fused: each task holds all of its channels' data: reduce, finish and write it while
  it is cached, so memory sees one read of each input and one write;
* chunked: tasks write partial sums, the channels are finished in chunk order, then a
  second sweep writes the output, each thread walking its tasks backwards so that the
  last data it read is still cached;
* L3 share (planar): a thread takes whole channels too long for one task but short
  enough for a share of L3 and runs both sweeps of one back to back (same partials,
  same merge order, so the same bits as chunked);
* write only (no reduce): each of the plan's tasks (chunks included) finishes its
  channels' coefficients, then writes.

Every sum runs in an order fixed by the plan: results are bitwise identical for any
``n_threads``.  Sums are float64 for every dtype, and ``x - mean`` is formed in float64.
The innermost loops are C (``_loops.h``, instantiated per dtype by ``_kernels.h``).

Backward, per channel (``z`` is x, or xhat for a seed-style cache)::

    sum_dy = sum(dy);  sum_dy_zm = sum(dy * (z - mean))
    dbeta = sum_dy;    dgamma = q * sum_dy_zm
    dx = A*(dy + Cc) + S*(z - mean)    (see _bwd_coefs)

Forward: task-local mean and M2 in one pass over x - K, K the channel's first
element, tasks merged in order with Chan's formula, then
out = S*(x - mean) + Cc with S = gamma*invstd and Cc = beta.
"""

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport isfinite, isinf, sqrt
from libc.stdint cimport uint16_t
from libc.stdlib cimport free, malloc

from . import _machine

cnp.import_array()

cdef extern from "_kernels.h" nogil:
    int bn_max_threads()
    int bn_has_openmp()
    const char *bn_build_flags
    const char *bn_simd_targets
    int bn_f16_code(int kind)
    int bn_mapped(const char *lo, const char *hi)
    ctypedef struct bn_epi:
        const void *aux
        void *out2
        Py_ssize_t aux_n, aux_c, out2_n, out2_c
        int relu
        int zterm
    ctypedef struct bn_loops:
        void (*rows_sums)(const void *z, const void *dy, const void *y, Py_ssize_t sz,
                          Py_ssize_t sdy, Py_ssize_t sy, Py_ssize_t nrows, Py_ssize_t cw,
                          const double *m, double *s_dy, double *s_zm) noexcept nogil
        void (*rows_centered)(const void *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw,
                              const double *m0, double *d1, double *d2) noexcept nogil
        void (*rows_affine)(const void *z, const void *dy, void *out, Py_ssize_t sz,
                            Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nrows, Py_ssize_t cw,
                            const double *m, const double *S, const double *A,
                            const double *Cc, int stream, const bn_epi *e) noexcept nogil
        void (*plane_sums)(const void *z, const void *dy, const void *y, Py_ssize_t szn,
                           Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc, Py_ssize_t syn,
                           Py_ssize_t syc, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1,
                           Py_ssize_t cw, const double *m, double *s_dy,
                           double *s_zm) noexcept nogil
        void (*plane_moments)(const void *x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L,
                              Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw, double *mean,
                              double *m2, double *d1) noexcept nogil
        void (*plane_affine)(const void *z, const void *dy, void *out, Py_ssize_t szn,
                             Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc,
                             Py_ssize_t soutn, Py_ssize_t soutc, Py_ssize_t L, Py_ssize_t e0,
                             Py_ssize_t e1, Py_ssize_t cw, const double *m, const double *S,
                             const double *A, const double *Cc, int stream,
                             const bn_epi *e) noexcept nogil
    const bn_loops bn_loops_f
    const bn_loops bn_loops_d
    const bn_loops bn_loops_h
    double bn_load(const void *p, Py_ssize_t i, Py_ssize_t isz)
    void bn_store(void *p, Py_ssize_t i, Py_ssize_t isz, double v)
    void bn_stream_add_f(const float *a, const float *b, float *out, Py_ssize_t n)
    void bn_stream_add_d(const double *a, const double *b, double *out, Py_ssize_t n)
    void bn_stream_add_h(const uint16_t *a, const uint16_t *b, uint16_t *out, Py_ssize_t n)

# sizes the plans are made of (read by the tests and `python -m bnkernels`)
cpdef enum:
    CHANNEL_BLOCK_BYTES = 1024    # narrowest channel block of a fused rows task
    TASK_INPUT_BYTES = 1 << 20    # input bytes of one task: its second sweep hits L2
    WIDE_BLOCK_BYTES = 16384      # channel block of a chunked rows task (full rows up to this)
    PARALLEL_MIN_ELEMS = 1 << 15  # below this many elements, one thread

cdef enum:
    LINE_BYTES = 64           # cache line
    SEGMENT_BYTES = 1024      # preferred width of a rows task's block
    PAR_TASKS = 16            # rows and planar plans aim for this many tasks when the data allows
    SCRATCH = 4               # per-column vectors a rows task spreads (m, S, A, Cc)
    PREFAULT_BYTES = 4 << 20  # outputs from this size are faulted in before the tasks run
    PAGE_BYTES = 4096


# ---------------------------------------------------------------------------
# What the plans assume of the machine, fixed when the module loads
# ---------------------------------------------------------------------------

cdef struct Sizes:
    Py_ssize_t l3_share_bytes         # input bytes of a planar block that may use the L3 share
    Py_ssize_t stream_output_bytes    # STREAM_OUTPUT_BYTES

# the L3 size the plans assume (BNKERNELS_L3_BYTES pins it).  Only the planar L3 share and
# the streaming stores (below 16 MiB) follow it, and neither changes a bit of the results.
L3_BYTES = _machine.l3_bytes()
# float64 outputs of at least this many bytes are written with streaming stores (results
# are the same either way): STREAM_CAP_BYTES, or the L3 size if that is smaller.  Not a
# larger reported L3: on a shared VM that reports 32 MiB, outputs of 25 MiB measured
# 1.1-1.4x faster streamed (docs/performance.md)
STREAM_CAP_BYTES = 16 << 20
STREAM_OUTPUT_BYTES = min(L3_BYTES, STREAM_CAP_BYTES) if L3_BYTES > 0 else STREAM_CAP_BYTES
cdef Sizes _sizes
_sizes.l3_share_bytes = L3_BYTES // 4
_sizes.stream_output_bytes = STREAM_OUTPUT_BYTES


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(bn_has_openmp())


def max_threads():
    """The OpenMP default thread count (OMP_NUM_THREADS, threadpoolctl)."""
    return bn_max_threads()


def cache_bytes():
    """(L2, L3) cache sizes in bytes as one core sees them (0: unknown)."""
    return _machine.cache_bytes(2), _machine.cache_bytes(3)


def build_flags():
    """The compiler flags the kernels were built with."""
    return bn_build_flags.decode()


def simd_targets():
    """The instruction sets the inner loops were compiled for."""
    return bn_simd_targets.decode()


# the float16 conversion codes by name, in the order of _kernels.h's BN_F16_* values
F16_CODES = ("integer", "f16c", "avx512")
_f16_code = F16_CODES[bn_f16_code(len(F16_CODES) - 1)]


def float16_code(kind=None):
    """The code that converts float16 to and from float in the kernels: "avx512" (AVX-512
    and F16C), "f16c" (AVX2 and F16C) or "integer" (32-bit integer code, any x86-64); the
    same bits with each (but a NaN's sign and payload where two NaNs meet).  "avx512" also
    sums float32 planes in its own loops, and "avx512" and "f16c" write float32 outputs in
    theirs (the same bits).  With a kind,
    use it, or the widest below it the CPU has (when the module loads: the widest).
    Returns the kind in use.  Not thread-safe: for tests and measurements, between
    calls."""
    global _f16_code
    if kind is not None:
        if kind not in F16_CODES:
            raise ValueError("float16_code: kind must be one of %s, not %r" % (F16_CODES, kind))
        _f16_code = F16_CODES[bn_f16_code(F16_CODES.index(kind))]
    return _f16_code


# ---------------------------------------------------------------------------
# Plans: from the shape and dtype only, never the thread count
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


cdef inline Py_ssize_t _even_chunks(Py_ssize_t n, Py_ssize_t most) noexcept nogil:
    """The length of chunks of at most `most` that split n into an even number of chunks
    (or one) of one length, the last shorter by less than their number: two threads then
    share a pass's chunks evenly, where a short last chunk or an odd count would leave one
    of them waiting at the end.  The count goes up by one at most, so a chunk keeps at
    least half of `most`.  (Chunks of fewer elements than their number can come out fewer
    than asked, an odd count: the length is rounded up.)"""
    cdef Py_ssize_t k = _cdiv(n, most)
    if k <= 1:
        return n
    k += k & 1
    return _cdiv(n, k)


cdef Plan _rows_plan(Py_ssize_t R, Py_ssize_t C, Py_ssize_t L, Py_ssize_t isz,
                     Py_ssize_t n_arrays) noexcept nogil:
    """Rows of C channels of L contiguous columns each (L = 1 but for small NCHW planes)."""
    cdef Plan p
    cdef Py_ssize_t step, half
    cdef Py_ssize_t width = L * isz                    # bytes of one channel in a row
    cdef Py_ssize_t line = max(1, LINE_BYTES // width)  # channels per cache line
    cdef Py_ssize_t min_cb = max(1, CHANNEL_BLOCK_BYTES // width)
    cdef Py_ssize_t fit = TASK_INPUT_BYTES // max(1, R * width * n_arrays)  # channels whose rows fit
    if fit >= min(C, min_cb):
        if n_arrays > 1 and L > 1:
            # backward over NCHW planes taken as rows: the narrowest block, so that more
            # tasks share the work (docs/performance.md)
            p.cb = min(C, min_cb)
        else:
            # wide enough for long unit-stride runs (short runs of rows far apart alias in
            # the caches), narrow enough for PAR_TASKS tasks and the task budget
            p.cb = max(_cdiv(_cdiv(C, PAR_TASKS), line) * line, _cdiv(SEGMENT_BYTES, width))
            p.cb = _clamp(p.cb, min_cb, max(min_cb, fit // line * line))
            p.cb = min(p.cb, C)
        if L > 1:
            # NCHW planes: blocks of a multiple of 8 columns (rounded up, or down where the
            # budget does not allow more and the block stays as wide as min_cb), so that the
            # sums' register blocks end in one of constant width (8, 16 or 32), not in a rest
            # that loads and stores its accumulators at every row
            # the channels whose L columns make a multiple of 8: 8 / gcd(L, 8), gcd(L, 8)
            # being L's lowest set bit up to 8
            step = 8 // min(L & -L, 8)
            if _cdiv(p.cb, step) * step <= min(C, fit):
                p.cb = _cdiv(p.cb, step) * step
            elif p.cb // step * step >= min(C, min_cb):
                p.cb = p.cb // step * step
        p.chunk = R
        if R * C * width * n_arrays <= TASK_INPUT_BYTES and R * C * L >= PARALLEL_MIN_ELEMS:
            # all the data fits one task and the call may run threads.  Two threads taking
            # half the blocks each must get shares within a quarter of the channels of each
            # other; else (one block, a narrow last block, an odd count) one block of two
            # chunks of half the rows.  Not two blocks of columns cut for the purpose: each
            # core would then write pieces of every row a few lines long, next to the
            # other's (slower; docs/performance.md)
            half = _cdiv(C, p.cb) // 2 * p.cb
            if 4 * max(C - 2 * half, 2 * half - C) > C:
                p.cb = C
                p.chunk = _cdiv(R, 2)
    else:
        # tall: chunks of full rows (up to WIDE_BLOCK_BYTES of each), not narrow blocks of
        # all rows: those would keep their second sweep in a share of the L3, which a shared
        # VM does not reliably give, and their far-apart short runs alias in the caches
        # (slower on every machine measured; docs/performance.md)
        p.cb = min(C, max(1, WIDE_BLOCK_BYTES // width))
        p.chunk = _even_chunks(R, max(1, TASK_INPUT_BYTES // (p.cb * width * n_arrays)))
    p.n_blocks = _cdiv(C, p.cb)
    p.n_chunks = _cdiv(R, p.chunk)
    p.n_tasks = p.n_blocks * p.n_chunks
    return p


cdef Plan _planar_plan(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t isz,
                       Py_ssize_t n_arrays) noexcept nogil:
    cdef Plan p
    cdef Py_ssize_t E = N * L
    cdef Py_ssize_t fit = TASK_INPUT_BYTES // max(1, E * isz * n_arrays)  # whole channels per task
    if fit >= 1:
        p.cb = _clamp(_cdiv(C, PAR_TASKS), 1, fit)
        p.chunk = E
    else:
        p.cb = 1
        p.chunk = _even_chunks(E, TASK_INPUT_BYTES // (isz * n_arrays))
    p.n_blocks = _cdiv(C, p.cb)
    p.n_chunks = _cdiv(E, p.chunk)
    p.n_tasks = p.n_blocks * p.n_chunks
    return p


def _positive(**sizes):
    """A ValueError unless every size is positive: the plans divide by them."""
    for name, n in sizes.items():
        if n <= 0:
            raise ValueError("%s must be positive, got %d" % (name, n))


def rows_plan(Py_ssize_t R, Py_ssize_t C, Py_ssize_t itemsize, Py_ssize_t n_arrays,
              Py_ssize_t L=1):
    """(channels_per_block, n_blocks, rows_per_chunk, n_chunks) of the rows layout."""
    _positive(R=R, C=C, itemsize=itemsize, n_arrays=n_arrays, L=L)
    cdef Plan p = _rows_plan(R, C, L, itemsize, n_arrays)
    return p.cb, p.n_blocks, p.chunk, p.n_chunks


def planar_plan(Py_ssize_t N, Py_ssize_t C, Py_ssize_t L, Py_ssize_t itemsize, Py_ssize_t n_arrays):
    """(channels_per_block, n_blocks, elements_per_chunk, n_chunks) of the planar layout."""
    _positive(N=N, C=C, L=L, itemsize=itemsize, n_arrays=n_arrays)
    cdef Plan p = _planar_plan(N, C, L, itemsize, n_arrays)
    return p.cb, p.n_blocks, p.chunk, p.n_chunks


# ---------------------------------------------------------------------------
# A call (Job), a pass (Work) and the one driver that runs any pass (_run)
# ---------------------------------------------------------------------------

cdef struct Span:
    Py_ssize_t c0, cw   # channels [c0, c0 + cw)
    Py_ssize_t i0, i1   # rows (rows layout) or elements of each channel (planar) [i0, i1)
    Py_ssize_t ci       # chunk index


cdef struct Coefs:
    # per-channel inputs of the backward, float64 (C,)
    const double *scale    # invstd; for a seed-style cache (z = xhat) denom = 1/invstd
    const void *gamma      # float64, or float32 (the data's dtype: forward's cache as it is)
    bint gamma_single
    const double *var      # read in 'std' eps mode only
    bint xhat_form         # z is xhat, not x
    bint std_mode          # xhat = (x - mean) / (sqrt(var) + eps)
    bint train             # batch statistics (else running: mean, var are constants)


cdef struct Stats:
    # the forward's per-channel parameters and statistics, float64 (C,)
    const double *gamma
    const double *beta
    double *mean           # written in train mode (then also the shift), read in test mode
    double *var
    double *invstd
    double eps
    bint std_mode


cdef struct Job:
    # the data: x (forward) or z (backward: x, or xhat for a seed-style cache), dy
    # (backward; NULL in the forward) and the output.  Strides in elements: *_n between
    # rows (rows layout) or samples (planar), *_c between channels (L in the rows layout).
    const char *x
    const char *dy
    char *out
    Py_ssize_t x_n, x_c, dy_n, dy_c, out_n, out_c
    # a fused epilogue (bn_epi): aux, the residual (forward) or the saved output whose
    # ReLU mask applies to dy (backward); out2, the masked dy (backward); relu (forward).
    # NULL / 0: none; epilogue: any of them, or a backward with running statistics (its
    # dx = A*dy is the epilogue's loop without the term in z; _backward_inputs)
    const char *aux
    char *out2
    Py_ssize_t aux_n, aux_c, out2_n, out2_c
    bint relu
    bint epilogue
    const bn_loops *loops   # the inner loops of the data's dtype
    Py_ssize_t isz          # bytes per element
    Py_ssize_t C            # channels
    Py_ssize_t L            # columns of a channel in a row (rows) or plane length (planar)
    Py_ssize_t extent       # what chunks split: rows (rows layout) or elements per channel
    Py_ssize_t step         # elements of a channel per unit of extent: L (rows) or 1
    Py_ssize_t count        # elements per channel of the batch: extent*step, or the global
                            # count of a batch split across processes
    bint planar             # the layout: planar, else rows
    Plan plan
    bint stream             # output written with streaming stores
    # the output is prefaulted as runs of run_len elements, n_runs_n x n_runs_c of them,
    # out_n and out_c apart (prefault: whether it needs it at all)
    bint prefault
    Py_ssize_t n_runs_n, n_runs_c, run_len
    Py_ssize_t scratch_doubles  # per-thread scratch of a task
    Py_ssize_t local_doubles    # per-thread Vecs of the sweep that runs (set by _run)
    Py_ssize_t share_bytes      # input bytes of one block's channels; -1: no L3 share
    const double *shift     # (C,) the shift m of out = A*(dy + Cc) + S*(z - m)
    Coefs cf                # backward inputs
    char *dgamma            # backward outputs (C,), gsz bytes each: the parameters' dtype
    char *dbeta
    Py_ssize_t gsz
    double *sum_dy          # the backward's sums (C,): written by a sums-only pass, read by
    double *sum_dy_zm       # a write-only one
    Stats st                # forward inputs and outputs


cdef struct Vecs:
    # the working vectors of the channels a sweep has in hand, from channel `base` on: the
    # output's coefficients of channel c at A[c - base], S[c - base], Cc[c - base] (written
    # by the pass's finish: out = A*(dy + Cc) + S*(z - m), or S*(z - m) + Cc without dy),
    # and its partial sums of chunk ci at part[ci*stride + c - base] and
    # part[(n_chunks + ci)*stride + c - base].  A thread's own for a task or a block; the
    # call's, of all C channels, for the chunked schedule only: scratch grows with the work
    # in flight, not with C.
    double *A
    double *S
    double *Cc
    double *part
    Py_ssize_t base
    Py_ssize_t stride


# reduce: the task's per-channel partial sums (two vectors of cw); scratch: per thread
ctypedef void (*reduce_fn)(const Job *j, Span sp, double *s1, double *s2,
                           double *scratch) noexcept nogil
# finish: channels [c0, c1) of v from the partials of n_chunks chunks, added in chunk order
# (n_chunks = 0 when the pass has no reduce)
ctypedef void (*finish_fn)(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                           Py_ssize_t c0, Py_ssize_t c1) noexcept nogil
# write: the task's output from the coefficients in v
ctypedef void (*write_fn)(const Job *j, const Vecs *v, Span sp, double *scratch) noexcept nogil


cdef struct Work:
    reduce_fn reduce   # NULL: write only (the coefficients need no pass over the data)
    finish_fn finish
    write_fn write     # NULL: sums only


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


cdef inline int _n_threads(int requested, Py_ssize_t n_tasks, Py_ssize_t n_elems) noexcept nogil:
    cdef int nt = bn_max_threads() if requested <= 0 else requested
    if n_elems < PARALLEL_MIN_ELEMS:
        return 1
    if nt > n_tasks:
        nt = <int>n_tasks
    return nt if nt > 0 else 1


cdef inline char *_run_at(const Job *j, Py_ssize_t k) noexcept nogil:
    """The output's run k of the prefault's runs."""
    return j.out + ((k // j.n_runs_c) * j.out_n + (k % j.n_runs_c) * j.out_c) * j.isz


# A fresh output (a new NumPy array of some MiB) is untouched memory: its pages are
# mapped and zeroed by the kernel at the first write to each.  Tasks write their output
# in blocks spread over the whole array, so the first task of every thread would fault
# in nearly all of it, serially and long before most of it is written, and its zeroed
# lines would be evicted before use.  Writing one byte to each page first, each thread
# over its own contiguous share of the runs, faults the pages in parallel and in order:
# once per page, whatever the length of the runs (a page can hold many short planes).
# Nothing is read from the output; the tasks overwrite it.  An output whose pages are all
# in memory already (the allocator handed out memory a freed array had written) is left
# alone: there the extra pass costs a cache miss per write (docs/performance.md).
cdef void _prefault(const Job *j, int nt) noexcept nogil:
    cdef Py_ssize_t n_runs = j.n_runs_n * j.n_runs_c
    cdef Py_ssize_t k, run_bytes = j.run_len * j.isz
    cdef char *run
    cdef char *p
    cdef size_t page, last
    cdef int tid
    if nt < 2 or n_runs * run_bytes < PREFAULT_BYTES:
        return
    run = _run_at(j, n_runs - 1)
    if bn_mapped(j.out, run + run_bytes):
        return
    for tid in prange(nt, schedule='static', num_threads=nt):
        last = 0  # no page: the output does not start in page 0
        for k in range(_share(n_runs, tid, nt), _share(n_runs, tid + 1, nt)):
            run = _run_at(j, k)
            p = run
            while p < run + run_bytes:
                page = <size_t>p // PAGE_BYTES
                if page != last:
                    p[0] = 0
                    last = page
                p = <char *>((page + 1) * PAGE_BYTES)


cdef enum Sweep:
    FUSED        # each task: reduce, finish its channels, write
    REDUCE       # each task: reduce into its chunk's partials
    WRITE        # each task: write, in task order
    WRITE_BACK   # each task: write, each thread walking its tasks backwards
    SHARE        # each block: reduce its chunks, finish it, write its chunks backwards


cdef enum:  # what _run returns when memory runs out
    BUF_FAILED = -1       # the per-channel coefficients and partial sums
    SCRATCH_FAILED = -2   # a thread's scratch


cdef inline Vecs _vecs(double *buf, Py_ssize_t n_chunks, Py_ssize_t width) noexcept nogil:
    """Vecs of `width` channels from base 0 in buf: the partial sums first, then A, S, Cc."""
    cdef Vecs v
    v.part = buf
    v.A = buf + 2 * n_chunks * width
    v.S = v.A + width
    v.Cc = v.S + width
    v.base = 0
    v.stride = width
    return v


cdef inline Py_ssize_t _vecs_doubles(Py_ssize_t n_chunks, Py_ssize_t width) noexcept nogil:
    return (3 + 2 * n_chunks) * width


cdef inline void _reduce_task(const Job *j, const Work *w, const Vecs *v, Py_ssize_t n_chunks,
                              Span sp, double *scratch) noexcept nogil:
    """w.reduce of task sp into its chunk's partial sums in v (the first n_chunks rows of
    v.part, then the next n_chunks; channel c at c - v.base)."""
    cdef double *s1 = v.part + sp.ci * v.stride + (sp.c0 - v.base)
    w.reduce(j, sp, s1, s1 + n_chunks * v.stride, scratch)


cdef void _thread_sweep(const Job *j, const Work *w, Sweep sweep, int tid, int nt,
                        const Vecs *shared, double *local, double *scratch) noexcept nogil:
    """Thread tid's share of one sweep over the tasks (or, SHARE, over the blocks); local:
    the thread's Vecs storage (FUSED, WRITE, SHARE), shared: the call's (REDUCE,
    WRITE_BACK)."""
    cdef const Plan *p = &j.plan
    cdef Py_ssize_t C = j.C, nc = p.n_chunks, cb = p.cb
    cdef Py_ssize_t t, t0, t1, bi
    cdef Span sp
    cdef Vecs v
    if sweep == SHARE:
        v = _vecs(local, nc, cb)
        for bi in range(_share(p.n_blocks, tid, nt), _share(p.n_blocks, tid + 1, nt)):
            v.base = bi * cb
            for t in range(bi * nc, bi * nc + nc):
                _reduce_task(j, w, &v, nc, _task(p, t, C, j.extent), scratch)
            w.finish(j, &v, nc, v.base, min(C, v.base + cb))
            t = bi * nc + nc - 1
            while t >= bi * nc:
                w.write(j, &v, _task(p, t, C, j.extent), scratch)
                t = t - 1
        return
    t0 = _share(p.n_tasks, tid, nt)
    t1 = _share(p.n_tasks, tid + 1, nt)
    if sweep == WRITE_BACK:
        t = t1 - 1
        while t >= t0:
            w.write(j, shared, _task(p, t, C, j.extent), scratch)
            t = t - 1
        return
    if sweep == REDUCE:
        for t in range(t0, t1):
            _reduce_task(j, w, shared, nc, _task(p, t, C, j.extent), scratch)
        return
    # FUSED (the task's data is still in cache for the output) or WRITE: the task's
    # channels only, in the thread's own Vecs
    v = _vecs(local, 1, cb)
    for t in range(t0, t1):
        sp = _task(p, t, C, j.extent)
        v.base = sp.c0
        if sweep == FUSED:
            _reduce_task(j, w, &v, 1, sp, scratch)
        w.finish(j, &v, 1 if sweep == FUSED else 0, sp.c0, sp.c0 + sp.cw)
        if w.write != NULL:
            w.write(j, &v, sp, scratch)


cdef int _parallel(const Job *j, const Work *w, Sweep sweep, int nt,
                   const Vecs *shared) noexcept nogil:
    """One sweep on nt threads, each with its own scratch and Vecs storage; SCRATCH_FAILED if
    an allocation failed (that thread's tasks are then not done).  One thread runs it
    without entering an OpenMP region: no team to start, and it works in a forked child,
    where the parent's OpenMP threads do not exist."""
    cdef int tid, failed = 0
    cdef double *buf
    cdef Py_ssize_t n = j.scratch_doubles + j.local_doubles
    if nt == 1:
        buf = NULL
        if n > 0:
            buf = <double *>malloc(n * sizeof(double))
            if buf == NULL:
                return SCRATCH_FAILED
        _thread_sweep(j, w, sweep, 0, 1, shared, buf + j.scratch_doubles, buf)
        free(buf)
        return 0
    for tid in prange(nt, schedule='static', num_threads=nt):
        buf = NULL
        if n > 0:
            buf = <double *>malloc(n * sizeof(double))
        if n > 0 and buf == NULL:
            failed += 1
        else:
            _thread_sweep(j, w, sweep, tid, nt, shared, buf + j.scratch_doubles, buf)
            free(buf)
    return SCRATCH_FAILED if failed else 0


cdef int _run(Job *j, const Work *w, int n_threads) noexcept nogil:
    """Run pass w over the tasks of j's plan; 0, or BUF_FAILED / SCRATCH_FAILED if memory
    ran out."""
    cdef Plan *p = &j.plan
    cdef Py_ssize_t C = j.C
    cdef int nt, rc
    cdef double *buf = NULL
    cdef Vecs shared
    nt = _n_threads(n_threads, p.n_tasks, j.extent * j.step * C)
    if j.prefault and w.write != NULL:
        _prefault(j, nt)
    j.local_doubles = _vecs_doubles(1, p.cb)
    if w.reduce == NULL:
        # write only: the plan's tasks, chunks included (a rows plan may have one block),
        # each finishing its own channels' coefficients first
        rc = _parallel(j, w, WRITE, nt, NULL)
    elif p.n_chunks == 1:
        rc = _parallel(j, w, FUSED, nt, NULL)
    elif (w.write != NULL and j.share_bytes >= 0 and p.n_blocks >= 4 * nt
          and j.share_bytes <= _sizes.l3_share_bytes):
        # both sweeps of a block back to back: for passes that write
        j.local_doubles = _vecs_doubles(p.n_chunks, p.cb)
        rc = _parallel(j, w, SHARE, nt, NULL)
    else:
        # chunked: every channel's partials and coefficients, between the two sweeps
        j.local_doubles = 0
        buf = <double *>malloc(_vecs_doubles(p.n_chunks, C) * sizeof(double))
        if buf == NULL:
            return BUF_FAILED
        shared = _vecs(buf, p.n_chunks, C)
        rc = _parallel(j, w, REDUCE, nt, &shared)
        if rc == 0:
            w.finish(j, &shared, p.n_chunks, 0, C)
            if w.write != NULL:
                rc = _parallel(j, w, WRITE_BACK, nt, &shared)
        free(buf)
    return rc


# ---------------------------------------------------------------------------
# Per-channel math: the finish functions
# ---------------------------------------------------------------------------

cdef inline void _bwd_coefs(const Job *j, const Vecs *v, Py_ssize_t c, double sum_dy,
                            double sum_dy_zm) noexcept nogil:
    """dx = A*(dy + Cc) + S*(z - mean) for channel c (dgamma and dbeta: _bwd_grads).

    With r = invstd and xhat = (z - mean)*Q:  dgamma = Q*sum_dy_zm,  A = gamma*r,
    Cc = -sum_dy/M,  S = B*Q with B = -A*kq*sum_dy_zm/M, where kq*xhat is the variance
    term: kq = r ('var'), 1/sqrt(var) ('std'; 0 at var = 0, the subgradient of sqrt),
    1 when z is xhat (then Q = 1).
    """
    cdef const Coefs *cf = &j.cf
    cdef Py_ssize_t k = c - v.base
    cdef double inv_m = 1.0 / j.count
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
            if isinf(cf.var[c]) and cf.var[c] > 0.0:
                # a variance beyond float64 (data beyond ~1e154): 1/sqrt(var) is invstd,
                # eps being far below an ulp of sqrt(var)
                s = r
        else:
            s = r
    if cf.gamma_single:
        v.A[k] = (<const float *>cf.gamma)[c] * r
    else:
        v.A[k] = (<const double *>cf.gamma)[c] * r
    if cf.train:
        b = -v.A[k] * s * sum_dy_zm * inv_m
        v.Cc[k] = -sum_dy * inv_m   # dy - mean(dy) first: exact 0 when M = 1
    else:
        b = 0.0
        v.Cc[k] = 0.0
    v.S[k] = b * q   # finite in float64 whatever the scale


cdef inline void _bwd_grads(const Job *j, Py_ssize_t c, double sum_dy,
                            double sum_dy_zm) noexcept nogil:
    """dbeta = sum_dy, dgamma = Q*sum_dy_zm of channel c (Q as in _bwd_coefs), each
    rounded once into the parameters' dtype.  Once per channel: not per task."""
    bn_store(j.dbeta, c, j.gsz, sum_dy)
    bn_store(j.dgamma, c, j.gsz, (1.0 if j.cf.xhat_form else j.cf.scale[c]) * sum_dy_zm)


cdef void _merge_sums(const Vecs *v, Py_ssize_t n_chunks, Py_ssize_t c0, Py_ssize_t c1,
                      double *s1, double *s2) noexcept nogil:
    """s1[c - c0], s2[c - c0] of channels c0..c1-1: their chunks' partial sums added in
    chunk order; one chunk's sums are taken as they are (adding them to 0.0 would turn a
    -0.0 dbeta into +0.0).  Read chunk by chunk, across the channels: a channel's partials
    lie a stride apart, and read down that stride they share one cache set when it is a
    power of two."""
    cdef const double *part = v.part + (c0 - v.base)   # channel c0's first partial
    cdef Py_ssize_t k, ci, n = c1 - c0, stride = v.stride
    if n_chunks == 1:
        for k in range(n):
            s1[k] = part[k]
            s2[k] = part[stride + k]
        return
    for k in range(n):
        s1[k] = 0.0
        s2[k] = 0.0
    for ci in range(n_chunks):
        for k in range(n):
            s1[k] = s1[k] + part[ci * stride + k]
            s2[k] = s2[k] + part[(n_chunks + ci) * stride + k]


cdef void _bwd_finish(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                      Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Backward: _bwd_coefs and _bwd_grads of channels c0..c1-1 from their merged sums
    (held in A and S until _bwd_coefs overwrites them)."""
    cdef Py_ssize_t c, k0 = c0 - v.base
    cdef double s1, s2
    _merge_sums(v, n_chunks, c0, c1, v.A + k0, v.S + k0)
    for c in range(c0, c1):
        s1 = v.A[c - v.base]
        s2 = v.S[c - v.base]
        _bwd_coefs(j, v, c, s1, s2)
        _bwd_grads(j, c, s1, s2)


cdef void _sums_finish(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                       Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Sums only: the merged (sum_dy, sum_dy_zm) are the output."""
    _merge_sums(v, n_chunks, c0, c1, j.sum_dy + c0, j.sum_dy_zm + c0)


cdef void _bwd_given(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                     Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Write only: _bwd_coefs from given sums (of a batch of j.count elements per channel);
    per task, so a channel's may be formed more than once (backward_apply stores its
    dgamma and dbeta once)."""
    cdef Py_ssize_t c
    for c in range(c0, c1):
        _bwd_coefs(j, v, c, j.sum_dy[c], j.sum_dy_zm[c])


cdef inline void _chan_merge(double *n_a, double *mean_a, double *m2_a,
                             double n_b, double mean_b, double m2_b) noexcept nogil:
    """Merge (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a) (Chan, Golub, LeVeque)."""
    cdef double n = n_a[0] + n_b
    cdef double delta = mean_b - mean_a[0]
    mean_a[0] = mean_a[0] + delta * (n_b / n)
    m2_a[0] = m2_a[0] + m2_b + delta * delta * (n_a[0] * n_b / n)
    n_a[0] = n


cdef void _merge_moments(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                         Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Channels c0..c1-1's mean and M2 (in st.mean, st.var) from their chunks' (mean, M2),
    merged in chunk order, chunk by chunk across the channels (as _merge_sums)."""
    cdef const Stats *st = &j.st
    cdef const double *part = v.part + (c0 - v.base)   # channel c0's first partial
    cdef Py_ssize_t stride = v.stride, M = j.extent * j.step
    cdef Py_ssize_t chunk = j.plan.chunk * j.step   # elements of a channel per chunk
    cdef double n_a = min(chunk, M)
    cdef double n_b, n_c
    cdef Py_ssize_t k, ci
    for k in range(c1 - c0):
        st.mean[c0 + k] = part[k]
        st.var[c0 + k] = part[n_chunks * stride + k]
    for ci in range(1, n_chunks):
        n_b = min(chunk, M - ci * chunk)
        for k in range(c1 - c0):
            n_c = n_a
            _chan_merge(&n_c, &st.mean[c0 + k], &st.var[c0 + k], n_b, part[ci * stride + k],
                        part[(n_chunks + ci) * stride + k])
        n_a = n_a + n_b


cdef void _stats_finish(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                        Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Statistics only: the merged mean and M2 are the output."""
    _merge_moments(j, v, n_chunks, c0, c1)


cdef void _fwd_finish(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                      Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Forward: channels c0..c1-1's mean, var and invstd from their merged moments, and the
    output's S = gamma*invstd, Cc = beta."""
    cdef const Stats *st = &j.st
    cdef Py_ssize_t M = j.extent * j.step
    cdef Py_ssize_t c
    cdef double var
    _merge_moments(j, v, n_chunks, c0, c1)
    for c in range(c0, c1):
        var = st.var[c] / M
        if var < 0.0:
            var = 0.0
        st.var[c] = var
        if st.std_mode:
            st.invstd[c] = 1.0 / (sqrt(var) + st.eps)
        else:
            st.invstd[c] = 1.0 / sqrt(var + st.eps)
        v.S[c - v.base] = st.gamma[c] * st.invstd[c]
        v.Cc[c - v.base] = st.beta[c]


cdef void _fwd_scale(const Job *j, const Vecs *v, Py_ssize_t n_chunks,
                     Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Write only: S = gamma*invstd, Cc = beta from given statistics (test mode, or the
    statistics of a batch split across processes)."""
    cdef Py_ssize_t c
    for c in range(c0, c1):
        v.S[c - v.base] = j.st.gamma[c] * j.st.invstd[c]
        v.Cc[c - v.base] = j.st.beta[c]


# ---------------------------------------------------------------------------
# Rows layout: (R, C*L), channel c owning columns [c*L, (c+1)*L) of each row.
# A task: channels [c0, c0+cw) x rows [r0, r1).  The C loops work per column; for L > 1
# the helpers spread per-channel vectors over the columns and fold per-column sums back
# into channels (in column order), in a scratch of SCRATCH*cb*L doubles per thread.
# ---------------------------------------------------------------------------

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


cdef inline bn_epi _epilogue(const Job *j, const char *aux, char *out2) noexcept nogil:
    """The call's epilogue for a task whose aux and out2 start at these pointers."""
    cdef bn_epi e
    e.aux = aux
    e.out2 = out2
    e.aux_n = j.aux_n
    e.aux_c = j.aux_c
    e.out2_n = j.out2_n
    e.out2_c = j.out2_c
    e.relu = j.relu
    e.zterm = j.cf.train
    return e


cdef inline const char *_rows_at(const char *base, Py_ssize_t s_n, const Job *j,
                                 Span sp) noexcept nogil:
    """The task's first element of an array of row stride s_n."""
    return base + (sp.i0 * s_n + sp.c0 * j.L) * j.isz


cdef void _rows_reduce_dy(const Job *j, Span sp, double *sum_dy, double *sum_dy_zm,
                          double *scratch) noexcept nogil:
    """sum_dy[c], sum_dy_zm[c] of the task's channels"""
    cdef Py_ssize_t L = j.L, cols = sp.cw * j.L, nrows = sp.i1 - sp.i0
    cdef const char *z = _rows_at(j.x, j.x_n, j, sp)
    cdef const char *dy = _rows_at(j.dy, j.dy_n, j, sp)
    cdef const char *y = _rows_at(j.aux, j.aux_n, j, sp) if j.aux != NULL else NULL
    if L == 1:
        j.loops.rows_sums(z, dy, y, j.x_n, j.dy_n, j.aux_n, nrows, sp.cw, j.shift + sp.c0,
                          sum_dy, sum_dy_zm)
        return
    _spread(j.shift + sp.c0, sp.cw, L, scratch)
    j.loops.rows_sums(z, dy, y, j.x_n, j.dy_n, j.aux_n, nrows, cols, scratch, scratch + cols,
                      scratch + 2 * cols)
    _fold(scratch + cols, sp.cw, L, sum_dy)
    _fold(scratch + 2 * cols, sp.cw, L, sum_dy_zm)


cdef void _rows_reduce_moments(const Job *j, Span sp, double *mean, double *m2,
                               double *scratch) noexcept nogil:
    """Mean and M2 of the task's channels over its nrows*L elements each, in one pass.

    Sums run over x - K with K the channel's first element (shifted data): no cancellation
    unless the data sits many standard deviations from K, the mean of a constant channel
    is exact and its M2 exactly 0; M2 is clamped at 0.
    """
    cdef Py_ssize_t L = j.L, cw = sp.cw, cols = sp.cw * j.L, c
    cdef const char *x = _rows_at(j.x, j.x_n, j, sp)
    cdef double n = (sp.i1 - sp.i0) * L
    cdef double d1
    for c in range(cw):
        mean[c] = bn_load(x, c * L, j.isz)
    if L == 1:
        # a channel is a column: its sums straight into place (a fold of one would add
        # them to 0.0, which changes nothing: sums that start at 0.0 are never -0.0)
        j.loops.rows_centered(x, j.x_n, sp.i1 - sp.i0, cw, mean, scratch, m2)
    else:
        _spread(mean, cw, L, scratch)
        j.loops.rows_centered(x, j.x_n, sp.i1 - sp.i0, cols, scratch, scratch + cols,
                              scratch + 2 * cols)
        _fold(scratch + 2 * cols, cw, L, m2)
        _fold(scratch + cols, cw, L, scratch)
    for c in range(cw):
        d1 = scratch[c]
        mean[c] = mean[c] + d1 / n
        m2[c] = m2[c] - d1 * d1 / n
        if m2[c] < 0.0:
            m2[c] = 0.0


cdef void _rows_write(const Job *j, const Vecs *v, Span sp, double *scratch) noexcept nogil:
    """out := A*(dy + Cc) + S*(z - m) per channel over the task; S*(z - m) + Cc without dy
    (then A is not read)"""
    cdef Py_ssize_t L = j.L, cols = sp.cw * j.L, c0 = sp.c0, k0 = sp.c0 - v.base
    cdef const char *z = _rows_at(j.x, j.x_n, j, sp)
    cdef const char *dy = NULL
    cdef char *out = <char *>_rows_at(j.out, j.out_n, j, sp)
    cdef bn_epi e
    cdef const bn_epi *ep = NULL
    if j.dy != NULL:
        dy = _rows_at(j.dy, j.dy_n, j, sp)
    if j.epilogue:
        e = _epilogue(j, _rows_at(j.aux, j.aux_n, j, sp) if j.aux != NULL else NULL,
                      <char *>_rows_at(j.out2, j.out2_n, j, sp) if j.out2 != NULL else NULL)
        ep = &e
    if L == 1:
        j.loops.rows_affine(z, dy, out, j.x_n, j.dy_n, j.out_n, sp.i1 - sp.i0, sp.cw,
                            j.shift + c0, v.S + k0, v.A + k0, v.Cc + k0, j.stream, ep)
        return
    _spread(j.shift + c0, sp.cw, L, scratch)
    _spread(v.S + k0, sp.cw, L, scratch + cols)
    _spread(v.Cc + k0, sp.cw, L, scratch + 2 * cols)
    if dy != NULL:
        _spread(v.A + k0, sp.cw, L, scratch + 3 * cols)
    j.loops.rows_affine(z, dy, out, j.x_n, j.dy_n, j.out_n, sp.i1 - sp.i0, cols, scratch,
                        scratch + cols, scratch + 3 * cols, scratch + 2 * cols, j.stream, ep)


# ---------------------------------------------------------------------------
# Planar layout: (N, C, L), each (n, c) plane of L contiguous.  A channel's elements
# are numbered e = n*L + l.  A task: channels [c0, c0+cw) x elements [e0, e1); for each
# n it walks the planes of its channels, which are adjacent in memory for NCHW, so small
# planes still make long runs.  Each run is reduced in BN_LANES float64 accumulators.
# ---------------------------------------------------------------------------

cdef void _plane_reduce_dy(const Job *j, Span sp, double *sum_dy, double *sum_dy_zm,
                           double *scratch) noexcept nogil:
    cdef const char *y = j.aux + sp.c0 * j.aux_c * j.isz if j.aux != NULL else NULL
    j.loops.plane_sums(j.x + sp.c0 * j.x_c * j.isz, j.dy + sp.c0 * j.dy_c * j.isz, y,
                       j.x_n, j.x_c, j.dy_n, j.dy_c, j.aux_n, j.aux_c, j.L, sp.i0, sp.i1,
                       sp.cw, j.shift + sp.c0, sum_dy, sum_dy_zm)


cdef void _plane_reduce_moments(const Job *j, Span sp, double *mean, double *m2,
                                double *scratch) noexcept nogil:
    j.loops.plane_moments(j.x + sp.c0 * j.x_c * j.isz, j.x_n, j.x_c, j.L, sp.i0, sp.i1, sp.cw,
                          mean, m2, scratch)


cdef void _plane_write(const Job *j, const Vecs *v, Span sp, double *scratch) noexcept nogil:
    cdef Py_ssize_t c0 = sp.c0, k0 = sp.c0 - v.base
    cdef const char *dy = NULL
    cdef bn_epi e
    cdef const bn_epi *ep = NULL
    if j.dy != NULL:
        dy = j.dy + c0 * j.dy_c * j.isz
    if j.epilogue:
        e = _epilogue(j, j.aux + c0 * j.aux_c * j.isz if j.aux != NULL else NULL,
                      j.out2 + c0 * j.out2_c * j.isz if j.out2 != NULL else NULL)
        ep = &e
    j.loops.plane_affine(j.x + c0 * j.x_c * j.isz, dy, j.out + c0 * j.out_c * j.isz,
                         j.x_n, j.x_c, j.dy_n, j.dy_c, j.out_n, j.out_c, j.L, sp.i0, sp.i1,
                         sp.cw, j.shift + c0, v.S + k0, v.A + k0, v.Cc + k0, j.stream, ep)


# ---------------------------------------------------------------------------
# The passes
# ---------------------------------------------------------------------------

cdef void _reduce_dy(const Job *j, Span sp, double *s1, double *s2,
                     double *scratch) noexcept nogil:
    if j.planar:
        _plane_reduce_dy(j, sp, s1, s2, scratch)
    else:
        _rows_reduce_dy(j, sp, s1, s2, scratch)


cdef void _reduce_moments(const Job *j, Span sp, double *s1, double *s2,
                          double *scratch) noexcept nogil:
    if j.planar:
        _plane_reduce_moments(j, sp, s1, s2, scratch)
    else:
        _rows_reduce_moments(j, sp, s1, s2, scratch)


cdef void _write(const Job *j, const Vecs *v, Span sp, double *scratch) noexcept nogil:
    if j.planar:
        _plane_write(j, v, sp, scratch)
    else:
        _rows_write(j, v, sp, scratch)


cdef Work _work(reduce_fn reduce, finish_fn finish, write_fn write):
    cdef Work w
    w.reduce = reduce
    w.finish = finish
    w.write = write
    return w


cdef Work BACKWARD = _work(_reduce_dy, _bwd_finish, _write)
cdef Work BACKWARD_REDUCE = _work(_reduce_dy, _sums_finish, NULL)
cdef Work BACKWARD_APPLY = _work(NULL, _bwd_given, _write)
cdef Work FORWARD = _work(_reduce_moments, _fwd_finish, _write)
cdef Work FORWARD_GIVEN = _work(NULL, _fwd_scale, _write)
cdef Work BATCH_STATS = _work(_reduce_moments, _stats_finish, NULL)


# ---------------------------------------------------------------------------
# Layouts: a Job's geometry and plan (layout logic lives here only)
# ---------------------------------------------------------------------------

cdef inline bint _streams(Py_ssize_t n_elems, Py_ssize_t isz) noexcept nogil:
    """Whether an output of n_elems writes with streaming stores: float64 from
    STREAM_OUTPUT_BYTES (float32 sweeps are bound by their conversions)."""
    return isz == 8 and n_elems * isz >= _sizes.stream_output_bytes


cdef const bn_loops *_loops(int typ):
    if typ == cnp.NPY_FLOAT16:
        return &bn_loops_h
    return &bn_loops_f if typ == cnp.NPY_FLOAT32 else &bn_loops_d


cdef Job _job(tuple lay, cnp.ndarray x, cnp.ndarray dy, cnp.ndarray out, Py_ssize_t n_arrays,
              cnp.ndarray aux=None, cnp.ndarray out2=None, bint relu=False):
    """A call's Job from its layout (bnkernels._layout.choose over [x, dy, aux, out, out2]:
    inputs, then outputs, the absent ones left out) and its arrays; n_arrays: the inputs a
    task streams, for the plan (the backward's aux is added to them).  aux, out2, relu: the
    fused epilogue (see Job)."""
    cdef Job j
    cdef str kind = lay[0]
    cdef Py_ssize_t n = lay[1], C = lay[2], L = lay[3]
    cdef list strides = list(lay[4])
    if n * L <= 0 or C <= 0:
        raise ValueError("empty input: every channel needs at least one element")
    j.isz = cnp.PyArray_ITEMSIZE(x)
    j.loops = _loops(cnp.PyArray_TYPE(x))
    j.x = <const char *>cnp.PyArray_DATA(x)
    j.dy = <const char *>cnp.PyArray_DATA(dy) if dy is not None else NULL
    j.out = <char *>cnp.PyArray_DATA(out) if out is not None else NULL
    j.aux = <const char *>cnp.PyArray_DATA(aux) if aux is not None else NULL
    j.out2 = <char *>cnp.PyArray_DATA(out2) if out2 is not None else NULL
    j.relu = relu
    j.epilogue = aux is not None or out2 is not None or relu
    j.cf.train = True   # (set by the backward's inputs)
    if aux is not None and dy is not None:
        # the backward's mask is read in both sweeps; the forward plans for x alone, so that
        # its statistics (the reduce) have the bits of batch_stats and of a forward without
        # a residual
        n_arrays += 1
    j.C = C
    j.L = L
    j.planar = kind == "planar"
    x_s = strides.pop(0)
    dy_s = strides.pop(0) if dy is not None else (0, 0)
    aux_s = strides.pop(0) if aux is not None else (0, 0)
    out_s = strides.pop(0) if out is not None else (0, 0)
    out2_s = strides.pop(0) if out2 is not None else (0, 0)
    if j.planar:
        j.x_n, j.x_c = x_s
        j.dy_n, j.dy_c = dy_s
        j.out_n, j.out_c = out_s
        j.aux_n, j.aux_c = aux_s
        j.out2_n, j.out2_c = out2_s
        _planar_layout(&j, n, n_arrays)
    else:
        j.x_n = x_s
        j.dy_n = dy_s if dy is not None else 0
        j.out_n = out_s if out is not None else 0
        j.aux_n = aux_s if aux is not None else 0
        j.aux_c = 0
        j.out2_n = out2_s if out2 is not None else 0
        j.out2_c = 0
        _rows_layout(&j, n, n_arrays)
    j.count = j.extent * j.step
    return j


cdef void _rows_layout(Job *j, Py_ssize_t R, Py_ssize_t n_arrays) noexcept nogil:
    """Rows (R, C*L): the row strides (x_n, dy_n, out_n, aux_n, out2_n) already set."""
    j.x_c = j.L
    j.dy_c = j.L
    j.out_c = j.L
    j.extent = R
    j.step = j.L
    j.plan = _rows_plan(R, j.C, j.L, j.isz, n_arrays)
    # NCHW planes taken as rows (L > 1) keep ordinary stores: their short runs measured
    # slower streamed with two threads (docs/performance.md)
    j.stream = j.L == 1 and _streams(R * j.C, j.isz)
    j.prefault = j.plan.n_blocks > 1
    j.n_runs_n = R
    j.n_runs_c = 1
    j.run_len = j.C * j.L
    j.scratch_doubles = SCRATCH * j.plan.cb * j.L
    j.share_bytes = -1


cdef void _planar_layout(Job *j, Py_ssize_t N, Py_ssize_t n_arrays) noexcept nogil:
    """Planar (N, C, L): strides x_n, x_c, ... already set."""
    j.extent = N * j.L
    j.step = 1
    j.plan = _planar_plan(N, j.C, j.L, j.isz, n_arrays)
    j.stream = _streams(N * j.L * j.C, j.isz)
    j.prefault = N > 1
    j.n_runs_n = N
    j.n_runs_c = j.C
    j.run_len = j.L
    j.scratch_doubles = j.plan.cb   # the moments' running sums
    j.share_bytes = N * j.L * j.isz * n_arrays * j.plan.cb


# ---------------------------------------------------------------------------
# Python entry points.  The face (bnkernels._api) has validated everything:
# the data's dtypes float16/float32/float64 and equal, shapes, strides in elements,
# per-channel vectors float64 (gamma also float32) and contiguous, outputs allocated
# (dgamma and dbeta of one of the three dtypes, that of the parameters).
# ---------------------------------------------------------------------------

cdef void _backward_inputs(Job *j, cnp.ndarray mean, cnp.ndarray scale, cnp.ndarray gamma,
                           cnp.ndarray var, bint xhat_form, bint std_mode, bint train,
                           cnp.ndarray dgamma, cnp.ndarray dbeta):
    j.shift = <const double *>cnp.PyArray_DATA(mean)
    j.cf.scale = <const double *>cnp.PyArray_DATA(scale)
    j.cf.gamma = cnp.PyArray_DATA(gamma)
    j.cf.gamma_single = cnp.PyArray_TYPE(gamma) == cnp.NPY_FLOAT32
    j.cf.var = <const double *>cnp.PyArray_DATA(var)
    j.cf.xhat_form = xhat_form
    j.cf.std_mode = std_mode
    j.cf.train = train
    # with running statistics dx = A*dy: the epilogue's loop without the term in z
    j.epilogue = j.epilogue or not train
    j.dgamma = <char *>cnp.PyArray_DATA(dgamma)
    j.dbeta = <char *>cnp.PyArray_DATA(dbeta)
    j.gsz = cnp.PyArray_ITEMSIZE(dgamma)


cdef void _forward_inputs(Job *j, double eps, bint std_mode, cnp.ndarray gamma,
                          cnp.ndarray beta, cnp.ndarray mean, cnp.ndarray var,
                          cnp.ndarray invstd):
    j.st.eps = eps
    j.st.std_mode = std_mode
    j.st.gamma = <const double *>cnp.PyArray_DATA(gamma)
    j.st.beta = <const double *>cnp.PyArray_DATA(beta)
    j.st.mean = <double *>cnp.PyArray_DATA(mean)
    j.st.var = <double *>cnp.PyArray_DATA(var)
    j.st.invstd = <double *>cnp.PyArray_DATA(invstd)
    j.shift = j.st.mean


cdef int _run_or_raise(Job *j, const Work *w, int n_threads) except -1:
    cdef int rc
    with nogil:
        rc = _run(j, w, n_threads)
    if rc == BUF_FAILED:
        raise MemoryError(
            "bnkernels: could not allocate %d bytes for the per-channel coefficients and "
            "partial sums of %d channels in %d chunks"
            % (_vecs_doubles(j.plan.n_chunks, j.C) * sizeof(double), j.C, j.plan.n_chunks))
    if rc == SCRATCH_FAILED:
        raise MemoryError("bnkernels: could not allocate %d bytes of scratch for a thread"
                          % ((j.scratch_doubles + j.local_doubles) * sizeof(double)))
    return 0


cdef double *_f64(cnp.ndarray v):
    return <double *>cnp.PyArray_DATA(v)


def backward(tuple lay, cnp.ndarray z, cnp.ndarray dy, cnp.ndarray dx,    # IN, IN, OUT
             cnp.ndarray mean, cnp.ndarray scale, cnp.ndarray gamma, cnp.ndarray var,
             bint xhat_form, bint std_mode, bint train,                   # IN (C,) float64*
             cnp.ndarray dgamma, cnp.ndarray dbeta, int n_threads,        # OUT (C,)
             cnp.ndarray y=None, cnp.ndarray dres=None):                  # IN, OUT
    """dx, dgamma, dbeta; see _bwd_coefs for the per-channel inputs (*gamma may also be
    float32).  y: the saved output of a fused ReLU, whose mask applies to dy first; dres:
    written with the masked dy (a residual's gradient).  lay: bnkernels._layout.choose([z,
    dy, y, dx, dres], axis), the absent ones left out."""
    cdef Job j = _job(lay, z, dy, dx, 2, y, dres)
    _backward_inputs(&j, mean, scale, gamma, var, xhat_form, std_mode, train, dgamma, dbeta)
    _run_or_raise(&j, &BACKWARD, n_threads)


def backward_reduce(tuple lay, cnp.ndarray z, cnp.ndarray dy, cnp.ndarray mean,  # IN
                    cnp.ndarray sum_dy, cnp.ndarray sum_dy_zm, int n_threads,   # OUT (C,) float64
                    cnp.ndarray y=None):                                       # IN
    """sum_dy := sum(dy), sum_dy_zm := sum(dy*(z - mean)) per channel, in the order backward
    adds them (dy masked by y, as backward does).  lay: choose([z, dy, y], axis)."""
    cdef Job j = _job(lay, z, dy, None, 2, y)
    j.shift = _f64(mean)
    j.sum_dy = _f64(sum_dy)
    j.sum_dy_zm = _f64(sum_dy_zm)
    _run_or_raise(&j, &BACKWARD_REDUCE, n_threads)


def backward_apply(tuple lay, cnp.ndarray z, cnp.ndarray dy, cnp.ndarray dx,  # IN, IN, OUT
                   cnp.ndarray mean, cnp.ndarray scale, cnp.ndarray gamma, cnp.ndarray var,
                   bint xhat_form, bint std_mode, bint train,
                   cnp.ndarray sum_dy, cnp.ndarray sum_dy_zm, Py_ssize_t count,  # IN
                   cnp.ndarray dgamma, cnp.ndarray dbeta, int n_threads,        # OUT (C,)
                   cnp.ndarray y=None, cnp.ndarray dres=None):                  # IN, OUT
    """backward's output from given sums over a batch of count elements per channel (this
    call's data being part of it); y, dres as for backward.  lay: choose([z, dy, y, dx,
    dres], axis)."""
    if count <= 0:
        raise ValueError("count must be positive")
    cdef Job j = _job(lay, z, dy, dx, 2, y, dres)
    _backward_inputs(&j, mean, scale, gamma, var, xhat_form, std_mode, train, dgamma, dbeta)
    j.sum_dy = _f64(sum_dy)
    j.sum_dy_zm = _f64(sum_dy_zm)
    j.count = count
    cdef Py_ssize_t c
    for c in range(j.C):
        _bwd_grads(&j, c, j.sum_dy[c], j.sum_dy_zm[c])
    _run_or_raise(&j, &BACKWARD_APPLY, n_threads)


def forward(tuple lay, cnp.ndarray x, cnp.ndarray out, bint train, double eps, bint std_mode,
            cnp.ndarray gamma, cnp.ndarray beta,                    # IN (C,) float64
            cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd,  # OUT (train) / IN (else)
            int n_threads, cnp.ndarray residual=None, bint relu=False):
    """train: mean, var, invstd := the batch statistics; then out := gamma*invstd*(x - mean)
    + beta (not train: with the given statistics), plus residual, then max(out, 0) with
    relu: one rounding.  lay: choose([x, residual, out], axis).  Returns whether a variance
    is not finite (float64 data beyond ~1e154 overflows it: the face then computes those
    channels' statistics again), so that the caller need not look at var itself."""
    cdef Job j = _job(lay, x, None, out, 1, residual, None, relu)
    _forward_inputs(&j, eps, std_mode, gamma, beta, mean, var, invstd)
    _run_or_raise(&j, &FORWARD if train else &FORWARD_GIVEN, n_threads)
    cdef Py_ssize_t c
    for c in range(j.C):
        if not isfinite(j.st.var[c]):
            return True
    return False


def batch_stats(tuple lay, cnp.ndarray x, cnp.ndarray mean, cnp.ndarray m2,  # IN, OUT (C,) float64
                int n_threads):
    """Per-channel mean and M2 (sum of squared deviations) in one pass, as forward computes
    them.  lay: choose([x], axis)."""
    cdef Job j = _job(lay, x, None, None, 1)
    j.st.mean = _f64(mean)
    j.st.var = _f64(m2)
    _run_or_raise(&j, &BATCH_STATS, n_threads)


# ---------------------------------------------------------------------------
# The benchmark's roofline kernel, and the running statistics update
# ---------------------------------------------------------------------------

def stream_add(cnp.ndarray a, cnp.ndarray b, cnp.ndarray out, int n_threads=0):
    """out := a + b over contiguous arrays of one dtype: the benchmark's roofline pass (the
    memory traffic of an ideal fused backward: read two arrays, write one).  float16 adds
    the bit patterns as integers: the same traffic, no conversions."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    cdef int nt = bn_max_threads() if n_threads <= 0 else n_threads
    cdef int tid
    cdef Py_ssize_t lo, hi
    if not (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_IS_C_CONTIGUOUS(b)
            and cnp.PyArray_IS_C_CONTIGUOUS(out)):
        raise ValueError("stream_add needs C-contiguous arrays")
    if cnp.PyArray_SIZE(b) != n or cnp.PyArray_SIZE(out) != n:
        raise ValueError("stream_add needs arrays of one size")
    if not (a.dtype == b.dtype == out.dtype):
        raise TypeError("stream_add needs arrays of one dtype")
    cdef char *ap = <char *>cnp.PyArray_DATA(a)
    cdef char *bp = <char *>cnp.PyArray_DATA(b)
    cdef char *op = <char *>cnp.PyArray_DATA(out)
    cdef int typ = cnp.PyArray_TYPE(a)
    if typ != cnp.NPY_FLOAT16 and typ != cnp.NPY_FLOAT32 and typ != cnp.NPY_FLOAT64:
        raise TypeError("stream_add supports float16, float32 and float64")
    with nogil:
        for tid in prange(nt, schedule='static', num_threads=nt):
            lo = _share(n, tid, nt)
            hi = _share(n, tid + 1, nt)
            if typ == cnp.NPY_FLOAT32:
                bn_stream_add_f(<float *>ap + lo, <float *>bp + lo, <float *>op + lo, hi - lo)
            elif typ == cnp.NPY_FLOAT16:
                bn_stream_add_h(<uint16_t *>ap + lo, <uint16_t *>bp + lo, <uint16_t *>op + lo, hi - lo)
            else:
                bn_stream_add_d(<double *>ap + lo, <double *>bp + lo, <double *>op + lo, hi - lo)


def any_between(cnp.ndarray v, double lo, double hi):
    """Whether an element of the contiguous float64 vector v lies strictly between lo and
    hi: a per-call check of the face, without NumPy's temporaries."""
    cdef const double *p = _f64(v)
    cdef Py_ssize_t k, n = cnp.PyArray_SIZE(v)
    for k in range(n):
        if lo < p[k] < hi:
            return True
    return False


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
            finite = finite & (isfinite(of[c]) != 0)   # no branch: the loop vectorizes
    else:
        rd = <const double *>cnp.PyArray_DATA(running)
        od = <double *>cnp.PyArray_DATA(out)
        for c in range(n):
            od[c] = momentum * rd[c] + rest * s[c]
            finite = finite & (isfinite(od[c]) != 0)
    return out if finite else None
