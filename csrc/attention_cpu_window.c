/* CPU forward and backward for stencil layouts whose offsets fit in a small
 * box (float32): LONGFORMER's window with its global tokens, and STRIDED's
 * window beside its lattice split.
 *
 * The strip kernel of attention_cpu_stencil.c puts eight neighbours of an
 * image row in a vector and reads each offset's keys as a vector shifted by
 * dx; all but one dx of a window are off the 32-byte grid, and those loads
 * bound it (benchmarks/NOTES.md). Here the eight lanes hold a 4 x 2 block of
 * queries instead:
 *   Q x K^T  every key of the block's union of windows (10 x 8 keys for a
 *            7 x 7 window) is broadcast d by d from its row of K as the caller
 *            holds it, against the block's queries transposed ([d][lane]);
 *            the keys of a union row accumulate in registers;
 *   softmax  lane by lane down the union, with a lane mask per union slot;
 *   P x V    the block's two queries of an image row together, vectors over
 *            d: each value row is read once for both, aligned as given.
 * The union costs lanes (three fifths of the Q x K^T lanes and seven eighths
 * of the P x V products of a 7 x 7 window are pairs of the layout), but no
 * load is shifted and nothing but eight query rows is transposed per block.
 * Output rows go out with streaming stores: without them the kernel was no
 * faster than the strip kernel once its inputs left the caches.
 *
 * The backward takes the same blocks: scores and dO . V^T on the union as
 * the forward's Q x K^T, probabilities from the forward's log-sum-exp, dQ two
 * lanes at a time as the forward's P x V, and dK and dV key by key from the
 * lanes whose windows reach the key's union row (vectors over d). A work item
 * is a whole (batch, head) there, so that its dK and dV have one writer.
 *
 * A value row enters P x V with weight 0 for the lanes of the union that do
 * not attend it, so a NaN or infinity in a value row reaches the rows of its
 * block's union, not only those of its window (a NaN in Q or K stays in the
 * rows whose windows hold it); in the backward, likewise a NaN in a query or
 * output-gradient row reaches dK and dV of its block's union.
 *
 * Forward work items are bands of image rows of one (batch, head), then one
 * item per (batch, head) for the listed rows that attend every token. Every
 * output row is written by one item, every gradient row summed by one thread
 * in a fixed order, so results do not depend on the thread count. */
#include "attention_cpu_window.h"
#include "attention_cpu_stencil.h"

#include <math.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define WINDOW_STREAM_STORES 1
#endif
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dropout_hash.h"
#include "simd8.h"
#include "stencil_pairs.h"
#include "threads.h"

#define LANES 8
#define BLOCK_ROWS SA_WINDOW_BLOCK_ROWS
#define BLOCK_COLS SA_WINDOW_BLOCK_COLS
#define MAX_BOX 13 /* offsets within 13 x 13: a union row is at most 14 keys, one register each */
#define MAX_UNION_COLS (BLOCK_COLS - 1 + MAX_BOX)
#define MAX_DIM 256
#define BAND_ROWS 16
#define MAX_BIAS_TABLE_BYTES ((int64_t)64 << 20) /* per thread, mostly never touched */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SA_NO_CLONES)
#define WINDOW_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WINDOW_CLONES
#endif
#define INLINE SA_INLINE

static atomic_llong window_forwards, window_backwards;

long long sa_cpu_window_forwards(void)
{
    return atomic_load(&window_forwards);
}

long long sa_cpu_window_backwards(void)
{
    return atomic_load(&window_backwards);
}

/* A stencil's box in units of its steps: offsets (dy, dx) are
 * (step_y x (dy_lo + a), step_x x (dx_lo + b)), a < box_h, b < box_w. */
typedef struct {
    int dy_lo, dx_lo, box_h, box_w;
    int step_y, step_x;
} offset_box;

static int64_t common_divisor(int64_t a, int64_t b)
{
    a = a < 0 ? -a : a;
    b = b < 0 ? -b : b;
    while (b != 0) {
        const int64_t rest = a % b;
        a = b;
        b = rest;
    }
    return a;
}

/* The steps every offset shares on each axis (1 where all are 0). Extra
 * keys or listed rows tie a stencil to the whole grid: steps 1 there
 * (lattice_ok 0). */
static void offset_steps(const int32_t *offsets, int64_t num_offsets, int lattice_ok, int64_t steps[2])
{
    steps[0] = steps[1] = 0;
    for (int64_t o = 0; lattice_ok && o < num_offsets; o++)
        for (int axis = 0; axis < 2; axis++) steps[axis] = common_divisor(steps[axis], offsets[2 * o + axis]);
    for (int axis = 0; axis < 2; axis++)
        if (steps[axis] == 0) steps[axis] = 1;
}

/* The smallest box around num_offsets (dy, dx) pairs in units of `steps`:
 * lo[0..1] its top-left offset, size[0..1] its height and width (int64:
 * offsets Python hands to sa_cpu_window_offsets_fit are not bounded by a
 * grid). */
static void offset_bounds(const int32_t *offsets, int64_t num_offsets, const int64_t steps[2], int64_t lo[2],
                          int64_t size[2])
{
    int64_t hi[2] = {offsets[0] / steps[0], offsets[1] / steps[1]};
    lo[0] = hi[0];
    lo[1] = hi[1];
    for (int64_t o = 1; o < num_offsets; o++)
        for (int axis = 0; axis < 2; axis++) {
            const int64_t at = offsets[2 * o + axis] / steps[axis];
            lo[axis] = at < lo[axis] ? at : lo[axis];
            hi[axis] = at > hi[axis] ? at : hi[axis];
        }
    size[0] = hi[0] - lo[0] + 1;
    size[1] = hi[1] - lo[1] + 1;
}

void sa_cpu_window_box(const int32_t *offsets, int64_t num_offsets, int lattice, int64_t steps[2], int64_t lo[2],
                       int64_t size[2])
{
    offset_steps(offsets, num_offsets, lattice, steps);
    offset_bounds(offsets, num_offsets, steps, lo, size);
}

static int lattice_ok(const sa_attention_params *p)
{
    return p->stencil_num_keys == 0 && p->stencil_num_rows == 0;
}

/* p's box (its offsets lie within the grid, so the values fit int) */
static offset_box box_of(const sa_attention_params *p)
{
    offset_box box = {0, 0, 0, 0, 1, 1};
    if (p->stencil_num_offsets <= 0) return box;
    int64_t steps[2], lo[2], size[2];
    offset_steps(p->stencil_offsets, p->stencil_num_offsets, lattice_ok(p), steps);
    offset_bounds(p->stencil_offsets, p->stencil_num_offsets, steps, lo, size);
    box.dy_lo = (int)lo[0];
    box.dx_lo = (int)lo[1];
    box.box_h = (int)size[0];
    box.box_w = (int)size[1];
    box.step_y = (int)steps[0];
    box.step_x = (int)steps[1];
    return box;
}

int sa_cpu_window_offsets_fit(const int32_t *offsets, int64_t num_offsets, int64_t head_dim, int lattice)
{
    if (head_dim < 1 || head_dim > MAX_DIM || num_offsets <= 0) return 0;
    int64_t steps[2], lo[2], size[2];
    offset_steps(offsets, num_offsets, lattice, steps);
    offset_bounds(offsets, num_offsets, steps, lo, size);
    if (size[0] > MAX_BOX || size[1] > MAX_BOX) return 0;
    /* a sparse set of offsets in its box would waste most of the union */
    return 2 * num_offsets >= size[0] * size[1];
}

/* A query stride of 1, 0 where unset. */
static inline int stride_or_one(int stride)
{
    return stride > 1 ? stride : 1;
}

int sa_cpu_window_stride_fits(int64_t stride, int64_t block)
{
    /* blocks start at multiples of `block`: a stride dividing it or a
     * multiple of it moves the windows of a block's rows (columns) by at
     * most the block's own extent, which the union holds */
    return stride >= 1 && (block % stride == 0 || stride % block == 0);
}

int sa_cpu_window_fits(const sa_attention_params *p)
{
    if (p->dtype != SA_F32 || p->height * p->width != p->num_tokens) return 0;
    if (p->stencil_clamped) {
        /* a whole box within every class of the grid, nothing else (the
         * binding checks it; the kernel relies on it) */
        const offset_box box = box_of(p);
        if (!lattice_ok(p) || box.box_h > p->height / box.step_y || box.box_w > p->width / box.step_x ||
            (int64_t)box.box_h * box.box_w != p->stencil_num_offsets ||
            !sa_cpu_window_stride_fits(stride_or_one(p->stencil_stride_y), BLOCK_ROWS) ||
            !sa_cpu_window_stride_fits(stride_or_one(p->stencil_stride_x), BLOCK_COLS))
            return 0;
    } else if (stride_or_one(p->stencil_stride_y) != 1 || stride_or_one(p->stencil_stride_x) != 1) {
        return 0;
    }
    return sa_cpu_window_offsets_fit(p->stencil_offsets, p->stencil_num_offsets, p->head_dim, lattice_ok(p));
}

/* What one call shares across its threads. */
typedef struct {
    const sa_attention_params *p;
    int64_t height, width, dim;
    offset_box box;
    int union_rows, union_cols, union_slots;
    int64_t max_slots; /* union slots + extra keys */
    float scale, keep_scale;
    uint32_t threshold;
    i8v *slot_lanes;      /* [union slot]: all ones in the lanes whose query reaches the slot's key */
    uint8_t *is_offset;   /* (2 height - 1) x (2 width - 1): offset present */
    uint8_t *is_listed;   /* tokens: the row is in stencil_rows */
    uint8_t *listed_full; /* per listed row: it attends every token (done here) */
    int any_full;
    float *full_parts; /* (forward) [batch x heads][listed row][band]: full_part_floats each */
    int wide; /* 32 vector registers: union rows' dots two rows a pass, P x V four lanes */
    int64_t classes;     /* step_y x step_x classes of tokens, one grid each (lattice_view) */
    int64_t bands, band_items;
    int64_t bias_cells; /* (2M+1)^2: one (batch, head)'s row of grad_bias_rows */
    /* a window clamped to the grid (p->stencil_clamped): a block whose windows
     * the edges shift has its union moved by (ay, ax) from the usual corner,
     * ay in [shift_lo_y, shift_lo_y + shift_rows), ax likewise; each such
     * anchor has a bias table (and bias gradient sums) of its own. Without
     * clamping the only anchor is (0, 0). */
    int clamped;
    int stride_y, stride_x; /* query strides of a clamped window: 1 for none */
    int shift_lo_y, shift_lo_x, shift_rows, shift_cols;
    /* heads whose bias tables a thread keeps at once: all of them where
     * that takes at most MAX_BIAS_TABLE_BYTES (work items go head by head,
     * and a table took as long to fill as the blocks of a small map's item
     * took to run), else one */
    int64_t table_heads;
    atomic_llong next_item;
    atomic_int failed;
} window_ctx;

/* A thread's buffers. */
typedef struct {
    v8 *scores;        /* [max_slots]: scores, then weights, [slot][lane] */
    v8 *grads;         /* [max_slots] (backward): dO . V, then dS */
    v8 *slot_bias;     /* [union slot]: the bias of the item's head, anchor (0, 0) (in bias_tables) */
    v8 *qt, *got;      /* [dim]: the block's queries (output gradients) transposed */
    float *full;       /* [tokens]: a full row's scores, then weights */
    float *full_grads; /* [tokens] (backward): its dO . V, then dS */
    v8 *slot_bias_grads; /* [union slot] (backward with grad_bias_rows): dS summed over blocks */
    /* the bias of every union slot and lane: [table_heads][anchor][union
     * slot], filled on first use; table_head: the head each holds, -1 none */
    v8 *bias_tables;
    int64_t *table_head;
    /* clamped windows: the lane masks of the block at hand, and per anchor
     * shift its summed dS */
    i8v *block_lanes;      /* [union slot] */
    v8 *anchor_bias_grads; /* [anchor][union slot] */
    uint8_t *anchor_used;  /* [anchor]: its dS sums hold this item's blocks */
} window_work;

