/* Row and column kernels for float32 with keys gathered one by one.
 *
 * The generic row kernel (attention_cpu_body.h) takes one key at a time: a
 * dot product summed across its lanes, then an update of an accumulator
 * that lives in memory, so each pair waits on the store of the pair before.
 * At RANDOM 10% on 64 x 64 (D=16) that ran 13x slower per pair than dense
 * SDPA, and the whole layout as slow as dense. Here a head's row stays in
 * registers (D / 8 vectors, D a multiple of 8 up to 64, a constant in each
 * clone; one clone with the count in a variable takes D = 72 to 128), eight
 * keys' dot products are summed together by one 8 x 8 transpose, the
 * softmax runs eight lanes at a time, and the accumulators stay in
 * registers across the chunk. The work items, chunks and results
 * are those of the generic kernels: probabilities, log-sum-exp, statistics,
 * key mask, dropout (the same hash) and the CSR-order score gradients. */
#include "attention_cpu_gather.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

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

/* Lane r: the entry of a (2m + 1)^2 bias table for query offset (dy[r],
 * dx[r]) from its key, clamped to the table's +-m. */
SA_INLINE i8v bias_index8(i8v dy, i8v dx, int32_t m)
{
    return (clamp_lanes(dy, m) + m) * (2 * m + 1) + clamp_lanes(dx, m) + m;
}

/* Lane r: the bias of query offset (dy[r], dx[r]) from its key, from head h's table. */
SA_INLINE v8 bias8(const float *table, i8v dy, i8v dx, int32_t m)
{
    const i8v index = bias_index8(dy, dx, m);
    v8 out;
    for (int r = 0; r < 8; r++) out[r] = table[index[r]];
    return out;
}

/* Asks for a row the loop reads later (V after the scores): scattered rows
 * otherwise wait on memory one after another. The loop runs to a constant so
 * that it unrolls whatever vecs is: a loop of prefetches alone, to a count in
 * a variable, is deleted as dead code. */
