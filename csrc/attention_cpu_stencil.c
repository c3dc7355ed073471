/* CPU forward and backward for stencil layouts, float32.
 *
 * A stencil layout gives every query the same offsets to its keys, clipped at
 * the borders of the grid: LONGFORMER's window, STRIDED's window and lattice,
 * AXIAL's row and column. For a fixed offset, eight queries that are
 * neighbours in an image row attend eight keys that are neighbours in an image
 * row too. So the kernels work on panels transposed to [row][d][x] and compute
 * every score as one vector of eight queries times a vector of eight keys read
 * at the shifted position: every multiply is a pair of the layout (apart from
 * the grid's borders), there are no per-pair indices, and the softmax runs down
 * the offsets lane by lane without horizontal sums. The tile kernels of
 * attention_cpu_tiled.c cannot do that for windows: a 64 x 64 chunk of a 7 x 7
 * window is four fifths empty.
 *
 * Extra keys (LONGFORMER's global tokens, attended by every query) are panel
 * rows of their own holding the key broadcast over the lanes. The rows listed
 * in stencil_rows (the global tokens as queries, which attend everything) are
 * left to the row kernel in the forward and handled one by one in the backward.
 *
 * One work item is one (batch, head): its panels are built once, and in the
 * backward the thread owns the key and value gradients it accumulates, so no
 * atomics are needed and the sums do not depend on the thread count. */
#include "attention_cpu_stencil.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dropout_hash.h"
#include "simd8.h"
#include "stencil_pairs.h"
#include "threads.h"

#define LANES 8


#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SA_NO_CLONES)
#define STENCIL_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define STENCIL_CLONES
#endif
#define INLINE SA_INLINE

/* count floats of zeros; a head dim of 0 leaves buffers without storage
 * (NULL), which memset may not take even for 0 bytes */
static inline void zero_floats(float *to, int64_t count)
{
    if (count > 0) memset(to, 0, (size_t)count * sizeof(float));
}

/* What one call shares across its threads. */
typedef struct {
    const sa_attention_params *p;
    int64_t height, width, dim;
    int64_t query_width;  /* width rounded up to LANES */
    int64_t pad;          /* zero columns either side of a key panel row */
    int64_t key_width;    /* query_width + 2 pad, rounded up to LANES */
    int64_t row_floats;   /* one image row of a key-width panel: dim x key_width and a
                           * cache line more, so that the same (d, x) of neighbouring rows
                           * falls in different L1 sets (64 wide, D = 32: rows 12 KB apart,
                           * a multiple of the 4 KB set span, all in one set) */
    int64_t panel_rows;   /* height + one broadcast row per extra key */
    int64_t max_entries;  /* offsets + extra keys */
    float scale, keep_scale;
    uint32_t threshold;
    uint8_t *is_offset;   /* (2 height - 1) x (2 width - 1): offset present */
    uint8_t *is_listed;   /* tokens: the row is in stencil_rows */
    /* Per query row y, the offsets whose row y + dy is on the grid, ordered by
     * dx, so that a strip's offsets are one run of them: row_first[y] ..
     * row_first[y + 1] index the arrays below. */
    int64_t *row_first;
    int32_t *row_offset;  /* which offset */
    int32_t *row_dx;
    int64_t *row_at;      /* panel index of the key (y + dy, dx) at d = 0, pad included */
    int64_t *row_valid;   /* index of the same key in the valid panel */
    int32_t *row_key;     /* its token id, (y + dy) * width + dx */
    int64_t *extra_at;    /* panel index of each extra key's broadcast row, pad included */
    int32_t *row_by_dy;   /* per row, its table entries ordered by (dy, dx) */
    uint8_t *listed_full; /* per listed row: it attends every token (done here, not by the row kernel) */
    int64_t max_row_entries;
    int64_t bias_cells;   /* (2M+1)^2: one (batch, head)'s row of grad_bias_rows */
    atomic_llong next_item;
    atomic_int failed;
} stencil_ctx;

/* A thread's panels and the entry lists of one strip. */
typedef struct {
    float *qt, *kt, *vt, *valid;      /* [row][d][x]; valid: [row][x], 1 where a key may be attended */
    float *lanes_valid;               /* [extra key][LANES] of the current strip */
    float *lanes_bias;                /* [extra key][LANES] of the current strip */
    float *offset_bias;               /* [offset][LANES]: the bias of an offset is one number */
    v8 *scores, *weights, *grads;     /* [entry] */
    float *strip_out;                 /* [d][LANES] */
    float *full_row;                  /* [y][x]: a listed row's scores, then weights */
    float *full_grads;                /* [y][x]: its dS (backward) */
    float *full_dq;                   /* [listed row][d]: their dQ (backward) */
    /* backward: query and output-gradient panels padded as the key panels are,
     * and one query row's dS and weights per offset, [entry][pad + x] */
    float *got, *dqt, *dkt, *dvt, *row_lse, *row_delta, *row_grads, *row_weights;
    /* backward with grad_bias_rows: dS summed per offset, [offset][LANES]; an
     * offset's pairs all take one cell of the bias table */
    float *offset_bias_grads;
    void *block;        /* everything above lives in it */
    size_t block_bytes;
} stencil_work;

/* Workspaces outlive a call: a few megabytes per thread that would otherwise
 * be mapped, faulted in and returned to the system on every call (which cost
 * more than a tenth of a small call's time, and the page faults of two
 * threads wait on each other). At most POOL_SIZE are kept. */
#define POOL_SIZE 16
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static void *pool_block[POOL_SIZE];
static size_t pool_bytes[POOL_SIZE];

static void *block_take(size_t bytes, size_t *got)
{
    pthread_mutex_lock(&pool_lock);
    int best = -1;
    for (int i = 0; i < POOL_SIZE; i++)
        if (pool_block[i] && pool_bytes[i] >= bytes && (best < 0 || pool_bytes[i] < pool_bytes[best])) best = i;
    void *block = NULL;
    if (best >= 0) {
        block = pool_block[best];
        *got = pool_bytes[best];
        pool_block[best] = NULL;
    }
    pthread_mutex_unlock(&pool_lock);
    if (!block) {
        block = aligned_alloc(64, bytes);
        *got = bytes;
    }
    return block;
}

static void block_give(void *block, size_t bytes)
{
    if (!block) return;
    pthread_mutex_lock(&pool_lock);
    int slot = -1;
    for (int i = 0; i < POOL_SIZE && slot < 0; i++)
        if (!pool_block[i]) slot = i;
    if (slot < 0) { /* full: keep the larger block */
        int smallest = 0;
        for (int i = 1; i < POOL_SIZE; i++)
            if (pool_bytes[i] < pool_bytes[smallest]) smallest = i;
        if (pool_bytes[smallest] < bytes) {
            free(pool_block[smallest]);
            slot = smallest;
        }
    }
    if (slot >= 0) {
        pool_block[slot] = block;
        pool_bytes[slot] = bytes;
        block = NULL;
    }
    pthread_mutex_unlock(&pool_lock);
    free(block);
}

static void work_free(stencil_work *w)
{
    block_give(w->block, w->block_bytes);
    w->block = NULL;
}

