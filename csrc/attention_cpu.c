/* CPU forward and backward of sparse scaled dot-product attention.
 *
 * Forward: one pass over each row's keys with a streaming softmax (running
 * maximum, sum, sum of squares and shifted sum for the statistics), so memory
 * is O(B * heads * N * D + nnz). Backward recomputes the probabilities from the
 * saved log-sum-exp: dQ row by row over the CSR layout, dK and dV column by
 * column over its transpose, so no two threads write the same output. */
#include "attention.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "attention_cpu_gather.h"
#include "attention_cpu_stencil.h"
#include "attention_cpu_window.h"
#include "attention_cpu_tiled.h"
#include "dropout_hash.h"
#include "fast_expf.h"
#include "host_scratch.h"
#include "simd8.h"
#include "threads.h"

/* Per-thread accumulators live on the stack; larger heads are refused. */
#define SA_CPU_MAX_DIM 1024

static inline int key_allowed(const sa_attention_params *p, int64_t b, int64_t j)
{
    return p->key_mask == NULL ||
           p->key_mask[b * p->key_mask_stride[0] + j * p->key_mask_stride[1]] != 0;
}

static inline int head_runs(const sa_attention_params *p, int64_t h)
{
    return p->head_active == NULL || p->head_active[h] != 0;
}

#define SA_T float
#define SA_FN(name) name##_f32
#define SA_EXP sa_fast_expf
#define SA_LOG logf
#include "attention_cpu_body.h"
#undef SA_T
#undef SA_FN
#undef SA_EXP
#undef SA_LOG

#define SA_T double
#define SA_FN(name) name##_f64
#define SA_EXP exp
#define SA_LOG log
#include "attention_cpu_body.h"
#undef SA_T
#undef SA_FN
#undef SA_EXP
#undef SA_LOG

static int num_threads_setting = 0; /* 0: the cores this process may use */
static int use_gather_kernels = 1;  /* tests turn them off to compare with the generic kernels */

void sa_cpu_set_gather_kernels(int on) { use_gather_kernels = on != 0; }

int sa_cpu_get_gather_kernels(void) { return use_gather_kernels; }

static atomic_llong gather_forwards, gather_backwards;

long long sa_cpu_gather_forwards(void) { return atomic_load(&gather_forwards); }

long long sa_cpu_gather_backwards(void) { return atomic_load(&gather_backwards); }

static atomic_llong gather_blocked_calls;

long long sa_cpu_gather_blocked_calls(void) { return atomic_load(&gather_blocked_calls); }

void sa_cpu_set_num_threads(int n) { num_threads_setting = n < 0 ? 0 : n; }

int sa_cpu_get_num_threads(void)
{
    return num_threads_setting > 0 ? num_threads_setting : sa_default_num_threads();
}

long long sa_cpu_wide_kernels(void)
{
    return sa_has_32_vector_registers() != 0; /* __builtin_cpu_supports gives any nonzero */
}

/* Enough rows per chunk to amortise the atomic, few enough to balance. */
static int64_t grain_for(int64_t items)
{
    int64_t per_thread = items / (8 * (int64_t)sa_cpu_get_num_threads());
    return per_thread < 1 ? 1 : (per_thread > 64 ? 64 : per_thread);
}

static int check_cpu_params(const sa_attention_params *p, char *err, size_t len)
{
    if (p->dtype != SA_F32 && p->dtype != SA_F64) {
        snprintf(err, len, "query: the CPU kernels take float32 or float64");
        return SA_ERR_UNSUPPORTED;
    }
    if (p->head_dim > SA_CPU_MAX_DIM) {
        snprintf(err, len, "query: head dimension %lld exceeds the CPU kernels' limit of %d",
                 (long long)p->head_dim, SA_CPU_MAX_DIM);
        return SA_ERR_UNSUPPORTED;
    }
    return SA_OK;
}

