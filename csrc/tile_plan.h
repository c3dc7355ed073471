/* Tile plans built in C from a layout's CSR (see sparse_attention/_tiles.py
 * for what a plan is). The NumPy planner this replaces grew with the pairs in
 * time and memory (44 s and 13 GB for RANDOM 50% at 128 x 128); here scratch
 * is three int32 arrays of one entry per token for each thread, and the plan
 * itself.
 *
 * A pass tiles the grid into tile_h x tile_w patches (tile_h * tile_w <= 64),
 * row-major; query (y, x) sits at slot (y % tile_h) * tile_w + x % tile_w of
 * tile (y / tile_h) * tiles_x + x / tile_w. A tile's keys are the distinct
 * keys of its queries' selected pairs, ascending, 64 to a chunk. */
#ifndef SA_TILE_PLAN_H
#define SA_TILE_PLAN_H

#include <stddef.h>
#include <stdint.h>

#define SA_PLAN_TILE 64

/* Which of the layout's pairs a pass holds. */
typedef enum {
    SA_PLAN_PAIRS_ALL = 0,
    SA_PLAN_PAIRS_SAME_ROW = 1, /* query and key on one image row */
    SA_PLAN_PAIRS_OTHER_ROWS = 2,
    SA_PLAN_PAIRS_SAME_COLUMN = 3,
    SA_PLAN_PAIRS_OTHER_COLUMNS = 4,
    SA_PLAN_PAIRS_COUNT = 5
} sa_plan_pairs;

typedef struct {
    int64_t height, width;
    const int64_t *row_ptr;  /* [N + 1], checked by sa_plan_check */
    const int32_t *col_idx;  /* [nnz] */
    const uint8_t *left_out; /* [N] or NULL: rows kept out of the plan (their queries read -1) */
    int64_t tile_h, tile_w;
    int pairs; /* sa_plan_pairs */
} sa_plan_spec;

/* 0 when the spec is usable (CSR offsets ascending from 0, keys in range, a
 * tile shape that fits the grid and 64 slots); else -1 and a message. */
int sa_plan_check(const sa_plan_spec *spec, int64_t nnz, char *err, size_t err_len);

int64_t sa_plan_num_tiles(const sa_plan_spec *spec);

/* counts[k] = the pairs selection k holds (rows left out not counted), for
 * every sa_plan_pairs k. Keys are not checked here. */
void sa_plan_pair_counts(const sa_plan_spec *spec, int num_threads, int64_t counts[SA_PLAN_PAIRS_COUNT]);

/* sizes[i] = the number of distinct keys of tile tiles[i] (every tile, in
 * order, when tiles is NULL). Returns 0, or -1 when scratch could not be had
 * or a key lies off the grid. num_threads: at most that many threads (fewer
 * where their scratch, 12 bytes a token each, would pass 1 GiB). */
int sa_plan_union_sizes(const sa_plan_spec *spec, const int64_t *tiles, int64_t count, int64_t *sizes,
                        int num_threads, char *err, size_t err_len);

/* Writes queries [tiles, 64] (-1 pads), keys [chunks, 64] (-1 pads) and
 * masks [chunks, 64] (bit c of word r: slot r attends key c of the chunk),
 * given chunk_ptr [tiles + 1] from the union sizes. Returns 0, or -1 when
 * scratch could not be had or chunk_ptr disagrees with the layout. */
int sa_plan_fill(const sa_plan_spec *spec, const int32_t *chunk_ptr, int32_t *queries, int32_t *keys,
                 uint64_t *masks, int num_threads, char *err, size_t err_len);

#endif /* SA_TILE_PLAN_H */
