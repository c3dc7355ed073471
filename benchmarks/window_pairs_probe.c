/* A 7 x 7 window's forward for one (batch, head), D = 32, with a vector's
 * two 128-bit halves holding two horizontally neighbouring queries and four
 * of d each, instead of eight queries of a 4 x 2 block (the window kernel).
 *
 *   Q x K^T: the pair's union is 7 x 8 keys (56 slots, 49 used by each query;
 *            the kernel's 4 x 2 block has 80 slots for 49). Each key's four d
 *            at a time are broadcast to both halves (vbroadcastf128) against
 *            the pair's queries held in eight registers; a union row's eight
 *            keys are reduced by six horizontal adds and two lane swaps into
 *            one vector of scores per query.
 *   softmax: per query over its seven score vectors (one lane masked a row).
 *   P x V:   both queries together, vectors over d: each value row is loaded
 *            once for both.
 *
 * The grid has a halo of keys so that no pair meets a border (this measures
 * the interior's loop, as window_block_probe.c does for the 4 x 2 block).
 *
 *   cc -O3 -march=native -ffp-contract=fast benchmarks/window_pairs_probe.c -o window_pairs_probe -lm
 *   ./window_pairs_probe [ITEMS]     ITEMS (batch, head) pairs cycled (default 1)
 *
 * Prints ms per (batch, head) at 64 x 64 for the pair layout and, in the same
 * run, for the 4 x 2 block's Q x K^T + softmax + P x V written the same way.
 * -DQUADS runs P x V for two pairs (a 2 x 2 block) at a time instead.
 *
 * The block here lacks the kernel's prefetches, streaming stores and two-row
 * passes, so it is a weaker baseline than csrc/attention_cpu_window.c: the
 * pairs beat it (0.78-0.94x) but, built into the kernel, lost to the kernel's
 * blocks (benchmarks/NOTES.md, "Horizontal pairs of queries"). */
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../csrc/simd8.h"
#include "window_probe_common.h"

enum { WIDTH = 64, HEIGHT = 64, RADIUS = 3, SIDE = 2 * RADIUS + 1, DIM = 32 };
enum { PADDED_W = WIDTH + 2 * RADIUS + 2, PADDED_H = HEIGHT + 2 * RADIUS };

typedef __m256 m256;

/* eight keys' accumulators ([query 0: 4 partial sums | query 1: 4]) to one
 * score vector per query: lane j holds key j */
static inline __attribute__((always_inline)) void reduce_row(const m256 acc[8], v8 *s0, v8 *s1)
{
    const m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
    const m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
    const m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
    *s0 = (v8)_mm256_permute2f128_ps(lo, hi, 0x20);
    *s1 = (v8)_mm256_permute2f128_ps(lo, hi, 0x31);
}

static inline __attribute__((always_inline)) float hmax(v8 x)
{
    float m = x[0];
    for (int i = 1; i < 8; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static inline __attribute__((always_inline)) float hsum(v8 x)
{
    const __m128 a = _mm_add_ps(_mm256_castps256_ps128((m256)x), _mm256_extractf128_ps((m256)x, 1));
    const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 1)));
}

/* queries (y, x) and (y, x + 1); keys and values padded: key (y + dy, x + dx)
 * of the grid is padded row y + dy + RADIUS, column x + dx + RADIUS. The
 * pair's softmax numerators go to e_out ([q0 rows | q1 rows]), their inverse
 * sums to inv. */