/* Carves a thread's buffers from one zeroed block, each on a cache line. */
static int work_alloc(stencil_work *w, const stencil_ctx *c, int backward)
{
    memset(w, 0, sizeof(*w));
    const int64_t key_panel = c->panel_rows * c->row_floats;
    const int64_t query_panel = c->height * (backward ? c->row_floats : c->dim * c->query_width);
    const int64_t entries = c->max_entries > 0 ? c->max_entries : 1;
    const int64_t extra = c->p->stencil_num_keys > 0 ? c->p->stencil_num_keys : 1;
    const int64_t offsets = c->p->stencil_num_offsets > 0 ? c->p->stencil_num_offsets : 1;
    const int64_t rows_q = c->height * c->query_width, row_buffer = c->max_row_entries * c->key_width + 1;
    float *scores = NULL, *weights = NULL, *grads = NULL;
    float **slots[] = {&w->qt, &w->kt, &w->vt, &w->valid, &w->lanes_valid, &w->lanes_bias,
                       &w->offset_bias, &scores, &weights, &grads, &w->strip_out, &w->full_row,
                       &w->full_grads, &w->full_dq,
                       &w->got, &w->dqt, &w->dkt, &w->dvt, &w->row_lse, &w->row_delta,
                       &w->row_grads, &w->row_weights, &w->offset_bias_grads};
    const int64_t floats[] = {query_panel, key_panel, key_panel, c->panel_rows * c->key_width,
                              extra * LANES, extra * LANES, offsets * LANES, entries * LANES,
                              entries * LANES, entries * LANES, c->dim * LANES + LANES, rows_q,
                              backward ? rows_q : 0, backward ? (c->p->stencil_num_rows + 1) * c->dim : 0,
                              backward ? query_panel : 0, backward ? c->height * c->dim * c->query_width : 0,
                              backward ? key_panel : 0, backward ? key_panel : 0, backward ? rows_q : 0,
                              backward ? rows_q : 0, backward ? row_buffer : 0, backward ? row_buffer : 0,
                              backward && c->p->grad_bias_rows != NULL ? offsets * LANES : 0};
    const int count = (int)(sizeof(floats) / sizeof(floats[0]));
    size_t bytes = 0;
    for (int i = 0; i < count; i++) bytes += ((size_t)floats[i] * sizeof(float) + 63) / 64 * 64;
    w->block = block_take(bytes, &w->block_bytes);
    if (!w->block) return -1;
    memset(w->block, 0, bytes);
    char *at = w->block;
    for (int i = 0; i < count; i++) {
        *slots[i] = floats[i] > 0 ? (float *)at : NULL;
        at += ((size_t)floats[i] * sizeof(float) + 63) / 64 * 64;
    }
    w->scores = (v8 *)scores;
    w->weights = (v8 *)weights;
    w->grads = (v8 *)grads;
    return 0;
}

/* Transposes rows [row][x][d] of one (batch, head) into panel [row][d][pad + x],
 * panel rows row_floats apart. */
INLINE void transpose_in(const float *base, const int64_t *stride, int64_t b, int64_t h,
                         const stencil_ctx *c, float *panel, int64_t panel_width, int64_t row_floats,
                         int64_t pad, int64_t first_row, int64_t num_rows)
{
    const int64_t dim = c->dim, W = c->width;
    for (int64_t y = 0; y < num_rows; y++) {
        float *dst = panel + y * row_floats + pad;
        const float *src = sa_row_of(base, stride, b, h, (first_row + y) * W);
        int64_t x0 = 0;
        for (; x0 + 8 <= W; x0 += 8) {
            int64_t d0 = 0;
            for (; d0 + 8 <= dim; d0 += 8) {
                v8 block[8];
                for (int i = 0; i < 8; i++) block[i] = LOADU(src + (x0 + i) * stride[2] + d0);
                transpose8(block);
                for (int i = 0; i < 8; i++) STOREU(dst + (d0 + i) * panel_width + x0, block[i]);
            }
            for (; d0 < dim; d0++)
                for (int i = 0; i < 8; i++) dst[d0 * panel_width + x0 + i] = src[(x0 + i) * stride[2] + d0];
        }
        for (; x0 < W; x0++)
            for (int64_t d = 0; d < dim; d++) dst[d * panel_width + x0] = src[x0 * stride[2] + d];
    }
}

/* The inverse of transpose_in for one image row: panel [d][x] (row width
 * panel_width) to rows [x][d], contiguous. */
INLINE void transpose_out(const float *panel, int64_t panel_width, float *rows, const stencil_ctx *c)
{
    const int64_t dim = c->dim, W = c->width;
    int64_t x0 = 0;
    for (; x0 + 8 <= W; x0 += 8) {
        int64_t d0 = 0;
        for (; d0 + 8 <= dim; d0 += 8) {
            v8 block[8];
            for (int i = 0; i < 8; i++) block[i] = LOADU(panel + (d0 + i) * panel_width + x0);
            transpose8(block);
            for (int i = 0; i < 8; i++) STOREU(rows + (x0 + i) * dim + d0, block[i]);
        }
        for (; d0 < dim; d0++)
            for (int i = 0; i < 8; i++) rows[(x0 + i) * dim + d0] = panel[d0 * panel_width + x0 + i];
    }
    for (; x0 < W; x0++)
        for (int64_t d = 0; d < dim; d++) rows[x0 * dim + d] = panel[d * panel_width + x0];
}

/* The key and value panels of one (batch, head), with the extra keys broadcast. */
INLINE void build_key_panels(const stencil_ctx *c, stencil_work *w, int64_t b, int64_t h)
{
    const sa_attention_params *p = c->p;
    const int64_t kw = c->key_width;
    transpose_in(p->k, p->k_stride, b, h, c, w->kt, kw, c->row_floats, c->pad, 0, c->height);
    transpose_in(p->v, p->v_stride, b, h, c, w->vt, kw, c->row_floats, c->pad, 0, c->height);
    for (int64_t y = 0; y < c->height; y++) {
        float *valid = w->valid + y * kw + c->pad;
        for (int64_t x = 0; x < c->width; x++) valid[x] = sa_key_usable(p, b, y * c->width + x) ? 1.0f : 0.0f;
    }
    for (int64_t g = 0; g < p->stencil_num_keys; g++) {
        const int64_t j = p->stencil_keys[g], r = c->height + g;
        const float *k = sa_row_of(p->k, p->k_stride, b, h, j), *v = sa_row_of(p->v, p->v_stride, b, h, j);
        for (int64_t d = 0; d < c->dim; d++) {
            float *kd = w->kt + r * c->row_floats + d * kw, *vd = w->vt + r * c->row_floats + d * kw;
            for (int64_t x = 0; x < kw; x++) {
                kd[x] = k[d];
                vd[x] = v[d];
            }
        }
        const float usable = sa_key_usable(p, b, j) ? 1.0f : 0.0f;
        for (int64_t x = 0; x < kw; x++) w->valid[r * kw + x] = usable;
    }
    for (int64_t o = 0; o < p->stencil_num_offsets; o++) {
        const float bias = sa_bias_of(p, h, -p->stencil_offsets[2 * o], -p->stencil_offsets[2 * o + 1]);
        for (int l = 0; l < LANES; l++) w->offset_bias[o * LANES + l] = bias;
    }
}

/* The entries of the strip of queries (y, x0 .. x0 + 7): the run of the row
 * tables whose offsets land on the grid for some lane, then the extra keys. */
typedef struct {
    int64_t first, count, extra, x0;
} strip_span;

