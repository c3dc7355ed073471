/* CPU forward over a tile plan (sparse_attention/_tiles.py), float32.
 *
 * The row-by-row kernel of attention_cpu_body.h loads a key row and a value row
 * for every pair; neighbouring queries of a window, block or grid row load the
 * same rows again and again. Here one work item is one tile of up to 64
 * queries of one (batch, head): the tile's queries are packed once, and for
 * every chunk of 64 keys the key rows are packed transposed and the value rows
 * packed as they are, so that the 64 x 64 scores and the probability x value
 * product are small dense matrix products, computed by register-blocked
 * micro-kernels over 8-wide vectors. The chunk's bit masks then drop the pairs
 * outside the layout before the streaming softmax. A pass with merge_previous
 * adds its pairs to what an earlier pass wrote, through the log-sum-exp, as
 * the CUDA kernel does. */
#include "attention_cpu_tiled.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dropout_hash.h"
#include "dropout_lanes.h"
#include "fast_expf.h"
#include "simd8.h"
#include "threads.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SA_NO_CLONES)
#include <immintrin.h> /* the bias gather's AVX2 path, chosen at run time */
#define TILED_BIAS_GATHER 1
#endif

#define TILE 64


#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SA_NO_CLONES)
#define TILED_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TILED_CLONES
#endif

/* Per-thread panels, 32-byte aligned; dim_pad is head_dim rounded up to 8. */
typedef struct {
    float *query;   /* TILE x dim_pad */
    float *key_t;   /* dim_pad x TILE: keys transposed */
    float *value;   /* TILE x dim_pad */
    float *out;     /* TILE x dim_pad: the running numerators */
    float *scores;  /* TILE x TILE, then the weights */
} panels;

static int panels_alloc(panels *s, int64_t dim_pad)
{
    const size_t row_block = (size_t)TILE * (size_t)dim_pad * sizeof(float);
    s->query = aligned_alloc(32, row_block);
    s->key_t = aligned_alloc(32, row_block);
    s->value = aligned_alloc(32, row_block);
    s->out = aligned_alloc(32, row_block);
    s->scores = aligned_alloc(32, (size_t)TILE * TILE * sizeof(float));
    return s->query && s->key_t && s->value && s->out && s->scores ? 0 : -1;
}

static void panels_free(panels *s)
{
    free(s->query);
    free(s->key_t);
    free(s->value);
    free(s->out);
    free(s->scores);
}

static inline const float *row_of(const float *base, const int64_t *stride, int64_t b, int64_t h,
                                  int64_t i)
{
    return base + b * stride[0] + h * stride[1] + i * stride[2];
}

/* scores[r][c] = sum_d query_rows[r][d] * key_t[d][c] for rows r0 .. r0 + R - 1,
 * 16 columns per step, then 8. R is a constant where this is inlined: R x 2
 * accumulators stay in registers (six rows keep 12 FMA chains in flight, more
 * than the 8 that cover the FMA latency on two pipes). The 8-column step
 * serves the last keys of a lattice class (17 of them would take 32 columns). */
SA_INLINE void scores_rows(const float *const *query_rows, const float *restrict key_t,
                           float *restrict scores, int64_t dim_pad, int r0, const int R, int cols,
                           v8 *restrict row_tops)
{
    v8 top[6];
    for (int r = 0; r < R; r++) top[r] = SPLAT(-INFINITY);
    int c0 = 0;
    for (; c0 + 16 <= cols; c0 += 16) {
        v8 acc[6][2] = {{{0}}};
        for (int64_t d = 0; d < dim_pad; d++) {
            const v8 k0 = *(const v8 *)&key_t[d * TILE + c0];
            const v8 k1 = *(const v8 *)&key_t[d * TILE + c0 + 8];
            for (int r = 0; r < R; r++) {
                const float q = query_rows[r0 + r][d];
                acc[r][0] += k0 * q;
                acc[r][1] += k1 * q;
            }
        }
        for (int r = 0; r < R; r++) {
            *(v8 *)&scores[(r0 + r) * TILE + c0] = acc[r][0];
            *(v8 *)&scores[(r0 + r) * TILE + c0 + 8] = acc[r][1];
            if (row_tops) top[r] = lanes_max(lanes_max(top[r], acc[r][0]), acc[r][1]);
        }
    }
    if (c0 < cols) {
        v8 acc[6] = {{0}};
        for (int64_t d = 0; d < dim_pad; d++) {
            const v8 k0 = *(const v8 *)&key_t[d * TILE + c0];
            for (int r = 0; r < R; r++) acc[r] += k0 * query_rows[r0 + r][d];
        }
        for (int r = 0; r < R; r++) {
            *(v8 *)&scores[(r0 + r) * TILE + c0] = acc[r];
            if (row_tops) top[r] = lanes_max(top[r], acc[r]);
        }
    }
    if (row_tops)
        for (int r = 0; r < R; r++) row_tops[r0 + r] = top[r];
}

/* CALL with ROWS a constant equal to count (1 to 5; 0 does nothing), so that
 * the micro-kernel it calls is compiled for that many rows. */
#define WITH_CONSTANT_ROWS(count, CALL)                       \
    do {                                                      \
        switch (count) {                                      \
        case 5: { enum { ROWS = 5 }; CALL; } break;           \
        case 4: { enum { ROWS = 4 }; CALL; } break;           \
        case 3: { enum { ROWS = 3 }; CALL; } break;           \
        case 2: { enum { ROWS = 2 }; CALL; } break;           \
        case 1: { enum { ROWS = 1 }; CALL; } break;           \
        default: break;                                       \
        }                                                     \
    } while (0)

/* The scores of the first rows queries of a tile against the first cols keys
 * of a chunk (cols a multiple of 8): blocks of six rows, then the rest.
 * Partial tiles (a residue class of a lattice, the last tile of a grid)
 * compute only what they hold. With row_tops (else NULL), row_tops[r] gets
 * the lane-wise maximum of row r's scores, taken from the accumulators: a
 * pass over the stored rows and a horizontal maximum per row were 7% of the
 * RANDOM forward in perf. */
SA_INLINE void scores_kernel(const float *const *query_rows, const float *restrict key_t,
                             float *restrict scores, int64_t dim_pad, int rows, int cols, v8 *restrict row_tops)
{
    int r0 = 0;
    for (; r0 + 6 <= rows; r0 += 6) scores_rows(query_rows, key_t, scores, dim_pad, r0, 6, cols, row_tops);
    WITH_CONSTANT_ROWS(rows - r0, scores_rows(query_rows, key_t, scores, dim_pad, r0, ROWS, cols, row_tops));
}

/* maxima[r] = the largest lane of row_tops[r] for r < rows, eight rows at a
 * time through a transpose instead of a chain of shuffles per row. */
SA_INLINE void rows_maxima(const v8 *row_tops, int rows, float *maxima)
{
    for (int r0 = 0; r0 < rows; r0 += 8) {
        v8 block[8];
        for (int i = 0; i < 8; i++) block[i] = r0 + i < rows ? row_tops[r0 + i] : SPLAT(-INFINITY);
        transpose8(block);
        v8 top = block[0];
        for (int i = 1; i < 8; i++) top = lanes_max(top, block[i]);
        STOREU(maxima + r0, top);
    }
}

/* out[r][d] += sum_c weights[r][c] * value_rows[c][d] for rows r0 .. r0 + R - 1
 * (R constant where inlined, as in scores_rows), 32 (where wide), 16, then 8
 * columns of d per step. 32 columns keep 24 accumulators, which only the
 * x86-64-v4 clone's 32 registers hold: there a weight broadcast feeds four
 * FMAs instead of two (RANDOM forward 0.97x, AXIAL 0.97x); with 16 registers
 * they spill (1.15-1.27x). */
SA_INLINE void weighted_values_rows(const float *restrict weights, const float *const *value_rows,
                                    float *restrict out, int64_t dim_pad, int r0, const int R, int cols,
                                    int wide)
{
    int64_t d0 = 0;
    for (; wide && d0 + 32 <= dim_pad; d0 += 32) {
        v8 acc[6][4];
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 4; i++) acc[r][i] = *(const v8 *)&out[(r0 + r) * dim_pad + d0 + 8 * i];
        for (int c = 0; c < cols; c++) {
            v8 value[4];
            for (int i = 0; i < 4; i++) value[i] = LOADU(value_rows[c] + d0 + 8 * i);
            for (int r = 0; r < R; r++) {
                const float w = weights[(r0 + r) * TILE + c];
                for (int i = 0; i < 4; i++) acc[r][i] += value[i] * w;
            }
        }
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 4; i++) *(v8 *)&out[(r0 + r) * dim_pad + d0 + 8 * i] = acc[r][i];
    }
    for (; d0 + 16 <= dim_pad; d0 += 16) {
        v8 acc[6][2];
        for (int r = 0; r < R; r++) {
            acc[r][0] = *(const v8 *)&out[(r0 + r) * dim_pad + d0];
            acc[r][1] = *(const v8 *)&out[(r0 + r) * dim_pad + d0 + 8];
        }
        for (int c = 0; c < cols; c++) {
            const v8 v0 = LOADU(value_rows[c] + d0), v1 = LOADU(value_rows[c] + d0 + 8);
            for (int r = 0; r < R; r++) {
                const float w = weights[(r0 + r) * TILE + c];
                acc[r][0] += v0 * w;
                acc[r][1] += v1 * w;
            }
        }
        for (int r = 0; r < R; r++) {
            *(v8 *)&out[(r0 + r) * dim_pad + d0] = acc[r][0];
            *(v8 *)&out[(r0 + r) * dim_pad + d0 + 8] = acc[r][1];
        }
    }
    for (; d0 < dim_pad; d0 += 8) {
        v8 acc[6];
        for (int r = 0; r < R; r++) acc[r] = *(const v8 *)&out[(r0 + r) * dim_pad + d0];
        for (int c = 0; c < cols; c++) {
            const v8 v0 = LOADU(value_rows[c] + d0);
            for (int r = 0; r < R; r++) acc[r] += v0 * weights[(r0 + r) * TILE + c];
        }
        for (int r = 0; r < R; r++) *(v8 *)&out[(r0 + r) * dim_pad + d0] = acc[r];
    }
}