/* aligned_alloc wants a size that is a multiple of the alignment */
static void *alloc64(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

static void work_free(window_work *w)
{
    free(w->scores);
    free(w->grads);
    free(w->bias_tables);
    free(w->table_head);
    free(w->qt);
    free(w->got);
    free(w->full);
    free(w->full_grads);
    free(w->slot_bias_grads);
    free(w->block_lanes);
    free(w->anchor_bias_grads);
    free(w->anchor_used);
}

static int work_alloc(window_work *w, const window_ctx *c, int backward)
{
    memset(w, 0, sizeof(*w));
    const size_t slot_bytes = (size_t)c->max_slots * sizeof(v8), dim_bytes = (size_t)c->dim * sizeof(v8);
    const size_t row_bytes = ((size_t)c->p->num_tokens * sizeof(float) + 63) / 64 * 64;
    w->scores = alloc64(slot_bytes);
    if (c->p->bias_table != NULL) {
        /* pages of tables no block takes are never touched */
        const size_t tables = (size_t)c->table_heads * (size_t)c->shift_rows * (size_t)c->shift_cols;
        w->bias_tables = alloc64(tables * (size_t)c->union_slots * sizeof(v8));
        w->table_head = malloc(tables * sizeof(int64_t));
        if (w->bias_tables == NULL || w->table_head == NULL) return -1;
        for (size_t t = 0; t < tables; t++) w->table_head[t] = -1;
    }
    w->qt = alloc64(dim_bytes);
    if (c->any_full) w->full = alloc64(row_bytes);
    int ok = w->scores && w->qt && (w->full || !c->any_full);
    if (backward) {
        w->grads = alloc64(slot_bytes);
        w->got = alloc64(dim_bytes);
        if (c->any_full) w->full_grads = alloc64(row_bytes);
        ok = ok && w->grads && w->got && (w->full_grads || !c->any_full);
        if (c->p->grad_bias_rows != NULL) {
            w->slot_bias_grads = alloc64((size_t)c->union_slots * sizeof(v8));
            ok = ok && w->slot_bias_grads;
        }
    }
    if (c->clamped) {
        const size_t anchors = (size_t)c->shift_rows * (size_t)c->shift_cols;
        w->block_lanes = alloc64((size_t)c->union_slots * sizeof(i8v));
        ok = ok && w->block_lanes;
        if (backward && c->p->grad_bias_rows != NULL) {
            w->anchor_bias_grads = alloc64(anchors * (size_t)c->union_slots * sizeof(v8));
            w->anchor_used = calloc(anchors, 1);
            ok = ok && w->anchor_bias_grads && w->anchor_used;
        }
    }
    return ok ? 0 : -1;
}

/* ---- the blocks ---------------------------------------------------------- */

/* out[j] = sum_d qt[d] * keys[j * key_stride + d] for `cols` keys (a constant
 * where this is inlined, so that the accumulators stay in registers). Fewer
 * than four keys take two chains each, so that the FMA latency is covered. */
INLINE void union_row_dots(const v8 *restrict qt, int64_t dim, const float *restrict keys, int64_t key_stride,
                           const int cols, v8 *restrict out)
{
    v8 acc[MAX_UNION_COLS], odd[4];
    for (int j = 0; j < cols; j++) acc[j] = SPLAT(0.0f);
    if (cols == 1) {
        /* an extra key (LONGFORMER's global token) in every block: four chains */
        v8 part[4] = {acc[0], acc[0], acc[0], acc[0]};
        int64_t d = 0;
        for (; d + 4 <= dim; d += 4)
            for (int i = 0; i < 4; i++) part[i] += qt[d + i] * keys[d + i];
        for (; d < dim; d++) part[0] += qt[d] * keys[d];
        out[0] = (part[0] + part[1]) + (part[2] + part[3]);
        return;
    }
    if (cols < 4) {
        for (int j = 0; j < cols; j++) odd[j] = SPLAT(0.0f);
        int64_t d = 0;
        for (; d + 2 <= dim; d += 2) {
            for (int j = 0; j < cols; j++) {
                acc[j] += qt[d] * keys[j * key_stride + d];
                odd[j] += qt[d + 1] * keys[j * key_stride + d + 1];
            }
        }
        if (d < dim)
            for (int j = 0; j < cols; j++) acc[j] += qt[d] * keys[j * key_stride + d];
        for (int j = 0; j < cols; j++) out[j] = acc[j] + odd[j];
        return;
    }
#pragma GCC unroll 2
    for (int64_t d = 0; d < dim; d++) {
        const v8 qd = qt[d];
        for (int j = 0; j < cols; j++) acc[j] += qd * keys[j * key_stride + d];
    }
    for (int j = 0; j < cols; j++) out[j] = acc[j];
}

INLINE void row_dots(const v8 *qt, int64_t dim, const float *keys, int64_t key_stride, int cols, v8 *out)
{
    switch (cols) {
#define DOTS_CASE(n) \
    case n: union_row_dots(qt, dim, keys, key_stride, n, out); break;
        DOTS_CASE(1) DOTS_CASE(2) DOTS_CASE(3) DOTS_CASE(4) DOTS_CASE(5) DOTS_CASE(6) DOTS_CASE(7)
        DOTS_CASE(8) DOTS_CASE(9) DOTS_CASE(10) DOTS_CASE(11) DOTS_CASE(12) DOTS_CASE(13) DOTS_CASE(14)
#undef DOTS_CASE
    default: break;
    }
}

/* Two union rows' dots in one pass: out_a[j] = sum_d qa[d] * keys_a[j * stride_a
 * + d], out_b likewise. With eight keys a row one pass has eight FMA chains,
 * just the count that covers the FMA latency at full issue, so any stall
 * shows; two rows give 16 (only where 32 vector registers hold them). */
INLINE void union_two_rows_dots(const v8 *restrict qa, const float *restrict keys_a, int64_t stride_a,
                                v8 *restrict out_a, const v8 *restrict qb, const float *restrict keys_b,
                                int64_t stride_b, v8 *restrict out_b, int64_t dim, const int cols)
{
    v8 acc_a[8], acc_b[8];
    for (int j = 0; j < cols; j++) acc_a[j] = acc_b[j] = SPLAT(0.0f);
    for (int64_t d = 0; d < dim; d++) {
        const v8 qad = qa[d], qbd = qb[d];
        for (int j = 0; j < cols; j++) {
            acc_a[j] += qad * keys_a[j * stride_a + d];
            acc_b[j] += qbd * keys_b[j * stride_b + d];
        }
    }
    for (int j = 0; j < cols; j++) {
        out_a[j] = acc_a[j];
        out_b[j] = acc_b[j];
    }
}

/* row_dots for two rows; cols from 4 to 8 in one pass, else one by one. */
INLINE void two_rows_dots(const v8 *qa, const float *keys_a, int64_t stride_a, v8 *out_a, const v8 *qb,
                          const float *keys_b, int64_t stride_b, v8 *out_b, int64_t dim, int cols)
{
    switch (cols) {
#define DOTS2_CASE(n) \
    case n: union_two_rows_dots(qa, keys_a, stride_a, out_a, qb, keys_b, stride_b, out_b, dim, n); return;
        DOTS2_CASE(4) DOTS2_CASE(5) DOTS2_CASE(6) DOTS2_CASE(7) DOTS2_CASE(8)
#undef DOTS2_CASE
    default:
        row_dots(qa, dim, keys_a, stride_a, cols, out_a);
        row_dots(qb, dim, keys_b, stride_b, cols, out_b);
    }
}

/* The P x V of two lanes (l, l + 1) over `count` keys in a row of the union
 * (weights [slot][lane] from `weights`, value rows value_stride apart from
 * values), d in [d0, d0 + 8 vectors): accumulates into a0, a1. */
INLINE void pair_weighted(const float *restrict weights, int lane, const float *restrict values,
                          int64_t value_stride, int count, int64_t d0, const int vectors, v8 *restrict a0,
                          v8 *restrict a1)
{
    for (int j = 0; j < count; j++) {
        const float w0 = weights[j * LANES + lane], w1 = weights[j * LANES + lane + 1];
        const float *v = values + j * value_stride + d0;
        for (int i = 0; i < vectors; i++) {
            const v8 value = LOADU(v + 8 * i);
            a0[i] += w0 * value;
            a1[i] += w1 * value;
        }
    }
}

/* Output rows are written whole and not read again here: where they are
 * aligned, past the caches, so that their lines are not first read in. */
INLINE void store_out(float *at, v8 value)
{
#ifdef WINDOW_STREAM_STORES
    if (((uintptr_t)at & 15) == 0) {
        _mm_stream_ps(at, (__m128){value[0], value[1], value[2], value[3]});
        _mm_stream_ps(at + 4, (__m128){value[4], value[5], value[6], value[7]});
        return;
    }
#endif
    STOREU(at, value);
}

/* The tokens one work item's blocks run over: the whole grid, or for a
 * stencil whose offsets share divisors (step_y, step_x) (a dilated window)
 * one class of tokens with the same row and column modulo the steps, which
 * attend only each other: a grid of its own, `height` x `width`, its
 * neighbouring rows (columns) row_step (col_step) tokens apart. */
typedef struct {
    int64_t origin, row_step, col_step, height, width;
} lattice_view;

/* The rows and columns of a block's union on the grid: [r_lo, r_hi) x [c_lo,
 * c_hi); which lanes reach each union slot, and (with a bias) the slots'
 * bias and dS sums: the call's own, or for a block whose windows a clamped
 * window's edges shift (`shifted`), the block's. */
typedef struct {
    const lattice_view *view;
    int64_t key_y0, key_x0;
    int r_lo, r_hi, c_lo, c_hi;
    int shifted;
    /* the union row each of the block's query rows' windows starts at: the
     * query row itself but where a clamped window's edges or its stride
     * move the windows (then its lanes' own) */
    int row_first[BLOCK_ROWS];
    const i8v *lanes;
    const v8 *bias;
    v8 *bias_grads;
} union_span;

/* The token at (y, x) of a view's grid. */
INLINE int64_t view_token(const lattice_view *view, int64_t y, int64_t x)
{
    return view->origin + y * view->row_step + x * view->col_step;
}

/* The token of union slot (r, col). */
INLINE int64_t union_token(const union_span *u, int64_t r, int64_t col)
{
    return view_token(u->view, u->key_y0 + r, u->key_x0 + col);
}

/* The first row (column) of a clamped window: the box [lo, lo + box) from
 * coordinate y, or with a query stride from the middle member of y's run of
 * `stride` (the right one of two; the axis's last where the run is cut
 * short), moved back onto an axis of `size` tokens. */
INLINE int64_t clamped_start(int64_t y, int lo, int box, int64_t size, int stride)
{
    if (stride > 1) {
        y = y - y % stride + stride / 2;
        if (y > size - 1) y = size - 1;
    }
    int64_t start = y + lo;
    if (start > size - box) start = size - box;
    return start < 0 ? 0 : start;
}

INLINE union_span union_of(const window_ctx *c, const lattice_view *view, int64_t y0, int64_t x0)
{
    union_span u;
    const int64_t H = view->height, W = view->width;
    u.view = view;
    u.key_y0 = c->clamped ? clamped_start(y0, c->box.dy_lo, c->box.box_h, H, c->stride_y) : y0 + c->box.dy_lo;
    u.key_x0 = c->clamped ? clamped_start(x0, c->box.dx_lo, c->box.box_w, W, c->stride_x) : x0 + c->box.dx_lo;
    u.shifted = 0;
    for (int r = 0; r < BLOCK_ROWS; r++) u.row_first[r] = r;
    u.lanes = c->slot_lanes;
    u.bias = NULL;
    u.bias_grads = NULL;
    u.r_lo = u.key_y0 < 0 ? (int)-u.key_y0 : 0;
    u.r_hi = u.key_y0 + c->union_rows > H ? (int)(H - u.key_y0) : c->union_rows;
    u.c_lo = u.key_x0 < 0 ? (int)-u.key_x0 : 0;
    u.c_hi = u.key_x0 + c->union_cols > W ? (int)(W - u.key_x0) : c->union_cols;
    if (u.r_hi < u.r_lo) u.r_hi = u.r_lo;
    if (u.c_hi < u.c_lo) u.c_hi = u.c_lo;
    return u;
}

/* The token of union slot s (an extra key past the union). */
INLINE int32_t slot_key(const window_ctx *c, const union_span *u, int64_t s)
{
    if (s < c->union_slots)
        return (int32_t)union_token(u, s / c->union_cols, s % c->union_cols);
    return c->p->stencil_keys[s - c->union_slots];
}

/* out[d][lane] = rows[lane][d]; NULL rows give zeros. */
INLINE void transpose_lanes(const float *const *rows, int64_t dim, v8 *out)
{
    const v8 zero = SPLAT(0.0f);
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 8) {
        v8 block[8];
        for (int l = 0; l < LANES; l++) block[l] = rows[l] ? LOADU(rows[l] + d0) : zero;
        transpose8(block);
        for (int i = 0; i < 8; i++) out[d0 + i] = block[i];
    }
    for (; d0 < dim; d0++)
        for (int l = 0; l < LANES; l++) out[d0][l] = rows[l] ? rows[l][d0] : 0.0f;
}

