/* What the CPU stencil kernels (attention_cpu_stencil.c, attention_cpu_window.c)
 * need to know of a pair beyond its dot product: where a row of a (batch, head)
 * lies, whether a key may be attended, the relative position bias, and the
 * dropout draw for eight pairs at once (the generator of dropout_hash.h). */
#ifndef SA_STENCIL_PAIRS_H
#define SA_STENCIL_PAIRS_H

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>

#include "attention.h"
#include "dropout_lanes.h"
#include "simd8.h"
#include "threads.h"

static inline const float *sa_row_of(const float *base, const int64_t *stride, int64_t b, int64_t h, int64_t i)
{
    return base + b * stride[0] + h * stride[1] + i * stride[2];
}

static inline int sa_key_usable(const sa_attention_params *p, int64_t b, int64_t j)
{
    return p->key_mask == NULL || p->key_mask[b * p->key_mask_stride[0] + j * p->key_mask_stride[1]];
}

/* The cell of one head's bias table for offset (dy, dx), query minus key:
 * clipped to the table */
static inline int64_t sa_bias_cell(const sa_attention_params *p, int64_t dy, int64_t dx)
{
    const int64_t m = p->max_relative;
    dy = dy < -m ? -m : (dy > m ? m : dy);
    dx = dx < -m ? -m : (dx > m ? m : dx);
    return (dy + m) * (2 * m + 1) + dx + m;
}

static inline float sa_bias_of(const sa_attention_params *p, int64_t h, int64_t dy, int64_t dx)
{
    if (p->bias_table == NULL) return 0.0f;
    const int64_t side = 2 * p->max_relative + 1;
    return ((const float *)p->bias_table)[h * side * side + sa_bias_cell(p, dy, dx)];
}

/* Whether CSR row i holds every token, in order (LONGFORMER's global queries). */
static inline int sa_row_attends_every_token(const sa_attention_params *p, int64_t i)
{
    const int64_t n = p->num_tokens, start = p->row_ptr[i];
    if (p->row_ptr[i + 1] - start != n) return 0;
    for (int64_t t = 0; t < n; t++)
        if (p->col_idx[start + t] != t) return 0;
    return 1;
}

/* The forward of a pruned head for tokens [first, end): zero outputs, rows
 * without a key (log-sum-exp -inf), zero statistics. */
static inline void sa_write_pruned_rows(const sa_attention_params *p, int64_t b, int64_t h, int64_t first,
                                        int64_t end)
{
    const int64_t bh = b * p->heads + h;
    for (int64_t i = first; i < end; i++) {
        float *out = (float *)p->out + b * p->out_stride[0] + h * p->out_stride[1] + i * p->out_stride[2];
        for (int64_t d = 0; d < p->head_dim; d++) out[d] = 0.0f;
        ((float *)p->lse)[bh * p->num_tokens + i] = -INFINITY;
        if (p->row_stats != NULL) {
            float *stats = (float *)p->row_stats + 2 * (bh * p->num_tokens + i);
            stats[0] = stats[1] = 0.0f;
        }
    }
}

/* Runs fn on min(items, num_threads) workers that pull items themselves;
 * what names the kernel in the message of a failure (a worker that could not
 * get its buffers sets *failed). */
static inline int sa_run_workers(int64_t items, int num_threads, sa_range_fn fn, void *ctx, atomic_int *failed,
                                 const char *what, char *err, size_t len)
{
    if (items <= 0) return SA_OK;
    const int64_t workers = num_threads < items ? num_threads : items;
    if (sa_parallel_for(workers, 1, (int)workers, fn, ctx) != 0 || atomic_load(failed)) {
        snprintf(err, len, "could not run the %s (out of memory)", what);
        return SA_ERR_MEMORY;
    }
    return SA_OK;
}

/* The listed rows that do not attend every token, for the row kernel. */
static inline void sa_rows_not_full(const sa_attention_params *p, const uint8_t *listed_full, int32_t *rows_left,
                                    int64_t *num_left)
{
    *num_left = 0;
    for (int64_t t = 0; t < p->stencil_num_rows; t++)
        if (!listed_full[t]) rows_left[(*num_left)++] = p->stencil_rows[t];
}

#endif /* SA_STENCIL_PAIRS_H */
