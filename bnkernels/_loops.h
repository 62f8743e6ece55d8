/* Innermost loops of the batch-norm kernels, included by _kernels.h once per dtype.
 *
 * Before including, define BN_T (the element's storage type), BN_FN(name) (a suffix per
 * dtype), BN_LD(v) (an element as a double, exactly) and BN_ST(d) (a double rounded to an
 * element, once, to nearest even); BN_F64 for double (its output sweeps can use streaming
 * stores), BN_F16 for float16 (stored as its bits in a uint16_t).
 * The loops are C so they can say what Cython cannot: `restrict` (inputs, outputs and
 * accumulators never alias) and `omp simd` (vectorize this loop).  Reductions over a
 * contiguous run keep BN_LANES independent float64 accumulators, one per vector lane,
 * summed by a fixed tree at the end: the order of every sum is fixed by the code, not by
 * the vector width or the thread count.  BN_CLONES compiles each task-level function for
 * AVX-512, AVX2 and baseline x86-64 and picks one when the module loads; with
 * -ffp-contract=off all of them give bitwise the same results.
 *
 * Conventions: z is x (or xhat for a seed-style cache) and m its per-channel shift.
 * Sums and moments are computed in float64 (z - m too).  So are the outputs of float32 and
 * float64 data, rounded once when stored; float16 outputs in float (BN_OT below).  Pointers
 * are already offset to the task's first channel; strides are in elements.
 */

/* Inputs and outputs as the loops see them.  float16 is converted run by run, in L1, by
 * the run functions of _kernels.h (AVX-512 or F16C where the CPU has them); other dtypes
 * are read and written in place, element by element.
 * - BN_IN(name, p, n) declares name, the n <= BN_PIECE elements from p (none when p is
 *   NULL) as the loop reads them (float16: widened to floats), and BN_LDI reads one as a
 *   double, BN_LDO as a BN_OT.
 * - The output sweeps compute in BN_OT: double, but float for float16, whose outputs keep
 *   11 bits, so that float's 24 hold them with room to spare (the bound: design.md,
 *   float16) at half the vector work.
 * - Outputs go in runs of at most BN_OPIECE: BN_OUT(w) declares a run's buffer,
 *   BN_PUT(w, o, k, v) sets element k of the run starting at o to the BN_OT v, and
 *   BN_FLUSH(w, o, n) ends a run of n (float16: rounds the buffer into o, bn_f2h_run).
 *   Each element is rounded once, to nearest even.
 * - An output run's loop goes to BN_OPAD(n) (float16: n rounded up to sixteen, BN_PAD), its
 *   inputs' padding being zeros and its coefficient arrays (cs 1) padded as far; the extra
 *   lanes are never flushed.
 * - BN_OUT_DIRECT(z, dy, aux, o, o2, n, m, s, a, c, cs, relu, zterm, nrows, sz, sdy,
 *   saux, so, so2) runs nrows output runs of n (each array's runs its stride apart), plain or
 *   with an epilogue (as bn_epi_run), without staging and returns 1 where it can (float16
 *   with vector code: bn_h_affine; float32 with AVX-512 or AVX2: bn_f_affine; the same
 *   bits), else 0, and the caller takes the staged loop (float32: GCC's vector code of it).
 * - BN_SUMS_DIRECT(z, dy, n, m, s1, s2) and BN_MOMENTS_DIRECT(x, n, m0, s1, s2) likewise
 *   add a planar run's sums, unmasked, or moments (its lanes' trees) to s1 and s2 in one
 *   pass (float16 and float32 with AVX-512, float16 sums with F16C: bn_sums_direct,
 *   bn_moments_direct), and BN_ROWS_SUMS_DIRECT and BN_ROWS_MOMENTS_DIRECT add a wide
 *   float16 block's rows into its accumulators (bn_h_rows_sums_direct,
 *   bn_h_rows_moments_direct), for blocks of BN_DIRECT_COLS columns or more: rows of 64
 *   measured no faster so, rows of 512 faster (docs/performance.md). */