/* Scores scaled, biased and masked in place (-inf where lane_ok is clear, the
 * key is masked or no offset reaches it); with top and nan_lanes, their
 * maximum and NaN lanes too. Slots off the grid are left as they are. */
INLINE void mask_scores(const window_ctx *c, const window_work *w, int64_t b, int64_t h, int64_t y0, int64_t x0,
                        const union_span *u, i8v lane_ok, v8 *top_out, i8v *nan_out)
{
    const sa_attention_params *p = c->p;
    const int64_t H = c->height, W = c->width;
    const int UC = c->union_cols, US = c->union_slots;
    const v8 neg_inf = SPLAT(-INFINITY), zero = SPLAT(0.0f);
    v8 *scores = w->scores;
    v8 top = neg_inf, top_odd = neg_inf;
    i8v nan_lanes = {0};
    const int biased = p->bias_table != NULL;
    for (int r = u->r_lo; r < u->r_hi; r++) {
        for (int col = u->c_lo; col < u->c_hi; col++) {
            const int s = r * UC + col;
            i8v ok = u->lanes[s] & lane_ok;
            if (!sa_key_usable(p, b, union_token(u, r, col))) ok = (i8v){0};
            v8 score = scores[s] * c->scale;
            if (biased) score += u->bias[s];
            score = SELECT(ok, score, neg_inf);
            if (top_out) {
                nan_lanes |= score != score;
                if (s & 1) top_odd = SELECT(score > top_odd, score, top_odd);
                else top = SELECT(score > top, score, top);
            }
            scores[s] = score;
        }
    }
    for (int64_t g = 0; g < p->stencil_num_keys; g++) {
        const int64_t j = p->stencil_keys[g], gy = j / W, gx = j % W;
        const int usable = sa_key_usable(p, b, j);
        /* only a key inside the block's union box can be an offset of one of its lanes */
        const int in_union = gy >= u->key_y0 && gy < u->key_y0 + c->union_rows && gx >= u->key_x0 &&
                             gx < u->key_x0 + UC;
        i8v ok = {0};
        v8 bias = zero;
        if (!in_union && !biased) {
            if (usable) ok = lane_ok;
        } else {
            for (int l = 0; l < LANES; l++) {
                const int64_t y = y0 + l / BLOCK_COLS, x = x0 + l % BLOCK_COLS;
                if (!lane_ok[l] || !usable) continue;
                /* a key an offset reaches already is not attended twice */
                if (in_union && c->is_offset[(gy - y + H - 1) * (2 * W - 1) + gx - x + W - 1]) continue;
                ok[l] = -1;
                if (biased) bias[l] = sa_bias_of(p, h, y - gy, x - gx);
            }
        }
        v8 score = scores[US + g] * c->scale + bias;
        score = SELECT(ok, score, neg_inf);
        if (top_out) {
            nan_lanes |= score != score;
            top = SELECT(score > top, score, top);
        }
        scores[US + g] = score;
    }
    if (top_out) {
        top = SELECT(top_odd > top, top_odd, top);
        *top_out = top;
        /* a +inf score leaves exp(inf - inf) in the softmax: NaN, as a NaN score */
        *nan_out = nan_lanes | (top == SPLAT(INFINITY));
    }
}

/* out0, out1 (rows of lanes l, l + 1; NULL: not written) = factor x the sum
 * over the block's slots of weight x row, rows from base (value or key rows,
 * row_stride apart): the union rows the two lanes' windows reach, then the
 * extra keys. Written with store_out. */
INLINE void lanes_weighted(const window_ctx *c, const union_span *u, const float *weights, int l,
                           const float *base, int64_t row_stride, float *out0, float *out1, float factor0,
                           float factor1, int64_t d_first)
{
    const sa_attention_params *p = c->p;
    const int64_t dim = c->dim, col_stride = row_stride * u->view->col_step;
    const int UC = c->union_cols, US = c->union_slots;
    const int64_t num_extra = p->stencil_num_keys;
    const v8 zero = SPLAT(0.0f);
    const int ly = l / BLOCK_COLS;
    /* the union rows of the lanes' window (the weights are 0 elsewhere) */
    const int r_first = u->row_first[ly] > u->r_lo ? u->row_first[ly] : u->r_lo;
    const int r_last = u->row_first[ly] + c->box.box_h < u->r_hi ? u->row_first[ly] + c->box.box_h : u->r_hi;
    const int cols = u->c_hi - u->c_lo;
    int64_t d0 = d_first;
    for (; d0 + 8 <= dim; d0 += 32) {
        const int vectors = dim - d0 >= 32 ? 4 : (int)((dim - d0) / 8);
        v8 a0[4] = {zero, zero, zero, zero}, a1[4] = {zero, zero, zero, zero};
        for (int r = r_first; r < r_last && cols > 0; r++) {
            const float *wrow = weights + (r * UC + u->c_lo) * LANES;
            const float *row = base + union_token(u, r, u->c_lo) * row_stride;
            switch (vectors == 4 ? cols : 0) {
            /* whole union rows of 5 x 5, 7 x 7 and 9 x 9 windows, unrolled */
            case 6: pair_weighted(wrow, l, row, col_stride, 6, d0, 4, a0, a1); continue;
            case 8: pair_weighted(wrow, l, row, col_stride, 8, d0, 4, a0, a1); continue;
            case 10: pair_weighted(wrow, l, row, col_stride, 10, d0, 4, a0, a1); continue;
            default: break;
            }
            switch (vectors) {
            case 4: pair_weighted(wrow, l, row, col_stride, cols, d0, 4, a0, a1); break;
            case 3: pair_weighted(wrow, l, row, col_stride, cols, d0, 3, a0, a1); break;
            case 2: pair_weighted(wrow, l, row, col_stride, cols, d0, 2, a0, a1); break;
            default: pair_weighted(wrow, l, row, col_stride, cols, d0, 1, a0, a1); break;
            }
        }
        for (int64_t g = 0; g < num_extra; g++) {
            const float *wrow = weights + (US + g) * LANES;
            const float *row = base + (int64_t)p->stencil_keys[g] * row_stride;
            switch (vectors) {
            case 4: pair_weighted(wrow, l, row, row_stride, 1, d0, 4, a0, a1); break;
            case 3: pair_weighted(wrow, l, row, row_stride, 1, d0, 3, a0, a1); break;
            case 2: pair_weighted(wrow, l, row, row_stride, 1, d0, 2, a0, a1); break;
            default: pair_weighted(wrow, l, row, row_stride, 1, d0, 1, a0, a1); break;
            }
        }
        for (int i = 0; i < vectors; i++) {
            if (out0) store_out(out0 + d0 + 8 * i, a0[i] * factor0);
            if (out1) store_out(out1 + d0 + 8 * i, a1[i] * factor1);
        }
        if (vectors < 4) {
            d0 += 8 * vectors;
            break;
        }
    }
    /* head dims past the last multiple of 8 */
    for (; d0 < dim; d0++) {
        float s0 = 0.0f, s1 = 0.0f;
        for (int r = r_first; r < r_last; r++)
            for (int col = u->c_lo; col < u->c_hi; col++) {
                const float value = base[union_token(u, r, col) * row_stride + d0];
                s0 += weights[(r * UC + col) * LANES + l] * value;
                s1 += weights[(r * UC + col) * LANES + l + 1] * value;
            }
        for (int64_t g = 0; g < num_extra; g++) {
            const float value = base[(int64_t)p->stencil_keys[g] * row_stride + d0];
            s0 += weights[(US + g) * LANES + l] * value;
            s1 += weights[(US + g) * LANES + l + 1] * value;
        }
        if (out0) out0[d0] = s0 * factor0;
        if (out1) out1[d0] = s1 * factor1;
    }
}

/* The P x V of four lanes (l .. l + 3: two image rows of the block) over
 * `count` keys of a union row, 32 of d from d0: accumulates into acc. */
INLINE void quad_weighted(const float *restrict weights, int lane, const float *restrict values,
                          int64_t value_stride, const int count, int64_t d0, v8 acc[4][4])
{
    for (int j = 0; j < count; j++) {
        const float *v = values + j * value_stride + d0;
        v8 value[4];
        for (int i = 0; i < 4; i++) value[i] = LOADU(v + 8 * i);
        for (int k = 0; k < 4; k++) {
            const float weight = weights[j * LANES + lane + k];
            for (int i = 0; i < 4; i++) acc[k][i] += weight * value[i];
        }
    }
}

/* lanes_weighted for four lanes at once where 32 vector registers hold their
 * 16 accumulators: the union rows both image rows reach (all but two of a
 * window's) are read once for four queries, and 16 FMA chains instead of 8
 * keep the FMA pipes busy. The head dims past the last multiple of 32 go to
 * lanes_weighted. */
INLINE void quad_lanes_weighted(const window_ctx *c, const union_span *u, const float *weights, int l,
                                const float *base, int64_t row_stride, float *const *out, const float *factor)
{
    const sa_attention_params *p = c->p;
    const int64_t dim = c->dim, dim32 = dim / 32 * 32, col_stride = row_stride * u->view->col_step;
    const int UC = c->union_cols, US = c->union_slots;
    const int ly = l / BLOCK_COLS, box_h = c->box.box_h;
    /* the union rows of either image row's windows: [top, top + box_h) and
     * [bottom, bottom + box_h) (off the grid a lane keeps its default, so
     * take the least and the most) */
    const int top = u->row_first[ly], bottom = u->row_first[ly + 1];
    const int least = top < bottom ? top : bottom, most = top > bottom ? top : bottom;
    const int r_first = least > u->r_lo ? least : u->r_lo;
    const int r_last = most + box_h < u->r_hi ? most + box_h : u->r_hi;
    const int cols = u->c_hi - u->c_lo;
    for (int64_t d0 = 0; d0 < dim32; d0 += 32) {
        v8 acc[4][4];
        for (int k = 0; k < 4; k++)
            for (int i = 0; i < 4; i++) acc[k][i] = SPLAT(0.0f);
        for (int r = r_first; r < r_last && cols > 0; r++) {
            const float *wrow = weights + (r * UC + u->c_lo) * LANES;
            const float *row = base + union_token(u, r, u->c_lo) * row_stride;
            const int upper = r >= top && r < top + box_h, lower = r >= bottom && r < bottom + box_h;
            if (upper && lower) {
                switch (cols) {
                case 8: quad_weighted(wrow, l, row, col_stride, 8, d0, acc); break;
                default: quad_weighted(wrow, l, row, col_stride, cols, d0, acc); break;
                }
            } else if (upper) {
                pair_weighted(wrow, l, row, col_stride, cols, d0, 4, acc[0], acc[1]);
            } else {
                pair_weighted(wrow, l + 2, row, col_stride, cols, d0, 4, acc[2], acc[3]);
            }
        }
        for (int64_t g = 0; g < p->stencil_num_keys; g++)
            quad_weighted(weights + (US + g) * LANES, l, base + (int64_t)p->stencil_keys[g] * row_stride, row_stride,
                          1, d0, acc);
        for (int k = 0; k < 4; k++)
            if (out[k])
                for (int i = 0; i < 4; i++) store_out(out[k] + d0 + 8 * i, acc[k][i] * factor[k]);
    }
    if (dim32 < dim) {
        lanes_weighted(c, u, weights, l, base, row_stride, out[0], out[1], factor[0], factor[1], dim32);
        lanes_weighted(c, u, weights, l + 2, base, row_stride, out[2], out[3], factor[2], factor[3], dim32);
    }
}

/* What the next block reads first and this block did not: the key and value
 * rows its union adds (its last columns) and its query rows. Q x K^T and
 * P x V waited on them in L2 (with K held in L1 in a timing build, the
 * forward took 0.92x the time; with this, 0.92-0.97x, the query rows
 * 0.98-0.99x of that). The backward does not gain from it. */
