/* Eight-lane float vectors (GCC vector extensions) shared by the CPU kernels
 * that work on panels: attention_cpu_tiled.c and attention_cpu_stencil.c.
 * Functions here are always inlined, so that they take the instruction set of
 * the clone they are inlined into and no vector crosses a call boundary. */
#ifndef SA_SIMD8_H
#define SA_SIMD8_H

#include <stdint.h>

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));

#define LOADU(ptr) (*(const v8u *)(ptr))
#define STOREU(ptr, x) (*(v8u *)(ptr) = (x))
#define SA_INLINE static inline __attribute__((always_inline))

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
