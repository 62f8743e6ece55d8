/* The C side of the batch-norm kernels, included by _kernels.pyx.
 *
 * It instantiates the inner loops of _loops.h for float, double and float16 and gathers each
 * dtype's loops in one table (bn_loops_f, bn_loops_d, bn_loops_h), so that the schedule and its
 * task functions in _kernels.pyx are written once for all three.  A C program (a test or a timing
 * harness) can include it alone: without Python.h, Py_ssize_t is ptrdiff_t.
 */
#ifndef BN_KERNELS_H
#define BN_KERNELS_H

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifndef Py_PYTHON_H
typedef ptrdiff_t Py_ssize_t;
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
static inline int bn_max_threads(void) { return omp_get_max_threads(); }
static inline int bn_has_openmp(void) { return 1; }
#else
static inline int bn_max_threads(void) { return 1; }
static inline int bn_has_openmp(void) { return 0; }
#endif

/* Whether every page of [lo, hi) is in memory now (mincore): an output the allocator handed
 * out again, already written once, needs no faulting in.  0 where it cannot tell. */
#if defined(__linux__)
#include <sys/mman.h>
static inline int bn_mapped(const char *lo, const char *hi)
{
    enum { PAGE = 4096, CHUNK = 4096 };
    unsigned char vec[CHUNK];
    uintptr_t a = (uintptr_t)lo & ~(uintptr_t)(PAGE - 1);
    size_t n, i;
    while (a < (uintptr_t)hi) {
        n = ((uintptr_t)hi - a + PAGE - 1) / PAGE;
        n = n < CHUNK ? n : CHUNK;
        if (mincore((void *)a, n * PAGE, vec) != 0)
            return 0;
        for (i = 0; i < n; i++)
            if (!(vec[i] & 1))
                return 0;
        a += n * PAGE;
    }
    return 1;
}
#else
static inline int bn_mapped(const char *lo, const char *hi)
{
    (void)lo;
    (void)hi;
    return 0;
}
#endif

#ifndef BNKERNELS_BUILD_FLAGS
#define BNKERNELS_BUILD_FLAGS ""
#endif
static const char *bn_build_flags = BNKERNELS_BUILD_FLAGS;

/* independent float64 accumulators of a reduction over a contiguous run */
#define BN_LANES 16
#define BN_SIMD _Pragma("omp simd")
/* every task-level loop is compiled for AVX-512, AVX2 and baseline x86-64; the best one
 * is picked when the module loads (no -march=native: wheels must run on any x86-64) */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(BN_NO_CLONES)
#define BN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static const char *bn_simd_targets =
    "x86-64-v4 (AVX-512), x86-64-v3 (AVX2), x86-64 (SSE2): chosen at load";
#else
#define BN_CLONES
static const char *bn_simd_targets = "as compiled (no runtime dispatch)";
#endif
#if defined(__GNUC__)
/* element-wise helpers are always inlined: a call inside a loop keeps it from vectorizing,
 * and GCC stops inlining plain `static inline` functions into the larger task functions */
#define BN_INLINE static inline __attribute__((always_inline))
#define bn_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)    /* into L1 */
#define bn_prefetch_l2(p) __builtin_prefetch((const void *)(p), 0, 2) /* into L2 */
#else
#define BN_INLINE static inline
#define bn_prefetch(p) ((void)(p))
#define bn_prefetch_l2(p) ((void)(p))
#endif

