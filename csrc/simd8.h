/* Eight-lane float vectors (GCC vector extensions) shared by the CPU kernels
 * that work on panels: attention_cpu_tiled.c and attention_cpu_stencil.c.
 * Functions here are always inlined, so that they take the instruction set of
 * the clone they are inlined into and no vector crosses a call boundary. */
#ifndef SA_SIMD8_H
#define SA_SIMD8_H

#include <stdint.h>

/* vectors cross no call boundary (every helper is inlined), so the ABI note is moot */
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));

#define LOADU(ptr) (*(const v8u *)(ptr))
#define STOREU(ptr, x) (*(v8u *)(ptr) = (x))
#define SA_INLINE static inline __attribute__((always_inline))

#define SPLAT(x) ((v8){0} + (float)(x))
/* lanes of a where mask (all ones or all zeros per lane) is set, else of b */
#define SELECT(mask, a, b) ((v8)(((i8v)(a) & (mask)) | ((i8v)(b) & ~(mask))))

/* exp over eight lanes, the polynomial of fast_expf.h; x below -87.3 gives 0.
 * Rounds through integer conversions, which every ISA level has. */
SA_INLINE v8 exp_v8(v8 x)
{
    const i8v underflow = x < SPLAT(-87.3f);
    x = SELECT(x > SPLAT(88.7f), SPLAT(88.7f), x);
    const v8 y = x * 1.44269504088896341f + 0.5f;
    v8 n = __builtin_convertvector(__builtin_convertvector(y, i8v), v8);
    n += __builtin_convertvector(n > y, v8); /* truncation to floor: -1 where it rounded up */
    const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 poly = SPLAT(1.9875691500e-4f);
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    const v8 value = poly * r * r + r + 1.0f;
    const i8v bits = (__builtin_convertvector(n, i8v) + 127) << 23;
    return SELECT(underflow, SPLAT(0.0f), value * (v8)bits);
}

SA_INLINE float hsum8(v8 x)
{
    float total = 0.0f;
    for (int l = 0; l < 8; l++) total += x[l];
    return total;
}

SA_INLINE float hmax8(v8 x)
{
    float top = x[0];
    for (int l = 1; l < 8; l++) top = x[l] > top ? x[l] : top;
    return top;
}

/* Transposes the 8 x 8 block r (r[i][j]) in place: r[j][i]. */
SA_INLINE void transpose8(v8 r[8])
{
    const i8v lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const i8v pairs_lo = {0, 1, 8, 9, 4, 5, 12, 13}, pairs_hi = {2, 3, 10, 11, 6, 7, 14, 15};
    const i8v halves_lo = {0, 1, 2, 3, 8, 9, 10, 11}, halves_hi = {4, 5, 6, 7, 12, 13, 14, 15};
    v8 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shuffle(r[i], r[i + 1], lo);
        t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = __builtin_shuffle(t[i], t[i + 2], pairs_lo);
        u[i + 1] = __builtin_shuffle(t[i], t[i + 2], pairs_hi);
        u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], pairs_lo);
        u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], pairs_hi);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = __builtin_shuffle(u[i], u[i + 4], halves_lo);
        r[i + 4] = __builtin_shuffle(u[i], u[i + 4], halves_hi);
    }
}

/* panel[d][c] = rows[c][d] for c < 64 and d < dim, dim a multiple of 8:
 * 64 gathered rows packed transposed, 8 x 8 blocks at a time. */
SA_INLINE void pack_transposed64(const float *const *rows, int64_t dim, float *panel)
{
    for (int c0 = 0; c0 < 64; c0 += 8) {
        for (int64_t d0 = 0; d0 < dim; d0 += 8) {
            v8 block[8];
            for (int i = 0; i < 8; i++) block[i] = LOADU(rows[c0 + i] + d0);
            transpose8(block);
            for (int i = 0; i < 8; i++) STOREU(panel + (d0 + i) * 64 + c0, block[i]);
        }
    }
}

#endif /* SA_SIMD8_H */