/* out[r][d] += sum_c weights[r][c] * value_rows[c][d] for r < rows and c < cols
 * (any counts up to 64), skipping blocks of rows without any weight. */
SA_INLINE void weighted_values_kernel(const float *restrict weights, const float *const *value_rows,
                                      float *restrict out, int64_t dim_pad, const int *restrict live_rows,
                                      int rows, int cols, int wide)
{
    int r0 = 0;
    for (; r0 + 6 <= rows; r0 += 6) {
        int any = 0;
        for (int r = 0; r < 6; r++) any |= live_rows[r0 + r];
        if (any) weighted_values_rows(weights, value_rows, out, dim_pad, r0, 6, cols, wide);
    }
    int any = 0;
    for (int r = r0; r < rows; r++) any |= live_rows[r];
    if (any) WITH_CONSTANT_ROWS(rows - r0, weighted_values_rows(weights, value_rows, out, dim_pad, r0, ROWS, cols, wide));
}

/* 1 + the last slot of ids (64 of them) that holds a token in [0, n); 0 if none. */
static inline int slots_used(const int32_t *ids, int64_t n)
{
    int used = TILE;
    while (used > 0 && (ids[used - 1] < 0 || ids[used - 1] >= n)) used--;
    return used;
}

/* A chunk whose first 32 queries attend only its first 32 keys and the
 * rest only the rest: AXIAL's passes on a grid 32 wide, where a 64-query tile
 * spans two image rows (or columns) and each attends its own. Two 32 x 32
 * blocks then hold every pair, and the products skip the other half. */
static inline int chunk_in_halves(const uint64_t *masks, int rows, int used)
{
    if (rows <= 32 || used <= 32) return 0;
    uint64_t stray = 0;
    for (int r = 0; r < 32; r++) stray |= masks[r] >> 32;
    for (int r = 32; r < rows; r++) stray |= masks[r] & 0xffffffffu;
    return stray == 0;
}

/* The two off-diagonal 32 x 32 blocks of a halved chunk's scores: -inf, so
 * that every later step reads them as pairs outside the layout. */
static inline void scores_off_halves(float *scores, int rows)
{
    const v8 neg_inf = SPLAT(-INFINITY);
    for (int r = 0; r < rows; r++) {
        float *from = scores + r * TILE + (r < 32 ? 32 : 0);
        for (int c = 0; c < 32; c += 8) *(v8 *)&from[c] = neg_inf;
    }
}

/* Stands in for a missing row when rows are read in place. */
static const float zero_row[1024] __attribute__((aligned(32)));

/* A row as the micro-kernels read it: where it lies when its length is a
 * whole number of vectors (zero_row for a missing one), else copied into
 * pack and padded with zeros to dim_pad. */
static inline const float *row_for_kernels(const float *row, float *pack, int64_t dim, int64_t dim_pad,
                                           int in_place)
{
    if (in_place) return row ? row : zero_row;
    for (int64_t d = 0; d < dim_pad; d++) pack[d] = row && d < dim ? row[d] : 0.0f;
    return pack;
}

/* The chunks of a tile, clamped to the plan: corrupted offsets read nothing. */
static inline void chunk_range(const int32_t *chunk_ptr, int64_t tile, int64_t num_chunks,
                               int64_t *begin, int64_t *end)
{
    int64_t lo = chunk_ptr[tile], hi = chunk_ptr[tile + 1];
    lo = lo < 0 ? 0 : (lo > num_chunks ? num_chunks : lo);
    hi = hi < lo ? lo : (hi > num_chunks ? num_chunks : hi);
    *begin = lo;
    *end = hi;
}

/* Gathered rows miss the caches; asking for the next chunk's rows while this
 * one is computed hides most of that. Always inlined: GCC finds a plain static
 * helper made only of prefetches free of side effects and deletes the calls
 * (tests/test_build_prefetch.py). */
SA_INLINE void prefetch_row(const float *row, int64_t dim)
{
    for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(row + d, 0, 1);
}

SA_INLINE void prefetch_chunk(const sa_attention_params *p, const int32_t *ids, int64_t b,
                              int64_t h, int with_keys)
{
    for (int c = 0; c < TILE; c++) {
        const int32_t j = ids[c];
        if (j < 0 || j >= p->num_tokens) continue;
        if (with_keys) prefetch_row(row_of(p->k, p->k_stride, b, h, j), p->head_dim);
        prefetch_row(row_of(p->v, p->v_stride, b, h, j), p->head_dim);
    }
}

/* Packed key panels kept across the tiles of a (batch, head). Every tile of
 * RANDOM reads all N / 64 chunks of keys, so without this each chunk is
 * transposed again for every tile (6% of RANDOM's forward). Direct-mapped on
 * the chunk's first key; a slot remembers which (batch, head) and which keys
 * it holds, so a hit is exact. */
typedef struct {
    int slots;        /* 0: no cache */
    float *panels;    /* slots x dim_pad x TILE */
    int32_t *keys;    /* slots x TILE: the chunk's key ids as the plan gives them */
    int64_t *owner;   /* slots: the (batch, head) packed there, -1 for none */
    int *cols;        /* slots */
} panel_cache;

/* Worth it where tiles have many chunks; the panels take at most 1 MB, an L2. */
static void panel_cache_init(panel_cache *cache, const sa_attention_params *p, int64_t dim_pad)
{
    memset(cache, 0, sizeof(*cache));
    if (p->num_chunks < 8 * p->num_tiles) return;
    const size_t panel_bytes = (size_t)dim_pad * TILE * sizeof(float);
    int slots = (int)((1u << 20) / panel_bytes);
    slots = slots > 64 ? 64 : slots;
    if (slots < 2) return;
    cache->panels = aligned_alloc(32, (size_t)slots * panel_bytes);
    cache->keys = malloc((size_t)slots * TILE * sizeof(int32_t));
    cache->owner = malloc((size_t)slots * sizeof(int64_t));
    cache->cols = malloc((size_t)slots * sizeof(int));
    if (!cache->panels || !cache->keys || !cache->owner || !cache->cols) {
        free(cache->panels);
        free(cache->keys);
        free(cache->owner);
        free(cache->cols);
        memset(cache, 0, sizeof(*cache));
        return; /* packing every chunk still works */
    }
    cache->slots = slots;
    for (int i = 0; i < slots; i++) cache->owner[i] = -1;
}

static void panel_cache_free(panel_cache *cache)
{
    free(cache->panels);
    free(cache->keys);
    free(cache->owner);
    free(cache->cols);
}

/* The slot a chunk maps to, and whether it holds that chunk's keys packed. */
static int panel_cache_slot(const panel_cache *cache, const int32_t *chunk_keys)
{
    return (int)(((uint32_t)chunk_keys[0] / TILE) % (uint32_t)cache->slots);
}

static int panel_cache_holds(const panel_cache *cache, int slot, int64_t bh, const int32_t *chunk_keys, int cols)
{
    return cache->owner[slot] == bh && cache->cols[slot] == cols &&
           memcmp(cache->keys + (size_t)slot * TILE, chunk_keys, (size_t)cols * sizeof(int32_t)) == 0;
}

/* The panel holding these keys, without claiming a slot; NULL if none. */
static const float *panel_cache_peek(const panel_cache *cache, int64_t bh, const int32_t *chunk_keys,
                                     int64_t n, int64_t dim_pad)
{
    const int cols = (slots_used(chunk_keys, n) + 15) / 16 * 16;
    const int slot = panel_cache_slot(cache, chunk_keys);
    if (cols == 0 || !panel_cache_holds(cache, slot, bh, chunk_keys, cols)) return NULL;
    return cache->panels + (size_t)slot * (size_t)dim_pad * TILE;
}

/* The slot's panel for this chunk in *panel; 1 if it already holds the chunk's
 * keys packed, else 0 and the slot now belongs to the chunk (the caller packs). */
static int panel_cache_find(panel_cache *cache, int64_t bh, const int32_t *chunk_keys, int cols,
                            int64_t dim_pad, float **panel)
{
    const int slot = panel_cache_slot(cache, chunk_keys);
    *panel = cache->panels + (size_t)slot * (size_t)dim_pad * TILE;
    if (panel_cache_holds(cache, slot, bh, chunk_keys, cols)) return 1;
    cache->owner[slot] = bh;
    cache->cols[slot] = cols;
    memcpy(cache->keys + (size_t)slot * TILE, chunk_keys, (size_t)cols * sizeof(int32_t));
    return 0;
}

