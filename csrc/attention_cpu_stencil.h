/* CPU forward and backward for stencil layouts (attention_cpu_stencil.c). */
#ifndef SA_ATTENTION_CPU_STENCIL_H
#define SA_ATTENTION_CPU_STENCIL_H

#include "attention.h"

/* The pairs of p->stencil_* (float32). Rows in stencil_rows that attend every
 * token are done here too; the others are left alone: they land in rows_left
 * (stencil_num_rows long), *num_left of them, and the caller runs the row
 * kernel on them afterwards. */
int sa_cpu_forward_stencil(const sa_attention_params *p, int num_threads, int32_t *rows_left,
                           int64_t *num_left, char *err, size_t len);

/* The whole backward, stencil_rows included (float32). p->delta must hold
 * delta already. The bias gradient comes in grad_bias_rows (written, not
 * added to), and only where sa_cpu_stencil_sums_bias_grad says so. */
int sa_cpu_backward_stencil(const sa_attention_params *p, int num_threads, char *err, size_t len);

/* Whether the stencil backward sums the bias gradient of p (a bias table, and
 * offsets alone: every pair of an offset takes the same cell of the table). */
int sa_cpu_stencil_sums_bias_grad(const sa_attention_params *p);

#endif /* SA_ATTENTION_CPU_STENCIL_H */
