/* Layout builders. Each pattern enumerates one row's keys in ascending order in
 * O(H + degree) time, so a whole layout costs O(N * H + nnz), never O(N^2) unless
 * the pattern itself is dense. */
#include "layout.h"

#include "threads.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const sa_layout_spec *spec;
    int64_t num_tokens;
    int64_t radius;           /* kernel_size / 2 */
    int64_t random_keys;      /* RANDOM: K keys per row, i itself included */
    int64_t *globals;         /* LONGFORMER: sorted global tokens */
    unsigned char *is_global; /* LONGFORMER: N flags */
    int32_t *window;          /* LONGFORMER: scratch for one window */
    uint64_t *bitmap;         /* RANDOM: N bits of scratch, kept zero between rows */
} row_builder;

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

int sa_layout_validate(const sa_layout_spec *s, char *err, size_t n)
{
    if (s->pattern < 0 || s->pattern >= SA_PATTERN_COUNT) {
        snprintf(err, n, "pattern: unknown pattern id %d", s->pattern);
        return -1;
    }
    if (s->height < 1) {
        snprintf(err, n, "height: expected >= 1, got %lld", (long long)s->height);
        return -1;
    }
    if (s->width < 1) {
        snprintf(err, n, "width: expected >= 1, got %lld", (long long)s->width);
        return -1;
    }
    if (s->height > INT32_MAX / s->width) {
        snprintf(err, n,
                 "height, width: %lld x %lld tokens do not fit 32-bit token indices "
                 "(at most %d tokens)",
                 (long long)s->height, (long long)s->width, INT32_MAX);
        return -1;
    }
    if (s->kernel_size < 1) {
        snprintf(err, n, "kernel_size: expected >= 1, got %lld", (long long)s->kernel_size);
        return -1;
    }
    if (s->block_size < 1) {
        snprintf(err, n, "block_size: expected >= 1, got %lld", (long long)s->block_size);
        return -1;
    }
    if (s->stride < 1) {
        snprintf(err, n, "stride: expected >= 1, got %lld", (long long)s->stride);
        return -1;
    }
    if (s->num_global_tokens < 0) {
        snprintf(err, n, "num_global_tokens: expected >= 0, got %lld",
                 (long long)s->num_global_tokens);
        return -1;
    }
    if (!(s->attention_ratio > 0.0 && s->attention_ratio <= 1.0)) {
        snprintf(err, n, "attention_ratio: expected a value in (0, 1], got %g",
                 s->attention_ratio);
        return -1;
    }
    return 0;
}

/* SplitMix64 (Steele, Lea, Flood 2014): the RANDOM pattern's documented generator. */
static uint64_t splitmix64_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Uniform integer in [0, bound) by the multiply-shift map (bias below 2^-32 here). */
static uint64_t uniform_below(uint64_t *state, uint64_t bound)
{
    return (uint64_t)(((unsigned __int128)splitmix64_next(state) * bound) >> 64);
}

/* Appends first..last to out at count; with out NULL (counting) only the count moves. */
static int64_t emit_range(int32_t *out, int64_t count, int64_t first, int64_t last)
{
    if (!out) return last >= first ? count + (last - first + 1) : count;
    for (int64_t t = first; t <= last; t++) out[count++] = (int32_t)t;
    return count;
}

static int64_t row_dense(const row_builder *b, int64_t i, int32_t *out)
{
    (void)i;
    return emit_range(out, 0, 0, b->num_tokens - 1);
}

static int64_t row_axial(const row_builder *b, int64_t i, int32_t *out)
{
    int64_t w = b->spec->width, h = b->spec->height;
    int64_t yi = i / w, xi = i % w, count = 0;
    for (int64_t y = 0; y < h; y++) {
        if (y == yi) {
            count = emit_range(out, count, y * w, y * w + w - 1);
        } else {
            count = emit_range(out, count, y * w + xi, y * w + xi);
        }
    }
    return count;
}

