/* The counter-based dropout generator, shared by the CPU and CUDA kernels and
 * mirrored in sparse_attention/_torch_impl.py.
 *
 * keep(seed, b, h, i, j): u = mix(mix(row_key(seed, b, h) ^ i) ^ j), the pair is
 * kept when u >= threshold, threshold = floor(dropout_p * 2^32). mix is a 32-bit
 * avalanche finaliser (xorshift-multiply, constants from Wellons' "lowbias32").
 * Because the draw is a pure function of the indices, the backward pass
 * regenerates the forward mask without storing it. */
#ifndef SA_DROPOUT_HASH_H
#define SA_DROPOUT_HASH_H

#include <stdint.h>

#ifdef __CUDACC__
#define SA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SA_HOST_DEVICE static inline
#endif

/* The mixing steps, on a uint32_t or on a vector of them (the CPU kernels'
 * lanes take the same steps, so their masks are the scalar ones). */
#define SA_MIX32_STEPS(x)   \
    do {                    \
        (x) ^= (x) >> 16;   \
        (x) *= 0x7feb352dU; \
        (x) ^= (x) >> 15;   \
        (x) *= 0x846ca68bU; \
        (x) ^= (x) >> 16;   \
    } while (0)

SA_HOST_DEVICE uint32_t sa_mix32(uint32_t x)
{
    SA_MIX32_STEPS(x);
    return x;
}

SA_HOST_DEVICE uint32_t sa_dropout_row_key(uint64_t seed, int64_t b, int64_t h)
{
    uint32_t x = sa_mix32((uint32_t)seed ^ 0x9e3779b9U);
    x = sa_mix32(x ^ (uint32_t)(seed >> 32));
    x = sa_mix32(x ^ (uint32_t)b);
    return sa_mix32(x ^ (uint32_t)h);
}

SA_HOST_DEVICE uint32_t sa_dropout_query_key(uint32_t row_key, int64_t i)
{
    return sa_mix32(row_key ^ (uint32_t)i);
}

SA_HOST_DEVICE int sa_dropout_keep(uint32_t query_key, int64_t j, uint32_t threshold)
{
    return sa_mix32(query_key ^ (uint32_t)j) >= threshold;
}

SA_HOST_DEVICE uint32_t sa_dropout_threshold(double p)
{
    double t = p * 4294967296.0;
    return t >= 4294967295.0 ? 4294967295U : (uint32_t)t;
}

#endif /* SA_DROPOUT_HASH_H */
