/* What the CPU stencil kernels (attention_cpu_stencil.c, attention_cpu_window.c)
 * need to know of a pair beyond its dot product: where a row of a (batch, head)
 * lies, whether a key may be attended, the relative position bias, and the
 * dropout draw for eight pairs at once (the generator of dropout_hash.h). */
#ifndef SA_STENCIL_PAIRS_H
#define SA_STENCIL_PAIRS_H

#include <stdint.h>

#include "attention.h"
#include "simd8.h"

static inline const float *sa_row_of(const float *base, const int64_t *stride, int64_t b, int64_t h, int64_t i)
{
    return base + b * stride[0] + h * stride[1] + i * stride[2];
}

static inline int sa_key_usable(const sa_attention_params *p, int64_t b, int64_t j)
{
    return p->key_mask == NULL || p->key_mask[b * p->key_mask_stride[0] + j * p->key_mask_stride[1]];
}

/* dy, dx: query minus key, as the table is indexed; clipped to the table */
static inline float sa_bias_of(const sa_attention_params *p, int64_t h, int64_t dy, int64_t dx)
{
    if (p->bias_table == NULL) return 0.0f;
    const int64_t m = p->max_relative, side = 2 * m + 1;
    dy = dy < -m ? -m : (dy > m ? m : dy);
    dx = dx < -m ? -m : (dx > m ? m : dx);
    return ((const float *)p->bias_table)[(h * side + dy + m) * side + dx + m];
}

SA_INLINE u8v sa_mix32_v8(u8v x)
{
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

/* The keep mask of the pairs (query of lane l, first_key + l * step), given
 * each lane's query key (sa_dropout_query_key). */
SA_INLINE i8v sa_keep_lanes(uint32_t threshold, u8v query_keys, int32_t first_key, int32_t step)
{
    const i8v lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const i8v keys = (i8v){0} + first_key + lane * step;
    return (i8v)(sa_mix32_v8(query_keys ^ (u8v)keys) >= threshold);
}

#endif /* SA_STENCIL_PAIRS_H */