static int run(sa_range_fn fn, int64_t items, void *ctx, char *err, size_t len)
{
    if (sa_parallel_for(items, grain_for(items), sa_cpu_get_num_threads(), fn, ctx) != 0) {
        snprintf(err, len, "could not run the CPU kernel");
        return SA_ERR_MEMORY;
    }
    return SA_OK;
}

/* The row and column kernels for p: the gather kernels where they take it
 * (float32, head dims that are multiples of 8 up to 128), else the generic ones. */
static sa_range_fn forward_rows_for(const sa_attention_params *p)
{
    if (sa_cpu_gather_fits(p) && use_gather_kernels) return sa_gather_forward_rows;
    return p->dtype == SA_F32 ? forward_rows_f32 : forward_rows_f64;
}

static sa_range_fn grad_query_rows_for(const sa_attention_params *p)
{
    if (sa_cpu_gather_fits(p) && use_gather_kernels) return sa_gather_grad_query_rows;
    return p->dtype == SA_F32 ? grad_query_rows_f32 : grad_query_rows_f64;
}

static sa_range_fn grad_key_value_columns_for(const sa_attention_params *p)
{
    if (sa_cpu_gather_fits(p) && use_gather_kernels) return sa_gather_grad_key_value_columns;
    return p->dtype == SA_F32 ? grad_key_value_columns_f32 : grad_key_value_columns_f64;
}

/* Head dims that are not multiples of 8 run the gather kernels on copies of
 * q, k, v (and the backward's tensors) padded with zero columns to the next
 * multiple: a zero column adds nothing to a score and gives a zero output
 * and gradient column, which the copy back drops. The copies cost
 * O(B x heads x N x D) time and memory; the generic row kernels took 1.4-5.3x
 * the time of the padded gather (RANDOM 2-10% at 64 x 64, D=12 to 100). Only
 * calls that are rows alone: a stencil's or a plan's left-over rows keep the
 * generic kernels. */
static int rows_on_padded_gather(const sa_attention_params *p)
{
    if (!use_gather_kernels || p->head_dim % 8 == 0 || p->stencil_offsets != NULL || p->plan_base != NULL ||
        p->long_rows_only)
        return 0;
    sa_attention_params padded = *p;
    padded.head_dim = (p->head_dim + 7) / 8 * 8;
    return sa_cpu_gather_fits(&padded);
}

int sa_cpu_rows_on_gather(int64_t head_dim, int64_t num_tokens)
{
    sa_attention_params p;
    memset(&p, 0, sizeof(p));
    p.dtype = SA_F32;
    p.head_dim = head_dim;
    p.num_tokens = num_tokens;
    return use_gather_kernels && (sa_cpu_gather_fits(&p) || rows_on_padded_gather(&p));
}

/* One tensor's rows between the caller's layout (strided, dim columns) and a
 * compact padded copy (dim_pad columns; a copy in zeroes the pad). */
typedef struct {
    float *strided;
    const int64_t *stride;
    float *compact;
    int64_t heads, tokens, dim, dim_pad;
    int to_compact;
} pad_job;

static void copy_padded_rows(void *ctx, int64_t begin, int64_t end)
{
    const pad_job *job = ctx;
    for (int64_t row = begin; row < end; row++) {
        const int64_t b = row / (job->heads * job->tokens), h = row / job->tokens % job->heads,
                      i = row % job->tokens;
        float *outer = job->strided + b * job->stride[0] + h * job->stride[1] + i * job->stride[2];
        float *inner = job->compact + row * job->dim_pad;
        if (job->to_compact) {
            memcpy(inner, outer, sizeof(float) * (size_t)job->dim);
            memset(inner + job->dim, 0, sizeof(float) * (size_t)(job->dim_pad - job->dim));
        } else {
            memcpy(outer, inner, sizeof(float) * (size_t)job->dim);
        }
    }
}