static inline __attribute__((always_inline)) void pair_scores(const float *restrict q, const float *restrict k,
                                                              int y, int x, float scale, v8 *restrict e_out, float *inv)
{
    const float *q0 = q + ((long)y * WIDTH + x) * DIM, *q1 = q0 + DIM;
    m256 qv[8];
    for (int dq = 0; dq < 8; dq++)
        qv[dq] = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(q0 + 4 * dq)), _mm_loadu_ps(q1 + 4 * dq), 1);
    v8 s0[SIDE], s1[SIDE];
    int r = 0;
    for (; r + 2 <= SIDE; r += 2) {
        const float *ka = k + ((long)(y + r) * PADDED_W + x) * DIM, *kb = ka + PADDED_W * DIM;
        m256 acc_a[8], acc_b[8];
        for (int j = 0; j < 8; j++) acc_a[j] = acc_b[j] = _mm256_setzero_ps();
        for (int dq = 0; dq < 8; dq++)
            for (int j = 0; j < 8; j++) {
                acc_a[j] = _mm256_fmadd_ps(qv[dq], _mm256_broadcast_ps((const __m128 *)(ka + j * DIM + 4 * dq)), acc_a[j]);
                acc_b[j] = _mm256_fmadd_ps(qv[dq], _mm256_broadcast_ps((const __m128 *)(kb + j * DIM + 4 * dq)), acc_b[j]);
            }
        reduce_row(acc_a, &s0[r], &s1[r]);
        reduce_row(acc_b, &s0[r + 1], &s1[r + 1]);
    }
    {
        const float *ka = k + ((long)(y + r) * PADDED_W + x) * DIM;
        m256 acc[8], odd[8];
        for (int j = 0; j < 8; j++) acc[j] = odd[j] = _mm256_setzero_ps();
        for (int dq = 0; dq < 8; dq += 2)
            for (int j = 0; j < 8; j++) {
                acc[j] = _mm256_fmadd_ps(qv[dq], _mm256_broadcast_ps((const __m128 *)(ka + j * DIM + 4 * dq)), acc[j]);
                odd[j] = _mm256_fmadd_ps(qv[dq + 1], _mm256_broadcast_ps((const __m128 *)(ka + j * DIM + 4 * dq + 4)), odd[j]);
            }
        for (int j = 0; j < 8; j++) acc[j] = _mm256_add_ps(acc[j], odd[j]);
        reduce_row(acc, &s0[r], &s1[r]);
    }
    /* query 0 reaches union columns 0..6, query 1 columns 1..7 */
    const i8v keep0 = {-1, -1, -1, -1, -1, -1, -1, 0}, keep1 = {0, -1, -1, -1, -1, -1, -1, -1};
    const v8 neg_inf = SPLAT(-INFINITY);
    v8 top0 = neg_inf, top1 = neg_inf;
    for (int i = 0; i < SIDE; i++) {
        s0[i] = SELECT(keep0, s0[i] * scale, neg_inf);
        s1[i] = SELECT(keep1, s1[i] * scale, neg_inf);
        top0 = SELECT(s0[i] > top0, s0[i], top0);
        top1 = SELECT(s1[i] > top1, s1[i], top1);
    }
    const v8 m0 = SPLAT(hmax(top0)), m1 = SPLAT(hmax(top1));
    v8 e[2 * SIDE];
    for (int i = 0; i < SIDE; i++) {
        e[i] = s0[i] - m0;
        e[SIDE + i] = s1[i] - m1;
    }
    exp_lanes(e, 4);
    exp_lanes(e + 4, 4);
    exp_lanes(e + 8, 4);
    exp_lanes(e + 12, 2);
    v8 sum0 = e[0], sum1 = e[SIDE];
    for (int i = 1; i < SIDE; i++) {
        sum0 += e[i];
        sum1 += e[SIDE + i];
    }
    const float inv0 = 1.0f / hsum(sum0), inv1 = 1.0f / hsum(sum1);
    inv[0] = inv0;
    inv[1] = inv1;
    for (int i = 0; i < 2 * SIDE; i++) e_out[i] = e[i];
}

/* queries (y, x) and (y, x + 1): scores, softmax and P x V */
static inline __attribute__((always_inline)) void pair_forward(const float *restrict q, const float *restrict k,
                                                              const float *restrict v, float *restrict out, int y,
                                                              int x, float scale)
{
    v8 e[2 * SIDE];
    float inv[2];
    pair_scores(q, k, y, x, scale, e, inv);
    const float *w0 = (const float *)e, *w1 = (const float *)(e + SIDE);
    v8 a0[4] = {0}, a1[4] = {0};
#ifndef NO_PV
    for (int rr = 0; rr < SIDE; rr++) {
        const float *vrow = v + ((long)(y + rr) * PADDED_W + x) * DIM;
        for (int j = 0; j < 8; j++) {
            const float wa = w0[rr * 8 + j], wb = w1[rr * 8 + j];
            for (int i = 0; i < 4; i++) {
                const v8 value = *(const v8 *)(vrow + j * DIM + 8 * i);
                a0[i] += wa * value;
                a1[i] += wb * value;
            }
        }
    }
#endif
    float *o0 = out + ((long)y * WIDTH + x) * DIM, *o1 = o0 + DIM;
    for (int i = 0; i < 4; i++) {
        STOREU(o0 + 8 * i, a0[i] * inv[0]);
        STOREU(o1 + 8 * i, a1[i] * inv[1]);
    }
}

