/* Cycles per vector FMA of the CPU stencil kernel's two inner loops, alone,
 * on synthetic panels shaped as the kernel's ([key row][d][x], 64 wide, a
 * 7 x 7 window, 16 floats of padding): what the loop structure allows when
 * nothing else runs, to compare with the kernel's measured cost.
 *
 *   cc -O3 -march=x86-64-v3 benchmarks/stencil_probe.c -o stencil_probe
 *   ./stencil_probe MODE DIM      MODE: pv | qkpv | tworow, or pvnc | qkpvnc
 *
 * pv:     the P x V loop alone (strip_weighted: 8 accumulators over d, one
 *         entry at a time);
 * qkpv:   per strip of 8 queries, Q x K^T for the 49 entries (strip_dots)
 *         and then P x V, as the forward does;
 * tworow: the same for two query rows at once, each key vector loaded once
 *         for both rows (d in blocks of 4 to keep both rows' queries in
 *         registers).
 * pvnc, qkpvnc: pv and qkpv with no load crossing a cache line: the panels
 *         have a second copy 32 bytes off the lines, and a load that would
 *         cross one reads the copy instead.
 * Prints ns and cycles (at --ghz, default 3.06) per useful vector FMA. */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { WIDTH = 64, HEIGHT = 64, PAD = 16, RADIUS = 3, SIDE = 2 * RADIUS + 1, ENTRIES = SIDE * SIDE };

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float *filled(long count, int modulus)
{
    float *x = aligned_alloc(64, (size_t)count * sizeof(float));
    for (long i = 0; i < count; i++) x[i] = 0.01f * (float)(i % modulus);
    return x;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s pv|qkpv|tworow|pvnc|qkpvnc DIM [GHZ]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    const int dim = atoi(argv[2]);
    const double ghz = argc > 3 ? atof(argv[3]) : 3.06;
    if (dim < 8 || dim % 8) {
        fprintf(stderr, "DIM: a multiple of 8, got %d\n", dim);
        return 2;
    }
    const long kw = WIDTH + 2 * PAD, row_floats = (long)dim * kw + 16;
    const long panel = row_floats * (HEIGHT + SIDE);
    const long shift = (panel + 15) / 16 * 16 + 8; /* where the copy 32 bytes off the lines starts */
    const int no_cross = strstr(mode, "nc") != NULL;
    float *keys = filled(shift + panel, 7), *values = filled(shift + panel, 5);
    memcpy(keys + shift, keys, (size_t)panel * sizeof(float));
    memcpy(values + shift, values, (size_t)panel * sizeof(float));
    float *queries = filled((long)dim * WIDTH * (HEIGHT + 1), 11);
    __m256 scores[2][SIDE + 1][SIDE];
    float sink[2][64 * 8] __attribute__((aligned(32)));
    double best = 1e30;
    long useful = 0;
    for (int rep = 0; rep < 5; rep++) {
        const double start = now();
        useful = 0;
        const int rows = strcmp(mode, "tworow") == 0 ? 2 : 1;
        for (int y = 0; y < HEIGHT; y += rows) {
            for (int x0 = 0; x0 < WIDTH; x0 += 8) {
                const float *q0 = queries + (long)y * dim * WIDTH + x0, *q1 = q0 + (long)dim * WIDTH;
                /* key row y - RADIUS + r sits at panel row y + r */
                const float *kband = keys + (long)y * row_floats + PAD + x0 - RADIUS;
                const float *vband = values + (long)y * row_floats + PAD + x0 - RADIUS;
                memset(scores, 0, sizeof(scores));
                if (strncmp(mode, "pv", 2) != 0) {
                    const int step = rows == 2 ? 4 : 8;
                    for (int d0 = 0; d0 < dim; d0 += step) {
                        __m256 a[8], b[4];
                        for (int i = 0; i < step; i++) a[i] = _mm256_loadu_ps(q0 + (long)(d0 + i) * WIDTH);
                        if (rows == 2)
                            for (int i = 0; i < 4; i++) b[i] = _mm256_loadu_ps(q1 + (long)(d0 + i) * WIDTH);
                        for (int r = 0; r < SIDE + rows - 1; r++) {
                            for (int dx = 0; dx < SIDE; dx++) {
                                const float *k = kband + r * row_floats + dx + (long)d0 * kw;
                                if (no_cross && ((k - keys) & 15) > 8) k += shift;
                                __m256 s0 = r < SIDE ? scores[0][r][dx] : _mm256_setzero_ps();
                                __m256 s1 = r > 0 ? scores[1][r][dx] : _mm256_setzero_ps();
                                for (int i = 0; i < step; i++) {
                                    const __m256 key = _mm256_loadu_ps(k + i * kw);
                                    s0 = _mm256_fmadd_ps(a[i], key, s0);
                                    if (rows == 2) s1 = _mm256_fmadd_ps(b[i], key, s1);
                                }
                                if (r < SIDE) scores[0][r][dx] = s0;
                                if (rows == 2 && r > 0) scores[1][r][dx] = s1;
                            }
                        }
                        useful += (long)rows * step * ENTRIES;
                    }
                }
                const int step = rows == 2 ? 4 : 8;
                for (int d0 = 0; d0 < dim; d0 += step) {
                    __m256 acc0[8], acc1[4];
                    for (int i = 0; i < 8; i++) acc0[i] = _mm256_setzero_ps();
                    for (int i = 0; i < 4; i++) acc1[i] = _mm256_setzero_ps();
                    for (int r = 0; r < SIDE + rows - 1; r++) {
                        for (int dx = 0; dx < SIDE; dx++) {
                            const float *v = vband + r * row_floats + dx + (long)d0 * kw;
                            if (no_cross && ((v - values) & 15) > 8) v += shift;
                            const __m256 w0 = r < SIDE ? scores[0][r][dx] : _mm256_setzero_ps();
                            const __m256 w1 = r > 0 ? scores[1][r][dx] : _mm256_setzero_ps();
                            for (int i = 0; i < step; i++) {
                                const __m256 value = _mm256_loadu_ps(v + i * kw);
                                acc0[i] = _mm256_fmadd_ps(w0, value, acc0[i]);
                                if (rows == 2) acc1[i] = _mm256_fmadd_ps(w1, value, acc1[i]);
                            }
                        }
                    }
                    for (int i = 0; i < step; i++) {
                        _mm256_store_ps(sink[0] + (d0 + i) % 64 * 8, acc0[i]);
                        if (rows == 2) _mm256_store_ps(sink[1] + (d0 + i) % 64 * 8, acc1[i]);
                    }
                    useful += (long)rows * step * ENTRIES;
                }
            }
        }
        const double took = now() - start;
        if (took < best) best = took;
    }
    printf("%s, D = %d: %.3f ns, %.2f cycles per useful vector FMA (checksum %g)\n", mode, dim,
           best / useful * 1e9, best / useful * ghz * 1e9, sink[0][3] + sink[1][5]);
    free(keys);
    free(values);
    free(queries);
    return 0;
}
