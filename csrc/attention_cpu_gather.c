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

/* Sums of neighbouring lanes of a and b, interleaved: lane 2t of a's lanes
 * 2t and 2t + 1 summed, lane 2t + 1 of b's. */
SA_INLINE v8 pair_sums(v8 a, v8 b)
{
    const i8v even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
    return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

SA_INLINE v8 row_dot_lanes(const v8 *x, const float *row, const int vecs)
{
    v8 sum = x[0] * LOADU(row);
    for (int v = 1; v < vecs; v++) sum += x[v] * LOADU(row + 8 * v);
    return sum;
}

/* Lane r: the dot product of x (vecs vectors) with rows[r]. Each pair of
 * rows' lanes is folded as soon as it is made, so that at D = 64 x's eight
 * vectors and the partial sums fit the sixteen registers of AVX2 (a full
 * 8 x 8 transpose at the end kept eight more and spilled). */
SA_INLINE v8 dots8(const v8 *x, const float *const *rows, const int vecs)
{
    const i8v pairs_lo = {0, 1, 8, 9, 4, 5, 12, 13}, pairs_hi = {2, 3, 10, 11, 6, 7, 14, 15};
    const i8v halves_lo = {0, 1, 2, 3, 8, 9, 10, 11}, halves_hi = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 quads[2];
    for (int half = 0; half < 2; half++) {
        const float *const *four = rows + 4 * half;
        const v8 first = pair_sums(row_dot_lanes(x, four[0], vecs), row_dot_lanes(x, four[1], vecs));
        const v8 second = pair_sums(row_dot_lanes(x, four[2], vecs), row_dot_lanes(x, four[3], vecs));
        /* lane 4h + r: row r's lanes 4h .. 4h + 3 summed */
        quads[half] = __builtin_shuffle(first, second, pairs_lo) + __builtin_shuffle(first, second, pairs_hi);
    }
    return __builtin_shuffle(quads[0], quads[1], halves_lo) + __builtin_shuffle(quads[0], quads[1], halves_hi);
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

/* Asks for a row the loop reads later (V after the scores): scattered rows
 * otherwise wait on memory one after another. */
SA_INLINE void prefetch_row(const float *row, const int vecs)
{
    for (int v = 0; v < vecs; v += 2) __builtin_prefetch(row + 8 * v);
}

/* acc += weights[e] x row of tokens[e] (rows `stride` apart from head) over
 * e < count, passing over zero weights (a dropped or masked pair adds
 * nothing, not even a NaN of its row). At four vectors or fewer a second set
 * of accumulators takes every other row: one set's chain of additions,
 * four cycles each, held D = 16 to a quarter of the FMA rate. */
SA_INLINE void add_weighted_rows(v8 *acc, const float *weights, const int32_t *tokens, int count, const float *head,
                                 int64_t stride, const int vecs)
{
    int e = 0;
    if (vecs <= 4) {
        v8 other[4];
        for (int v = 0; v < vecs; v++) other[v] = SPLAT(0.0f);
        for (; e + 1 < count; e += 2) {
            if (weights[e] != 0) {
                const v8 weight = SPLAT(weights[e]);
                const float *row = head + tokens[e] * stride;
                for (int v = 0; v < vecs; v++) acc[v] += weight * LOADU(row + 8 * v);
            }
            if (weights[e + 1] != 0) {
                const v8 weight = SPLAT(weights[e + 1]);
                const float *row = head + tokens[e + 1] * stride;
                for (int v = 0; v < vecs; v++) other[v] += weight * LOADU(row + 8 * v);
            }
        }
        for (int v = 0; v < vecs; v++) acc[v] += other[v];
    }
    for (; e < count; e++) {
        if (weights[e] == 0) continue;
        const v8 weight = SPLAT(weights[e]);
        const float *row = head + tokens[e] * stride;
        for (int v = 0; v < vecs; v++) acc[v] += weight * LOADU(row + 8 * v);
    }
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

/* Head h's (2m + 1)^2 bias table, or NULL without a bias. */
SA_INLINE const float *head_bias_table(const sa_attention_params *p, const call_constants *c, int64_t h)
{
    const int64_t side = 2 * (int64_t)c->max_relative + 1;
    return p->bias_table ? (const float *)p->bias_table + h * side * side : NULL;
}

/* A work item: one token (a query row or a key column) of one batch and
 * head, with what every kernel reads of it before gathering the others. */
typedef struct {
    int64_t token, bh, b, h;
    const float *table;      /* the head's bias table, or NULL */
    i8v token_row, token_col; /* its grid coordinates in every lane */
    uint32_t dropout_row_key;
} work_item;

SA_INLINE work_item work_item_of(const sa_attention_params *p, const call_constants *c, int64_t item)
{
    const int64_t n = p->num_tokens, bh = item / n;
    work_item it = {.token = item % n, .bh = bh, .h = bh % p->heads, .b = bh / p->heads};
    it.table = head_bias_table(p, c, it.h);
    it.token_row = (i8v){0} + (int32_t)(it.token / c->width);
    it.token_col = (i8v){0} + (int32_t)(it.token % c->width);
    it.dropout_row_key = sa_dropout_row_key(p->dropout_seed, it.b, it.h);
    return it;
}

/* The first row of a tensor's head for the item's batch and head. */
#define HEAD_OF(it, ptr, stride) ROW_OF((const float *)(ptr), stride, (it).b, (it).h, 0)

/* Scores of eight pairs between the item's token and eight gathered ones:
 * scale x . rows[r], plus the bias of the pair where there is a table;
 * the item's token is the query where the eight are keys, else the key. */
SA_INLINE v8 scaled_scores(const v8 *x, const float *const *rows, const int32_t *tokens, const work_item *it,
                           int tokens_are_keys, const call_constants *c, const int vecs)
{
    v8 s = dots8(x, rows, vecs) * c->scale;
    if (it->table) {
        i8v row, col;
        coords8(LOADU_I(tokens), c->width, c->inv_width, &row, &col);
        s += tokens_are_keys ? bias8(it->table, it->token_row - row, it->token_col - col, c->max_relative)
                             : bias8(it->table, row - it->token_row, col - it->token_col, c->max_relative);
    }
    return s;
}

/* rows_a[r] and rows_b[r]: the rows of tokens[r] in two tensors (rows
 * stride_* apart from head_*); the next eight tokens' rows are asked for. */
SA_INLINE void gather_two(const int32_t *tokens, const float *head_a, int64_t stride_a, const float *head_b,
                          int64_t stride_b, const float **rows_a, const float **rows_b, const int vecs)
{
    for (int r = 0; r < 8; r++) {
        rows_a[r] = head_a + tokens[r] * stride_a;
        rows_b[r] = head_b + tokens[r] * stride_b;
        prefetch_row(head_a + tokens[8 + r] * stride_a, vecs);
        prefetch_row(head_b + tokens[8 + r] * stride_b, vecs);
    }
}

SA_INLINE void forward_row(const sa_attention_params *p, const call_constants *c, int64_t item, const int vecs)
{
    const work_item it = work_item_of(p, c, item);
    const int64_t i = it.token, b = it.b;
    float *out = ROW_OF((float *)p->out, p->out_stride, b, it.h, i);
    float *stats = p->row_stats ? (float *)p->row_stats + 2 * item : NULL;
    v8 acc[MAX_VECS];
    for (int v = 0; v < vecs; v++) acc[v] = SPLAT(0.0f);
    float run_max = -INFINITY, run_sum = 0, run_sq = 0, run_shifted = 0;
    i8v saw_nan = {0};
    if (runs_head(p, it.h)) {
        const float *q = HEAD_OF(it, p->q, p->q_stride) + i * p->q_stride[2];
        const float *k_head = HEAD_OF(it, p->k, p->k_stride), *v_head = HEAD_OF(it, p->v, p->v_stride);
        const uint32_t query_key = sa_dropout_query_key(it.dropout_row_key, i);
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
            /* rows to read (their lanes are masked) and, past them, to prefetch for a next group */
            for (int e = count; e < padded + 8; e++) keys[e] = keys[0];
            v8 max_lanes = SPLAT(-INFINITY);
            for (int g = 0; g < padded; g += 8) {
                const float *rows[8];
                for (int r = 0; r < 8; r++) {
                    rows[r] = k_head + keys[g + r] * p->k_stride[2];
                    prefetch_row(v_head + keys[g + r] * p->v_stride[2], vecs);
                    prefetch_row(k_head + keys[g + 8 + r] * p->k_stride[2], vecs);
                }
                v8 s = scaled_scores(qv, rows, keys + g, &it, 1, c, vecs);
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
            if (c->threshold > 0) {
                for (int e = 0; e < count; e++)
                    if (!sa_dropout_keep(query_key, keys[e], c->threshold)) weights[e] = 0;
            }
            add_weighted_rows(acc, weights, keys, count, v_head, p->v_stride[2], vecs);
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
    const work_item it = work_item_of(p, c, item);
    const int64_t i = it.token, b = it.b;
    float *grad_q = (float *)p->grad_q + item * 8 * vecs;
    float *grad_scores = p->grad_scores ? (float *)p->grad_scores + it.bh * p->nnz : NULL;
    const float lse = ((const float *)p->lse)[item];
    if (!runs_head(p, it.h) || lse == -INFINITY) {
        if (grad_scores) {
            for (int64_t pos = p->row_ptr[i]; pos < p->row_ptr[i + 1]; pos++) grad_scores[pos] = 0;
        }
        memset(grad_q, 0, sizeof(float) * 8 * (size_t)vecs);
        return;
    }
    const float *q = HEAD_OF(it, p->q, p->q_stride) + i * p->q_stride[2];
    const float *grad_out = HEAD_OF(it, p->grad_out, p->grad_out_stride) + i * p->grad_out_stride[2];
    const float *k_head = HEAD_OF(it, p->k, p->k_stride), *v_head = HEAD_OF(it, p->v, p->v_stride);
    const float delta = ((const float *)p->delta)[item];
    const uint32_t query_key = sa_dropout_query_key(it.dropout_row_key, i);
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
        for (int e = count; e < padded + 8; e++) {
            keys[e] = keys[0]; /* rows to read, masked, and past them rows to prefetch */
            kept[e] = NAN;
        }
        for (int g = 0; g < padded; g += 8) {
            const float *k_rows[8], *v_rows[8];
            gather_two(keys + g, k_head, p->k_stride[2], v_head, p->v_stride[2], k_rows, v_rows, vecs);
            v8 s = scaled_scores(qv, k_rows, keys + g, &it, 1, c, vecs);
            const v8 keep = LOADU(kept + g);
            const i8v absent = keep != keep;
            s = SELECT(absent, SPLAT(-INFINITY), s - lse);
            exp_lanes(&s, 1);
            /* a masked key's row (NaN or inf in it, say) adds nothing, as in the generic kernel */
            const v8 grad_probs = SELECT(absent, SPLAT(0.0f), dots8(gv, v_rows, vecs) * keep);
            STOREU(score_grads + g, s * (grad_probs - delta));
        }
        add_weighted_rows(acc, score_grads, keys, count, k_head, p->k_stride[2], vecs);
        if (grad_scores) memcpy(grad_scores + pos, score_grads, sizeof(float) * (size_t)count);
    }
    for (int v = 0; v < vecs; v++) STOREU(grad_q + 8 * v, acc[v] * c->scale);
}

/* dK_j = scale sum_i dS_ij Q_i, dV_j = sum_i P_ij kept_ij dO_i, over the
 * transpose's queries of key j. */
SA_INLINE void grad_key_value_column(const sa_attention_params *p, const call_constants *c, int64_t item,
                                     const int vecs)
{
    const work_item it = work_item_of(p, c, item);
    const int64_t j = it.token;
    v8 acc_k[MAX_VECS], acc_v[MAX_VECS];
    for (int v = 0; v < vecs; v++) acc_k[v] = acc_v[v] = SPLAT(0.0f);
    if (runs_head(p, it.h) && allowed_key(p, it.b, j)) {
        const float *k = HEAD_OF(it, p->k, p->k_stride) + j * p->k_stride[2];
        const float *v_row = HEAD_OF(it, p->v, p->v_stride) + j * p->v_stride[2];
        const float *q_head = HEAD_OF(it, p->q, p->q_stride);
        const float *grad_out_head = HEAD_OF(it, p->grad_out, p->grad_out_stride);
        const int64_t n = p->num_tokens;
        const float *lse_row = (const float *)p->lse + it.bh * n, *delta_row = (const float *)p->delta + it.bh * n;
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
                                  !sa_dropout_keep(sa_dropout_query_key(it.dropout_row_key, i), j, c->threshold)
                              ? 0.0f
                              : c->keep_scale;
            }
            for (int e = count; e < padded + 8; e++) {
                queries[e] = queries[0]; /* rows to read and to prefetch; no term (as a row without keys) */
                lses[e] = -INFINITY;
                deltas[e] = kept[e] = 0;
            }
            for (int g = 0; g < padded; g += 8) {
                const float *q_rows[8], *grad_rows[8];
                gather_two(queries + g, q_head, p->q_stride[2], grad_out_head, p->grad_out_stride[2], q_rows,
                           grad_rows, vecs);
                v8 s = scaled_scores(kv, q_rows, queries + g, &it, 0, c, vecs);
                const v8 lse = LOADU(lses + g), keep = LOADU(kept + g);
                const i8v no_keys = lse == SPLAT(-INFINITY); /* a row without keys (or padding) adds nothing */
                s = SELECT(no_keys, SPLAT(-INFINITY), s - lse);
                exp_lanes(&s, 1);
                const v8 grad_probs = SELECT(no_keys, SPLAT(0.0f), dots8(vv, grad_rows, vecs) * keep);
                STOREU(score_grads + g, s * (grad_probs - LOADU(deltas + g)));
                STOREU(dropped_probs + g, s * keep);
            }
            add_weighted_rows(acc_k, score_grads, queries, count, q_head, p->q_stride[2], vecs);
            add_weighted_rows(acc_v, dropped_probs, queries, count, grad_out_head, p->grad_out_stride[2], vecs);
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