static strip_span strip_entries(const stencil_ctx *c, stencil_work *w, int64_t h, int64_t y, int64_t x0)
{
    const sa_attention_params *p = c->p;
    const int64_t kw = c->key_width, W = c->width;
    /* the run of offsets with -x0 - 7 <= dx <= W - 1 - x0 */
    int64_t lo = c->row_first[y], hi = c->row_first[y + 1];
    for (int64_t span = hi - lo; span > 0;) { /* first dx >= -x0 - 7 */
        const int64_t half = span / 2;
        if (c->row_dx[lo + half] < -x0 - (LANES - 1)) {
            lo += half + 1;
            span -= half + 1;
        } else {
            span = half;
        }
    }
    for (int64_t span = hi - lo; span > 0;) { /* first dx > W - 1 - x0 */
        const int64_t half = span / 2;
        if (c->row_dx[hi - span + half] <= W - 1 - x0) {
            span -= half + 1;
        } else {
            hi = hi - span + half;
            span = half;
        }
    }
    for (int64_t g = 0; g < p->stencil_num_keys; g++) {
        const int64_t j = p->stencil_keys[g], r = c->height + g, jy = j / W, jx = j % W;
        float *valid = w->lanes_valid + g * LANES, *bias = w->lanes_bias + g * LANES;
        for (int l = 0; l < LANES; l++) {
            const int64_t x = x0 + l;
            /* a key the offsets reach already is not attended twice */
            const int reached = x < W && c->is_offset[(jy - y + c->height - 1) * (2 * W - 1) + jx - x + W - 1];
            valid[l] = x < W && !reached ? w->valid[r * kw] : 0.0f;
            bias[l] = x < W ? sa_bias_of(p, h, y - jy, x - jx) : 0.0f;
        }
    }
    return (strip_span){lo, hi - lo, p->stencil_num_keys, x0};
}

/* The scaled, biased score of entry e, -inf where the key may not be attended. */
INLINE v8 masked_score(const stencil_ctx *c, const stencil_work *w, strip_span sp, int64_t e, v8 dot)
{
    v8 s = dot * c->scale;
    v8 valid, bias;
    if (e < sp.count) {
        const int64_t t = sp.first + e;
        valid = LOADU(w->valid + sp.x0 + c->row_valid[t]);
        bias = LOADU(w->offset_bias + c->row_offset[t] * LANES);
    } else {
        valid = LOADU(w->lanes_valid + (e - sp.count) * LANES);
        bias = LOADU(w->lanes_bias + (e - sp.count) * LANES);
    }
    if (c->p->bias_table != NULL) s += bias;
    return SELECT(valid != SPLAT(0.0f), s, SPLAT(-INFINITY));
}

/* out[e] = sum_d a[d] * panel[at[e] + d * stride], eight lanes at a time. Eight
 * rows of a stay in registers while two entries at a time stream their keys. */
INLINE void strip_dots(const float *restrict a, int64_t a_stride, const float *restrict panel,
                       int64_t stride, const int64_t *restrict at, int64_t count, int64_t dim,
                       v8 *restrict out)
{
    for (int64_t e = 0; e < count; e++) out[e] = SPLAT(0.0f);
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 8) {
        v8 rows[8];
        for (int i = 0; i < 8; i++) rows[i] = LOADU(a + (d0 + i) * a_stride);
        int64_t e = 0;
        for (; e + 2 <= count; e += 2) {
            const float *k0 = panel + at[e] + d0 * stride, *k1 = panel + at[e + 1] + d0 * stride;
            v8 even0 = out[e], odd0 = SPLAT(0.0f), even1 = out[e + 1], odd1 = SPLAT(0.0f);
            for (int i = 0; i < 8; i += 2) {
                even0 += rows[i] * LOADU(k0 + i * stride);
                even1 += rows[i] * LOADU(k1 + i * stride);
                odd0 += rows[i + 1] * LOADU(k0 + (i + 1) * stride);
                odd1 += rows[i + 1] * LOADU(k1 + (i + 1) * stride);
            }
            out[e] = even0 + odd0;
            out[e + 1] = even1 + odd1;
        }
        for (; e < count; e++) {
            const float *k0 = panel + at[e] + d0 * stride;
            v8 even0 = out[e], odd0 = SPLAT(0.0f);
            for (int i = 0; i < 8; i += 2) {
                even0 += rows[i] * LOADU(k0 + i * stride);
                odd0 += rows[i + 1] * LOADU(k0 + (i + 1) * stride);
            }
            out[e] = even0 + odd0;
        }
    }
    for (; d0 < dim; d0++) {
        const v8 a0 = LOADU(a + d0 * a_stride);
        for (int64_t e = 0; e < count; e++) out[e] += a0 * LOADU(panel + at[e] + d0 * stride);
    }
}

/* out[d] (+)= sum_e weight[e] * panel[at[e] + d * stride], out strided by
 * out_stride: eight rows of out accumulate in registers. */
INLINE void strip_weighted(const v8 *restrict weight, const float *restrict panel, int64_t stride,
                           const int64_t *restrict at, int64_t count, int64_t dim,
                           float *restrict out, int64_t out_stride, int accumulate)
{
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 8) {
        v8 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = SPLAT(0.0f);
        for (int64_t e = 0; e < count; e++) {
            const float *v = panel + at[e] + d0 * stride;
            const v8 we = weight[e];
            for (int i = 0; i < 8; i++) acc[i] += we * LOADU(v + i * stride);
        }
        float *o = out + d0 * out_stride;
        for (int i = 0; i < 8; i++)
            STOREU(o + i * out_stride, accumulate ? acc[i] + LOADU(o + i * out_stride) : acc[i]);
    }
    for (; d0 < dim; d0++) {
        v8 acc = SPLAT(0.0f);
        for (int64_t e = 0; e < count; e++) acc += weight[e] * LOADU(panel + at[e] + d0 * stride);
        float *o = out + d0 * out_stride;
        STOREU(o, accumulate ? acc + LOADU(o) : acc);
    }
}

INLINE u8v strip_query_keys(const stencil_ctx *c, int64_t b, int64_t h, int64_t y, int64_t x0)
{
    u8v keys = {0};
    if (c->threshold == 0) return keys;
    const uint32_t row_key = sa_dropout_row_key(c->p->dropout_seed, b, h);
    for (int l = 0; l < LANES; l++) keys[l] = sa_dropout_query_key(row_key, y * c->width + x0 + l);
    return keys;
}

/* The outputs, log-sum-exps and statistics of a strip's queries. */
INLINE void write_strip(const stencil_ctx *c, stencil_work *w, int64_t b, int64_t h, int64_t y,
                        int64_t x0, v8 sum, v8 shift, v8 sum_sq, v8 sum_shifted, i8v nan_lanes)
{
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, dim = c->dim, bh = b * p->heads + h;
    const v8 zero = SPLAT(0.0f);
    const i8v live = sum > zero;
    const v8 inv = SELECT(live, SPLAT(1.0f) / SELECT(live, sum, SPLAT(1.0f)), zero);
    /* a NaN score makes the row NaN, as in PyTorch */
    const v8 log_sum = log_v8(SELECT(live, sum, SPLAT(1.0f))); /* eight logs at once, not libm's one by one */
    const v8 factor = SELECT(nan_lanes, SPLAT(NAN), inv);
    float *rows[LANES];
    int lanes = 0;
    for (int l = 0; l < LANES; l++) {
        const int64_t i = y * W + x0 + l;
        rows[l] = NULL;
        if (x0 + l >= W || c->is_listed[i]) continue;
        rows[l] = (float *)p->out + b * p->out_stride[0] + h * p->out_stride[1] + i * p->out_stride[2];
        lanes++;
        const int64_t row_item = bh * p->num_tokens + i;
        float lse = live[l] ? shift[l] + log_sum[l] : -INFINITY;
        if (nan_lanes[l]) lse = NAN;
        ((float *)p->lse)[row_item] = lse;
        if (p->row_stats != NULL) {
            float *stats = (float *)p->row_stats + 2 * row_item;
            stats[0] = live[l] ? sum_sq[l] * inv[l] * inv[l] : 0.0f;
            stats[1] = live[l] ? log_sum[l] - sum_shifted[l] * inv[l] : 0.0f;
            if (nan_lanes[l]) stats[0] = stats[1] = NAN;
        }
    }
    if (lanes == 0) return;
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 8) {
        v8 block[8];
        for (int i = 0; i < 8; i++) block[i] = LOADU(w->strip_out + (d0 + i) * LANES) * factor;
        transpose8(block);
        for (int l = 0; l < LANES; l++)
            if (rows[l]) STOREU(rows[l] + d0, block[l]);
    }
    for (; d0 < dim; d0++)
        for (int l = 0; l < LANES; l++)
            if (rows[l]) rows[l][d0] = w->strip_out[d0 * LANES + l] * factor[l];
}

