/* Eight-lane float vectors (GCC vector extensions) shared by the CPU kernels
 * that work on panels: attention_cpu_tiled.c and attention_cpu_stencil.c.
 * Functions here are always inlined, so that they take the instruction set of
 * the clone they are inlined into and no vector crosses a call boundary. */
#ifndef SA_SIMD8_H
#define SA_SIMD8_H

#include <stdint.h>
#include <stdlib.h>

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

/* Whether the clone that runs (target_clones picks x86-64-v4 where the CPU
 * has it) has 32 vector registers, so that kernels may keep more accumulators.
 * SPARSE_ATTENTION_NARROW_KERNELS set in the environment says no, so that the
 * tests reach the 16-register paths on a machine with AVX-512 too. */
static inline int sa_has_32_vector_registers(void)
{
    if (getenv("SPARSE_ATTENTION_NARROW_KERNELS") != NULL) return 0;
#if defined(__AVX512F__)
    return 1;
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SA_NO_CLONES)
    return __builtin_cpu_supports("x86-64-v4");
#else
    return 0;
#endif
}

/* exp over eight lanes of count vectors, in place; x below -87.3 gives 0, x
 * above 88.3 exp(88.3), NaN stays NaN. Adding 1.5 * 2^23 to x / ln 2 rounds
 * it to the integer n in the low mantissa bits, so no conversions are needed:
 * those bits shifted up by 23 are n in the exponent field, and adding them to
 * the bits of exp(r) multiplies it by 2^n. exp(r) on |r| <= ln 2 / 2 is
 * 1 + r + r^2 p(r) with p a cubic fitted for the least maximum relative error
 * (1.1e-7, against 1.2e-7 for one float rounding); the reduction
 * r = x - n ln 2 takes ln 2 in two parts, so that r stays exact for large n.
 * count is a constant where this is inlined: the vectors go through each step
 * together, so that their dependency chains overlap (at 64x64 RANDOM the exp
 * was a fifth of the tiled forward, bound by the latency of one vector's
 * chain). A degree-7 polynomial and a multiply by 2^n cost this 6 more
 * operations a vector, 5 of them on the FMA pipes. */
SA_INLINE void exp_lanes_clamped(v8 *x, const int count, const int clamp_high)
{
    const v8 shifter = SPLAT(12582912.0f);
    i8v tiny[4];
    v8 t[4], r[4], r2[4], poly[4];
    for (int i = 0; i < count; i++) {
        /* below -87.3 the exponent field would underflow: those lanes are 0 */
        tiny[i] = x[i] < SPLAT(-87.3f);
        if (clamp_high) x[i] = SELECT(x[i] > SPLAT(88.3f), SPLAT(88.3f), x[i]); /* n at most 127 */
    }
    for (int i = 0; i < count; i++) t[i] = x[i] * 1.44269504088896341f + shifter;
    for (int i = 0; i < count; i++) {
        const v8 n = t[i] - shifter;
        r[i] = x[i] - n * 0.693359375f + n * 2.12194440e-4f;
    }
    for (int i = 0; i < count; i++) r2[i] = r[i] * r[i];
    for (int i = 0; i < count; i++)
        poly[i] = (r[i] * 8.31248e-3f + 4.189031e-2f) * r2[i] + (r[i] * 1.6667116e-1f + 4.999923e-1f);
    for (int i = 0; i < count; i++) {
        const v8 value = poly[i] * r2[i] + (r[i] + 1.0f);
        x[i] = SELECT(tiny[i], SPLAT(0.0f), (v8)((i8v)value + ((i8v)t[i] << 23)));
    }
}

SA_INLINE void exp_lanes(v8 *x, const int count)
{
    exp_lanes_clamped(x, count, 1);
}

/* exp_lanes for x <= 0 or NaN (scores less their maximum): no clamp above,
 * two operations fewer a vector */
SA_INLINE void exp_nonpositive_lanes(v8 *x, const int count)
{
    exp_lanes_clamped(x, count, 0);
}

/* exp_lanes for a count of 1 to 4 known only at run time (the last group of
 * a row or union): each case gets its own constant count. */
SA_INLINE void exp_some_lanes(v8 *x, int count)
{
    switch (count) {
    case 4: exp_lanes(x, 4); break;
    case 3: exp_lanes(x, 3); break;
    case 2: exp_lanes(x, 2); break;
    case 1: exp_lanes(x, 1); break;
    default: break;
    }
}

