/* The float32 output sweep of the rows layout, per element and per core, in float64
 * arithmetic (the kernels' loop, from _loops.h) against two float32-arithmetic forms:
 *
 *   float32-2ulp  the output from the mean and the scale each split into two floats and fused
 *                 multiply-adds: e = (x - mh) - ml; out = fma(Sh, e, fma(Sl, e, beta)), and
 *                 likewise dx with a split a; about three roundings of |S*(x - mean)| plus two
 *                 of |beta|, the componentwise bound a float32 kernel can meet
 *   float32-axb   out = a*x + b, dx = a*dy + b*x + c: the fewest operations, no such bound
 *                 (a*x and b cancel for data with large offsets)
 *
 * over R rows of C float32 columns that stay in the caches, one thread, best of 7 timings.
 * Speed only: the values are not checked.  Build and run from the source tree:
 *
 *   gcc -O3 -ffp-contract=off -fno-trapping-math -fopenmp -Ibnkernels scripts/write_sweep.c \
 *       -o /tmp/write_sweep -lm && /tmp/write_sweep 256 256 2000 1024 1024 200
 *
 * (arguments: R C repetitions, one triple per size) */
#include "_kernels.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* forward (dy NULL) or backward output in float32 with split coefficients (see above) */
static BN_CLONES void sweep_2ulp(
    const float *restrict z, const float *restrict dy, float *restrict out, Py_ssize_t nrows,
    Py_ssize_t cw, const float *restrict mh, const float *restrict ml, const float *restrict Sh,
    const float *restrict Sl, const float *restrict K, const float *restrict Ah,
    const float *restrict Al)
{
    for (Py_ssize_t r = 0; r < nrows; r++) {
        const float *restrict zr = z + r * cw;
        float *restrict outr = out + r * cw;
        if (dy == NULL) {
            BN_SIMD
            for (Py_ssize_t j = 0; j < cw; j++) {
                const float e = (zr[j] - mh[j]) - ml[j];
                outr[j] = fmaf(Sh[j], e, fmaf(Sl[j], e, K[j]));
            }
        } else {
            const float *restrict dyr = dy + r * cw;
            BN_SIMD
            for (Py_ssize_t j = 0; j < cw; j++) {
                const float e = (zr[j] - mh[j]) - ml[j];
                const float t = fmaf(Sh[j], e, fmaf(Sl[j], e, K[j]));
                outr[j] = fmaf(Ah[j], dyr[j], fmaf(Al[j], dyr[j], t));
            }
        }
    }
}

static BN_CLONES void sweep_axb(
    const float *restrict z, const float *restrict dy, float *restrict out, Py_ssize_t nrows,
    Py_ssize_t cw, const float *restrict a, const float *restrict b, const float *restrict c)
{
    for (Py_ssize_t r = 0; r < nrows; r++) {
        const float *restrict zr = z + r * cw;
        float *restrict outr = out + r * cw;
        if (dy == NULL) {
            BN_SIMD
            for (Py_ssize_t j = 0; j < cw; j++)
                outr[j] = a[j] * zr[j] + b[j];
        } else {
            const float *restrict dyr = dy + r * cw;
            BN_SIMD
            for (Py_ssize_t j = 0; j < cw; j++)
                outr[j] = a[j] * dyr[j] + b[j] * zr[j] + c[j];
        }
    }
}

static void run(Py_ssize_t R, Py_ssize_t C, int reps)
{
    float *z = malloc(R * C * sizeof(float)), *dy = malloc(R * C * sizeof(float));
    float *out = malloc(R * C * sizeof(float));
    double *d[4];
    float *f[7];
    for (int i = 0; i < 4; i++) {
        d[i] = malloc(C * sizeof(double));
        for (Py_ssize_t j = 0; j < C; j++)
            d[i][j] = 0.5 + 0.01 * i + 1e-3 * j;
    }
    for (int i = 0; i < 7; i++) {
        f[i] = malloc(C * sizeof(float));
        for (Py_ssize_t j = 0; j < C; j++)
            f[i][j] = (float)d[i % 4][j];
    }
    for (Py_ssize_t k = 0; k < R * C; k++) {
        z[k] = (float)(k % 97) * 0.01f;
        dy[k] = (float)(k % 89) * 0.01f;
    }
    static const char *names[3] = {"float64", "float32-2ulp", "float32-axb"};
    for (int pass = 0; pass < 2; pass++) {
        const float *g = pass ? dy : NULL;
        printf("R=%-6ld C=%-6ld %-8s", (long)R, (long)C, pass ? "backward" : "forward");
        for (int v = 0; v < 3; v++) {
            double best = 1e30;
            for (int t = 0; t < 7; t++) {
                const double t0 = now();
                for (int i = 0; i < reps; i++) {
                    if (v == 0)
                        bn_loops_f.rows_affine(
                            z, g, out, C, C, C, R, C, d[0], d[1], d[2], d[3], 0, NULL);
                    else if (v == 1)
                        sweep_2ulp(z, g, out, R, C, f[0], f[1], f[2], f[3], f[4], f[5], f[6]);
                    else
                        sweep_axb(z, g, out, R, C, f[0], f[1], f[2]);
                }
                const double dt = (now() - t0) / reps;
                best = dt < best ? dt : best;
            }
            printf("  %s %.3f", names[v], best / (double)(R * C) * 1e9);
        }
        printf("  ns/element\n");
    }
    for (int i = 0; i < 4; i++)
        free(d[i]);
    for (int i = 0; i < 7; i++)
        free(f[i]);
    free(z);
    free(dy);
    free(out);
}

int main(int argc, char **argv)
{
    if (argc < 4 || (argc - 1) % 3 != 0) {
        fprintf(stderr, "usage: %s R C REPS [R C REPS ...]\n", argv[0]);
        return 2;
    }
    for (int a = 1; a + 2 < argc; a += 3)
        run(atol(argv[a]), atol(argv[a + 1]), atoi(argv[a + 2]));
    return 0;
}
