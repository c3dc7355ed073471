/* CPU keep masks of the counter-based dropout generator (see dropout_mask.h). */
#include "dropout_mask.h"

#include <stdio.h>

#include "dropout_hash.h"
#include "threads.h"

/* Work items are (b, h, row) in outer form and (b, h, block of pairs) in
 * paired form: enough of them for the threads, each a few thousand pairs. */
#define PAIRS_PER_ITEM 4096

static void outer_rows(void *ctx, int64_t begin, int64_t end)
{
    const sa_dropout_mask_params *p = (const sa_dropout_mask_params *)ctx;
    for (int64_t item = begin; item < end; item++) {
        int64_t i = item % p->num_rows, bh = item / p->num_rows;
        uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p->seed, bh / p->heads, bh % p->heads),
                                                  p->rows[i]);
        uint8_t *keep = p->keep + item * p->num_cols;
        for (int64_t j = 0; j < p->num_cols; j++) /* vectorises: 32-bit lanes */
            keep[j] = (uint8_t)sa_dropout_keep(query_key, p->cols[j], p->threshold);
    }
}

static void paired_blocks(void *ctx, int64_t begin, int64_t end)
{
    const sa_dropout_mask_params *p = (const sa_dropout_mask_params *)ctx;
    int64_t blocks = (p->num_rows + PAIRS_PER_ITEM - 1) / PAIRS_PER_ITEM;
    for (int64_t item = begin; item < end; item++) {
        int64_t bh = item / blocks, first = (item % blocks) * PAIRS_PER_ITEM;
        int64_t last = first + PAIRS_PER_ITEM < p->num_rows ? first + PAIRS_PER_ITEM : p->num_rows;
        uint32_t row_key = sa_dropout_row_key(p->seed, bh / p->heads, bh % p->heads);
        uint8_t *keep = p->keep + bh * p->num_rows;
        for (int64_t e = first; e < last; e++)
            keep[e] = (uint8_t)sa_dropout_keep(sa_dropout_query_key(row_key, p->rows[e]), p->cols[e],
                                               p->threshold);
    }
}

int sa_cpu_dropout_mask(const sa_dropout_mask_params *p, int num_threads, char *err, size_t err_len)
{
    int64_t items;
    sa_range_fn fn;
    if (p->outer) {
        items = p->batch * p->heads * p->num_rows;
        fn = outer_rows;
    } else {
        items = p->batch * p->heads * ((p->num_rows + PAIRS_PER_ITEM - 1) / PAIRS_PER_ITEM);
        fn = paired_blocks;
    }
    if (items == 0 || (p->outer && p->num_cols == 0)) return 0;
    int64_t per_item = p->outer ? p->num_cols : PAIRS_PER_ITEM;
    int64_t grain = per_item >= PAIRS_PER_ITEM ? 1 : (PAIRS_PER_ITEM + per_item - 1) / per_item;
    if (sa_parallel_for(items, grain, num_threads, fn, (void *)p) != 0) {
        snprintf(err, err_len, "dropout mask: could not start a thread");
        return -1;
    }
    return 0;
}