static int64_t row_block(const row_builder *b, int64_t i, int32_t *out)
{
    int64_t w = b->spec->width, h = b->spec->height, bs = b->spec->block_size;
    int64_t y0 = (i / w) / bs * bs, x0 = (i % w) / bs * bs, count = 0;
    for (int64_t y = y0; y < min64(h, y0 + bs); y++) {
        count = emit_range(out, count, y * w + x0, y * w + min64(w, x0 + bs) - 1);
    }
    return count;
}

/* Keys of the clipped window around i, ascending. */
static int64_t window_keys(const row_builder *b, int64_t i, int32_t *out)
{
    int64_t w = b->spec->width, h = b->spec->height, r = b->radius;
    int64_t yi = i / w, xi = i % w, count = 0;
    int64_t x_lo = max64(0, xi - r), x_hi = min64(w - 1, xi + r);
    for (int64_t y = max64(0, yi - r); y <= min64(h - 1, yi + r); y++) {
        count = emit_range(out, count, y * w + x_lo, y * w + x_hi);
    }
    return count;
}

static int64_t row_longformer(const row_builder *b, int64_t i, int32_t *out)
{
    if (b->is_global[i]) {
        return row_dense(b, i, out);
    }
    int64_t n_window = window_keys(b, i, b->window);
    int64_t n_global = min64(b->spec->num_global_tokens, b->num_tokens);
    int64_t a = 0, g = 0, count = 0;
    while (a < n_window || g < n_global) {
        int64_t next;
        if (g >= n_global || (a < n_window && b->window[a] < b->globals[g])) {
            next = b->window[a++];
        } else if (a >= n_window || b->globals[g] < b->window[a]) {
            next = b->globals[g++];
        } else { /* the same token in both lists */
            next = b->window[a++];
            g++;
        }
        if (out) out[count] = (int32_t)next;
        count++;
    }
    return count;
}

static int64_t row_strided(const row_builder *b, int64_t i, int32_t *out)
{
    int64_t w = b->spec->width, h = b->spec->height, r = b->radius, s = b->spec->stride;
    int64_t yi = i / w, xi = i % w, count = 0;
    int64_t x_lo = max64(0, xi - r), x_hi = min64(w - 1, xi + r);
    int64_t x_phase = xi % s; /* columns x with (xi - x) % s == 0 */
    for (int64_t y = 0; y < h; y++) {
        int64_t dy = yi - y;
        int in_band = dy >= -r && dy <= r;
        int on_stride = dy % s == 0;
        int64_t row = y * w;
        if (in_band && on_stride) {
            for (int64_t x = x_phase; x < x_lo; x += s) count = emit_range(out, count, row + x, row + x);
            count = emit_range(out, count, row + x_lo, row + x_hi);
            int64_t x = x_hi + 1 + ((x_phase - (x_hi + 1)) % s + s) % s;
            for (; x < w; x += s) count = emit_range(out, count, row + x, row + x);
        } else if (in_band) {
            count = emit_range(out, count, row + x_lo, row + x_hi);
        } else if (on_stride) {
            for (int64_t x = x_phase; x < w; x += s) count = emit_range(out, count, row + x, row + x);
        }
    }
    return count;
}

/* Row i keeps itself and K-1 distinct others drawn by Floyd's algorithm from the
 * N-1 other tokens, with a SplitMix64 stream seeded from (seed, i). */
static int64_t row_random(const row_builder *b, int64_t i, int32_t *out)
{
    int64_t n = b->num_tokens, draws = b->random_keys - 1;
    if (out == NULL) {
        return b->random_keys;
    }
    uint64_t state = b->spec->seed ^ (0xD1B54A32D192ED03ULL * (uint64_t)(i + 1));
    uint64_t *bits = b->bitmap;
    int64_t pool = n - 1;
    bits[i >> 6] |= 1ULL << (i & 63);
    for (int64_t t = pool - draws; t < pool; t++) {
        int64_t pick = (int64_t)uniform_below(&state, (uint64_t)t + 1);
        int64_t token = pick < i ? pick : pick + 1;
        if (bits[token >> 6] & (1ULL << (token & 63))) {
            token = t < i ? t : t + 1;
        }
        bits[token >> 6] |= 1ULL << (token & 63);
    }
    int64_t count = 0;
    for (int64_t word = 0; word < (n + 63) / 64; word++) {
        uint64_t v = bits[word];
        while (v) {
            int bit = __builtin_ctzll(v);
            out[count++] = (int32_t)(word * 64 + bit);
            v &= v - 1;
        }
        bits[word] = 0;
    }
    return count;
}