INLINE void prefetch_next_block(const window_ctx *c, const union_span *u, int64_t b, int64_t h, int64_t y0,
                                int64_t x0, const float *kb, int64_t ks, const float *vb, int64_t vs)
{
    const sa_attention_params *p = c->p;
    const lattice_view *view = u->view;
    const int64_t H = view->height, W = view->width, bytes = c->dim * (int64_t)sizeof(float);
    const int64_t first_col = u->key_x0 + c->union_cols, next_x0 = x0 + BLOCK_COLS;
    for (int r = u->r_lo; r < u->r_hi; r++)
        for (int64_t col = first_col; col < first_col + BLOCK_COLS && col < W; col++) {
            const int64_t key = view_token(view, u->key_y0 + r, col);
            for (int64_t byte = 0; byte < bytes; byte += 64) {
                __builtin_prefetch((const char *)(kb + key * ks) + byte, 0, 3);
                __builtin_prefetch((const char *)(vb + key * vs) + byte, 0, 3);
            }
        }
    for (int l = 0; l < LANES && next_x0 < W; l++) {
        const int64_t y = y0 + l / BLOCK_COLS, x = next_x0 + l % BLOCK_COLS;
        if (y >= H || x >= W) continue;
        const char *row = (const char *)sa_row_of(p->q, p->q_stride, b, h, view_token(view, y, x));
        for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(row + byte, 0, 3);
    }
}

/* The P x V of the forward (dS x K of the backward) for the block's lanes:
 * out_rows[l] (NULL: not written) = factor[l] x the sum over the union of
 * weight x row. Four lanes (two image rows) at a time where 32 registers hold
 * their accumulators, else the two lanes of an image row. */
INLINE void block_weighted(const window_ctx *c, const union_span *u, const float *weights, const float *base,
                           int64_t row_stride, float *const *out_rows, const float *factor)
{
    if (c->wide) {
        for (int l = 0; l < LANES; l += 4)
            if (out_rows[l] || out_rows[l + 1] || out_rows[l + 2] || out_rows[l + 3])
                quad_lanes_weighted(c, u, weights, l, base, row_stride, out_rows + l, factor + l);
        return;
    }
    for (int l = 0; l < LANES; l += 2)
        if (out_rows[l] || out_rows[l + 1])
            lanes_weighted(c, u, weights, l, base, row_stride, out_rows[l], out_rows[l + 1], factor[l],
                           factor[l + 1], 0);
}

/* The running sums of a block's softmax: four of each in flight. */
typedef struct {
    v8 sum[4], sum_sq[4], sum_shifted[4];
} lane_sums;

/* n slots from s0 (n a constant where this is inlined): scores[s] becomes
 * exp(scores[s] - shift), times keep_scale and with dropout's lanes zeroed
 * when `dropout`; the sums (with `stats`, also of squares and of p x
 * (score - shift)) gather in sums slot i of the group. */
INLINE void numerator_group(const window_ctx *c, const union_span *u, v8 *restrict scores, int64_t s0, const int n,
                            v8 shift, u8v query_keys, const int stats, const int dropout, lane_sums *sums)
{
    const v8 zero = SPLAT(0.0f);
    v8 shifted[4], prob[4];
    for (int i = 0; i < n; i++) prob[i] = shifted[i] = scores[s0 + i] - shift;
    exp_nonpositive_lanes(prob, n); /* shift is the lanes' maximum */
    for (int i = 0; i < n; i++) {
        sums->sum[i] += prob[i];
        if (stats) {
            sums->sum_sq[i] += prob[i] * prob[i];
            sums->sum_shifted[i] += SELECT(prob[i] != zero, prob[i] * shifted[i], zero);
        }
        v8 weight = prob[i];
        if (dropout) {
            weight *= c->keep_scale;
            if (c->threshold > 0)
                weight = SELECT(sa_keep_lanes(c->threshold, query_keys, slot_key(c, u, s0 + i), 0), weight, zero);
        }
        scores[s0 + i] = weight;
    }
}

INLINE void numerators_of(const window_ctx *c, const union_span *u, v8 *restrict scores, int64_t slots, v8 shift,
                          u8v query_keys, const int stats, const int dropout, v8 out[3])
{
    const v8 zero = SPLAT(0.0f);
    lane_sums sums;
    for (int i = 0; i < 4; i++) sums.sum[i] = sums.sum_sq[i] = sums.sum_shifted[i] = zero;
    int64_t s0 = 0;
    for (; s0 + 4 <= slots; s0 += 4) numerator_group(c, u, scores, s0, 4, shift, query_keys, stats, dropout, &sums);
    switch (slots - s0) {
    case 3: numerator_group(c, u, scores, s0, 3, shift, query_keys, stats, dropout, &sums); break;
    case 2: numerator_group(c, u, scores, s0, 2, shift, query_keys, stats, dropout, &sums); break;
    case 1: numerator_group(c, u, scores, s0, 1, shift, query_keys, stats, dropout, &sums); break;
    default: break;
    }
    out[0] = (sums.sum[0] + sums.sum[1]) + (sums.sum[2] + sums.sum[3]);
    out[1] = (sums.sum_sq[0] + sums.sum_sq[1]) + (sums.sum_sq[2] + sums.sum_sq[3]);
    out[2] = (sums.sum_shifted[0] + sums.sum_shifted[1]) + (sums.sum_shifted[2] + sums.sum_shifted[3]);
}

/* A block's softmax numerators in place, over its `slots` scores less
 * `shift`: out = the lane sums of the numerators, of their squares and of
 * numerator x (score - shift) (the last two only with statistics). Out of
 * line, with the statistics and dropout switches hoisted into four copies of
 * a loop in groups of four: inlined into forward_block, whose loop keeps
 * many values live, GCC spilled each group's temporaries to the stack, and
 * the loop took 15% of the forward in perf, about twice its operations. */
WINDOW_CLONES __attribute__((noinline)) static void block_numerators(const window_ctx *c, const union_span *u,
                                                                    v8 *restrict scores, int64_t slots,
                                                                    const v8 *shift, const u8v *query_keys,
                                                                    v8 out[3])
{
    const int stats = c->p->row_stats != NULL, dropout = c->threshold > 0 || c->keep_scale != 1.0f;
    if (stats && dropout)
        numerators_of(c, u, scores, slots, *shift, *query_keys, 1, 1, out);
    else if (stats)
        numerators_of(c, u, scores, slots, *shift, *query_keys, 1, 0, out);
    else if (dropout)
        numerators_of(c, u, scores, slots, *shift, *query_keys, 0, 1, out);
    else
        numerators_of(c, u, scores, slots, *shift, *query_keys, 0, 0, out);
}

/* Query minus key from lane l to union slot s, the same in every block: query
 * (l / 2, l % 2) of the block, key (dy_lo + r, dx_lo + col) from its corner.
 * A union moved by the anchor shift (ay, ax) (clamped windows) takes that
 * off both. */
static inline void lane_to_slot(const window_ctx *c, int s, int l, int64_t *dy, int64_t *dx)
{
    *dy = l / BLOCK_COLS - (c->box.dy_lo + s / c->union_cols);
    *dx = l % BLOCK_COLS - (c->box.dx_lo + s % c->union_cols);
}

/* The bias of head h for every union slot and lane of a union moved by (ay, ax). */
static void fill_bias_table(const window_ctx *c, v8 *table, int64_t h, int64_t ay, int64_t ax)
{
    for (int s = 0; s < c->union_slots; s++)
        for (int l = 0; l < LANES; l++) {
            int64_t dy, dx;
            lane_to_slot(c, s, l, &dy, &dx);
            table[s][l] = sa_bias_of(c->p, h, (dy - ay) * c->box.step_y, (dx - ax) * c->box.step_x);
        }
}

/* The index of anchor shift (ay, ax) among the call's shift_rows x shift_cols. */
static inline int64_t anchor_of(const window_ctx *c, int64_t ay, int64_t ax)
{
    return (ay - c->shift_lo_y) * c->shift_cols + (ax - c->shift_lo_x);
}

/* Head h's bias table for a union moved by (ay, ax), filled on first use. */
static v8 *bias_table_for(const window_ctx *c, window_work *w, int64_t h, int64_t ay, int64_t ax)
{
    const int64_t anchors = (int64_t)c->shift_rows * c->shift_cols;
    const int64_t slot = (c->table_heads > 1 ? h * anchors : 0) + anchor_of(c, ay, ax);
    v8 *table = w->bias_tables + slot * c->union_slots;
    if (w->table_head[slot] != h) {
        fill_bias_table(c, table, h, ay, ax);
        w->table_head[slot] = h;
    }
    return table;
}

/* A block's union with its masks, bias and dS sums. A clamped window whose
 * edges shift some of the block's windows (or move its union off the usual
 * corner) gets lane masks of its own and the tables of its anchor shift;
 * every other block those of the call. */
INLINE union_span block_union(const window_ctx *c, window_work *w, int64_t h, const lattice_view *view,
                              int64_t y0, int64_t x0)
{
    union_span u = union_of(c, view, y0, x0);
    u.bias = w->slot_bias;
    u.bias_grads = w->slot_bias_grads;
    if (!c->clamped) return u;
    const int64_t H = view->height, W = view->width;
    const int64_t ay = u.key_y0 - (y0 + c->box.dy_lo), ax = u.key_x0 - (x0 + c->box.dx_lo);
    int lane_row[LANES], lane_col[LANES];
    int shifted = ay != 0 || ax != 0;
    for (int l = 0; l < LANES; l++) {
        const int64_t y = y0 + l / BLOCK_COLS, x = x0 + l % BLOCK_COLS;
        lane_row[l] = l / BLOCK_COLS;
        lane_col[l] = l % BLOCK_COLS;
        if (y >= H || x >= W) continue; /* off the grid: masked in every slot */
        lane_row[l] = (int)(clamped_start(y, c->box.dy_lo, c->box.box_h, H, c->stride_y) - u.key_y0);
        lane_col[l] = (int)(clamped_start(x, c->box.dx_lo, c->box.box_w, W, c->stride_x) - u.key_x0);
        shifted |= lane_row[l] != l / BLOCK_COLS || lane_col[l] != l % BLOCK_COLS;
    }
    if (!shifted) return u;
    u.shifted = 1;
    for (int r = 0; r < BLOCK_ROWS; r++) u.row_first[r] = lane_row[r * BLOCK_COLS];
    i8v row_in[MAX_BOX + BLOCK_ROWS], col_in[MAX_UNION_COLS];
    for (int r = 0; r < c->union_rows; r++)
        for (int l = 0; l < LANES; l++) row_in[r][l] = r >= lane_row[l] && r < lane_row[l] + c->box.box_h ? -1 : 0;
    for (int col = 0; col < c->union_cols; col++)
        for (int l = 0; l < LANES; l++)
            col_in[col][l] = col >= lane_col[l] && col < lane_col[l] + c->box.box_w ? -1 : 0;
    for (int r = 0; r < c->union_rows; r++)
        for (int col = 0; col < c->union_cols; col++) w->block_lanes[r * c->union_cols + col] = row_in[r] & col_in[col];
    u.lanes = w->block_lanes;
    if (w->bias_tables != NULL) u.bias = bias_table_for(c, w, h, ay, ax);
    if (w->anchor_bias_grads != NULL) {
        const int64_t anchor = anchor_of(c, ay, ax);
        v8 *sums = w->anchor_bias_grads + anchor * c->union_slots;
        if (!w->anchor_used[anchor]) {
            memset(sums, 0, (size_t)c->union_slots * sizeof(v8));
            w->anchor_used[anchor] = 1;
        }
        u.bias_grads = sums;
    }
    return u;
}

