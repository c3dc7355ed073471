/* Peak fp32 FMA throughput of this machine, for the efficiency figures of the
 * benchmark: independent FMA chains on 8-wide vectors, one thread per core.
 * Build: cc -O3 -march=native -pthread fma_probe.c -o fma_probe
 * Prints GFLOP/s (an FMA counts as 2 flops) for 1 thread and for N threads. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef float v8 __attribute__((vector_size(32)));
#define CHAINS 12
#define ITERS 50000000L

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *run(void *arg)
{
    v8 acc[CHAINS], a = {1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f, 1.0001f};
    v8 b = a * 0.5f;
    for (int c = 0; c < CHAINS; c++) acc[c] = a * (float)c;
    for (long i = 0; i < ITERS; i++)
        for (int c = 0; c < CHAINS; c++) acc[c] = acc[c] * a + b;
    float sum = 0;
    for (int c = 0; c < CHAINS; c++) sum += acc[c][0];
    *(float *)arg = sum;
    return NULL;
}

static double measure(int threads)
{
    pthread_t ids[256];
    float sink[256];
    double start = now();
    for (int t = 0; t < threads; t++) pthread_create(&ids[t], NULL, run, &sink[t]);
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    double seconds = now() - start;
    return threads * (double)ITERS * CHAINS * 8 * 2 / seconds / 1e9;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    if (threads < 1 || threads > 256) threads = 1;
    printf("{\"threads_1\": %.1f, \"threads_%d\": %.1f}\n", measure(1), threads, measure(threads));
    return 0;
}