/* two pairs, (y, x..x+1) and (y + 1, x..x+1): P x V with each value row loaded once for four queries */
static inline __attribute__((always_inline)) void quad_forward(const float *restrict q, const float *restrict k,
                                                              const float *restrict v, float *restrict out, int y,
                                                              int x, float scale)
{
    v8 e[2][2 * SIDE];
    float inv[4];
    pair_scores(q, k, y, x, scale, e[0], inv);
    pair_scores(q, k, y + 1, x, scale, e[1], inv + 2);
    const float *w = (const float *)e;
    v8 acc[4][4];
        memset(acc, 0, sizeof(acc));
    for (int rr = 0; rr < SIDE + 1; rr++) {
        const float *vrow = v + ((long)(y + rr) * PADDED_W + x) * DIM;
        for (int j = 0; j < 8; j++) {
            float wt[4];
            wt[0] = rr < SIDE ? w[rr * 8 + j] : 0.0f;
            wt[1] = rr < SIDE ? w[(SIDE + rr) * 8 + j] : 0.0f;
            wt[2] = rr > 0 ? w[(2 * SIDE + rr - 1) * 8 + j] : 0.0f;
            wt[3] = rr > 0 ? w[(3 * SIDE + rr - 1) * 8 + j] : 0.0f;
            v8 value[4];
            for (int i = 0; i < 4; i++) value[i] = *(const v8 *)(vrow + j * DIM + 8 * i);
            for (int kk = 0; kk < 4; kk++)
                for (int i = 0; i < 4; i++) acc[kk][i] += wt[kk] * value[i];
        }
    }
    for (int kk = 0; kk < 4; kk++) {
        float *o = out + ((long)(y + kk / 2) * WIDTH + x + kk % 2) * DIM;
        for (int i = 0; i < 4; i++) STOREU(o + 8 * i, acc[kk][i] * inv[kk]);
    }
}

/* the 4 x 2 block (lanes = queries), as the window kernel computes it */
static inline __attribute__((always_inline)) void block_forward(const float *restrict q, const float *restrict k,
                                                               const float *restrict v, float *restrict out, int y0,
                                                               int x0, const v8 *restrict slot_mask,
                                                               v8 *restrict scores, float scale)
{
    enum { BY = 4, BX = 2, UH = BY + 2 * RADIUS, UW = BX + 2 * RADIUS };
    v8 qt[DIM];
    for (int d0 = 0; d0 < DIM; d0 += 8) {
        v8 rows[8];
        for (int l = 0; l < 8; l++) rows[l] = LOADU(q + ((long)(y0 + l / BX) * WIDTH + x0 + l % BX) * DIM + d0);
        transpose8(rows);
        for (int i = 0; i < 8; i++) qt[d0 + i] = rows[i];
    }
    for (int r = 0; r + 2 <= UH; r += 2) {
        const float *ka = k + ((long)(y0 + r) * PADDED_W + x0) * DIM, *kb = ka + PADDED_W * DIM;
        v8 acc_a[UW], acc_b[UW];
        for (int j = 0; j < UW; j++) acc_a[j] = acc_b[j] = SPLAT(0.0f);
        for (int d = 0; d < DIM; d++) {
            const v8 qd = qt[d];
            for (int j = 0; j < UW; j++) {
                acc_a[j] += qd * ka[j * DIM + d];
                acc_b[j] += qd * kb[j * DIM + d];
            }
        }
        for (int j = 0; j < UW; j++) {
            scores[r * UW + j] = SELECT((i8v)slot_mask[r * UW + j], acc_a[j] * scale, SPLAT(-INFINITY));
            scores[(r + 1) * UW + j] = SELECT((i8v)slot_mask[(r + 1) * UW + j], acc_b[j] * scale, SPLAT(-INFINITY));
        }
    }
    const int slots = UH * UW;
    v8 top = SPLAT(-INFINITY);
    for (int s = 0; s < slots; s++) top = SELECT(scores[s] > top, scores[s], top);
    v8 sum = SPLAT(0.0f);
    for (int s = 0; s < slots; s += 4) {
        v8 x[4] = {scores[s] - top, scores[s + 1] - top, scores[s + 2] - top, scores[s + 3] - top};
        exp_lanes(x, 4);
        for (int i = 0; i < 4; i++) {
            scores[s + i] = x[i];
            sum += x[i];
        }
    }
    const v8 inv = SPLAT(1.0f) / sum;
    const float *weights = (const float *)scores;
    /* four lanes (two image rows, two columns) a pass over the 8 x 8 keys they reach */
    for (int l = 0; l < 8; l += 4) {
        const int ly = l / BX;
        v8 acc[4][4];
        memset(acc, 0, sizeof(acc));
        for (int r = ly; r < ly + SIDE + 1; r++)
            for (int c = 0; c < UW; c++) {
                const float *vrow = v + ((long)(y0 + r) * PADDED_W + x0 + c) * DIM;
                v8 value[4];
                for (int i = 0; i < 4; i++) value[i] = *(const v8 *)(vrow + 8 * i);
                for (int kk = 0; kk < 4; kk++) {
                    const float w = weights[(r * UW + c) * 8 + l + kk];
                    for (int i = 0; i < 4; i++) acc[kk][i] += w * value[i];
                }
            }
        for (int kk = 0; kk < 4; kk++) {
            float *o = out + ((long)(y0 + ly + kk / 2) * WIDTH + x0 + kk % 2) * DIM;
            for (int i = 0; i < 4; i++) STOREU(o + 8 * i, acc[kk][i] * inv[l + kk]);
        }
    }
}