/* One block's forward: outputs, log-sum-exps and statistics of its lanes. */
INLINE void forward_block(const window_ctx *c, window_work *w, int64_t b, int64_t h, const lattice_view *view,
                          int64_t y0, int64_t x0)
{
    const sa_attention_params *p = c->p;
    const int64_t H = view->height, W = view->width, dim = c->dim, N = p->num_tokens;
    const int UR = c->union_rows, UC = c->union_cols, US = c->union_slots;
    const int64_t num_extra = p->stencil_num_keys;
    const int want_stats = p->row_stats != NULL;
    const v8 neg_inf = SPLAT(-INFINITY), zero = SPLAT(0.0f);
    const float *kb = (const float *)p->k + b * p->k_stride[0] + h * p->k_stride[1];
    const float *vb = (const float *)p->v + b * p->v_stride[0] + h * p->v_stride[1];
    const int64_t ks = p->k_stride[2], vs = p->v_stride[2], key_step = ks * view->col_step;

    int64_t token[LANES];
    i8v on_grid = {0};
    const float *q_rows[LANES];
    for (int l = 0; l < LANES; l++) {
        const int64_t y = y0 + l / BLOCK_COLS, x = x0 + l % BLOCK_COLS;
        token[l] = y < H && x < W ? view_token(view, y, x) : -1;
        on_grid[l] = token[l] >= 0 ? -1 : 0;
        q_rows[l] = token[l] >= 0 ? sa_row_of(p->q, p->q_stride, b, h, token[l]) : NULL;
    }
    transpose_lanes(q_rows, dim, w->qt);

    const union_span u = block_union(c, w, h, view, y0, x0);
    prefetch_next_block(c, &u, b, h, y0, x0, kb, ks, vb, vs);
    v8 *scores = w->scores;
    if (!(u.r_lo == 0 && u.r_hi == UR && u.c_lo == 0 && u.c_hi == UC))
        for (int s = 0; s < US; s++) scores[s] = neg_inf;

    /* Q x K^T */
    const int cols = u.c_hi - u.c_lo;
    int r = u.r_lo;
    for (; c->wide && r + 2 <= u.r_hi && cols > 0; r += 2) {
        const float *keys = kb + union_token(&u, r, u.c_lo) * ks;
        two_rows_dots(w->qt, keys, key_step, scores + r * UC + u.c_lo, w->qt, keys + view->row_step * ks, key_step,
                      scores + (r + 1) * UC + u.c_lo, dim, cols);
    }
    for (; r < u.r_hi && cols > 0; r++)
        row_dots(w->qt, dim, kb + union_token(&u, r, u.c_lo) * ks, key_step, cols, scores + r * UC + u.c_lo);
    for (int64_t g = 0; g < num_extra; g++)
        row_dots(w->qt, dim, kb + (int64_t)p->stencil_keys[g] * ks, ks, 1, scores + US + g);
    v8 top;
    i8v nan_lanes;
    mask_scores(c, w, b, h, y0, x0, &u, on_grid, &top, &nan_lanes);
    const v8 shift = SELECT(top == neg_inf, zero, top);

    /* softmax numerators, weights with dropout */
    u8v query_keys = {0};
    if (c->threshold > 0) {
        const uint32_t row_key = sa_dropout_row_key(p->dropout_seed, b, h);
        for (int l = 0; l < LANES; l++) query_keys[l] = sa_dropout_query_key(row_key, token[l] >= 0 ? token[l] : 0);
    }
    const int64_t slots = US + num_extra;
    v8 sums[3];
    block_numerators(c, &u, scores, slots, &shift, &query_keys, sums);
    const v8 sum = sums[0], sum_sq = sums[1], sum_shifted = sums[2];

    /* normalisation: NaN for a row with a NaN score, 0 for a row with no key */
    const i8v live = sum > zero;
    const v8 inv = SELECT(live, SPLAT(1.0f) / SELECT(live, sum, SPLAT(1.0f)), zero);
    const v8 log_sum = log_v8(SELECT(live, sum, SPLAT(1.0f))); /* eight logs at once, not libm's one by one */
    const v8 factor = SELECT(nan_lanes, SPLAT(NAN), inv);
    float *out_rows[LANES];
    for (int l = 0; l < LANES; l++) {
        out_rows[l] = NULL;
        const int64_t i = token[l];
        if (i < 0 || c->is_listed[i]) continue;
        out_rows[l] = (float *)p->out + b * p->out_stride[0] + h * p->out_stride[1] + i * p->out_stride[2];
        const int64_t row_item = (b * p->heads + h) * N + i;
        float lse = live[l] ? shift[l] + log_sum[l] : -INFINITY;
        if (nan_lanes[l]) lse = NAN;
        ((float *)p->lse)[row_item] = lse;
        if (want_stats) {
            float *stats = (float *)p->row_stats + 2 * row_item;
            stats[0] = live[l] ? sum_sq[l] * inv[l] * inv[l] : 0.0f;
            stats[1] = live[l] ? log_sum[l] - sum_shifted[l] * inv[l] : 0.0f;
            if (nan_lanes[l]) stats[0] = stats[1] = NAN;
        }
    }

    block_weighted(c, &u, (const float *)scores, vb, vs, out_rows, (const float *)&factor);
}

/* scores[j] = row . keys[j] for every token j (keys row-major, key_stride
 * apart): eight keys at a time as eight vectors over d, transposed and summed. */
INLINE void row_dots_all(const float *restrict row, const float *restrict keys, int64_t key_stride, int64_t dim,
                         int64_t count, float *restrict out)
{
    const int64_t dim8 = dim / 8 * 8;
    int64_t j0 = 0;
    for (; j0 + 8 <= count; j0 += 8) {
        v8 acc[8];
        for (int k = 0; k < 8; k++) acc[k] = SPLAT(0.0f);
        for (int64_t d0 = 0; d0 < dim8; d0 += 8) {
            const v8 rv = LOADU(row + d0);
            for (int k = 0; k < 8; k++) acc[k] += rv * LOADU(keys + (j0 + k) * key_stride + d0);
        }
        transpose8(acc);
        v8 dots = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (int64_t d = dim8; d < dim; d++)
            for (int k = 0; k < 8; k++) dots[k] += row[d] * keys[(j0 + k) * key_stride + d];
        STOREU(out + j0, dots);
    }
    for (; j0 < count; j0++) {
        float dot = 0.0f;
        for (int64_t d = 0; d < dim; d++) dot += row[d] * keys[j0 * key_stride + d];
        out[j0] = dot;
    }
}

/* ---- listed rows that attend every token ---------------------------------- */

/* A listed row that attends every token (LONGFORMER's global query) is done
 * in parts: each band item takes its share, the keys of its own image rows,
 * right after its blocks, while those keys and values are still in its
 * core's caches (as a separate item after the bands it read the whole 1 MB of
 * K and V of a 64 x 64 head again, 5% of LONGFORMER's forward). A part is the
 * share's softmax against its own maximum; full_row_finish merges them. */
enum { PART_TOP, PART_SUM, PART_SUM_SQ, PART_SUM_SHIFTED, PART_NAN, PART_ACC };

/* Floats a part takes: the five above, then the unnormalised output row. */
static int64_t full_part_floats(const window_ctx *c) { return PART_ACC + c->dim; }

/* Where the part of listed row t, (batch, head) bh, band `band` goes. */
static float *full_part_at(const window_ctx *c, int64_t bh, int64_t t, int64_t band)
{
    return c->full_parts + ((bh * c->p->stencil_num_rows + t) * c->bands + band) * full_part_floats(c);
}

/* Row i's part over keys [first, end): scores of eight keys at a time as
 * eight vectors over d, transposed and summed; P x V with vectors over d. */
INLINE void full_row_part(const window_ctx *c, window_work *w, int64_t b, int64_t h, int64_t i, int64_t first,
                          int64_t end, float *part)
{
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, dim = c->dim, count = end - first;
    const int want_stats = p->row_stats != NULL;
    const int64_t ks = p->k_stride[2], vs = p->v_stride[2];
    const float *kb = (const float *)p->k + b * p->k_stride[0] + h * p->k_stride[1] + first * ks;
    const float *vb = (const float *)p->v + b * p->v_stride[0] + h * p->v_stride[1] + first * vs;
    const float *q = sa_row_of(p->q, p->q_stride, b, h, i);
    const int64_t iy = i / W, ix = i % W;
    float *scores = w->full;
    float top = -INFINITY;
    int saw_nan = 0;
    row_dots_all(q, kb, ks, dim, count, scores);
    int64_t j_plain = 0;
    if (p->bias_table == NULL && p->key_mask == NULL) {
        /* no bias or mask to look up per key: eight scores a step */
        const v8 scale = SPLAT(c->scale);
        v8 tops = SPLAT(-INFINITY);
        i8v nans = {0};
        for (; j_plain + 8 <= count; j_plain += 8) {
            const v8 s = LOADU(scores + j_plain) * scale;
            nans |= s != s;
            tops = lanes_max(tops, s);
            STOREU(scores + j_plain, s);
        }
        top = hmax8(tops);
        for (int l = 0; l < LANES; l++) saw_nan |= nans[l] != 0;
    }
    for (int64_t jj = j_plain; jj < count; jj++) {
        const int64_t j = first + jj;
        float s = scores[jj] * c->scale + sa_bias_of(p, h, iy - j / W, ix - j % W);
        if (!sa_key_usable(p, b, j)) s = -INFINITY;
        saw_nan |= s != s;
        top = s > top ? s : top;
        scores[jj] = s;
    }
    saw_nan |= top == INFINITY; /* exp(inf - inf) in the softmax */
    const float shift = top == -INFINITY ? 0.0f : top;
    const uint32_t query_key =
        c->threshold ? sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), i) : 0u;
    const v8 zero = SPLAT(0.0f);
    v8 sum = zero, sum_sq = zero, sum_shifted = zero;
    for (int64_t j0 = 0; j0 < count; j0 += 8) {
        const int n = count - j0 < 8 ? (int)(count - j0) : 8;
        v8 shifted = SPLAT(-INFINITY);
        if (n == 8)
            shifted = LOADU(scores + j0) - SPLAT(shift);
        else
            for (int k = 0; k < n; k++) shifted[k] = scores[j0 + k] - shift;
        const v8 prob = exp_v8(shifted);
        sum += prob;
        if (want_stats) {
            sum_sq += prob * prob;
            sum_shifted += SELECT(prob != zero, prob * shifted, zero);
        }
        v8 weight = prob * c->keep_scale;
        if (c->threshold > 0)
            weight = SELECT(sa_keep_lanes(c->threshold, (u8v){0} + query_key, (int32_t)(first + j0), 1), weight, zero);
        if (n == 8)
            STOREU(scores + j0, weight);
        else
            for (int k = 0; k < n; k++) scores[j0 + k] = weight[k];
    }
    float *acc_out = part + PART_ACC;
    /* keys outer, up to 32 of d inner: each value row is read once */
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 32) {
        const int vectors = dim - d0 >= 32 ? 4 : (int)((dim - d0) / 8);
        v8 acc[4] = {zero, zero, zero, zero}, acc_odd[4] = {zero, zero, zero, zero};
        int64_t j = 0;
        for (; j + 2 <= count; j += 2) {
            const float *v0 = vb + j * vs + d0, *v1 = v0 + vs;
            for (int k = 0; k < vectors; k++) {
                acc[k] += scores[j] * LOADU(v0 + 8 * k);
                acc_odd[k] += scores[j + 1] * LOADU(v1 + 8 * k);
            }
        }
        for (; j < count; j++)
            for (int k = 0; k < vectors; k++) acc[k] += scores[j] * LOADU(vb + j * vs + d0 + 8 * k);
        for (int k = 0; k < vectors; k++) STOREU(acc_out + d0 + 8 * k, acc[k] + acc_odd[k]);
        if (vectors < 4) {
            d0 += 8 * vectors;
            break;
        }
    }
    for (; d0 < dim; d0++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < count; j++) acc += scores[j] * vb[j * vs + d0];
        acc_out[d0] = acc;
    }
    part[PART_TOP] = top;
    part[PART_SUM] = hsum8(sum);
    part[PART_SUM_SQ] = hsum8(sum_sq);
    part[PART_SUM_SHIFTED] = hsum8(sum_shifted);
    part[PART_NAN] = saw_nan ? 1.0f : 0.0f;
}

/* Row i from its parts: each part's sums rescaled from its own maximum to
 * the row's, as an online softmax merges its chunks. */
