/* What the float64 sums cost per element and per core: the kernels' planar run reductions
 * (from _loops.h: the backward's sum dy and sum dy*(z - m), the forward's moments) over
 * float16, float32 and float64 data that stay in the caches, against the same sums kept in
 * float accumulators (16 lanes, as a float32-arithmetic kernel would keep them), one
 * thread, best of 7 timings.  Speed only: the values are not checked.  Build and run from
 * the source tree:
 *
 *   gcc -O3 -ffp-contract=off -fno-trapping-math -fopenmp -Ibnkernels scripts/sums_rate.c \
 *       -o /tmp/sums_rate -lm && /tmp/sums_rate 16384 20000
 *
 * (arguments: elements of one channel's run, repetitions) */
#include "_kernels.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* sum dy and sum dy*(z - m) in float lanes, then float64 */
static BN_CLONES void sums_float(
    const float *restrict z, const float *restrict dy, Py_ssize_t n, float m, double *s_dy,
    double *s_zm)
{
    float a[16] = {0.0f}, b[16] = {0.0f};
    Py_ssize_t i, j;
    for (i = 0; i + 16 <= n; i += 16) {
        BN_SIMD
        for (j = 0; j < 16; j++) {
            a[j] += dy[i + j];
            b[j] += dy[i + j] * (z[i + j] - m);
        }
    }
    for (j = 0; j < 16; j++) {
        *s_dy += a[j];
        *s_zm += b[j];
    }
}

static double best(double *t)
{
    double b = t[0];
    for (int k = 1; k < 7; k++)
        b = t[k] < b ? t[k] : b;
    return b;
}

#define TIME(EXPR)                                         \
    do {                                                   \
        for (int k = 0; k < 7; k++) {                      \
            double t0 = now();                             \
            for (long r = 0; r < reps; r++) {              \
                EXPR;                                      \
            }                                              \
            ts[k] = (now() - t0) / reps / (double)n * 1e9; \
        }                                                  \
    } while (0)

int main(int argc, char **argv)
{
    const Py_ssize_t n = argc > 1 ? atol(argv[1]) : 16384;
    const long reps = argc > 2 ? atol(argv[2]) : 20000;
    uint16_t *zh = malloc(n * 2), *dyh = malloc(n * 2);
    float *zf = malloc(n * 4), *dyf = malloc(n * 4);
    double *zd = malloc(n * 8), *dyd = malloc(n * 8), ts[7], s1 = 0.0, s2 = 0.0, m = 0.25, d1;
    bn_f16_code(BN_F16_AVX512);
    for (Py_ssize_t i = 0; i < n; i++) {
        zf[i] = (float)((i * 7919 % 1000) / 500.0 - 1.0);
        dyf[i] = (float)((i * 104729 % 1000) / 500.0 - 1.0);
        zd[i] = zf[i];
        dyd[i] = dyf[i];
        zh[i] = bn_d2h(zf[i]);
        dyh[i] = bn_d2h(dyf[i]);
    }
    printf(
        "%s; float16 code %d; %ld elements, ns per element, one thread\n", bn_simd_targets,
        bn_f16_kind, (long)n);
    TIME(bn_loops_h.plane_sums(zh, dyh, NULL, 0, 0, 0, 0, 0, 0, n, 0, n, 1, &m, &s1, &s2));
    printf("float64 sums, float16 data    %.3f\n", best(ts));
    TIME(bn_loops_f.plane_sums(zf, dyf, NULL, 0, 0, 0, 0, 0, 0, n, 0, n, 1, &m, &s1, &s2));
    printf("float64 sums, float32 data    %.3f\n", best(ts));
    TIME(bn_loops_d.plane_sums(zd, dyd, NULL, 0, 0, 0, 0, 0, 0, n, 0, n, 1, &m, &s1, &s2));
    printf("float64 sums, float64 data    %.3f\n", best(ts));
    TIME(sums_float(zf, dyf, n, 0.25f, &s1, &s2));
    printf("float sums, float32 data      %.3f\n", best(ts));
    TIME(bn_loops_h.plane_moments(zh, 0, 0, n, 0, n, 1, &s1, &s2, &d1));
    printf("float64 moments, float16 data %.3f\n", best(ts));
    TIME(bn_loops_f.plane_moments(zf, 0, 0, n, 0, n, 1, &s1, &s2, &d1));
    printf("float64 moments, float32 data %.3f\n", best(ts));
    printf("(checksum %g)\n", s1 + s2);
    return 0;
}