/* sum_d row[d] * panel[d * stride]: one row (broadcast) against eight keys. */
INLINE v8 row_dot_keys(const float *row, const float *panel, int64_t stride, int64_t dim)
{
    v8 even = SPLAT(0.0f), odd = SPLAT(0.0f);
    int64_t d = 0;
    for (; d + 2 <= dim; d += 2) {
        even += row[d] * LOADU(panel + d * stride);
        odd += row[d + 1] * LOADU(panel + (d + 1) * stride);
    }
    if (d < dim) even += row[d] * LOADU(panel + d * stride);
    return even + odd;
}

/* The dropout keep mask of entry e's pairs in a strip. */
INLINE i8v entry_keep_lanes(const stencil_ctx *c, strip_span sp, int64_t e, u8v query_keys)
{
    if (e < sp.count) return sa_keep_lanes(c->threshold, query_keys, (int32_t)(c->row_key[sp.first + e] + sp.x0), 1);
    return sa_keep_lanes(c->threshold, query_keys, c->p->stencil_keys[e - sp.count], 0);
}

/* A listed row that attends every token (LONGFORMER's global query), on the
 * key panels: eight keys per vector, one horizontal sum per d at the end.
 * Its scores into full_row; whether one is NaN, and their maximum. */
INLINE void full_row_scores(const stencil_ctx *c, stencil_work *w, int64_t h, int64_t g,
                            const float *q, int *saw_nan, float *top)
{
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, dim = c->dim, kw = c->key_width, qw = c->query_width;
    const int64_t gy = g / W, gx = g % W;
    v8 best = SPLAT(-INFINITY);
    i8v nan_lanes = {0};
    for (int64_t y = 0; y < c->height; y++) {
        for (int64_t x0 = 0; x0 < W; x0 += LANES) {
            v8 s = row_dot_keys(q, w->kt + y * c->row_floats + c->pad + x0, kw, dim) * c->scale;
            if (p->bias_table != NULL)
                for (int l = 0; l < LANES && x0 + l < W; l++) s[l] += sa_bias_of(p, h, gy - y, gx - x0 - l);
            s = SELECT(LOADU(w->valid + y * kw + c->pad + x0) != SPLAT(0.0f), s, SPLAT(-INFINITY));
            nan_lanes |= s != s;
            best = SELECT(s > best, s, best);
            STOREU(w->full_row + y * qw + x0, s);
        }
    }
    float m = -INFINITY;
    int nan = 0;
    for (int l = 0; l < LANES; l++) {
        m = best[l] > m ? best[l] : m;
        nan |= nan_lanes[l] != 0;
    }
    *saw_nan = nan || m == INFINITY; /* exp(inf - inf) in the softmax */
    *top = m;
}

/* out[d] = sum over every token j of weight[j] * panel[j][d], weights laid out
 * [y][x] like full_row: a whole row's P x V (or dS x K). */
INLINE void full_row_weighted(const stencil_ctx *c, const float *weight, const float *panel, float *out)
{
    const int64_t W = c->width, dim = c->dim, kw = c->key_width, qw = c->query_width;
    for (int64_t d0 = 0; d0 < dim; d0 += 8) {
        const int64_t span = dim - d0 < 8 ? dim - d0 : 8;
        v8 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = SPLAT(0.0f);
        for (int64_t y = 0; y < c->height; y++) {
            for (int64_t x0 = 0; x0 < W; x0 += LANES) {
                const v8 wv = LOADU(weight + y * qw + x0);
                const float *at = panel + y * c->row_floats + d0 * kw + c->pad + x0;
                for (int i = 0; i < span; i++) acc[i] += wv * LOADU(at + i * kw);
            }
        }
        for (int i = 0; i < span; i++) out[d0 + i] = hsum8(acc[i]);
    }
}

INLINE void forward_full_row(const stencil_ctx *c, stencil_work *w, int64_t b, int64_t h, int64_t g)
{
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, dim = c->dim, qw = c->query_width;
    const int64_t bh = b * p->heads + h, row_item = bh * p->num_tokens + g;
    const float *q = sa_row_of(p->q, p->q_stride, b, h, g);
    int saw_nan;
    float top;
    full_row_scores(c, w, h, g, q, &saw_nan, &top);
    const float shift = top == -INFINITY ? 0.0f : top;
    const u8v query_key = (u8v){0} + (c->threshold ? sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), g) : 0u);
    v8 sum = SPLAT(0.0f), sum_sq = SPLAT(0.0f), sum_shifted = SPLAT(0.0f);
    for (int64_t y = 0; y < c->height; y++) {
        for (int64_t x0 = 0; x0 < W; x0 += LANES) {
            float *at = w->full_row + y * qw + x0;
            const v8 shifted = LOADU(at) - shift;
            const v8 prob = exp_v8(shifted);
            sum += prob;
            if (p->row_stats != NULL) {
                sum_sq += prob * prob;
                sum_shifted += SELECT(prob != SPLAT(0.0f), prob * shifted, SPLAT(0.0f));
            }
            v8 weight = prob * c->keep_scale;
            if (c->threshold > 0)
                weight = SELECT(sa_keep_lanes(c->threshold, query_key, (int32_t)(y * W + x0), 1), weight, SPLAT(0.0f));
            STOREU(at, weight);
        }
    }
    const float total = hsum8(sum);
    const int live = total > 0.0f;
    const float inv = live ? 1.0f / total : 0.0f;
    float *out = (float *)p->out + b * p->out_stride[0] + h * p->out_stride[1] + g * p->out_stride[2];
    full_row_weighted(c, w->full_row, w->vt, out);
    for (int64_t d = 0; d < dim; d++) out[d] = saw_nan ? NAN : out[d] * inv;
    float lse = live ? shift + logf(total) : -INFINITY;
    if (saw_nan) lse = NAN;
    ((float *)p->lse)[row_item] = lse;
    if (p->row_stats != NULL) {
        float *stats = (float *)p->row_stats + 2 * row_item;
        stats[0] = live ? hsum8(sum_sq) * inv * inv : 0.0f;
        stats[1] = live ? logf(total) - hsum8(sum_shifted) * inv : 0.0f;
        if (saw_nan) stats[0] = stats[1] = NAN;
    }
}