static void full_row_finish(const window_ctx *c, int64_t b, int64_t h, int64_t i, const float *parts)
{
    const sa_attention_params *p = c->p;
    const int64_t dim = c->dim, stride = full_part_floats(c);
    float top = -INFINITY;
    int saw_nan = 0;
    for (int64_t band = 0; band < c->bands; band++) {
        const float *part = parts + band * stride;
        saw_nan |= part[PART_NAN] != 0.0f;
        if (part[PART_SUM] > 0.0f && part[PART_TOP] > top) top = part[PART_TOP];
    }
    double total = 0.0, total_sq = 0.0, total_shifted = 0.0;
    float *out = (float *)p->out + b * p->out_stride[0] + h * p->out_stride[1] + i * p->out_stride[2];
    for (int64_t d = 0; d < dim; d++) out[d] = 0.0f;
    for (int64_t band = 0; band < c->bands && !saw_nan; band++) {
        const float *part = parts + band * stride;
        if (!(part[PART_SUM] > 0.0f)) continue;
        const float gap = part[PART_TOP] - top, r = expf(gap);
        total += r * part[PART_SUM];
        total_sq += (double)r * r * part[PART_SUM_SQ];
        total_shifted += r * (part[PART_SUM_SHIFTED] + part[PART_SUM] * gap);
        for (int64_t d = 0; d < dim; d++) out[d] += r * part[PART_ACC + d];
    }
    const int live = total > 0.0;
    const float inv = live ? (float)(1.0 / total) : 0.0f;
    for (int64_t d = 0; d < dim; d++) out[d] = saw_nan ? NAN : out[d] * inv;
    const int64_t row_item = (b * p->heads + h) * p->num_tokens + i;
    float lse = live ? top + (float)log(total) : -INFINITY;
    if (saw_nan) lse = NAN;
    ((float *)p->lse)[row_item] = lse;
    if (p->row_stats != NULL) {
        float *stats = (float *)p->row_stats + 2 * row_item;
        stats[0] = live ? (float)(total_sq / (total * total)) : 0.0f;
        stats[1] = live ? (float)(log(total) - total_shifted / total) : 0.0f;
        if (saw_nan) stats[0] = stats[1] = NAN;
    }
}

/* Every full row of every (batch, head) that runs, from the bands' parts. */
static void finish_full_rows(const window_ctx *c)
{
    const sa_attention_params *p = c->p;
    for (int64_t bh = 0; bh < p->batch * p->heads; bh++) {
        const int64_t b = bh / p->heads, h = bh % p->heads;
        if (p->head_active != NULL && !p->head_active[h]) continue; /* zeroed with its bands */
        for (int64_t t = 0; t < p->stencil_num_rows; t++)
            if (c->listed_full[t]) full_row_finish(c, b, h, p->stencil_rows[t], full_part_at(c, bh, t, 0));
    }
}

/* ---- work items ------------------------------------------------------------- */

/* Class `cls` of the grid (see lattice_view): the tokens whose row and
 * column are (cls / step_x, cls % step_x) modulo the steps. */
static lattice_view class_view(const window_ctx *c, int64_t cls)
{
    const int64_t sy = c->box.step_y, sx = c->box.step_x, ry = cls / sx, rx = cls % sx;
    lattice_view view = {ry * c->width + rx, sy * c->width, sx, (c->height - ry + sy - 1) / sy,
                         (c->width - rx + sx - 1) / sx};
    return view;
}

/* Zero outputs and -inf log-sum-exps for the rows [y_first, y_end) of a view
 * (a pruned head). */
static void write_pruned_view_rows(const sa_attention_params *p, const lattice_view *view, int64_t b, int64_t h,
                                   int64_t y_first, int64_t y_end)
{
    for (int64_t y = y_first; y < y_end; y++) {
        if (view->col_step == 1) {
            const int64_t first = view_token(view, y, 0);
            sa_write_pruned_rows(p, b, h, first, first + view->width);
            continue;
        }
        for (int64_t x = 0; x < view->width; x++) {
            const int64_t token = view_token(view, y, x);
            sa_write_pruned_rows(p, b, h, token, token + 1);
        }
    }
}

WINDOW_CLONES
static void forward_items(void *opaque, int64_t first, int64_t last)
{
    (void)first;
    (void)last;
    window_ctx *c = opaque;
    const sa_attention_params *p = c->p;
    const int64_t W = c->width;
    window_work w;
    if (work_alloc(&w, c, 0) < 0) {
        work_free(&w);
        atomic_store(&c->failed, 1);
        return;
    }
    for (;;) {
        const int64_t item = atomic_fetch_add(&c->next_item, 1);
        if (item >= c->band_items) break;
        const int64_t band = item % c->bands, cls = item / c->bands % c->classes, bh = item / c->bands / c->classes;
        const int64_t b = bh / p->heads, h = bh % p->heads;
        const lattice_view view = class_view(c, cls);
        const int64_t y_first = band * BAND_ROWS;
        const int64_t y_end = y_first + BAND_ROWS < view.height ? y_first + BAND_ROWS : view.height;
        if (y_first >= y_end) continue; /* bands run to the tallest class */
        if (p->head_active != NULL && !p->head_active[h]) {
            write_pruned_view_rows(p, &view, b, h, y_first, y_end);
            continue;
        }
        if (p->bias_table != NULL) w.slot_bias = bias_table_for(c, &w, h, 0, 0);
        for (int64_t y0 = y_first; y0 < y_end; y0 += BLOCK_ROWS)
            for (int64_t x0 = 0; x0 < view.width; x0 += BLOCK_COLS) {
                forward_block(c, &w, b, h, &view, y0, x0);
            }
        for (int64_t t = 0; t < p->stencil_num_rows; t++)
            if (c->listed_full[t])
                full_row_part(c, &w, b, h, p->stencil_rows[t], y_first * W, y_end * W, full_part_at(c, bh, t, band));
    }
#ifdef WINDOW_STREAM_STORES
    _mm_sfence(); /* the streamed rows are seen by whoever reads them next */
#endif
    work_free(&w);
}

/* ---- backward ------------------------------------------------------------------ */

/* dst[i] += a[i] for the vectors of one d-block of a gradient row. */
INLINE void add_row(float *restrict dst, const v8 *restrict a, int vectors)
{
    for (int i = 0; i < vectors; i++) STOREU(dst + 8 * i, LOADU(dst + 8 * i) + a[i]);
}

/* grad[key] += sum over the lanes [lane_first, lane_end) of weight[lane] * rows[lane],
 * for two keys at a time (weights [slot][lane]), d in [d0, d0 + 8 vectors). */
INLINE void keys_from_lanes(const float *restrict weights0, const float *restrict weights1,
                            const float *const *rows, int lane_first, int lane_end, int64_t d0, const int vectors,
                            float *restrict grad0, float *restrict grad1)
{
    v8 a0[4], a1[4];
    for (int i = 0; i < vectors; i++) a0[i] = a1[i] = SPLAT(0.0f);
    for (int l = lane_first; l < lane_end; l++) {
        const float w0 = weights0[l], w1 = grad1 ? weights1[l] : 0.0f;
        for (int i = 0; i < vectors; i++) {
            const v8 row = LOADU(rows[l] + d0 + 8 * i);
            a0[i] += w0 * row;
            if (grad1) a1[i] += w1 * row;
        }
    }
    add_row(grad0 + d0, a0, vectors);
    if (grad1) add_row(grad1 + d0, a1, vectors);
}

/* The lanes of a backward block, as its slots' loop needs them. */
typedef struct {
    v8 row_lse, row_delta;
    i8v live;
    u8v query_keys;
    const int64_t *token;
    v8 *bias_grads;    /* per union slot; NULL without a bias gradient */
    float *bias_cells; /* the (batch, head)'s bias gradient, for the extra keys */
} block_lanes;

/* n slots from s0 (n a constant where this is inlined): scores[s] becomes the
 * weight of dO in dV (probability x keep), grads[s] the score gradient dS
 * (scaled), from dO . V^T in grads[s]; with bias_grad, dS also adds into the
 * bias gradient; with dropout, keep_scale and dropout's lanes apply. */
INLINE void score_grad_group(const window_ctx *c, const union_span *u, const block_lanes *lanes,
                             v8 *restrict scores, v8 *restrict grads, int64_t s0, const int n, const int bias_grad,
                             const int dropout)
{
    const sa_attention_params *p = c->p;
    const int64_t W = c->width;
    const int US = c->union_slots;
    const v8 zero = SPLAT(0.0f);
    v8 prob[4];
    for (int i = 0; i < n; i++) prob[i] = scores[s0 + i] - lanes->row_lse;
    exp_lanes(prob, n);
    for (int i = 0; i < n; i++) {
        const int64_t s = s0 + i;
        prob[i] = SELECT(lanes->live, prob[i], zero);
        v8 keep = SPLAT(c->keep_scale);
        if (dropout && c->threshold > 0)
            keep = SELECT(sa_keep_lanes(c->threshold, lanes->query_keys, slot_key(c, u, s), 0), keep, zero);
        const v8 score_grad = prob[i] * ((dropout ? grads[s] * keep : grads[s]) - lanes->row_delta);
        grads[s] = score_grad * c->scale;
        scores[s] = dropout ? prob[i] * keep : prob[i];
        if (!bias_grad) continue;
        /* a union slot is the same offset from a lane in every block: summed
         * per slot here, put in the table's cells once per item; an extra
         * key's offset differs from block to block. Only the layout's pairs
         * add (a NaN value row gives 0 x NaN in the union's other lanes). */
        if (s < US) {
            lanes->bias_grads[s] += SELECT(u->lanes[s] & lanes->live, score_grad, zero);
            continue;
        }
        const int64_t key = p->stencil_keys[s - US];
        for (int l = 0; l < LANES; l++)
            if (lanes->live[l])
                lanes->bias_cells[sa_bias_cell(p, lanes->token[l] / W - key / W, lanes->token[l] % W - key % W)] +=
                    score_grad[l];
    }
}

INLINE void score_grads_of(const window_ctx *c, const union_span *u, const block_lanes *lanes, v8 *restrict scores,
                           v8 *restrict grads, int64_t slots, const int bias_grad, const int dropout)
{
    int64_t s0 = 0;
    for (; s0 + 4 <= slots; s0 += 4) score_grad_group(c, u, lanes, scores, grads, s0, 4, bias_grad, dropout);
    switch (slots - s0) {
    case 3: score_grad_group(c, u, lanes, scores, grads, s0, 3, bias_grad, dropout); break;
    case 2: score_grad_group(c, u, lanes, scores, grads, s0, 2, bias_grad, dropout); break;
    case 1: score_grad_group(c, u, lanes, scores, grads, s0, 1, bias_grad, dropout); break;
    default: break;
    }
}

/* The backward's probabilities from the forward's log-sum-exp and the score
 * gradients of a block's `slots`, in place (score_grad_group). Out of line,
 * with the bias-gradient and dropout switches hoisted into four copies of a
 * loop in groups of four, for the reason block_numerators gives. */
WINDOW_CLONES __attribute__((noinline)) static void block_score_grads(const window_ctx *c, const union_span *u,
                                                                     const block_lanes *lanes,
                                                                     v8 *restrict scores, v8 *restrict grads,
                                                                     int64_t slots)
{
    const int bias_grad = lanes->bias_grads != NULL, dropout = c->threshold > 0 || c->keep_scale != 1.0f;
    if (bias_grad && dropout)
        score_grads_of(c, u, lanes, scores, grads, slots, 1, 1);
    else if (bias_grad)
        score_grads_of(c, u, lanes, scores, grads, slots, 1, 0);
    else if (dropout)
        score_grads_of(c, u, lanes, scores, grads, slots, 0, 1);
    else
        score_grads_of(c, u, lanes, scores, grads, slots, 0, 0);
}

/* One block's share of the gradients: dQ of its lanes (written), dK and dV of
 * its union's keys (added). */