typedef int64_t (*row_fn)(const row_builder *, int64_t, int32_t *);

static row_fn pick_row_fn(int pattern)
{
    switch (pattern) {
    case SA_PATTERN_AXIAL: return row_axial;
    case SA_PATTERN_BLOCK: return row_block;
    case SA_PATTERN_LONGFORMER: return row_longformer;
    case SA_PATTERN_STRIDED: return row_strided;
    case SA_PATTERN_RANDOM: return row_random;
    default: return row_dense;
    }
}

static void builder_free(row_builder *b)
{
    free(b->globals);
    free(b->is_global);
    free(b->window);
    free(b->bitmap);
}

static int builder_init(row_builder *b, const sa_layout_spec *spec, char *err, size_t n)
{
    memset(b, 0, sizeof(*b));
    b->spec = spec;
    b->num_tokens = spec->height * spec->width;
    b->radius = spec->kernel_size / 2;
    double k = round(spec->attention_ratio * (double)b->num_tokens);
    b->random_keys = (int64_t)k < 1 ? 1 : min64((int64_t)k, b->num_tokens);
    if (spec->pattern == SA_PATTERN_LONGFORMER) {
        /* a map smaller than g tokens makes every token global */
        int64_t g = min64(spec->num_global_tokens, b->num_tokens);
        int64_t side = min64(2 * b->radius + 1, max64(spec->height, spec->width));
        b->globals = malloc(sizeof(int64_t) * (size_t)(g > 0 ? g : 1));
        b->is_global = calloc((size_t)b->num_tokens, 1);
        b->window = malloc(sizeof(int32_t) * (size_t)(side * side));
        if (!b->globals || !b->is_global || !b->window) goto oom;
        for (int64_t t = 0; t < g; t++) {
            /* floor((t + 0.5) * N / g) in integers */
            b->globals[t] = ((2 * t + 1) * b->num_tokens) / (2 * g);
            b->is_global[b->globals[t]] = 1;
        }
    }
    if (spec->pattern == SA_PATTERN_RANDOM) {
        b->bitmap = calloc((size_t)(b->num_tokens + 63) / 64, sizeof(uint64_t));
        if (!b->bitmap) goto oom;
    }
    return 0;
oom:
    builder_free(b);
    snprintf(err, n, "out of memory while preparing the layout builder");
    return -1;
}

/* Rows in parallel: each range has its own builder (the scratch is per row
 * range), and a row's keys depend on nothing but the spec and the row, so the
 * layout is the same for any thread count. */
typedef struct {
    const sa_layout_spec *spec;
    int64_t *degrees;        /* count: row i's degree goes to degrees[i + 1] */
    const int64_t *row_ptr;  /* fill: where each row starts in col_idx */
    int32_t *col_idx;        /* fill; NULL when counting */
    atomic_int out_of_memory;
} rows_job;

static void rows_range(void *opaque, int64_t begin, int64_t end)
{
    rows_job *job = opaque;
    row_builder b;
    char message[128]; /* builder_init's failure is out of memory, reported by run_rows */
    if (builder_init(&b, job->spec, message, sizeof(message)) < 0) {
        atomic_store(&job->out_of_memory, 1);
        return;
    }
    row_fn fn = pick_row_fn(job->spec->pattern);
    for (int64_t i = begin; i < end; i++) {
        if (job->col_idx)
            fn(&b, i, job->col_idx + job->row_ptr[i]);
        else
            job->degrees[i + 1] = fn(&b, i, NULL); /* counting: no keys written */
    }
    builder_free(&b);
}

