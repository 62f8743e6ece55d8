/* Whether the kernels' float64 arithmetic overlaps the memory traffic of float32 data that
 * does not fit the caches: each sweep of the rows layout alone, timed against the traffic it
 * moves and against its arithmetic on data in the caches.
 *
 *   read          read x and dy (float32 sums: the least work per element)
 *   sums          the kernels' backward sums (bn_rows_sums_f): float64 sums of dy and
 *                 dy*(x - m), chunk by chunk as the chunked plan's first sweep
 *   add           out := x + dy: the benchmark's roofline pass
 *   output        the kernels' backward output (bn_rows_affine_f): float64 arithmetic,
 *                 rounded once into float32, chunk by chunk
 *   sums cached   the sums over as many rows, but rows that stay in L2 (the first rows of
 *                 the thread's first chunk, again and again: the arithmetic alone)
 *   output cached the same for the output
 *
 * R rows of C float32 columns per array, outputs into pages already mapped (no faults), on
 * one thread and on two (each taking its half of the chunks); chunks of `chunk` rows, the
 * kernels' 1 MiB of inputs by default.  The sweeps take turns; each gets the median of
 * `reps`.  If the arithmetic overlapped the traffic, a sweep would take the larger of its
 * traffic (read, add) and its arithmetic (cached); where it takes their sum, the core's
 * loop waits for memory as it computes.  Speed only.  Build and run from the source tree:
 *
 *   gcc -O3 -ffp-contract=off -fno-trapping-math -fopenmp -Ibnkernels scripts/overlap.c \
 *       -o /tmp/overlap -lm && /tmp/overlap 8192 2048 11
 *
 * (arguments: R C repetitions [chunk rows]) */
#include "_kernels.h"
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

enum { READ, SUMS, ADD, OUTPUT, SUMS_CACHED, OUTPUT_CACHED, N_SWEEPS };
static const char *names[N_SWEEPS] = {"read",   "sums",        "add",
                                      "output", "sums cached", "output cached"};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