STENCIL_CLONES
static void forward_heads(void *opaque, int64_t first, int64_t last)
{
    (void)first;
    (void)last;
    stencil_ctx *c = opaque;
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, dim = c->dim, kw = c->key_width;
    const int want_stats = p->row_stats != NULL;
    stencil_work w;
    if (work_alloc(&w, c, 0) < 0) {
        work_free(&w);
        atomic_store(&c->failed, 1);
        return;
    }
    const v8 neg_inf = SPLAT(-INFINITY);
    for (;;) {
        const int64_t bh = atomic_fetch_add(&c->next_item, 1);
        if (bh >= p->batch * p->heads) break;
        const int64_t h = bh % p->heads, b = bh / p->heads;
        if (p->head_active != NULL && !p->head_active[h]) {
            sa_write_pruned_rows(p, b, h, 0, p->num_tokens);
            continue;
        }
        build_key_panels(c, &w, b, h);
        transpose_in(p->q, p->q_stride, b, h, c, w.qt, c->query_width, c->dim * c->query_width, 0, 0,
                     c->height);
        for (int64_t y = 0; y < c->height; y++) {
            for (int64_t x0 = 0; x0 < W; x0 += LANES) {
                const strip_span sp = strip_entries(c, &w, h, y, x0);
                const int64_t count = sp.count + sp.extra;
                const float *qs = w.qt + y * dim * c->query_width + x0;
                strip_dots(qs, c->query_width, w.kt + x0, kw, c->row_at + sp.first, sp.count, dim, w.scores);
                strip_dots(qs, c->query_width, w.kt + x0, kw, c->extra_at, sp.extra, dim, w.scores + sp.count);
                /* two running maxima, so that the compares do not wait on each other */
                v8 top = neg_inf, top_odd = neg_inf;
                i8v nan_lanes = {0};
                int64_t e = 0;
                for (; e + 2 <= count; e += 2) {
                    const v8 s0 = masked_score(c, &w, sp, e, w.scores[e]);
                    const v8 s1 = masked_score(c, &w, sp, e + 1, w.scores[e + 1]);
                    nan_lanes |= (s0 != s0) | (s1 != s1);
                    top = SELECT(s0 > top, s0, top);
                    top_odd = SELECT(s1 > top_odd, s1, top_odd);
                    w.scores[e] = s0;
                    w.scores[e + 1] = s1;
                }
                for (; e < count; e++) {
                    const v8 s0 = masked_score(c, &w, sp, e, w.scores[e]);
                    nan_lanes |= s0 != s0;
                    top = SELECT(s0 > top, s0, top);
                    w.scores[e] = s0;
                }
                top = SELECT(top_odd > top, top_odd, top);
                nan_lanes |= top == SPLAT(INFINITY); /* exp(inf - inf) in the softmax */
                const v8 shift = SELECT(top == neg_inf, SPLAT(0.0f), top);
                const u8v query_keys = strip_query_keys(c, b, h, y, x0);
                v8 sum = SPLAT(0.0f), sum_sq = SPLAT(0.0f), sum_shifted = SPLAT(0.0f);
                for (e = 0; e < count; e++) {
                    const v8 shifted = w.scores[e] - shift;
                    const v8 prob = exp_v8(shifted);
                    sum += prob;
                    if (want_stats) {
                        sum_sq += prob * prob;
                        sum_shifted += SELECT(prob != SPLAT(0.0f), prob * shifted, SPLAT(0.0f));
                    }
                    v8 weight = prob * c->keep_scale;
                    if (c->threshold > 0) weight = SELECT(entry_keep_lanes(c, sp, e, query_keys), weight, SPLAT(0.0f));
                    w.weights[e] = weight;
                }
                strip_weighted(w.weights, w.vt + x0, kw, c->row_at + sp.first, sp.count, dim, w.strip_out,
                               LANES, 0);
                strip_weighted(w.weights + sp.count, w.vt + x0, kw, c->extra_at, sp.extra, dim, w.strip_out,
                               LANES, 1);
                write_strip(c, &w, b, h, y, x0, sum, shift, sum_sq, sum_shifted, nan_lanes);
            }
        }
        for (int64_t t = 0; t < p->stencil_num_rows; t++)
            if (c->listed_full[t]) forward_full_row(c, &w, b, h, p->stencil_rows[t]);
    }
    work_free(&w);
}

/* ---- backward ----------------------------------------------------------- */

/* panel[at[e] + d * stride] += weight[e] * a[d]: the shifted key rows of every entry. */
INLINE void strip_scatter(const v8 *restrict weight, const float *restrict a, int64_t a_stride,
                          float *restrict panel, int64_t stride, const int64_t *restrict at,
                          int64_t count, int64_t dim)
{
    for (int64_t e = 0; e < count; e++) {
        const v8 we = weight[e];
        float *dst = panel + at[e];
        for (int64_t d = 0; d < dim; d++)
            STOREU(dst + d * stride, LOADU(dst + d * stride) + we * LOADU(a + d * a_stride));
    }
}

/* The gradients of one listed row: its CSR keys one by one. */
static void backward_listed_row(const stencil_ctx *c, int64_t b, int64_t h, int64_t i,
                                float *grad_q, float *grad_k, float *grad_v)
{
    const sa_attention_params *p = c->p;
    const int64_t dim = c->dim, W = c->width, bh = b * p->heads + h;
    const float lse = ((const float *)p->lse)[bh * p->num_tokens + i];
    const float delta = ((const float *)p->delta)[bh * p->num_tokens + i];
    if (lse == -INFINITY) return;
    const float *q = sa_row_of(p->q, p->q_stride, b, h, i);
    const float *go = sa_row_of(p->grad_out, p->grad_out_stride, b, h, i);
    const uint32_t query_key = sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), i);
    float *dq = grad_q + i * dim;
    for (int64_t at = p->row_ptr[i]; at < p->row_ptr[i + 1]; at++) {
        const int64_t j = p->col_idx[at];
        if (!sa_key_usable(p, b, j)) continue;
        const float *k = sa_row_of(p->k, p->k_stride, b, h, j), *v = sa_row_of(p->v, p->v_stride, b, h, j);
        float dot = 0.0f, grad_dot = 0.0f;
        for (int64_t d = 0; d < dim; d++) {
            dot += q[d] * k[d];
            grad_dot += go[d] * v[d];
        }
        const float score = c->scale * dot + sa_bias_of(p, h, i / W - j / W, i % W - j % W);
        const float prob = expf(score - lse);
        const float keep = c->threshold == 0 || sa_dropout_keep(query_key, j, c->threshold) ? c->keep_scale : 0.0f;
        const float grad_score = prob * (grad_dot * keep - delta) * c->scale;
        const float weight = prob * keep;
        float *dk = grad_k + j * dim, *dv = grad_v + j * dim;
        for (int64_t d = 0; d < dim; d++) {
            dq[d] += grad_score * k[d];
            dk[d] += grad_score * q[d];
            dv[d] += weight * go[d];
        }
    }
}

/* out[d][x] += sum over the entries t of one key row (one dy, ascending dx) of
 * grads[t][x - dx] * a[d][x - dx]: the keys' share of one query row, read
 * where the queries lie, so that each key vector is written once. grads and a
 * are indexed from the pad (grads: [t - row_first][pad + x]), out from x = 0. */