#ifdef TILED_BIAS_GATHER
/* fill_bias_row eight keys a step: the cells in registers, the bias by one
 * vgatherdps (cols a multiple of 8, bias_row 32-byte aligned). A pair's
 * bias took three scalar memory operations, about as long as its share of
 * Q x K^T and P x V at D = 32: 13.6% of RANDOM's forward with a bias. */
__attribute__((target("avx2"))) static void fill_bias_row_avx2(const float *table, int32_t qy, int32_t qx,
                                                               const int32_t *key_y, const int32_t *key_x,
                                                               int cols, int32_t max_rel, float *bias_row)
{
    const __m256i zero = _mm256_setzero_si256(), last = _mm256_set1_epi32(2 * max_rel);
    const __m256i side = _mm256_set1_epi32(2 * max_rel + 1);
    const __m256i query_y = _mm256_set1_epi32(qy + max_rel), query_x = _mm256_set1_epi32(qx + max_rel);
    for (int c = 0; c < cols; c += 8) {
        /* clip(q - k, -M, M) + M = clip(q + M - k, 0, 2M) */
        __m256i dy = _mm256_sub_epi32(query_y, _mm256_loadu_si256((const __m256i *)(key_y + c)));
        __m256i dx = _mm256_sub_epi32(query_x, _mm256_loadu_si256((const __m256i *)(key_x + c)));
        dy = _mm256_min_epi32(_mm256_max_epi32(dy, zero), last);
        dx = _mm256_min_epi32(_mm256_max_epi32(dx, zero), last);
        const __m256i cell = _mm256_add_epi32(_mm256_mullo_epi32(dy, side), dx);
        _mm256_store_ps(bias_row + c, _mm256_i32gather_ps(table, cell, 4));
    }
}
#endif

/* Whether fill_bias_row may take its AVX2 path on this CPU (not where
 * SPARSE_ATTENTION_NARROW_KERNELS asks for the portable paths, so that the
 * tests reach the scalar one too). */
static int bias_gather_supported(void)
{
#ifdef TILED_BIAS_GATHER
    return getenv("SPARSE_ATTENTION_NARROW_KERNELS") == NULL && __builtin_cpu_supports("avx2");
#else
    return 0;
#endif
}

/* All ones in the lanes of vector g whose bit is set in a chunk's mask word. */
SA_INLINE i8v lanes_of(uint64_t word, int g)
{
    const i8v lane_bit = {1, 2, 4, 8, 16, 32, 64, 128};
    return (((i8v){0} + (int32_t)((word >> (8 * g)) & 0xff)) & lane_bit) != 0;
}

/* What a tiled kernel call shares across its threads, worked out once. */
typedef struct {
    const sa_attention_params *p;
    int64_t dim_pad;          /* head_dim rounded up to 8 */
    float scale, keep_scale;  /* the score scale; 1 / (1 - dropout_p) */
    uint32_t threshold;       /* dropout threshold, 0 for none */
    /* backward only: the whole plan */
    const int64_t (*passes)[6];
    int64_t num_passes;
    const int32_t *base;
    int failed; /* set when a thread could not get its panels */
    int wide_values; /* P x V 32 columns of d a step (see weighted_values_rows) */
    int bias_gather; /* fill_bias_row's AVX2 path */
} tiled_ctx;


static tiled_ctx tiled_ctx_for(const sa_attention_params *p)
{
    tiled_ctx ctx = {0};
    ctx.p = p;
    ctx.dim_pad = (p->head_dim + 7) / 8 * 8;
    ctx.scale = (float)p->scale;
    ctx.keep_scale = p->dropout_p > 0 ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    ctx.threshold = sa_dropout_threshold(p->dropout_p);
    ctx.wide_values = sa_has_32_vector_registers();
    ctx.bias_gather = bias_gather_supported();
    return ctx;
}

/* The softmax state of one query row of the tile. The sum stays in eight
 * lanes until the tile ends (a horizontal sum per row and chunk cost 3% of a
 * BLOCK forward). */
typedef struct {
    v8 sum;
    float max, sq, shifted;
    int nan;
} row_state;

/* The largest of count cells, NaN cells passed over (-inf if all are NaN). */
static float table_max(const float *cells, int64_t count)
{
    float top = -INFINITY;
    for (int64_t i = 0; i < count; i++) top = cells[i] > top ? cells[i] : top;
    return top;
}

/* An offset clipped to [-max_rel, max_rel], as the bias table's border
 * cells hold every offset beyond them. */
SA_INLINE int64_t clip_offset(int64_t d, int64_t max_rel)
{
    return d < -max_rel ? -max_rel : (d > max_rel ? max_rel : d);
}

/* A head's bias table spread over every offset of the grid, the border cells
 * repeated: spread[(dy + H - 1) * (2W - 1) + dx + W - 1] is the cell of
 * (clip(dy), clip(dx)), so that the biases of a run of queries along an image
 * row against one key are a contiguous piece of one spread row. Up to this
 * many floats (4 MB) per thread; larger grids keep the gathers. */
#define MAX_SPREAD_CELLS (1 << 20)

static int64_t spread_cells(int64_t height, int64_t width)
{
    return (2 * height - 1) * (2 * width - 1) + 8; /* + 8: a run's last vector may read past the end */
}

static void spread_table(const float *table, int64_t max_rel, int64_t height, int64_t width, float *spread)
{
    const int64_t side = 2 * max_rel + 1, spread_w = 2 * width - 1;
    for (int64_t dy = 1 - height; dy < height; dy++) {
        const float *cells = table + (clip_offset(dy, max_rel) + max_rel) * side;
        float *row = spread + (dy + height - 1) * spread_w;
        for (int64_t dx = 1 - width; dx < width; dx++) row[dx + width - 1] = cells[clip_offset(dx, max_rel) + max_rel];
    }
    for (int i = 0; i < 8; i++) spread[(2 * height - 1) * spread_w + i] = 0.0f;
}

/* Whether each eight of the tile's first rows queries are a run along an
 * image row (query 8 g + j at (run_y[g], run_x[g] + j)): the rows of a tile
 * of 8 x 8 or 1 x 64 tokens. */
static int eight_runs_of(const int32_t *queries, int rows, int64_t width, int32_t *run_y, int32_t *run_x)
{
    for (int g = 0; 8 * g < rows; g++) {
        const int32_t first = queries[8 * g];
        const int count = rows - 8 * g < 8 ? rows - 8 * g : 8;
        if (first < 0) return 0;
        for (int j = 1; j < count; j++)
            if (queries[8 * g + j] != first + j) return 0;
        run_y[g] = (int32_t)(first / width);
        run_x[g] = (int32_t)(first % width);
        if (run_x[g] + count > width) return 0;
    }
    return 1;
}

/* bias_tile[r][c] (rows of TILE floats) for a tile of eight-query runs and
 * cols keys (a multiple of 8): a run's biases against a key are one load
 * from the spread table, and eight keys' vectors are transposed into the
 * run's eight rows. About a third of the operations of a gather per eight
 * pairs. */
SA_INLINE void fill_bias_tile(const float *spread, int64_t height, int64_t width, const int32_t *run_y,
                              const int32_t *run_x, int rows, const int32_t *key_y, const int32_t *key_x, int cols,
                              float *bias_tile)
{
    const int64_t spread_w = 2 * width - 1;
    for (int r0 = 0; r0 < rows; r0 += 8) {
        const float *run = spread + (run_y[r0 / 8] + height - 1) * spread_w + run_x[r0 / 8] + width - 1;
        for (int c0 = 0; c0 < cols; c0 += 8) {
            v8 block[8];
            for (int i = 0; i < 8; i++) block[i] = LOADU(run - key_y[c0 + i] * spread_w - key_x[c0 + i]);
            transpose8(block);
            for (int j = 0; j < 8; j++) *(v8 *)&bias_tile[(r0 + j) * TILE + c0] = block[j];
        }
    }
}

/* bias_row[c]: the bias of query (qy, qx) and key (key_y[c], key_x[c]). */
SA_INLINE void fill_bias_row(const float *table, int32_t qy, int32_t qx, const int32_t *key_y, const int32_t *key_x,
                             int cols, int32_t max_rel, float *bias_row, int gather)
{
#ifdef TILED_BIAS_GATHER
    if (gather) {
        fill_bias_row_avx2(table, qy, qx, key_y, key_x, cols, max_rel, bias_row);
        return;
    }
#endif
    (void)gather;
    const int64_t side = 2 * (int64_t)max_rel + 1;
    for (int c = 0; c < cols; c++)
        bias_row[c] = table[(clip_offset(qy - key_y[c], max_rel) + max_rel) * side +
                            clip_offset(qx - key_x[c], max_rel) + max_rel];
}

/* A thread's bias rows for the tiles: from the spread table where a tile's
 * queries are runs of eight along image rows, else by fill_bias_row. */
