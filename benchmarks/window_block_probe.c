/* A 7 x 7 window's forward for one (batch, head) with the eight lanes of a
 * vector holding eight queries of a small block of the grid (2 x 4 by
 * default) instead of eight neighbours of one image row, and with every load
 * aligned or a broadcast:
 *
 *   Q x K^T: each key of the block's union of windows (8 x 10 keys for a
 *            2 x 4 block) is broadcast d by d from its row of K (row-major,
 *            as the caller holds it) against the block's queries transposed
 *            ([d][8 lanes]); a union row's keys accumulate in registers.
 *   softmax: lane by lane down the union, masked by a per-slot lane table.
 *   P x V:   two neighbouring queries at a time, vectors over d: each value
 *            row (row-major, aligned) is loaded once for both, their weights
 *            broadcast.
 *
 * The union wastes lanes (61% of the Q x K^T lanes and 87% of the P x V
 * FMAs are pairs of the window for a 2 x 4 block), but no load is shifted
 * and nothing but the queries is transposed. The grid has a halo of keys so
 * that no block meets a border (this measures the interior's loop).
 *
 *   cc -O3 -march=x86-64-v3 -ffp-contract=fast benchmarks/window_block_probe.c -o window_block_probe -lm
 *   ./window_block_probe BY DIM [GHZ]     BY: 1, 2 or 4 (block BY x 8 / BY)
 *
 * Prints ms per (batch, head) at 64 x 64 and cycles per useful vector FMA
 * (two per pair and eight d). */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../csrc/simd8.h"
#include "window_probe_common.h"

enum { WIDTH = 64, HEIGHT = 64, RADIUS = 3, SIDE = 2 * RADIUS + 1 };
enum { PADDED_W = WIDTH + 2 * RADIUS, PADDED_H = HEIGHT + 2 * RADIUS };

