/* CPU kernels, written once for a scalar type and included by attention_cpu.c
 * once per type. Before inclusion define:
 *   SA_T    the element and accumulation type (float or double)
 *   SA_FN   a macro that suffixes a name with the type
 *   SA_EXP, SA_LOG   exp and log for SA_T
 *
 * Shapes: q, k, v, out, grad_* are batch x heads x tokens x head_dim; one work
 * item is one (b, h, row) or, in the key pass, one (b, h, column). */

#define SA_CHUNK 64

/* Multiversioned for the vector units this CPU has (AVX-512, AVX2, baseline). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SA_NO_CLONES)
#define SA_VECTOR_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SA_VECTOR_CLONES
#endif

static inline SA_T SA_FN(dot)(const SA_T *restrict a, const SA_T *restrict b, int64_t n)
{
    SA_T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < n; d++) sum += a[d] * b[d];
    return sum;
}

static inline void SA_FN(axpy)(SA_T *restrict y, SA_T alpha, const SA_T *restrict x, int64_t n)
{
#pragma omp simd
    for (int64_t d = 0; d < n; d++) y[d] += alpha * x[d];
}

static inline void SA_FN(scale_in_place)(SA_T *restrict y, SA_T alpha, int64_t n)
{
#pragma omp simd
    for (int64_t d = 0; d < n; d++) y[d] *= alpha;
}

static inline SA_T SA_FN(bias_at)(const sa_attention_params *p, int64_t h, int64_t i, int64_t j)
{
    if (p->bias_table == NULL) return 0;
    int64_t m = p->max_relative, side = 2 * m + 1;
    int64_t dy = i / p->width - j / p->width, dx = i % p->width - j % p->width;
    dy = dy < -m ? -m : (dy > m ? m : dy);
    dx = dx < -m ? -m : (dx > m ? m : dx);
    const SA_T *table = (const SA_T *)p->bias_table;
    return table[(h * side + dy + m) * side + dx + m];
}

#define ROW(ptr, stride, b, h, i) ((ptr) + (b) * (stride)[0] + (h) * (stride)[1] + (i) * (stride)[2])

/* ---- forward: streaming softmax over each row's keys, in chunks ---------- */