SA_INLINE v8 exp_v8(v8 x)
{
    exp_lanes(&x, 1);
    return x;
}

/* Natural log over eight lanes of positive, finite, normal floats (other lanes
 * give garbage: callers select around them). x = m 2^e with m in
 * [sqrt(1/2), sqrt(2)), log(m) by the Cephes minimax polynomial in f = m - 1
 * (about 1 ulp), e ln 2 added in two parts. The lse of a merge took libm's
 * log1pf and logf one row at a time, 5% of a STRIDED forward. */
SA_INLINE v8 log_v8(v8 x)
{
    const i8v bits = (i8v)x;
    i8v exponent = ((bits >> 23) & 0xff) - 127;
    v8 m = (v8)((bits & 0x007fffff) | 0x3f800000); /* in [1, 2) */
    const i8v big = m > SPLAT(1.41421356f);
    m = SELECT(big, m * 0.5f, m);
    exponent -= big; /* big lanes are all ones: -(-1) */
    const v8 e = __builtin_convertvector(exponent, v8);
    const v8 f = m - 1.0f, z = f * f;
    v8 poly = f * 7.0376836292e-2f - 1.1514610310e-1f;
    poly = poly * f + 1.1676998740e-1f;
    poly = poly * f - 1.2420140846e-1f;
    poly = poly * f + 1.4249322787e-1f;
    poly = poly * f - 1.6668057665e-1f;
    poly = poly * f + 2.0000714765e-1f;
    poly = poly * f - 2.4999993993e-1f;
    poly = poly * f + 3.3333331174e-1f;
    v8 y = f * z * poly - e * 2.12194440e-4f - z * 0.5f;
    return f + y + e * 0.693359375f;
}

/* Horizontal sum and maximum as trees of three shuffles: a chain of seven
 * scalar steps per row and chunk was a visible share of the tiled softmax. */
SA_INLINE float hsum8(v8 x)
{
    const i8v swap_halves = {4, 5, 6, 7, 0, 1, 2, 3}, swap_pairs = {2, 3, 0, 1, 6, 7, 4, 5};
    const i8v swap_lanes = {1, 0, 3, 2, 5, 4, 7, 6};
    x += __builtin_shuffle(x, swap_halves);
    x += __builtin_shuffle(x, swap_pairs);
    x += __builtin_shuffle(x, swap_lanes);
    return x[0];
}

/* The larger of x and y lane by lane; y's NaN lanes are passed over (a NaN
 * compares false), so a maximum started from -inf never holds a NaN. */
SA_INLINE v8 lanes_max(v8 x, v8 y)
{
    return SELECT(y > x, y, x);
}

/* NaN lanes are passed over (a NaN compares false). */
SA_INLINE float hmax8(v8 x)
{
    const i8v swap_halves = {4, 5, 6, 7, 0, 1, 2, 3}, swap_pairs = {2, 3, 0, 1, 6, 7, 4, 5};
    const i8v swap_lanes = {1, 0, 3, 2, 5, 4, 7, 6};
    v8 y = __builtin_shuffle(x, swap_halves);
    x = SELECT(y > x, y, x);
    y = __builtin_shuffle(x, swap_pairs);
    x = SELECT(y > x, y, x);
    y = __builtin_shuffle(x, swap_lanes);
    x = SELECT(y > x, y, x);
    return x[0];
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

/* panel[d][c] = rows[c][d] for c < cols (a multiple of 8, at most 64) and
 * d < dim (a multiple of 8), panel rows 64 apart: gathered rows packed
 * transposed, 8 x 8 blocks at a time. */
SA_INLINE void pack_transposed64(const float *const *rows, int64_t dim, float *panel, int cols)
{
    for (int c0 = 0; c0 < cols; c0 += 8) {
        for (int64_t d0 = 0; d0 < dim; d0 += 8) {
            v8 block[8];
            for (int i = 0; i < 8; i++) block[i] = LOADU(rows[c0 + i] + d0);
            transpose8(block);
            for (int i = 0; i < 8; i++) STOREU(panel + (d0 + i) * 64 + c0, block[i]);
        }
    }
}

#endif /* SA_SIMD8_H */
