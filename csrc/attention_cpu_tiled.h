/* CPU forward and backward over tile plans (attention_cpu_tiled.c). */
#ifndef SA_ATTENTION_CPU_TILED_H
#define SA_ATTENTION_CPU_TILED_H

#include "attention.h"

/* The forward over every pass of a plan (passes and base as for the backward
 * below). With at least two (batch, head) pairs per thread a work item is a
 * (batch, head) and its passes run one after the other; else each pass runs
 * over all pairs, a work item a tile. */
int sa_cpu_forward_tiled(const sa_attention_params *p, const int64_t (*passes)[6], int64_t num_passes,
                         const int32_t *base, int num_threads, char *err, size_t len);

/* The whole backward over every pass of a plan (float32, no bias gradient, no
 * rows left out of the plan): passes[i] = the six numbers of pass i, base = the
 * plan buffer. p->delta must hold delta already. */
int sa_cpu_backward_tiled(const sa_attention_params *p, const int64_t (*passes)[6],
                          int64_t num_passes, const int32_t *base, int num_threads, char *err,
                          size_t len);

#endif /* SA_ATTENTION_CPU_TILED_H */