/* Ranges of at least 256 rows and at most 64 ranges: each range pays for a
 * builder. Grids under 4096 tokens take one range. */
static int64_t rows_grain(const sa_layout_spec *spec)
{
    int64_t n = spec->height * spec->width;
    if (n < 4096) return n;
    int64_t grain = (n + 63) / 64;
    return grain < 256 ? 256 : grain;
}

static int run_rows(rows_job *job, int num_threads, const char *what, char *err, size_t n)
{
    int64_t tokens = job->spec->height * job->spec->width;
    if (sa_parallel_for(tokens, rows_grain(job->spec), num_threads, rows_range, job) < 0 ||
        atomic_load(&job->out_of_memory)) {
        snprintf(err, n, "out of memory while %s the layout", what);
        return -1;
    }
    return 0;
}

int sa_layout_count(const sa_layout_spec *spec, int64_t *row_ptr, int num_threads, char *err, size_t n)
{
    rows_job job = {spec, row_ptr, NULL, NULL, 0};
    row_ptr[0] = 0;
    if (run_rows(&job, num_threads, "counting", err, n) < 0) return -1;
    int64_t tokens = spec->height * spec->width;
    for (int64_t i = 0; i < tokens; i++) {
        int64_t degree = row_ptr[i + 1];
        if (row_ptr[i] > INT64_MAX / 8 - degree) {
            snprintf(err, n, "the layout's nnz exceeds what a 64-bit offset can address");
            return -1;
        }
        row_ptr[i + 1] = row_ptr[i] + degree;
    }
    return 0;
}

int sa_layout_fill(const sa_layout_spec *spec, const int64_t *row_ptr, int32_t *col_idx, int num_threads,
                   char *err, size_t n)
{
    rows_job job = {spec, NULL, row_ptr, col_idx, 0};
    return run_rows(&job, num_threads, "filling", err, n);
}

/* The transpose's scatter, one range of columns per part: every part reads all
 * of col_idx but writes only its own columns, so the parts share no cursor,
 * rows stay ascending within a column, and each part's open write positions
 * (one cache line per column) are 1 / parts of the whole. */
typedef struct {
    int64_t num_tokens, parts;
    const int64_t *row_ptr;
    const int32_t *col_idx;
    int64_t *cursor;
    int32_t *row_idx;
} scatter_job;

static void scatter_columns(void *opaque, int64_t begin, int64_t end)
{
    const scatter_job *job = opaque;
    for (int64_t part = begin; part < end; part++) {
        const int64_t lo = job->num_tokens * part / job->parts, hi = job->num_tokens * (part + 1) / job->parts;
        int64_t *cursor = job->cursor;
        for (int64_t i = 0; i < job->num_tokens; i++) {
            for (int64_t p = job->row_ptr[i]; p < job->row_ptr[i + 1]; p++) {
                const int64_t j = job->col_idx[p];
                if (j >= lo && j < hi) job->row_idx[cursor[j]++] = (int32_t)i;
            }
        }
    }
}

int sa_layout_transpose(int64_t num_tokens, const int64_t *row_ptr, const int32_t *col_idx,
                        int64_t *col_ptr, int32_t *row_idx, int num_threads)
{
    int64_t *cursor = calloc((size_t)num_tokens + 1, sizeof(int64_t));
    if (!cursor) return -1;
    memset(col_ptr, 0, sizeof(int64_t) * (size_t)(num_tokens + 1));
    for (int64_t p = 0; p < row_ptr[num_tokens]; p++) {
        col_ptr[col_idx[p] + 1]++;
    }
    for (int64_t j = 0; j < num_tokens; j++) {
        col_ptr[j + 1] += col_ptr[j];
        cursor[j] = col_ptr[j];
    }
    /* small layouts in one pass: a second reader of col_idx costs more than it saves */
    int parts = row_ptr[num_tokens] < (1 << 20) || num_threads < 2 ? 1 : num_threads;
    scatter_job job = {num_tokens, parts, row_ptr, col_idx, cursor, row_idx};
    int status = sa_parallel_for(parts, 1, parts, scatter_columns, &job);
    free(cursor);
    return status < 0 ? -1 : 0;
}