/* Padded copies of a call's tensors, their blocks from the host pool (a
 * training loop asks for the same sizes every step). The kernels write every
 * row and column of the outputs, pruned heads' and pad included. */
enum { PADDED_MAX = 8 };
typedef struct {
    const sa_attention_params *call;
    int64_t dim_pad, rows;
    int64_t stride[3];
    float *tensor[PADDED_MAX];
    size_t block_bytes[PADDED_MAX];
    int count;
} padded_set;

static int padded_set_init(padded_set *set, const sa_attention_params *p, int count, char *err, size_t len)
{
    memset(set, 0, sizeof(*set));
    set->call = p;
    set->dim_pad = (p->head_dim + 7) / 8 * 8;
    set->rows = p->batch * p->heads * p->num_tokens;
    set->stride[0] = p->heads * p->num_tokens * set->dim_pad;
    set->stride[1] = p->num_tokens * set->dim_pad;
    set->stride[2] = set->dim_pad;
    for (; set->count < count; set->count++) {
        set->tensor[set->count] = sa_pool_take(sizeof(float) * (size_t)(set->rows * set->dim_pad),
                                               &set->block_bytes[set->count]);
        if (set->tensor[set->count] == NULL) {
            snprintf(err, len, "out of memory for padded copies of q, k and v (head dim %lld to %lld)",
                     (long long)p->head_dim, (long long)set->dim_pad);
            return SA_ERR_MEMORY;
        }
    }
    return SA_OK;
}

static void padded_set_free(padded_set *set)
{
    for (int t = 0; t < set->count; t++) sa_pool_give(set->tensor[t], set->block_bytes[t]);
}

/* Copies the caller's tensor into padded tensor `index` (to_compact) or back out of it. */
static int copy_rows(const padded_set *set, int index, const void *strided, const int64_t *stride, int to_compact,
                     char *err, size_t len)
{
    const sa_attention_params *p = set->call;
    const pad_job job = {(float *)strided, stride, set->tensor[index], p->heads, p->num_tokens, p->head_dim,
                         set->dim_pad, to_compact};
    const int threads = sa_cpu_get_num_threads();
    if (sa_parallel_for(set->rows, set->rows / (4 * (int64_t)threads) + 1, threads, copy_padded_rows,
                        (void *)&job) != 0) {
        snprintf(err, len, "could not run the CPU kernel");
        return SA_ERR_MEMORY;
    }
    return SA_OK;
}

/* Points a padded call's operand at padded tensor `index`. */
static const void *padded_operand(const padded_set *set, int index, int64_t *stride)
{
    memcpy(stride, set->stride, sizeof(set->stride));
    return set->tensor[index];
}

/* p on set's padded tensors (0-2 q, k, v; 3 out; in a backward 4 dO and 5-7
 * dQ, dK, dV), with the caller's inputs copied in. */
static int padded_call(const padded_set *set, const sa_attention_params *p, int backward,
                       sa_attention_params *padded, char *err, size_t len)
{
    *padded = *p;
    padded->head_dim = set->dim_pad;
    padded->q = padded_operand(set, 0, padded->q_stride);
    padded->k = padded_operand(set, 1, padded->k_stride);
    padded->v = padded_operand(set, 2, padded->v_stride);
    padded->out = (void *)padded_operand(set, 3, padded->out_stride);
    if (backward) {
        padded->grad_out = padded_operand(set, 4, padded->grad_out_stride);
        padded->grad_q = set->tensor[5];
        padded->grad_k = set->tensor[6];
        padded->grad_v = set->tensor[7];
    }
    /* a backward reads the forward's output too */
    const void *inputs[5] = {p->q, p->k, p->v, p->out, p->grad_out};
    const int64_t *strides[5] = {p->q_stride, p->k_stride, p->v_stride, p->out_stride, p->grad_out_stride};
    int status = SA_OK;
    for (int t = 0; t < (backward ? 5 : 3) && status == SA_OK; t++)
        status = copy_rows(set, t, inputs[t], strides[t], 1, err, len);
    return status;
}