INLINE void gather_key_grads(const stencil_ctx *c, const float *restrict grads,
                             const float *restrict a, float *restrict out,
                             const int32_t *restrict entries, int64_t count, int64_t row_first)
{
    const int64_t kw = c->key_width, dim = c->dim, W = c->width, pad = c->pad;
    for (int64_t x0 = 0; x0 < W; x0 += LANES) {
        /* the entries whose queries x0 - dx + lane overlap the grid */
        int64_t lo = 0, hi = count;
        while (lo < hi && c->row_dx[entries[lo]] < x0 - (W - 1)) lo++;
        while (hi > lo && c->row_dx[entries[hi - 1]] > x0 + LANES - 1) hi--;
        if (lo == hi) continue;
        int64_t d0 = 0;
        for (; d0 + 8 <= dim; d0 += 8) {
            v8 acc[8];
            for (int i = 0; i < 8; i++) acc[i] = SPLAT(0.0f);
            for (int64_t e = lo; e < hi; e++) {
                const int64_t t = entries[e], shift = pad + x0 - c->row_dx[t];
                const v8 g = LOADU(grads + (t - row_first) * kw + shift);
                const float *as = a + d0 * kw + shift;
                for (int i = 0; i < 8; i++) acc[i] += g * LOADU(as + i * kw);
            }
            float *o = out + d0 * kw + x0;
            for (int i = 0; i < 8; i++) STOREU(o + i * kw, LOADU(o + i * kw) + acc[i]);
        }
        for (; d0 < dim; d0++) {
            v8 acc = SPLAT(0.0f);
            for (int64_t e = lo; e < hi; e++) {
                const int64_t t = entries[e], shift = pad + x0 - c->row_dx[t];
                acc += LOADU(grads + (t - row_first) * kw + shift) * LOADU(a + d0 * kw + shift);
            }
            float *o = out + d0 * kw + x0;
            STOREU(o, LOADU(o) + acc);
        }
    }
}

/* The backward of a listed row that attends every token, on the panels: its
 * dK and dV go into the transposed gradient panels, its dQ into dq. */
INLINE void backward_full_row(const stencil_ctx *c, stencil_work *w, int64_t b, int64_t h, int64_t g,
                              float *dq)
{
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, dim = c->dim, kw = c->key_width, qw = c->query_width;
    const int64_t bh = b * p->heads + h;
    const float lse = ((const float *)p->lse)[bh * p->num_tokens + g];
    const float delta = ((const float *)p->delta)[bh * p->num_tokens + g];
    for (int64_t d = 0; d < dim; d++) dq[d] = 0.0f;
    if (lse == -INFINITY) return;
    const float *q = sa_row_of(p->q, p->q_stride, b, h, g);
    const float *go = sa_row_of(p->grad_out, p->grad_out_stride, b, h, g);
    int saw_nan;
    float top;
    full_row_scores(c, w, h, g, q, &saw_nan, &top);
    const u8v query_key = (u8v){0} + (c->threshold ? sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), g) : 0u);
    for (int64_t y = 0; y < c->height; y++) {
        for (int64_t x0 = 0; x0 < W; x0 += LANES) {
            const v8 prob = exp_v8(LOADU(w->full_row + y * qw + x0) - lse);
            const v8 grad_dot = row_dot_keys(go, w->vt + y * c->row_floats + c->pad + x0, kw, dim);
            v8 keep = SPLAT(c->keep_scale);
            if (c->threshold > 0)
                keep = SELECT(sa_keep_lanes(c->threshold, query_key, (int32_t)(y * W + x0), 1), keep, SPLAT(0.0f));
            const v8 grad = prob * (grad_dot * keep - delta) * c->scale;
            const v8 weight = prob * keep;
            STOREU(w->full_grads + y * qw + x0, grad);
            float *dk = w->dkt + y * c->row_floats + c->pad + x0, *dv = w->dvt + y * c->row_floats + c->pad + x0;
            for (int64_t d = 0; d < dim; d++) {
                STOREU(dk + d * kw, LOADU(dk + d * kw) + grad * q[d]);
                STOREU(dv + d * kw, LOADU(dv + d * kw) + weight * go[d]);
            }
        }
    }
    full_row_weighted(c, w->full_grads, w->kt, dq);
}