typedef struct {
    float *spread, *tile; /* both NULL where the grid is too large or memory is short */
    int64_t head;         /* whose table spread holds */
    int runs;             /* the current tile's queries are eight-query runs */
    int32_t run_y[TILE / 8], run_x[TILE / 8];
} tile_bias;

static void tile_bias_init(tile_bias *tb, const sa_attention_params *p)
{
    memset(tb, 0, sizeof(*tb));
    tb->head = -1;
    if (p->bias_table == NULL || spread_cells(p->height, p->width) > MAX_SPREAD_CELLS) return;
    tb->spread = aligned_alloc(32, ((size_t)spread_cells(p->height, p->width) * sizeof(float) + 31) / 32 * 32);
    tb->tile = aligned_alloc(32, (size_t)TILE * TILE * sizeof(float));
    if (tb->spread == NULL || tb->tile == NULL) {
        free(tb->spread);
        free(tb->tile);
        tb->spread = tb->tile = NULL;
    }
}

static void tile_bias_free(tile_bias *tb)
{
    free(tb->spread);
    free(tb->tile);
}

/* A new tile of head h (table: the head's bias table, NULL without a bias). */
static void tile_bias_start(tile_bias *tb, const sa_attention_params *p, const float *table, int64_t h,
                            const int32_t *queries, int rows)
{
    tb->runs = table != NULL && tb->spread != NULL && eight_runs_of(queries, rows, p->width, tb->run_y, tb->run_x);
    if (tb->runs && tb->head != h) {
        spread_table(table, p->max_relative, p->height, p->width, tb->spread);
        tb->head = h;
    }
}

/* A new chunk of cols keys (their grid rows and columns in key_y, key_x). */
SA_INLINE void tile_bias_chunk(tile_bias *tb, const sa_attention_params *p, int rows, const int32_t *key_y,
                               const int32_t *key_x, int cols)
{
    if (tb->runs) fill_bias_tile(tb->spread, p->height, p->width, tb->run_y, tb->run_x, rows, key_y, key_x, cols, tb->tile);
}

/* The biases of the chunk's keys for row r (query token `query`), in
 * scratch where they are not in the bias tile. */
SA_INLINE const float *tile_bias_row(const tile_bias *tb, const sa_attention_params *p, const float *table, int r,
                                     int32_t query, const int32_t *key_y, const int32_t *key_x, int cols, int gather,
                                     float *scratch)
{
    if (tb->runs) return tb->tile + r * TILE;
    fill_bias_row(table, (int32_t)(query / p->width), (int32_t)(query % p->width), key_y, key_x, cols,
                  (int32_t)p->max_relative, scratch, gather);
    return scratch;
}

/* A row's running sums of numerators: the plain sums and, with statistics,
 * the sums of squares and of e x (score - top). */
typedef struct {
    v8 sum, sq, shifted;
} numerator_sums;

/* count vectors of a row from vector g on (count, raw, stats and biased
 * constants where this is inlined): row = exp(row - top), with its sums. A
 * raw row (the raw shift's) holds unscaled scores of every key of the chunk:
 * scaled here (and biased, with bias_row), and its lanes outside word set to
 * 0 after the exp. The vectors go through each exp step together (one exp_v8
 * a vector left each waiting on its own chain). top is at or above every
 * score, so no clamp above. */
SA_INLINE void row_numerators(float *row, int g, const int count, float scale, const float *bias_row, v8 top,
                              uint64_t word, const int raw, const int stats, const int biased, numerator_sums *sums)
{
    v8 shifted[4], e[4];
    for (int i = 0; i < count; i++) {
        v8 score = *(v8 *)&row[8 * (g + i)];
        if (raw) score *= scale;
        if (raw && biased) score += *(const v8 *)&bias_row[8 * (g + i)];
        e[i] = shifted[i] = score - top;
    }
    exp_nonpositive_lanes(e, count);
    for (int i = 0; i < count; i++) {
        if (raw) e[i] = SELECT(lanes_of(word, g + i), e[i], SPLAT(0.0f));
        sums->sum += e[i];
        if (stats) {
            sums->sq += e[i] * e[i];
            sums->shifted += SELECT(e[i] != SPLAT(0.0f), e[i] * shifted[i], SPLAT(0.0f));
        }
        *(v8 *)&row[8 * (g + i)] = e[i];
    }
}

/* row_numerators over a row's cols scores (a multiple of 8): four vectors at
 * a time, then the rest. */
SA_INLINE void row_numerators_all(float *row, int cols, float scale, const float *bias_row, v8 top, uint64_t word,
                                  const int raw, const int stats, const int biased, numerator_sums *sums)
{
    const int groups = cols / 8;
    int g = 0;
    for (; g + 4 <= groups; g += 4) row_numerators(row, g, 4, scale, bias_row, top, word, raw, stats, biased, sums);
    switch (groups - g) {
    case 3: row_numerators(row, g, 3, scale, bias_row, top, word, raw, stats, biased, sums); break;
    case 2: row_numerators(row, g, 2, scale, bias_row, top, word, raw, stats, biased, sums); break;
    case 1: row_numerators(row, g, 1, scale, bias_row, top, word, raw, stats, biased, sums); break;
    default: break;
    }
}

/* A row's scores scaled and biased in place where word's bits are set, -inf
 * elsewhere (eight mask bits a vector); returns their maximum and sets *nan
 * where a kept score is NaN. */
SA_INLINE float mask_row(float *row, uint64_t word, int cols, float scale, const float *bias_row, int *nan)
{
    v8 top_lanes = SPLAT(-INFINITY);
    i8v nan_lanes = {0};
    for (int g = 0; g < cols / 8; g++) {
        const i8v on = lanes_of(word, g);
        v8 score = *(v8 *)&row[8 * g] * scale + *(const v8 *)&bias_row[8 * g];
        nan_lanes |= on & (score != score);
        score = SELECT(on, score, SPLAT(-INFINITY));
        top_lanes = SELECT(score > top_lanes, score, top_lanes);
        *(v8 *)&row[8 * g] = score;
    }
    int any_nan = 0;
    for (int l = 0; l < 8; l++) any_nan |= nan_lanes[l];
    *nan |= any_nan != 0;
    return hmax8(top_lanes);
}