int sa_layout_check_offsets(int64_t num_tokens, const int64_t *row_ptr, int64_t nnz, const char *ptr_name,
                            const char *idx_name, char *err, size_t n)
{
    if (row_ptr[0] != 0 || row_ptr[num_tokens] != nnz) {
        snprintf(err, n, "%s: expected offsets from 0 to %lld (the length of %s), got %lld to %lld", ptr_name,
                 (long long)nnz, idx_name, (long long)row_ptr[0], (long long)row_ptr[num_tokens]);
        return -1;
    }
    for (int64_t i = 0; i < num_tokens; i++) {
        if (row_ptr[i + 1] < row_ptr[i]) {
            snprintf(err, n, "%s: offsets decrease at row %lld (%lld, then %lld)", ptr_name, (long long)i,
                     (long long)row_ptr[i], (long long)row_ptr[i + 1]);
            return -1;
        }
    }
    return 0;
}

int sa_layout_check_csr(int64_t num_tokens, const int64_t *row_ptr, const int32_t *col_idx, int64_t nnz,
                        char *err, size_t n)
{
    if (sa_layout_check_offsets(num_tokens, row_ptr, nnz, "indptr", "indices", err, n) < 0) return -1;
    for (int64_t i = 0; i < num_tokens; i++) {
        const int64_t begin = row_ptr[i], end = row_ptr[i + 1];
        for (int64_t p = begin; p < end; p++) {
            const int32_t key = col_idx[p];
            if (key < 0 || key >= num_tokens) {
                snprintf(err, n, "indices: row %lld holds key %d, outside [0, %lld)", (long long)i, key,
                         (long long)num_tokens);
                return -1;
            }
            if (p > begin && key <= col_idx[p - 1]) {
                snprintf(err, n, "indices: the keys of row %lld must rise strictly (no repeats), got %d after %d",
                         (long long)i, key, col_idx[p - 1]);
                return -1;
            }
        }
    }
    return 0;
}

typedef struct {
    int64_t height, width, lattice_stride, num_keys;
    const int64_t *row_ptr;
    const int32_t *col_idx;
    const int32_t *keys;
    const uint8_t *in_window; /* [(2H - 1) x (2W - 1)]: offset (dy, dx) at (dy + H - 1, dx + W - 1) */
    const int32_t *window_sums; /* [2H x 2W]: offsets with table row < r and column < c, at (r, c) */
    const uint8_t *is_key;    /* [N] */
    const uint8_t *listed;    /* [N] */
    const int32_t *residue;   /* [H + W]: each row's, then each column's, coordinate modulo the lattice's stride */
    atomic_int mismatch;
} stencil_job;

/* How many of a coordinate's class modulo stride lie on an axis of size tokens. */
static int64_t class_count(int64_t coord, int64_t size, int64_t stride)
{
    return (size - 1 - coord % stride) / stride + 1;
}

/* Whether query (y, x) reaches key (ky, kx) through the window or the lattice. */
static int stencil_reaches(const stencil_job *job, int64_t y, int64_t x, int64_t ky, int64_t kx)
{
    const int64_t h = job->height, w = job->width;
    if (job->in_window[(ky - y + h - 1) * (2 * w - 1) + kx - x + w - 1]) return 1;
    return job->lattice_stride && job->residue[ky] == job->residue[y] && job->residue[h + kx] == job->residue[h + x];
}

