/* Tile plans from a layout's CSR; see tile_plan.h.
 *
 * One tile at a time: its queries' selected keys are marked in a per-token
 * stamp array (the stamp changes per tile, so nothing is cleared between
 * tiles) and listed once each, then put in ascending order, by a scan of the
 * stamps where the tile reaches many of the tokens and by sorting the short
 * list otherwise. The rank of each key in that order gives its chunk and its
 * bit. Time O(pairs + tiles x min(tokens, keys log keys)). */
#include "tile_plan.h"

#include "layout.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int64_t sa_plan_num_tiles(const sa_plan_spec *s)
{
    const int64_t tiles_y = (s->height + s->tile_h - 1) / s->tile_h;
    const int64_t tiles_x = (s->width + s->tile_w - 1) / s->tile_w;
    return tiles_y * tiles_x;
}

int sa_plan_check(const sa_plan_spec *s, int64_t nnz, char *err, size_t err_len)
{
    if (s->height < 1 || s->width < 1 || s->height * s->width >= INT32_MAX) {
        snprintf(err, err_len, "height, width: expected a grid of 1 to 2**31 - 2 tokens, got %lld x %lld",
                 (long long)s->height, (long long)s->width);
        return -1;
    }
    if (s->tile_h < 1 || s->tile_w < 1 || s->tile_h > s->height || s->tile_w > s->width ||
        s->tile_h * s->tile_w > SA_PLAN_TILE) {
        snprintf(err, err_len,
                 "tile_shape: expected rows and columns within the %lld x %lld grid and at most %d slots, "
                 "got %lld x %lld",
                 (long long)s->height, (long long)s->width, SA_PLAN_TILE, (long long)s->tile_h,
                 (long long)s->tile_w);
        return -1;
    }
    if (s->pairs < 0 || s->pairs >= SA_PLAN_PAIRS_COUNT) {
        snprintf(err, err_len, "pairs: expected 0 to %d, got %d", SA_PLAN_PAIRS_COUNT - 1, s->pairs);
        return -1;
    }
    /* keys are checked where they are read */
    return sa_layout_check_offsets(s->height * s->width, s->row_ptr, nnz, "row_ptr", "col_idx", err, err_len);
}

static int pair_selected(int pairs, int64_t query, int64_t key, int64_t width)
{
    switch (pairs) {
    case SA_PLAN_PAIRS_SAME_ROW: return query / width == key / width;
    case SA_PLAN_PAIRS_OTHER_ROWS: return query / width != key / width;
    case SA_PLAN_PAIRS_SAME_COLUMN: return query % width == key % width;
    case SA_PLAN_PAIRS_OTHER_COLUMNS: return query % width != key % width;
    default: return 1;
    }
}

void sa_plan_pair_counts(const sa_plan_spec *s, int64_t counts[SA_PLAN_PAIRS_COUNT])
{
    const int64_t n = s->height * s->width, width = s->width;
    int64_t all = 0, same_row = 0, same_column = 0;
    for (int64_t i = 0; i < n; i++) {
        if (s->left_out != NULL && s->left_out[i]) continue;
        const int64_t row_start = i / width * width, column = i % width;
        all += s->row_ptr[i + 1] - s->row_ptr[i];
        for (int64_t e = s->row_ptr[i]; e < s->row_ptr[i + 1]; e++) {
            const int64_t j = s->col_idx[e];
            same_row += j >= row_start && j < row_start + width;
            same_column += j % width == column;
        }
    }
    counts[SA_PLAN_PAIRS_ALL] = all;
    counts[SA_PLAN_PAIRS_SAME_ROW] = same_row;
    counts[SA_PLAN_PAIRS_OTHER_ROWS] = all - same_row;
    counts[SA_PLAN_PAIRS_SAME_COLUMN] = same_column;
    counts[SA_PLAN_PAIRS_OTHER_COLUMNS] = all - same_column;
}

/* The tile's queries in slot order (-1: no token there, or a row left out). */
static void tile_queries(const sa_plan_spec *s, int64_t tile, int32_t *queries)
{
    const int64_t tiles_x = (s->width + s->tile_w - 1) / s->tile_w;
    const int64_t y0 = tile / tiles_x * s->tile_h, x0 = tile % tiles_x * s->tile_w;
    for (int slot = 0; slot < SA_PLAN_TILE; slot++) queries[slot] = -1;
    for (int64_t dy = 0; dy < s->tile_h && y0 + dy < s->height; dy++)
        for (int64_t dx = 0; dx < s->tile_w && x0 + dx < s->width; dx++) {
            const int64_t token = (y0 + dy) * s->width + x0 + dx;
            if (s->left_out == NULL || !s->left_out[token]) queries[dy * s->tile_w + dx] = (int32_t)token;
        }
}

