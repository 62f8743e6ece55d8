/* The float16 forward's output sweep over NCHW planes, per core, in the forms its float
 * arithmetic could take (AVX-512 with F16C and FMA, the kernels' conversions):
 *
 *   two-float mean  s*((z - m) - ml) + c: the mean as two floats, four operations
 *   sub,mul,add     s*(z - m) + c, the low part's term in c: three
 *   sub,fma         fma(s, z - m, c): two, the kernels' form (design.md, "float16")
 *   sub,fma 256     the same in 256-bit vectors (AVX-512VL masks for the tails)
 *   fma             fma(s, z, c), c = beta - s*mean: PyTorch's, no componentwise bound
 *   convert only    z widened and rounded back: the conversions, loads and stores alone
 *
 * over N images of C planes of L elements (one channel's coefficients per plane), one
 * thread, the median and the best of `reps` timings, each form in turn.  Speed only: the
 * values are not checked.  Build and run from the source tree:
 *
 *   gcc -O2 -ffp-contract=off scripts/f16_sweep.c -o /tmp/f16_sweep && \
 *       /tmp/f16_sweep 64 256 196 300
 *
 * (arguments: N C L reps; 64 256 196 is nchw-64x256x14x14, 6.1 MiB in and out) */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static long N, C, L;

#define TARGET __attribute__((target("avx512f,avx512bw,avx512vl,f16c,fma"), noinline))
#define ARGS                                                                           \
    const uint16_t *restrict z, uint16_t *restrict o, const float *m, const float *ml, \
        const float *s, const float *c
/* the planes with 16-wide vectors and a masked tail, v := EXPR of the widened v */
#define PLANES16(EXPR)                                                                 \
    for (long p = 0; p < N * C; p++) {                                                 \
        const long ch = p % C;                                                         \
        const uint16_t *zp = z + p * L;                                                \
        uint16_t *op = o + p * L;                                                      \
        const __m512 vm = _mm512_set1_ps(m[ch]), vml = _mm512_set1_ps(ml[ch]),         \
                     vs = _mm512_set1_ps(s[ch]), vc = _mm512_set1_ps(c[ch]);           \
        long k = 0;                                                                    \
        for (; k + 16 <= L; k += 16) {                                                 \
            __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(zp + k))); \
            v = EXPR;                                                                  \
            _mm256_storeu_si256((__m256i *)(op + k), _mm512_cvtps_ph(v, 0));           \
        }                                                                              \
        if (k < L) {                                                                   \
            const __mmask16 t = (__mmask16)((1u << (L - k)) - 1u);                     \
            __m512 v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(t, zp + k));           \
            v = EXPR;                                                                  \
            _mm256_mask_storeu_epi16(op + k, t, _mm512_cvtps_ph(v, 0));                \
        }                                                                              \
        (void)vm, (void)vml, (void)vs, (void)vc;                                       \
    }

TARGET static void two_float(ARGS){
    PLANES16(_mm512_add_ps(_mm512_mul_ps(vs, _mm512_sub_ps(_mm512_sub_ps(v, vm), vml)), vc))} TARGET
    static void sub_mul_add(ARGS){
        PLANES16(_mm512_add_ps(_mm512_mul_ps(vs, _mm512_sub_ps(v, vm)), vc))} TARGET
    static void sub_fma(ARGS){PLANES16(_mm512_fmadd_ps(vs, _mm512_sub_ps(v, vm), vc))} TARGET
    static void fma_only(ARGS){PLANES16(_mm512_fmadd_ps(vs, v, vc))} TARGET
    static void convert_only(ARGS){PLANES16(v)} TARGET static void sub_fma_256(ARGS)
{
    for (long p = 0; p < N * C; p++) {
        const long ch = p % C;
        const uint16_t *zp = z + p * L;
        uint16_t *op = o + p * L;
        const __m256 vm = _mm256_set1_ps(m[ch]), vs = _mm256_set1_ps(s[ch]),
                     vc = _mm256_set1_ps(c[ch]);
        long k = 0;
        for (; k + 8 <= L; k += 8) {
            __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zp + k)));
            v = _mm256_fmadd_ps(vs, _mm256_sub_ps(v, vm), vc);
            _mm_storeu_si128((__m128i *)(op + k), _mm256_cvtps_ph(v, 0));
        }
        if (k < L) {
            const __mmask8 t = (__mmask8)((1u << (L - k)) - 1u);
            __m256 v = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(t, zp + k));
            v = _mm256_fmadd_ps(vs, _mm256_sub_ps(v, vm), vc);
            _mm_mask_storeu_epi16(op + k, t, _mm256_cvtps_ph(v, 0));
        }
    }
    (void)ml;
}

static int by_value(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    typedef void (*form)(ARGS);
    static const form forms[] = {two_float,   sub_mul_add, sub_fma,
                                 sub_fma_256, fma_only,    convert_only};
    static const char *names[] = {"two-float mean", "sub,mul,add", "sub,fma",
                                  "sub,fma 256",    "fma",         "convert only"};
    const int nf = sizeof(forms) / sizeof(forms[0]);
    if (argc != 5) {
        fprintf(stderr, "usage: %s N C L reps\n", argv[0]);
        return 2;
    }
    N = atol(argv[1]), C = atol(argv[2]), L = atol(argv[3]);
    const int reps = atoi(argv[4]);
    if (N < 1 || C < 1 || L < 1 || reps < 1) {
        fprintf(stderr, "N, C, L and reps must be positive\n");
        return 2;
    }
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("fma")) {
        fprintf(stderr, "needs AVX-512 (F, BW, VL) and FMA\n");
        return 1;
    }
    const size_t E = (size_t)N * C * L;
    /* NumPy's placement of large arrays: 16 bytes past a page */
    char *zb = aligned_alloc(4096, E * 2 + 4096), *ob = aligned_alloc(4096, E * 2 + 4096);
    float *m = malloc(C * sizeof(float)), *ml = malloc(C * sizeof(float));
    float *s = malloc(C * sizeof(float)), *c = malloc(C * sizeof(float));
    double *t = malloc((size_t)nf * reps * sizeof(double));
    if (!zb || !ob || !m || !ml || !s || !c || !t) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    uint16_t *z = (uint16_t *)(zb + 16), *o = (uint16_t *)(ob + 16);
    srand(1);
    for (size_t i = 0; i < E; i++) /* float16 values in [0.5, 2) and their negatives */
        z[i] = (uint16_t)(0x3800 + rand() % 0x800) | (uint16_t)((rand() & 1) << 15);
    memset(o, 0, E * 2);
    for (long k = 0; k < C; k++)
        m[k] = 0.01f * (float)k, ml[k] = 1e-9f, s[k] = 1.5f, c[k] = 0.25f;
    for (int r = 0; r < reps; r++)
        for (int f = 0; f < nf; f++) {
            const double t0 = now();
            forms[f](z, o, m, ml, s, c);
            t[f * reps + r] = now() - t0;
        }
    printf(
        "%ld x %ld planes of %ld float16, one thread, %d timings each, in turns\n", N, C, L, reps);
    for (int f = 0; f < nf; f++) {
        qsort(t + f * reps, reps, sizeof(double), by_value);
        printf(
            "%-16s median %.3f ms, best %.3f ms\n", names[f], 1e3 * t[f * reps + reps / 2],
            1e3 * t[f * reps]);
    }
    return 0;
}
