/* A polynomial exp for float that the CPU kernels inline into their loops over
 * chunks of scores, so that those loops vectorise. */
#ifndef SA_FAST_EXPF_H
#define SA_FAST_EXPF_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for float, inlined so that loops over a chunk of scores vectorise:
 * exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, with the Cephes
 * minimax polynomial (relative error below 2e-7); x below -87.3 gives 0. */
static inline float sa_fast_expf(float x)
{
    const float underflow = x < -87.3f ? 0.0f : 1.0f;
    x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const float value = poly * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof(scale));
    return value * scale * underflow;
}

#endif /* SA_FAST_EXPF_H */
