/* Row and column kernels for float32 with keys gathered one by one.
 *
 * The generic row kernel (attention_cpu_body.h) takes one key at a time: a
 * dot product summed across its lanes, then an update of an accumulator
 * that lives in memory, so each pair waits on the store of the pair before.
 * At RANDOM 10% on 64 x 64 (D=16) that ran 13x slower per pair than dense
 * SDPA, and the whole layout as slow as dense. Here a head's row stays in
 * registers (D / 8 vectors, D a multiple of 8 up to 64, a constant in each
 * clone), eight keys' dot products are summed together by one 8 x 8
 * transpose, the softmax runs eight lanes at a time, and the accumulators
 * stay in registers across the chunk. The work items, chunks and results
 * are those of the generic kernels: probabilities, log-sum-exp, statistics,
 * key mask, dropout (the same hash) and the CSR-order score gradients. */
#include "attention_cpu_gather.h"

#include <math.h>
#include <string.h>

#include "dropout_hash.h"
#include "simd8.h"
#include "threads.h"

#define GATHER_CHUNK 64
#define MAX_VECS (SA_GATHER_MAX_DIM / 8)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SA_NO_CLONES)
#define GATHER_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GATHER_CLONES
#endif

typedef int32_t i8vu __attribute__((vector_size(32), aligned(4)));
#define LOADU_I(ptr) ((i8v)(*(const i8vu *)(ptr)))

#define ROW_OF(ptr, stride, b, h, i) ((ptr) + (b) * (stride)[0] + (h) * (stride)[1] + (i) * (stride)[2])

int sa_cpu_gather_fits(const sa_attention_params *p)
{
    return p->dtype == SA_F32 && p->head_dim % 8 == 0 && p->head_dim >= 8 && p->head_dim <= SA_GATHER_MAX_DIM &&
           p->num_tokens < SA_GATHER_MAX_TOKENS;
}

static inline int allowed_key(const sa_attention_params *p, int64_t b, int64_t j)
{
    return p->key_mask == NULL || p->key_mask[b * p->key_mask_stride[0] + j * p->key_mask_stride[1]] != 0;
}

static inline int runs_head(const sa_attention_params *p, int64_t h)
{
    return p->head_active == NULL || p->head_active[h] != 0;
}