/* an array of n floats in fresh pages advised huge, as NumPy's, written once */
static float *array(long n, float step)
{
    float *p =
        mmap(NULL, n * sizeof(float), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    long i;
    if (p == MAP_FAILED)
        exit(1);
    madvise(p, n * sizeof(float), MADV_HUGEPAGE);
    for (i = 0; i < n; i++)
        p[i] = (float)(i % 13) * step;
    return p;
}

/* the float32 sum of x and dy over [lo, hi): sixteen lanes, which GCC vectorizes */
static float read_run(const float *restrict x, const float *restrict dy, long lo, long hi)
{
    float acc[16] = {0.0f};
    long i;
    int k;
    for (i = lo; i + 16 <= hi; i += 16)
        for (k = 0; k < 16; k++)
            acc[k] += x[i + k] + dy[i + k];
    for (k = 1; k < 16; k++)
        acc[0] += acc[k];
    return acc[0];
}

int main(int argc, char **argv)
{
    long R = argc > 1 ? atol(argv[1]) : 8192, C = argc > 2 ? atol(argv[2]) : 2048;
    int reps = argc > 3 ? atoi(argv[3]) : 11, nt, k, r;
    long chunk = argc > 4 ? atol(argv[4]) : (1L << 20) / (8 * C);
    long small = (128L << 10) / (12 * C) > 0 ? (128L << 10) / (12 * C) : 1;
    float *x, *dy, *out;
    double *m, *S, *A, *Cc, *t, med[2][N_SWEEPS];
    volatile float sink = 0.0f;
    if (R < 1 || C < 1 || reps < 1 || chunk < 1 || chunk > R) {
        fprintf(stderr, "usage: overlap R C reps [chunk rows]\n");
        return 2;
    }
    x = array(R * C, 0.1f);
    dy = array(R * C, 0.3f);
    out = array(R * C, 0.0f);
    m = malloc(4 * C * sizeof(double));
    t = malloc(N_SWEEPS * reps * sizeof(double));
    if (!m || !t)
        return 1;
    S = m + C;
    A = S + C;
    Cc = A + C;
    for (k = 0; k < C; k++) {
        m[k] = 0.5;
        S[k] = 0.3;
        A[k] = 1.1;
        Cc[k] = -0.2;
    }
    for (nt = 1; nt <= 2; nt++) {
        for (r = 0; r < reps; r++)
            for (k = 0; k < N_SWEEPS; k++) {
                double t0 = now();
#pragma omp parallel num_threads(nt)
                {
                    int tid = omp_get_thread_num();
                    long n_chunks = (R + chunk - 1) / chunk;
                    long c0 = n_chunks * tid / nt, c1 = n_chunks * (tid + 1) / nt, ci, r0, nr;
                    double *sums = malloc(2 * C * sizeof(double));
                    float acc = 0.0f;
                    const int cached = k == SUMS_CACHED || k == OUTPUT_CACHED;
                    for (ci = c0; ci < c1 && sums; ci++) {
                        long done, b;
                        nr = R - ci * chunk < chunk ? R - ci * chunk : chunk;
                        /* the cached sweeps take as many rows, but from the start of their
                         * thread's first chunk every time, in blocks that keep all three
                         * arrays within 128 KiB, in L2 */
                        r0 = (cached ? c0 : ci) * chunk;
                        for (done = 0; done < nr; done += b) {
                            b = cached ? (nr - done < small ? nr - done : small) : nr;
                            if (k == READ)
                                acc += read_run(x, dy, r0 * C, (r0 + b) * C);
                            else if (k == SUMS || k == SUMS_CACHED)
                                bn_rows_sums_f(
                                    x + r0 * C, dy + r0 * C, NULL, C, C, 0, b, C, m, sums,
                                    sums + C);
                            else if (k == ADD)
                                for (long i = r0 * C; i < (r0 + b) * C; i++)
                                    out[i] = x[i] + dy[i];
                            else
                                bn_rows_affine_f(
                                    x + r0 * C, dy + r0 * C, out + r0 * C, C, C, C, b, C, m, S, A,
                                    Cc, 0, NULL);
                        }
                    }
                    if (sums && (k == SUMS || k == SUMS_CACHED) && c1 > c0)
                        acc += (float)sums[0];
                    free(sums);
#pragma omp atomic
                    sink += acc;
                }
                t[k * reps + r] = now() - t0;
            }
        for (k = 0; k < N_SWEEPS; k++) {
            qsort(t + k * reps, reps, sizeof(double), cmp);
            med[nt - 1][k] = t[k * reps + reps / 2];
        }
    }
    printf("%ld x %ld float32, chunks of %ld rows, median of %d (ms)\n", R, C, chunk, reps);
    printf("%-16s %10s %10s\n", "", "1 thread", "2 threads");
    for (k = 0; k < N_SWEEPS; k++)
        printf("%-16s %10.3f %10.3f\n", names[k], 1e3 * med[0][k], 1e3 * med[1][k]);
    for (nt = 0; nt < 2; nt++)
        printf(
            "%d thread%s: sums %.2f of read + sums cached, %.2f of the larger; output %.2f of "
            "add + output cached, %.2f of the larger\n",
            nt + 1, nt ? "s" : "", med[nt][SUMS] / (med[nt][READ] + med[nt][SUMS_CACHED]),
            med[nt][SUMS] /
                (med[nt][READ] > med[nt][SUMS_CACHED] ? med[nt][READ] : med[nt][SUMS_CACHED]),
            med[nt][OUTPUT] / (med[nt][ADD] + med[nt][OUTPUT_CACHED]),
            med[nt][OUTPUT] /
                (med[nt][ADD] > med[nt][OUTPUT_CACHED] ? med[nt][ADD] : med[nt][OUTPUT_CACHED]));
    return 0;
}
