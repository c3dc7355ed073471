/* The sparse attention operation: one parameter struct read by the CPU and the
 * CUDA kernels alike, and their entry points. No Python objects here: the
 * binding validates, fills the struct, and turns a status into an exception. */
#ifndef SA_ATTENTION_H
#define SA_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* most passes of one tile plan */
#define SA_MAX_PLAN_PASSES 4

typedef enum { SA_F32 = 0, SA_F64 = 1, SA_F16 = 2, SA_BF16 = 3 } sa_dtype;

typedef enum {
    SA_OK = 0,
    SA_ERR_VALUE = 1,       /* bad argument that validation could not see earlier */
    SA_ERR_MEMORY = 2,
    SA_ERR_DEVICE = 3,      /* a CUDA call failed */
    SA_ERR_UNSUPPORTED = 4  /* dtype / size the kernel does not cover */
} sa_status;

/* Strides are in elements. "Row tensors" ([B, heads, N, D]) have the last
 * dimension contiguous; the strides given are those of B, heads and N. */
typedef struct {
    int64_t batch, heads, num_tokens, head_dim;
    int64_t height, width;  /* the grid, for the relative position bias */
    sa_dtype dtype;         /* of q, k, v, out and their gradients, and of the bias table */

    const void *q, *k, *v;  /* batch x heads x tokens x head_dim */
    int64_t q_stride[3], k_stride[3], v_stride[3];
    void *out;              /* batch x heads x tokens x head_dim */
    int64_t out_stride[3];
    /* log-sum-exp per row, batch x heads x tokens, contiguous, accumulation type
     * (double for SA_F64, float otherwise); -inf for rows with no key. */
    void *lse;

    /* CSR layout and its transpose (CSC), on the device of q */
    const int64_t *row_ptr;  /* tokens + 1 */
    const int32_t *col_idx;  /* nnz */
    const int64_t *col_ptr;  /* tokens + 1, backward only */
    const int32_t *row_idx;  /* nnz, backward only */
    int64_t nnz;

    double scale;
    /* relative position bias: heads x (2M+1) x (2M+1), contiguous, dtype as q; NULL for none */
    const void *bias_table;
    int64_t max_relative;   /* M */
    /* key mask: batch x tokens, nonzero where a key may be attended; NULL for none */
    const uint8_t *key_mask;
    int64_t key_mask_stride[2];
    /* heads x 1, nonzero where a head runs; NULL means all. A pruned head's
     * output and gradients are zero and its rows are never visited. */
    const uint8_t *head_active;

    double dropout_p;
    uint64_t dropout_seed;

    /* optional statistics per row: batch x heads x tokens x 2, accumulation type:
     * (sum_j p_ij^2, -sum_j p_ij log p_ij) */
    void *row_stats;

    /* backward */
    const void *grad_out;
    int64_t grad_out_stride[3];
    void *grad_q, *grad_k, *grad_v;  /* contiguous batch x heads x tokens x head_dim */
    void *delta;        /* workspace: batch x heads x tokens, accumulation type */
    void *grad_scores;  /* optional: batch x heads x nnz, accumulation type, for the bias gradient
                         * (plan order on the CUDA tensor-core backward: plan_scores_stride) */
    /* optional, CPU window and tiled backward only (instead of grad_scores):
     * the bias gradient of each (batch, head), batch x heads x (2M+1)^2, float32 */
    float *grad_bias_rows;

    void *stream;       /* cudaStream_t for CUDA; unused on the CPU */
    int device_id;      /* CUDA device of every tensor */

    /* CUDA only. Rows (columns) with more than long_threshold keys (queries),
     * listed in long_rows (long_cols), are handled by a whole block each so
     * that one global token does not serialise a warp; NULL lists mean none. */
    const int32_t *long_rows, *long_cols;
    int64_t num_long_rows, num_long_cols, long_threshold;
    int reference_kernel; /* CUDA: run the simple warp-per-row reference kernels */

    /* CUDA forward: launch only the block-per-row kernel over long_rows (the rows
     * a tile plan leaves out) */
    int long_rows_only;
    /* CUDA forward: split each long row's keys into long_row_splits segments, one
     * block each, whose softmax states go to split_partials (batch x heads x
     * long rows x splits x (head_dim + 5), accumulation type) and are merged by a
     * second kernel; NULL: a block per long row. */
    int64_t long_row_splits;
    void *split_partials;
    /* CUDA forward only: one pass of a tile plan (sparse_attention/_tiles.py)
     * runs the tensor-core kernel instead. tile_queries: tiles x 64 token ids
     * (-1 pads); tile_chunk_ptr: tiles + 1; chunk_keys: chunks x 64 token ids
     * (-1 pads); chunk_masks: chunks x 64 words, bit c of word r set when query r
     * of the tile attends key c of the chunk. With merge_previous the pass adds
     * its pairs to the out / lse an earlier pass (or the stencil kernel) wrote,
     * and the CPU tiled backward adds to the gradients already written. NULL
     * tile_queries: none. */
    const int32_t *tile_queries, *tile_chunk_ptr, *chunk_keys;
    const uint64_t *chunk_masks;
    int64_t num_tiles, num_chunks;
    int merge_previous;
    /* A whole tile plan (base buffer, six numbers per pass as in the passes
     * above): the CPU forward and backward and the CUDA forward take it whole;
     * the CUDA backward takes it for dQ on tensor cores (float16/bfloat16, the
     * lean kernel's conditions, and a plan that holds every pair: it leaves
     * no row out), and for dK and dV where the layout is symmetric (col_ptr
     * and row_idx are the very arrays row_ptr and col_idx), the row and
     * column kernels otherwise.
     * In a forward the rows in long_rows (those the plan leaves out) run after
     * the passes; on CUDA with long_rows_beside, on a second stream of the
     * device beside them (their outputs are disjoint from the passes'), so
     * that a long row's few blocks overlap the passes. That works under CUDA
     * graph capture once the second stream exists (the first such call on a
     * device creates it: make it outside a capture). NULL plan_base: the row /
     * column kernels. */
    const int32_t *plan_base;
    const int64_t *plan_fields;
    int64_t plan_num_passes;
    int long_rows_beside;
    /* CUDA forward over a plan, lean kernel, compute capability 9.0: a pass that
     * merges into the one before it is launched as a programmatic dependent of
     * it, so its blocks start while that pass drains (they wait for it before
     * reading its rows). */
    int overlap_passes;
    /* CUDA backward over a plan: the tensor-core dQ and dK / dV kernels also
     * take calls with a bias table or dropout (off by default until measured
     * on a device; see use_tiled_cuda_backward_extras in _torch_ops.py). With
     * plan_scores_stride > 0 the dQ kernel writes each pair's score gradient
     * to grad_scores in plan order instead of CSR order: batch x heads x
     * plan_scores_stride floats, slot (pass offset + chunk x 4096 + row x 64 +
     * column), every slot zeroed first; plan_scores_offset is the pass's offset
     * (set per pass by the host). */
    int tiled_backward_extras;
    int64_t plan_scores_stride, plan_scores_offset;
    /* CPU only, float32: a stencil layout (attention_cpu_stencil.c). Query
     * (y, x) attends key (y + dy, x + dx) for every (dy, dx) of
     * stencil_offsets (stencil_num_offsets x 2) that lands on the grid, and every
     * key of stencil_keys unless an offset reaches it already; the queries of
     * stencil_rows attend their CSR row instead. With a plan too (plan_base),
     * the plan holds the pairs the stencil leaves out and merges into its
     * result. NULL stencil_offsets: none. */
    const int32_t *stencil_offsets, *stencil_keys, *stencil_rows;
    int64_t stencil_num_offsets, stencil_num_keys, stencil_num_rows;
    /* CPU forward: run the stencil on the strip kernel even where the window
     * kernel (attention_cpu_window.c) suits its offsets */
    int stencil_strips;
    /* CPU, float32: the offsets fill a box (dy_lo..dy_hi, dx_lo..dx_hi) that
     * is shifted per query to stay on the grid (NATTEN's neighbourhood
     * attention): query (y, x) attends keys (sy + a, sx + b), a < box height,
     * b < box width, from sy = max(0, min(y + dy_lo, height - box height)),
     * sx likewise. No extra keys, listed rows or plan. Only the window kernel
     * runs it; where that kernel does not take the call, the row kernels run
     * the CSR layout. */
    int stencil_clamped;
    /* a clamped window's query strides (NATTEN's generalised neighbourhood;
     * 1, or 0 where unset, for none): the queries of each run of
     * stencil_stride_y rows (in the class grid) share the window of the
     * run's middle row, and of stencil_stride_x columns likewise */
    int stencil_stride_y, stencil_stride_x;
} sa_attention_params;

