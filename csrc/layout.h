/* Sparsity layouts over an H x W grid of tokens, as CSR plus its transpose.
 * Pure C: no Python objects here. Token t = y * W + x. */
#ifndef SA_LAYOUT_H
#define SA_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    SA_PATTERN_DENSE = 0,
    SA_PATTERN_AXIAL = 1,
    SA_PATTERN_BLOCK = 2,
    SA_PATTERN_LONGFORMER = 3,
    SA_PATTERN_STRIDED = 4,
    SA_PATTERN_RANDOM = 5,
    SA_PATTERN_COUNT = 6
} sa_pattern;

typedef struct {
    int pattern;
    int64_t height, width;
    int64_t kernel_size;       /* LONGFORMER, STRIDED: window side */
    int64_t block_size;        /* BLOCK */
    int64_t stride;            /* STRIDED */
    int64_t num_global_tokens; /* LONGFORMER */
    double attention_ratio;    /* RANDOM */
    uint64_t seed;             /* RANDOM */
} sa_layout_spec;

/* 0 when every knob is in range; otherwise -1 and a message naming the knob. */
int sa_layout_validate(const sa_layout_spec *spec, char *err, size_t err_len);

/* The three builders below run on up to num_threads threads; their results do
 * not depend on the count. */

/* Fills row_ptr[0..N] with the CSR row offsets. Returns 0, or -1 with a message
 * when nnz would not fit the index types or memory could not be had. */
int sa_layout_count(const sa_layout_spec *spec, int64_t *row_ptr, int num_threads, char *err, size_t err_len);

/* Writes the column indices of every row (ascending) given row_ptr from
 * sa_layout_count. Returns 0 or -1 with a message. */
int sa_layout_fill(const sa_layout_spec *spec, const int64_t *row_ptr, int32_t *col_idx, int num_threads,
                   char *err, size_t err_len);

/* CSC of the same pattern: col_ptr[0..N], row_idx[nnz] (rows ascending per column).
 * Returns 0, or -1 when scratch memory could not be had. */
int sa_layout_transpose(int64_t num_tokens, const int64_t *row_ptr, const int32_t *col_idx,
                        int64_t *col_ptr, int32_t *row_idx, int num_threads);

/* Checks CSR offsets: row_ptr[0..N] from 0 to nnz, never decreasing. Returns 0,
 * or -1 with a message naming ptr_name (and idx_name, the array they index). */
int sa_layout_check_offsets(int64_t num_tokens, const int64_t *row_ptr, int64_t nnz, const char *ptr_name,
                            const char *idx_name, char *err, size_t err_len);

/* Checks a CSR that came from outside (a custom layout): offsets from 0 to nnz
 * that never decrease, and every row's keys in [0, N) and strictly ascending.
 * Returns 0, or -1 with a message naming the first bad row. */
int sa_layout_check_csr(int64_t num_tokens, const int64_t *row_ptr, const int32_t *col_idx, int64_t nnz,
                        char *err, size_t err_len);

/* A stencil as a rule for CSR rows: query (y, x) attends key (y + dy, x + dx)
 * for each of the window's offsets that lands on the grid; with a lattice
 * (stride >= 1; 0: none) also every key whose offsets are both multiples of
 * the stride; and every extra key. Listed rows may hold anything. */
typedef struct {
    const int32_t *offsets; /* num_offsets (dy, dx) pairs, distinct, within the grid's span, none on the lattice */
    int64_t num_offsets;
    int64_t lattice_stride;
    const int32_t *keys; /* distinct tokens */
    int64_t num_keys;
    const int32_t *rows; /* tokens */
    int64_t num_rows;
} sa_stencil_rule;

/* Whether every row of the CSR outside the listed ones holds exactly, in
 * strictly ascending order, the keys the rule gives it on the height x width
 * grid. The caller has checked the rule and the offsets of row_ptr. Returns
 * 1 or 0, or -1 when scratch memory could not be had. */
int sa_layout_matches_stencil(int64_t height, int64_t width, const int64_t *row_ptr, const int32_t *col_idx,
                              const sa_stencil_rule *rule, int num_threads);

#endif /* SA_LAYOUT_H */