/* The forward (backward) of p on padded copies; the output (the three
 * gradients, compact batch x heads x tokens x head_dim) copied back. */
static int run_on_padded_copies(const sa_attention_params *p, int backward, char *err, size_t len)
{
    padded_set set;
    sa_attention_params padded;
    int status = padded_set_init(&set, p, backward ? 8 : 4, err, len);
    if (status == SA_OK) status = padded_call(&set, p, backward, &padded, err, len);
    if (status == SA_OK) status = backward ? sa_cpu_backward(&padded, err, len) : sa_cpu_forward(&padded, err, len);
    const int64_t compact[3] = {p->heads * p->num_tokens * p->head_dim, p->num_tokens * p->head_dim, p->head_dim};
    void *results[3] = {backward ? p->grad_q : p->out, p->grad_k, p->grad_v};
    const int64_t *strides = backward ? compact : p->out_stride;
    for (int t = 0; t < (backward ? 3 : 1) && status == SA_OK; t++)
        status = copy_rows(&set, (backward ? 5 : 3) + t, results[t], strides, 0, err, len);
    padded_set_free(&set);
    return status;
}

/* The rows a tile plan leaves out (listed in long_rows), by the row kernel. */
static void forward_listed_rows_f32(void *ctx, int64_t begin, int64_t end)
{
    const sa_attention_params *p = ctx;
    const sa_range_fn rows = forward_rows_for(p);
    for (int64_t item = begin; item < end; item++) {
        const int64_t bh = item / p->num_long_rows, row = p->long_rows[item % p->num_long_rows];
        rows(ctx, bh * p->num_tokens + row, bh * p->num_tokens + row + 1);
    }
}

/* The tiled kernels over p's plan. After a stencil (after_stencil), the plan
 * holds the pairs the stencil leaves out (STRIDED's lattice, see
 * sparse_attention/_stencil.py): the forward merges its passes into the
 * stencil's output through the log-sum-exp, the backward adds to the
 * gradients the stencil wrote. */
static int run_plan(const sa_attention_params *p, int backward, int after_stencil, char *err, size_t len)
{
    if (p->plan_base == NULL) return SA_OK;
    sa_attention_params plan = *p;
    if (after_stencil) plan.merge_previous = 1;
    const int64_t(*fields)[6] = (const int64_t(*)[6])p->plan_fields;
    const int threads = sa_cpu_get_num_threads();
    return backward ? sa_cpu_backward_tiled(&plan, fields, p->plan_num_passes, p->plan_base, threads, err, len)
                    : sa_cpu_forward_tiled(&plan, fields, p->plan_num_passes, p->plan_base, threads, err, len);
}

/* The rows a tile plan leaves out (long_rows), after the plan. */
static int forward_rows_left_by_plan(const sa_attention_params *p, char *err, size_t len)
{
    if (p->plan_base == NULL || p->num_long_rows == 0) return SA_OK;
    sa_attention_params rows = *p;
    rows.plan_base = NULL;
    rows.stencil_offsets = NULL;
    rows.tile_queries = NULL;
    rows.merge_previous = 0;
    rows.long_rows_only = 1;
    return sa_cpu_forward(&rows, err, len);
}

/* A window clamped to the grid runs on the window kernel alone; where that
 * does not take the call (head dim, the strips asked for, a bias gradient in
 * CSR order), the row kernels run its CSR layout. */
static int clamped_on_window(const sa_attention_params *p, int backward)
{
    return !p->stencil_strips && sa_cpu_window_fits(p) && !(backward && p->grad_scores != NULL);
}

static sa_attention_params without_stencil(const sa_attention_params *p)
{
    sa_attention_params rows = *p;
    rows.stencil_offsets = NULL;
    rows.stencil_num_offsets = 0;
    rows.stencil_clamped = 0;
    rows.stencil_stride_y = rows.stencil_stride_x = 1;
    return rows;
}