TILED_CLONES
static void forward_tiles(void *opaque, int64_t begin, int64_t end)
{
    tiled_ctx *ctx = opaque;
    const sa_attention_params *p = ctx->p;
    const int64_t n = p->num_tokens, dim = p->head_dim, dim_pad = ctx->dim_pad;
    const float scale = ctx->scale, keep_scale = ctx->keep_scale;
    const uint32_t threshold = ctx->threshold;
    const int want_stats = p->row_stats != NULL;
    const int64_t side = 2 * p->max_relative + 1;
    panels s;
    if (panels_alloc(&s, dim_pad) < 0) {
        panels_free(&s);
        ctx->failed = 1;
        return;
    }
    panel_cache cache;
    panel_cache_init(&cache, p, dim_pad);
    /* biases of tiles that are runs along an image row from the spread table
     * (without it, or for other tiles, a gather per eight pairs) */
    tile_bias biases;
    tile_bias_init(&biases, p);
    /* RANDOM-like plans (8 or more chunks a tile), where the mask pass was a
     * tenth of the forward; a scale that is not positive (the largest raw
     * score would not give the largest scaled one) keeps the exact path. The
     * statistics do not depend on the shift. With a bias the shift is the
     * largest raw score scaled plus the table's largest cell. */
    const int raw_shift = p->num_chunks >= 8 * p->num_tiles && ctx->scale > 0.0f;
    int64_t bias_top_head = -1;
    float bias_top = 0.0f; /* with a bias, the largest cell of the head's table */
    int32_t queries[TILE], keys[TILE], key_y[TILE], key_x[TILE];
    float bias_row[TILE] __attribute__((aligned(32))) = {0};
    /* rows whose length is a whole number of vectors are read where they lie */
    const int in_place = dim == dim_pad;
    const float *query_rows[TILE], *value_rows[TILE], *key_rows[TILE];
    int live[TILE];
    uint32_t query_key[TILE];
    row_state state[TILE];

    for (int64_t item = begin; item < end; item++) {
        const int64_t tile = item % p->num_tiles, bh = item / p->num_tiles;
        const int64_t h = bh % p->heads, b = bh / p->heads;
        int64_t chunk_begin, chunk_end;
        chunk_range(p->tile_chunk_ptr, tile, p->num_chunks, &chunk_begin, &chunk_end);
        const int runs = p->head_active == NULL || p->head_active[h] != 0;
        const float *bias_table = p->bias_table ? (const float *)p->bias_table + h * side * side : NULL;
        if (raw_shift && bias_table != NULL && bias_top_head != h) {
            bias_top = table_max(bias_table, side * side);
            bias_top_head = h;
        }
        /* a table with an infinite cell (or only NaN) takes the exact path */
        const int tile_raw_shift = raw_shift && isfinite(bias_top);
        if (p->merge_previous && (chunk_begin == chunk_end || !runs)) continue;
        for (int r = 0; r < TILE; r++) {
            const int32_t id = p->tile_queries[tile * TILE + r];
            queries[r] = id >= 0 && id < n ? id : -1;
            const float *q = queries[r] >= 0 ? row_of(p->q, p->q_stride, b, h, queries[r]) : NULL;
            if (q) {
                /* every query row and output row of the tile now, so that their misses
                 * overlap (the scores kernel would meet them one block of rows after
                 * another; output rows are written, or read back by a merge, at the end) */
                prefetch_row(q, dim);
                const float *out_row = (const float *)p->out + b * p->out_stride[0] +
                                       h * p->out_stride[1] + id * p->out_stride[2];
                for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(out_row + d, 1, 1);
            }
            query_rows[r] = row_for_kernels(q, s.query + r * dim_pad, dim, dim_pad, in_place);
            memset(s.out + r * dim_pad, 0, (size_t)dim_pad * sizeof(float));
            state[r] = (row_state){SPLAT(0.0f), -INFINITY, 0, 0, 0};
            query_key[r] = threshold > 0 && queries[r] >= 0
                ? sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), queries[r]) : 0;
        }
        const int rows = slots_used(queries, n);
        tile_bias_start(&biases, p, bias_table, h, queries, rows);
        int ever_live[TILE] = {0};
        v8 row_tops[TILE];      /* lane-wise maxima of each row's raw scores in a chunk */
        float row_maxima[TILE]; /* and their largest lane */
        /* the first attempt takes the shift from the raw scores where raw_shift
         * allows; the second, only if the first lost a row to underflow, is exact */
        for (int attempt = tile_raw_shift ? 0 : 1; attempt < 2; attempt++) {
            const int fast = attempt == 0;
            if (attempt == 1 && tile_raw_shift) {
                for (int r = 0; r < TILE; r++) {
                    memset(s.out + r * dim_pad, 0, (size_t)dim_pad * sizeof(float));
                    state[r] = (row_state){SPLAT(0.0f), -INFINITY, 0, 0, 0};
                }
            }
            if (runs && chunk_begin < chunk_end) prefetch_chunk(p, p->chunk_keys + chunk_begin * TILE, b, h, 1);
            for (int64_t chunk = runs ? chunk_begin : chunk_end; chunk < chunk_end; chunk++) {
                const int32_t *chunk_keys = p->chunk_keys + chunk * TILE;
                const int used = slots_used(chunk_keys, n), cols = (used + 7) / 8 * 8; /* scores computed, padded */
                if (cols == 0) continue;
                float *key_t = s.key_t;
                const int packed = cache.slots > 0 && panel_cache_find(&cache, bh, chunk_keys, cols, dim_pad, &key_t);
                uint64_t usable_keys = 0; /* bit c: key c is in the grid and not masked */
                for (int c = 0; c < cols; c++) {
                    const int32_t j = chunk_keys[c];
                    const int valid = j >= 0 && j < n;
                    keys[c] = valid ? j : -1;
                    if (valid && (p->key_mask == NULL ||
                                  p->key_mask[b * p->key_mask_stride[0] + j * p->key_mask_stride[1]]))
                        usable_keys |= (uint64_t)1 << c;
                    if (bias_table != NULL) {
                        key_y[c] = valid ? (int32_t)(j / p->width) : 0;
                        key_x[c] = valid ? (int32_t)(j % p->width) : 0;
                    }
                    const float *k = valid ? row_of(p->k, p->k_stride, b, h, j) : NULL;
                    const float *v = valid ? row_of(p->v, p->v_stride, b, h, j) : NULL;
                    if (in_place)
                        key_rows[c] = k ? k : zero_row;
                    else if (!packed)
                        for (int64_t d = 0; d < dim_pad; d++) key_t[d * TILE + c] = k && d < dim ? k[d] : 0.0f;
                    value_rows[c] = row_for_kernels(v, s.value + c * dim_pad, dim, dim_pad, in_place);
                }
                if (in_place && !packed) pack_transposed64(key_rows, dim, key_t, cols);
                if (bias_table != NULL) tile_bias_chunk(&biases, p, rows, key_y, key_x, cols);
                if (chunk + 1 < chunk_end) {
                    /* the next chunk's key panel where the cache holds it, else its key rows */
                    const int32_t *next_keys = p->chunk_keys + (chunk + 1) * TILE;
                    const float *next_panel = cache.slots > 0 ? panel_cache_peek(&cache, bh, next_keys, n, dim_pad) : NULL;
                    if (next_panel != NULL)
                        for (int64_t i = 0; i < dim_pad * TILE; i += 16) __builtin_prefetch(next_panel + i, 0, 3);
                    prefetch_chunk(p, next_keys, b, h, next_panel == NULL);
                }
                const int halves = chunk_in_halves(p->chunk_masks + chunk * TILE, rows, used);
                if (halves) {
                    scores_kernel(query_rows, key_t, s.scores, dim_pad, 32, 32, fast ? row_tops : NULL);
                    scores_kernel(query_rows + 32, key_t + 32, s.scores + 32 * TILE + 32, dim_pad, rows - 32,
                                  cols - 32, fast ? row_tops + 32 : NULL);
                    scores_off_halves(s.scores, rows);
                } else {
                    scores_kernel(query_rows, key_t, s.scores, dim_pad, rows, cols, fast ? row_tops : NULL);
                }
                if (fast) rows_maxima(row_tops, rows, row_maxima);

                for (int r = 0; r < rows; r++) {
                    float *row = s.scores + r * TILE;
                    const uint64_t word = queries[r] >= 0 ? p->chunk_masks[chunk * TILE + r] & usable_keys : 0;
                    live[r] = word != 0;
                    if (!word) {
                        memset(row, 0, (size_t)cols * sizeof(float));
                        continue;
                    }
                    ever_live[r] = 1;
                    row_state *st = &state[r];
                    /* both paths below add the row's biases */
                    const float *row_bias = bias_table == NULL ? bias_row
                        : tile_bias_row(&biases, p, bias_table, r, queries[r], key_y, key_x, cols, ctx->bias_gather,
                                        bias_row);
                    float chunk_max = -INFINITY;
                    /* the fast attempt takes the shift from every score of the row, kept or
                     * not: any shift at or above the kept maximum gives the same softmax, and
                     * it then needs no mask pass */
                    if (fast) chunk_max = row_maxima[r] * scale + bias_top;
                    const int masked_here = !(fast && chunk_max > -INFINITY);
                    if (masked_here) {
                        chunk_max = mask_row(row, word, cols, scale, row_bias, &st->nan);
                        if (chunk_max == -INFINITY) {
                            memset(row, 0, (size_t)cols * sizeof(float));
                            continue;
                        }
                    }
                    if (chunk_max > st->max) {
                        if (st->max != -INFINITY) { /* then the sum holds 1 or more */
                            /* rescale what was summed against the old maximum */
                            const float f = sa_fast_expf(st->max - chunk_max);
                            if (want_stats) st->shifted = f * (st->shifted + hsum8(st->sum) * (st->max - chunk_max));
                            st->sum *= f;
                            st->sq *= f * f;
                            float *acc = s.out + r * dim_pad;
                            for (int64_t d = 0; d < dim_pad; d++) acc[d] *= f;
                        }
                        st->max = chunk_max;
                    }
                    const v8 top = SPLAT(st->max);
                    /* exp_v8(-inf - top) is 0: masked entries need no test */
                    numerator_sums sums = {SPLAT(0.0f), SPLAT(0.0f), SPLAT(0.0f)};
                    const int raw_biased = !masked_here && bias_table != NULL;
#define NUMERATORS(raw, stats, biased) row_numerators_all(row, cols, scale, row_bias, top, word, raw, stats, biased, &sums)
                    if (masked_here) {
                        if (want_stats) NUMERATORS(0, 1, 0);
                        else NUMERATORS(0, 0, 0);
                    } else if (want_stats) {
                        if (raw_biased) NUMERATORS(1, 1, 1);
                        else NUMERATORS(1, 1, 0);
                    } else {
                        if (raw_biased) NUMERATORS(1, 0, 1);
                        else NUMERATORS(1, 0, 0);
                    }
#undef NUMERATORS
                    st->sum += sums.sum;
                    if (want_stats) {
                        st->sq += hsum8(sums.sq);
                        st->shifted += hsum8(sums.shifted);
                    }
                    /* eight draws at once: a draw per pair took a third of RANDOM's module step */
                    if (threshold > 0)
                        for (int g = 0; g < cols / 8; g++)
                            *(v8 *)&row[8 * g] =
                                SELECT(sa_keep_keys(threshold, query_key[r], keys + 8 * g), *(v8 *)&row[8 * g],
                                       SPLAT(0.0f));
                }
                /* the weights past the chunk's last key are 0 */
                if (halves) {
                    weighted_values_kernel(s.scores, value_rows, s.out, dim_pad, live, 32, 32, ctx->wide_values);
                    weighted_values_kernel(s.scores + 32 * TILE + 32, value_rows + 32, s.out + 32 * dim_pad, dim_pad,
                                           live + 32, rows - 32, used - 32, ctx->wide_values);
                } else {
                    weighted_values_kernel(s.scores, value_rows, s.out, dim_pad, live, rows, used, ctx->wide_values);
                }
            }
            if (!fast) break;
            /* a masked score far above the kept ones shifts the kept exps far below
             * 1: their sum then loses precision (the exps' arguments are large, and
             * the lse is a large shift plus a large negative log), or underflows.
             * A sum below 2^-10 (a shift at least about 7 above the kept maximum)
             * runs the tile again, exactly. */
            int far_shift = 0;
            for (int r = 0; r < rows; r++) {
                const float sum = hsum8(state[r].sum);
                far_shift |= ever_live[r] && sum < 0x1p-10f;
            }
            if (!far_shift) break;
        }

        /* each row's log-sum-exp, and its merge with an earlier pass's: the
         * logs and exps eight rows at a time */
        float row_lse[TILE], row_new_weight[TILE], row_old_weight[TILE], row_sum[TILE];
        /* statistics of a merge: the two parts' shares of the merged softmax and their logs */
        float share_old[TILE], share_new[TILE], log_share_old[TILE], log_share_new[TILE];
        for (int r0 = 0; r0 < TILE; r0 += 8) {
            v8 sum8, top8, old8, merged8;
            i8v nan8;
            for (int l = 0; l < 8; l++) {
                const int r = r0 + l;
                row_state *st = &state[r];
                sum8[l] = hsum8(st->sum);
                /* a NaN kept score makes its row's sum NaN (the raw shift skips the NaN lanes
                 * check); a kept +inf score leaves the row's maximum +inf and exp(inf - inf)
                 * in its softmax, NaN as well (a raw shift that a masked +inf set is
                 * replaced by the exact pass, its kept sums having underflowed) */
                if (sum8[l] != sum8[l] || st->max == INFINITY) st->nan = 1;
                top8[l] = st->max;
                nan8[l] = st->nan ? -1 : 0;
                old8[l] = -INFINITY;
                if (queries[r] >= 0 && p->merge_previous) old8[l] = ((const float *)p->lse)[bh * n + queries[r]];
                row_sum[r] = sum8[l];
            }
            const i8v live8 = (sum8 > SPLAT(0.0f)) & ~nan8;
            const v8 nan_v = SPLAT(NAN), neg_inf = SPLAT(-INFINITY);
            v8 pass8 = SELECT(live8, top8 + log_v8(SELECT(live8, sum8, SPLAT(1.0f))), neg_inf);
            pass8 = SELECT(nan8, nan_v, pass8);
            /* log(e^a + e^b) = max + log(1 + e^-|a - b|), where both are finite */
            const i8v merging = live8 & (old8 > neg_inf) & (old8 == old8);
            v8 e[3] = {SPLAT(0.0f), SPLAT(0.0f), SPLAT(0.0f)};
            merged8 = SPLAT(0.0f);
            if (p->merge_previous) {
                const v8 both = SELECT(old8 > pass8, old8, pass8);
                const v8 gap = SELECT(old8 > pass8, pass8 - old8, old8 - pass8);
                e[0] = SELECT(merging, gap, SPLAT(0.0f));
                exp_lanes(e, 1);
                merged8 = both + log_v8(SPLAT(1.0f) + e[0]);
                e[1] = SELECT(merging, old8 - merged8, SPLAT(0.0f));
                e[2] = SELECT(merging, pass8 - merged8, SPLAT(0.0f));
                exp_lanes(e + 1, 2);
            }
            /* the dropout scale 1 / (1 - p) of every kept weight, applied once here */
            const v8 inv = SELECT(live8, SPLAT(keep_scale) / SELECT(live8, sum8, SPLAT(1.0f)), SPLAT(0.0f));
            /* a row with a NaN merges into NaN; a row without a merge keeps its own lse */
            const i8v old_live = (old8 > neg_inf) | (old8 != old8);
            const i8v any_nan = old_live & ((old8 != old8) | nan8);
            v8 lse8 = SELECT(merging, merged8, pass8);
            v8 new_w8 = SELECT(merging, inv * e[2], inv);
            v8 old_w8 = SELECT(merging, e[1], SPLAT(0.0f));
            lse8 = SELECT(any_nan, nan_v, lse8);
            new_w8 = SELECT(any_nan | nan8, nan_v, new_w8);
            old_w8 = SELECT(any_nan, nan_v, old_w8);
            for (int l = 0; l < 8; l++) {
                row_lse[r0 + l] = lse8[l];
                row_new_weight[r0 + l] = new_w8[l];
                row_old_weight[r0 + l] = old_w8[l];
            }
            if (want_stats) {
                const v8 zero = SPLAT(0.0f);
                const v8 old_share = SELECT(merging, e[1], zero), new_share = SELECT(merging, e[2], SPLAT(1.0f));
                const v8 old_log = SELECT(merging, old8 - merged8, zero), new_log = SELECT(merging, pass8 - merged8, zero);
                for (int l = 0; l < 8; l++) {
                    share_old[r0 + l] = old_share[l];
                    share_new[r0 + l] = new_share[l];
                    log_share_old[r0 + l] = old_log[l];
                    log_share_new[r0 + l] = new_log[l];
                }
            }
        }
        for (int r = 0; r < TILE; r++) {
            if (queries[r] < 0) continue;
            const row_state *st = &state[r];
            const int64_t row_item = bh * n + queries[r];
            const float sum = st->nan ? NAN : row_sum[r];
            const int live_row = sum > 0 || st->nan;
            if (p->merge_previous && !live_row) continue; /* the earlier pass's result stands */
            float *lse = (float *)p->lse + row_item;
            const float new_weight = row_new_weight[r], old_weight = row_old_weight[r], total = row_lse[r];
            float *out = (float *)p->out + b * p->out_stride[0] + h * p->out_stride[1] +
                         queries[r] * p->out_stride[2];
            const float *acc = s.out + r * dim_pad;
            for (int64_t d = 0; d < dim; d++) {
                float value = acc[d] * new_weight;
                if (old_weight != 0.0f || total != total) value += out[d] * old_weight;
                out[d] = value;
            }
            *lse = total;
            if (want_stats) {
                float *stats = (float *)p->row_stats + 2 * row_item;
                const float inv = live_row ? 1.0f / sum : 0.0f;
                float squares = live_row ? st->sq * inv * inv : 0.0f;
                float entropy = live_row ? logf(sum) - st->shifted * inv : 0.0f;
                if (p->merge_previous && share_old[r] != 0.0f) {
                    /* p = share x (the part's own softmax): sum p^2 scales by share^2, and
                     * -sum p log p = share x (the part's entropy - log share), summed */
                    squares = stats[0] * share_old[r] * share_old[r] + squares * share_new[r] * share_new[r];
                    entropy = share_old[r] * (stats[1] - log_share_old[r]) + share_new[r] * (entropy - log_share_new[r]);
                }
                if (total != total) squares = entropy = NAN;
                stats[0] = squares;
                stats[1] = entropy;
            }
        }
    }
    tile_bias_free(&biases);
    panels_free(&s);
    panel_cache_free(&cache);
}