SA_INLINE void prefetch_row(const float *row, const int vecs)
{
    for (int v = 0; v < MAX_VECS; v += 2)
        if (v < vecs) __builtin_prefetch(row + 8 * v);
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

/* A row's online softmax between groups of its keys. */
typedef struct {
    float max, sum, sq, shifted; /* running maximum, sum of exp, of exp^2 and of exp x (score - max) */
    int saw_nan;
} softmax_state;

static const softmax_state fresh_softmax = {-INFINITY, 0, 0, 0, 0};

/* What the forward of one query reads besides its pairs. */
typedef struct {
    v8 q[MAX_VECS];
    const float *k_head, *v_head;
    uint32_t query_key; /* the dropout hash's key of the query */
} query_inputs;

SA_INLINE void load_query(const sa_attention_params *p, const work_item *it, query_inputs *in, const int vecs)
{
    const float *q = HEAD_OF(*it, p->q, p->q_stride) + it->token * p->q_stride[2];
    for (int v = 0; v < vecs; v++) in->q[v] = LOADU(q + 8 * v);
    in->k_head = HEAD_OF(*it, p->k, p->k_stride);
    in->v_head = HEAD_OF(*it, p->v, p->v_stride);
    in->query_key = sa_dropout_query_key(it->dropout_row_key, it->token);
}

/* Adds the pairs at CSR positions [begin, end) of the item's row to acc
 * (the unnormalised output) and st. */
SA_INLINE void forward_pairs(const sa_attention_params *p, const call_constants *c, const work_item *it,
                             const query_inputs *in, int64_t begin, int64_t end, v8 *acc, softmax_state *st,
                             const int vecs)
{
    float run_max = st->max, run_sum = st->sum, run_sq = st->sq, run_shifted = st->shifted;
    i8v saw_nan = {0};
    int32_t keys[GATHER_CHUNK + 8];
    float scores[GATHER_CHUNK], weights[GATHER_CHUNK];
    for (int64_t pos = begin; pos < end; pos += GATHER_CHUNK) {
        const int64_t stop = pos + GATHER_CHUNK < end ? pos + GATHER_CHUNK : end;
        int count = 0;
        for (int64_t e = pos; e < stop; e++) {
            const int32_t j = p->col_idx[e];
            if (allowed_key(p, it->b, j)) keys[count++] = j;
        }
        if (count == 0) continue;
        const int padded = (count + 7) & ~7;
        /* rows to read (their lanes are masked) and, past them, to prefetch for a next group */
        for (int e = count; e < padded + 8; e++) keys[e] = keys[0];
        v8 max_lanes = SPLAT(-INFINITY);
        for (int g = 0; g < padded; g += 8) {
            const float *rows[8];
            for (int r = 0; r < 8; r++) {
                rows[r] = in->k_head + keys[g + r] * p->k_stride[2];
                prefetch_row(in->v_head + keys[g + r] * p->v_stride[2], vecs);
                prefetch_row(in->k_head + keys[g + 8 + r] * p->k_stride[2], vecs);
            }
            v8 s = scaled_scores(in->q, rows, keys + g, it, 1, c, vecs);
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
                if (!sa_dropout_keep(in->query_key, keys[e], c->threshold)) weights[e] = 0;
        }
        add_weighted_rows(acc, weights, keys, count, in->v_head, p->v_stride[2], vecs);
    }
    for (int r = 0; r < 8; r++) st->saw_nan |= saw_nan[r];
    st->max = run_max;
    st->sum = run_sum;
    st->sq = run_sq;
    st->shifted = run_shifted;
}

/* The row's output, log-sum-exp and statistics from its accumulator and softmax. */
SA_INLINE void forward_finish(const sa_attention_params *p, int64_t item, float *out, const v8 *acc,
                              const softmax_state *st, const int vecs)
{
    float *lse = (float *)p->lse + item;
    float *stats = p->row_stats ? (float *)p->row_stats + 2 * item : NULL;
    /* a +inf score leaves exp(inf - inf) in its softmax: the row is NaN, as in the generic kernel */
    if (st->saw_nan || st->max == INFINITY) {
        for (int64_t d = 0; d < 8 * vecs; d++) out[d] = NAN;
        *lse = NAN;
        if (stats) stats[0] = stats[1] = NAN;
    } else if (st->sum > 0) {
        const float inv = 1 / st->sum;
        for (int v = 0; v < vecs; v++) STOREU(out + 8 * v, acc[v] * inv);
        *lse = st->max + logf(st->sum);
        if (stats) {
            stats[0] = st->sq * inv * inv;
            stats[1] = logf(st->sum) - st->shifted * inv;
        }
    } else {
        for (int64_t d = 0; d < 8 * vecs; d++) out[d] = 0;
        *lse = -INFINITY;
        if (stats) stats[0] = stats[1] = 0;
    }
}

SA_INLINE float *out_row(const sa_attention_params *p, const work_item *it)
{
    return ROW_OF((float *)p->out, p->out_stride, it->b, it->h, it->token);
}

SA_INLINE void forward_row(const sa_attention_params *p, const call_constants *c, int64_t item, const int vecs)
{
    const work_item it = work_item_of(p, c, item);
    v8 acc[MAX_VECS];
    for (int v = 0; v < vecs; v++) acc[v] = SPLAT(0.0f);
    softmax_state st = fresh_softmax;
    if (runs_head(p, it.h)) {
        query_inputs in;
        load_query(p, &it, &in, vecs);
        forward_pairs(p, c, &it, &in, p->row_ptr[it.token], p->row_ptr[it.token + 1], acc, &st, vecs);
    }
    forward_finish(p, item, out_row(p, &it), acc, &st, vecs);
}

/* What the dQ pass of one query reads besides its pairs. */
typedef struct {
    v8 q[MAX_VECS], grad_out[MAX_VECS];
    const float *k_head, *v_head;
    float lse, delta;
    uint32_t query_key;
    float *grad_scores; /* the (b, h)'s CSR-order score gradients, or NULL */
    float *bias_grad;   /* a (2m + 1)^2 table the score gradients are summed into by offset, or NULL */
} grad_query_inputs;

/* Whether the row has pairs to differentiate: its head runs and it had keys. */
SA_INLINE int load_grad_query(const sa_attention_params *p, const work_item *it, int64_t item,
                              grad_query_inputs *in, const int vecs)
{
    in->grad_scores = p->grad_scores ? (float *)p->grad_scores + it->bh * p->nnz : NULL;
    in->bias_grad = NULL;
    in->lse = ((const float *)p->lse)[item];
    if (!runs_head(p, it->h) || in->lse == -INFINITY) return 0;
    const float *q = HEAD_OF(*it, p->q, p->q_stride) + it->token * p->q_stride[2];
    const float *grad_out = HEAD_OF(*it, p->grad_out, p->grad_out_stride) + it->token * p->grad_out_stride[2];
    for (int v = 0; v < vecs; v++) {
        in->q[v] = LOADU(q + 8 * v);
        in->grad_out[v] = LOADU(grad_out + 8 * v);
    }
    in->k_head = HEAD_OF(*it, p->k, p->k_stride);
    in->v_head = HEAD_OF(*it, p->v, p->v_stride);
    in->delta = ((const float *)p->delta)[item];
    in->query_key = sa_dropout_query_key(it->dropout_row_key, it->token);
    return 1;
}

/* dS_ij = P_ij (dP_ij - delta_i), dP_ij = <dO_i, V_j> times the dropout
 * mask's keep scale; acc += sum_j dS_ij K_j over the CSR positions
 * [begin, end) of the item's row (dQ_i is scale x acc). */
SA_INLINE void grad_query_pairs(const sa_attention_params *p, const call_constants *c, const work_item *it,
                                const grad_query_inputs *in, int64_t begin, int64_t end, v8 *acc,
                                const int vecs)
{
    int32_t keys[GATHER_CHUNK + 8];
    float kept[GATHER_CHUNK + 8], score_grads[GATHER_CHUNK];
    for (int64_t pos = begin; pos < end; pos += GATHER_CHUNK) {
        const int64_t stop = pos + GATHER_CHUNK < end ? pos + GATHER_CHUNK : end;
        const int count = (int)(stop - pos), padded = (count + 7) & ~7;
        for (int e = 0; e < count; e++) {
            const int32_t j = p->col_idx[pos + e];
            keys[e] = j;
            /* NaN marks a masked key (no probability); 0 a dropped one (no dP) */
            if (!allowed_key(p, it->b, j))
                kept[e] = NAN;
            else
                kept[e] = c->threshold > 0 && !sa_dropout_keep(in->query_key, j, c->threshold) ? 0.0f
                                                                                                 : c->keep_scale;
        }
        for (int e = count; e < padded + 8; e++) {
            keys[e] = keys[0]; /* rows to read, masked, and past them rows to prefetch */
            kept[e] = NAN;
        }
        for (int g = 0; g < padded; g += 8) {
            const float *k_rows[8], *v_rows[8];
            gather_two(keys + g, in->k_head, p->k_stride[2], in->v_head, p->v_stride[2], k_rows, v_rows, vecs);
            v8 s = scaled_scores(in->q, k_rows, keys + g, it, 1, c, vecs);
            const v8 keep = LOADU(kept + g);
            const i8v absent = keep != keep;
            s = SELECT(absent, SPLAT(-INFINITY), s - in->lse);
            exp_lanes(&s, 1);
            /* a masked key's row (NaN or inf in it, say) adds nothing, as in the generic kernel */
            const v8 grad_probs = SELECT(absent, SPLAT(0.0f), dots8(in->grad_out, v_rows, vecs) * keep);
            const v8 grads = s * (grad_probs - in->delta);
            STOREU(score_grads + g, grads);
            if (in->bias_grad) {
                i8v row, col;
                coords8(LOADU_I(keys + g), c->width, c->inv_width, &row, &col);
                const i8v index = bias_index8(it->token_row - row, it->token_col - col, c->max_relative);
                const int lanes = count - g < 8 ? count - g : 8;
                for (int r = 0; r < lanes; r++) in->bias_grad[index[r]] += grads[r];
            }
        }
        add_weighted_rows(acc, score_grads, keys, count, in->k_head, p->k_stride[2], vecs);
        if (in->grad_scores) memcpy(in->grad_scores + pos, score_grads, sizeof(float) * (size_t)count);
    }
}

SA_INLINE void zero_score_grads(const sa_attention_params *p, const grad_query_inputs *in, int64_t row)
{
    if (in->grad_scores)
        memset(in->grad_scores + p->row_ptr[row], 0, sizeof(float) * (size_t)(p->row_ptr[row + 1] - p->row_ptr[row]));
}

SA_INLINE void grad_query_row(const sa_attention_params *p, const call_constants *c, int64_t item, const int vecs)
{
    const work_item it = work_item_of(p, c, item);
    float *grad_q = (float *)p->grad_q + item * 8 * vecs;
    grad_query_inputs in;
    if (!load_grad_query(p, &it, item, &in, vecs)) {
        zero_score_grads(p, &in, it.token);
        memset(grad_q, 0, sizeof(float) * 8 * (size_t)vecs);
        return;
    }
    v8 acc[MAX_VECS];
    for (int v = 0; v < vecs; v++) acc[v] = SPLAT(0.0f);
    grad_query_pairs(p, c, &it, &in, p->row_ptr[it.token], p->row_ptr[it.token + 1], acc, vecs);
    for (int v = 0; v < vecs; v++) STOREU(grad_q + 8 * v, acc[v] * c->scale);
}

/* What the dK/dV pass of one key reads besides its pairs. */
typedef struct {
    v8 k[MAX_VECS], v[MAX_VECS];
    const float *q_head, *grad_out_head, *lse_row, *delta_row;
} key_inputs;

/* Whether the column has pairs to differentiate: its head runs and the key is not masked. */
SA_INLINE int load_key(const sa_attention_params *p, const work_item *it, key_inputs *in, const int vecs)
{
    if (!runs_head(p, it->h) || !allowed_key(p, it->b, it->token)) return 0;
    const float *k = HEAD_OF(*it, p->k, p->k_stride) + it->token * p->k_stride[2];
    const float *v_row = HEAD_OF(*it, p->v, p->v_stride) + it->token * p->v_stride[2];
    for (int v = 0; v < vecs; v++) {
        in->k[v] = LOADU(k + 8 * v);
        in->v[v] = LOADU(v_row + 8 * v);
    }
    in->q_head = HEAD_OF(*it, p->q, p->q_stride);
    in->grad_out_head = HEAD_OF(*it, p->grad_out, p->grad_out_stride);
    in->lse_row = (const float *)p->lse + it->bh * p->num_tokens;
    in->delta_row = (const float *)p->delta + it->bh * p->num_tokens;
    return 1;
}

/* acc_k += sum_i dS_ij Q_i (dK_j is scale x acc_k), acc_v += sum_i P_ij
 * kept_ij dO_i, over the transpose's positions [begin, end) of key j. */
SA_INLINE void grad_key_value_pairs(const sa_attention_params *p, const call_constants *c, const work_item *it,
                                    const key_inputs *in, int64_t begin, int64_t end, v8 *acc_k, v8 *acc_v,
                                    const int vecs)
{
    const int64_t j = it->token;
    int32_t queries[GATHER_CHUNK + 8];
    float lses[GATHER_CHUNK + 8], deltas[GATHER_CHUNK + 8], kept[GATHER_CHUNK + 8];
    float score_grads[GATHER_CHUNK], dropped_probs[GATHER_CHUNK];
    for (int64_t pos = begin; pos < end; pos += GATHER_CHUNK) {
        const int64_t stop = pos + GATHER_CHUNK < end ? pos + GATHER_CHUNK : end;
        const int count = (int)(stop - pos), padded = (count + 7) & ~7;
        for (int e = 0; e < count; e++) {
            const int32_t i = p->row_idx[pos + e];
            queries[e] = i;
            lses[e] = in->lse_row[i];
            deltas[e] = in->delta_row[i];
            kept[e] = c->threshold > 0 &&
                              !sa_dropout_keep(sa_dropout_query_key(it->dropout_row_key, i), j, c->threshold)
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
            gather_two(queries + g, in->q_head, p->q_stride[2], in->grad_out_head, p->grad_out_stride[2], q_rows,
                       grad_rows, vecs);
            v8 s = scaled_scores(in->k, q_rows, queries + g, it, 0, c, vecs);
            const v8 lse = LOADU(lses + g), keep = LOADU(kept + g);
            const i8v no_keys = lse == SPLAT(-INFINITY); /* a row without keys (or padding) adds nothing */
            s = SELECT(no_keys, SPLAT(-INFINITY), s - lse);
            exp_lanes(&s, 1);
            const v8 grad_probs = SELECT(no_keys, SPLAT(0.0f), dots8(in->v, grad_rows, vecs) * keep);
            STOREU(score_grads + g, s * (grad_probs - LOADU(deltas + g)));
            STOREU(dropped_probs + g, s * keep);
        }
        add_weighted_rows(acc_k, score_grads, queries, count, in->q_head, p->q_stride[2], vecs);
        add_weighted_rows(acc_v, dropped_probs, queries, count, in->grad_out_head, p->grad_out_stride[2], vecs);
    }
}

SA_INLINE void grad_key_value_column(const sa_attention_params *p, const call_constants *c, int64_t item,
                                     const int vecs)
{
    const work_item it = work_item_of(p, c, item);
    v8 acc_k[MAX_VECS], acc_v[MAX_VECS];
    for (int v = 0; v < vecs; v++) acc_k[v] = acc_v[v] = SPLAT(0.0f);
    key_inputs in;
    if (load_key(p, &it, &in, vecs))
        grad_key_value_pairs(p, c, &it, &in, p->col_ptr[it.token], p->col_ptr[it.token + 1], acc_k, acc_v, vecs);
    float *grad_k = (float *)p->grad_k + item * 8 * vecs, *grad_v = (float *)p->grad_v + item * 8 * vecs;
    for (int v = 0; v < vecs; v++) {
        STOREU(grad_k + 8 * v, acc_k[v] * c->scale);
        STOREU(grad_v + 8 * v, acc_v[v]);
    }
}

/* Key blocks: where a head's K and V rows outrun L2, a row's scattered keys
 * come from memory one miss after another (RANDOM 10% at 128 x 128, D=64,
 * took as long as dense SDPA; the same pairs with every row's keys inside
 * 2048 tokens took a third of that). The blocked forms take a range of rows
 * of one (batch, head) at a time and walk the keys block by block, each
 * row's pairs in the block in turn, so that the block's rows are read from
 * L2 by every row of the range; a row's softmax state and accumulator wait
 * between blocks (the accumulator in its output row). The columns' pass
 * does the same with blocks of queries. */

static atomic_llong block_tokens_setting = 0, range_rows_setting = 0;

void sa_cpu_set_gather_blocking(int64_t block_tokens, int64_t range_rows)
{
    atomic_store(&block_tokens_setting, block_tokens);
    atomic_store(&range_rows_setting, range_rows);
}

void sa_cpu_get_gather_blocking(int64_t *block_tokens, int64_t *range_rows)
{
    *block_tokens = atomic_load(&block_tokens_setting);
    *range_rows = atomic_load(&range_rows_setting);
}

/* Half a core's L2 (1 MB where the system does not say): the block's rows
 * share it with the range's rows and the CSR. */
static int64_t block_budget_bytes(void)
{
    static atomic_llong cached = 0;
    long long bytes = atomic_load(&cached);
    if (bytes == 0) {
        long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
        l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
        bytes = l2 >= (1 << 18) ? l2 / 2 : (1 << 20);
        atomic_store(&cached, bytes);
    }
    return bytes;
}

/* Rows per range: as set, else SA_GATHER_RANGE_ROWS halved (down to
 * SA_GATHER_MIN_RANGE_ROWS) until the call has SA_GATHER_MIN_RANGES of
 * them: one (batch, head) of 32 x 32 tokens would otherwise be one work
 * item, and its dQ one thread's. A count of the call's, not of the
 * threads, so that the bias tables add up the same on any thread count.
 * Smaller ranges read a head's keys more times. */
static int64_t range_rows_for(int64_t batch_heads, int64_t num_tokens)
{
    const int64_t setting = atomic_load(&range_rows_setting);
    if (setting > 0) return setting < SA_GATHER_RANGE_ROWS ? setting : SA_GATHER_RANGE_ROWS;
    int64_t range = SA_GATHER_RANGE_ROWS;
    while (range > SA_GATHER_MIN_RANGE_ROWS &&
           batch_heads * ((num_tokens + range - 1) / range) < SA_GATHER_MIN_RANGES)
        range /= 2;
    return range;
}

int64_t sa_gather_ranges_per_head(int64_t batch_heads, int64_t num_tokens)
{
    const int64_t range = range_rows_for(batch_heads, num_tokens);
    return (num_tokens + range - 1) / range;
}

/* g for blocks of block_tokens over p, in ranges as set (or the default). */
static void fill_blocking(const sa_attention_params *p, int64_t block, sa_gather_blocking *g)
{
    const int64_t range = range_rows_for(p->batch * p->heads, p->num_tokens);
    g->p = p;
    g->block_tokens = block;
    g->range_rows = range;
    g->num_ranges = (p->num_tokens + range - 1) / range;
    g->bias_partials = NULL;
}

int sa_gather_blocking_for(const sa_attention_params *p, sa_gather_blocking *g)
{
    const int64_t block_setting = atomic_load(&block_tokens_setting);
    if (!sa_cpu_gather_fits(p) || block_setting < 0) return 0;
    const int64_t n = p->num_tokens, row_bytes = 2 * p->head_dim * (int64_t)sizeof(float);
    int64_t block = block_setting;
    if (block == 0) {
        const int64_t budget = block_budget_bytes();
        /* A head's K and V up to three quarters of L2 mostly stay there: on a
         * 2 MB L2, blocks took 1.03-1.18x the time of whole rows at 1.2-1.3 MB
         * (D=40 at 64 x 64, D=16 at 96 x 96), tied at 1.5-1.6 MB and won from
         * 1.8 MB (0.87-0.95x at D=56, 0.81-0.88x at D=64; RANDOM 5-10%). */
        if (n * row_bytes <= budget * 3 / 2) return 0;
        block = (budget / row_bytes) & ~(int64_t)63;
        if (block < 64) block = 64;
    }
    if (block >= n) return 0;
    fill_blocking(p, block, g);
    return 1;
}

void sa_gather_ranges_for(const sa_attention_params *p, sa_gather_blocking *g)
{
    if (!sa_gather_blocking_for(p, g)) fill_blocking(p, p->num_tokens, g); /* one block: whole rows */
}

void sa_gather_sum_bias_partials(const sa_gather_blocking *g, float *grad_bias_rows)
{
    const sa_attention_params *p = g->p;
    const int64_t side = 2 * p->max_relative + 1, entries = side * side;
    for (int64_t bh = 0; bh < p->batch * p->heads; bh++) {
        float *out = grad_bias_rows + bh * entries;
        const float *partial = g->bias_partials + bh * g->num_ranges * entries;
        memcpy(out, partial, sizeof(float) * (size_t)entries);
        for (int64_t r = 1; r < g->num_ranges; r++) /* in range order: the same sum on any thread count */
            for (int64_t t = 0; t < entries; t++) out[t] += partial[r * entries + t];
    }
}

/* The range of rows (or columns) of a blocked work item: its first token and count. */
SA_INLINE int64_t range_of(const sa_gather_blocking *g, int64_t item, int64_t *first)
{
    const int64_t n = g->p->num_tokens;
    *first = (item % g->num_ranges) * g->range_rows;
    return *first + g->range_rows < n ? g->range_rows : n - *first;
}

/* The end of a row's (or column's) positions in the block ending at
 * block_end: every position left in the last block, so that each pair is
 * taken once whatever the order of a row's keys. */
SA_INLINE int64_t block_stop(const int32_t *tokens, int64_t pos, int64_t end, int64_t block_end, int64_t n)
{
    if (block_end >= n) return end;
    while (pos < end && tokens[pos] < block_end) pos++;
    return pos;
}

SA_INLINE void load_acc(v8 *acc, const float *row, const int vecs)
{
    for (int v = 0; v < vecs; v++) acc[v] = LOADU(row + 8 * v);
}

SA_INLINE void store_acc(float *row, const v8 *acc, const int vecs)
{
    for (int v = 0; v < vecs; v++) STOREU(row + 8 * v, acc[v]);
}

SA_INLINE void forward_range(const sa_gather_blocking *g, const call_constants *c, int64_t item, const int vecs)
{
    const sa_attention_params *p = g->p;
    const int64_t n = p->num_tokens, base = (item / g->num_ranges) * n;
    int64_t first;
    const int64_t rows = range_of(g, item, &first);
    softmax_state states[SA_GATHER_RANGE_ROWS];
    int64_t cursors[SA_GATHER_RANGE_ROWS];
    v8 acc[MAX_VECS];
    const int live = runs_head(p, (base / n) % p->heads);
    for (int64_t r = 0; r < rows; r++) {
        states[r] = fresh_softmax;
        cursors[r] = p->row_ptr[first + r];
        const work_item it = work_item_of(p, c, base + first + r);
        memset(out_row(p, &it), 0, sizeof(float) * 8 * (size_t)vecs);
    }
    for (int64_t block_end = g->block_tokens; live; block_end += g->block_tokens) {
        for (int64_t r = 0; r < rows; r++) {
            const int64_t i = first + r, pos = cursors[r];
            const int64_t stop = block_stop(p->col_idx, pos, p->row_ptr[i + 1], block_end, n);
            if (stop == pos) continue;
            cursors[r] = stop;
            const work_item it = work_item_of(p, c, base + i);
            query_inputs in;
            load_query(p, &it, &in, vecs);
            float *out = out_row(p, &it);
            load_acc(acc, out, vecs);
            forward_pairs(p, c, &it, &in, pos, stop, acc, &states[r], vecs);
            store_acc(out, acc, vecs);
        }
        if (block_end >= n) break;
    }
    for (int64_t r = 0; r < rows; r++) {
        const work_item it = work_item_of(p, c, base + first + r);
        float *out = out_row(p, &it);
        load_acc(acc, out, vecs);
        forward_finish(p, base + first + r, out, acc, &states[r], vecs);
    }
}

SA_INLINE void grad_query_range(const sa_gather_blocking *g, const call_constants *c, int64_t item,
                                const int vecs)
{
    const sa_attention_params *p = g->p;
    const int64_t n = p->num_tokens, base = (item / g->num_ranges) * n;
    int64_t first;
    const int64_t rows = range_of(g, item, &first);
    int64_t cursors[SA_GATHER_RANGE_ROWS]; /* -1: a row without pairs to differentiate */
    grad_query_inputs in;
    v8 acc[MAX_VECS];
    const int64_t side = 2 * (int64_t)c->max_relative + 1;
    float *bias_grad = g->bias_partials ? g->bias_partials + item * side * side : NULL;
    if (bias_grad) memset(bias_grad, 0, sizeof(float) * (size_t)(side * side));
    for (int64_t r = 0; r < rows; r++) {
        const work_item it = work_item_of(p, c, base + first + r);
        memset((float *)p->grad_q + (base + first + r) * 8 * vecs, 0, sizeof(float) * 8 * (size_t)vecs);
        cursors[r] = load_grad_query(p, &it, base + first + r, &in, vecs) ? p->row_ptr[first + r] : -1;
        if (cursors[r] < 0) zero_score_grads(p, &in, first + r);
    }
    for (int64_t block_end = g->block_tokens;; block_end += g->block_tokens) {
        for (int64_t r = 0; r < rows; r++) {
            const int64_t i = first + r, pos = cursors[r];
            if (pos < 0) continue;
            const int64_t stop = block_stop(p->col_idx, pos, p->row_ptr[i + 1], block_end, n);
            if (stop == pos) continue;
            cursors[r] = stop;
            const work_item it = work_item_of(p, c, base + i);
            if (!load_grad_query(p, &it, base + i, &in, vecs)) continue; /* live rows load; said for the compiler */
            in.bias_grad = bias_grad;
            float *grad_q = (float *)p->grad_q + (base + i) * 8 * vecs;
            load_acc(acc, grad_q, vecs);
            grad_query_pairs(p, c, &it, &in, pos, stop, acc, vecs);
            store_acc(grad_q, acc, vecs);
        }
        if (block_end >= n) break;
    }
    for (int64_t r = 0; r < rows; r++) {
        float *grad_q = (float *)p->grad_q + (base + first + r) * 8 * vecs;
        load_acc(acc, grad_q, vecs);
        for (int v = 0; v < vecs; v++) acc[v] *= c->scale;
        store_acc(grad_q, acc, vecs);
    }
}

SA_INLINE void grad_key_value_range(const sa_gather_blocking *g, const call_constants *c, int64_t item,
                                    const int vecs)
{
    const sa_attention_params *p = g->p;
    const int64_t n = p->num_tokens, base = (item / g->num_ranges) * n;
    int64_t first;
    const int64_t columns = range_of(g, item, &first);
    int64_t cursors[SA_GATHER_RANGE_ROWS]; /* -1: a column without pairs to differentiate */
    key_inputs in;
    v8 acc_k[MAX_VECS], acc_v[MAX_VECS];
    for (int64_t r = 0; r < columns; r++) {
        const work_item it = work_item_of(p, c, base + first + r);
        memset((float *)p->grad_k + (base + first + r) * 8 * vecs, 0, sizeof(float) * 8 * (size_t)vecs);
        memset((float *)p->grad_v + (base + first + r) * 8 * vecs, 0, sizeof(float) * 8 * (size_t)vecs);
        cursors[r] = load_key(p, &it, &in, vecs) ? p->col_ptr[first + r] : -1;
    }
    for (int64_t block_end = g->block_tokens;; block_end += g->block_tokens) {
        for (int64_t r = 0; r < columns; r++) {
            const int64_t j = first + r, pos = cursors[r];
            if (pos < 0) continue;
            const int64_t stop = block_stop(p->row_idx, pos, p->col_ptr[j + 1], block_end, n);
            if (stop == pos) continue;
            cursors[r] = stop;
            const work_item it = work_item_of(p, c, base + j);
            if (!load_key(p, &it, &in, vecs)) continue; /* live columns load; said for the compiler */
            float *grad_k = (float *)p->grad_k + (base + j) * 8 * vecs;
            float *grad_v = (float *)p->grad_v + (base + j) * 8 * vecs;
            load_acc(acc_k, grad_k, vecs);
            load_acc(acc_v, grad_v, vecs);
            grad_key_value_pairs(p, c, &it, &in, pos, stop, acc_k, acc_v, vecs);
            store_acc(grad_k, acc_k, vecs);
            store_acc(grad_v, acc_v, vecs);
        }
        if (block_end >= n) break;
    }
    for (int64_t r = 0; r < columns; r++) {
        float *grad_k = (float *)p->grad_k + (base + first + r) * 8 * vecs;
        load_acc(acc_k, grad_k, vecs);
        for (int v = 0; v < vecs; v++) acc_k[v] *= c->scale;
        store_acc(grad_k, acc_k, vecs);
    }
}

/* One clone set per kernel and head dim: the vector count is a constant in
 * each. ctx is the call's params for the row kernels, an sa_gather_blocking
 * for the blocked ones. */
#define ROW_PARAMS(ctx) ((const sa_attention_params *)(ctx))
#define RANGE_PARAMS(ctx) (((const sa_gather_blocking *)(ctx))->p)

#define GATHER_KERNEL(kernel, ctx_type, params, vecs)                                      \
    GATHER_CLONES static void kernel##_##vecs(void *ctx, int64_t begin, int64_t end)       \
    {                                                                                      \
        const call_constants c = constants_of(params(ctx));                                \
        for (int64_t item = begin; item < end; item++)                                     \
            kernel((const ctx_type *)ctx, &c, item, vecs);                                 \
    }

/* Past eight vectors a row no longer fits the registers beside its
 * accumulators, but a constant count still unrolls the loops over it: D=80,
 * 96 and 128 have clones of their own (at D=96 the variable count took
 * 1.3x their time forward, 1.2x forward+backward), and one clone with the
 * count in a variable takes the other multiples of 8 up to 128. */
#define GATHER_KERNEL_WIDE(kernel, ctx_type, params)                                       \
    GATHER_CLONES static void kernel##_wide(void *ctx, int64_t begin, int64_t end)         \
    {                                                                                      \
        const call_constants c = constants_of(params(ctx));                                \
        const int vecs = (int)(params(ctx)->head_dim / 8);                                 \
        for (int64_t item = begin; item < end; item++)                                     \
            kernel((const ctx_type *)ctx, &c, item, vecs);                                 \
    }

#define GATHER_KERNELS(kernel, ctx_type, params, name)                                     \
    GATHER_KERNEL(kernel, ctx_type, params, 1)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 2)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 3)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 4)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 5)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 6)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 7)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 8)                                             \
    GATHER_KERNEL(kernel, ctx_type, params, 10)                                            \
    GATHER_KERNEL(kernel, ctx_type, params, 12)                                            \
    GATHER_KERNEL(kernel, ctx_type, params, 16)                                            \
    GATHER_KERNEL_WIDE(kernel, ctx_type, params)                                           \
    void name(void *ctx, int64_t begin, int64_t end)                                       \
    {                                                                                      \
        static const sa_range_fn by_vecs[MAX_VECS] = {                                     \
            kernel##_1,    kernel##_2,  kernel##_3,    kernel##_4,    kernel##_5,    kernel##_6, \
            kernel##_7,    kernel##_8,  kernel##_wide, kernel##_10,   kernel##_wide, kernel##_12, \
            kernel##_wide, kernel##_wide, kernel##_wide, kernel##_16};                     \
        by_vecs[params(ctx)->head_dim / 8 - 1](ctx, begin, end);                           \
    }

GATHER_KERNELS(forward_row, sa_attention_params, ROW_PARAMS, sa_gather_forward_rows)
GATHER_KERNELS(grad_query_row, sa_attention_params, ROW_PARAMS, sa_gather_grad_query_rows)
GATHER_KERNELS(grad_key_value_column, sa_attention_params, ROW_PARAMS, sa_gather_grad_key_value_columns)
GATHER_KERNELS(forward_range, sa_gather_blocking, RANGE_PARAMS, sa_gather_forward_ranges)
GATHER_KERNELS(grad_query_range, sa_gather_blocking, RANGE_PARAMS, sa_gather_grad_query_ranges)
GATHER_KERNELS(grad_key_value_range, sa_gather_blocking, RANGE_PARAMS, sa_gather_grad_key_value_ranges)