/* Lane r: the dot product of x (vecs vectors) with rows[r]. */
SA_INLINE v8 dots8(const v8 *x, const float *const *rows, const int vecs)
{
    v8 part[8];
    for (int r = 0; r < 8; r++) {
        v8 sum = x[0] * LOADU(rows[r]);
        for (int v = 1; v < vecs; v++) sum += x[v] * LOADU(rows[r] + 8 * v);
        part[r] = sum;
    }
    transpose8(part);
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

/* Grid rows and columns of eight tokens below SA_GATHER_MAX_TOKENS: the float
 * quotient is off by at most one, which the remainder's range corrects. */
SA_INLINE void coords8(i8v tokens, int32_t width, v8 inv_width, i8v *row, i8v *col)
{
    i8v y = __builtin_convertvector(__builtin_convertvector(tokens, v8) * inv_width, i8v);
    i8v x = tokens - y * width;
    const i8v below = x < 0, above = x >= width; /* all ones where true */
    y += below;
    x += width & below;
    y -= above;
    x -= width & above;
    *row = y;
    *col = x;
}

SA_INLINE i8v clamp_lanes(i8v x, int32_t limit)
{
    const i8v low = x < -limit, high = x > limit;
    return (x & ~(low | high)) | (-limit & low) | (limit & high);
}

/* Lane r: the bias of query offset (dy[r], dx[r]) from its key, clamped to
 * the table's +-m, from head h's (2m + 1)^2 table. */
SA_INLINE v8 bias8(const float *table, i8v dy, i8v dx, int32_t m)
{
    const i8v index = (clamp_lanes(dy, m) + m) * (2 * m + 1) + clamp_lanes(dx, m) + m;
    v8 out;
    for (int r = 0; r < 8; r++) out[r] = table[index[r]];
    return out;
}

static const i8v lane_index = {0, 1, 2, 3, 4, 5, 6, 7};

typedef struct {
    float scale, keep_scale;
    uint32_t threshold;
    int32_t width, max_relative;
    v8 inv_width;
} call_constants;

SA_INLINE call_constants constants_of(const sa_attention_params *p)
{
    call_constants c = {.scale = (float)p->scale,
                        .keep_scale = p->dropout_p > 0 ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f,
                        .threshold = sa_dropout_threshold(p->dropout_p),
                        .width = (int32_t)p->width,
                        .max_relative = (int32_t)p->max_relative};
    c.inv_width = SPLAT(1.0f / (float)p->width);
    return c;
}

SA_INLINE void forward_row(const sa_attention_params *p, const call_constants *c, int64_t item, const int vecs)
{
    const int64_t n = p->num_tokens, i = item % n, bh = item / n, h = bh % p->heads, b = bh / p->heads;
    float *out = ROW_OF((float *)p->out, p->out_stride, b, h, i);
    float *stats = p->row_stats ? (float *)p->row_stats + 2 * item : NULL;
    v8 acc[MAX_VECS];
    for (int v = 0; v < vecs; v++) acc[v] = SPLAT(0.0f);
    float run_max = -INFINITY, run_sum = 0, run_sq = 0, run_shifted = 0;
    i8v saw_nan = {0};
    if (runs_head(p, h)) {
        const float *q = ROW_OF((const float *)p->q, p->q_stride, b, h, i);
        const float *k_head = ROW_OF((const float *)p->k, p->k_stride, b, h, 0);
        const float *v_head = ROW_OF((const float *)p->v, p->v_stride, b, h, 0);
        const float *table = p->bias_table ? (const float *)p->bias_table + h * (2 * c->max_relative + 1) *
                                                                                (2 * c->max_relative + 1)
                                           : NULL;
        const i8v query_row = (i8v){0} + (int32_t)(i / c->width), query_col = (i8v){0} + (int32_t)(i % c->width);
        const uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), i);
        v8 qv[MAX_VECS];
        for (int v = 0; v < vecs; v++) qv[v] = LOADU(q + 8 * v);
        int32_t keys[GATHER_CHUNK + 8];
        float scores[GATHER_CHUNK], weights[GATHER_CHUNK];
        for (int64_t pos = p->row_ptr[i]; pos < p->row_ptr[i + 1]; pos += GATHER_CHUNK) {
            const int64_t stop = pos + GATHER_CHUNK < p->row_ptr[i + 1] ? pos + GATHER_CHUNK : p->row_ptr[i + 1];
            int count = 0;
            for (int64_t e = pos; e < stop; e++) {
                const int32_t j = p->col_idx[e];
                if (allowed_key(p, b, j)) keys[count++] = j;
            }
            if (count == 0) continue;
            const int padded = (count + 7) & ~7;
            for (int e = count; e < padded; e++) keys[e] = keys[0]; /* a row to read; its lanes are masked */
            v8 max_lanes = SPLAT(-INFINITY);
            for (int g = 0; g < padded; g += 8) {
                const float *rows[8];
                for (int r = 0; r < 8; r++) rows[r] = k_head + keys[g + r] * p->k_stride[2];
                v8 s = dots8(qv, rows, vecs) * c->scale;
                if (table) {
                    i8v key_row, key_col;
                    coords8(LOADU_I(keys + g), c->width, c->inv_width, &key_row, &key_col);
                    s += bias8(table, query_row - key_row, query_col - key_col, c->max_relative);
                }
                s = SELECT(lane_index < count - g, s, SPLAT(-INFINITY));
                saw_nan |= s != s;
                max_lanes = lanes_max(max_lanes, s);
                STOREU(scores + g, s);
            }
            const float chunk_max = hmax8(max_lanes);
            if (chunk_max == -INFINITY) continue; /* NaN scores only: the row is NaN */
            if (chunk_max > run_max) {
                if (run_sum > 0) {
                    /* rescale what was summed against the old maximum */
                    const float r = expf(run_max - chunk_max);
                    run_shifted = r * (run_shifted + run_sum * (run_max - chunk_max));
                    run_sum *= r;
                    run_sq *= r * r;
                    for (int v = 0; v < vecs; v++) acc[v] *= r;
                }
                run_max = chunk_max;
            }
            v8 sum = SPLAT(0.0f), sq = SPLAT(0.0f), shifted_sum = SPLAT(0.0f);
            for (int g = 0; g < padded; g += 8) {
                const v8 shifted = LOADU(scores + g) - run_max;
                v8 e = shifted;
                exp_lanes(&e, 1);
                sum += e;
                sq += e * e;
                shifted_sum += SELECT(e > SPLAT(0.0f), e * shifted, SPLAT(0.0f)); /* 0 x -inf is no term */
                STOREU(weights + g, e * c->keep_scale);
            }
            run_sum += hsum8(sum);
            run_sq += hsum8(sq);
            run_shifted += hsum8(shifted_sum);
            for (int e = 0; e < count; e++) {
                if (c->threshold > 0 && !sa_dropout_keep(query_key, keys[e], c->threshold)) continue;
                const v8 weight = SPLAT(weights[e]);
                const float *value = v_head + keys[e] * p->v_stride[2];
                for (int v = 0; v < vecs; v++) acc[v] += weight * LOADU(value + 8 * v);
            }
        }
    }
    float *lse = (float *)p->lse + item;
    int nan_row = 0;
    for (int r = 0; r < 8; r++) nan_row |= saw_nan[r];
    /* a +inf score leaves exp(inf - inf) in its softmax: the row is NaN, as in the generic kernel */
    if (nan_row || run_max == INFINITY) {
        for (int64_t d = 0; d < 8 * vecs; d++) out[d] = NAN;
        *lse = NAN;
        if (stats) stats[0] = stats[1] = NAN;
    } else if (run_sum > 0) {
        const float inv = 1 / run_sum;
        for (int v = 0; v < vecs; v++) STOREU(out + 8 * v, acc[v] * inv);
        *lse = run_max + logf(run_sum);
        if (stats) {
            stats[0] = run_sq * inv * inv;
            stats[1] = logf(run_sum) - run_shifted * inv;
        }
    } else {
        for (int64_t d = 0; d < 8 * vecs; d++) out[d] = 0;
        *lse = -INFINITY;
        if (stats) stats[0] = stats[1] = 0;
    }
}

