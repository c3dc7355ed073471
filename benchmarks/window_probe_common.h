/* What the window probes share: a clock, filled inputs, and their check.
 * The check is the largest error of a probe's outputs against a softmax over
 * each query's (2 radius + 1)^2 window in double, for `samples` queries
 * spread over the grid. Keys and values carry a halo: key (y + dy, x + dx) of
 * the grid is row y + dy + radius, column x + dx + radius of the padded grid,
 * whose rows are padded_w keys long. */
#ifndef WINDOW_PROBE_COMMON_H
#define WINDOW_PROBE_COMMON_H

#include <math.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* count floats in [-0.5, 0.5) from a linear congruential generator, 64-byte aligned */
static float *filled(long count, unsigned seed)
{
    float *x = aligned_alloc(64, ((size_t)count * sizeof(float) + 63) / 64 * 64);
    for (long i = 0; i < count; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)(seed >> 8) / 16777216.0f - 0.5f;
    }
    return x;
}

static double window_probe_error(const float *q, const float *k, const float *v, const float *out, int width,
                                 int height, int padded_w, int radius, int dim, float scale, int samples)
{
    const int side = 2 * radius + 1;
    double worst = 0;
    for (int t = 0; t < samples; t++) {
        const int y = (t * 37) % height, x = (t * 11) % width;
        double s[15 * 15], top = -1e300, total = 0;
        for (int e = 0; e < side * side; e++) {
            const float *kr = k + ((long)(y + e / side) * padded_w + x + e % side) * dim;
            double dot = 0;
            for (int d = 0; d < dim; d++) dot += (double)q[((long)y * width + x) * dim + d] * kr[d];
            s[e] = dot * scale;
            top = s[e] > top ? s[e] : top;
        }
        for (int e = 0; e < side * side; e++) total += s[e] = exp(s[e] - top);
        for (int d = 0; d < dim; d++) {
            double o = 0;
            for (int e = 0; e < side * side; e++)
                o += s[e] / total * v[((long)(y + e / side) * padded_w + x + e % side) * dim + d];
            const double err = fabs(o - out[((long)y * width + x) * dim + d]);
            worst = err > worst ? err : worst;
        }
    }
    return worst;
}

#endif