INLINE void backward_block(const window_ctx *c, window_work *w, int64_t b, int64_t h, const lattice_view *view,
                           int64_t y0, int64_t x0, float *grad_q, float *grad_k, float *grad_v)
{
    const sa_attention_params *p = c->p;
    const int64_t H = view->height, W = view->width, dim = c->dim, N = p->num_tokens;
    const int UR = c->union_rows, UC = c->union_cols, US = c->union_slots;
    const int64_t num_extra = p->stencil_num_keys;
    const v8 neg_inf = SPLAT(-INFINITY), zero = SPLAT(0.0f);
    const float *kb = (const float *)p->k + b * p->k_stride[0] + h * p->k_stride[1];
    const float *vb = (const float *)p->v + b * p->v_stride[0] + h * p->v_stride[1];
    const int64_t ks = p->k_stride[2], vs = p->v_stride[2];
    const int64_t key_step = ks * view->col_step, value_step = vs * view->col_step;
    const int64_t bh = b * p->heads + h;
    const float *lse = (const float *)p->lse + bh * N, *delta = (const float *)p->delta + bh * N;

    int64_t token[LANES];
    i8v live = {0};
    v8 row_lse = SPLAT(INFINITY), row_delta = zero;
    const float *q_rows[LANES], *go_rows[LANES];
    for (int l = 0; l < LANES; l++) {
        const int64_t y = y0 + l / BLOCK_COLS, x = x0 + l % BLOCK_COLS;
        token[l] = y < H && x < W ? view_token(view, y, x) : -1;
        q_rows[l] = go_rows[l] = NULL;
        if (token[l] < 0) continue;
        q_rows[l] = sa_row_of(p->q, p->q_stride, b, h, token[l]);
        go_rows[l] = sa_row_of(p->grad_out, p->grad_out_stride, b, h, token[l]);
        /* listed rows are done whole below; rows without a key have no gradient */
        if (c->is_listed[token[l]] || lse[token[l]] == -INFINITY) continue;
        live[l] = -1;
        row_lse[l] = lse[token[l]];
        row_delta[l] = delta[token[l]];
    }
    const float *rows_for_keys[LANES];
    const float *go_for_keys[LANES];
    static const float zeros_row[MAX_DIM] __attribute__((aligned(32)));
    for (int l = 0; l < LANES; l++) {
        rows_for_keys[l] = q_rows[l] ? q_rows[l] : zeros_row;
        go_for_keys[l] = go_rows[l] ? go_rows[l] : zeros_row;
    }
    transpose_lanes(q_rows, dim, w->qt);
    transpose_lanes(go_rows, dim, w->got);

    const union_span u = block_union(c, w, h, view, y0, x0);
    v8 *scores = w->scores, *grads = w->grads;
    const int whole = u.r_lo == 0 && u.r_hi == UR && u.c_lo == 0 && u.c_hi == UC;
    if (!whole)
        for (int s = 0; s < US; s++) {
            scores[s] = neg_inf;
            grads[s] = zero;
        }
    /* two union rows of K against the queries, then the same two of V against
     * dO: one vector per d feeds both rows' FMAs. (K and V rows of one union
     * row in a pass, against two vectors per d, held 16 row pointers, which
     * spilled: 29% of the backward went to that loop.) */
    const int cols = u.c_hi - u.c_lo;
    int r = u.r_lo;
    for (; c->wide && r + 2 <= u.r_hi && cols > 0; r += 2) {
        const int64_t first_key = union_token(&u, r, u.c_lo), next_row = first_key + view->row_step;
        v8 *const score_row = scores + r * UC + u.c_lo, *const grad_row = grads + r * UC + u.c_lo;
        two_rows_dots(w->qt, kb + first_key * ks, key_step, score_row, w->qt, kb + next_row * ks, key_step,
                      score_row + UC, dim, cols);
        two_rows_dots(w->got, vb + first_key * vs, value_step, grad_row, w->got, vb + next_row * vs, value_step,
                      grad_row + UC, dim, cols);
    }
    for (; r < u.r_hi && cols > 0; r++) {
        const int64_t first_key = union_token(&u, r, u.c_lo);
        row_dots(w->qt, dim, kb + first_key * ks, key_step, cols, scores + r * UC + u.c_lo);
        row_dots(w->got, dim, vb + first_key * vs, value_step, cols, grads + r * UC + u.c_lo);
    }
    for (int64_t g = 0; g < num_extra; g++) {
        row_dots(w->qt, dim, kb + (int64_t)p->stencil_keys[g] * ks, ks, 1, scores + US + g);
        row_dots(w->got, dim, vb + (int64_t)p->stencil_keys[g] * vs, vs, 1, grads + US + g);
    }
    mask_scores(c, w, b, h, y0, x0, &u, live, NULL, NULL);

    /* probabilities from the forward's log-sum-exp; weights of dO in dV (into
     * scores) and dS (into grads) */
    u8v query_keys = {0};
    if (c->threshold > 0) {
        const uint32_t row_key = sa_dropout_row_key(p->dropout_seed, b, h);
        for (int l = 0; l < LANES; l++) query_keys[l] = sa_dropout_query_key(row_key, token[l] >= 0 ? token[l] : 0);
    }
    const int64_t slots = US + num_extra;
    v8 *bias_grads = u.bias_grads; /* NULL without a bias gradient */
    float *bias_cells = bias_grads ? p->grad_bias_rows + bh * c->bias_cells : NULL;
    const block_lanes lanes = {row_lse, row_delta, live, query_keys, token, bias_grads, bias_cells};
    block_score_grads(c, &u, &lanes, scores, grads, slots);

    /* dQ as the forward's P x V */
    const float *grad_weights = (const float *)grads;
    static const float ones[LANES] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
    float *dq_rows[LANES];
    for (int l = 0; l < LANES; l++)
        dq_rows[l] = token[l] >= 0 && !c->is_listed[token[l]] ? grad_q + token[l] * dim : NULL;
    block_weighted(c, &u, grad_weights, kb, ks, dq_rows, ones);

    /* dK and dV: each union row's keys from the lanes whose windows reach that row */
    const float *prob_weights = (const float *)scores;
    for (int64_t d0 = 0; d0 + 8 <= dim; d0 += 32) {
        /* whole vectors here; head dims past the last multiple of 8 below */
        const int vectors = dim - d0 >= 32 ? 4 : (int)((dim - d0) / 8);
        for (int r = u.r_lo; r < u.r_hi; r++) {
            /* lanes of the query rows whose windows reach union row r:
             * r - (box_h - 1) <= ly <= r, or where the windows are moved,
             * from the first to the last such row (rows off the grid keep
             * their defaults, so the span is taken over all four) */
            int ly_first = r - (c->box.box_h - 1) > 0 ? r - (c->box.box_h - 1) : 0;
            int ly_last = r < BLOCK_ROWS - 1 ? r : BLOCK_ROWS - 1;
            if (u.shifted) {
                ly_first = BLOCK_ROWS;
                ly_last = -1;
                for (int ly = 0; ly < BLOCK_ROWS; ly++)
                    if (r >= u.row_first[ly] && r < u.row_first[ly] + c->box.box_h) {
                        ly_first = ly < ly_first ? ly : ly_first;
                        ly_last = ly;
                    }
                if (ly_last < 0) continue;
            }
            const int lane_first = ly_first * BLOCK_COLS, lane_end = (ly_last + 1) * BLOCK_COLS;
            for (int col = u.c_lo; col < u.c_hi; col += 2) {
                const int two = col + 1 < u.c_hi;
                const int s = r * UC + col;
                const int64_t key = union_token(&u, r, col), next = view->col_step * dim;
                float *gk0 = grad_k + key * dim, *gk1 = two ? gk0 + next : NULL;
                float *gv0 = grad_v + key * dim, *gv1 = two ? gv0 + next : NULL;
                const float *gs0 = grad_weights + s * LANES, *gs1 = gs0 + LANES;
                const float *pw0 = prob_weights + s * LANES, *pw1 = pw0 + LANES;
                switch (vectors) {
#define KEYS_CASE(n)                                                                                      \
    case n:                                                                                               \
        keys_from_lanes(gs0, gs1, rows_for_keys, lane_first, lane_end, d0, n, gk0, gk1);                  \
        keys_from_lanes(pw0, pw1, go_for_keys, lane_first, lane_end, d0, n, gv0, gv1);                    \
        break;
                    KEYS_CASE(4) KEYS_CASE(3) KEYS_CASE(2) KEYS_CASE(1)
#undef KEYS_CASE
                default: break;
                }
            }
        }
        for (int64_t g = 0; g < num_extra; g++) {
            const int s = US + (int)g;
            const int64_t key = p->stencil_keys[g];
            for (int i = 0; i < vectors; i++) {
                v8 ak = zero, av = zero;
                for (int l = 0; l < LANES; l++) {
                    ak += grad_weights[s * LANES + l] * LOADU(rows_for_keys[l] + d0 + 8 * i);
                    av += prob_weights[s * LANES + l] * LOADU(go_for_keys[l] + d0 + 8 * i);
                }
                STOREU(grad_k + key * dim + d0 + 8 * i, LOADU(grad_k + key * dim + d0 + 8 * i) + ak);
                STOREU(grad_v + key * dim + d0 + 8 * i, LOADU(grad_v + key * dim + d0 + 8 * i) + av);
            }
        }
    }
    /* head dims past the last multiple of 8 */
    for (int64_t d = dim / 8 * 8; d < dim; d++) {
        for (int64_t s = 0; s < slots; s++) {
            int64_t key;
            if (s < US) {
                const int r = (int)(s / UC), col = (int)(s % UC);
                if (r < u.r_lo || r >= u.r_hi || col < u.c_lo || col >= u.c_hi) continue;
                key = union_token(&u, r, col);
            } else {
                key = p->stencil_keys[s - US];
            }
            float ak = 0.0f, av = 0.0f;
            for (int l = 0; l < LANES; l++) {
                ak += grad_weights[s * LANES + l] * rows_for_keys[l][d];
                av += prob_weights[s * LANES + l] * go_for_keys[l][d];
            }
            grad_k[key * dim + d] += ak;
            grad_v[key * dim + d] += av;
        }
    }
}

/* A listed row that attends every token, on row-major K and V: its dQ
 * (written) and its share of every key's dK and dV (added). */
INLINE void backward_full_row(const window_ctx *c, window_work *w, int64_t b, int64_t h, int64_t i,
                              float *grad_q, float *grad_k, float *grad_v)
{
    const sa_attention_params *p = c->p;
    const int64_t W = c->width, dim = c->dim, N = p->num_tokens, bh = b * p->heads + h;
    const float row_lse = ((const float *)p->lse)[bh * N + i];
    const float row_delta = ((const float *)p->delta)[bh * N + i];
    float *dq = grad_q + i * dim;
    memset(dq, 0, (size_t)dim * sizeof(float));
    if (row_lse == -INFINITY) return;
    const float *kb = (const float *)p->k + b * p->k_stride[0] + h * p->k_stride[1];
    const float *vb = (const float *)p->v + b * p->v_stride[0] + h * p->v_stride[1];
    const int64_t ks = p->k_stride[2], vs = p->v_stride[2];
    const float *q = sa_row_of(p->q, p->q_stride, b, h, i);
    const float *go = sa_row_of(p->grad_out, p->grad_out_stride, b, h, i);
    float *scores = w->full, *grads = w->full_grads;
    row_dots_all(q, kb, ks, dim, N, scores);
    row_dots_all(go, vb, vs, dim, N, grads);
    const uint32_t query_key =
        c->threshold ? sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), i) : 0u;
    const int64_t iy = i / W, ix = i % W;
    const v8 zero = SPLAT(0.0f);
    for (int64_t j0 = 0; j0 < N; j0 += 8) {
        const int n = N - j0 < 8 ? (int)(N - j0) : 8;
        v8 shifted = SPLAT(-INFINITY), dp = zero;
        for (int k = 0; k < n; k++) {
            const int64_t j = j0 + k;
            const float score = scores[j] * c->scale + sa_bias_of(p, h, iy - j / W, ix - j % W);
            shifted[k] = sa_key_usable(p, b, j) ? score - row_lse : -INFINITY;
            dp[k] = grads[j];
        }
        const v8 prob = exp_v8(shifted);
        v8 keep = SPLAT(c->keep_scale);
        if (c->threshold > 0)
            keep = SELECT(sa_keep_lanes(c->threshold, (u8v){0} + query_key, (int32_t)j0, 1), keep, zero);
        const v8 score_grad = prob * (dp * keep - row_delta);
        const v8 grad = score_grad * c->scale, weight = prob * keep;
        for (int k = 0; k < n; k++) {
            grads[j0 + k] = grad[k];
            scores[j0 + k] = weight[k];
        }
        if (p->grad_bias_rows != NULL) {
            float *cells = p->grad_bias_rows + bh * c->bias_cells;
            for (int k = 0; k < n; k++) {
                const int64_t j = j0 + k;
                cells[sa_bias_cell(p, iy - j / W, ix - j % W)] += score_grad[k];
            }
        }
    }
    /* dQ accumulates in registers; each key's dK and dV row takes one update */
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 32) {
        const int vectors = dim - d0 >= 32 ? 4 : (int)((dim - d0) / 8);
        v8 acc[4] = {zero, zero, zero, zero}, qv[4], gov[4];
        for (int t = 0; t < vectors; t++) {
            qv[t] = LOADU(q + d0 + 8 * t);
            gov[t] = LOADU(go + d0 + 8 * t);
        }
        for (int64_t j = 0; j < N; j++) {
            const float gs = grads[j], weight = scores[j];
            const float *k = kb + j * ks + d0;
            float *dk = grad_k + j * dim + d0, *dv = grad_v + j * dim + d0;
            for (int t = 0; t < vectors; t++) {
                acc[t] += gs * LOADU(k + 8 * t);
                STOREU(dk + 8 * t, LOADU(dk + 8 * t) + gs * qv[t]);
                STOREU(dv + 8 * t, LOADU(dv + 8 * t) + weight * gov[t]);
            }
        }
        for (int t = 0; t < vectors; t++) STOREU(dq + d0 + 8 * t, acc[t]);
        if (vectors < 4) {
            d0 += 8 * vectors;
            break;
        }
    }
    for (; d0 < dim; d0++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < N; j++) {
            acc += grads[j] * kb[j * ks + d0];
            grad_k[j * dim + d0] += grads[j] * q[d0];
            grad_v[j * dim + d0] += scores[j] * go[d0];
        }
        dq[d0] = acc;
    }
}

