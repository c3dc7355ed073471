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

/* The whole backward, stencil_rows included (float32, no bias gradient).
 * p->delta must hold delta already. */
int sa_cpu_backward_stencil(const sa_attention_params *p, int num_threads, char *err, size_t len);

#endif /* SA_ATTENTION_CPU_STENCIL_H */