SA_VECTOR_CLONES
static void SA_FN(forward_rows)(void *ctx, int64_t begin, int64_t end)
{
    const sa_attention_params *p = ctx;
    const int64_t n = p->num_tokens, dim = p->head_dim;
    const SA_T scale = (SA_T)p->scale;
    const SA_T keep_scale = p->dropout_p > 0 ? (SA_T)(1.0 / (1.0 - p->dropout_p)) : 1;
    const uint32_t threshold = sa_dropout_threshold(p->dropout_p);
    SA_T acc[SA_CPU_MAX_DIM];
    SA_T scores[SA_CHUNK], weights[SA_CHUNK];
    int32_t keys[SA_CHUNK];

    for (int64_t item = begin; item < end; item++) {
        const int64_t i = item % n, bh = item / n, h = bh % p->heads, b = bh / p->heads;
        SA_T *out = ROW((SA_T *)p->out, p->out_stride, b, h, i);
        SA_T *lse = (SA_T *)p->lse + item;
        SA_T *stats = p->row_stats ? (SA_T *)p->row_stats + 2 * item : NULL;
        for (int64_t d = 0; d < dim; d++) acc[d] = 0;
        SA_T run_max = -INFINITY, run_sum = 0, run_sq = 0, run_shifted = 0;
        int saw_nan = 0; /* a NaN score makes the row NaN, as in PyTorch */
        if (head_runs(p, h)) {
            const SA_T *q = ROW((const SA_T *)p->q, p->q_stride, b, h, i);
            const uint32_t query_key =
                sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), i);
            for (int64_t pos = p->row_ptr[i]; pos < p->row_ptr[i + 1]; pos += SA_CHUNK) {
                int64_t stop = pos + SA_CHUNK < p->row_ptr[i + 1] ? pos + SA_CHUNK : p->row_ptr[i + 1];
                int count = 0;
                SA_T chunk_max = -INFINITY;
                for (int64_t c = pos; c < stop; c++) {
                    const int32_t j = p->col_idx[c];
                    if (!key_allowed(p, b, j)) continue;
                    const SA_T *k = ROW((const SA_T *)p->k, p->k_stride, b, h, j);
                    SA_T s = scale * SA_FN(dot)(q, k, dim) + SA_FN(bias_at)(p, h, i, j);
                    scores[count] = s;
                    keys[count++] = j;
                    chunk_max = s > chunk_max ? s : chunk_max;
                    saw_nan |= s != s;
                }
                if (count == 0) continue;
                if (chunk_max > run_max) {
                    if (run_sum > 0) {
                        /* rescale what was summed against the old maximum */
                        SA_T r = SA_EXP(run_max - chunk_max);
                        run_shifted = r * (run_shifted + run_sum * (run_max - chunk_max));
                        run_sum *= r;
                        run_sq *= r * r;
                        SA_FN(scale_in_place)(acc, r, dim);
                    }
                    run_max = chunk_max;
                }
                SA_T chunk_sum = 0, chunk_sq = 0, chunk_shifted = 0;
#pragma omp simd reduction(+ : chunk_sum, chunk_sq, chunk_shifted)
                for (int c = 0; c < count; c++) {
                    const SA_T shifted = scores[c] - run_max;
                    const SA_T e = SA_EXP(shifted);
                    weights[c] = e * keep_scale;
                    chunk_sum += e;
                    chunk_sq += e * e;
                    chunk_shifted += e * shifted;
                }
                run_sum += chunk_sum;
                run_sq += chunk_sq;
                run_shifted += chunk_shifted;
                for (int c = 0; c < count; c++) {
                    if (threshold > 0 && !sa_dropout_keep(query_key, keys[c], threshold)) continue;
                    SA_FN(axpy)(acc, weights[c], ROW((const SA_T *)p->v, p->v_stride, b, h, keys[c]), dim);
                }
            }
        }
        /* a +inf score leaves exp(inf - inf) in its softmax: the row is NaN, and so is its
         * lse, which the backward then passes on as NaN rather than as a row without keys */
        if (saw_nan || run_max == INFINITY) {
            for (int64_t d = 0; d < dim; d++) out[d] = NAN;
            *lse = NAN;
            if (stats) stats[0] = stats[1] = NAN;
        } else if (run_sum > 0) {
            SA_T inv = 1 / run_sum;
            for (int64_t d = 0; d < dim; d++) out[d] = acc[d] * inv;
            *lse = run_max + SA_LOG(run_sum);
            if (stats) {
                stats[0] = run_sq * inv * inv;
                stats[1] = SA_LOG(run_sum) - run_shifted * inv;
            }
        } else {
            for (int64_t d = 0; d < dim; d++) out[d] = 0;
            *lse = -INFINITY;
            if (stats) stats[0] = stats[1] = 0;
        }
    }
}

/* ---- backward ------------------------------------------------------------ */

/* delta_i = <dO_i, O_i> = sum_j P_ij dP_ij, dropout included. */
SA_VECTOR_CLONES
static void SA_FN(delta_rows)(void *ctx, int64_t begin, int64_t end)
{
    const sa_attention_params *p = ctx;
    const int64_t n = p->num_tokens;
    for (int64_t item = begin; item < end; item++) {
        const int64_t i = item % n, bh = item / n, h = bh % p->heads, b = bh / p->heads;
        ((SA_T *)p->delta)[item] = SA_FN(dot)(ROW((const SA_T *)p->grad_out, p->grad_out_stride, b, h, i),
                                              ROW((const SA_T *)p->out, p->out_stride, b, h, i),
                                              p->head_dim);
    }
}

/* dS_ij = P_ij (dP_ij - delta_i), with dP_ij = <dO_i, V_j> scaled by the dropout
 * mask. The pairs of one row (or column) go in chunks: the two dot products
 * per pair first, then probabilities and dS for the whole chunk in one
 * vectorised loop, then the accumulations. */