/* fixed-order sum of BN_LANES partial sums */
static inline double bn_tree(const double *a)
{
    double s[8];
    int j;
    for (j = 0; j < 8; j++)
        s[j] = a[j] + a[j + 8];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* the part [l0, l1) of plane n (elements n*L .. n*L+L-1) inside [e0, e1) */
static inline void bn_span(
    Py_ssize_t n, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t *l0, Py_ssize_t *l1)
{
    *l0 = e0 > n * L ? e0 - n * L : 0;
    *l1 = e1 - n * L < L ? e1 - n * L : L;
}

/* A fused epilogue of the output sweep, its pointers at the task's first element and its
 * strides in elements (*_n between rows or samples, *_c between planar channels).
 * Forward: out = max(gamma*xhat + beta + aux, 0), aux (the residual) NULL for none, the
 * max only with relu.  Backward: dy is first masked by the saved output aux (a fused
 * ReLU's, NULL for none), and the masked dy is written to out2 (the residual's gradient,
 * NULL for none); zterm 0 leaves out dx's term in z (with running statistics, dx does not
 * depend on x: its coefficient is 0, and 0 times a NaN or Inf in x would be NaN). */
typedef struct {
    const void *aux;
    void *out2;
    Py_ssize_t aux_n, aux_c, out2_n, out2_c;
    int relu;
    int zterm;
} bn_epi;

/* One dtype's task-level loops (see _loops.h); data pointers are of that dtype.  y: the
 * saved output that masks dy (NULL: none); e: the output's epilogue (NULL: none). */
typedef struct {
    void (*rows_sums)(
        const void *z, const void *dy, const void *y, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sy,
        Py_ssize_t nrows, Py_ssize_t cw, const double *m, double *s_dy, double *s_zm);
    void (*rows_centered)(
        const void *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw, const double *m0, double *d1,
        double *d2);
    void (*rows_affine)(
        const void *z, const void *dy, void *out, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout,
        Py_ssize_t nrows, Py_ssize_t cw, const double *m, const double *S, const double *A,
        const double *Cc, int stream, const bn_epi *e);
    void (*plane_sums)(
        const void *z, const void *dy, const void *y, Py_ssize_t szn, Py_ssize_t szc,
        Py_ssize_t sdyn, Py_ssize_t sdyc, Py_ssize_t syn, Py_ssize_t syc, Py_ssize_t L,
        Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw, const double *m, double *s_dy, double *s_zm);
    void (*plane_moments)(
        const void *x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1,
        Py_ssize_t cw, double *mean, double *m2, double *d1);
    void (*plane_affine)(
        const void *z, const void *dy, void *out, Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn,
        Py_ssize_t sdyc, Py_ssize_t soutn, Py_ssize_t soutc, Py_ssize_t L, Py_ssize_t e0,
        Py_ssize_t e1, Py_ssize_t cw, const double *m, const double *S, const double *A,
        const double *Cc, int stream, const bn_epi *e);
} bn_loops;

/* The fused epilogue's ReLU, for every dtype (in float64).  dy where the saved output y is
 * above 0, else 0 (NaN passes dy); and max(v, 0) with NaN kept and -0.0 made +0.0.  Selects
 * that vectorize: the build assumes floating-point operations do not trap (setup.py). */
BN_INLINE double bn_masked(double y, double dy) { return y <= 0.0 ? 0.0 : dy; }

BN_INLINE double bn_relu(double v) { return bn_masked(v, v); }

/* a coefficient of float16's output arithmetic as a float: a finite value beyond float's
 * range saturates at +-FLT_MAX (times an exact 0 it still gives 0, as in float64, and
 * times anything a float16 can hold it still overflows float16) */
BN_INLINE float bn_coef_f(double v)
{
    return (float)(v > FLT_MAX && v <= DBL_MAX ? FLT_MAX
                                               : (v < -FLT_MAX && v >= -DBL_MAX ? -FLT_MAX : v));
}

/* the same in float, the output arithmetic of float16 data */
BN_INLINE float bn_masked_f(float y, float dy) { return y <= 0.0f ? 0.0f : dy; }

BN_INLINE float bn_relu_f(float v) { return bn_masked_f(v, v); }

/* ---- float16 (IEEE binary16), stored as its bits ----
 * Conversions in 32-bit integer and float operations, branch-free (each case computed,
 * the right one selected), so that they vectorize on every x86-64: GCC 12 turns _Float16
 * conversions into a library call per element. */
BN_INLINE float bn_bits_f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

BN_INLINE uint32_t bn_f_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* a float16 as a double (exact, through float) */
BN_INLINE double bn_h2d(uint16_t h)
{
    const uint32_t em = (uint32_t)(h & 0x7fffu) << 13; /* exponent and significand */
    const uint32_t e = em & 0x0f800000u;
    /* normal: rebias the exponent (15 -> 127) */
    const uint32_t normal = em + (112u << 23);
    /* inf and NaN: all exponent bits (payload and quiet bit kept) */
    const uint32_t special = em + (224u << 23);
    /* zero and subnormal, m * 2^-24: as 2^-14 * (1 + m/1024) less 2^-14, exact */
    const uint32_t sub = bn_f_bits(bn_bits_f(normal + (1u << 23)) - 0x1p-14f);
    const uint32_t f = e == 0 ? sub : (e == 0x0f800000u ? special : normal);
    return (double)bn_bits_f(f | (uint32_t)(h & 0x8000u) << 16);
}

/* a float rounded to the nearest float16, ties to even (overflow to inf, NaN kept quiet) */
BN_INLINE uint16_t bn_f2h(float x)
{
    const uint32_t u = bn_f_bits(x), a = u & 0x7fffffffu;
    /* normal results (|x| >= 2^-14): rebias, then round off 13 bits to nearest even; a
     * carry into the exponent is the right result (up to inf, 0x7c00, from 65520 on) */
    const uint32_t r = a - (112u << 23);
    const uint32_t normal = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    /* subnormal results (|x| < 2^-14): adding 0.5 rounds |x| to a multiple of 2^-24, the
     * float16 subnormal step, ties to even; the low bits are then the count of steps */
    const uint32_t sub = bn_f_bits(bn_bits_f(a) + 0.5f) - bn_f_bits(0.5f);
    const uint32_t nan = 0x7e00u | ((a >> 13) & 0x3ffu);
    uint32_t h = a < (113u << 23) ? sub : normal;
    h = a >= (143u << 23) ? 0x7c00u : h; /* 65536 and beyond: inf */
    h = a > 0x7f800000u ? nan : h;
    return (uint16_t)((u >> 16 & 0x8000u) | h);
}

/* a double rounded to the nearest float16, once: first to float rounding to odd (toward
 * zero, the last bit set when inexact), which keeps what the second rounding needs to
 * know, so float16's ties to even come out as if rounded from the double directly (float
 * has more than two bits beyond float16's 11) */
BN_INLINE uint16_t bn_d2h(double d)
{
    const float f = (float)d;
    const double back = (double)f;
    const uint32_t inexact = back != d;
    const uint32_t away = (back < 0.0 ? -back : back) > (d < 0.0 ? -d : d);
    return bn_f2h(bn_bits_f((bn_f_bits(f) - away) | inexact));
}

/* Runs of float16 converted at once: the float16 loops widen their inputs into
 * runs of floats in L1 (bn_h2f_run, exact; a signalling NaN may come out quiet, as any
 * NaN does when widened), compute their outputs in float arithmetic (_loops.h, BN_OT) as
 * runs of floats, and round each run to float16, to nearest even (bn_f2h_run, bn_f2h's
 * bits).  In 32-bit integer code the conversions are most of a float16 sweep's work; F16C
 * (on every x86-64-v3 CPU) does each in one instruction.  The code is chosen when the
 * module loads (bn_f16_code): AVX-512 (sixteen at a time), else AVX2 with F16C and FMA (eight),
 * else the integer code.  All three give the same bits.  The vector code converts a run's
 * tail with its own instructions (AVX-512 under a mask, F16C one at a time): the integer
 * code per element cost more.  bn_h2f_run also sets the floats after the run up to the next
 * multiple of sixteen (BN_PAD) to 0, so that an output loop may run to that length: its
 * extra lanes are computed from zeros and never stored, and a run's last elements then
 * take the vector loop rather than a scalar tail. */
#define BN_STAGE 256  /* floats of one output run: 1 KiB, in L1 */
#define BN_ISTAGE 512 /* floats of one input run: 2 KiB, in L1 */
/* an output run's inputs are widened in one run; a planar run's pieces keep the lanes */
_Static_assert(BN_STAGE <= BN_ISTAGE, "an output run fits an input run");
_Static_assert(BN_ISTAGE % BN_LANES == 0, "pieces of whole lanes: the same sums");
#define BN_PAD(n) (((n) + 15) & ~(Py_ssize_t)15)
_Static_assert(BN_STAGE % 16 == 0 && BN_ISTAGE % 16 == 0, "a padded run fits its buffer");
enum { BN_F16_INTEGER = 0, BN_F16_F16C = 1, BN_F16_AVX512 = 2 };
static int bn_f16_kind = BN_F16_INTEGER; /* the code in use, set by bn_f16_code */

static __attribute__((noinline)) void bn_f2h_run_plain(
    const float *restrict f, uint16_t *restrict h, Py_ssize_t n)
{
    Py_ssize_t k;
    BN_SIMD
    for (k = 0; k < n; k++)
        h[k] = bn_f2h(f[k]);
}

static __attribute__((noinline)) void bn_h2f_run_plain(
    const uint16_t *restrict h, float *restrict f, Py_ssize_t n)
{
    Py_ssize_t k;
    BN_SIMD
    for (k = 0; k < n; k++)
        f[k] = (float)bn_h2d(h[k]);
    for (k = n; k < BN_PAD(n); k++)
        f[k] = 0.0f;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define BN_HAVE_F16C 1
__attribute__((target("avx2,f16c"))) static inline void bn_f2h_run_f16c(
    const float *restrict f, uint16_t *restrict h, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm_storeu_si128(
            (__m128i *)(h + k), _mm256_cvtps_ph(_mm256_loadu_ps(f + k), _MM_FROUND_TO_NEAREST_INT));
    for (; k < n; k++)
        h[k] = _cvtss_sh(f[k], _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx2,f16c"))) static inline void bn_h2f_run_f16c(
    const uint16_t *restrict h, float *restrict f, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(f + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + k))));
    for (; k < n; k++)
        f[k] = _cvtsh_ss(h[k]);
    for (; k < BN_PAD(n); k++)
        f[k] = 0.0f;
}

/* AVX-512: the last, partial sixteen under a mask */
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) static inline void bn_f2h_run_avx512(
    const float *restrict f, uint16_t *restrict h, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (; k + 16 <= n; k += 16)
        _mm256_storeu_si256(
            (__m256i *)(h + k), _mm512_cvtps_ph(_mm512_loadu_ps(f + k), _MM_FROUND_TO_NEAREST_INT));
    if (k < n) {
        const __mmask16 t = (__mmask16)((1u << (n - k)) - 1u);
        _mm256_mask_storeu_epi16(
            h + k, t, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(t, f + k), _MM_FROUND_TO_NEAREST_INT));
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) static inline void bn_h2f_run_avx512(
    const uint16_t *restrict h, float *restrict f, Py_ssize_t n)
{
    Py_ssize_t k = 0;
    for (; k + 16 <= n; k += 16)
        _mm512_storeu_ps(f + k, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(h + k))));
    if (k < n) {
        const __mmask16 t = (__mmask16)((1u << (n - k)) - 1u);
        _mm512_storeu_ps(f + k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(t, h + k)));
    }
}
#endif

/* A run's conversion with the code in use, fn##_avx512, fn##_f16c or fn##_plain: a branch
 * per run, not a call through a pointer, so that the vector code can inline into the loops'
 * clone of its instruction set */