/* ---- backward ------------------------------------------------------------
 *
 * One work item is one (batch, head), so that a thread owns the key and value
 * gradients it accumulates (no atomics, the same sums whatever the thread
 * count). Every pass of the plan is walked: per tile the queries and output
 * gradients are packed once; per chunk the keys (both ways round) and the
 * values (transposed) are packed, the scores and dP = dO V^T are recomputed as
 * panel products, dS = P (dP - delta) is formed under the chunk's masks, and
 * dQ += dS K, dK += dS^T Q, dV += P^T dO are panel products again. With a
 * relative position bias the scores take it again, and with grad_bias_rows
 * each pair's dS is added to its bias cell in the (batch, head)'s row. */

typedef struct {
    panels s;
    float *key;        /* TILE x dim_pad, keys as rows */
    float *value_t;    /* dim_pad x TILE */
    float *grad_out;   /* TILE x dim_pad, the tile's output gradients */
    float *grad_probs; /* TILE x TILE */
    float *transposed; /* TILE x TILE */
    float *chunk_grad; /* TILE x dim_pad */
    /* with a bias gradient: dS summed per offset (dy, dx) of the whole grid,
     * (2H - 1) x (2W - 1), put into the table's clipped cells per (batch,
     * head). Adding each pair into its clipped cell directly chained the adds
     * of a row through memory wherever its keys lay past the table's border
     * (most of RANDOM's and AXIAL's): 15% of RANDOM's backward in perf. */
    float *offset_grads;
} backward_panels;

static int backward_alloc(backward_panels *w, int64_t dim_pad, const sa_attention_params *p)
{
    const size_t row_block = (size_t)TILE * (size_t)dim_pad * sizeof(float);
    const size_t square = (size_t)TILE * TILE * sizeof(float);
    const size_t offsets = (size_t)(2 * p->height - 1) * (size_t)(2 * p->width - 1);
    w->offset_grads = p->grad_bias_rows != NULL ? malloc(offsets * sizeof(float)) : NULL;
    int status = panels_alloc(&w->s, dim_pad);
    w->key = aligned_alloc(32, row_block);
    w->value_t = aligned_alloc(32, row_block);
    w->grad_out = aligned_alloc(32, row_block);
    w->grad_probs = aligned_alloc(32, square);
    w->transposed = aligned_alloc(32, square);
    w->chunk_grad = aligned_alloc(32, row_block);
    return status == 0 && w->key && w->value_t && w->grad_out && w->grad_probs && w->transposed &&
                   w->chunk_grad && (p->grad_bias_rows == NULL || w->offset_grads) ? 0 : -1;
}

