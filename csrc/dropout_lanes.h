/* The dropout generator of dropout_hash.h on eight lanes, for the CPU
 * kernels: the lanes take the scalar generator's steps, so a lane's draw is
 * the scalar draw of its pair and the masks match the CUDA kernels'. */
#ifndef SA_DROPOUT_LANES_H
#define SA_DROPOUT_LANES_H

#include <stdint.h>
#include <string.h>

#include "dropout_hash.h"
#include "simd8.h"

SA_INLINE u8v sa_mix32_v8(u8v x)
{
    SA_MIX32_STEPS(x);
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

/* The keep mask of the pairs (one query, keys[l]) for eight keys. */
SA_INLINE i8v sa_keep_keys(uint32_t threshold, uint32_t query_key, const int32_t *keys)
{
    u8v key_bits;
    memcpy(&key_bits, keys, sizeof key_bits);
    return (i8v)(sa_mix32_v8(((u8v){0} + query_key) ^ key_bits) >= threshold);
}

#endif /* SA_DROPOUT_LANES_H */