#ifdef BN_HAVE_F16C
#define BN_F16_RUN(fn, src, dst, n)                          \
    (bn_f16_kind == BN_F16_AVX512 ? fn##_avx512(src, dst, n) \
     : bn_f16_kind == BN_F16_F16C ? fn##_f16c(src, dst, n)   \
                                  : fn##_plain(src, dst, n))
#else
#define BN_F16_RUN(fn, src, dst, n) fn##_plain(src, dst, n)
#endif

static inline __attribute__((always_inline)) void bn_f2h_run(
    const float *restrict f, uint16_t *restrict h, Py_ssize_t n)
{
    BN_F16_RUN(bn_f2h_run, f, h, n);
}

static inline __attribute__((always_inline)) void bn_h2f_run(
    const uint16_t *restrict h, float *restrict f, Py_ssize_t n)
{
    BN_F16_RUN(bn_h2f_run, h, f, n);
}

/* The float16 output sweeps' runs in one pass over memory, where the staged loops of
 * _loops.h (BN_OUT_RUN, bn_epi_run) widen each run into L1, compute it there and round it
 * back.  For k < n, in float, each output rounded once to float16 (to nearest even):
 * without dy (forward) out[k] := fma(s, z[k] - m, c), plus aux[k] (the residual) with aux,
 * then max(., 0) with relu (NaN kept, -0 made +0); with dy, d := dy[k], 0 where aux[k] <= 0
 * with aux (the saved output of a fused ReLU), stored to out2[k] with out2 (the residual's
 * gradient), and out[k] := fma(s, z[k] - m, fma(a, d, c)), or fma(a, d, c) without its
 * term in z (not read) unless zterm.  The coefficients at [k*cs] (cs 1: arrays per column,
 * read up to BN_PAD(n), as _loops.h pads them; cs 0: one channel's).  The operations of
 * BN_AFFINE_OUT, BN_AFFINE_DX and bn_epi_run in their order, so the same bits.  Vector code
 * only (AVX-512, or AVX2 with F16C and FMA): bn_h_affine returns 0 for the integer code,
 * whose callers then take the staged loop. */
#ifdef BN_HAVE_F16C
/* one vector of the run at k: LOADC(p) loads coefficients from array p, IN(p) widens the
 * elements of input p, STORE(p, v) rounds v into those of output p, KEEP(y, v) is v where
 * y > 0 or NaN and +0 elsewhere (bn_masked_f) */
#define BN_H_ZM(IN) BN_VSUB(IN(z), vm) /* z - m, as BN_AFFINE_DX */
#define BN_H_RUN(V, LOADC, SET1, IN, STORE, KEEP)                             \
    do {                                                                      \
        const V vm = cs ? LOADC(m) : SET1(*m), vs = cs ? LOADC(s) : SET1(*s), \
                vc = cs ? LOADC(c) : SET1(*c);                                \
        V v;                                                                  \
        if (dy == NULL) {                                                     \
            v = BN_VFMA(vs, BN_H_ZM(IN), vc);                                 \
            if (aux != NULL)                                                  \
                v = BN_VADD(v, IN(aux));                                      \
            if (relu)                                                         \
                v = KEEP(v, v);                                               \
        } else {                                                              \
            const V va = cs ? LOADC(a) : SET1(*a);                            \
            V d = IN(dy);                                                     \
            if (aux != NULL)                                                  \
                d = KEEP(IN(aux), d);                                         \
            if (out2 != NULL)                                                 \
                STORE(out2, d);                                               \
            v = BN_VFMA(va, d, vc);                                           \
            if (zterm)                                                        \
                v = BN_VFMA(vs, BN_H_ZM(IN), v);                              \
        }                                                                     \
        STORE(out, v);                                                        \
    } while (0)
/* a run's arguments, and the rows' (nrows runs, each array's rows its stride apart) */
#define BN_H_ARGS                                                                          \
    const uint16_t *restrict z, const uint16_t *restrict dy, const uint16_t *restrict aux, \
        uint16_t *restrict out, uint16_t *restrict out2, Py_ssize_t n, const float *m,     \
        const float *s, const float *a, const float *c, const int cs, const int relu,      \
        const int zterm
#define BN_H_ROWS_ARGS                                                                            \
    BN_H_ARGS, Py_ssize_t nrows, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t saux, Py_ssize_t sout, \
        Py_ssize_t sout2
#define BN_H_ROWS(RUN)                                                                             \
    do {                                                                                           \
        Py_ssize_t r;                                                                              \
        for (r = 0; r < nrows; r++)                                                                \
            RUN(z + r * sz, dy == NULL ? NULL : dy + r * sdy, aux == NULL ? NULL : aux + r * saux, \
                out + r * sout, out2 == NULL ? NULL : out2 + r * sout2, n, m, s, a, c, cs, relu,   \
                zterm);                                                                            \
    } while (0)
#define BN_H_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma")))
#define BN_H_TARGET_F16C __attribute__((target("avx2,f16c,fma")))

#define BN_VSUB _mm512_sub_ps
#define BN_VADD _mm512_add_ps
#define BN_VFMA _mm512_fmadd_ps
#define BN_H_KEEP(y, v)   \
    _mm512_mask_blend_ps( \
        _mm512_cmp_ps_mask((y), _mm512_setzero_ps(), _CMP_LE_OQ), (v), _mm512_setzero_ps())
/* the whole sixteen at k of input p widened, and v rounded into output p there */
#define BN_H_IN16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((p) + k)))
#define BN_H_STORE16(p, v) \
    _mm256_storeu_si256((__m256i *)((p) + k), _mm512_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
BN_H_TARGET_AVX512 static inline __attribute__((always_inline)) void bn_h_run_avx512(BN_H_ARGS)
{
    Py_ssize_t k = 0;
#define BN_H_LOADC(p) _mm512_loadu_ps((p) + k)
    for (; k + 16 <= n; k += 16)
        BN_H_RUN(__m512, BN_H_LOADC, _mm512_set1_ps, BN_H_IN16, BN_H_STORE16, BN_H_KEEP);
#undef BN_H_LOADC
    if (k < n) { /* the last, partial sixteen under a mask */
        const __mmask16 t = (__mmask16)((1u << (n - k)) - 1u);
#define BN_H_LOADC(p) _mm512_maskz_loadu_ps(t, (p) + k)
#define BN_H_IN(p) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(t, (p) + k))
#define BN_H_STORE(p, v) \
    _mm256_mask_storeu_epi16((p) + k, t, _mm512_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
        BN_H_RUN(__m512, BN_H_LOADC, _mm512_set1_ps, BN_H_IN, BN_H_STORE, BN_H_KEEP);
#undef BN_H_LOADC
#undef BN_H_IN
#undef BN_H_STORE
    }
}
BN_H_TARGET_AVX512 static inline void bn_h_affine_avx512(BN_H_ROWS_ARGS)
{
    BN_H_ROWS(bn_h_run_avx512);
}

/* The plain output (no epilogue) of nc planes of L >= 16 elements that follow one another in
 * memory (NCHW: a task's planes of one image), channel ch's coefficients at [ch], as one run:
 * each plane's whole sixteens by bn_h_run_avx512 with its coefficients, the sixteen that
 * crosses into the next plane with each lane's own (a blend), so that only the last plane
 * ends in a masked tail.  The operations of bn_h_run_avx512, so the same bits.  With
 * L >= 16 a vector crosses at most one boundary. */
BN_H_TARGET_AVX512 static void bn_h_planes_avx512(
    const uint16_t *restrict z, const uint16_t *restrict dy, uint16_t *restrict out, Py_ssize_t L,
    Py_ssize_t nc, const float *m, const float *s, const float *a, const float *c)
{
    const uint16_t *const aux = NULL;
    uint16_t *const out2 = NULL;
    const int cs = 0, relu = 0, zterm = 1;
    const Py_ssize_t n = nc * L;
    Py_ssize_t k = 0, ch, end, run;
    for (ch = 0; ch < nc; ch++) {
        end = (ch + 1) * L;
        run = end == n ? end - k : (end - k) / 16 * 16; /* the last plane: to its end */
        bn_h_run_avx512(
            z + k, dy == NULL ? NULL : dy + k, NULL, out + k, NULL, run, m + ch, s + ch, a + ch,
            c + ch, 0, 0, 1);
        k += run;
        if (k < end) { /* the sixteen that crosses into plane ch + 1: each lane its channel's */
            const __mmask16 nx = (__mmask16)(0xFFFFu << (end - k));
#define BN_H_BLEND(v) \
    _mm512_mask_blend_ps(nx, _mm512_set1_ps((&(v))[ch]), _mm512_set1_ps((&(v))[ch + 1]))
#define BN_H_LOADC(p) BN_H_BLEND(*(p)) /* only to compile BN_H_RUN (cs 0) */
            BN_H_RUN(__m512, BN_H_LOADC, BN_H_BLEND, BN_H_IN16, BN_H_STORE16, BN_H_KEEP);
#undef BN_H_LOADC
#undef BN_H_BLEND
            k += 16;
        }
    }
    (void)aux, (void)out2, (void)cs, (void)relu, (void)zterm;
}
#undef BN_H_IN16
#undef BN_H_STORE16
#undef BN_VSUB
#undef BN_VADD
#undef BN_VFMA
#undef BN_H_KEEP

#define BN_VSUB _mm256_sub_ps
#define BN_VADD _mm256_add_ps
#define BN_VFMA _mm256_fmadd_ps
#define BN_H_KEEP(y, v) \
    _mm256_blendv_ps((v), _mm256_setzero_ps(), _mm256_cmp_ps((y), _mm256_setzero_ps(), _CMP_LE_OQ))
#define BN_H_LOADC(p) _mm256_loadu_ps((p) + k)
BN_H_TARGET_F16C static inline __attribute__((always_inline)) void bn_h_run_f16c(BN_H_ARGS)
{
    Py_ssize_t k = 0;
#define BN_H_IN(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((p) + k)))
#define BN_H_STORE(p, v) \
    _mm_storeu_si128((__m128i *)((p) + k), _mm256_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
    for (; k + 8 <= n; k += 8)
        BN_H_RUN(__m256, BN_H_LOADC, _mm256_set1_ps, BN_H_IN, BN_H_STORE, BN_H_KEEP);
#undef BN_H_IN
#undef BN_H_STORE
    if (k < n) { /* the last, partial eight, through copies padded with zeros (p##_t) */
        uint16_t z_t[8] = {0}, dy_t[8] = {0}, aux_t[8] = {0}, out_t[8], out2_t[8];
        const Py_ssize_t rest = n - k;
        Py_ssize_t j;
        for (j = 0; j < rest; j++) {
            z_t[j] = dy == NULL || zterm ? z[k + j] : 0;
            dy_t[j] = dy == NULL ? 0 : dy[k + j];
            aux_t[j] = aux == NULL ? 0 : aux[k + j];
        }
#define BN_H_IN(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p##_t))
#define BN_H_STORE(p, v) \
    _mm_storeu_si128((__m128i *)p##_t, _mm256_cvtps_ph((v), _MM_FROUND_TO_NEAREST_INT))
        BN_H_RUN(__m256, BN_H_LOADC, _mm256_set1_ps, BN_H_IN, BN_H_STORE, BN_H_KEEP);
#undef BN_H_IN
#undef BN_H_STORE
        for (j = 0; j < rest; j++) {
            out[k + j] = out_t[j];
            if (out2 != NULL)
                out2[k + j] = out2_t[j];
        }
    }
}
BN_H_TARGET_F16C static inline void bn_h_affine_f16c(BN_H_ROWS_ARGS) { BN_H_ROWS(bn_h_run_f16c); }
#undef BN_H_LOADC
#undef BN_VSUB
#undef BN_VADD
#undef BN_VFMA
#undef BN_H_KEEP
#undef BN_H_RUN
#undef BN_H_ZM
#undef BN_H_ROWS
#undef BN_H_TARGET_AVX512
#undef BN_H_TARGET_F16C
#undef BN_H_ARGS
#undef BN_H_ROWS_ARGS
#endif

/* The body of the output runs' dispatchers (bn_h_affine, bn_f_affine), whose parameters
 * have the same names: run AVX512 or F16C, the rows function of the code in use
 * (bn_f16_kind), and return 1; where it has neither, return 0 */
#ifdef BN_HAVE_F16C
#define BN_AFFINE_CALL(fn) \
    fn(z, dy, aux, out, out2, n, m, s, a, c, cs, relu, zterm, nrows, sz, sdy, saux, sout, sout2)
#define BN_AFFINE_RUN(AVX512, F16C)         \
    do {                                    \
        if (bn_f16_kind == BN_F16_AVX512) { \
            BN_AFFINE_CALL(AVX512);         \
            return 1;                       \
        }                                   \
        if (bn_f16_kind == BN_F16_F16C) {   \
            BN_AFFINE_CALL(F16C);           \
            return 1;                       \
        }                                   \
    } while (0)
#else
#define BN_AFFINE_RUN(AVX512, F16C) (void)0
#endif
#define BN_AFFINE_DISPATCH(AVX512, F16C)                                                       \
    do {                                                                                       \
        BN_AFFINE_RUN(AVX512, F16C);                                                           \
        (void)z, (void)dy, (void)aux, (void)out, (void)out2, (void)n, (void)m, (void)s;        \
        (void)a, (void)c, (void)cs, (void)relu, (void)zterm, (void)nrows, (void)sz, (void)sdy; \
        (void)saux, (void)sout, (void)sout2;                                                   \
        return 0;                                                                              \
    } while (0)

/* bn_h_affine over nrows rows (each array's rows its stride apart; one run: nrows 1) */
static inline __attribute__((always_inline)) int bn_h_affine(
    const uint16_t *restrict z, const uint16_t *restrict dy, const uint16_t *restrict aux,
    uint16_t *restrict out, uint16_t *restrict out2, Py_ssize_t n, const float *m, const float *s,
    const float *a, const float *c, const int cs, const int relu, const int zterm, Py_ssize_t nrows,
    Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t saux, Py_ssize_t sout, Py_ssize_t sout2)
{
    BN_AFFINE_DISPATCH(bn_h_affine_avx512, bn_h_affine_f16c);
}

/* bn_h_planes_avx512 where the code in use has it (returns 1), else 0: the caller then takes
 * the planes one run at a time */
static inline __attribute__((always_inline)) int bn_h_planes(
    const uint16_t *restrict z, const uint16_t *restrict dy, uint16_t *restrict out, Py_ssize_t L,
    Py_ssize_t nc, const float *m, const float *s, const float *a, const float *c)
{
#ifdef BN_HAVE_F16C
    if (bn_f16_kind == BN_F16_AVX512) {
        bn_h_planes_avx512(z, dy, out, L, nc, m, s, a, c);
        return 1;
    }
#endif
    (void)z, (void)dy, (void)out, (void)L, (void)nc, (void)m, (void)s, (void)a, (void)c;
    return 0;
}

/* The float32 output sweeps' runs in vector code.  GCC's vector code of the loops in
 * _loops.h loads a whole vector of floats, splits it in two to widen each half to doubles,
 * and joins the two rounded halves again to store them: two shuffles more per vector beside
 * the conversions, which bound these loops (docs/performance.md).  Here each
 * half-vector of floats (eight with AVX-512, four with AVX2) is loaded, widened, computed,
 * rounded and stored on its own.  Arguments as bn_h_affine's, with float32 data and the
 * coefficients in double (float32's BN_OT); the operations of BN_AFFINE_OUT, BN_AFFINE_DX,
 * BN_DX_DY and bn_epi_run in float64, in their order, each output rounded once to float (to
 * nearest even): the same bits.  bn_f_affine runs them where the code in use (bn_f16_kind)
 * has AVX-512 or AVX2 and returns 1, else returns 0, and the caller takes its loop. */
#define BN_F_ARGS                                                                                  \
    const float *restrict z, const float *restrict dy, const float *restrict aux,                  \
        float *restrict out, float *restrict out2, Py_ssize_t n, const double *m, const double *s, \
        const double *a, const double *c, const int cs, const int relu, const int zterm
#define BN_F_ROWS_ARGS                                                                            \
    BN_F_ARGS, Py_ssize_t nrows, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t saux, Py_ssize_t sout, \
        Py_ssize_t sout2
#ifdef BN_HAVE_F16C
/* one vector at k: IN(p) widens the elements of input p, LOADC(p) loads the coefficients of
 * array p (cs 1) or broadcasts *p (cs 0), STORE(p, v) rounds v into output p; KEEP(y, v) is
 * v where y > 0 or NaN and +0 elsewhere (bn_masked); ADD, MUL and SUB the vector's */
#define BN_F_RUN(V, ADD, MUL, SUB, KEEP, IN, LOADC, STORE)   \
    do {                                                     \
        const V vm = LOADC(m), vs = LOADC(s), vc = LOADC(c); \
        V v;                                                 \
        if (dy == NULL) {                                    \
            v = ADD(MUL(vs, SUB(IN(z), vm)), vc);            \
            if (aux != NULL)                                 \
                v = ADD(v, IN(aux));                         \
            if (relu)                                        \
                v = KEEP(v, v);                              \
        } else {                                             \
            V d = IN(dy);                                    \
            if (aux != NULL)                                 \
                d = KEEP(IN(aux), d);                        \
            if (out2 != NULL)                                \
                STORE(out2, d);                              \
            v = MUL(LOADC(a), ADD(d, vc));                   \
            if (zterm)                                       \
                v = ADD(v, MUL(vs, SUB(IN(z), vm)));         \
        }                                                    \
        STORE(out, v);                                       \
    } while (0)
/* nrows runs of RUN; the plain rows (no epilogue, coefficients per column) with constant
 * flags, so that their loop tests none of them */
#define BN_F_ROWS(RUN)                                                                             \
    do {                                                                                           \
        Py_ssize_t r;                                                                              \
        if (aux == NULL && out2 == NULL && !relu && zterm && cs) {                                 \
            for (r = 0; r < nrows; r++)                                                            \
                if (dy == NULL)                                                                    \
                    RUN(z + r * sz, NULL, NULL, out + r * sout, NULL, n, m, s, a, c, 1, 0, 1);     \
                else                                                                               \
                    RUN(z + r * sz, dy + r * sdy, NULL, out + r * sout, NULL, n, m, s, a, c, 1, 0, \
                        1);                                                                        \
            break;                                                                                 \
        }                                                                                          \
        for (r = 0; r < nrows; r++)                                                                \
            RUN(z + r * sz, dy == NULL ? NULL : dy + r * sdy, aux == NULL ? NULL : aux + r * saux, \
                out + r * sout, out2 == NULL ? NULL : out2 + r * sout2, n, m, s, a, c, cs, relu,   \
                zterm);                                                                            \
    } while (0)

#define BN_F_KEEP(y, v)   \
    _mm512_mask_blend_pd( \
        _mm512_cmp_pd_mask((y), _mm512_setzero_pd(), _CMP_LE_OQ), (v), _mm512_setzero_pd())
#define BN_F_RUN8(IN, LOADC, STORE) \
    BN_F_RUN(__m512d, _mm512_add_pd, _mm512_mul_pd, _mm512_sub_pd, BN_F_KEEP, IN, LOADC, STORE)
__attribute__((target("avx512f,avx512vl"))) static inline
    __attribute__((always_inline)) void bn_f_run_avx512(BN_F_ARGS)
{
    Py_ssize_t k = 0;
#define BN_F_IN(p) _mm512_cvtps_pd(_mm256_loadu_ps((p) + k))
#define BN_F_LOADC(p) (cs ? _mm512_loadu_pd((p) + k) : _mm512_set1_pd(*(p)))
#define BN_F_STORE(p, v) _mm256_storeu_ps((p) + k, _mm512_cvtpd_ps(v))
    for (; k + 8 <= n; k += 8)
        BN_F_RUN8(BN_F_IN, BN_F_LOADC, BN_F_STORE);
#undef BN_F_IN
#undef BN_F_LOADC
#undef BN_F_STORE
    if (k < n) { /* the last, partial eight under a mask */
        const __mmask8 t = (__mmask8)((1u << (n - k)) - 1u);
#define BN_F_IN(p) _mm512_cvtps_pd(_mm256_maskz_loadu_ps(t, (p) + k))
#define BN_F_LOADC(p) (cs ? _mm512_maskz_loadu_pd(t, (p) + k) : _mm512_set1_pd(*(p)))
#define BN_F_STORE(p, v) _mm256_mask_storeu_ps((p) + k, t, _mm512_cvtpd_ps(v))
        BN_F_RUN8(BN_F_IN, BN_F_LOADC, BN_F_STORE);
#undef BN_F_IN
#undef BN_F_LOADC
#undef BN_F_STORE
    }
}
__attribute__((target("avx512f,avx512vl"))) static void bn_f_affine_avx512(BN_F_ROWS_ARGS)
{
    BN_F_ROWS(bn_f_run_avx512);
}
#undef BN_F_KEEP
#undef BN_F_RUN8

#define BN_F_KEEP(y, v) \
    _mm256_blendv_pd((v), _mm256_setzero_pd(), _mm256_cmp_pd((y), _mm256_setzero_pd(), _CMP_LE_OQ))
__attribute__((target("avx2"))) static inline
    __attribute__((always_inline)) void bn_f_run_avx2(BN_F_ARGS)
{
    Py_ssize_t k = 0, j;
#define BN_F_IN(p) _mm256_cvtps_pd(_mm_loadu_ps((p) + k))
#define BN_F_LOADC(p) (cs ? _mm256_loadu_pd((p) + k) : _mm256_set1_pd(*(p)))
#define BN_F_STORE(p, v) _mm_storeu_ps((p) + k, _mm256_cvtpd_ps(v))
    for (; k + 4 <= n; k += 4)
        BN_F_RUN(
            __m256d, _mm256_add_pd, _mm256_mul_pd, _mm256_sub_pd, BN_F_KEEP, BN_F_IN, BN_F_LOADC,
            BN_F_STORE);
#undef BN_F_IN
#undef BN_F_LOADC
#undef BN_F_STORE
    /* the last one to three elements in scalar code: the same operations */
#define BN_F_ADD(u, w) ((u) + (w))
#define BN_F_MUL(u, w) ((u) * (w))
#define BN_F_SUB(u, w) ((u) - (w))
#define BN_F_IN(p) ((double)(p)[j])
#define BN_F_LOADC(p) ((p)[cs ? j : 0])
#define BN_F_STORE(p, v) ((p)[j] = (float)(v))
    for (j = k; j < n; j++)
        BN_F_RUN(double, BN_F_ADD, BN_F_MUL, BN_F_SUB, bn_masked, BN_F_IN, BN_F_LOADC, BN_F_STORE);
#undef BN_F_ADD
#undef BN_F_MUL
#undef BN_F_SUB
#undef BN_F_IN
#undef BN_F_LOADC
#undef BN_F_STORE
}
__attribute__((target("avx2"))) static void bn_f_affine_avx2(BN_F_ROWS_ARGS)
{
    BN_F_ROWS(bn_f_run_avx2);
}
#undef BN_F_KEEP
#undef BN_F_RUN
#undef BN_F_ROWS
#endif

static inline __attribute__((always_inline)) int bn_f_affine(BN_F_ROWS_ARGS)
{
    BN_AFFINE_DISPATCH(bn_f_affine_avx512, bn_f_affine_avx2);
}
#undef BN_F_ARGS
#undef BN_F_ROWS_ARGS
#undef BN_AFFINE_DISPATCH
#undef BN_AFFINE_RUN
#undef BN_AFFINE_CALL

/* Sums and moments in AVX-512, in one pass over memory: float16 planar runs and wide rows,
 * where the loops of _loops.h widen each piece into L1 first, and float32 planar runs,
 * where GCC's vector code of those loops loads sixteen floats and splits them in two (one
 * more operation per sixteen, on the ports the conversions use).  Here each eight elements
 * are loaded and widened on their own.  BN_LANES lane sums of a run of n, element k in
 * lane k % BN_LANES (a piece holds whole lanes), each lane's operations those of the loop in
 * _loops.h in their order; the tail under a mask, so that lanes past the run add nothing;
 * then, for a planar run, the lanes' bn_tree added to the channel's sums.  So the same bits.  Only
 * where the code in use (bn_f16_kind) is BN_F16_AVX512 (float16 planar sums also with F16C,
 * bn_h_sums_f16c below): the dispatchers below return 0 otherwise, and the caller takes its loop.
 * Each function takes its data as `const void *` and half (1: float16, 0: float32), a constant in
 * the typed entry points (BN_X_ENTRY) that inline it. */
#ifdef BN_HAVE_F16C
#define BN_X_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
/* the eight elements at p + i (under mask t8) as eight doubles */
#define BN_X_WIDEN8(p, i, t8)                                                              \
    (half ? _mm512_cvtps_pd(                                                               \
                _mm256_cvtph_ps(_mm_maskz_loadu_epi16((t8), (const uint16_t *)(p) + (i)))) \
          : _mm512_cvtps_pd(_mm256_maskz_loadu_ps((t8), (const float *)(p) + (i))))
/* the sixteen at p + i + k (under mask t) as two vectors of eight doubles, lo and hi */
#define BN_X_WIDEN16(p, i, t, lo, hi)                           \
    do {                                                        \
        lo = BN_X_WIDEN8(p, (i) + k, (__mmask8)(t));            \
        hi = BN_X_WIDEN8(p, (i) + k + 8, (__mmask8)((t) >> 8)); \
    } while (0)
/* the masks of columns or elements k..k+15 of n: t, and t0 and t1 for its low and high eight */
#define BN_X_COLS_MASKS                                                                      \
    const __mmask16 t = k + 16 <= n ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1u); \
    const __mmask8 t0 = (__mmask8)t, t1 = (__mmask8)(t >> 8)
#define BN_X_INLINE BN_X_TARGET_AVX512 static inline __attribute__((always_inline))
/* bn_tree of the sixteen lanes lo (0..7) and hi (8..15), in registers: the same additions of
 * the same operands (lo + hi, then neighbours, pairs of them, the two halves) */
BN_X_INLINE double bn_x_tree(__m512d lo, __m512d hi)
{
    __m512d s = _mm512_add_pd(lo, hi);
    s = _mm512_add_pd(s, _mm512_permute_pd(s, 0x55));       /* lane i with i ^ 1 */
    s = _mm512_add_pd(s, _mm512_permutex_pd(s, 0x4E));      /* with i ^ 2 */
    s = _mm512_add_pd(s, _mm512_shuffle_f64x2(s, s, 0x4E)); /* with i ^ 4 */
    return _mm512_cvtsd_f64(s);
}
/* The planar sums and moments add their lanes' trees to *s1 and *s2 themselves, as
 * bn_run_sums and bn_run_moments do, in registers: for a plane of a few hundred elements,
 * sixteen lanes stored and summed by scalar adds cost about as much as the run */
BN_X_INLINE void bn_x_sums_avx512(
    const void *restrict z, const void *restrict dy, Py_ssize_t n, double m, double *restrict s1,
    double *restrict s2, const int half)
{
    const __m512d vm = _mm512_set1_pd(m);
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, b0 = a0, b1 = a0, v0, v1, z0, z1;
    Py_ssize_t k = 0;
    for (; k + 16 <= n; k += 16) {
        BN_X_WIDEN16(dy, 0, 0xffff, v0, v1);
        BN_X_WIDEN16(z, 0, 0xffff, z0, z1);
        a0 = _mm512_add_pd(a0, v0);
        a1 = _mm512_add_pd(a1, v1);
        b0 = _mm512_add_pd(b0, _mm512_mul_pd(v0, _mm512_sub_pd(z0, vm)));
        b1 = _mm512_add_pd(b1, _mm512_mul_pd(v1, _mm512_sub_pd(z1, vm)));
    }
    if (k < n) {
        BN_X_COLS_MASKS;
        BN_X_WIDEN16(dy, 0, t, v0, v1);
        BN_X_WIDEN16(z, 0, t, z0, z1);
        a0 = _mm512_mask_add_pd(a0, t0, a0, v0);
        a1 = _mm512_mask_add_pd(a1, t1, a1, v1);
        b0 = _mm512_mask_add_pd(b0, t0, b0, _mm512_mul_pd(v0, _mm512_sub_pd(z0, vm)));
        b1 = _mm512_mask_add_pd(b1, t1, b1, _mm512_mul_pd(v1, _mm512_sub_pd(z1, vm)));
    }
    *s1 += bn_x_tree(a0, a1);
    *s2 += bn_x_tree(b0, b1);
}
BN_X_INLINE void bn_x_moments_avx512(
    const void *restrict x, Py_ssize_t n, double m0, double *restrict s1, double *restrict s2,
    const int half)
{
    const __m512d vm = _mm512_set1_pd(m0);
    __m512d a0 = _mm512_setzero_pd(), a1 = a0, b0 = a0, b1 = a0, d0, d1;
    Py_ssize_t k = 0;
    for (; k + 16 <= n; k += 16) {
        BN_X_WIDEN16(x, 0, 0xffff, d0, d1);
        d0 = _mm512_sub_pd(d0, vm);
        d1 = _mm512_sub_pd(d1, vm);
        a0 = _mm512_add_pd(a0, d0);
        a1 = _mm512_add_pd(a1, d1);
        b0 = _mm512_add_pd(b0, _mm512_mul_pd(d0, d0));
        b1 = _mm512_add_pd(b1, _mm512_mul_pd(d1, d1));
    }
    if (k < n) {
        BN_X_COLS_MASKS;
        BN_X_WIDEN16(x, 0, t, d0, d1);
        d0 = _mm512_sub_pd(d0, vm);
        d1 = _mm512_sub_pd(d1, vm);
        a0 = _mm512_mask_add_pd(a0, t0, a0, d0);
        a1 = _mm512_mask_add_pd(a1, t1, a1, d1);
        b0 = _mm512_mask_add_pd(b0, t0, b0, _mm512_mul_pd(d0, d0));
        b1 = _mm512_mask_add_pd(b1, t1, b1, _mm512_mul_pd(d1, d1));
    }
    *s1 += bn_x_tree(a0, a1);
    *s2 += bn_x_tree(b0, b1);
}
/* the rows' columns k..k+15 of an accumulator or coefficient array: whole vectors where the
 * sixteen are there (t0 and t1 all ones), else under the masks t0 (the low eight) and t1
 * (the high); every access masked measured slower */
#define BN_X_ACC_LOAD(p, lo, hi)                                                                  \
    do {                                                                                          \
        lo = t == 0xffff ? _mm512_loadu_pd((p) + k) : _mm512_maskz_loadu_pd(t0, (p) + k);         \
        hi = t == 0xffff ? _mm512_loadu_pd((p) + k + 8) : _mm512_maskz_loadu_pd(t1, (p) + k + 8); \
    } while (0)
#define BN_X_ACC_STORE(p, lo, hi)                       \
    do {                                                \
        if (t == 0xffff) {                              \
            _mm512_storeu_pd((p) + k, lo);              \
            _mm512_storeu_pd((p) + k + 8, hi);          \
        } else {                                        \
            _mm512_mask_storeu_pd((p) + k, t0, lo);     \
            _mm512_mask_storeu_pd((p) + k + 8, t1, hi); \
        }                                               \
    } while (0)
/* The rows' sweep of bn_x_rows_sums_avx512 and bn_x_rows_moments_avx512: sixteen columns at
 * a time, the shifts mb and the accumulators a and q loaded, ROW(r) (and ROW(r + 1) in a
 * pair) added into them, the accumulators stored; pairs of rows, then the last row alone */
#define BN_X_ROWS_STEP(ROW, q, q0, q1, SECOND) \
    for (k = 0; k < n; k += 16) {              \
        BN_X_COLS_MASKS;                       \
        BN_X_ACC_LOAD(mb, m0, m1);             \
        BN_X_ACC_LOAD(a, a0, a1);              \
        BN_X_ACC_LOAD(q, q0, q1);              \
        ROW(r);                                \
        SECOND;                                \
        BN_X_ACC_STORE(a, a0, a1);             \
        BN_X_ACC_STORE(q, q0, q1);             \
    }
#define BN_X_ROWS_SWEEP(ROW, q, q0, q1)                 \
    do {                                                \
        for (r = 0; r + 1 < nrows; r += 2)              \
            BN_X_ROWS_STEP(ROW, q, q0, q1, ROW(r + 1)); \
        if (r < nrows)                                  \
            BN_X_ROWS_STEP(ROW, q, q0, q1, (void)0);    \
    } while (0)
/* The wide rows' sums (bn_rows_sums_block, unmasked) without staging: nrows rows of n
 * columns, a[j] += dy, c[j] += dy*(z - mb[j]), sixteen columns of two rows at a time (a[j] +
 * v + w, in that order), the last row alone; the accumulators in memory, as the staged loop
 * keeps them */
BN_X_INLINE void bn_x_rows_sums_avx512(
    const void *restrict z, const void *restrict dy, Py_ssize_t sz, Py_ssize_t sdy,
    Py_ssize_t nrows, Py_ssize_t n, const double *restrict mb, double *restrict a,
    double *restrict c, const int half)
{
    __m512d v0, v1, z0, z1, m0, m1, a0, a1, c0, c1;
    Py_ssize_t r, k;
/* row rr's sixteen columns at k added into a0, a1 and c0, c1 */
#define BN_X_ROW_SUMS(rr)                                                 \
    do {                                                                  \
        BN_X_WIDEN16(dy, (rr) * sdy, t, v0, v1);                          \
        BN_X_WIDEN16(z, (rr) * sz, t, z0, z1);                            \
        a0 = _mm512_add_pd(a0, v0);                                       \
        a1 = _mm512_add_pd(a1, v1);                                       \
        c0 = _mm512_add_pd(c0, _mm512_mul_pd(v0, _mm512_sub_pd(z0, m0))); \
        c1 = _mm512_add_pd(c1, _mm512_mul_pd(v1, _mm512_sub_pd(z1, m1))); \
    } while (0)
    BN_X_ROWS_SWEEP(BN_X_ROW_SUMS, c, c0, c1);
#undef BN_X_ROW_SUMS
}
/* The wide rows' moments (bn_rows_centered_block) likewise: a[j] += x - mb[j],
 * b[j] += (x - mb[j])^2, two rows at a time (a[j] + e + f, b[j] + e*e + f*f) */
BN_X_INLINE void bn_x_rows_moments_avx512(
    const void *restrict x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t n,
    const double *restrict mb, double *restrict a, double *restrict b, const int half)
{
    __m512d e0, e1, m0, m1, a0, a1, b0, b1;
    Py_ssize_t r, k;
/* row rr's sixteen columns at k added into a0, a1 and b0, b1 */
#define BN_X_ROW_MOMENTS(rr)                           \
    do {                                               \
        BN_X_WIDEN16(x, (rr) * sx, t, e0, e1);         \
        e0 = _mm512_sub_pd(e0, m0);                    \
        e1 = _mm512_sub_pd(e1, m1);                    \
        a0 = _mm512_add_pd(a0, e0);                    \
        a1 = _mm512_add_pd(a1, e1);                    \
        b0 = _mm512_add_pd(b0, _mm512_mul_pd(e0, e0)); \
        b1 = _mm512_add_pd(b1, _mm512_mul_pd(e1, e1)); \
    } while (0)
    BN_X_ROWS_SWEEP(BN_X_ROW_MOMENTS, b, b0, b1);
#undef BN_X_ROW_MOMENTS
}
/* the typed entry points of bn_x_NAME_avx512: bn_h_NAME (float16) and bn_f_NAME (float32) */
#define BN_X_ENTRY(NAME, PFX, HALF, PARAMS, ...) \
    BN_X_TARGET_AVX512 static void PFX##NAME PARAMS { bn_x_##NAME##_avx512(__VA_ARGS__, HALF); }
#define BN_X_SUMS_PARAMS                                                                           \
    (const void *restrict z, const void *restrict dy, Py_ssize_t n, double m, double *restrict s1, \
     double *restrict s2)
#define BN_X_MOMENTS_PARAMS \
    (const void *restrict x, Py_ssize_t n, double m0, double *restrict s1, double *restrict s2)
BN_X_ENTRY(sums, bn_h_, 1, BN_X_SUMS_PARAMS, z, dy, n, m, s1, s2)
BN_X_ENTRY(sums, bn_f_, 0, BN_X_SUMS_PARAMS, z, dy, n, m, s1, s2)
BN_X_ENTRY(moments, bn_h_, 1, BN_X_MOMENTS_PARAMS, x, n, m0, s1, s2)
BN_X_ENTRY(moments, bn_f_, 0, BN_X_MOMENTS_PARAMS, x, n, m0, s1, s2)
BN_X_ENTRY(
    rows_sums, bn_h_, 1,
    (const void *restrict z, const void *restrict dy, Py_ssize_t sz, Py_ssize_t sdy,
     Py_ssize_t nrows, Py_ssize_t n, const double *restrict mb, double *restrict a,
     double *restrict c),
    z, dy, sz, sdy, nrows, n, mb, a, c)
BN_X_ENTRY(
    rows_moments, bn_h_, 1,
    (const void *restrict x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t n,
     const double *restrict mb, double *restrict a, double *restrict b),
    x, sx, nrows, n, mb, a, b)
#undef BN_X_ENTRY
#undef BN_X_SUMS_PARAMS
#undef BN_X_MOMENTS_PARAMS
#undef BN_X_ACC_LOAD
#undef BN_X_ROWS_STEP
#undef BN_X_ROWS_SWEEP
#undef BN_X_ACC_STORE
#undef BN_X_COLS_MASKS
#undef BN_X_WIDEN16
#undef BN_X_WIDEN8
#undef BN_X_INLINE
#undef BN_X_TARGET_AVX512
#endif
_Static_assert(BN_LANES == 16, "the sums and moments in AVX-512 keep sixteen lanes");

/* The float16 planar runs' sums with F16C (AVX2 CPUs), likewise without staging: the same
 * lanes and operations in four vectors of four doubles (lanes 4q..4q+3); the tail widened
 * from a copy padded with zeros and blended in where its lanes hold elements, so that lanes
 * past the run add nothing.  The moments keep the staged loop: four at a time, they
 * measured slower (docs/performance.md). */
#ifdef BN_HAVE_F16C
#define BN_X_TARGET_F16C __attribute__((target("avx2,f16c")))
/* the four float16 at p as four doubles */
#define BN_X_WIDEN4(p) _mm256_cvtps_pd(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(p))))
/* lanes 4q..4q+3 of a tail of rest elements: all ones where they hold one, else 0 */
#define BN_X_LANES4(q, rest)                \
    _mm256_castsi256_pd(_mm256_cmpgt_epi64( \
        _mm256_set1_epi64x(rest),           \
        _mm256_setr_epi64x(4 * (q), 4 * (q) + 1, 4 * (q) + 2, 4 * (q) + 3)))
BN_X_TARGET_F16C static void bn_h_sums_f16c(
    const uint16_t *restrict z, const uint16_t *restrict dy, Py_ssize_t n, double m,
    double *restrict s1, double *restrict s2)
{
    const __m256d vm = _mm256_set1_pd(m);
    double a[BN_LANES], b[BN_LANES];
    __m256d va[4], vb[4];
    Py_ssize_t k = 0, j;
    int q;
    for (q = 0; q < 4; q++)
        va[q] = vb[q] = _mm256_setzero_pd();
    for (; k + 16 <= n; k += 16)
        for (q = 0; q < 4; q++) {
            const __m256d v = BN_X_WIDEN4(dy + k + 4 * q), d = BN_X_WIDEN4(z + k + 4 * q);
            va[q] = _mm256_add_pd(va[q], v);
            vb[q] = _mm256_add_pd(vb[q], _mm256_mul_pd(v, _mm256_sub_pd(d, vm)));
        }
    if (k < n) {
        uint16_t zt[16] = {0}, dyt[16] = {0};
        for (j = 0; j < n - k; j++) {
            zt[j] = z[k + j];
            dyt[j] = dy[k + j];
        }
        for (q = 0; q < 4; q++) {
            const __m256d t = BN_X_LANES4(q, n - k), v = BN_X_WIDEN4(dyt + 4 * q),
                          d = BN_X_WIDEN4(zt + 4 * q);
            va[q] = _mm256_blendv_pd(va[q], _mm256_add_pd(va[q], v), t);
            vb[q] = _mm256_blendv_pd(
                vb[q], _mm256_add_pd(vb[q], _mm256_mul_pd(v, _mm256_sub_pd(d, vm))), t);
        }
    }
    for (q = 0; q < 4; q++) {
        _mm256_storeu_pd(a + 4 * q, va[q]);
        _mm256_storeu_pd(b + 4 * q, vb[q]);
    }
    *s1 += bn_tree(a);
    *s2 += bn_tree(b);
}
#undef BN_X_TARGET_F16C
#undef BN_X_WIDEN4
#undef BN_X_LANES4
#endif

/* Run the loops above where the code in use (bn_f16_kind) has them and return 1: with
 * AVX-512 for float16 (half) or float32 planar runs and float16 wide rows, with F16C for
 * float16 planar sums; else return 0, and the caller takes its own loop */
#ifdef BN_HAVE_F16C
#define BN_X_RUN(CALL)                      \
    do {                                    \
        if (bn_f16_kind == BN_F16_AVX512) { \
            CALL;                           \
            return 1;                       \
        }                                   \
    } while (0)
#define BN_X_RUN_F16C(CALL)                       \
    do {                                          \
        if (half && bn_f16_kind == BN_F16_F16C) { \
            CALL;                                 \
            return 1;                             \
        }                                         \
    } while (0)
#else
#define BN_X_RUN(CALL) (void)0
#define BN_X_RUN_F16C(CALL) (void)0
#endif
static inline __attribute__((always_inline)) int bn_sums_direct(
    const void *restrict z, const void *restrict dy, Py_ssize_t n, double m, double *restrict s1,
    double *restrict s2, const int half)
{
    BN_X_RUN(half ? bn_h_sums(z, dy, n, m, s1, s2) : bn_f_sums(z, dy, n, m, s1, s2));
    BN_X_RUN_F16C(bn_h_sums_f16c(z, dy, n, m, s1, s2));
    (void)z, (void)dy, (void)n, (void)m, (void)s1, (void)s2, (void)half;
    return 0;
}

static inline __attribute__((always_inline)) int bn_moments_direct(
    const void *restrict x, Py_ssize_t n, double m0, double *restrict s1, double *restrict s2,
    const int half)
{
    BN_X_RUN(half ? bn_h_moments(x, n, m0, s1, s2) : bn_f_moments(x, n, m0, s1, s2));
    (void)x, (void)n, (void)m0, (void)s1, (void)s2, (void)half;
    return 0;
}

static inline __attribute__((always_inline)) int bn_h_rows_sums_direct(
    const uint16_t *restrict z, const uint16_t *restrict dy, Py_ssize_t sz, Py_ssize_t sdy,
    Py_ssize_t nrows, Py_ssize_t n, const double *restrict mb, double *restrict a,
    double *restrict c)
{
    BN_X_RUN(bn_h_rows_sums(z, dy, sz, sdy, nrows, n, mb, a, c));
    (void)z, (void)dy, (void)sz, (void)sdy, (void)nrows, (void)n, (void)mb, (void)a, (void)c;
    return 0;
}

static inline __attribute__((always_inline)) int bn_h_rows_moments_direct(
    const uint16_t *restrict x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t n,
    const double *restrict mb, double *restrict a, double *restrict b)
{
    BN_X_RUN(bn_h_rows_moments(x, sx, nrows, n, mb, a, b));
    (void)x, (void)sx, (void)nrows, (void)n, (void)mb, (void)a, (void)b;
    return 0;
}
#undef BN_X_RUN
#undef BN_X_RUN_F16C

/* The float16 conversions of `kind` (BN_F16_*), or the best below it that the CPU has;
 * returns the kind in use */
static int bn_f16_code(int kind)
{
    bn_f16_kind = BN_F16_INTEGER;
#ifdef BN_HAVE_F16C
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c") || !__builtin_cpu_supports("avx2") ||
        !__builtin_cpu_supports("fma"))
        return bn_f16_kind;
    if (kind >= BN_F16_AVX512 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        bn_f16_kind = BN_F16_AVX512;
    else if (kind >= BN_F16_F16C)
        bn_f16_kind = BN_F16_F16C;
#endif
    (void)kind;
    return bn_f16_kind;
}

/* element i of an array of itemsize isz (2, 4 or 8) as a double; and a double rounded into
 * one: for the per-channel scalars the schedule reads and writes */
static inline double bn_load(const void *p, Py_ssize_t i, Py_ssize_t isz)
{
    return isz == 2 ? bn_h2d(((const uint16_t *)p)[i])
                    : (isz == 4 ? (double)((const float *)p)[i] : ((const double *)p)[i]);
}

static inline void bn_store(void *p, Py_ssize_t i, Py_ssize_t isz, double v)
{
    if (isz == 2)
        ((uint16_t *)p)[i] = bn_d2h(v);
    else if (isz == 4)
        ((float *)p)[i] = (float)v;
    else
        ((double *)p)[i] = v;
}

/* Eight doubles as one vector, in GCC's generic vectors (one AVX-512 register, two AVX2
 * or four SSE2 ones): the same IEEE operations, element by element, as the scalar code.
 * Only ever locals, never passed by value (that would change the baseline build's ABI).
 * BN_V8D(p): the eight doubles from p (unaligned). */
typedef double bn_v8d __attribute__((vector_size(64)));
typedef double bn_v8d_u __attribute__((vector_size(64), aligned(8), may_alias));
#define BN_V8D(p) (*(const bn_v8d_u *)(p))

#define BN_T float
#define BN_FN(name) name##_f
#define BN_LD(v) ((double)(v))
#define BN_ST(d) ((float)(d))
#include "_loops.h"
#undef BN_T
#undef BN_FN

#define BN_T double
#define BN_FN(name) name##_d
#undef BN_ST
#define BN_ST(d) (d)
#define BN_F64
#include "_loops.h"
#undef BN_F64
#undef BN_T
#undef BN_FN
#undef BN_LD
#undef BN_ST

#define BN_T uint16_t
#define BN_FN(name) name##_h
#define BN_LD(v) bn_h2d(v)
#define BN_ST(d) bn_d2h(d)
#define BN_F16
#include "_loops.h"
#undef BN_F16
#undef BN_T
#undef BN_FN
#undef BN_LD
#undef BN_ST

#endif /* BN_KERNELS_H */