static void check_stencil_rows(void *opaque, int64_t begin, int64_t end)
{
    stencil_job *job = opaque;
    const int64_t h = job->height, w = job->width, s = job->lattice_stride, n = h * w;
    const int64_t span_w = 2 * w;
    for (int64_t i = begin; i < end && !atomic_load(&job->mismatch); i++) {
        if (job->listed[i]) continue;
        const int64_t y = i / w, x = i % w;
        /* the window's offsets that land on the grid: dy in [-y, H - y), dx in [-x, W - x), a box of the table */
        const int64_t r0 = h - 1 - y, r1 = 2 * h - 1 - y, c0 = w - 1 - x, c1 = 2 * w - 1 - x;
        const int32_t *sums = job->window_sums;
        int64_t expected = (int64_t)sums[r1 * span_w + c1] - sums[r0 * span_w + c1] - sums[r1 * span_w + c0] +
                           sums[r0 * span_w + c0];
        if (s) expected += class_count(y, h, s) * class_count(x, w, s);
        for (int64_t g = 0; g < job->num_keys; g++) {
            const int64_t j = job->keys[g];
            expected += !stencil_reaches(job, y, x, j / w, j % w);
        }
        int ok = job->row_ptr[i + 1] - job->row_ptr[i] == expected;
        int64_t previous = -1;
        for (int64_t e = job->row_ptr[i]; ok && e < job->row_ptr[i + 1]; e++) {
            const int64_t j = job->col_idx[e];
            ok = j > previous && j < n;
            if (!ok) break;
            previous = j;
            ok = job->is_key[j] || stencil_reaches(job, y, x, j / w, j % w);
        }
        if (!ok) atomic_store(&job->mismatch, 1);
    }
}

int sa_layout_matches_stencil(int64_t height, int64_t width, const int64_t *row_ptr, const int32_t *col_idx,
                              const sa_stencil_rule *rule, int num_threads)
{
    const int64_t n = height * width, table_h = 2 * height - 1, table_w = 2 * width - 1;
    uint8_t *in_window = calloc((size_t)(table_h * table_w), 1);
    int32_t *window_sums = calloc((size_t)((table_h + 1) * (table_w + 1)), sizeof(int32_t));
    uint8_t *flags = calloc((size_t)(2 * n), 1);
    int32_t *residue = malloc((size_t)(height + width) * sizeof(int32_t));
    int status = -1;
    if (in_window == NULL || window_sums == NULL || flags == NULL || residue == NULL) goto done;
    for (int64_t o = 0; o < rule->num_offsets; o++)
        in_window[(rule->offsets[2 * o] + height - 1) * table_w + rule->offsets[2 * o + 1] + width - 1] = 1;
    /* a summed-area table, so that each row's clipped window count costs four reads, not one per offset */
    for (int64_t r = 0; r < table_h; r++) {
        int32_t row_total = 0;
        for (int64_t c = 0; c < table_w; c++) {
            row_total += in_window[r * table_w + c];
            window_sums[(r + 1) * (table_w + 1) + c + 1] = window_sums[r * (table_w + 1) + c + 1] + row_total;
        }
    }
    for (int64_t g = 0; g < rule->num_keys; g++) flags[rule->keys[g]] = 1;
    for (int64_t l = 0; l < rule->num_rows; l++) flags[n + rule->rows[l]] = 1;
    const int64_t s = rule->lattice_stride;
    for (int64_t c = 0; c < height + width; c++) residue[c] = s ? (int32_t)((c < height ? c : c - height) % s) : 0;
    stencil_job job = {.height = height, .width = width, .lattice_stride = s, .num_keys = rule->num_keys,
                       .row_ptr = row_ptr, .col_idx = col_idx, .keys = rule->keys, .in_window = in_window,
                       .window_sums = window_sums, .is_key = flags, .listed = flags + n, .residue = residue};
    atomic_init(&job.mismatch, 0);
    sa_parallel_for(n, (n + 8 * (int64_t)num_threads - 1) / (8 * (int64_t)num_threads), num_threads,
                    check_stencil_rows, &job);
    status = !atomic_load(&job.mismatch);
done:
    free(in_window);
    free(window_sums);
    free(flags);
    free(residue);
    return status;
}