/* The bias gradient: grad_table[h, t] = sum over b and over the CSR positions p of
 * bucket t (bucket_perm[bucket_ptr[t] .. bucket_ptr[t+1]]) of grad_scores[b, h, p],
 * always summed in that order, so the result does not depend on threads. */
typedef struct {
    int64_t batch, heads, nnz, num_buckets;
    sa_dtype dtype;               /* accumulation type of grad_scores and grad_table */
    const void *grad_scores;      /* batch x heads x nnz */
    const int64_t *bucket_perm;   /* nnz */
    const int64_t *bucket_ptr;    /* num_buckets + 1 */
    void *grad_table;             /* heads x num_buckets */
    void *stream;
    int device_id;
} sa_bias_grad_params;

int sa_cpu_forward(const sa_attention_params *p, char *err, size_t err_len);
int sa_cpu_backward(const sa_attention_params *p, char *err, size_t err_len);
int sa_cpu_bias_grad(const sa_bias_grad_params *p, char *err, size_t err_len);

/* Points p at pass i of a tile plan: fields are that pass's six numbers
 * (tiles, chunks, and the offsets in base of its queries, chunk_ptr, keys and
 * masks). A pass after the first merges into what the earlier ones wrote. */
static inline void sa_select_pass(sa_attention_params *p, const int64_t *fields, const int32_t *base, int64_t i)
{
    p->num_tiles = fields[0];
    p->num_chunks = fields[1];
    p->tile_queries = base + fields[2];
    p->tile_chunk_ptr = base + fields[3];
    p->chunk_keys = base + fields[4];
    p->chunk_masks = (const uint64_t *)(base + fields[5]);
    p->merge_previous = p->merge_previous || i > 0; /* set beforehand: every pass merges */
}