static void backward_free(backward_panels *w)
{
    panels_free(&w->s);
    free(w->key);
    free(w->value_t);
    free(w->grad_out);
    free(w->grad_probs);
    free(w->transposed);
    free(w->chunk_grad);
    free(w->offset_grads);
}

/* cells[cell of (dy, dx) clipped] += offset_grads[dy + H - 1][dx + W - 1]
 * over every offset of the grid. */
static void fold_offset_grads(const float *offset_grads, int64_t height, int64_t width, int32_t max_rel,
                              float *cells)
{
    const int64_t side = 2 * (int64_t)max_rel + 1, row_len = 2 * width - 1;
    for (int64_t dy = 1 - height; dy < height; dy++) {
        const float *src = offset_grads + (dy + height - 1) * row_len;
        float *dst = cells + (clip_offset(dy, max_rel) + max_rel) * side;
        for (int64_t dx = 1 - width; dx < width; dx++) dst[clip_offset(dx, max_rel) + max_rel] += src[dx + width - 1];
    }
}

/* out[c][r] = in[r][c] for r < rows and c < cols (multiples of 8), rows of
 * both 64 apart, in 8 x 8 vector blocks. */
SA_INLINE void transpose_square(const float *restrict in, float *restrict out, int rows, int cols)
{
    for (int r0 = 0; r0 < rows; r0 += 8)
        for (int c0 = 0; c0 < cols; c0 += 8) {
            v8 block[8];
            for (int i = 0; i < 8; i++) block[i] = *(const v8 *)&in[(r0 + i) * TILE + c0];
            transpose8(block);
            for (int i = 0; i < 8; i++) *(v8 *)&out[(c0 + i) * TILE + r0] = block[i];
        }
}


TILED_CLONES
static void backward_heads(void *opaque, int64_t begin, int64_t end)
{
    tiled_ctx *ctx = opaque;
    const sa_attention_params *p = ctx->p;
    const int64_t n = p->num_tokens, dim = p->head_dim, dim_pad = ctx->dim_pad;
    const float scale = ctx->scale, keep_scale = ctx->keep_scale;
    const uint32_t threshold = ctx->threshold;
    int all_live[TILE];
    for (int r = 0; r < TILE; r++) all_live[r] = 1;
    backward_panels w;
    if (backward_alloc(&w, dim_pad, p) < 0) {
        backward_free(&w);
        ctx->failed = 1;
        return;
    }
    int32_t queries[TILE], keys[TILE], key_y[TILE] = {0}, key_x[TILE] = {0};
    int64_t key_offset[TILE] = {0}; /* a key's place in offset_grads, less the query's */
    const int64_t offset_row = 2 * p->width - 1;
    float row_lse[TILE], row_delta[TILE];
    float bias_row[TILE] __attribute__((aligned(32))) = {0};
    float score_grads[TILE] __attribute__((aligned(32)));
    const int32_t max_rel = (int32_t)p->max_relative, side = 2 * max_rel + 1;
    const int in_place = dim == dim_pad;
    const float *query_rows[TILE], *grad_out_rows[TILE], *key_rows[TILE], *value_rows[TILE];
    uint32_t query_key[TILE];
    tile_bias biases;
    tile_bias_init(&biases, p);

    for (int64_t bh = begin; bh < end; bh++) {
        const int64_t h = bh % p->heads, b = bh / p->heads;
        float *grad_q = (float *)p->grad_q + bh * n * dim;
        float *grad_k = (float *)p->grad_k + bh * n * dim;
        float *grad_v = (float *)p->grad_v + bh * n * dim;
        float *bias_cells = p->grad_bias_rows != NULL ? p->grad_bias_rows + bh * side * side : NULL;
        const float *bias_table = p->bias_table != NULL ? (const float *)p->bias_table + h * side * side : NULL;
        /* else an earlier kernel wrote them and this plan adds to them; a head dim
         * of 0 leaves the gradients without storage (NULL is no memset target) */
        if (!p->merge_previous && n * dim > 0) {
            memset(grad_q, 0, (size_t)(n * dim) * sizeof(float));
            memset(grad_k, 0, (size_t)(n * dim) * sizeof(float));
            memset(grad_v, 0, (size_t)(n * dim) * sizeof(float));
        }
        if (!p->merge_previous && bias_cells != NULL) memset(bias_cells, 0, (size_t)(side * side) * sizeof(float));
        if (p->head_active != NULL && !p->head_active[h]) continue;
        const float *lse = (const float *)p->lse + bh * n;
        const float *delta = (const float *)p->delta + bh * n;
        if (bias_cells != NULL) memset(w.offset_grads, 0, (size_t)((2 * p->height - 1) * offset_row) * sizeof(float));

        for (int64_t pass = 0; pass < ctx->num_passes; pass++) {
            const int64_t *f = ctx->passes[pass];
            const int64_t num_tiles = f[0], num_chunks = f[1];
            const int32_t *tile_queries = ctx->base + f[2], *chunk_ptr = ctx->base + f[3];
            const int32_t *chunk_ids = ctx->base + f[4];
            const uint64_t *masks = (const uint64_t *)(ctx->base + f[5]);
            for (int64_t tile = 0; tile < num_tiles; tile++) {
                int64_t chunk_begin, chunk_end;
                chunk_range(chunk_ptr, tile, num_chunks, &chunk_begin, &chunk_end);
                if (chunk_begin == chunk_end) continue;
                prefetch_chunk(p, chunk_ids + chunk_begin * TILE, b, h, 1);
                for (int r = 0; r < TILE; r++) {
                    const int32_t id = tile_queries[tile * TILE + r];
                    queries[r] = id >= 0 && id < n ? id : -1;
                    const int has = queries[r] >= 0;
                    const float *q = has ? row_of(p->q, p->q_stride, b, h, queries[r]) : NULL;
                    const float *go = has ? row_of(p->grad_out, p->grad_out_stride, b, h, queries[r]) : NULL;
                    if (has) { /* all of the tile's rows now: their misses overlap */
                        prefetch_row(q, dim);
                        prefetch_row(go, dim);
                    }
                    if (in_place) {
                        query_rows[r] = q ? q : zero_row;
                        grad_out_rows[r] = go ? go : zero_row;
                    } else {
                        for (int64_t d = 0; d < dim_pad; d++) {
                            w.s.query[r * dim_pad + d] = q && d < dim ? q[d] : 0.0f;
                            w.grad_out[r * dim_pad + d] = go && d < dim ? go[d] : 0.0f;
                        }
                        query_rows[r] = w.s.query + r * dim_pad;
                        grad_out_rows[r] = w.grad_out + r * dim_pad;
                    }
                    memset(w.s.out + r * dim_pad, 0, (size_t)dim_pad * sizeof(float)); /* dQ */
                    row_lse[r] = has ? lse[queries[r]] : -INFINITY;
                    row_delta[r] = has ? delta[queries[r]] : 0.0f;
                    query_key[r] = has && threshold > 0
                        ? sa_dropout_query_key(sa_dropout_row_key(p->dropout_seed, b, h), queries[r]) : 0;
                }
                const int rows = slots_used(queries, n), rows8 = (rows + 7) / 8 * 8;
                tile_bias_start(&biases, p, bias_table, h, queries, rows);
                for (int64_t chunk = chunk_begin; chunk < chunk_end; chunk++) {
                    const int used = slots_used(chunk_ids + chunk * TILE, n), cols = (used + 7) / 8 * 8;
                    if (cols == 0 || rows == 0) continue;
                    uint64_t usable_keys = 0; /* bit c: key c is in the grid and not masked */
                    for (int c = 0; c < cols; c++) {
                        const int32_t j = chunk_ids[chunk * TILE + c];
                        const int valid = j >= 0 && j < n;
                        keys[c] = valid ? j : -1;
                        if (valid && (p->key_mask == NULL ||
                                      p->key_mask[b * p->key_mask_stride[0] + j * p->key_mask_stride[1]]))
                            usable_keys |= (uint64_t)1 << c;
                        if (bias_table != NULL) {
                            key_y[c] = valid ? (int32_t)(j / p->width) : 0;
                            key_x[c] = valid ? (int32_t)(j % p->width) : 0;
                            key_offset[c] = key_y[c] * offset_row + key_x[c];
                        }
                        const float *k = valid ? row_of(p->k, p->k_stride, b, h, j) : NULL;
                        const float *v = valid ? row_of(p->v, p->v_stride, b, h, j) : NULL;
                        if (in_place) {
                            key_rows[c] = k ? k : zero_row;
                            value_rows[c] = v ? v : zero_row;
                            continue;
                        }
                        for (int64_t d = 0; d < dim_pad; d++) {
                            const float kd = k && d < dim ? k[d] : 0.0f;
                            w.s.key_t[d * TILE + c] = kd;
                            w.key[c * dim_pad + d] = kd;
                            w.value_t[d * TILE + c] = v && d < dim ? v[d] : 0.0f;
                        }
                        key_rows[c] = w.key + c * dim_pad;
                    }
                    if (in_place) {
                        pack_transposed64(key_rows, dim, w.s.key_t, cols);
                        pack_transposed64(value_rows, dim, w.value_t, cols);
                    }
                    if (chunk + 1 < chunk_end) prefetch_chunk(p, chunk_ids + (chunk + 1) * TILE, b, h, 1);
                    if (bias_table != NULL) tile_bias_chunk(&biases, p, rows, key_y, key_x, cols);
                    scores_kernel(query_rows, w.s.key_t, w.s.scores, dim_pad, rows, cols, NULL);
                    scores_kernel(grad_out_rows, w.value_t, w.grad_probs, dim_pad, rows, cols, NULL);
                    for (int r = 0; r < rows8; r++) {
                        float *score = w.s.scores + r * TILE, *grad_prob = w.grad_probs + r * TILE;
                        const uint64_t word = queries[r] >= 0 && row_lse[r] != -INFINITY
                            ? masks[chunk * TILE + r] & usable_keys : 0;
                        if (!word) { /* rows up to rows8 are zero for the 8 x 8 transposes */
                            memset(score, 0, (size_t)cols * sizeof(float));
                            memset(grad_prob, 0, (size_t)cols * sizeof(float));
                            continue;
                        }
                        /* keep[c]: the dropout mask scaled by 1 / (1 - p), as in the forward */
                        float keep[TILE] __attribute__((aligned(32)));
                        if (threshold > 0)
                            for (int g = 0; g < cols / 8; g++)
                                *(v8 *)&keep[8 * g] = SELECT(sa_keep_keys(threshold, query_key[r], keys + 8 * g),
                                                             SPLAT(keep_scale), SPLAT(0.0f));
                        const float *row_bias = bias_table == NULL ? bias_row
                            : tile_bias_row(&biases, p, bias_table, r, queries[r], key_y, key_x, cols,
                                            ctx->bias_gather, bias_row);
                        const v8 top = SPLAT(row_lse[r]), row_d = SPLAT(row_delta[r]);
                        for (int g0 = 0; g0 < cols / 8; g0 += 4) {
                            v8 e[4];
                            const int count = cols / 8 - g0 >= 4 ? 4 : cols / 8 - g0;
                            for (int i = 0; i < count; i++)
                                e[i] = bias_table != NULL
                                    ? *(v8 *)&score[8 * (g0 + i)] * scale + *(const v8 *)&row_bias[8 * (g0 + i)] - top
                                    : *(v8 *)&score[8 * (g0 + i)] * scale - top;
                            exp_some_lanes(e, count);
                            for (int i = 0; i < count; i++) {
                                const int g = g0 + i;
                                const i8v on = lanes_of(word, g);
                                const v8 kept = threshold > 0 ? *(const v8 *)&keep[8 * g] : SPLAT(keep_scale);
                                const v8 prob = SELECT(on, e[i], SPLAT(0.0f));
                                const v8 grad = prob * (*(v8 *)&grad_prob[8 * g] * kept - row_d);
                                *(v8 *)&score[8 * g] = prob * kept;      /* the weight of dO in dV */
                                *(v8 *)&grad_prob[8 * g] = grad * scale; /* dS, scaled for dQ and dK */
                                *(v8 *)&score_grads[8 * g] = grad;
                            }
                        }
                        if (bias_cells != NULL) { /* the pairs' dS at their offsets, bit by bit */
                            const int64_t qy = queries[r] / p->width, qx = queries[r] % p->width;
                            float *at_query = w.offset_grads + (qy + p->height - 1) * offset_row + qx + p->width - 1;
                            for (uint64_t bits = word; bits; bits &= bits - 1) {
                                const int c = __builtin_ctzll(bits);
                                at_query[-key_offset[c]] += score_grads[c];
                            }
                        }
                    }
                    /* dQ += dS K (dS is 0 past the chunk's last key) */
                    weighted_values_kernel(w.grad_probs, key_rows, w.s.out, dim_pad, all_live, rows, used, ctx->wide_values);
                    /* dK += dS^T Q */
                    transpose_square(w.grad_probs, w.transposed, rows8, cols);
                    memset(w.chunk_grad, 0, (size_t)(used * dim_pad) * sizeof(float));
                    weighted_values_kernel(w.transposed, query_rows, w.chunk_grad, dim_pad, all_live, used, rows, ctx->wide_values);
                    for (int c = 0; c < used; c++) {
                        if (keys[c] < 0) continue;
                        float *row = grad_k + (int64_t)keys[c] * dim;
                        for (int64_t d = 0; d < dim; d++) row[d] += w.chunk_grad[c * dim_pad + d];
                    }
                    /* dV += P^T dO */
                    transpose_square(w.s.scores, w.transposed, rows8, cols);
                    memset(w.chunk_grad, 0, (size_t)(used * dim_pad) * sizeof(float));
                    weighted_values_kernel(w.transposed, grad_out_rows, w.chunk_grad, dim_pad, all_live, used, rows, ctx->wide_values);
                    for (int c = 0; c < used; c++) {
                        if (keys[c] < 0) continue;
                        float *row = grad_v + (int64_t)keys[c] * dim;
                        for (int64_t d = 0; d < dim; d++) row[d] += w.chunk_grad[c * dim_pad + d];
                    }
                }
                for (int r = 0; r < TILE; r++) {
                    if (queries[r] < 0) continue;
                    float *row = grad_q + (int64_t)queries[r] * dim;
                    for (int64_t d = 0; d < dim; d++) row[d] += w.s.out[r * dim_pad + d];
                }
            }
        }
        if (bias_cells != NULL) fold_offset_grads(w.offset_grads, p->height, p->width, max_rel, bias_cells);
    }
    tile_bias_free(&biases);
    backward_free(&w);
}

