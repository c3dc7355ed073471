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

#define SA_GATHER_MAX_DIM 64
#define SA_GATHER_MAX_TOKENS (1 << 22)

/* sa_range_fn work items as the generic row kernels count them
 * (attention_cpu_body.h): (b, h, row) for the forward and dQ, (b, h, column)
 * for dK and dV. p->delta must be filled before the backward ones run. */
void sa_gather_forward_rows(void *ctx, int64_t begin, int64_t end);
void sa_gather_grad_query_rows(void *ctx, int64_t begin, int64_t end);
void sa_gather_grad_key_value_columns(void *ctx, int64_t begin, int64_t end);

#endif /* SA_ATTENTION_CPU_GATHER_H */