/* Thread count of the CPU kernels (>= 1). */
void sa_cpu_set_num_threads(int n);
int sa_cpu_get_num_threads(void);

/* Whether float32 rows and columns with head dims that are multiples of 8 up
 * to 128 run on the gather kernels (attention_cpu_gather.h; on by default;
 * tests turn them off to compare), and calls that ran them so far. */
void sa_cpu_set_gather_kernels(int on);
int sa_cpu_get_gather_kernels(void);
long long sa_cpu_gather_forwards(void);
long long sa_cpu_gather_backwards(void);
long long sa_cpu_gather_blocked_calls(void); /* forward and backward calls that ran them in key blocks */
/* Whether float32 row calls of this head dim and token count run on the gather
 * kernels: head dims that are multiples of 8 directly, the others up to 128
 * on copies padded with zero columns (switch included). */
int sa_cpu_rows_on_gather(int64_t head_dim, int64_t num_tokens);

/* 1 where the CPU kernels take their 32-register paths (see
 * sa_has_32_vector_registers in simd8.h), else 0. */
long long sa_cpu_wide_kernels(void);

#ifdef SA_WITH_CUDA
int sa_cuda_forward(const sa_attention_params *p, char *err, size_t err_len);
int sa_cuda_backward(const sa_attention_params *p, char *err, size_t err_len);
int sa_cuda_bias_grad(const sa_bias_grad_params *p, char *err, size_t err_len);
/* Number of visible devices, or -1 with a message when the runtime cannot say. */
int sa_cuda_device_count(char *err, size_t err_len);
/* Tile-plan passes launched on the lean tensor-core kernel so far (for tests). */
long long sa_cuda_lean_passes(void);
/* Calls that ran their long rows on the second stream so far (for tests). */
long long sa_cuda_beside_forwards(void);
/* Merging passes launched to overlap the pass before them so far (for tests). */
long long sa_cuda_overlapped_passes(void);
/* Whether the CUDA backward runs dQ on the tensor-core kernel over p's plan
 * (and so writes grad_scores in plan order where plan_scores_stride > 0). */
int sa_cuda_tiled_grad_query_applies(const sa_attention_params *p);
/* Plan passes whose dQ ran on the tensor-core kernel so far (for tests). */
long long sa_cuda_tiled_grad_query_passes(void);
/* Plan passes whose dK and dV ran on the tensor-core kernel so far (for tests). */
long long sa_cuda_tiled_grad_key_value_passes(void);
#endif

#ifdef __cplusplus
}
#endif

#endif /* SA_ATTENTION_H */