int sa_cpu_backward_tiled(const sa_attention_params *p, const int64_t (*passes)[6],
                          int64_t num_passes, const int32_t *base, int num_threads, char *err,
                          size_t len)
{
    if (p->dtype != SA_F32 || p->grad_scores != NULL || (p->grad_bias_rows != NULL && p->bias_table == NULL)) {
        snprintf(err, len, "the tiled CPU backward takes float32, its bias gradient in grad_bias_rows");
        return SA_ERR_UNSUPPORTED;
    }
    tiled_ctx ctx = tiled_ctx_for(p);
    ctx.passes = passes;
    ctx.num_passes = num_passes;
    ctx.base = base;
    const int64_t items = p->batch * p->heads;
    if (items == 0) return SA_OK;
    if (sa_parallel_for(items, 1, num_threads, backward_heads, &ctx) != 0 || ctx.failed) {
        snprintf(err, len, "could not run the tiled CPU backward (out of memory)");
        return SA_ERR_MEMORY;
    }
    return SA_OK;
}

/* Checks and launches a tiled forward: items work items of fn over ctx. */
static int run_forward(const sa_attention_params *p, int64_t items, int64_t grain, int num_threads,
                       sa_range_fn fn, tiled_ctx *ctx, char *err, size_t len)
{
    if (p->dtype != SA_F32) {
        snprintf(err, len, "query: the tiled CPU kernel takes float32");
        return SA_ERR_UNSUPPORTED;
    }
    if (items == 0) return SA_OK;
    if (sa_parallel_for(items, grain, num_threads, fn, ctx) != 0 || ctx->failed) {
        snprintf(err, len, "could not run the tiled CPU kernel (out of memory)");
        return SA_ERR_MEMORY;
    }
    return SA_OK;
}

/* Every pass for one (batch, head) after another, so that a later pass merges
 * into outputs and reads queries, keys and values that the earlier pass has
 * just left in the caches (pass after pass over all heads reads them back from
 * memory). */
static void forward_plan_heads(void *opaque, int64_t begin, int64_t end)
{
    tiled_ctx *plan = opaque;
    for (int64_t bh = begin; bh < end; bh++) {
        for (int64_t i = 0; i < plan->num_passes; i++) {
            sa_attention_params pass = *plan->p;
            sa_select_pass(&pass, plan->passes[i], plan->base, i);
            tiled_ctx ctx = tiled_ctx_for(&pass);
            forward_tiles(&ctx, bh * pass.num_tiles, (bh + 1) * pass.num_tiles);
            if (ctx.failed) plan->failed = 1;
        }
    }
}

int sa_cpu_forward_tiled(const sa_attention_params *p, const int64_t (*passes)[6], int64_t num_passes,
                         const int32_t *base, int num_threads, char *err, size_t len)
{
    if (num_passes > 1 && p->batch * p->heads >= 2 * (int64_t)num_threads) {
        tiled_ctx plan = tiled_ctx_for(p);
        plan.passes = passes;
        plan.num_passes = num_passes;
        plan.base = base;
        return run_forward(p, p->batch * p->heads, 1, num_threads, forward_plan_heads, &plan, err, len);
    }
    /* too few (batch, head) pairs to share out: each pass over all of them, tile by tile */
    for (int64_t i = 0; i < num_passes; i++) {
        sa_attention_params pass = *p;
        sa_select_pass(&pass, passes[i], base, i);
        tiled_ctx ctx = tiled_ctx_for(&pass);
        const int64_t items = pass.batch * pass.heads * pass.num_tiles;
        int64_t grain = items / (8 * (int64_t)num_threads);
        grain = grain < 1 ? 1 : (grain > 16 ? 16 : grain);
        const int status = run_forward(&pass, items, grain, num_threads, forward_tiles, &ctx, err, len);
        if (status != SA_OK) return status;
    }
    return SA_OK;
}