int sa_cpu_forward(const sa_attention_params *p, char *err, size_t len)
{
    int status = check_cpu_params(p, err, len);
    if (status != SA_OK) return status;
    void *ctx = (void *)p;
    if (p->stencil_offsets != NULL && p->stencil_clamped && !clamped_on_window(p, 0)) {
        const sa_attention_params rows = without_stencil(p);
        return sa_cpu_forward(&rows, err, len);
    }
    if (rows_on_padded_gather(p)) return run_on_padded_copies(p, 0, err, len);
    if (p->stencil_offsets != NULL) {
        /* the listed rows the stencil kernel leaves to the row kernel */
        int32_t *left = malloc((size_t)(p->stencil_num_rows > 0 ? p->stencil_num_rows : 1) * sizeof(int32_t));
        if (!left) {
            snprintf(err, len, "could not run the CPU kernel (out of memory)");
            return SA_ERR_MEMORY;
        }
        int64_t count = 0;
        const int threads = sa_cpu_get_num_threads();
        status = !p->stencil_strips && sa_cpu_window_fits(p)
                     ? sa_cpu_forward_window(p, threads, left, &count, err, len)
                     : sa_cpu_forward_stencil(p, threads, left, &count, err, len);
        if (status == SA_OK && count > 0) {
            sa_attention_params listed = *p;
            listed.long_rows = left;
            listed.num_long_rows = count;
            status = run(forward_listed_rows_f32, p->batch * p->heads * count, &listed, err, len);
        }
        free(left);
        if (status == SA_OK) status = run_plan(p, 0, 1, err, len);
        return status == SA_OK ? forward_rows_left_by_plan(p, err, len) : status;
    }
    if (p->plan_base != NULL) {
        status = run_plan(p, 0, 0, err, len);
        return status == SA_OK ? forward_rows_left_by_plan(p, err, len) : status;
    }
    if (p->long_rows_only) {
        if (p->dtype != SA_F32) {
            snprintf(err, len, "long_rows: the tiled CPU path takes float32");
            return SA_ERR_UNSUPPORTED;
        }
        if (forward_rows_for(p) == sa_gather_forward_rows) atomic_fetch_add(&gather_forwards, 1);
        return run(forward_listed_rows_f32, p->batch * p->heads * p->num_long_rows, ctx, err, len);
    }
    const int64_t rows = p->batch * p->heads * p->num_tokens;
    const sa_range_fn row_kernel = forward_rows_for(p);
    if (row_kernel == sa_gather_forward_rows) atomic_fetch_add(&gather_forwards, 1);
    sa_gather_blocking blocks;
    if (row_kernel == sa_gather_forward_rows && sa_gather_blocking_for(p, &blocks)) {
        atomic_fetch_add(&gather_blocked_calls, 1);
        return run(sa_gather_forward_ranges, p->batch * p->heads * blocks.num_ranges, &blocks, err, len);
    }
    return run(row_kernel, rows, ctx, err, len);
}

/* dQ and dK/dV on the gather kernels in ranges. With p->grad_bias_rows
 * each range sums its score gradients by offset, and the ranges' tables go
 * per (batch, head) into it: no score gradient per pair (a batch x heads x
 * nnz buffer, 215 MB for RANDOM 5% at 128 x 128 and 4 heads). */