/* dS_ij = P_ij (dP_ij - delta_i), dP_ij = <dO_i, V_j> times the dropout
 * mask's keep scale; dQ_i = scale sum_j dS_ij K_j. */
SA_INLINE void grad_query_row(const sa_attention_params *p, const call_constants *c, int64_t item, const int vecs)
{
    const int64_t n = p->num_tokens, i = item % n, bh = item / n, h = bh % p->heads, b = bh / p->heads;
    float *grad_q = (float *)p->grad_q + item * 8 * vecs;
    float *grad_scores = p->grad_scores ? (float *)p->grad_scores + bh * p->nnz : NULL;
    const float lse = ((const float *)p->lse)[item];
    if (!runs_head(p, h) || lse == -INFINITY) {
        if (grad_scores) {
            for (int64_t pos = p->row_ptr[i]; pos < p->row_ptr[i + 1]; pos++) grad_scores[pos] = 0;
        }
        memset(grad_q, 0, sizeof(float) * 8 * (size_t)vecs);
        return;
    }
    const float *q = ROW_OF((const float *)p->q, p->q_stride, b, h, i);
    const float *grad_out = ROW_OF((const float *)p->grad_out, p->grad_out_stride, b, h, i);
    const float *k_head = ROW_OF((const float *)p->k, p->k_stride, b, h, 0);
    const float *v_head = ROW_OF((const float *)p->v, p->v_stride, b, h, 0);
    const float *table = p->bias_table ? (const float *)p->bias_table + h * (2 * c->max_relative + 1) *
                                                                            (2 * c->max_relative + 1)
                                       : NULL;
    const i8v query_row = (i8v){0} + (int32_t)(i / c->width), query_col = (i8v){0} + (int32_t)(i % c->width);
    const float delta = ((const float *)p->delta)[item];
    const uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), i);
    v8 qv[MAX_VECS], gv[MAX_VECS], acc[MAX_VECS];
    for (int v = 0; v < vecs; v++) {
        qv[v] = LOADU(q + 8 * v);
        gv[v] = LOADU(grad_out + 8 * v);
        acc[v] = SPLAT(0.0f);
    }
    int32_t keys[GATHER_CHUNK + 8];
    float kept[GATHER_CHUNK + 8], score_grads[GATHER_CHUNK];
    for (int64_t pos = p->row_ptr[i]; pos < p->row_ptr[i + 1]; pos += GATHER_CHUNK) {
        const int64_t stop = pos + GATHER_CHUNK < p->row_ptr[i + 1] ? pos + GATHER_CHUNK : p->row_ptr[i + 1];
        const int count = (int)(stop - pos), padded = (count + 7) & ~7;
        for (int e = 0; e < count; e++) {
            const int32_t j = p->col_idx[pos + e];
            keys[e] = j;
            /* NaN marks a masked key (no probability); 0 a dropped one (no dP) */
            if (!allowed_key(p, b, j))
                kept[e] = NAN;
            else
                kept[e] = c->threshold > 0 && !sa_dropout_keep(query_key, j, c->threshold) ? 0.0f : c->keep_scale;
        }
        for (int e = count; e < padded; e++) {
            keys[e] = keys[0];
            kept[e] = NAN;
        }
        for (int g = 0; g < padded; g += 8) {
            const float *k_rows[8], *v_rows[8];
            for (int r = 0; r < 8; r++) {
                k_rows[r] = k_head + keys[g + r] * p->k_stride[2];
                v_rows[r] = v_head + keys[g + r] * p->v_stride[2];
            }
            v8 s = dots8(qv, k_rows, vecs) * c->scale;
            if (table) {
                i8v key_row, key_col;
                coords8(LOADU_I(keys + g), c->width, c->inv_width, &key_row, &key_col);
                s += bias8(table, query_row - key_row, query_col - key_col, c->max_relative);
            }
            const v8 keep = LOADU(kept + g);
            const i8v absent = keep != keep;
            s = SELECT(absent, SPLAT(-INFINITY), s - lse);
            exp_lanes(&s, 1);
            const v8 grad_probs = dots8(gv, v_rows, vecs) * SELECT(absent, SPLAT(0.0f), keep);
            STOREU(score_grads + g, s * (grad_probs - delta));
        }
        for (int e = 0; e < count; e++) {
            if (score_grads[e] == 0) continue;
            const v8 weight = SPLAT(score_grads[e]);
            const float *key = k_head + keys[e] * p->k_stride[2];
            for (int v = 0; v < vecs; v++) acc[v] += weight * LOADU(key + 8 * v);
        }
        if (grad_scores) memcpy(grad_scores + pos, score_grads, sizeof(float) * (size_t)count);
    }
    for (int v = 0; v < vecs; v++) STOREU(grad_q + 8 * v, acc[v] * c->scale);
}