STENCIL_CLONES
static void backward_heads(void *opaque, int64_t first, int64_t last)
{
    (void)first;
    (void)last;
    stencil_ctx *c = opaque;
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, H = c->height, n = p->num_tokens, dim = c->dim;
    const int64_t kw = c->key_width, qw = c->query_width;
    stencil_work w;
    if (work_alloc(&w, c, 1) < 0) {
        work_free(&w);
        atomic_store(&c->failed, 1);
        return;
    }
    const v8 zero = SPLAT(0.0f);
    for (;;) {
        const int64_t bh = atomic_fetch_add(&c->next_item, 1);
        if (bh >= p->batch * p->heads) break;
        const int64_t h = bh % p->heads, b = bh / p->heads;
        float *grad_q = (float *)p->grad_q + bh * n * dim;
        float *grad_k = (float *)p->grad_k + bh * n * dim;
        float *grad_v = (float *)p->grad_v + bh * n * dim;
        float *bias_cells = p->grad_bias_rows != NULL ? p->grad_bias_rows + bh * c->bias_cells : NULL;
        if (bias_cells != NULL) {
            zero_floats(bias_cells, c->bias_cells);
            zero_floats(w.offset_bias_grads, p->stencil_num_offsets * LANES);
        }
        if (p->head_active != NULL && !p->head_active[h]) {
            zero_floats(grad_q, n * dim);
            zero_floats(grad_k, n * dim);
            zero_floats(grad_v, n * dim);
            continue;
        }
        build_key_panels(c, &w, b, h);
        transpose_in(p->q, p->q_stride, b, h, c, w.qt, kw, c->row_floats, c->pad, 0, H);
        transpose_in(p->grad_out, p->grad_out_stride, b, h, c, w.got, kw, c->row_floats, c->pad, 0, H);
        zero_floats(w.dqt, H * dim * qw);
        zero_floats(w.dkt, c->panel_rows * c->row_floats);
        zero_floats(w.dvt, c->panel_rows * c->row_floats);
        const float *lse = (const float *)p->lse + bh * n, *delta = (const float *)p->delta + bh * n;
        for (int64_t y = 0; y < H; y++) {
            for (int64_t x = 0; x < qw; x++) {
                const int64_t i = y * W + x;
                /* +inf makes every probability of the lane 0: padding, listed rows, rows without keys */
                const int skip = x >= W || c->is_listed[i] || lse[i] == -INFINITY;
                w.row_lse[y * qw + x] = skip ? INFINITY : lse[i];
                w.row_delta[y * qw + x] = skip ? 0.0f : delta[i];
            }
        }
        for (int64_t y = 0; y < H; y++) {
            const int64_t row_first = c->row_first[y], row_next = c->row_first[y + 1];
            for (int64_t t = row_first; t < row_next; t++) {
                /* what the key side will read of this row: zeros where no strip writes */
                const int64_t from = (t - row_first) * kw + c->pad - c->row_dx[t];
                memset(w.row_grads + from, 0, (size_t)qw * sizeof(float));
                memset(w.row_weights + from, 0, (size_t)qw * sizeof(float));
            }
            const float *q_row = w.qt + y * c->row_floats, *go_row = w.got + y * c->row_floats;
            for (int64_t x0 = 0; x0 < W; x0 += LANES) {
                const strip_span sp = strip_entries(c, &w, h, y, x0);
                const int64_t count = sp.count + sp.extra;
                const int64_t *at = c->row_at + sp.first;
                const float *qs = q_row + c->pad + x0, *gos = go_row + c->pad + x0;
                const float *kt = w.kt + x0, *vt = w.vt + x0;
                strip_dots(qs, kw, kt, kw, at, sp.count, dim, w.scores);
                strip_dots(qs, kw, kt, kw, c->extra_at, sp.extra, dim, w.scores + sp.count);
                strip_dots(gos, kw, vt, kw, at, sp.count, dim, w.grads);
                strip_dots(gos, kw, vt, kw, c->extra_at, sp.extra, dim, w.grads + sp.count);
                const v8 row_lse = LOADU(w.row_lse + y * qw + x0);
                const v8 row_delta = LOADU(w.row_delta + y * qw + x0);
                /* lanes with +inf there take no part (padding, listed rows, rows without keys) */
                const i8v live = row_lse != SPLAT(INFINITY);
                const u8v query_keys = strip_query_keys(c, b, h, y, x0);
                for (int64_t e = 0; e < count; e++) {
                    const v8 s = masked_score(c, &w, sp, e, w.scores[e]);
                    const v8 prob = SELECT(live, exp_v8(s - row_lse), zero);
                    v8 keep = SPLAT(c->keep_scale);
                    if (c->threshold > 0) keep = SELECT(entry_keep_lanes(c, sp, e, query_keys), keep, zero);
                    const v8 score_grad = prob * (w.grads[e] * keep - row_delta);
                    w.weights[e] = prob * keep;           /* of dO in dV */
                    w.grads[e] = score_grad * c->scale;   /* dS, scaled for dQ and dK */
                    /* lanes off the grid or masked have prob 0, so they add nothing */
                    if (bias_cells != NULL) {
                        float *sum = w.offset_bias_grads + (int64_t)c->row_offset[sp.first + e] * LANES;
                        STOREU(sum, LOADU(sum) + score_grad);
                    }
                }
                float *dq = w.dqt + y * dim * qw + x0;
                strip_weighted(w.grads, kt, kw, at, sp.count, dim, dq, qw, 1);
                strip_weighted(w.grads + sp.count, kt, kw, c->extra_at, sp.extra, dim, dq, qw, 1);
                /* the offsets' dK and dV are gathered per key row below; the extra keys'
                 * broadcast rows take this strip's share at their own columns */
                for (int64_t e = 0; e < sp.count; e++) {
                    const int64_t at_row = (sp.first + e - row_first) * kw + c->pad + x0;
                    STOREU(w.row_grads + at_row, w.grads[e]);
                    STOREU(w.row_weights + at_row, w.weights[e]);
                }
                strip_scatter(w.grads + sp.count, qs, kw, w.dkt + x0, kw, c->extra_at, sp.extra, dim);
                strip_scatter(w.weights + sp.count, gos, kw, w.dvt + x0, kw, c->extra_at, sp.extra, dim);
            }
            /* dK and dV of the keys this query row reaches, one key row (one dy) at a time */
            for (int64_t u = row_first; u < row_next;) {
                const int64_t dy = p->stencil_offsets[2 * c->row_offset[c->row_by_dy[u]]];
                int64_t group_end = u;
                while (group_end < row_next &&
                       p->stencil_offsets[2 * c->row_offset[c->row_by_dy[group_end]]] == dy)
                    group_end++;
                const int64_t key_row = (y + dy) * c->row_floats + c->pad;
                gather_key_grads(c, w.row_grads, q_row, w.dkt + key_row, c->row_by_dy + u, group_end - u,
                                 row_first);
                gather_key_grads(c, w.row_weights, go_row, w.dvt + key_row, c->row_by_dy + u,
                                 group_end - u, row_first);
                u = group_end;
            }
        }
        for (int64_t t = 0; t < p->stencil_num_rows; t++)
            if (c->listed_full[t]) backward_full_row(c, &w, b, h, p->stencil_rows[t], w.full_dq + t * dim);
        /* back to rows: the image rows, then the broadcast rows of the extra keys summed */
        for (int64_t y = 0; y < H; y++) {
            transpose_out(w.dqt + y * dim * qw, qw, grad_q + y * W * dim, c);
            transpose_out(w.dkt + y * c->row_floats + c->pad, kw, grad_k + y * W * dim, c);
            transpose_out(w.dvt + y * c->row_floats + c->pad, kw, grad_v + y * W * dim, c);
        }
        for (int64_t g = 0; g < p->stencil_num_keys; g++) {
            const int64_t j = p->stencil_keys[g], r = H + g;
            for (int64_t d = 0; d < dim; d++) {
                const float *dk = w.dkt + r * c->row_floats + d * kw, *dv = w.dvt + r * c->row_floats + d * kw;
                float sum_k = 0.0f, sum_v = 0.0f;
                for (int64_t x = 0; x < kw; x++) {
                    sum_k += dk[x];
                    sum_v += dv[x];
                }
                grad_k[j * dim + d] += sum_k;
                grad_v[j * dim + d] += sum_v;
            }
        }
        for (int64_t t = 0; t < p->stencil_num_rows; t++) {
            const int64_t i = p->stencil_rows[t];
            if (c->listed_full[t])
                for (int64_t d = 0; d < dim; d++) grad_q[i * dim + d] += w.full_dq[t * dim + d];
            else
                backward_listed_row(c, b, h, i, grad_q, grad_k, grad_v);
        }
        if (bias_cells != NULL) {
            /* offsets in their order, lanes in theirs: the same sum on any thread count */
            for (int64_t o = 0; o < p->stencil_num_offsets; o++) {
                float sum = 0.0f;
                for (int l = 0; l < LANES; l++) sum += w.offset_bias_grads[o * LANES + l];
                bias_cells[sa_bias_cell(p, -p->stencil_offsets[2 * o], -p->stencil_offsets[2 * o + 1])] += sum;
            }
        }
    }
    work_free(&w);
}

/* ---- entry points -------------------------------------------------------- */

