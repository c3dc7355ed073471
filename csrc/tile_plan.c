/* Tile plans from a layout's CSR; see tile_plan.h.
 *
 * One tile at a time: its queries' selected keys are marked in a per-token
 * stamp array (the stamp changes per tile, so nothing is cleared between
 * tiles) and listed once each, then put in ascending order, by a scan of the
 * stamps where the tile reaches many of the tokens and by sorting the short
 * list otherwise. The rank of each key in that order gives its chunk and its
 * bit. Time O(pairs + tiles x min(tokens, keys log keys)).
 *
 * Tiles are independent, so threads take runs of them, each run with
 * scratch of its own: a plan is the same whatever the thread count. */
#include "tile_plan.h"

#include "layout.h"
#include "threads.h"

#include <stdatomic.h>
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

/* A query's image row as a range of tokens, and its column: what the pair
 * selections compare keys with, so that a pair costs at most one (32-bit)
 * division. */
typedef struct {
    int64_t row_start, row_end;
    int32_t column, width;
} query_place;

static query_place place_of(int64_t query, int64_t width)
{
    const int64_t row_start = query / width * width;
    return (query_place){row_start, row_start + width, (int32_t)(query - row_start), (int32_t)width};
}

static int pair_selected(int pairs, const query_place *q, int32_t key)
{
    switch (pairs) {
    case SA_PLAN_PAIRS_SAME_ROW: return key >= q->row_start && key < q->row_end;
    case SA_PLAN_PAIRS_OTHER_ROWS: return key < q->row_start || key >= q->row_end;
    case SA_PLAN_PAIRS_SAME_COLUMN: return key % q->width == q->column;
    case SA_PLAN_PAIRS_OTHER_COLUMNS: return key % q->width != q->column;
    default: return 1;
    }
}

typedef struct {
    const sa_plan_spec *spec;
    atomic_llong all, same_row, same_column;
} pair_count_job;

static void count_pairs_of_rows(void *ctx, int64_t begin, int64_t end)
{
    pair_count_job *job = ctx;
    const sa_plan_spec *s = job->spec;
    const int64_t width = s->width;
    int64_t all = 0, same_row = 0, same_column = 0;
    for (int64_t i = begin; i < end; i++) {
        if (s->left_out != NULL && s->left_out[i]) continue;
        const query_place place = place_of(i, width);
        all += s->row_ptr[i + 1] - s->row_ptr[i];
        for (int64_t e = s->row_ptr[i]; e < s->row_ptr[i + 1]; e++) {
            const int32_t j = s->col_idx[e];
            same_row += pair_selected(SA_PLAN_PAIRS_SAME_ROW, &place, j);
            same_column += pair_selected(SA_PLAN_PAIRS_SAME_COLUMN, &place, j);
        }
    }
    atomic_fetch_add(&job->all, all);
    atomic_fetch_add(&job->same_row, same_row);
    atomic_fetch_add(&job->same_column, same_column);
}

void sa_plan_pair_counts(const sa_plan_spec *s, int num_threads, int64_t counts[SA_PLAN_PAIRS_COUNT])
{
    const int64_t n = s->height * s->width;
    pair_count_job job = {.spec = s};
    atomic_init(&job.all, 0);
    atomic_init(&job.same_row, 0);
    atomic_init(&job.same_column, 0);
    sa_parallel_for(n, (n + 4 * num_threads - 1) / (4 * num_threads), num_threads, count_pairs_of_rows, &job);
    const int64_t all = atomic_load(&job.all), same_row = atomic_load(&job.same_row);
    const int64_t same_column = atomic_load(&job.same_column);
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
    int32_t *rank;  /* [N] or NULL: a key's place in its tile's order (plan_fill only) */
    int32_t next_stamp;
} plan_scratch;

static int scratch_alloc(plan_scratch *w, int64_t n, int with_rank)
{
    w->stamp = calloc((size_t)n, sizeof(int32_t));
    w->keys = malloc((size_t)n * sizeof(int32_t));
    w->rank = with_rank ? malloc((size_t)n * sizeof(int32_t)) : NULL;
    w->next_stamp = 0;
    if (w->stamp && w->keys && (w->rank || !with_rank)) return 0;
    free(w->stamp);
    free(w->keys);
    free(w->rank);
    return -1;
}

static void scratch_free(plan_scratch *w)
{
    free(w->stamp);
    free(w->keys);
    free(w->rank);
}

/* Lists the tile's distinct keys in w->keys, ascending where `ordered` (a
 * count alone needs no order); returns their count, or -1 (with a message)
 * for a key outside the grid. */
static int64_t tile_union(const sa_plan_spec *s, const int32_t *queries, plan_scratch *w, int ordered, char *err,
                          size_t err_len)
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
        const query_place place = place_of(i, s->width);
        for (int64_t e = s->row_ptr[i]; e < s->row_ptr[i + 1]; e++) {
            const int32_t j = s->col_idx[e];
            if (j < 0 || j >= n) {
                snprintf(err, err_len, "col_idx: entry %lld is %d, outside [0, %lld)", (long long)e, j, (long long)n);
                return -1;
            }
            if (w->stamp[j] == stamp || !pair_selected(s->pairs, &place, j)) continue;
            w->stamp[j] = stamp;
            w->keys[count++] = j;
        }
    }
    if (!ordered) return count;
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

/* What a parallel planner call shares: its inputs and outputs, and the
 * first failure (a key off the grid, or scratch that could not be had),
 * after which every thread stops at its next tile. */
typedef struct {
    const sa_plan_spec *spec;
    const int64_t *tiles; /* union sizes: the tiles asked for, or NULL for all */
    int64_t *sizes;
    const int32_t *chunk_ptr; /* fill */
    int32_t *queries, *keys;
    uint64_t *masks;
    atomic_int failed;
    char err[256];
} plan_job;