/* dK_j = scale sum_i dS_ij Q_i, dV_j = sum_i P_ij kept_ij dO_i, over the
 * transpose's queries of key j. */
SA_INLINE void grad_key_value_column(const sa_attention_params *p, const call_constants *c, int64_t item,
                                     const int vecs)
{
    const int64_t n = p->num_tokens, j = item % n, bh = item / n, h = bh % p->heads, b = bh / p->heads;
    v8 acc_k[MAX_VECS], acc_v[MAX_VECS];
    for (int v = 0; v < vecs; v++) acc_k[v] = acc_v[v] = SPLAT(0.0f);
    if (runs_head(p, h) && allowed_key(p, b, j)) {
        const float *k = ROW_OF((const float *)p->k, p->k_stride, b, h, j);
        const float *v_row = ROW_OF((const float *)p->v, p->v_stride, b, h, j);
        const float *q_head = ROW_OF((const float *)p->q, p->q_stride, b, h, 0);
        const float *grad_out_head = ROW_OF((const float *)p->grad_out, p->grad_out_stride, b, h, 0);
        const float *table = p->bias_table ? (const float *)p->bias_table + h * (2 * c->max_relative + 1) *
                                                                                (2 * c->max_relative + 1)
                                           : NULL;
        const i8v key_row = (i8v){0} + (int32_t)(j / c->width), key_col = (i8v){0} + (int32_t)(j % c->width);
        const uint32_t row_key = sa_dropout_row_key(p->dropout_seed, b, h);
        const float *lse_row = (const float *)p->lse + bh * n, *delta_row = (const float *)p->delta + bh * n;
        v8 kv[MAX_VECS], vv[MAX_VECS];
        for (int v = 0; v < vecs; v++) {
            kv[v] = LOADU(k + 8 * v);
            vv[v] = LOADU(v_row + 8 * v);
        }
        int32_t queries[GATHER_CHUNK + 8];
        float lses[GATHER_CHUNK + 8], deltas[GATHER_CHUNK + 8], kept[GATHER_CHUNK + 8];
        float score_grads[GATHER_CHUNK], dropped_probs[GATHER_CHUNK];
        for (int64_t pos = p->col_ptr[j]; pos < p->col_ptr[j + 1]; pos += GATHER_CHUNK) {
            const int64_t stop = pos + GATHER_CHUNK < p->col_ptr[j + 1] ? pos + GATHER_CHUNK : p->col_ptr[j + 1];
            const int count = (int)(stop - pos), padded = (count + 7) & ~7;
            for (int e = 0; e < count; e++) {
                const int32_t i = p->row_idx[pos + e];
                queries[e] = i;
                lses[e] = lse_row[i];
                deltas[e] = delta_row[i];
                kept[e] = c->threshold > 0 &&
                                  !sa_dropout_keep(sa_dropout_query_key(row_key, i), j, c->threshold)
                              ? 0.0f
                              : c->keep_scale;
            }
            for (int e = count; e < padded; e++) {
                queries[e] = queries[0];
                lses[e] = -INFINITY; /* as a row without keys: no term */
                deltas[e] = kept[e] = 0;
            }
            for (int g = 0; g < padded; g += 8) {
                const float *q_rows[8], *grad_rows[8];
                for (int r = 0; r < 8; r++) {
                    q_rows[r] = q_head + queries[g + r] * p->q_stride[2];
                    grad_rows[r] = grad_out_head + queries[g + r] * p->grad_out_stride[2];
                }
                v8 s = dots8(kv, q_rows, vecs) * c->scale;
                if (table) {
                    i8v query_row, query_col;
                    coords8(LOADU_I(queries + g), c->width, c->inv_width, &query_row, &query_col);
                    s += bias8(table, query_row - key_row, query_col - key_col, c->max_relative);
                }
                const v8 lse = LOADU(lses + g), keep = LOADU(kept + g);
                s = SELECT(lse == SPLAT(-INFINITY), SPLAT(-INFINITY), s - lse);
                exp_lanes(&s, 1);
                const v8 grad_probs = dots8(vv, grad_rows, vecs) * keep;
                STOREU(score_grads + g, s * (grad_probs - LOADU(deltas + g)));
                STOREU(dropped_probs + g, s * keep);
            }
            for (int e = 0; e < count; e++) {
                const float *query = q_head + queries[e] * p->q_stride[2];
                const float *grad_row = grad_out_head + queries[e] * p->grad_out_stride[2];
                if (score_grads[e] != 0) {
                    const v8 weight = SPLAT(score_grads[e]);
                    for (int v = 0; v < vecs; v++) acc_k[v] += weight * LOADU(query + 8 * v);
                }
                if (dropped_probs[e] != 0) {
                    const v8 weight = SPLAT(dropped_probs[e]);
                    for (int v = 0; v < vecs; v++) acc_v[v] += weight * LOADU(grad_row + 8 * v);
                }
            }
        }
    }
    float *grad_k = (float *)p->grad_k + item * 8 * vecs, *grad_v = (float *)p->grad_v + item * 8 * vecs;
    for (int v = 0; v < vecs; v++) {
        STOREU(grad_k + 8 * v, acc_k[v] * c->scale);
        STOREU(grad_v + 8 * v, acc_v[v]);
    }
}

