/* CPU forward and backward for stencil layouts whose offsets fit in a small
 * box (attention_cpu_window.c). */
#ifndef SA_ATTENTION_CPU_WINDOW_H
#define SA_ATTENTION_CPU_WINDOW_H

#include "attention.h"

/* Whether p's stencil suits the window kernel: float32, head dim at most 256,
 * offsets within a 13 x 13 box (in units of the divisors they share, for a
 * stencil of offsets alone) that they fill at least half of. */
int sa_cpu_window_fits(const sa_attention_params *p);

/* Whether a clamped window's query stride along an axis suits the kernel's
 * blocks of `block` rows (columns): it divides the block or the block
 * divides it. */
int sa_cpu_window_stride_fits(int64_t stride, int64_t block);

/* The kernel's blocks: rows and columns of queries. */
#define SA_WINDOW_BLOCK_ROWS 4
#define SA_WINDOW_BLOCK_COLS 2

/* The same rule on a stencil's offsets ((dy, dx) pairs) and a head dim alone:
 * Python asks it before a backward with a bias, which only the window kernel
 * (and the row kernels) can give. With `lattice` (no extra keys or listed
 * rows) offsets that share divisors (a dilated window) are measured in
 * units of them: the kernel runs each class of tokens they link as a grid of
 * its own. */
int sa_cpu_window_offsets_fit(const int32_t *offsets, int64_t num_offsets, int64_t head_dim, int lattice);

/* The box of num_offsets (dy, dx) pairs (at least one) in units of the
 * steps they share (with `lattice`; else steps 1): steps[0..1], the box's
 * top-left lo[0..1] and its height and width size[0..1], in steps. */
void sa_cpu_window_box(const int32_t *offsets, int64_t num_offsets, int lattice, int64_t steps[2], int64_t lo[2],
                       int64_t size[2]);

/* As sa_cpu_forward_stencil (attention_cpu_stencil.h), for a stencil that fits. */
int sa_cpu_forward_window(const sa_attention_params *p, int num_threads, int32_t *rows_left, int64_t *num_left,
                          char *err, size_t len);

/* As sa_cpu_backward_stencil (attention_cpu_stencil.h), for a stencil that
 * fits and no grad_scores; with a listed row that attends only some tokens
 * it hands the call to sa_cpu_backward_stencil (refused with grad_bias_rows).
 * With grad_bias_rows it writes each (batch, head)'s bias gradient there. */
int sa_cpu_backward_window(const sa_attention_params *p, int num_threads, char *err, size_t len);

/* Calls that ran on the window kernels so far (for tests). */
long long sa_cpu_window_forwards(void);
long long sa_cpu_window_backwards(void);

#endif /* SA_ATTENTION_CPU_WINDOW_H */
