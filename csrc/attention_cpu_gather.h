/* CPU row and column kernels for float32 layouts whose keys follow no
 * pattern the panel kernels can use (RANDOM at low ratios, scattered custom
 * layouts, the long rows a tile plan leaves out): keys gathered one by one,
 * eight at a time (attention_cpu_gather.c). */
#ifndef SA_ATTENTION_CPU_GATHER_H
#define SA_ATTENTION_CPU_GATHER_H

#include "attention.h"

/* Whether the gather kernels take p: float32, a head dim that is a multiple
 * of 8 up to SA_GATHER_MAX_DIM, and fewer than SA_GATHER_MAX_TOKENS tokens
 * (the bias's grid coordinates are worked out in float lanes). */
int sa_cpu_gather_fits(const sa_attention_params *p);

#define SA_GATHER_MAX_DIM 128
#define SA_GATHER_MAX_TOKENS (1 << 22)

/* sa_range_fn work items as the generic row kernels count them
 * (attention_cpu_body.h): (b, h, row) for the forward and dQ, (b, h, column)
 * for dK and dV. p->delta must be filled before the backward ones run. */
void sa_gather_forward_rows(void *ctx, int64_t begin, int64_t end);
void sa_gather_grad_query_rows(void *ctx, int64_t begin, int64_t end);
void sa_gather_grad_key_value_columns(void *ctx, int64_t begin, int64_t end);

/* The blocked forms, for heads whose K and V rows (Q and dO rows for the
 * columns) outrun L2: work items are ranges of up to SA_GATHER_RANGE_ROWS
 * rows (columns; fewer where the call has few) of one (batch, head), which walk the keys (queries) in blocks of
 * block_tokens. Same results as the row forms up to the order of the sums. */
#define SA_GATHER_RANGE_ROWS 1024
#define SA_GATHER_MIN_RANGE_ROWS 64
#define SA_GATHER_MIN_RANGES 32

typedef struct {
    const sa_attention_params *p;
    int64_t block_tokens, range_rows, num_ranges; /* num_ranges per (batch, head) */
    /* dQ pass: NULL, or batch x heads x num_ranges bias tables ((2M + 1)^2
     * floats) that each range fills with its rows' score gradients by offset */
    float *bias_partials;
} sa_gather_blocking;

/* 1 and g filled where p runs blocked (the gather kernels take it and a
 * head's K and V outrun three quarters of L2, or the setting forces blocks),
 * else 0. */
int sa_gather_blocking_for(const sa_attention_params *p, sa_gather_blocking *g);

/* As sa_gather_blocking_for, but always filled: one block of every key
 * (whole rows, in ranges) where p does not block. */
void sa_gather_ranges_for(const sa_attention_params *p, sa_gather_blocking *g);

/* The ranges per (batch, head) that a dQ pass over batch_heads x num_tokens
 * rows takes as set now: each holds a bias table of its own when the bias
 * gradient is summed per head. */
int64_t sa_gather_ranges_per_head(int64_t batch_heads, int64_t num_tokens);

/* grad_bias_rows (batch x heads x (2M + 1)^2) from g's bias partials,
 * summed in range order. */
void sa_gather_sum_bias_partials(const sa_gather_blocking *g, float *grad_bias_rows);

/* sa_range_fn over batch x heads x g->num_ranges items, ctx an sa_gather_blocking. */
void sa_gather_forward_ranges(void *ctx, int64_t begin, int64_t end);
void sa_gather_grad_query_ranges(void *ctx, int64_t begin, int64_t end);
void sa_gather_grad_key_value_ranges(void *ctx, int64_t begin, int64_t end);

/* block_tokens: 0 picks blocks by the L2 size, > 0 blocks every call the
 * gather kernels take with blocks that size (tests), < 0 never blocks;
 * range_rows: 0 the default, > 0 that many rows a range (up to
 * SA_GATHER_RANGE_ROWS). */
void sa_cpu_set_gather_blocking(int64_t block_tokens, int64_t range_rows);
void sa_cpu_get_gather_blocking(int64_t *block_tokens, int64_t *range_rows);

#endif /* SA_ATTENTION_CPU_GATHER_H */