#undef BN_DIRECT_COLS
#define BN_DIRECT_COLS 256
#undef BN_IN
#undef BN_LDI
#undef BN_PIECE
#undef BN_OPIECE
#undef BN_OUT
#undef BN_PUT
#undef BN_FLUSH
#undef BN_OPAD
#undef BN_OUT_DIRECT
#undef BN_SUMS_DIRECT
#undef BN_MOMENTS_DIRECT
#undef BN_ROWS_SUMS_DIRECT
#undef BN_ROWS_MOMENTS_DIRECT
#undef BN_GROUP
#undef BN_GROUP_MAX
#undef BN_OT
#undef BN_LDO
#undef BN_MASKED_O
#undef BN_RELU_O
#undef BN_COEF
#ifdef BN_F16
#define BN_OT float
#define BN_LDO(v) (v)
#define BN_MASKED_O bn_masked_f
#define BN_RELU_O bn_relu_f
#define BN_COEF(v) bn_coef_f(v)
#define BN_PIECE BN_ISTAGE
#define BN_OPIECE BN_STAGE
#define BN_OUT(w) float w[BN_STAGE]
#define BN_PUT(w, o, k, v) ((w)[k] = (v))
#define BN_FLUSH(w, o, n) bn_f2h_run((w), (o), (n))
#define BN_OPAD(n) BN_PAD(n)
#define BN_OUT_DIRECT bn_h_affine
#define BN_IN(name, p, n)                          \
    float name##_run[BN_ISTAGE];                   \
    const float *restrict name = name##_run;       \
    do {                                           \
        const uint16_t *name##_p = (p);            \
        if (name##_p != NULL)                      \
            bn_h2f_run(name##_p, name##_run, (n)); \
    } while (0)
#define BN_LDI(v) ((double)(v))
/* rows of n elements that one run of `run` elements (BN_PIECE in, BN_OPIECE out) holds
 * where the rows are contiguous (contig) and short (BN_GROUP_MAX elements at most: longer
 * rows measured slower grouped): those are converted many to a call.  The other dtypes
 * take rows one at a time (the constant 1: their row loops compile as plain ones) */
#define BN_GROUP_MAX 32
#define BN_GROUP(n, contig, run) ((contig) && (n) <= BN_GROUP_MAX ? (run) / (n) : 1)
#else
#define BN_OT double
#define BN_LDO(v) BN_LD(v)
#define BN_MASKED_O bn_masked
#define BN_RELU_O bn_relu
#define BN_COEF(v) (v)
#define BN_GROUP(n, contig, run) 1
#define BN_PIECE PTRDIFF_MAX
#define BN_IN(name, p, n) const BN_T *restrict name = (p)
#define BN_LDI(v) BN_LD(v)
#define BN_OPIECE PTRDIFF_MAX
#define BN_OUT(w) (void)0
#define BN_PUT(w, o, k, v) ((o)[k] = BN_ST(v))
#define BN_FLUSH(w, o, n) (void)0
#define BN_OPAD(n) (n)
#ifdef BN_F64
#define BN_OUT_DIRECT(z, dy, aux, o, o2, n, m, s, a, c, cs, relu, zterm, nr, s1, s2, s3, s4, s5) 0
#else
#define BN_OUT_DIRECT bn_f_affine
#endif
#endif
/* Sums and moments in AVX-512 where the CPU has it (_kernels.h): float16's planar runs and
 * wide rows without staging (the planar sums also with F16C); float32's planar runs
 * without GCC's split of sixteen loaded floats (float32's wide rows measured no faster so,
 * rows of 512 contiguous columns slower in pairs); float64, read as it is, keeps the loops
 * below */
#ifdef BN_F16
#define BN_SUMS_DIRECT(z, dy, n, m, s1, s2) bn_sums_direct(z, dy, n, m, s1, s2, 1)
#define BN_MOMENTS_DIRECT(x, n, m0, s1, s2) bn_moments_direct(x, n, m0, s1, s2, 1)
#define BN_ROWS_SUMS_DIRECT bn_h_rows_sums_direct
#define BN_ROWS_MOMENTS_DIRECT bn_h_rows_moments_direct
#else
#ifdef BN_F64
#define BN_SUMS_DIRECT(z, dy, n, m, s1, s2) 0
#define BN_MOMENTS_DIRECT(x, n, m0, s1, s2) 0
#else
#define BN_SUMS_DIRECT(z, dy, n, m, s1, s2) bn_sums_direct(z, dy, n, m, s1, s2, 0)
#define BN_MOMENTS_DIRECT(x, n, m0, s1, s2) bn_moments_direct(x, n, m0, s1, s2, 0)
#endif
#define BN_ROWS_SUMS_DIRECT(z, dy, sz, sdy, nrows, n, mb, a, c) 0
#define BN_ROWS_MOMENTS_DIRECT(x, sx, nrows, n, mb, a, b) 0
#endif

/* The task-level functions (the table's): BN_CLONES; float16's also flatten, inlining every
 * call they can, so that the vector conversions of bn_h2f_run and bn_f2h_run inline into
 * the clone of their instruction set (GCC's own inlining left most of them calls) */
#undef BN_TASK
#ifdef BN_F16
#define BN_TASK BN_CLONES __attribute__((flatten))
#else
#define BN_TASK BN_CLONES
#endif

/* dy[i] read by LD, masked by the saved output y[i] (MASKED) where mask is set; BN_DY: as a
 * double (bn_masked), for the sums */
#ifndef BN_DY
#define BN_DY_AS(LD, MASKED, mask, y, dy, i) \
    ((mask) ? MASKED(LD((y)[i]), LD((dy)[i])) : LD((dy)[i]))
#define BN_DY(mask, y, dy, i) BN_DY_AS(BN_LDI, bn_masked, mask, y, dy, i)
#endif

/* ---- rows layout: nrows rows of cw contiguous channels ---- */

/* Column blocks of BN_RBLOCK keep their accumulators in registers for a whole sweep down
 * the rows; the rows of a block are strided, so the next rows are prefetched.  float64 rows
 * of 256 columns or more are instead swept BN_WBLOCK columns at a time, row by row, with
 * the accumulators in L1: every row is then a long unit-stride run, which memory serves
 * best.  So are float16 rows of any width: each row's piece is widened in one run (BN_IN),
 * where a register block would spill its accumulators around every call.  float32 rows of
 * 512 columns or more take the wide sweep too: from memory it is faster than a register
 * block, which reads each row in short pieces a row stride apart; narrower float32 rows,
 * whose loops are bound by their conversions, keep the register blocks, as do narrower
 * float64 rows (docs/performance.md).  BN_WIDE_ROWS(cw) selects the wide sweep, for the
 * backward's sums and the forward's statistics alike. */
#ifndef BN_RBLOCK
#define BN_RBLOCK 64
#endif
#define BN_RPREFETCH 16
#define BN_WBLOCK 512
#undef BN_WIDE_ROWS
#ifdef BN_F64
#define BN_WIDE_ROWS(cw) ((cw) >= 256)
#elif defined(BN_F16)
#define BN_WIDE_ROWS(cw) 1
_Static_assert(BN_WBLOCK <= BN_ISTAGE, "a wide block's row is widened in one run");
#else
#define BN_WIDE_ROWS(cw) ((cw) >= 512)
#endif

/* A wide block (wide 1: accumulators in L1) takes four rows per sweep of its accumulators,
 * then a pair, so that they load and store once per four rows, where BN_WIDE_PAIRS(contig)
 * holds: in float16 (whose loops are bound by their conversions) whenever rows go one at a
 * time, not grouped (BN_GROUP); otherwise where the block's rows are not one contiguous run
 * (contig: the row stride is the block's width), which would split into interleaved streams
 * (pairs measured slower for rows of 256 to 512 float64 columns; faster where a block is
 * part of longer rows).  Four rows measured 1.05-1.10 faster than pairs on float64 NCHW
 * planes taken as rows and on rows of 1024-2048 columns, in both passes.  Rows of more than
 * one block go BN_WIDE_STEP rows at a time across all of their blocks: four, but two in
 * float16, whose blocks of 256 columns or more sum without this loop (four measured
 * 1.02-1.03 slower there).  Each column still adds the rows in row order: the same bits. */
#undef BN_WIDE_PAIRS
#undef BN_WIDE_STEP
#ifdef BN_F16
#define BN_WIDE_PAIRS(contig) 1
#define BN_WIDE_STEP 2
#else
#define BN_WIDE_PAIRS(contig) (!(contig))
#define BN_WIDE_STEP 4
#endif

/* rows s elements apart start a page (4 KiB) or more apart: each a stream of its own, which
 * the hardware prefetchers, working within a page, start anew */
#undef BN_PAGE_APART
#define BN_PAGE_APART(s) ((s) * (Py_ssize_t)sizeof(BN_T) >= 4096)

/* Prefetch the piece the sweep reaches BN_RPREFETCH rows from now: row r + BN_RPREFETCH of
 * block j0 (jw columns), or near the block's end a first row of the next block (up to
 * BN_RBLOCK columns, which covers every narrower rest block after it), so that the stream of
 * requests does not stall at every block boundary.  In the backward's sums (l2) over rows a
 * page or more apart, the first block (j0 0) prefetches the task's whole row (cw columns):
 * memory then serves each row from its start to its end once, and the later blocks find it in
 * L2, as the task's data fits there (the plans' budget); piece by piece, rows far apart (NCHW
 * planes taken as rows) were read a few lines at a time per block, which memory served
 * slower.  Closer rows, and the forward's statistics, keep the pieces: whole rows there
 * measured slower on rows in the caches (docs/performance.md).  Into L2 (l2) for the
 * backward's sums, which read two or three arrays: their lines that far ahead measured faster
 * waiting in L2 than in L1 (likely as rows whose stride is a multiple of 1 KiB crowd them
 * into a few of L1's sets); into L1 for the forward's one array, which measured faster so
 * (docs/performance.md). */
static inline void BN_FN(bn_prefetch_ahead)(
    const BN_T *base, Py_ssize_t s, Py_ssize_t nrows, Py_ssize_t cw, Py_ssize_t j0, Py_ssize_t jw,
    Py_ssize_t r, const int l2)
{
    Py_ssize_t rr = r + BN_RPREFETCH, jj = j0, b;
    if (l2 && j0 == 0 && BN_PAGE_APART(s) && rr < nrows)
        jw = cw;
    if (rr >= nrows) {
        rr -= nrows;
        jj += jw;
        if (jj >= cw || rr >= nrows)
            return;
        jw = cw - jj < BN_RBLOCK ? cw - jj : BN_RBLOCK;
    }
    for (b = 0; b < jw; b += 64 / (Py_ssize_t)sizeof(BN_T)) {
        if (l2)
            bn_prefetch_l2(base + rr * s + jj + b);
        else
            bn_prefetch(base + rr * s + jj + b);
    }
}

/* One column block of bn_rows_sums: a[j] += dy, c[j] += dy*(z - mb[j]) down all rows (with
 * mask: dy masked by the saved output y).  Always inlined, so that a block of constant
 * width keeps its accumulators in vector registers and prefetches the rows ahead; a wide
 * block (wide 1) leaves its sequential runs to the hardware prefetcher. */
static inline __attribute__((always_inline)) void BN_FN(bn_rows_sums_block)(
    const BN_T *restrict z, const BN_T *restrict dy, const BN_T *restrict y, Py_ssize_t sz,
    Py_ssize_t sdy, Py_ssize_t sy, Py_ssize_t nrows, Py_ssize_t cw, Py_ssize_t j0,
    const Py_ssize_t jw, const int wide, const int mask, const double *restrict mb,
    double *restrict a, double *restrict c)
{
    const Py_ssize_t G = BN_GROUP(jw, sz == jw && sdy == jw && (!mask || sy == jw), BN_PIECE);
    Py_ssize_t j, r, rr, g;
/* row r + rr of a run from row r: at k = rr * jw in it (rr > 0: contiguous rows) */
#define BN_SUMS_ROW(k)                                      \
    do {                                                    \
        BN_SIMD                                             \
        for (j = 0; j < jw; j++) {                          \
            const double v = BN_DY(mask, ys, dys, (k) + j); \
            a[j] += v;                                      \
            c[j] += v * (BN_LDI(zs[(k) + j]) - mb[j]);      \
        }                                                   \
    } while (0)
    if (G == 1) { /* G is 1 for every dtype but float16; rows singly, or in pairs (BN_WIDE_PAIRS) */
        if (wide && !mask && jw >= BN_DIRECT_COLS &&
            BN_ROWS_SUMS_DIRECT(z + j0, dy + j0, sz, sdy, nrows, jw, mb, a, c))
            return;
        r = 0;
        if (wide && BN_WIDE_PAIRS(sz == jw && sdy == jw)) { /* fours, then a pair */
            for (; r + 3 < nrows; r += 4) {
                BN_IN(z0, z + r * sz + j0, jw);
                BN_IN(z1, z + (r + 1) * sz + j0, jw);
                BN_IN(z2, z + (r + 2) * sz + j0, jw);
                BN_IN(z3, z + (r + 3) * sz + j0, jw);
                BN_IN(d0, dy + r * sdy + j0, jw);
                BN_IN(d1, dy + (r + 1) * sdy + j0, jw);
                BN_IN(d2, dy + (r + 2) * sdy + j0, jw);
                BN_IN(d3, dy + (r + 3) * sdy + j0, jw);
                BN_IN(y0, mask ? y + r * sy + j0 : NULL, jw);
                BN_IN(y1, mask ? y + (r + 1) * sy + j0 : NULL, jw);
                BN_IN(y2, mask ? y + (r + 2) * sy + j0 : NULL, jw);
                BN_IN(y3, mask ? y + (r + 3) * sy + j0 : NULL, jw);
                BN_SIMD
                for (j = 0; j < jw; j++) {
                    const double v0 = BN_DY(mask, y0, d0, j), v1 = BN_DY(mask, y1, d1, j),
                                 v2 = BN_DY(mask, y2, d2, j), v3 = BN_DY(mask, y3, d3, j);
                    a[j] = a[j] + v0 + v1 + v2 + v3;
                    c[j] = c[j] + v0 * (BN_LDI(z0[j]) - mb[j]) + v1 * (BN_LDI(z1[j]) - mb[j]) +
                           v2 * (BN_LDI(z2[j]) - mb[j]) + v3 * (BN_LDI(z3[j]) - mb[j]);
                }
            }
            for (; r + 1 < nrows; r += 2) {
                BN_IN(zs, z + r * sz + j0, jw);
                BN_IN(dys, dy + r * sdy + j0, jw);
                BN_IN(ys, mask ? y + r * sy + j0 : NULL, jw);
                BN_IN(zt, z + (r + 1) * sz + j0, jw);
                BN_IN(dyt, dy + (r + 1) * sdy + j0, jw);
                BN_IN(yt, mask ? y + (r + 1) * sy + j0 : NULL, jw);
                BN_SIMD
                for (j = 0; j < jw; j++) {
                    const double v = BN_DY(mask, ys, dys, j), w = BN_DY(mask, yt, dyt, j);
                    a[j] = a[j] + v + w;
                    c[j] = c[j] + v * (BN_LDI(zs[j]) - mb[j]) + w * (BN_LDI(zt[j]) - mb[j]);
                }
            }
        }
        for (; r < nrows; r++) {
            BN_IN(zs, z + r * sz + j0, jw);
            BN_IN(dys, dy + r * sdy + j0, jw);
            BN_IN(ys, mask ? y + r * sy + j0 : NULL, jw);
            if (!wide) {
                BN_FN(bn_prefetch_ahead)(z, sz, nrows, cw, j0, jw, r, 1);
                BN_FN(bn_prefetch_ahead)(dy, sdy, nrows, cw, j0, jw, r, 1);
                if (mask)
                    BN_FN(bn_prefetch_ahead)(y, sy, nrows, cw, j0, jw, r, 1);
            }
            BN_SUMS_ROW(0);
        }
        return;
    }
    for (r = 0; r < nrows; r += g) { /* short contiguous float16 rows, g to a run */
        g = nrows - r < G ? nrows - r : G;
        BN_IN(zs, z + r * sz + j0, g * jw);
        BN_IN(dys, dy + r * sdy + j0, g * jw);
        BN_IN(ys, mask ? y + r * sy + j0 : NULL, g * jw);
        for (rr = 0; rr < g; rr++)
            BN_SUMS_ROW(rr * jw);
    }
#undef BN_SUMS_ROW
}

/* The column blocks of a rows task's sums, shared by bn_rows_sums and bn_rows_centered:
 * BLOCK(r0, nr, j0, jw, wide, mb, p, q) adds rows r0..r0+nr-1 of one block into p[0..jw) and
 * q[0..jw) with shifts mb; the task's sums end in P[0..cw) and Q[0..cw), M its shifts.  Wide
 * rows (WIDE: BN_WIDE_ROWS) accumulate straight in P and Q; rows of more than
 * one BN_WBLOCK-column block go BN_WIDE_STEP rows at a time across all of their blocks, so that
 * each row is read from its start to its end, not a block's piece of every row and then the next
 * block's (pieces of 1-4 KiB a row stride apart, which memory served slower:
 * docs/performance.md).  One call site for both: a second one, for single-block rows, made
 * GCC keep a pointer of that loop on the stack.  Otherwise register blocks of BN_RBLOCK
 * columns down all the rows, then the rest: in blocks of 32, 16 and 8 when it is a multiple
 * of 8 (24, 40, 48... channels), else in one.  A block of constant width keeps its
 * accumulators in registers, where one of a variable width loads and stores them at every
 * row; a rest split down to a few odd columns would add a sweep down the rows for them.  Each
 * column is summed in row order whatever its block, so the bits do not depend on the
 * blocks. */
#ifndef BN_ROWS_SWEEP
#define BN_ROWS_SWEEP(BLOCK, WIDE, M, P, Q)                                                      \
    do {                                                                                         \
        Py_ssize_t r0, rstep, j0, j, jw;                                                         \
        if (WIDE) {                                                                              \
            for (j = 0; j < cw; j++) {                                                           \
                P[j] = 0.0;                                                                      \
                Q[j] = 0.0;                                                                      \
            }                                                                                    \
            rstep = cw <= BN_WBLOCK ? nrows : BN_WIDE_STEP;                                      \
            for (r0 = 0; r0 < nrows; r0 += rstep)                                                \
                for (j0 = 0; j0 < cw; j0 += BN_WBLOCK)                                           \
                    BLOCK(                                                                       \
                        r0, nrows - r0 < rstep ? nrows - r0 : rstep, j0,                         \
                        cw - j0 < BN_WBLOCK ? cw - j0 : BN_WBLOCK, 1, M + j0, P + j0, Q + j0);   \
            break;                                                                               \
        }                                                                                        \
        for (j0 = 0; j0 < cw; j0 += jw) {                                                        \
            double a[BN_RBLOCK], b[BN_RBLOCK], mb[BN_RBLOCK];                                    \
            jw = cw - j0;                                                                        \
            jw = jw >= BN_RBLOCK ? BN_RBLOCK : jw % 8 ? jw : jw >= 32 ? 32 : jw >= 16 ? 16 : jw; \
            for (j = 0; j < jw; j++) {                                                           \
                a[j] = 0.0;                                                                      \
                b[j] = 0.0;                                                                      \
                mb[j] = M[j0 + j];                                                               \
            }                                                                                    \
            if (jw == BN_RBLOCK)                                                                 \
                BLOCK(0, nrows, j0, BN_RBLOCK, 0, mb, a, b);                                     \
            else if (jw == 32)                                                                   \
                BLOCK(0, nrows, j0, 32, 0, mb, a, b);                                            \
            else if (jw == 16)                                                                   \
                BLOCK(0, nrows, j0, 16, 0, mb, a, b);                                            \
            else if (jw == 8)                                                                    \
                BLOCK(0, nrows, j0, 8, 0, mb, a, b);                                             \
            else                                                                                 \
                BLOCK(0, nrows, j0, jw, 0, mb, a, b);                                            \
            for (j = 0; j < jw; j++) {                                                           \
                P[j0 + j] = a[j];                                                                \
                Q[j0 + j] = b[j];                                                                \
            }                                                                                    \
        }                                                                                        \
    } while (0)
_Static_assert(BN_RBLOCK >= 64, "the register blocks' rest goes in blocks of 32, 16 and 8");
#endif

/* s_dy[j] := sum_r dy[r, j];  s_zm[j] := sum_r dy[r, j] * (z[r, j] - m[j]), in row order;
 * y (row stride sy) not NULL: dy masked by it first (bn_masked) */
static BN_TASK void BN_FN(bn_rows_sums)(
    const BN_T *restrict z, const BN_T *restrict dy, const BN_T *restrict y, Py_ssize_t sz,
    Py_ssize_t sdy, Py_ssize_t sy, Py_ssize_t nrows, Py_ssize_t cw, const double *restrict m,
    double *restrict s_dy, double *restrict s_zm)
{
#define BN_SUMS_BLOCK(r0, nr, j0, jw, wide, mb, p, q) \
    BN_FN(bn_rows_sums_block)(                        \
        z + (r0) * sz, dy + (r0) * sdy, y, sz, sdy, sy, nr, cw, j0, jw, wide, 0, mb, p, q)
#define BN_SUMS_BLOCK_MASKED(r0, nr, j0, jw, wide, mb, p, q)                                     \
    BN_FN(bn_rows_sums_block)(                                                                   \
        z + (r0) * sz, dy + (r0) * sdy, y + (r0) * sy, sz, sdy, sy, nr, cw, j0, jw, wide, 1, mb, \
        p, q)
    if (y == NULL)
        BN_ROWS_SWEEP(BN_SUMS_BLOCK, BN_WIDE_ROWS(cw), m, s_dy, s_zm);
    else
        BN_ROWS_SWEEP(BN_SUMS_BLOCK_MASKED, BN_WIDE_ROWS(cw), m, s_dy, s_zm);
#undef BN_SUMS_BLOCK
#undef BN_SUMS_BLOCK_MASKED
}

/* The output of a sweep, per element: dx = a*(dy + cc) + s*(z - m), or out = s*(z - m) + cc
 * in the forward, and dx = a*(dy + cc) without the term in z (BN_DX_DY).  One definition for
 * the plain loops (scalar operands) and the vector ones (streamed, bands), so that all give
 * the same bits.  In float (float16's BN_OT) the float mean m leaves a low part mu - m,
 * whose term -s*(mu - m) goes into the constant term cc with the rest of it (bn_out_coefs:
 * beta, or a*Cc in the backward), and the products are fused: out = fma(s, z - m, cc),
 * dx = fma(s, z - m, fma(a, dy, cc)).  Each rounding is then relative to a term, not to
 * s*mu, which can be far larger (data with an offset), at two or three float operations
 * an output (design.md derives the bound).  fmaf rounds once on every CPU (in software
 * without FMA). */
#undef BN_AFFINE_DX
#undef BN_AFFINE_OUT
#undef BN_DX_DY
#ifdef BN_F16
#define BN_AFFINE_DX(a, dy, cc, s, z, m) fmaf((s), (z) - (m), fmaf((a), (dy), (cc)))
#define BN_AFFINE_OUT(s, z, m, cc) fmaf((s), (z) - (m), (cc))
#define BN_DX_DY(a, dy, cc) fmaf((a), (dy), (cc))
#else
#define BN_AFFINE_DX(a, dy, cc, s, z, m) ((a) * ((dy) + (cc)) + (s) * ((z) - (m)))
#define BN_AFFINE_OUT(s, z, m, cc) ((s) * ((z) - (m)) + (cc))
#define BN_DX_DY(a, dy, cc) ((a) * ((dy) + (cc)))
#endif

/* o[k] := EXPR(k, zk, dyk), rounded to BN_T, for k in [k0, k1), zk and dyk the BN_OT of
 * Z[k] and DY[k] (DY a null pointer: none, and EXPR does not use dyk); in runs (BN_IN,
 * BN_OUT) */
#undef BN_OUT_RUN
#define BN_OUT_RUN(o, k0, k1, Z, DY, EXPR)                                         \
    do {                                                                           \
        Py_ssize_t bn_q, bn_k, bn_n;                                               \
        for (bn_q = (k0); bn_q < (k1); bn_q += bn_n) {                             \
            bn_n = (k1) - bn_q < BN_OPIECE ? (k1) - bn_q : BN_OPIECE;              \
            BN_IN(bn_zs, (Z) + bn_q, bn_n);                                        \
            BN_IN(bn_dys, (DY) == NULL ? NULL : (DY) + bn_q, bn_n);                \
            BN_OUT(bn_w);                                                          \
            (void)bn_dys;                                                          \
            BN_SIMD                                                                \
            for (bn_k = 0; bn_k < BN_OPAD(bn_n); bn_k++)                           \
                BN_PUT(                                                            \
                    bn_w, (o) + bn_q, bn_k,                                        \
                    EXPR(bn_q + bn_k, BN_LDO(bn_zs[bn_k]), BN_LDO(bn_dys[bn_k]))); \
            BN_FLUSH(bn_w, (o) + bn_q, bn_n);                                      \
        }                                                                          \
    } while (0)

/* BN_OUT_RUN over g rows of cw, EXPR(j, zj, dyj) with j the column: one row (g 1) as a run,
 * or g > 1 contiguous rows (o, Z and DY each) of g*cw <= BN_STAGE elements as one run */
#undef BN_OUT_ROWS
#define BN_OUT_ROWS(o, g, cw, Z, DY, EXPR)                        \
    do {                                                          \
        Py_ssize_t bn_r, bn_j;                                    \
        if ((g) == 1) {                                           \
            BN_OUT_RUN(o, 0, cw, Z, DY, EXPR);                    \
            break;                                                \
        }                                                         \
        BN_IN(bn_gzs, (Z), (g) * (cw));                           \
        BN_IN(bn_gdys, (DY), (DY) == NULL ? 0 : (g) * (cw));      \
        BN_OUT(bn_gw);                                            \
        (void)bn_gdys;                                            \
        for (bn_r = 0; bn_r < (g); bn_r++) {                      \
            BN_SIMD                                               \
            for (bn_j = 0; bn_j < (cw); bn_j++)                   \
                BN_PUT(                                           \
                    bn_gw, (o), bn_r * (cw) + bn_j,               \
                    EXPR(                                         \
                        bn_j, BN_LDO(bn_gzs[bn_r * (cw) + bn_j]), \
                        BN_LDO(bn_gdys[bn_r * (cw) + bn_j])));    \
        }                                                         \
        BN_FLUSH(bn_gw, (o), (g) * (cw));                         \
    } while (0)

#if defined(BN_F64) && defined(__SSE2__)
/* Streaming (non-temporal) stores for float64 output larger than the L3: a plain store reads
 * each line from memory first and leaves it in the cache, evicting data the second sweep still
 * needs.  Four elements at a time in GCC's generic vectors (the same operations, so the same
 * bits, as the loops below), stored 16 bytes at a time (SSE2, on every x86-64).  float32 does
 * not stream: its sweeps are bound by the conversions (docs/performance.md). */
typedef double bn_v4d __attribute__((vector_size(32)));
/* an unaligned view of four doubles (macros, not functions: a 32-byte vector passed or
 * returned by value would change the ABI of the baseline build) */
typedef double bn_v4d_u __attribute__((vector_size(32), aligned(8), may_alias));
#define BN_LOAD4(p) (*(const bn_v4d_u *)(p))
#define BN_STREAM4(p, v)                                        \
    do {                                                        \
        const bn_v4d bn_v_ = (v);                               \
        _mm_stream_pd((p), _mm_set_pd(bn_v_[1], bn_v_[0]));     \
        _mm_stream_pd((p) + 2, _mm_set_pd(bn_v_[3], bn_v_[2])); \
    } while (0)

/* bn_rows_affine's row, streamed: only whole cache lines are streamed (a line written in
 * part by streaming stores costs a read-modify-write in memory); the elements before the first
 * line boundary and those after the last whole line get plain stores (a misaligned array:
 * all of them) */
#define BN_ROWS_DX(k) BN_AFFINE_DX(A[k], dy[k], Cc[k], S[k], z[k], m[k])
#define BN_ROWS_DX4(k)                                                                \
    BN_AFFINE_DX(                                                                     \
        BN_LOAD4(A + (k)), BN_LOAD4(dy + (k)), BN_LOAD4(Cc + (k)), BN_LOAD4(S + (k)), \
        BN_LOAD4(z + (k)), BN_LOAD4(m + (k)))
#define BN_ROWS_OUT(k) BN_AFFINE_OUT(S[k], z[k], m[k], Cc[k])
#define BN_ROWS_OUT4(k) \
    BN_AFFINE_OUT(BN_LOAD4(S + (k)), BN_LOAD4(z + (k)), BN_LOAD4(m + (k)), BN_LOAD4(Cc + (k)))
#define BN_PLANE_DX(k) BN_AFFINE_DX(a, dy[k], cc, sc, z[k], mc)
#define BN_PLANE_DX4(k) BN_AFFINE_DX(a, BN_LOAD4(dy + (k)), cc, sc, BN_LOAD4(z + (k)), mc)
#define BN_PLANE_OUT(k) BN_AFFINE_OUT(sc, z[k], mc, cc)
#define BN_PLANE_OUT4(k) BN_AFFINE_OUT(sc, BN_LOAD4(z + (k)), mc, cc)

/* out[k] := EXPR(k) for k < n, whole 64-byte lines of out streamed (EXPR4: four at a time) */
#define BN_STREAM_RUN(EXPR, EXPR4)                             \
    do {                                                       \
        Py_ssize_t k = 0;                                      \
        for (; k < n && ((uintptr_t)(out + k) & 63) != 0; k++) \
            out[k] = EXPR(k);                                  \
        for (; k + 8 <= n; k += 8) {                           \
            BN_STREAM4(out + k, EXPR4(k));                     \
            BN_STREAM4(out + k + 4, EXPR4(k + 4));             \
        }                                                      \
        for (; k < n; k++)                                     \
            out[k] = EXPR(k);                                  \
    } while (0)

static inline __attribute__((always_inline)) void bn_rows_affine_stream(
    const double *restrict z, const double *restrict dy, double *restrict out, Py_ssize_t n,
    const double *restrict m, const double *restrict S, const double *restrict A,
    const double *restrict Cc)
{
    if (dy == NULL)
        BN_STREAM_RUN(BN_ROWS_OUT, BN_ROWS_OUT4);
    else
        BN_STREAM_RUN(BN_ROWS_DX, BN_ROWS_DX4);
}

/* bn_plane_affine's run, streamed (as bn_rows_affine_stream) */
static inline __attribute__((always_inline)) void bn_plane_affine_stream(
    const double *restrict z, const double *restrict dy, double *restrict out, Py_ssize_t n,
    double mc, double sc, double a, double cc)
{
    if (dy == NULL)
        BN_STREAM_RUN(BN_PLANE_OUT, BN_PLANE_OUT4);
    else
        BN_STREAM_RUN(BN_PLANE_DX, BN_PLANE_DX4);
}
#endif

#ifndef BN_F16
/* float32 and float64 rows a page (4 KiB) apart or more take the output sweep in bands
 * (bn_rows_affine_band): of BN_BAND_ROWS(dy) rows, four in the forward (two arrays: eight
 * lines a column step, the ways of one L1 set when the rows are a multiple of 4 KiB apart),
 * two in the backward (three arrays: four rows measured slower).  Closer rows keep the
 * plain loop: read as two interleaved runs within a page they measured slower, and one at
 * a time the band's loop was no faster than the plain one (docs/performance.md). */
#define BN_BAND_ROWS(dy) ((dy) == NULL ? 4 : 2)
/* BN_V8(p): the eight elements from p as doubles; BN_V8_ST(p, v): v rounded to BN_T into
 * them (each element once, to nearest even, as BN_ST).  Element by element, which GCC
 * turns into vector loads, conversions and stores: a whole-vector access of a type wider
 * than the machine's vectors went through the stack in the AVX2 and SSE2 builds, and
 * GCC 12 lowers __builtin_convertvector of eight floats to halves. */
#undef BN_V8
#undef BN_V8_ST
#define BN_V8(p)                                                                                  \
    ((bn_v8d){                                                                                    \
        BN_LD((p)[0]), BN_LD((p)[1]), BN_LD((p)[2]), BN_LD((p)[3]), BN_LD((p)[4]), BN_LD((p)[5]), \
        BN_LD((p)[6]), BN_LD((p)[7])})
#define BN_V8_ST(p, v)                          \
    do {                                        \
        const bn_v8d bn_v_ = (v);               \
        BN_T *const bn_p_ = (p);                \
        int bn_l_;                              \
        for (bn_l_ = 0; bn_l_ < 8; bn_l_++)     \
            bn_p_[bn_l_] = BN_ST(bn_v_[bn_l_]); \
    } while (0)

/* A band of nb rows of bn_rows_affine's plain loop (dy NULL: the forward's), eight
 * columns at a time: each column's coefficients are loaded once for the whole band, as
 * loading them per element bounded the row-by-row loop.  The same expressions, so the
 * same bits. */
static inline __attribute__((always_inline)) void BN_FN(bn_rows_affine_band)(
    const BN_T *restrict z, const BN_T *restrict dy, BN_T *restrict out, Py_ssize_t sz,
    Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nb, Py_ssize_t cw, const double *restrict m,
    const double *restrict S, const double *restrict A, const double *restrict Cc)
{
    Py_ssize_t j, k;
    if (dy == NULL) {
        for (j = 0; j + 8 <= cw; j += 8) {
            const bn_v8d s = BN_V8D(S + j), mj = BN_V8D(m + j), c = BN_V8D(Cc + j);
            for (k = 0; k < nb; k++)
                BN_V8_ST(out + k * sout + j, BN_AFFINE_OUT(s, BN_V8(z + k * sz + j), mj, c));
        }
        for (; j < cw; j++)
            for (k = 0; k < nb; k++)
                out[k * sout + j] = BN_ST(BN_AFFINE_OUT(S[j], BN_LD(z[k * sz + j]), m[j], Cc[j]));
    } else {
        for (j = 0; j + 8 <= cw; j += 8) {
            const bn_v8d a = BN_V8D(A + j), c = BN_V8D(Cc + j), s = BN_V8D(S + j),
                         mj = BN_V8D(m + j);
            for (k = 0; k < nb; k++)
                BN_V8_ST(
                    out + k * sout + j,
                    BN_AFFINE_DX(a, BN_V8(dy + k * sdy + j), c, s, BN_V8(z + k * sz + j), mj));
        }
        for (; j < cw; j++)
            for (k = 0; k < nb; k++)
                out[k * sout + j] = BN_ST(BN_AFFINE_DX(
                    A[j], BN_LD(dy[k * sdy + j]), Cc[j], S[j], BN_LD(z[k * sz + j]), m[j]));
    }
}
#endif

/* Column or channel k's coefficients as the output sweeps take them, in BN_OT, A not read
 * where NULL (no dy: *ak 0).  In float, *ck is the output's constant term, rounded once
 * from double: beta (Cc) without dy, a*Cc with it, plus the term -s*(mu - m) of the float
 * mean's low part (0 where s is: a backward with running statistics, whose mean is never
 * read) (BN_AFFINE_DX). */
static inline __attribute__((always_inline)) void BN_FN(bn_out_coefs)(
    const double *m, const double *S, const double *A, const double *Cc, Py_ssize_t k, BN_OT *mk,
    BN_OT *sk, BN_OT *ak, BN_OT *ck)
{
    *mk = BN_COEF(m[k]);
    *sk = BN_COEF(S[k]);
    *ak = A == NULL ? 0 : BN_COEF(A[k]);
#ifdef BN_F16
    {
        const double lo = *sk == 0.0f ? 0.0 : -(double)*sk * (m[k] - (double)*mk);
        *ck = BN_COEF((A == NULL ? Cc[k] : (double)*ak * Cc[k]) + lo);
    }
#else
    *ck = BN_COEF(Cc[k]);
#endif
}

/* A run of n outputs with a fused epilogue (bn_epi), coefficients m, S, A, Cc at [k*cs]
 * (cs 1: per column, rows layout; cs 0: one channel's, planar), in BN_OT.  Forward (fwd): out =
 * S*(z - m) + Cc, plus aux (a residual) with has_aux, then max(., 0) with relu (NaN kept,
 * -0 made +0).  Backward: dy masked by the saved output aux with has_aux (bn_masked), the
 * masked dy stored in out2 with has_out2 (the residual's gradient), then out = dx, without
 * its S*(z - m) term unless zterm.  Always inlined with constant flags: each combination is
 * its own vectorized loop. */
static inline __attribute__((always_inline)) void BN_FN(bn_epi_run)(
    const BN_T *restrict z, const BN_T *restrict dy, const BN_T *restrict aux, BN_T *restrict out,
    BN_T *restrict out2, Py_ssize_t n, const BN_OT *restrict m, const BN_OT *restrict S,
    const BN_OT *restrict A, const BN_OT *restrict Cc, const Py_ssize_t cs, const int fwd,
    const int has_aux, const int relu, const int has_out2, const int zterm)
{
    Py_ssize_t q, k, np;
    for (q = 0; q < n; q += np) {
        np = n - q < BN_OPIECE ? n - q : BN_OPIECE;
        BN_IN(zs, fwd || zterm ? z + q : NULL, np);
        BN_IN(dys, fwd ? NULL : dy + q, np);
        BN_IN(auxs, has_aux ? aux + q : NULL, np);
        BN_OUT(w);
        BN_OUT(w2);
        BN_SIMD
        for (k = 0; k < BN_OPAD(np); k++) {
            const Py_ssize_t j = (q + k) * cs;
            BN_OT v;
            if (fwd) {
                v = BN_AFFINE_OUT(S[j], BN_LDO(zs[k]), m[j], Cc[j]);
                if (has_aux)
                    v = v + BN_LDO(auxs[k]);
                if (relu)
                    v = BN_RELU_O(v);
            } else {
                const BN_OT d = BN_DY_AS(BN_LDO, BN_MASKED_O, has_aux, auxs, dys, k);
                if (has_out2)
                    BN_PUT(w2, out2 + q, k, d);
                v = zterm ? BN_AFFINE_DX(A[j], d, Cc[j], S[j], BN_LDO(zs[k]), m[j])
                          : BN_DX_DY(A[j], d, Cc[j]);
            }
            BN_PUT(w, out + q, k, v);
        }
        BN_FLUSH(w, out + q, np);
        if (has_out2)
            BN_FLUSH(w2, out2 + q, np);
    }
}

/* bn_epi_run over nrows runs of n (rows: each array's runs its row stride apart, aux's and
 * out2's those of e), first as one BN_OUT_DIRECT call; the flags constants, the pointers
 * they say are there not NULL */
static inline __attribute__((always_inline)) void BN_FN(bn_epi_rows)(
    const BN_T *z, const BN_T *dy, const BN_T *aux, BN_T *out, BN_T *out2, Py_ssize_t n,
    const BN_OT *m, const BN_OT *S, const BN_OT *A, const BN_OT *Cc, const Py_ssize_t cs,
    Py_ssize_t nrows, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout, const bn_epi *e,
    const int fwd, const int has_aux, const int relu, const int has_out2, const int zterm)
{
    Py_ssize_t r;
    if ((!fwd && dy == NULL) || (has_aux && aux == NULL) || (has_out2 && out2 == NULL))
        __builtin_unreachable();
    if (BN_OUT_DIRECT(
            z, fwd ? NULL : dy, has_aux ? aux : NULL, out, has_out2 ? out2 : NULL, n, m, S, A, Cc,
            cs, relu, zterm, nrows, sz, sdy, e->aux_n, sout, e->out2_n))
        return;
    for (r = 0; r < nrows; r++)
        BN_FN(bn_epi_run)(
            z + r * sz, fwd ? NULL : dy + r * sdy, has_aux ? aux + r * e->aux_n : NULL,
            out + r * sout, has_out2 ? out2 + r * e->out2_n : NULL, n, m, S, A, Cc, cs, fwd,
            has_aux, relu, has_out2, zterm);
}

/* bn_epi_rows with the flags of e, each combination a constant */
static inline __attribute__((always_inline)) void BN_FN(bn_epi_any)(
    const BN_T *z, const BN_T *dy, const BN_T *aux, BN_T *out, BN_T *out2, Py_ssize_t n,
    const BN_OT *m, const BN_OT *S, const BN_OT *A, const BN_OT *Cc, const Py_ssize_t cs,
    Py_ssize_t nrows, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout, const bn_epi *e)
{
#define BN_EPI(fwd, has_aux, relu, has_out2, zterm)                                             \
    BN_FN(bn_epi_rows)(                                                                         \
        z, dy, aux, out, out2, n, m, S, A, Cc, cs, nrows, sz, sdy, sout, e, fwd, has_aux, relu, \
        has_out2, zterm)
    if (dy == NULL) {
        if (aux == NULL)
            e->relu ? BN_EPI(1, 0, 1, 0, 1) : BN_EPI(1, 0, 0, 0, 1);
        else
            e->relu ? BN_EPI(1, 1, 1, 0, 1) : BN_EPI(1, 1, 0, 0, 1);
    } else if (e->zterm) {
        if (aux == NULL)
            out2 != NULL ? BN_EPI(0, 0, 0, 1, 1) : BN_EPI(0, 0, 0, 0, 1);
        else
            out2 != NULL ? BN_EPI(0, 1, 0, 1, 1) : BN_EPI(0, 1, 0, 0, 1);
    } else {
        if (aux == NULL)
            out2 != NULL ? BN_EPI(0, 0, 0, 1, 0) : BN_EPI(0, 0, 0, 0, 0);
        else
            out2 != NULL ? BN_EPI(0, 1, 0, 1, 0) : BN_EPI(0, 1, 0, 0, 0);
    }
#undef BN_EPI
}

/* bn_rows_affine with a fused epilogue (inlined into it, so compiled for each of its
 * instruction sets) */
static inline __attribute__((always_inline)) void BN_FN(bn_rows_epilogue)(
    const BN_T *z, const BN_T *dy, BN_T *out, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout,
    Py_ssize_t nrows, Py_ssize_t cw, const BN_OT *m, const BN_OT *S, const BN_OT *A,
    const BN_OT *Cc, const bn_epi *e)
{
    BN_FN(bn_epi_any)(
        z, dy, (const BN_T *)e->aux, out, (BN_T *)e->out2, cw, m, S, A, Cc, 1, nrows, sz, sdy, sout,
        e);
}

/* out[r, j] := BN_AFFINE_DX(A[j], dy[r, j], Cc[j], S[j], z[r, j], m[j]);  without
 * dy: BN_AFFINE_OUT(S[j], z[r, j], m[j], Cc[j]).  In BN_OT, rounded once at the end:
 * the terms can cancel (dy - mean(dy) is exactly 0 for one element per channel).  Row by
 * row over the whole width: every row is one unit-stride run in and out, where column
 * blocks swept down the rows would write each row piecemeal. */
static inline __attribute__((always_inline)) void BN_FN(bn_rows_affine_cols)(
    const BN_T *restrict z, const BN_T *restrict dy, BN_T *restrict out, Py_ssize_t sz,
    Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nrows, Py_ssize_t cw, const BN_OT *restrict m,
    const BN_OT *restrict S, const BN_OT *restrict A, const BN_OT *restrict Cc, int stream,
    const bn_epi *e)
{
    Py_ssize_t r, g, G;
    if (e != NULL) {
        BN_FN(bn_rows_epilogue)(z, dy, out, sz, sdy, sout, nrows, cw, m, S, A, Cc, e);
        return;
    }
#if defined(BN_F64) && defined(__SSE2__)
    if (stream) {
        for (r = 0; r < nrows; r++)
            bn_rows_affine_stream(
                z + r * sz, dy == NULL ? NULL : dy + r * sdy, out + r * sout, cw, m, S, A, Cc);
        _mm_sfence(); /* streaming stores are weakly ordered: drain them before returning */
        return;
    }
#endif
    (void)stream;
    r = 0;
#ifndef BN_F16
    if (BN_PAGE_APART(sz) && BN_PAGE_APART(sout) && (dy == NULL || BN_PAGE_APART(sdy)))
        for (; r < nrows; r += g) {
            const Py_ssize_t band = BN_BAND_ROWS(dy);
            g = nrows - r < band ? nrows - r : band;
            BN_FN(bn_rows_affine_band)(
                z + r * sz, dy == NULL ? NULL : dy + r * sdy, out + r * sout, sz, sdy, sout, g, cw,
                m, S, A, Cc);
        }
#endif
    G = BN_GROUP(cw, sz == cw && sout == cw && (dy == NULL || sdy == cw), BN_OPIECE);
    if (G == 1 && BN_OUT_DIRECT(
                      z + r * sz, dy == NULL ? NULL : dy + r * sdy, NULL, out + r * sout, NULL, cw,
                      m, S, A, Cc, 1, 0, 1, nrows - r, sz, sdy, 0, sout, 0))
        return;
    for (; r < nrows; r += g) {
        const BN_T *restrict zr = z + r * sz;
        BN_T *restrict outr = out + r * sout;
        g = G == 1 ? 1 : (nrows - r < G ? nrows - r : G); /* G 1: g the constant 1 */
        if (dy == NULL) {
#define BN_ROW_OUT(k, zk, dyk) BN_AFFINE_OUT(S[k], zk, m[k], Cc[k])
            BN_OUT_ROWS(outr, g, cw, zr, (const BN_T *)NULL, BN_ROW_OUT);
#undef BN_ROW_OUT
        } else {
            const BN_T *restrict dyr = dy + r * sdy;
#define BN_ROW_DX(k, zk, dyk) BN_AFFINE_DX(A[k], dyk, Cc[k], S[k], zk, m[k])
            BN_OUT_ROWS(outr, g, cw, zr, dyr, BN_ROW_DX);
#undef BN_ROW_DX
        }
    }
}

#ifdef BN_F16
/* float16: the coefficients as floats (each array padded to BN_PAD), for up to BN_FCOLS
 * columns on the stack, for more in a buffer of the task's width (rows swept whole, as above);
 * should that buffer fail, the columns go BN_FCOLS at a time, each such block swept over all the
 * rows (the same bits) */
#define BN_FCOLS 512
_Static_assert(BN_FCOLS % 16 == 0, "a padded block fits the stack's arrays");
static BN_TASK void BN_FN(bn_rows_affine)(
    const BN_T *restrict z, const BN_T *restrict dy, BN_T *restrict out, Py_ssize_t sz,
    Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nrows, Py_ssize_t cw, const double *restrict m,
    const double *restrict S, const double *restrict A, const double *restrict Cc, int stream,
    const bn_epi *e)
{
    float local[4 * BN_FCOLS];
    float *buf = cw <= BN_FCOLS ? NULL : (float *)malloc(4 * (size_t)BN_PAD(cw) * sizeof(float));
    float *cf = buf != NULL ? buf : local;
    const Py_ssize_t block = buf != NULL ? cw : BN_FCOLS;
    Py_ssize_t j0, j;
    for (j0 = 0; j0 < cw; j0 += block) {
        const Py_ssize_t jw = cw - j0 < block ? cw - j0 : block, jp = BN_PAD(jw);
        float *restrict fm = cf, *restrict fs = cf + jp, *restrict fa = cf + 2 * jp,
                        *restrict fc = cf + 3 * jp;
        bn_epi eb;
        for (j = 0; j < jw; j++)
            BN_FN(bn_out_coefs)(
                m, S, dy == NULL ? NULL : A, Cc, j0 + j, fm + j, fs + j, fa + j, fc + j);
        for (; j < jp; j++) /* the padding's (BN_OPAD) */
            fm[j] = fs[j] = fa[j] = fc[j] = 0.0f;
        if (e != NULL) {
            eb = *e;
            eb.aux = e->aux == NULL ? NULL : (const BN_T *)e->aux + j0;
            eb.out2 = e->out2 == NULL ? NULL : (BN_T *)e->out2 + j0;
        }
        BN_FN(bn_rows_affine_cols)(
            z + j0, dy == NULL ? NULL : dy + j0, out + j0, sz, sdy, sout, nrows, jw, fm, fs, fa, fc,
            stream, e == NULL ? NULL : &eb);
    }
    free(buf);
}
#else
static BN_TASK void BN_FN(bn_rows_affine)(
    const BN_T *restrict z, const BN_T *restrict dy, BN_T *restrict out, Py_ssize_t sz,
    Py_ssize_t sdy, Py_ssize_t sout, Py_ssize_t nrows, Py_ssize_t cw, const double *restrict m,
    const double *restrict S, const double *restrict A, const double *restrict Cc, int stream,
    const bn_epi *e)
{
    BN_FN(bn_rows_affine_cols)(z, dy, out, sz, sdy, sout, nrows, cw, m, S, A, Cc, stream, e);
}
#endif

/* One column block of bn_rows_centered (inlined as bn_rows_sums_block) */
static inline __attribute__((always_inline)) void BN_FN(bn_rows_centered_block)(
    const BN_T *restrict x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw, Py_ssize_t j0,
    const Py_ssize_t jw, const int wide, const double *restrict mb, double *restrict a,
    double *restrict b)
{
    const Py_ssize_t G = BN_GROUP(jw, sx == jw, BN_PIECE);
    Py_ssize_t j, r, rr, g;
/* as BN_SUMS_ROW */
#define BN_CENTERED_ROW(k)                                \
    do {                                                  \
        BN_SIMD                                           \
        for (j = 0; j < jw; j++) {                        \
            const double e = BN_LDI(xs[(k) + j]) - mb[j]; \
            a[j] += e;                                    \
            b[j] += e * e;                                \
        }                                                 \
    } while (0)
    if (G == 1) {
        if (wide && jw >= BN_DIRECT_COLS && BN_ROWS_MOMENTS_DIRECT(x + j0, sx, nrows, jw, mb, a, b))
            return;
        r = 0;
        if (wide && BN_WIDE_PAIRS(sx == jw)) { /* fours, then a pair */
            for (; r + 3 < nrows; r += 4) {
                BN_IN(x0, x + r * sx + j0, jw);
                BN_IN(x1, x + (r + 1) * sx + j0, jw);
                BN_IN(x2, x + (r + 2) * sx + j0, jw);
                BN_IN(x3, x + (r + 3) * sx + j0, jw);
                BN_SIMD
                for (j = 0; j < jw; j++) {
                    const double e0 = BN_LDI(x0[j]) - mb[j], e1 = BN_LDI(x1[j]) - mb[j],
                                 e2 = BN_LDI(x2[j]) - mb[j], e3 = BN_LDI(x3[j]) - mb[j];
                    a[j] = a[j] + e0 + e1 + e2 + e3;
                    b[j] = b[j] + e0 * e0 + e1 * e1 + e2 * e2 + e3 * e3;
                }
            }
            for (; r + 1 < nrows; r += 2) {
                BN_IN(xs, x + r * sx + j0, jw);
                BN_IN(xt, x + (r + 1) * sx + j0, jw);
                BN_SIMD
                for (j = 0; j < jw; j++) {
                    const double e = BN_LDI(xs[j]) - mb[j], f = BN_LDI(xt[j]) - mb[j];
                    a[j] = a[j] + e + f;
                    b[j] = b[j] + e * e + f * f;
                }
            }
        }
        for (; r < nrows; r++) {
            BN_IN(xs, x + r * sx + j0, jw);
            if (!wide)
                BN_FN(bn_prefetch_ahead)(x, sx, nrows, cw, j0, jw, r, 0);
            BN_CENTERED_ROW(0);
        }
        return;
    }
    for (r = 0; r < nrows; r += g) {
        g = nrows - r < G ? nrows - r : G;
        BN_IN(xs, x + r * sx + j0, g * jw);
        for (rr = 0; rr < g; rr++)
            BN_CENTERED_ROW(rr * jw);
    }
#undef BN_CENTERED_ROW
}

/* d1[j] := sum_r (x[r, j] - m0[j]);  d2[j] := sum_r (x[r, j] - m0[j])^2, in row order */
static BN_TASK void BN_FN(bn_rows_centered)(
    const BN_T *restrict x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw,
    const double *restrict m0, double *restrict d1, double *restrict d2)
{
#define BN_CENTERED_BLOCK(r0, nr, j0, jw, wide, mb, p, q) \
    BN_FN(bn_rows_centered_block)(x + (r0) * sx, sx, nr, cw, j0, jw, wide, mb, p, q)
    BN_ROWS_SWEEP(BN_CENTERED_BLOCK, BN_WIDE_ROWS(cw), m0, d1, d2);
#undef BN_CENTERED_BLOCK
}

/* ---- planar layout: runs of contiguous elements ---- */

/* *s_dy += sum dy;  *s_zm += sum dy * (z - m)  over a run of n (mask: dy masked by y), in
 * BN_LANES lanes; float16 in pieces of BN_ISTAGE (a multiple of the lanes: the same sums),
 * or unmasked in one pass where BN_SUMS_DIRECT can */
static inline __attribute__((always_inline)) void BN_FN(bn_run_sums)(
    const BN_T *restrict z, const BN_T *restrict dy, const BN_T *restrict y, const int mask,
    Py_ssize_t n, double m, double *restrict s_dy, double *restrict s_zm)
{
    if (!mask && BN_SUMS_DIRECT(z, dy, n, m, s_dy, s_zm))
        return;
    double a[BN_LANES] = {0.0}, b[BN_LANES] = {0.0};
    Py_ssize_t i0, i, j, np;
    for (i0 = 0; i0 < n; i0 += np) {
        np = n - i0 < BN_PIECE ? n - i0 : BN_PIECE;
        BN_IN(zs, z + i0, np);
        BN_IN(dys, dy + i0, np);
        BN_IN(ys, mask ? y + i0 : NULL, mask ? np : 0);
        for (i = 0; i + BN_LANES <= np; i += BN_LANES) {
            BN_SIMD
            for (j = 0; j < BN_LANES; j++) {
                double v = BN_DY(mask, ys, dys, i + j);
                a[j] += v;
                b[j] += v * (BN_LDI(zs[i + j]) - m);
            }
        }
        for (j = 0; i < np; i++, j++) {
            double v = BN_DY(mask, ys, dys, i);
            a[j] += v;
            b[j] += v * (BN_LDI(zs[i]) - m);
        }
    }
    *s_dy += bn_tree(a);
    *s_zm += bn_tree(b);
}

/* *s1 += sum (x - m0);  *s2 += sum (x - m0)^2  over a run of n (pieces as bn_run_sums) */
static inline __attribute__((always_inline)) void BN_FN(bn_run_moments)(
    const BN_T *restrict x, Py_ssize_t n, double m0, double *restrict s1, double *restrict s2)
{
    /* runs of sixteen or more (float16 planes of 144 to 256 measured faster so, once the
     * lanes' trees stayed in registers; docs/performance.md); shorter ones are not measured */
    if (n >= 16 && BN_MOMENTS_DIRECT(x, n, m0, s1, s2))
        return;
    double a[BN_LANES] = {0.0}, b[BN_LANES] = {0.0};
    Py_ssize_t i0, i, j, np;
    for (i0 = 0; i0 < n; i0 += np) {
        np = n - i0 < BN_PIECE ? n - i0 : BN_PIECE;
        BN_IN(xs, x + i0, np);
        for (i = 0; i + BN_LANES <= np; i += BN_LANES) {
            BN_SIMD
            for (j = 0; j < BN_LANES; j++) {
                double d = BN_LDI(xs[i + j]) - m0;
                a[j] += d;
                b[j] += d * d;
            }
        }
        for (j = 0; i < np; i++, j++) {
            double d = BN_LDI(xs[i]) - m0;
            a[j] += d;
            b[j] += d * d;
        }
    }
    *s1 += bn_tree(a);
    *s2 += bn_tree(b);
}

/* s_dy[c] := sum dy;  s_zm[c] := sum dy * (z - m[c])  over elements [e0, e1) of channel c;
 * y (strides syn, syc) not NULL: dy masked by it first (bn_masked) */
static BN_TASK void BN_FN(bn_plane_sums)(
    const BN_T *restrict z, const BN_T *restrict dy, const BN_T *restrict y, Py_ssize_t szn,
    Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc, Py_ssize_t syn, Py_ssize_t syc, Py_ssize_t L,
    Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw, const double *restrict m, double *restrict s_dy,
    double *restrict s_zm)
{
    Py_ssize_t n, c, l0, l1;
    for (c = 0; c < cw; c++) {
        s_dy[c] = 0.0;
        s_zm[c] = 0.0;
    }
    for (n = e0 / L; n * L < e1; n++) {
        bn_span(n, L, e0, e1, &l0, &l1);
        for (c = 0; c < cw; c++) {
            const BN_T *zp = z + n * szn + c * szc + l0, *dyp = dy + n * sdyn + c * sdyc + l0;
            if (y == NULL)
                BN_FN(bn_run_sums)(zp, dyp, NULL, 0, l1 - l0, m[c], s_dy + c, s_zm + c);
            else
                BN_FN(bn_run_sums)(
                    zp, dyp, y + n * syn + c * syc + l0, 1, l1 - l0, m[c], s_dy + c, s_zm + c);
        }
    }
}

#ifdef BN_F16
#undef BN_HPLANES
#define BN_HPLANES 64 /* channels whose float coefficients bn_plane_affine keeps at once */
#endif

/* out := A[c]*(dy + Cc[c]) + S[c]*(z - m[c]) over elements [e0, e1);
 * without dy: out := S[c]*(z - m[c]) + Cc[c]  (in BN_OT, as bn_rows_affine) */
static BN_TASK void BN_FN(bn_plane_affine)(
    const BN_T *restrict z, const BN_T *restrict dy, BN_T *restrict out, Py_ssize_t szn,
    Py_ssize_t szc, Py_ssize_t sdyn, Py_ssize_t sdyc, Py_ssize_t soutn, Py_ssize_t soutc,
    Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1, Py_ssize_t cw, const double *restrict m,
    const double *restrict S, const double *restrict A, const double *restrict Cc, int stream,
    const bn_epi *e)
{
    Py_ssize_t n, c, l0, l1;
    if (e != NULL) { /* a fused epilogue: run by run, as below */
        const BN_T *aux = e->aux;
        BN_T *out2 = e->out2;
        for (n = e0 / L; n * L < e1; n++) {
            bn_span(n, L, e0, e1, &l0, &l1);
            for (c = 0; c < cw; c++) {
                BN_OT mc, sc, a, cc;
                BN_FN(bn_out_coefs)(m, S, dy == NULL ? NULL : A, Cc, c, &mc, &sc, &a, &cc);
                BN_FN(bn_epi_any)(
                    z + n * szn + c * szc + l0, dy == NULL ? NULL : dy + n * sdyn + c * sdyc + l0,
                    aux == NULL ? NULL : aux + n * e->aux_n + c * e->aux_c + l0,
                    out + n * soutn + c * soutc + l0,
                    out2 == NULL ? NULL : out2 + n * e->out2_n + c * e->out2_c + l0, l1 - l0, &mc,
                    &sc, &a, &cc, 0, 1, 0, 0, 0, e);
            }
        }
        return;
    }
#if defined(BN_F64) && defined(__SSE2__)
    if (stream) {
        for (n = e0 / L; n * L < e1; n++) {
            bn_span(n, L, e0, e1, &l0, &l1);
            for (c = 0; c < cw; c++)
                bn_plane_affine_stream(
                    z + n * szn + c * szc + l0, dy == NULL ? NULL : dy + n * sdyn + c * sdyc + l0,
                    out + n * soutn + c * soutc + l0, l1 - l0, m[c], S[c], dy == NULL ? 0.0 : A[c],
                    Cc[c]);
        }
        _mm_sfence();
        return;
    }
#endif
    (void)stream;
#ifdef BN_F16
    /* whole planes of 16 or more that follow one another (NCHW): each image's planes of up to
     * BN_HPLANES channels as one run (bn_h_planes), not one run a plane with a masked tail */
    if (szc == L && soutc == L && (dy == NULL || sdyc == L) && L >= 16 && e0 % L == 0 &&
        e1 % L == 0) {
        float cf[4 * BN_HPLANES];
        Py_ssize_t c0, g;
        int done = 1;
        for (c0 = 0; c0 < cw && done; c0 += g) {
            g = cw - c0 < BN_HPLANES ? cw - c0 : BN_HPLANES;
            for (c = 0; c < g; c++)
                BN_FN(bn_out_coefs)(
                    m, S, dy == NULL ? NULL : A, Cc, c0 + c, cf + c, cf + BN_HPLANES + c,
                    cf + 2 * BN_HPLANES + c, cf + 3 * BN_HPLANES + c);
            for (n = e0 / L; n * L < e1 && done; n++)
                done = bn_h_planes(
                    z + n * szn + c0 * L, dy == NULL ? NULL : dy + n * sdyn + c0 * L,
                    out + n * soutn + c0 * L, L, g, cf, cf + BN_HPLANES, cf + 2 * BN_HPLANES,
                    cf + 3 * BN_HPLANES);
        }
        if (done)
            return;
    }
#endif
    for (n = e0 / L; n * L < e1; n++) {
        bn_span(n, L, e0, e1, &l0, &l1);
        for (c = 0; c < cw; c++) {
            const BN_T *restrict zp = z + n * szn + c * szc;
            BN_T *restrict op = out + n * soutn + c * soutc;
            BN_OT mc, sc, a, cc;
            BN_FN(bn_out_coefs)(m, S, dy == NULL ? NULL : A, Cc, c, &mc, &sc, &a, &cc);
            if (BN_OUT_DIRECT(
                    zp + l0, dy == NULL ? NULL : dy + n * sdyn + c * sdyc + l0, NULL, op + l0, NULL,
                    l1 - l0, &mc, &sc, &a, &cc, 0, 0, 1, 1, 0, 0, 0, 0, 0))
                continue;
            if (dy == NULL) {
#define BN_RUN_OUT(k, zk, dyk) BN_AFFINE_OUT(sc, zk, mc, cc)
                BN_OUT_RUN(op, l0, l1, zp, (const BN_T *)NULL, BN_RUN_OUT);
#undef BN_RUN_OUT
            } else {
                const BN_T *restrict dyp = dy + n * sdyn + c * sdyc;
#define BN_RUN_DX(k, zk, dyk) BN_AFFINE_DX(a, dyk, cc, sc, zk, mc)
                BN_OUT_RUN(op, l0, l1, zp, dyp, BN_RUN_DX);
#undef BN_RUN_DX
            }
        }
    }
}

/* Mean and M2 of cw channels over elements [e0, e1) in one pass over x - K, K the
 * channel's first element there (see _rows_task_moments); d1: scratch of cw. */
static BN_TASK void BN_FN(bn_plane_moments)(
    const BN_T *restrict x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L, Py_ssize_t e0,
    Py_ssize_t e1, Py_ssize_t cw, double *restrict mean, double *restrict m2, double *restrict d1)
{
    const double cnt = (double)(e1 - e0);
    Py_ssize_t n, c, l0, l1;
    for (c = 0; c < cw; c++) {
        mean[c] = BN_LD(x[(e0 / L) * sxn + c * sxc + e0 % L]);
        m2[c] = 0.0;
        d1[c] = 0.0;
    }
    for (n = e0 / L; n * L < e1; n++) {
        bn_span(n, L, e0, e1, &l0, &l1);
        for (c = 0; c < cw; c++)
            BN_FN(bn_run_moments)(x + n * sxn + c * sxc + l0, l1 - l0, mean[c], d1 + c, m2 + c);
    }
    for (c = 0; c < cw; c++) {
        mean[c] += d1[c] / cnt;
        m2[c] -= d1[c] * d1[c] / cnt;
        if (m2[c] < 0.0)
            m2[c] = 0.0;
    }
}

/* out := a + b: the roofline pass of the benchmark (read two arrays, write one) */
static BN_TASK void BN_FN(bn_stream_add)(
    const BN_T *restrict a, const BN_T *restrict b, BN_T *restrict out, Py_ssize_t n)
{
    Py_ssize_t i;
    BN_SIMD
    for (i = 0; i < n; i++)
#ifdef BN_F16
        /* the bits added as integers: the traffic of the pass without the conversions a
         * float16 sum would need on CPUs without float16 arithmetic */
        out[i] = (uint16_t)(a[i] + b[i]);
#else
        out[i] = a[i] + b[i];
#endif
}

/* ---- the dtype's table (bn_loops): entry points that take untyped data pointers ---- */

static void BN_FN(bn_rows_sums_v)(
    const void *z, const void *dy, const void *y, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sy,
    Py_ssize_t nrows, Py_ssize_t cw, const double *m, double *s_dy, double *s_zm)
{
    BN_FN(bn_rows_sums)(z, dy, y, sz, sdy, sy, nrows, cw, m, s_dy, s_zm);
}

static void BN_FN(bn_rows_centered_v)(
    const void *x, Py_ssize_t sx, Py_ssize_t nrows, Py_ssize_t cw, const double *m0, double *d1,
    double *d2)
{
    BN_FN(bn_rows_centered)(x, sx, nrows, cw, m0, d1, d2);
}

static void BN_FN(bn_rows_affine_v)(
    const void *z, const void *dy, void *out, Py_ssize_t sz, Py_ssize_t sdy, Py_ssize_t sout,
    Py_ssize_t nrows, Py_ssize_t cw, const double *m, const double *S, const double *A,
    const double *Cc, int stream, const bn_epi *e)
{
    BN_FN(bn_rows_affine)(z, dy, out, sz, sdy, sout, nrows, cw, m, S, A, Cc, stream, e);
}

static void BN_FN(bn_plane_sums_v)(
    const void *z, const void *dy, const void *y, Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn,
    Py_ssize_t sdyc, Py_ssize_t syn, Py_ssize_t syc, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1,
    Py_ssize_t cw, const double *m, double *s_dy, double *s_zm)
{
    BN_FN(bn_plane_sums)(z, dy, y, szn, szc, sdyn, sdyc, syn, syc, L, e0, e1, cw, m, s_dy, s_zm);
}

static void BN_FN(bn_plane_moments_v)(
    const void *x, Py_ssize_t sxn, Py_ssize_t sxc, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1,
    Py_ssize_t cw, double *mean, double *m2, double *d1)
{
    BN_FN(bn_plane_moments)(x, sxn, sxc, L, e0, e1, cw, mean, m2, d1);
}

static void BN_FN(bn_plane_affine_v)(
    const void *z, const void *dy, void *out, Py_ssize_t szn, Py_ssize_t szc, Py_ssize_t sdyn,
    Py_ssize_t sdyc, Py_ssize_t soutn, Py_ssize_t soutc, Py_ssize_t L, Py_ssize_t e0, Py_ssize_t e1,
    Py_ssize_t cw, const double *m, const double *S, const double *A, const double *Cc, int stream,
    const bn_epi *e)
{
    BN_FN(bn_plane_affine)(
        z, dy, out, szn, szc, sdyn, sdyc, soutn, soutc, L, e0, e1, cw, m, S, A, Cc, stream, e);
}

static const bn_loops BN_FN(bn_loops) = {
    BN_FN(bn_rows_sums_v),  BN_FN(bn_rows_centered_v), BN_FN(bn_rows_affine_v),
    BN_FN(bn_plane_sums_v), BN_FN(bn_plane_moments_v), BN_FN(bn_plane_affine_v),
};
