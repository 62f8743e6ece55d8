/* The C side of the batch-norm kernels, included by _kernels.pyx.
 *
 * It instantiates the inner loops of _loops.h for float and double and gathers each
 * dtype's loops in one table (bn_loops_f, bn_loops_d), so that the schedule and its task
 * functions in _kernels.pyx are written once for both dtypes.  A C program (a test or a
 * timing harness) can include it alone: without Python.h, Py_ssize_t is ptrdiff_t.
 */
#ifndef BN_KERNELS_H
#define BN_KERNELS_H

#include <stddef.h>
#include <stdint.h>
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
#define bn_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
#else
#define bn_prefetch(p) ((void)(p))
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

/* One dtype's task-level loops (see _loops.h); data pointers are of that dtype. */
typedef struct {
    void (*rows_sums)(
        const void *z, const void *dy, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t nrows,
        Py_ssize_t cw, const double *m, double *s_dy, double *s_zm);
    void (*rows_centered)(
        const void *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw, const double *m0, double *d1,
        double *d2);
    void (*rows_affine)(
        const void *z, const void *dy, void *out, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout,
        Py_ssize_t nrows, Py_ssize_t cw, const double *m, const double *S, const double *A,
        const double *Cc, int stream);
    void (*plane_sums)(
        const void *z, const void *dy, Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn,
        Py_ssize_t sdyc, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw, const double *m,
        double *s_dy, double *s_zm);
    void (*plane_moments)(
        const void *x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1,
        Py_ssize_t cw, double *mean, double *m2, double *d1);
    void (*plane_affine)(
        const void *z, const void *dy, void *out, Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn,
        Py_ssize_t sdyc, Py_ssize_t soutn, Py_ssize_t soutc, Py_ssize_t L, Py_ssize_t e0,
        Py_ssize_t e1, Py_ssize_t cw, const double *m, const double *S, const double *A,
        const double *Cc, int stream);
} bn_loops;

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

#endif /* BN_KERNELS_H */