/* Union slots' summed dS (of blocks whose union is moved by (ay, ax)) into
 * one (batch, head)'s bias cells, lane by lane. */
static void flush_bias_sums(const window_ctx *c, const v8 *sums, int64_t ay, int64_t ax, float *cells)
{
    for (int s = 0; s < c->union_slots; s++)
        for (int l = 0; l < LANES; l++) {
            int64_t dy, dx;
            lane_to_slot(c, s, l, &dy, &dx);
            cells[sa_bias_cell(c->p, (dy - ay) * c->box.step_y, (dx - ax) * c->box.step_x)] += sums[s][l];
        }
}

static void flush_slot_bias_grads(const window_ctx *c, window_work *w, float *cells)
{
    flush_bias_sums(c, w->slot_bias_grads, 0, 0, cells);
    if (w->anchor_used == NULL) return;
    for (int64_t a = 0; a < (int64_t)c->shift_rows * c->shift_cols; a++) {
        if (!w->anchor_used[a]) continue;
        flush_bias_sums(c, w->anchor_bias_grads + a * c->union_slots, a / c->shift_cols + c->shift_lo_y,
                        a % c->shift_cols + c->shift_lo_x, cells);
        w->anchor_used[a] = 0;
    }
}

WINDOW_CLONES
static void backward_items(void *opaque, int64_t first, int64_t last)
{
    (void)first;
    (void)last;
    window_ctx *c = opaque;
    const sa_attention_params *p = c->p;
    const int64_t dim = c->dim, n = p->num_tokens;
    window_work w;
    if (work_alloc(&w, c, 1) < 0) {
        work_free(&w);
        atomic_store(&c->failed, 1);
        return;
    }
    for (;;) {
        const int64_t bh = atomic_fetch_add(&c->next_item, 1);
        if (bh >= p->batch * p->heads) break;
        const int64_t h = bh % p->heads, b = bh / p->heads;
        float *grad_q = (float *)p->grad_q + bh * n * dim;
        float *grad_k = (float *)p->grad_k + bh * n * dim;
        float *grad_v = (float *)p->grad_v + bh * n * dim;
        memset(grad_k, 0, (size_t)(n * dim) * sizeof(float));
        memset(grad_v, 0, (size_t)(n * dim) * sizeof(float));
        float *bias_cells = p->grad_bias_rows != NULL ? p->grad_bias_rows + bh * c->bias_cells : NULL;
        if (bias_cells != NULL) {
            memset(bias_cells, 0, (size_t)c->bias_cells * sizeof(float));
            memset(w.slot_bias_grads, 0, (size_t)c->union_slots * sizeof(v8));
        }
        if (p->head_active != NULL && !p->head_active[h]) {
            memset(grad_q, 0, (size_t)(n * dim) * sizeof(float));
            continue;
        }
        if (p->bias_table != NULL) w.slot_bias = bias_table_for(c, &w, h, 0, 0);
        for (int64_t cls = 0; cls < c->classes; cls++) {
            const lattice_view view = class_view(c, cls);
            for (int64_t y0 = 0; y0 < view.height; y0 += BLOCK_ROWS)
                for (int64_t x0 = 0; x0 < view.width; x0 += BLOCK_COLS)
                    backward_block(c, &w, b, h, &view, y0, x0, grad_q, grad_k, grad_v);
        }
        if (bias_cells != NULL) flush_slot_bias_grads(c, &w, bias_cells);
        for (int64_t t = 0; t < p->stencil_num_rows; t++)
            backward_full_row(c, &w, b, h, p->stencil_rows[t], grad_q, grad_k, grad_v);
    }
    work_free(&w);
}

/* ---- entry point ------------------------------------------------------------ */

static void ctx_free(window_ctx *c)
{
    free(c->slot_lanes);
    free(c->is_offset);
    free(c->is_listed);
    free(c->listed_full);
    free(c->full_parts);
}

static int ctx_init(window_ctx *c, const sa_attention_params *p, char *err, size_t len)
{
    memset(c, 0, sizeof(*c));
    c->p = p;
    c->height = p->height;
    c->width = p->width;
    c->dim = p->head_dim;
    c->box = box_of(p);
    c->clamped = p->stencil_clamped;
    c->stride_y = stride_or_one(p->stencil_stride_y);
    c->stride_x = stride_or_one(p->stencil_stride_x);
    c->shift_rows = c->shift_cols = 1;
    if (c->clamped) {
        /* anchor shifts: down to 1 - box - lo at the far edge, up to -lo at
         * the near one; a stride adds its leader's distance from the
         * block's first row, from stride / 2 - (stride - 1) to stride / 2 */
        const int down_y = c->stride_y / 2 - (c->stride_y - 1), up_y = c->stride_y / 2;
        const int down_x = c->stride_x / 2 - (c->stride_x - 1), up_x = c->stride_x / 2;
        c->shift_lo_y = (1 - c->box.box_h - c->box.dy_lo < 0 ? 1 - c->box.box_h - c->box.dy_lo : 0) + down_y;
        c->shift_lo_x = (1 - c->box.box_w - c->box.dx_lo < 0 ? 1 - c->box.box_w - c->box.dx_lo : 0) + down_x;
        c->shift_rows = (-c->box.dy_lo > 0 ? -c->box.dy_lo : 0) + up_y - c->shift_lo_y + 1;
        c->shift_cols = (-c->box.dx_lo > 0 ? -c->box.dx_lo : 0) + up_x - c->shift_lo_x + 1;
    }
    c->union_rows = BLOCK_ROWS - 1 + c->box.box_h;
    c->union_cols = BLOCK_COLS - 1 + c->box.box_w;
    c->union_slots = c->union_rows * c->union_cols;
    const int64_t table_bytes = (int64_t)c->shift_rows * c->shift_cols * c->union_slots * (int64_t)sizeof(v8);
    c->table_heads = p->heads * table_bytes <= MAX_BIAS_TABLE_BYTES ? p->heads : 1;
    c->max_slots = c->union_slots + p->stencil_num_keys + 4; /* + 4: the softmax reads whole groups */
    c->scale = (float)p->scale;
    c->keep_scale = p->dropout_p > 0 ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    c->threshold = sa_dropout_threshold(p->dropout_p);
    c->wide = sa_has_32_vector_registers();
    const int64_t H = c->height, W = c->width;
    c->slot_lanes = alloc64((size_t)c->union_slots * sizeof(i8v));
    c->is_offset = calloc((size_t)((2 * H - 1) * (2 * W - 1)), 1);
    c->is_listed = calloc((size_t)p->num_tokens, 1);
    c->listed_full = calloc((size_t)(p->stencil_num_rows + 1), 1);
    if (!c->slot_lanes || !c->is_offset || !c->is_listed || !c->listed_full) {
        snprintf(err, len, "could not run the window CPU kernel (out of memory)");
        return SA_ERR_MEMORY;
    }
    for (int64_t o = 0; o < p->stencil_num_offsets; o++)
        c->is_offset[(p->stencil_offsets[2 * o] + H - 1) * (2 * W - 1) + p->stencil_offsets[2 * o + 1] + W - 1] = 1;
    for (int s = 0; s < c->union_slots; s++) {
        for (int l = 0; l < LANES; l++) {
            /* key minus query: the offset that would reach the slot from lane l (on the grid, not in steps) */
            int64_t dy, dx;
            lane_to_slot(c, s, l, &dy, &dx);
            dy = -dy * c->box.step_y;
            dx = -dx * c->box.step_x;
            const int inside = dy > -H && dy < H && dx > -W && dx < W;
            c->slot_lanes[s][l] = inside && c->is_offset[(dy + H - 1) * (2 * W - 1) + dx + W - 1] ? -1 : 0;
        }
    }
    for (int64_t t = 0; t < p->stencil_num_rows; t++) {
        c->is_listed[p->stencil_rows[t]] = 1;
        c->listed_full[t] = (uint8_t)sa_row_attends_every_token(p, p->stencil_rows[t]);
        c->any_full |= c->listed_full[t];
    }
    c->classes = (int64_t)c->box.step_y * c->box.step_x;
    c->bands = ((H + c->box.step_y - 1) / c->box.step_y + BAND_ROWS - 1) / BAND_ROWS;
    c->band_items = p->batch * p->heads * c->classes * c->bands;
    c->bias_cells = (2 * p->max_relative + 1) * (2 * p->max_relative + 1);
    return SA_OK;
}

int sa_cpu_forward_window(const sa_attention_params *p, int num_threads, int32_t *rows_left, int64_t *num_left,
                          char *err, size_t len)
{
    if (!sa_cpu_window_fits(p)) {
        snprintf(err, len, "stencil: its offsets do not suit the window CPU kernel");
        return SA_ERR_UNSUPPORTED;
    }
    window_ctx c;
    int status = ctx_init(&c, p, err, len);
    if (status == SA_OK && c.any_full) {
        const size_t parts = (size_t)(p->batch * p->heads * p->stencil_num_rows * c.bands);
        c.full_parts = malloc(parts * (size_t)full_part_floats(&c) * sizeof(float));
        if (c.full_parts == NULL) {
            snprintf(err, len, "could not run the window CPU kernel (out of memory)");
            status = SA_ERR_MEMORY;
        }
    }
    if (status == SA_OK)
        status = sa_run_workers(c.band_items, num_threads, forward_items, &c, &c.failed, "window CPU kernel", err, len);
    if (status == SA_OK && c.any_full) finish_full_rows(&c);
    if (status == SA_OK && rows_left != NULL) sa_rows_not_full(p, c.listed_full, rows_left, num_left);
    if (status == SA_OK) atomic_fetch_add(&window_forwards, 1);
    ctx_free(&c);
    return status;
}

int sa_cpu_backward_window(const sa_attention_params *p, int num_threads, char *err, size_t len)
{
    if (!sa_cpu_window_fits(p) || p->grad_scores != NULL) {
        snprintf(err, len, "stencil: its offsets or the bias gradient do not suit the window CPU backward");
        return SA_ERR_UNSUPPORTED;
    }
    window_ctx c;
    int status = ctx_init(&c, p, err, len);
    int all_full = 1;
    for (int64_t t = 0; status == SA_OK && t < p->stencil_num_rows; t++) all_full &= c.listed_full[t];
    if (status == SA_OK && !all_full) {
        /* a listed row with only some keys needs the row kernel's backward, which the strips run */
        ctx_free(&c);
        if (p->grad_bias_rows != NULL) {
            snprintf(err, len, "grad_bias_rows: the window CPU backward takes listed rows that attend "
                               "every token only");
            return SA_ERR_UNSUPPORTED;
        }
        return sa_cpu_backward_stencil(p, num_threads, err, len);
    }
    /* one (batch, head) per item: its dK and dV have one writer */
    if (status == SA_OK)
        status = sa_run_workers(p->batch * p->heads, num_threads, backward_items, &c, &c.failed,
                                "window CPU backward", err, len);
    if (status == SA_OK) atomic_fetch_add(&window_backwards, 1);
    ctx_free(&c);
    return status;
}