static int gather_backward_in_ranges(const sa_attention_params *p, sa_gather_blocking *blocks, char *err,
                                     size_t len)
{
    const int64_t side = 2 * p->max_relative + 1, ranges = p->batch * p->heads * blocks->num_ranges;
    if (p->grad_bias_rows != NULL) {
        blocks->bias_partials = malloc(sizeof(float) * (size_t)(ranges * side * side));
        if (blocks->bias_partials == NULL) {
            snprintf(err, len, "out of memory for the bias gradient's %lld partial tables", (long long)ranges);
            return SA_ERR_MEMORY;
        }
    }
    int status = run(sa_gather_grad_query_ranges, ranges, blocks, err, len);
    if (status == SA_OK && blocks->bias_partials != NULL) sa_gather_sum_bias_partials(blocks, p->grad_bias_rows);
    free(blocks->bias_partials);
    blocks->bias_partials = NULL;
    if (status == SA_OK) status = run(sa_gather_grad_key_value_ranges, ranges, blocks, err, len);
    if (status == SA_OK) {
        atomic_fetch_add(&gather_backwards, 1);
        if (blocks->block_tokens < p->num_tokens) atomic_fetch_add(&gather_blocked_calls, 1);
    }
    return status;
}

int sa_cpu_backward(const sa_attention_params *p, char *err, size_t len)
{
    int status = check_cpu_params(p, err, len);
    if (status != SA_OK) return status;
    if (p->stencil_offsets != NULL && p->stencil_clamped && !clamped_on_window(p, 1)) {
        if (p->grad_bias_rows != NULL) {
            snprintf(err, len, "grad_bias_rows: a window clamped to the grid gives it on the window kernel only");
            return SA_ERR_UNSUPPORTED;
        }
        const sa_attention_params rows = without_stencil(p);
        return sa_cpu_backward(&rows, err, len);
    }
    if (rows_on_padded_gather(p)) return run_on_padded_copies(p, 1, err, len);
    int64_t rows = p->batch * p->heads * p->num_tokens;
    void *ctx = (void *)p;
    int f32 = p->dtype == SA_F32;
    status = run(f32 ? delta_rows_f32 : delta_rows_f64, rows, ctx, err, len);
    if (status == SA_OK && p->stencil_offsets != NULL) {
        const int threads = sa_cpu_get_num_threads();
        status = !p->stencil_strips && sa_cpu_window_fits(p) && p->grad_scores == NULL
                     ? sa_cpu_backward_window(p, threads, err, len)
                     : sa_cpu_backward_stencil(p, threads, err, len);
        return status == SA_OK ? run_plan(p, 1, 1, err, len) : status;
    }
    if (status == SA_OK && p->plan_base != NULL) return run_plan(p, 1, 0, err, len);
    const sa_range_fn row_kernel = grad_query_rows_for(p);
    sa_gather_blocking blocks;
    if (status == SA_OK && row_kernel == sa_gather_grad_query_rows) {
        /* the bias gradient per head needs the ranges even where whole rows would do */
        if (p->grad_bias_rows != NULL)
            sa_gather_ranges_for(p, &blocks);
        else if (!sa_gather_blocking_for(p, &blocks))
            blocks.num_ranges = 0;
        if (blocks.num_ranges > 0) return gather_backward_in_ranges(p, &blocks, err, len);
    }
    if (status == SA_OK && p->grad_bias_rows != NULL) {
        snprintf(err, len, "grad_bias_rows: the row kernels give it on the gather kernels only");
        return SA_ERR_UNSUPPORTED;
    }
    if (status == SA_OK) status = run(row_kernel, rows, ctx, err, len);
    if (status == SA_OK && row_kernel == sa_gather_grad_query_rows) atomic_fetch_add(&gather_backwards, 1);
    if (status == SA_OK) status = run(grad_key_value_columns_for(p), rows, ctx, err, len);
    return status;
}

int sa_cpu_bias_grad(const sa_bias_grad_params *p, char *err, size_t len)
{
    if (p->dtype != SA_F32 && p->dtype != SA_F64) {
        snprintf(err, len, "grad_scores: expected float32 or float64");
        return SA_ERR_UNSUPPORTED;
    }
    int64_t items = p->heads * p->num_buckets;
    void *ctx = (void *)p;
    return run(p->dtype == SA_F32 ? bias_grad_buckets_f32 : bias_grad_buckets_f64, items, ctx,
               err, len);
}