static void fail_job(plan_job *job, const char *message)
{
    int expected = 0;
    if (atomic_compare_exchange_strong(&job->failed, &expected, 1))
        snprintf(job->err, sizeof(job->err), "%s", message);
}

/* Threads for n tokens' scratch (three int32 arrays each): up to num_threads,
 * while all of it stays within 1 GiB. */
static int planner_threads(int64_t n, int num_threads)
{
    const int64_t fits = ((int64_t)1 << 30) / (12 * (n > 0 ? n : 1));
    if (num_threads < 1) num_threads = 1;
    return fits < 1 ? 1 : (fits < num_threads ? (int)fits : num_threads);
}

/* Runs of tiles, about four per thread, so that tiles of unequal cost even out. */
static int64_t tile_grain(int64_t count, int threads)
{
    return (count + 4 * (int64_t)threads - 1) / (4 * (int64_t)threads);
}

static void union_sizes_of_run(void *ctx, int64_t begin, int64_t end)
{
    plan_job *job = ctx;
    const sa_plan_spec *s = job->spec;
    plan_scratch w;
    if (scratch_alloc(&w, s->height * s->width, 0) < 0) {
        fail_job(job, "out of memory for the tile planner's scratch");
        return;
    }
    int32_t queries[SA_PLAN_TILE];
    char err[256];
    for (int64_t t = begin; t < end && !atomic_load(&job->failed); t++) {
        tile_queries(s, job->tiles ? job->tiles[t] : t, queries);
        job->sizes[t] = tile_union(s, queries, &w, 0, err, sizeof(err));
        if (job->sizes[t] < 0) fail_job(job, err);
    }
    scratch_free(&w);
}

static int finish_job(plan_job *job, int status, char *err, size_t err_len)
{
    if (status < 0) fail_job(job, "could not start the tile planner's threads");
    if (!atomic_load(&job->failed)) return 0;
    snprintf(err, err_len, "%s", job->err);
    return -1;
}

int sa_plan_union_sizes(const sa_plan_spec *s, const int64_t *tiles, int64_t count, int64_t *sizes, int num_threads,
                        char *err, size_t err_len)
{
    plan_job job = {.spec = s, .tiles = tiles, .sizes = sizes};
    atomic_init(&job.failed, 0);
    const int threads = planner_threads(s->height * s->width, num_threads);
    const int status = sa_parallel_for(count, tile_grain(count, threads), threads, union_sizes_of_run, &job);
    return finish_job(&job, status, err, err_len);
}

static void fill_run(void *ctx, int64_t begin, int64_t end)
{
    plan_job *job = ctx;
    const sa_plan_spec *s = job->spec;
    plan_scratch w;
    if (scratch_alloc(&w, s->height * s->width, 1) < 0) {
        fail_job(job, "out of memory for the tile planner's scratch");
        return;
    }
    char err[256];
    for (int64_t t = begin; t < end && !atomic_load(&job->failed); t++) {
        int32_t *tile = job->queries + t * SA_PLAN_TILE;
        tile_queries(s, t, tile);
        const int64_t count = tile_union(s, tile, &w, 1, err, sizeof(err));
        if (count < 0) {
            fail_job(job, err);
            break;
        }
        const int64_t first = job->chunk_ptr[t], chunks = (count + SA_PLAN_TILE - 1) / SA_PLAN_TILE;
        if (job->chunk_ptr[t + 1] - first != chunks) {
            snprintf(err, sizeof(err), "chunk_ptr: tile %lld has %lld keys, %lld chunks, but chunk_ptr gives it %lld",
                     (long long)t, (long long)count, (long long)chunks, (long long)(job->chunk_ptr[t + 1] - first));
            fail_job(job, err);
            break;
        }
        int32_t *keys = job->keys + first * SA_PLAN_TILE;
        uint64_t *masks = job->masks + first * SA_PLAN_TILE;
        for (int64_t c = 0; c < chunks * SA_PLAN_TILE; c++) {
            keys[c] = -1;
            masks[c] = 0;
        }
        for (int64_t r = 0; r < count; r++) {
            w.rank[w.keys[r]] = (int32_t)r;
            keys[r] = w.keys[r];
        }
        for (int slot = 0; slot < SA_PLAN_TILE; slot++) {
            const int64_t i = tile[slot];
            if (i < 0) continue;
            const query_place place = place_of(i, s->width);
            for (int64_t e = s->row_ptr[i]; e < s->row_ptr[i + 1]; e++) {
                const int32_t j = s->col_idx[e];
                if (!pair_selected(s->pairs, &place, j)) continue;
                const int32_t r = w.rank[j];
                masks[r / SA_PLAN_TILE * SA_PLAN_TILE + slot] |= (uint64_t)1 << (r % SA_PLAN_TILE);
            }
        }
    }
    scratch_free(&w);
}

int sa_plan_fill(const sa_plan_spec *s, const int32_t *chunk_ptr, int32_t *queries, int32_t *keys, uint64_t *masks,
                 int num_threads, char *err, size_t err_len)
{
    const int64_t num_tiles = sa_plan_num_tiles(s);
    plan_job job = {.spec = s, .chunk_ptr = chunk_ptr, .queries = queries, .keys = keys, .masks = masks};
    atomic_init(&job.failed, 0);
    const int threads = planner_threads(s->height * s->width, num_threads);
    const int status = sa_parallel_for(num_tiles, tile_grain(num_tiles, threads), threads, fill_run, &job);
    return finish_job(&job, status, err, err_len);
}