int main(int argc, char **argv)
{
    const int items = argc > 1 ? atoi(argv[1]) : 1;
    const long qn = (long)WIDTH * HEIGHT * DIM, kn = (long)PADDED_W * PADDED_H * DIM;
    float *q = filled(qn * items, 1), *out = filled(qn * items, 2);
    float *k = filled(kn * items, 3), *v = filled(kn * items, 4);
    v8 slot_mask[10 * 8], scores[10 * 8];
    for (int r = 0; r < 10; r++)
        for (int c = 0; c < 8; c++)
            for (int l = 0; l < 8; l++) {
                const int dy = r - l / 2, dx = c - l % 2;
                ((i8v *)slot_mask)[r * 8 + c][l] = dy >= 0 && dy < SIDE && dx >= 0 && dx < SIDE ? -1 : 0;
            }
    const float scale = 1.0f / sqrtf((float)DIM);
    double best[2] = {1e30, 1e30}, worst[2] = {0, 0};
    for (int rep = 0; rep < 15; rep++)
        for (int variant = 0; variant < 2; variant++) {
            const int which = rep % 2 ? variant : 1 - variant;
            const double start = now();
            for (int it = 0; it < items; it++) {
                const float *qi = q + qn * it, *ki = k + kn * it, *vi = v + kn * it;
                float *oi = out + qn * it;
                if (which == 0) {
#ifdef QUADS
                    for (int y = 0; y < HEIGHT; y += 2)
                        for (int x = 0; x < WIDTH; x += 2) quad_forward(qi, ki, vi, oi, y, x, scale);
#else
                    for (int y = 0; y < HEIGHT; y++)
                        for (int x = 0; x < WIDTH; x += 2) pair_forward(qi, ki, vi, oi, y, x, scale);
#endif
                } else {
                    for (int y0 = 0; y0 < HEIGHT; y0 += 4)
                        for (int x0 = 0; x0 < WIDTH; x0 += 2) block_forward(qi, ki, vi, oi, y0, x0, slot_mask, scores, scale);
                }
            }
            const double took = (now() - start) / items;
            if (took < best[which]) best[which] = took;
            const double err = window_probe_error(q, k, v, out, WIDTH, HEIGHT, PADDED_W, RADIUS, DIM, scale, 64);
            if (err > worst[which]) worst[which] = err;
        }
    printf("pairs 1 x 2: %.3f ms per (batch, head), max error %.2g\n", best[0] * 1e3, worst[0]);
    printf("block 4 x 2: %.3f ms per (batch, head), max error %.2g\n", best[1] * 1e3, worst[1]);
    printf("pairs / block: %.3f\n", best[0] / best[1]);
    return 0;
}