/* One block's forward; BY x BX lanes, union UH x UW slots. */
static inline __attribute__((always_inline)) void block_forward(
    const float *restrict q, const float *restrict k, const float *restrict v, float *restrict out,
    int y0, int x0, int dim, const int by, const int bx, const v8 *restrict slot_mask, v8 *restrict scores,
    float scale)
{
    const int uh = by + 2 * RADIUS, uw = bx + 2 * RADIUS;
    v8 qt[64];
    /* queries transposed: qt[d][lane] */
    for (int d0 = 0; d0 < dim; d0 += 8) {
        v8 rows[8];
        for (int l = 0; l < 8; l++) rows[l] = LOADU(q + ((long)(y0 + l / bx) * WIDTH + x0 + l % bx) * dim + d0);
        transpose8(rows);
        for (int i = 0; i < 8; i++) qt[d0 + i] = rows[i];
    }
    for (int r = 0; r < uh; r++) {
        /* union row r: padded key row y0 + r, columns x0 .. x0 + uw - 1 (padded coordinates) */
        const float *krow = k + ((long)(y0 + r) * PADDED_W + x0) * dim;
        v8 acc[14];
        for (int j = 0; j < uw; j++) acc[j] = SPLAT(0.0f);
        for (int d = 0; d < dim; d++) {
            const v8 qd = qt[d];
            for (int j = 0; j < uw; j++) acc[j] += qd * krow[j * dim + d];
        }
        for (int j = 0; j < uw; j++) scores[r * uw + j] = acc[j] * scale + slot_mask[r * uw + j];
    }
    const int slots = uh * uw;
    v8 top = SPLAT(-INFINITY);
    for (int s = 0; s < slots; s++) top = SELECT(scores[s] > top, scores[s], top);
    v8 sum = SPLAT(0.0f);
    int s = 0;
    for (; s + 4 <= slots; s += 4) {
        v8 x[4] = {scores[s] - top, scores[s + 1] - top, scores[s + 2] - top, scores[s + 3] - top};
        exp_lanes(x, 4);
        for (int i = 0; i < 4; i++) {
            scores[s + i] = x[i];
            sum += x[i];
        }
    }
    for (; s < slots; s++) {
        scores[s] = exp_v8(scores[s] - top);
        sum += scores[s];
    }
    const v8 inv = SPLAT(1.0f) / sum;
    const float *weights = (const float *)scores; /* [slot][lane] */
    for (int l = 0; l < 8; l += 2) {
        const int ly = l / bx, lx = l % bx;
        for (int d0 = 0; d0 < dim; d0 += 32) {
            v8 a0[4] = {0}, a1[4] = {0};
            for (int r = ly; r < ly + SIDE; r++) {
                for (int c = lx; c < lx + SIDE + 1; c++) {
                    const int slot = r * uw + c;
                    const float w0 = weights[slot * 8 + l], w1 = weights[slot * 8 + l + 1];
                    const float *vrow = v + ((long)(y0 + r) * PADDED_W + x0 + c) * dim + d0;
                    for (int i = 0; i < 4; i++) {
                        const v8 value = *(const v8 *)(vrow + 8 * i);
                        a0[i] += w0 * value;
                        a1[i] += w1 * value;
                    }
                }
            }
            float *o0 = out + ((long)(y0 + ly) * WIDTH + x0 + lx) * dim + d0, *o1 = o0 + dim;
            for (int i = 0; i < 4; i++) {
                STOREU(o0 + 8 * i, a0[i] * inv[l]);
                STOREU(o1 + 8 * i, a1[i] * inv[l + 1]);
            }
        }
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s BY DIM [GHZ]\n", argv[0]);
        return 2;
    }
    const int by = atoi(argv[1]), dim = atoi(argv[2]);
    const double ghz = argc > 3 ? atof(argv[3]) : 3.06;
    if ((by != 1 && by != 2 && by != 4) || dim < 32 || dim % 32 || dim > 64) {
        fprintf(stderr, "BY: 1, 2 or 4; DIM: 32 or 64\n");
        return 2;
    }
    const int bx = 8 / by, uh = by + 2 * RADIUS, uw = bx + 2 * RADIUS;
    float *q = filled((long)WIDTH * HEIGHT * dim, 1), *out = filled((long)WIDTH * HEIGHT * dim, 2);
    float *k = filled((long)PADDED_W * PADDED_H * dim, 3), *v = filled((long)PADDED_W * PADDED_H * dim, 4);
    v8 slot_mask[14 * 10], scores[14 * 10];
    for (int r = 0; r < uh; r++)
        for (int c = 0; c < uw; c++)
            for (int l = 0; l < 8; l++) {
                const int dy = r - l / bx, dx = c - l % bx; /* 0 .. 2 RADIUS inside the window */
                slot_mask[r * uw + c][l] = dy >= 0 && dy < SIDE && dx >= 0 && dx < SIDE ? 0.0f : -INFINITY;
            }
    const float scale = 1.0f / sqrtf((float)dim);
    /* check one query against a scalar computation */
    double best = 1e30;
    for (int rep = 0; rep < 7; rep++) {
        const double start = now();
        for (int y0 = 0; y0 < HEIGHT; y0 += by)
            for (int x0 = 0; x0 < WIDTH; x0 += bx) {
                if (by == 1) block_forward(q, k, v, out, y0, x0, dim, 1, 8, slot_mask, scores, scale);
                else if (by == 2) block_forward(q, k, v, out, y0, x0, dim, 2, 4, slot_mask, scores, scale);
                else block_forward(q, k, v, out, y0, x0, dim, 4, 2, slot_mask, scores, scale);
            }
        const double took = now() - start;
        if (took < best) best = took;
    }
    const double worst = window_probe_error(q, k, v, out, WIDTH, HEIGHT, PADDED_W, RADIUS, dim, scale, 50);
    const double useful = (double)WIDTH * HEIGHT * SIDE * SIDE * dim / 8 * 2;
    printf("block %dx%d, D = %d: %.3f ms per (batch, head), %.2f cycles per useful vector FMA, max error %.2g\n",
           by, bx, dim, best * 1e3, best / useful * ghz * 1e9, worst);
    free(q);
    free(out);
    free(k);
    free(v);
    return 0;
}