SA_VECTOR_CLONES
static void SA_FN(grad_query_rows)(void *ctx, int64_t begin, int64_t end)
{
    const sa_attention_params *p = ctx;
    const int64_t n = p->num_tokens, dim = p->head_dim;
    const SA_T scale = (SA_T)p->scale;
    const SA_T keep_scale = p->dropout_p > 0 ? (SA_T)(1.0 / (1.0 - p->dropout_p)) : 1;
    const uint32_t threshold = sa_dropout_threshold(p->dropout_p);
    SA_T acc[SA_CPU_MAX_DIM];
    SA_T scores[SA_CHUNK], grad_probs[SA_CHUNK], score_grads[SA_CHUNK];
    int32_t keys[SA_CHUNK];

    for (int64_t item = begin; item < end; item++) {
        const int64_t i = item % n, bh = item / n, h = bh % p->heads, b = bh / p->heads;
        SA_T *grad_q = (SA_T *)p->grad_q + item * dim;
        SA_T *grad_scores = p->grad_scores ? (SA_T *)p->grad_scores + bh * p->nnz : NULL;
        const SA_T lse = ((const SA_T *)p->lse)[item];
        for (int64_t d = 0; d < dim; d++) acc[d] = 0;
        if (!head_runs(p, h) || lse == -INFINITY) {
            if (grad_scores) {
                for (int64_t pos = p->row_ptr[i]; pos < p->row_ptr[i + 1]; pos++) grad_scores[pos] = 0;
            }
            for (int64_t d = 0; d < dim; d++) grad_q[d] = 0;
            continue;
        }
        const SA_T *q = ROW((const SA_T *)p->q, p->q_stride, b, h, i);
        const SA_T *grad_out_row = ROW((const SA_T *)p->grad_out, p->grad_out_stride, b, h, i);
        const SA_T delta = ((const SA_T *)p->delta)[item];
        const uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), i);
        for (int64_t pos = p->row_ptr[i]; pos < p->row_ptr[i + 1]; pos += SA_CHUNK) {
            const int64_t stop = pos + SA_CHUNK < p->row_ptr[i + 1] ? pos + SA_CHUNK : p->row_ptr[i + 1];
            const int count = (int)(stop - pos);
            for (int c = 0; c < count; c++) {
                const int32_t j = p->col_idx[pos + c];
                keys[c] = j;
                if (!key_allowed(p, b, j)) {
                    scores[c] = -INFINITY;
                    grad_probs[c] = 0;
                    continue;
                }
                SA_T kept = keep_scale;
                if (threshold > 0 && !sa_dropout_keep(query_key, j, threshold)) kept = 0;
                scores[c] = scale * SA_FN(dot)(q, ROW((const SA_T *)p->k, p->k_stride, b, h, j), dim) +
                            SA_FN(bias_at)(p, h, i, j) - lse;
                grad_probs[c] = kept * SA_FN(dot)(grad_out_row, ROW((const SA_T *)p->v, p->v_stride, b, h, j), dim);
            }
#pragma omp simd
            for (int c = 0; c < count; c++) {
                const SA_T prob = scores[c] == -INFINITY ? 0 : SA_EXP(scores[c]);
                score_grads[c] = prob * (grad_probs[c] - delta);
            }
            for (int c = 0; c < count; c++) {
                if (score_grads[c] != 0)
                    SA_FN(axpy)(acc, score_grads[c], ROW((const SA_T *)p->k, p->k_stride, b, h, keys[c]), dim);
            }
            if (grad_scores) memcpy(grad_scores + pos, score_grads, sizeof(SA_T) * (size_t)count);
        }
        for (int64_t d = 0; d < dim; d++) grad_q[d] = acc[d] * scale;
    }
}