/* One clone set per kernel and head dim: the vector count is a constant in each. */
#define GATHER_KERNEL(kernel, vecs)                                                        \
    GATHER_CLONES static void kernel##_##vecs(void *ctx, int64_t begin, int64_t end)       \
    {                                                                                      \
        const sa_attention_params *p = ctx;                                                \
        const call_constants c = constants_of(p);                                          \
        for (int64_t item = begin; item < end; item++) kernel(p, &c, item, vecs);          \
    }

#define GATHER_KERNELS(kernel)                                                             \
    GATHER_KERNEL(kernel, 1)                                                               \
    GATHER_KERNEL(kernel, 2)                                                               \
    GATHER_KERNEL(kernel, 3)                                                               \
    GATHER_KERNEL(kernel, 4)                                                               \
    GATHER_KERNEL(kernel, 5)                                                               \
    GATHER_KERNEL(kernel, 6)                                                               \
    GATHER_KERNEL(kernel, 7)                                                               \
    GATHER_KERNEL(kernel, 8)                                                               \
    void sa_gather_##kernel##s(void *ctx, int64_t begin, int64_t end)                      \
    {                                                                                      \
        static const sa_range_fn by_vecs[MAX_VECS] = {kernel##_1, kernel##_2, kernel##_3,  \
                                                       kernel##_4, kernel##_5, kernel##_6, \
                                                       kernel##_7, kernel##_8};            \
        by_vecs[((const sa_attention_params *)ctx)->head_dim / 8 - 1](ctx, begin, end);    \
    }

GATHER_KERNELS(forward_row)
GATHER_KERNELS(grad_query_row)
GATHER_KERNELS(grad_key_value_column)