static int stencil_ctx_init(stencil_ctx *c, const sa_attention_params *p, char *err, size_t len)
{
    memset(c, 0, sizeof(*c));
    c->p = p;
    if (p->dtype != SA_F32) {
        snprintf(err, len, "query: the stencil CPU kernel takes float32");
        return SA_ERR_UNSUPPORTED;
    }
    if (p->height * p->width != p->num_tokens) {
        snprintf(err, len, "height, width: %lld x %lld is not the %lld tokens", (long long)p->height,
                 (long long)p->width, (long long)p->num_tokens);
        return SA_ERR_VALUE;
    }
    c->height = p->height;
    c->width = p->width;
    c->dim = p->head_dim;
    c->query_width = (p->width + LANES - 1) / LANES * LANES;
    for (int64_t o = 0; o < p->stencil_num_offsets; o++) {
        const int64_t dx = p->stencil_offsets[2 * o + 1];
        const int64_t reach = dx < 0 ? -dx : dx;
        c->pad = reach > c->pad ? reach : c->pad;
    }
    /* whole cache lines of padding, so that an offset with dx = 0 (AXIAL's column)
     * reads aligned vectors that never straddle two lines */
    c->pad = (c->pad + 15) / 16 * 16;
    c->key_width = (c->query_width + 2 * c->pad + 15) / 16 * 16;
    c->row_floats = c->dim * c->key_width + 16;
    c->panel_rows = c->height + p->stencil_num_keys;
    c->max_entries = p->stencil_num_offsets + p->stencil_num_keys;
    c->scale = (float)p->scale;
    c->bias_cells = (2 * p->max_relative + 1) * (2 * p->max_relative + 1);
    c->keep_scale = p->dropout_p > 0 ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    c->threshold = sa_dropout_threshold(p->dropout_p);
    c->is_offset = calloc((size_t)((2 * c->height - 1) * (2 * c->width - 1)), 1);
    c->is_listed = calloc((size_t)p->num_tokens, 1);
    if (!c->is_offset || !c->is_listed) {
        snprintf(err, len, "could not run the stencil CPU kernel (out of memory)");
        return SA_ERR_MEMORY;
    }
    for (int64_t o = 0; o < p->stencil_num_offsets; o++)
        c->is_offset[(p->stencil_offsets[2 * o] + c->height - 1) * (2 * c->width - 1) +
                     p->stencil_offsets[2 * o + 1] + c->width - 1] = 1;
    for (int64_t t = 0; t < p->stencil_num_rows; t++) c->is_listed[p->stencil_rows[t]] = 1;
    c->listed_full = calloc((size_t)(p->stencil_num_rows + 1), 1);
    if (!c->listed_full) {
        snprintf(err, len, "could not run the stencil CPU kernel (out of memory)");
        return SA_ERR_MEMORY;
    }
    for (int64_t t = 0; t < p->stencil_num_rows; t++)
        c->listed_full[t] = (uint8_t)sa_row_attends_every_token(p, p->stencil_rows[t]);

    const int64_t E = p->stencil_num_offsets, H = c->height;
    int32_t *by_dx = malloc((size_t)(E > 0 ? E : 1) * sizeof(int32_t));
    c->row_first = malloc((size_t)(H + 1) * sizeof(int64_t));
    c->row_offset = malloc((size_t)(H * E > 0 ? H * E : 1) * sizeof(int32_t));
    c->row_dx = malloc((size_t)(H * E > 0 ? H * E : 1) * sizeof(int32_t));
    c->row_at = malloc((size_t)(H * E > 0 ? H * E : 1) * sizeof(int64_t));
    c->row_valid = malloc((size_t)(H * E > 0 ? H * E : 1) * sizeof(int64_t));
    c->row_key = malloc((size_t)(H * E > 0 ? H * E : 1) * sizeof(int32_t));
    c->extra_at = malloc((size_t)(p->stencil_num_keys + 1) * sizeof(int64_t));
    c->row_by_dy = malloc((size_t)(H * E > 0 ? H * E : 1) * sizeof(int32_t));
    if (!c->row_by_dy || !by_dx || !c->row_first || !c->row_offset || !c->row_dx || !c->row_at || !c->row_valid ||
        !c->row_key || !c->extra_at) {
        free(by_dx);
        snprintf(err, len, "could not run the stencil CPU kernel (out of memory)");
        return SA_ERR_MEMORY;
    }
    /* offsets ordered by dx: a counting sort over -(W-1) .. W-1 */
    int64_t placed = 0;
    for (int64_t dx = -(c->width - 1); dx < c->width; dx++)
        for (int64_t o = 0; o < E; o++)
            if (p->stencil_offsets[2 * o + 1] == dx) by_dx[placed++] = (int32_t)o;
    int64_t t = 0;
    for (int64_t y = 0; y < H; y++) {
        c->row_first[y] = t;
        for (int64_t i = 0; i < placed; i++) {
            const int32_t o = by_dx[i];
            const int64_t dy = p->stencil_offsets[2 * o], dx = p->stencil_offsets[2 * o + 1];
            if (y + dy < 0 || y + dy >= H) continue;
            c->row_offset[t] = o;
            c->row_dx[t] = (int32_t)dx;
            c->row_at[t] = (y + dy) * c->row_floats + c->pad + dx;
            c->row_valid[t] = (y + dy) * c->key_width + c->pad + dx;
            c->row_key[t] = (int32_t)((y + dy) * c->width + dx);
            t++;
        }
    }
    c->row_first[H] = t;
    /* per row, a stable counting sort on dy (dx stays ascending within a dy):
     * O(entries + H) a row, not O(entries x H) */
    int64_t *dy_start = calloc((size_t)(2 * H + 1), sizeof(int64_t));
    if (!dy_start) {
        free(by_dx);
        snprintf(err, len, "could not run the stencil CPU kernel (out of memory)");
        return SA_ERR_MEMORY;
    }
    for (int64_t y = 0; y < H; y++) {
        const int64_t first = c->row_first[y], next = c->row_first[y + 1];
        memset(dy_start, 0, (size_t)(2 * H + 1) * sizeof(int64_t));
        for (int64_t u = first; u < next; u++) dy_start[p->stencil_offsets[2 * c->row_offset[u]] + H]++;
        for (int64_t k = 0, at = first; k < 2 * H + 1; k++) {
            const int64_t count = dy_start[k];
            dy_start[k] = at;
            at += count;
        }
        for (int64_t u = first; u < next; u++)
            c->row_by_dy[dy_start[p->stencil_offsets[2 * c->row_offset[u]] + H]++] = (int32_t)u;
        c->max_row_entries = next - first > c->max_row_entries ? next - first : c->max_row_entries;
    }
    free(dy_start);
    for (int64_t g = 0; g < p->stencil_num_keys; g++)
        c->extra_at[g] = (H + g) * c->row_floats + c->pad;
    free(by_dx);
    return SA_OK;
}

/* Runs fn on every (batch, head); rows_left (stencil_num_rows long, or NULL)
 * receives the listed rows that are not full, *num_left their count. */
static int stencil_run(const sa_attention_params *p, int num_threads, sa_range_fn fn, int32_t *rows_left,
                       int64_t *num_left, char *err, size_t len)
{
    stencil_ctx c;
    int status = stencil_ctx_init(&c, p, err, len);
    /* one call per worker: each takes its panels once and pulls (batch, head) items */
    if (status == SA_OK)
        status = sa_run_workers(p->batch * p->heads, num_threads, fn, &c, &c.failed, "stencil CPU kernel", err, len);
    if (status == SA_OK && rows_left != NULL) sa_rows_not_full(p, c.listed_full, rows_left, num_left);
    free(c.is_offset);
    free(c.is_listed);
    free(c.row_first);
    free(c.row_offset);
    free(c.row_dx);
    free(c.row_at);
    free(c.row_valid);
    free(c.row_key);
    free(c.extra_at);
    free(c.row_by_dy);
    free(c.listed_full);
    return status;
}

int sa_cpu_forward_stencil(const sa_attention_params *p, int num_threads, int32_t *rows_left,
                           int64_t *num_left, char *err, size_t len)
{
    if (p->stencil_clamped) {
        snprintf(err, len, "stencil: the strip CPU kernel does not shift windows at the grid's edges");
        return SA_ERR_UNSUPPORTED;
    }
    return stencil_run(p, num_threads, forward_heads, rows_left, num_left, err, len);
}

int sa_cpu_stencil_sums_bias_grad(const sa_attention_params *p)
{
    return p->bias_table != NULL && p->stencil_num_keys == 0 && p->stencil_num_rows == 0 && !p->stencil_clamped;
}

int sa_cpu_backward_stencil(const sa_attention_params *p, int num_threads, char *err, size_t len)
{
    if (p->stencil_clamped) {
        snprintf(err, len, "stencil: the strip CPU kernel does not shift windows at the grid's edges");
        return SA_ERR_UNSUPPORTED;
    }
    if (p->grad_scores != NULL || (p->grad_bias_rows != NULL && !sa_cpu_stencil_sums_bias_grad(p))) {
        snprintf(err, len, "the stencil CPU backward gives a bias gradient only in grad_bias_rows, with a "
                           "bias table, for stencils of offsets alone (no extra keys or listed rows)");
        return SA_ERR_UNSUPPORTED;
    }
    return stencil_run(p, num_threads, backward_heads, NULL, NULL, err, len);
}