SA_VECTOR_CLONES
static void SA_FN(grad_key_value_columns)(void *ctx, int64_t begin, int64_t end)
{
    const sa_attention_params *p = ctx;
    const int64_t n = p->num_tokens, dim = p->head_dim;
    const SA_T scale = (SA_T)p->scale;
    const SA_T keep_scale = p->dropout_p > 0 ? (SA_T)(1.0 / (1.0 - p->dropout_p)) : 1;
    const uint32_t threshold = sa_dropout_threshold(p->dropout_p);
    SA_T acc_k[SA_CPU_MAX_DIM], acc_v[SA_CPU_MAX_DIM];
    SA_T scores[SA_CHUNK], grad_probs[SA_CHUNK], kept[SA_CHUNK], deltas[SA_CHUNK];
    SA_T score_grads[SA_CHUNK], dropped_probs[SA_CHUNK];
    int32_t queries[SA_CHUNK];

    for (int64_t item = begin; item < end; item++) {
        const int64_t j = item % n, bh = item / n, h = bh % p->heads, b = bh / p->heads;
        for (int64_t d = 0; d < dim; d++) acc_k[d] = acc_v[d] = 0;
        if (head_runs(p, h) && key_allowed(p, b, j)) {
            const SA_T *k = ROW((const SA_T *)p->k, p->k_stride, b, h, j);
            const SA_T *v = ROW((const SA_T *)p->v, p->v_stride, b, h, j);
            const uint32_t row_key = sa_dropout_row_key(p->dropout_seed, b, h);
            const SA_T *lse_row = (const SA_T *)p->lse + bh * n;
            const SA_T *delta_row = (const SA_T *)p->delta + bh * n;
            for (int64_t pos = p->col_ptr[j]; pos < p->col_ptr[j + 1]; pos += SA_CHUNK) {
                const int64_t stop = pos + SA_CHUNK < p->col_ptr[j + 1] ? pos + SA_CHUNK : p->col_ptr[j + 1];
                const int count = (int)(stop - pos);
                for (int c = 0; c < count; c++) {
                    const int32_t i = p->row_idx[pos + c];
                    queries[c] = i;
                    const SA_T lse = lse_row[i];
                    deltas[c] = delta_row[i];
                    if (lse == -INFINITY) {
                        scores[c] = -INFINITY;
                        grad_probs[c] = kept[c] = 0;
                        continue;
                    }
                    kept[c] = keep_scale;
                    if (threshold > 0 && !sa_dropout_keep(sa_dropout_query_key(row_key, i), j, threshold))
                        kept[c] = 0;
                    scores[c] = scale * SA_FN(dot)(ROW((const SA_T *)p->q, p->q_stride, b, h, i), k, dim) +
                                SA_FN(bias_at)(p, h, i, j) - lse;
                    grad_probs[c] = kept[c] * SA_FN(dot)(ROW((const SA_T *)p->grad_out, p->grad_out_stride, b, h, i), v, dim);
                }
#pragma omp simd
                for (int c = 0; c < count; c++) {
                    const SA_T prob = scores[c] == -INFINITY ? 0 : SA_EXP(scores[c]);
                    score_grads[c] = prob * (grad_probs[c] - deltas[c]);
                    dropped_probs[c] = prob * kept[c];
                }
                for (int c = 0; c < count; c++) {
                    const int32_t i = queries[c];
                    if (score_grads[c] != 0)
                        SA_FN(axpy)(acc_k, score_grads[c], ROW((const SA_T *)p->q, p->q_stride, b, h, i), dim);
                    if (dropped_probs[c] != 0)
                        SA_FN(axpy)(acc_v, dropped_probs[c], ROW((const SA_T *)p->grad_out, p->grad_out_stride, b, h, i), dim);
                }
            }
        }
        SA_T *grad_k = (SA_T *)p->grad_k + item * dim;
        SA_T *grad_v = (SA_T *)p->grad_v + item * dim;
        for (int64_t d = 0; d < dim; d++) {
            grad_k[d] = acc_k[d] * scale;
            grad_v[d] = acc_v[d];
        }
    }
}

/* One work item per (h, bucket): a fixed summation order whatever the threads. */
static void SA_FN(bias_grad_buckets)(void *ctx, int64_t begin, int64_t end)
{
    const sa_bias_grad_params *p = ctx;
    const SA_T *grad_scores = p->grad_scores;
    SA_T *grad_table = p->grad_table;
    for (int64_t item = begin; item < end; item++) {
        const int64_t h = item / p->num_buckets, t = item % p->num_buckets;
        SA_T sum = 0;
        for (int64_t b = 0; b < p->batch; b++) {
            const SA_T *row = grad_scores + (b * p->heads + h) * p->nnz;
            for (int64_t q = p->bucket_ptr[t]; q < p->bucket_ptr[t + 1]; q++) {
                sum += row[p->bucket_perm[q]];
            }
        }
        grad_table[item] = sum;
    }
}

#undef ROW
#undef SA_VECTOR_CLONES
#undef SA_CHUNK