static int ascending(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

typedef struct {
    int32_t *stamp; /* [N]: the stamp of the last tile that listed the token */
    int32_t *keys;  /* [N]: the current tile's keys */
    int32_t next_stamp;
} plan_scratch;

static int scratch_alloc(plan_scratch *w, int64_t n, char *err, size_t err_len)
{
    w->stamp = calloc((size_t)n, sizeof(int32_t));
    w->keys = malloc((size_t)n * sizeof(int32_t));
    w->next_stamp = 0;
    if (w->stamp && w->keys) return 0;
    free(w->stamp);
    free(w->keys);
    snprintf(err, err_len, "out of memory for the tile planner's scratch (%lld tokens)", (long long)n);
    return -1;
}

static void scratch_free(plan_scratch *w)
{
    free(w->stamp);
    free(w->keys);
}

/* Lists the tile's distinct keys in w->keys, ascending; returns their count,
 * or -1 (with a message) for a key outside the grid. */
static int64_t tile_union(const sa_plan_spec *s, const int32_t *queries, plan_scratch *w, char *err, size_t err_len)
{
    const int64_t n = s->height * s->width;
    if (w->next_stamp == INT32_MAX) {
        memset(w->stamp, 0, (size_t)n * sizeof(int32_t));
        w->next_stamp = 0;
    }
    const int32_t stamp = ++w->next_stamp;
    int64_t count = 0;
    for (int slot = 0; slot < SA_PLAN_TILE; slot++) {
        const int64_t i = queries[slot];
        if (i < 0) continue;
        for (int64_t e = s->row_ptr[i]; e < s->row_ptr[i + 1]; e++) {
            const int32_t j = s->col_idx[e];
            if (j < 0 || j >= n) {
                snprintf(err, err_len, "col_idx: entry %lld is %d, outside [0, %lld)", (long long)e, j, (long long)n);
                return -1;
            }
            if (w->stamp[j] == stamp || !pair_selected(s->pairs, i, j, s->width)) continue;
            w->stamp[j] = stamp;
            w->keys[count++] = j;
        }
    }
    if (count * 16 > n) {
        /* most tokens: the scan is cheaper than the sort */
        int64_t at = 0;
        for (int64_t j = 0; j < n; j++)
            if (w->stamp[j] == stamp) w->keys[at++] = (int32_t)j;
    } else {
        qsort(w->keys, (size_t)count, sizeof(int32_t), ascending);
    }
    return count;
}

int sa_plan_union_sizes(const sa_plan_spec *s, const int64_t *tiles, int64_t count, int64_t *sizes, char *err,
                        size_t err_len)
{
    plan_scratch w;
    if (scratch_alloc(&w, s->height * s->width, err, err_len) < 0) return -1;
    int32_t queries[SA_PLAN_TILE];
    int status = 0;
    for (int64_t t = 0; t < count && status == 0; t++) {
        tile_queries(s, tiles ? tiles[t] : t, queries);
        sizes[t] = tile_union(s, queries, &w, err, err_len);
        if (sizes[t] < 0) status = -1;
    }
    scratch_free(&w);
    return status;
}

int sa_plan_fill(const sa_plan_spec *s, const int32_t *chunk_ptr, int32_t *queries, int32_t *keys, uint64_t *masks,
                 char *err, size_t err_len)
{
    const int64_t num_tiles = sa_plan_num_tiles(s);
    const int64_t num_chunks = chunk_ptr[num_tiles];
    for (int64_t c = 0; c < num_chunks * SA_PLAN_TILE; c++) {
        keys[c] = -1;
        masks[c] = 0;
    }
    plan_scratch w;
    if (scratch_alloc(&w, s->height * s->width, err, err_len) < 0) return -1;
    /* the key's rank in its tile's order, reusing the stamps' companion array */
    int32_t *rank = malloc((size_t)(s->height * s->width) * sizeof(int32_t));
    if (rank == NULL) {
        scratch_free(&w);
        snprintf(err, err_len, "out of memory for the tile planner's ranks");
        return -1;
    }
    int status = 0;
    for (int64_t t = 0; t < num_tiles && status == 0; t++) {
        int32_t *tile = queries + t * SA_PLAN_TILE;
        tile_queries(s, t, tile);
        const int64_t count = tile_union(s, tile, &w, err, err_len);
        if (count < 0) {
            status = -1;
            break;
        }
        const int64_t first = chunk_ptr[t], chunks = (count + SA_PLAN_TILE - 1) / SA_PLAN_TILE;
        if (chunk_ptr[t + 1] - first != chunks) {
            snprintf(err, err_len, "chunk_ptr: tile %lld has %lld keys, %lld chunks, but chunk_ptr gives it %lld",
                     (long long)t, (long long)count, (long long)chunks, (long long)(chunk_ptr[t + 1] - first));
            status = -1;
            break;
        }
        for (int64_t r = 0; r < count; r++) {
            rank[w.keys[r]] = (int32_t)r;
            keys[first * SA_PLAN_TILE + r] = w.keys[r];
        }
        for (int slot = 0; slot < SA_PLAN_TILE; slot++) {
            const int64_t i = tile[slot];
            if (i < 0) continue;
            for (int64_t e = s->row_ptr[i]; e < s->row_ptr[i + 1]; e++) {
                const int32_t j = s->col_idx[e];
                if (!pair_selected(s->pairs, i, j, s->width)) continue;
                const int32_t r = rank[j];
                masks[(first + r / SA_PLAN_TILE) * SA_PLAN_TILE + slot] |= (uint64_t)1 << (r % SA_PLAN_TILE);
            }
        }
    }
    free(rank);
    scratch_free(&w);
    return status;
}
