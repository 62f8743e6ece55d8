/* What memory traffic alone costs: the benchmark's rooflines against the least traffic of a
 * batch norm whose data does not fit the caches, which must read its inputs twice (the sums
 * or moments need every element before the first output), on arrays of `MiB` MiB each.
 *
 *   backward roofline   read a, b; write o                   (bench: stream_add(x, dy, out))
 *   backward two reads  read a, b; then read a, b and write o
 *   forward roofline    read a; write o                      (bench: stream_add(x, x, out))
 *   forward two reads   read a; then read a and write o
 *
 * Each pass is timed with plain stores and with streaming stores (which skip reading the
 * output's lines before writing them; the kernels stream float64 outputs of 16 MiB or more),
 * writing either into pages already mapped or, as NumPy's fresh output arrays do, into pages
 * mapped for the call (huge pages advised, as NumPy advises them) and faulted in by its
 * stores.  The second sweep of a two-read pass walks each thread's range backwards in 1 MiB
 * blocks, as the kernels' chunked plans do, so its first blocks may still be cached.  OpenMP
 * threads as OMP_NUM_THREADS says; the configurations take turns, and each gets the median of
 * `reps` timings.  Speed only.  Build and run from the source tree:
 *
 *   gcc -O3 -fopenmp scripts/traffic.c -o /tmp/traffic && /tmp/traffic 64 15
 *
 * (arguments: MiB per array, repetitions) */
#include <emmintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define BLOCK (1L << 17) /* doubles: 1 MiB */

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* [lo, hi) of n for thread t of nt, in whole blocks of 8 doubles */
static void share(long n, int t, int nt, long *lo, long *hi)
{
    long k = n / 8;
    *lo = k * t / nt * 8;
    *hi = k * (t + 1) / nt * 8;
}

/* the sum of a[lo:hi] (+ b[lo:hi] when b): the reading sweep */
static double read_sweep(const double *a, const double *b, long lo, long hi)
{
    double acc[8] = {0};
    long i;
    int k;
    for (i = lo; i < hi; i += 8)
        for (k = 0; k < 8; k++)
            acc[k] += b ? a[i + k] + b[i + k] : a[i + k];
    for (k = 1; k < 8; k++)
        acc[0] += acc[k];
    return acc[0];
}

/* o := a + b (b NULL: a + a) over [lo, hi), plain or streaming stores (o 16-byte aligned) */
static void write_sweep(const double *a, const double *b, double *o, long lo, long hi, int nt_st)
{
    long i;
    if (!b)
        b = a;
    if (nt_st) {
        for (i = lo; i < hi; i += 2)
            _mm_stream_pd(o + i, _mm_add_pd(_mm_loadu_pd(a + i), _mm_loadu_pd(b + i)));
        _mm_sfence();
    } else {
        for (i = lo; i < hi; i++)
            o[i] = a[i] + b[i];
    }
}

/* one pass: two = 0 the roofline, 1 two reads; b NULL: the forward's one input */
static double pass(const double *a, const double *b, double *o, long n, int two, int nt_st)
{
    double sum = 0.0;
    if (two) {
#pragma omp parallel reduction(+ : sum)
        {
            long lo, hi;
            share(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
            sum += read_sweep(a, b, lo, hi);
        }
    }
#pragma omp parallel
    {
        long lo, hi, e;
        share(n, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (two) /* backwards by blocks: the last block read first */
            for (e = hi; e > lo; e -= BLOCK)
                write_sweep(a, b, o, e - BLOCK > lo ? e - BLOCK : lo, e, nt_st);
        else
            write_sweep(a, b, o, lo, hi, nt_st);
    }
    return sum;
}

static int cmp(const void *x, const void *y)
{
    double d = *(const double *)x - *(const double *)y;
    return (d > 0) - (d < 0);
}

int main(int argc, char **argv)
{
    long mib = argc > 1 ? atol(argv[1]) : 64, n, bytes;
    int reps = argc > 2 ? atoi(argv[2]) : 15, r, k, fwd, two, st, fresh;
    double *a, *b, *o, *t, med[2][2][2][2];
    volatile double sink = 0.0; /* keeps the sums */
    const char *pass_name[2][2] = {
        {"backward roofline", "backward two reads"}, {"forward roofline", "forward two reads"}};
    if (mib < 1 || reps < 1) {
        fprintf(stderr, "usage: traffic MiB reps\n");
        return 2;
    }
    bytes = mib << 20;
    n = bytes / 8;
    a = aligned_alloc(64, bytes);
    b = aligned_alloc(64, bytes);
    o = aligned_alloc(64, bytes);
    t = malloc(16 * reps * sizeof(double));
    if (!a || !b || !o || !t)
        return 1;
    memset(a, 0, bytes);
    memset(b, 0, bytes);
    memset(o, 0, bytes);
    /* the configurations take turns, one pass each per round, so that the machine's drift
     * hits them alike */
    for (r = 0; r < reps; r++)
        for (k = 0; k < 16; k++) {
            double *out = o, t0;
            fwd = k >> 3, two = (k >> 2) & 1, st = (k >> 1) & 1, fresh = k & 1;
            if (fresh) {
                out = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (out == MAP_FAILED)
                    return 1;
                madvise(out, bytes, MADV_HUGEPAGE); /* as NumPy does for large arrays */
            }
            t0 = now();
            sink += pass(a, fwd ? NULL : b, out, n, two, st);
            t[k * reps + r] = now() - t0;
            sink += out[n - 1];
            if (fresh)
                munmap(out, bytes);
        }
    for (k = 0; k < 16; k++) {
        qsort(t + k * reps, reps, sizeof(double), cmp);
        med[k >> 3][(k >> 2) & 1][(k >> 1) & 1][k & 1] = t[k * reps + reps / 2];
    }
    printf("%ld MiB per array, %d threads, median of %d (ms)\n", mib, omp_get_max_threads(), reps);
    printf("%-20s %12s %12s %12s %12s\n", "", "plain", "streaming", "plain fresh", "stream fresh");
    for (fwd = 0; fwd < 2; fwd++)
        for (two = 0; two < 2; two++)
            printf(
                "%-20s %12.3f %12.3f %12.3f %12.3f\n", pass_name[fwd][two],
                1e3 * med[fwd][two][0][0], 1e3 * med[fwd][two][1][0], 1e3 * med[fwd][two][0][1],
                1e3 * med[fwd][two][1][1]);
    printf("two reads / roofline (the roofline with plain stores, as the benchmark's):\n");
    for (fwd = 0; fwd < 2; fwd++)
        printf(
            "%-20s plain %.2f  streaming %.2f  plain fresh %.2f  stream fresh %.2f\n",
            fwd ? "forward" : "backward", med[fwd][1][0][0] / med[fwd][0][0][0],
            med[fwd][1][1][0] / med[fwd][0][0][0], med[fwd][1][0][1] / med[fwd][0][0][1],
            med[fwd][1][1][1] / med[fwd][0][0][1]);
    free(a);
    free(b);
    free(o);
    free(t);
    return 0;
}
